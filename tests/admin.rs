//! `raftchat admin`: growing and shrinking a running cluster.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Kills the extra node when the test ends, however it ends.
struct Extra(Child);

impl Drop for Extra {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `raftchat admin` with the secret in RAFTCHAT_SECRET (never on the command line, where `ps`
/// shows it), or from a file when `secret` starts with `@`.
fn admin(cluster: &Cluster, secret: &str, change: &[&str]) -> (Option<i32>, String) {
    let servers: Vec<&str> = cluster.nodes.iter().map(|n| n.raft.as_str()).collect();
    let mut cmd = Command::new(BIN);
    cmd.args(["admin", "--servers", &servers.join(",")]);
    match secret.strip_prefix('@') {
        Some(file) => cmd
            .args(["--secret-file", file])
            .env_remove("RAFTCHAT_SECRET"),
        None => cmd.env("RAFTCHAT_SECRET", secret),
    };
    let out = cmd.args(change).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_node_is_added_used_and_removed() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    // Node 4's config lists it too; the running nodes' configs do not need to.
    let ports = free_ports(3);
    let (chat, raft, metrics) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
        format!("127.0.0.1:{}", ports[2]),
    );
    let mut config = std::fs::read_to_string(&cluster.config).unwrap();
    config.push_str(&format!(
        "[[nodes]]\nid = 4\nchat = \"{chat}\"\nraft = \"{raft}\"\nmetrics = \"{metrics}\"\n"
    ));
    let config4 = cluster.dir.path().join("cluster4.toml");
    std::fs::write(&config4, config).unwrap();
    let _node4 = Extra(
        Command::new(BIN)
            .args(["node", "--config"])
            .arg(&config4)
            .args(["--id", "4", "--join"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(T, "node 4 to answer", || {
        (http_get(&metrics, "/healthz").ok()?.0 == 200).then_some(())
    });

    let add_node = [
        "add-node",
        "--id",
        "4",
        "--chat",
        &chat,
        "--raft",
        &raft,
        "--metrics",
        &metrics,
    ];
    // A wrong secret is refused and changes nothing.
    let (code, text) = admin(&cluster, "wrong", &add_node);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("secret"), "{text}");

    let (code, text) = admin(&cluster, "test-secret", &add_node);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("voters: 1, 2, 3, 4"), "{text}");

    // Node 4 serves clients like any other.
    let mut on4 = wait_for(T, "a client on node 4", || {
        let mut c = Client::try_connect(&chat)?;
        let w = c.request(json!({"type": "hello", "user": "newcomer"}))?;
        (w["type"] == "welcome").then_some(c)
    });
    on4.join("#grown");
    let mut on1 = cluster.login(1, "old-timer");
    on1.join("#grown");
    assert_eq!(on4.say("#grown", "g1", "from node 4")["type"], "ack");
    on1.wait_messages(T, "node 4's message on node 1", |m| {
        m.iter().any(|x| x["text"] == "from node 4")
    });
    // The running nodes probe the new member (peers come from the membership, not the config).
    let metrics1 = cluster.node(1).metrics.clone();
    let peer4_up = || {
        let body = http_get(&metrics1, "/metrics").ok()?.1;
        body.lines()
            .find(|l| l.starts_with("raftchat_peer_up{peer=\"4\"}"))
            .map(|l| l.ends_with(" 1"))
    };
    wait_for(T, "node 1 to probe node 4", || peer4_up().filter(|up| *up));
    let status4: serde_json::Value =
        serde_json::from_str(&http_get(&metrics, "/status").unwrap().1).unwrap();
    assert!(status4["leader"].as_u64().is_some(), "{status4}");

    let secret_file = cluster.dir.path().join("secret");
    std::fs::write(&secret_file, "test-secret\n").unwrap();
    let from_file = format!("@{}", secret_file.display());
    let (code, text) = admin(&cluster, &from_file, &["remove-node", "--id", "4"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("voters: 1, 2, 3") && !text.contains(", 4"),
        "{text}"
    );
    // The remaining three keep committing.
    assert_eq!(on1.say("#grown", "g2", "after removal")["type"], "ack");
    // A removed member is forgotten: no series left to alert on.
    wait_for(T, "node 1 to forget node 4", || {
        peer4_up().is_none().then_some(())
    });
}
