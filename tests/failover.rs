//! Failover without waiting for election timeouts: a crashed leader is replaced as soon as its
//! port refuses connections, and a stopping leader hands over first. Election timeouts here
//! are seconds long, so only those two paths can explain a new leader within the deadlines.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);
/// Lease plus election timeout comes to at least 9 s with these settings.
const SLOW_ELECTIONS: &str =
    "[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 4000\nelection_timeout_max_ms = 5000\n";
/// Well under what the election timeouts alone would take.
const FAST: Duration = Duration::from_secs(3);

fn follower_of(leader: u64) -> u64 {
    if leader == 1 { 2 } else { 1 }
}

#[test]
fn a_crashed_leader_is_replaced_before_any_election_timeout() {
    let mut cluster = Cluster::start(3, SLOW_ELECTIONS);
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let on = follower_of(leader);
    let mut c = cluster.login(on, "survivor");
    c.join("#up");
    c.say("#up", "before", "x");
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    // Both followers must be watching the leader before it dies.
    wait_for(T, "followers to watch the leader", || {
        survivors
            .iter()
            .all(|id| cluster.status(*id).is_some_and(|s| s["leader"] == leader))
            .then_some(())
    });

    let killed = Instant::now();
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(&survivors, T);
    let took = killed.elapsed();
    assert!(
        took < FAST,
        "a new leader after {took:?}: the crash was not noticed"
    );
    assert_ne!(new_leader, leader);
    let ack = c.say("#up", "after", "x");
    assert_eq!(ack["type"], "ack", "{ack}");

    // The old leader comes back as a follower and catches up.
    cluster.start_node(leader);
    let index = ack["index"].as_u64().unwrap();
    cluster.wait_applied_equal(&[1, 2, 3], index, T);
    assert_eq!(cluster.wait_leader(&[1, 2, 3], T), new_leader);
}

#[test]
fn a_stopping_leader_hands_over_before_it_exits() {
    let mut cluster = Cluster::start(3, SLOW_ELECTIONS);
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let on = follower_of(leader);
    let mut c = cluster.login(on, "staying");
    c.join("#up");
    c.say("#up", "before", "x");
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();

    let stopped = Instant::now();
    cluster.terminate(leader);
    assert_eq!(cluster.wait_exit(leader, T), Some(0), "a clean exit");
    let new_leader = cluster.wait_leader(&survivors, T);
    let took = stopped.elapsed();
    assert!(took < FAST, "a new leader after {took:?}: no handover");
    assert_ne!(new_leader, leader);
    let ack = c.say("#up", "after", "x");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(
        cluster.log(leader).contains("leadership handed over"),
        "{}",
        cluster.log(leader)
    );
}

/// A leader that crashed may have sent followers entries it never wrote itself. Coming back
/// as leader in the same term (openraft's "leader restore") it would write different entries
/// under the same log ids, and a follower would keep its old ones: nodes would apply different
/// logs. A restarted leader must win a new term instead.
#[test]
fn a_restarted_leader_leads_again_only_in_a_new_term() {
    let mut cluster = Cluster::start(1, "");
    cluster.wait_leader(&[1], T);
    let term = |c: &Cluster| c.status(1).and_then(|s| s["term"].as_u64());
    let before = wait_for(T, "a term", || term(&cluster));
    cluster.kill(1);
    cluster.start_node(1);
    cluster.wait_leader(&[1], T);
    let after = wait_for(T, "a term", || term(&cluster));
    assert!(after > before, "the restarted leader kept term {before}");
}
