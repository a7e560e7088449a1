//! Lossy links between the nodes: unanswered AppendEntries and forwarded messages get second
//! copies on other connections (`raftchat_raft_rpc_hedged_total` counts them), and nothing a
//! client was acknowledged is lost or stored twice.
//! Needs root (setpriv, iptables); under `CI=true` it never skips.

mod common;
#[allow(dead_code)]
#[path = "chaos/faults.rs"]
mod faults;

use std::time::Duration;

use common::{Cluster, wait_for};
use faults::Net;

const T: Duration = Duration::from_secs(60);
const MESSAGES: usize = 150;

/// The sum of `name`'s series on node `id` whose labels include `rpc="{rpc}"`.
fn hedged(cluster: &Cluster, id: u64, rpc: &str) -> f64 {
    let body = common::http_get(&cluster.node(id).metrics, "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("raftchat_raft_rpc_hedged_total{"))
        .filter(|l| l.contains(&format!("rpc=\"{rpc}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_lossy_cluster_hedges_its_requests_and_loses_nothing() {
    if !common::is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root: the lossy-link test must not skip"
        );
        eprintln!("skipped: the lossy-link test needs root (setpriv, iptables)");
        return;
    }
    let mut cluster = Cluster::configure(3, "");
    // Apart from the chaos suite's 42,000–51,999, which may run at the same time.
    let base_uid = 60_000 + (std::process::id() % 1000) * 10;
    let peers = faults::run_under_own_uids(&mut cluster, 3, base_uid);
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut client = cluster.login(follower, "lossy");
    client.join("#lossy");

    let net = Net::new();
    net.lossy(30, &peers);
    for i in 0..MESSAGES {
        let ack = client.say("#lossy", &format!("m{i}"), &format!("text {i}"));
        assert_eq!(ack["type"], "ack", "message {i} under 30 % loss: {ack}");
    }
    let forwards = hedged(&cluster, follower, "forward");
    let appends = hedged(&cluster, leader, "append");
    net.heal();

    assert!(
        forwards + appends > 0.0,
        "no second copies under 30 % loss (forward {forwards}, append {appends})"
    );
    cluster.wait_applied_equal(&[1, 2, 3], 1, T);
    // Every acknowledged message once, in order, on every node (second copies deduplicated).
    for id in 1..=3 {
        let mut reader = cluster.login(id, &format!("reader{id}"));
        reader.join("#lossy");
        let texts = wait_for(T, "the whole history on every node", || {
            let texts: Vec<String> = reader
                .full_history("#lossy")
                .iter()
                .filter_map(|m| m["text"].as_str().map(String::from))
                .collect();
            (texts.len() >= MESSAGES).then_some(texts)
        });
        let expected: Vec<String> = (0..MESSAGES).map(|i| format!("text {i}")).collect();
        assert_eq!(texts, expected, "node {id}'s history");
    }
}
