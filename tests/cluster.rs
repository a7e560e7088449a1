//! The replicated cluster core, against real node processes.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn indexes(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .collect()
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn clients_on_different_nodes_see_one_order() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut a = cluster.login(1, "alice");
    let mut b = cluster.login(3, "bob");
    assert_eq!(a.join("#general")["type"], "joined");
    assert_eq!(b.join("#general")["type"], "joined");
    for i in 0..5 {
        assert_eq!(
            a.say("#general", &format!("a{i}"), "from alice")["type"],
            "ack"
        );
        assert_eq!(
            b.say("#general", &format!("b{i}"), "from bob")["type"],
            "ack"
        );
    }
    a.wait_messages(T, "10 messages on node 1", |m| m.len() >= 10);
    b.wait_messages(T, "10 messages on node 3", |m| m.len() >= 10);
    assert_eq!(
        a.messages, b.messages,
        "same messages, same order, same indexes"
    );
    let idx = indexes(&a.messages);
    assert!(
        idx.windows(2).all(|w| w[0] < w[1]),
        "ascending indexes: {idx:?}"
    );
    assert!(a.messages.iter().any(|m| m["from"] == "bob"));
}

#[test]
fn follower_forwards_writes_to_the_leader() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut c = cluster.login(follower, "carol");
    c.join("#fwd");
    let ack = c.say("#fwd", "m1", "via a follower");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(ack["index"].as_u64().unwrap() > 0);
    // Read-your-write on the follower that accepted it.
    let history = c.full_history("#fwd");
    assert_eq!(ids(&history), vec!["m1"]);
}

/// Sends `count` messages with ids `{prefix}{n}`, retrying an unavailable one with the same id
/// as a client would; returns id → acked index.
fn send_stream(
    cluster_chat: String,
    user: &str,
    room: &str,
    prefix: &str,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, u64> {
    let mut acked = BTreeMap::new();
    let mut client = Client::connect(&cluster_chat);
    client.hello(user);
    client.join(room);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("{prefix}{n}");
        loop {
            let reply = client.say(room, &id, "steady");
            if reply["type"] == "ack" {
                acked.insert(id.clone(), reply["index"].as_u64().unwrap());
                break;
            }
            assert_eq!(reply["code"], "unavailable", "unexpected reply {reply}");
        }
        n += 1;
    }
    acked
}

#[test]
fn leader_kill_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let room = "#steady";
    // Watchers on both survivors, joined before anything is sent.
    let mut watchers: Vec<Client> = survivors
        .iter()
        .map(|id| {
            let mut w = cluster.login(*id, &format!("watch{id}"));
            w.join(room);
            w
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = survivors
        .iter()
        .map(|&id| {
            let addr = cluster.node(id).chat.clone();
            let stop = stop.clone();
            let user = format!("send{id}");
            std::thread::spawn(move || send_stream(addr, &user, room, &format!("n{id}-"), stop))
        })
        .collect();

    // Let traffic flow, kill the leader mid-stream, let it flow under the new leader.
    wait_for(T, "traffic before the kill", || {
        watchers[0].next_reply(Duration::from_millis(100));
        (watchers[0].messages.len() >= 50).then_some(())
    });
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(&survivors, T);
    assert_ne!(new_leader, leader);
    let before = watchers[0].messages.len();
    wait_for(T, "traffic after the kill", || {
        watchers[0].next_reply(Duration::from_millis(100));
        (watchers[0].messages.len() >= before + 50).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for s in senders {
        acked.extend(s.join().expect("sender thread"));
    }
    assert!(acked.len() >= 100, "only {} acked", acked.len());

    // Every acked message exactly once, in one order, in both watchers' streams.
    let acked_ids: HashSet<&String> = acked.keys().collect();
    for w in watchers.iter_mut() {
        w.wait_messages(T, "every acked message", |m| {
            let seen: HashSet<String> = ids(m).into_iter().collect();
            acked_ids.iter().all(|id| seen.contains(*id))
        });
        let seen = ids(&w.messages);
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a duplicate in the stream");
        let idx = indexes(&w.messages);
        assert!(idx.windows(2).all(|p| p[0] < p[1]), "stream out of order");
        for m in &w.messages {
            let id = m["id"].as_str().unwrap();
            if let Some(index) = acked.get(id) {
                assert_eq!(
                    m["index"].as_u64(),
                    Some(*index),
                    "ack and stream disagree on {id}"
                );
            }
        }
    }
    let stream0 = watchers[0].messages.clone();
    let stream1 = watchers[1].messages.clone();
    let common_len = stream0.len().min(stream1.len());
    assert_eq!(
        stream0[..common_len],
        stream1[..common_len],
        "one order on both nodes"
    );

    // Same history on both survivors.
    let h0 = watchers[0].full_history(room);
    let h1 = watchers[1].full_history(room);
    assert_eq!(h0, h1);
    let history_ids: Vec<String> = ids(&h0);
    let unique: HashSet<&String> = history_ids.iter().collect();
    assert_eq!(unique.len(), history_ids.len(), "duplicate in history");
    for id in acked.keys() {
        assert!(unique.contains(id), "acked {id} missing from history");
    }

    // The killed node comes back and catches up to the same state.
    cluster.start_node(leader);
    let applied = cluster.wait_applied_equal(&[1, 2, 3], 1, T);
    assert!(applied > 0);
    let mut late = cluster.login(leader, "latecomer");
    late.join(room);
    let h_restarted = late.full_history(room);
    assert_eq!(ids(&h_restarted), history_ids);
}

#[test]
fn full_restart_keeps_every_acknowledged_message() {
    // A small snapshot interval so restart goes through snapshot + log replay.
    let mut cluster = Cluster::start(
        3,
        "[raft]\nsnapshot_every_entries = 40\nkeep_entries_after_snapshot = 10\n",
    );
    cluster.wait_leader(&[1, 2, 3], T);
    let mut a = cluster.login(2, "alice");
    a.join("#keep");
    let mut acked = Vec::new();
    for i in 0..120 {
        let ack = a.say("#keep", &format!("k{i}"), "durable");
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(format!("k{i}"));
    }
    let session = a.session.clone().unwrap();
    drop(a);
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_leader(&[1, 2, 3], T);
    for id in 1..=3 {
        let mut c = wait_for(T, "resume after restart", || {
            let mut c = Client::try_connect(&cluster.node(id).chat)?;
            let w = c.request(json!({"type": "hello", "user": "alice", "session": session}))?;
            (w["type"] == "welcome").then_some(c)
        });
        c.session = Some(session.clone());
        let history = c.full_history("#keep");
        assert_eq!(ids(&history), acked, "history on node {id}");
        drop(c);
    }
}

#[test]
fn resent_message_is_acknowledged_once_even_on_another_node() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut a = cluster.login(1, "dave");
    a.join("#dedup");
    let first = a.say("#dedup", "same-id", "once");
    let again = a.say("#dedup", "same-id", "once");
    assert_eq!(first["type"], "ack");
    assert_eq!(first["index"], again["index"]);
    let session = a.session.clone().unwrap();
    drop(a);
    let mut b = wait_for(T, "resume on node 3", || {
        let mut c = Client::try_connect(&cluster.node(3).chat)?;
        let w = c.request(json!({"type": "hello", "user": "dave", "session": session}))?;
        (w["type"] == "welcome").then_some(c)
    });
    let third = b.say("#dedup", "same-id", "once");
    assert_eq!(third["type"], "ack", "{third}");
    assert_eq!(third["index"], first["index"]);
    let history = b.full_history("#dedup");
    assert_eq!(ids(&history), vec!["same-id"]);
}

#[test]
fn resume_replays_exactly_the_missed_messages() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut a = cluster.login(1, "erin");
    a.join("#resume");
    let mut other = cluster.login(2, "frank");
    other.join("#resume");
    other.say("#resume", "before", "seen by erin");
    a.wait_messages(T, "the first message", |m| m.len() == 1);
    let last_seen = a.messages[0]["index"].as_u64().unwrap();
    let session = a.session.clone().unwrap();
    drop(a);
    let mut missed = Vec::new();
    for i in 0..5 {
        let ack = other.say("#resume", &format!("missed{i}"), "while erin was away");
        assert_eq!(ack["type"], "ack");
        missed.push(format!("missed{i}"));
    }
    let mut back = wait_for(T, "resume", || {
        let mut c = Client::try_connect(&cluster.node(3).chat)?;
        let w = c.request(json!({
            "type": "hello", "user": "erin", "session": session, "resume_from": last_seen
        }))?;
        (w["type"] == "welcome").then_some(c)
    });
    back.wait_messages(T, "the missed messages", |m| m.len() >= 5);
    assert_eq!(ids(&back.messages), missed);
    // Still in the room after resuming: live messages keep coming.
    other.say("#resume", "live", "after resume");
    back.wait_messages(T, "a live message", |m| m.len() >= 6);
    assert_eq!(ids(&back.messages).last().unwrap(), "live");
}

#[test]
fn heavy_writes_with_frequent_snapshots_and_a_lagging_node() {
    // openraft #2116: a purge overtaking a queued apply panicked under heavy writes. Snapshot
    // every 200 entries while writing fast, with a node down long enough to need a snapshot.
    let mut cluster = Cluster::start(
        3,
        "[raft]\nsnapshot_every_entries = 200\nkeep_entries_after_snapshot = 100\n",
    );
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill(lagging);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let node = (1..=3).find(|id| *id != lagging).unwrap();
            let addr = cluster.node(node).chat.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&addr);
                c.hello(&format!("heavy{w}"));
                c.join("#heavy");
                // Pipelined: write everything, then collect the acks.
                let n = 400;
                for i in 0..n {
                    c.send(json!({"type": "send", "to": "#heavy", "id": format!("{w}-{i}"), "text": "x"}))
                        .unwrap();
                }
                let mut acks = 0;
                while acks < n {
                    let r = c.next_reply(Duration::from_secs(30)).expect("ack");
                    assert_eq!(r["type"], "ack", "{r}");
                    acks += 1;
                }
                acks
            })
        })
        .collect();
    let total: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(total, 1600);
    // The leader has compacted its log past what the lagging node has: only a snapshot can
    // bring it back.
    wait_for(T, "the leader to purge its log", || {
        let purged = cluster.status(leader)?["purged_index"].as_u64()?;
        (purged > 100).then_some(())
    });
    cluster.start_node(lagging);
    cluster.wait_applied_equal(&[1, 2, 3], 1600, T);
    for id in 1..=3 {
        assert!(
            cluster.is_running(id),
            "node {id} died:\n{}",
            cluster.log(id)
        );
    }
    let mut check = cluster.login(lagging, "checker");
    check.join("#heavy");
    let history = check.full_history("#heavy");
    assert_eq!(history.len(), 1600);
    let unique: HashSet<String> = ids(&history).into_iter().collect();
    assert_eq!(unique.len(), 1600);
    assert!(
        cluster
            .log(lagging)
            .contains("installed snapshot from leader"),
        "the lagging node should have caught up through a snapshot"
    );
    let snapshots = (1..=3)
        .filter(|id| cluster.data_dir(*id).join("snapshot.json").exists())
        .count();
    assert_eq!(snapshots, 3, "every node holds a snapshot");
}

#[test]
fn welcome_gives_clients_each_nodes_advertised_chat_address() {
    let mut cluster = Cluster::configure(2, "");
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let node2 = format!("metrics = \"{}\"\n", cluster.node(2).metrics);
    let text = text.replace(
        &node2,
        &format!("{node2}advertise_chat = \"chat-2.example.net:7000\"\n"),
    );
    std::fs::write(&cluster.config, text).unwrap();
    cluster.start_node(1);
    cluster.start_node(2);
    cluster.wait_leader(&[1, 2], T);
    let mut c = cluster.client(1);
    let w = c.hello("ada");
    let nodes = w["nodes"].as_array().cloned().unwrap_or_default();
    let chat_of = |id: u64| {
        nodes
            .iter()
            .find(|n| n["id"] == id)
            .and_then(|n| n["chat"].as_str())
            .map(String::from)
    };
    assert_eq!(
        chat_of(2).as_deref(),
        Some("chat-2.example.net:7000"),
        "{w}"
    );
    assert_eq!(
        chat_of(1).as_deref(),
        Some(cluster.node(1).chat.as_str()),
        "{w}"
    );
}

/// Raft's tasks run on their own thread, apart from the client connections' runtime: a
/// burst of deliveries to a big room must not queue ahead of the next commit (BENCHMARKS.md,
/// the 1,000-member room). The leader, which replicates and applies there, still commits.
#[test]
fn raft_runs_on_a_thread_of_its_own() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let pid = cluster.pid(leader).expect("the leader runs");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the node's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    assert!(threads.iter().any(|t| t == "raft"), "{threads:?}");
    assert!(
        threads.iter().any(|t| t == "tokio-rt-worker"),
        "{threads:?}"
    );
    let mut c = cluster.login(leader, "dora");
    c.join("#own");
    assert_eq!(c.say("#own", "m1", "committed")["type"], "ack");
}

#[test]
fn a_client_without_echo_gets_acks_and_others_messages_but_not_its_own() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let other = if leader == 1 { 2 } else { 1 };
    let mut quiet = wait_for(T, "a hello without echo to be accepted", || {
        let mut c = Client::try_connect(&cluster.node(leader).chat)?;
        let w = c.request(json!({"type": "hello", "user": "quiet", "echo": false}))?;
        (w["type"] == "welcome").then_some(c)
    });
    assert_eq!(quiet.join("#r")["type"], "joined");
    let mut loud = cluster.login(other, "loud");
    assert_eq!(loud.join("#r")["type"], "joined");
    for i in 0..3 {
        let ack = quiet.say("#r", &format!("q{i}"), "mine");
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    assert_eq!(loud.say("#r", "l0", "theirs")["type"], "ack");
    // Delivery is in index order: once loud's later message is here, an echo of quiet's own
    // would have come before it.
    quiet.wait_messages(T, "loud's message", |m| {
        m.iter().any(|m| m["from"] == "loud")
    });
    assert!(
        quiet.messages.iter().all(|m| m["from"] != "quiet"),
        "no echo: {:?}",
        quiet.messages
    );
    loud.wait_messages(T, "all four messages", |m| m.len() >= 4);
}
