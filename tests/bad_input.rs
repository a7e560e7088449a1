//! Bad input gets the SPEC's error or a clean close, and the node keeps serving everyone else.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn code(v: &serde_json::Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

#[test]
fn every_bad_request_gets_its_error_code_and_others_are_unaffected() {
    let cluster = Cluster::start(
        3,
        "[chat]\nmax_line_bytes = 1024\nhello_timeout_ms = 1500\nrate_limit_per_sec = 20\nrate_limit_burst = 20\nrate_limit_grace_ms = 500\n",
    );
    cluster.wait_leader(&[1, 2, 3], T);
    // A bystander on the same node, talking throughout.
    let mut bystander = cluster.login(1, "bystander");
    bystander.join("#calm");
    let mut listener = cluster.login(2, "listener");
    listener.join("#calm");

    let mut c = cluster.client(1);
    let before_hello = c.request(json!({"type": "join", "room": "#x"})).unwrap();
    assert_eq!(code(&before_hello), "not_logged_in");
    c.send_raw(b"{not json\n").unwrap();
    assert_eq!(code(&c.next_reply(T).unwrap()), "bad_json");
    c.send_raw(b"[1,2]\n").unwrap();
    assert_eq!(code(&c.next_reply(T).unwrap()), "bad_json");
    assert_eq!(
        code(&c.request(json!({"type": "dance"})).unwrap()),
        "unknown_type"
    );
    assert_eq!(
        code(&c.request(json!({"user": "x"})).unwrap()),
        "missing_field"
    );
    assert_eq!(
        code(&c.request(json!({"type": "hello"})).unwrap()),
        "missing_field"
    );
    assert_eq!(
        code(
            &c.request(json!({"type": "hello", "user": "9lives"}))
                .unwrap()
        ),
        "bad_name"
    );
    assert_eq!(
        code(
            &c.request(json!({"type": "hello", "user": "bystander"}))
                .unwrap()
        ),
        "name_taken"
    );
    assert_eq!(c.hello("tester")["type"], "welcome");
    assert_eq!(
        code(
            &c.request(json!({"type": "join", "room": "general"}))
                .unwrap()
        ),
        "bad_name"
    );
    assert_eq!(
        code(&c.request(json!({"type": "join", "room": "#a b"})).unwrap()),
        "bad_name"
    );
    let e = c
        .request(json!({"type": "send", "to": "#calm", "id": "1", "text": "not a member"}))
        .unwrap();
    assert_eq!((code(&e), e["id"].as_str()), ("not_member", Some("1")));
    let e = c
        .request(json!({"type": "send", "to": "#calm", "id": "2"}))
        .unwrap();
    assert_eq!((code(&e), e["id"].as_str()), ("missing_field", Some("2")));
    let e = c
        .request(json!({"type": "send", "to": "nobody", "id": "3", "text": "dm"}))
        .unwrap();
    assert_eq!(code(&e), "bad_name");
    assert_eq!(
        code(
            &c.request(json!({"type": "history", "room": "#calm"}))
                .unwrap()
        ),
        "not_member"
    );
    assert_eq!(c.request(json!({"type": "ping"})).unwrap()["type"], "pong");

    // A line over max_line_bytes: error, then the connection closes.
    let mut long = cluster.login(1, "longliner");
    long.send_raw(format!("{}\n", "x".repeat(5000)).as_bytes())
        .unwrap();
    assert_eq!(code(&long.next_reply(T).unwrap()), "line_too_long");
    assert!(long.closed_within(T));

    // Bytes that are not UTF-8: error, then close.
    let mut bin = cluster.login(1, "binary");
    bin.send_raw(b"{\"type\":\"ping\xff\xfe\"}\n").unwrap();
    assert_eq!(code(&bin.next_reply(T).unwrap()), "bad_encoding");
    assert!(bin.closed_within(T));

    // A connection that never says hello is closed after the login timeout.
    let mut silent = cluster.client(1);
    silent.send_raw(b"{").unwrap();
    assert!(silent.closed_within(T));
    let mut mute = std::net::TcpStream::connect(&cluster.node(1).chat).unwrap();
    mute.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut mute, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a silent connection is closed without a word");

    // A flood: rate_limited errors, then close once it goes on past the grace period.
    let mut flood = cluster.login(1, "flooder");
    let mut limited = 0;
    let mut closed = false;
    for _ in 0..400 {
        if flood.send(json!({"type": "ping"})).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    while let Some(v) = flood.next_reply(Duration::from_secs(2)) {
        if code(&v) == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited > 0, "the flood was never rate limited");
    assert!(
        closed || flood.closed_within(T),
        "the flooder was not disconnected"
    );

    // Thousands of connects that send nothing, or hang up at once.
    for _ in 0..2000 {
        let s = std::net::TcpStream::connect(&cluster.node(1).chat).unwrap();
        drop(s);
    }
    let mut s = std::net::TcpStream::connect(&cluster.node(1).chat).unwrap();
    s.write_all(b"{\"type\":\"ping\"}\n").unwrap();
    drop(s);

    // Through all of that, the bystander talks and is heard.
    for i in 0..3 {
        assert_eq!(
            bystander.say("#calm", &format!("calm{i}"), "still here")["type"],
            "ack"
        );
    }
    listener.wait_messages(T, "the bystander's messages", |m| m.len() >= 3);
    for id in 1..=3 {
        assert!(cluster.status(id).is_some(), "node {id} stopped answering");
    }
}

/// The raft log's newest segment file in `dir`.
fn newest_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// Runs node 1 of `cluster` in the foreground: (exit code, stderr).
fn start_in_foreground(cluster: &Cluster) -> (Option<i32>, String) {
    let out = std::process::Command::new(BIN)
        .args(["node", "--config"])
        .arg(&cluster.config)
        .args(["--id", "1"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn corrupt_or_truncated_data_refuses_to_start() {
    let mut cluster = Cluster::start(1, "");
    cluster.wait_leader(&[1], T);
    let mut c = cluster.login(1, "solo");
    c.join("#r");
    assert_eq!(c.say("#r", "1", "kept")["type"], "ack");
    drop(c);
    assert!(cluster.stop(1).success());

    let log = newest_segment(&cluster.data_dir(1).join("raft-log"));
    let original = std::fs::read(&log).unwrap();
    // Where the records end (the rest of the segment is preallocated zeros).
    let end = original.iter().rposition(|b| *b != 0).unwrap() + 1;

    // Garbage over the segment's header.
    let mut garbage = original.clone();
    for b in garbage.iter_mut().take(4096) {
        *b = 0xA5;
    }
    std::fs::write(&log, &garbage).unwrap();
    let (code, err) = start_in_foreground(&cluster);
    assert_eq!(code, Some(1));
    assert!(err.contains("raft-log/"), "names the file: {err}");

    // A byte changed inside a record the disk did write: corruption, refused every time,
    // never a panic.
    for at in [20, 100, end / 2, end - 20] {
        let mut damaged = original.clone();
        damaged[at] ^= 0x55;
        std::fs::write(&log, &damaged).unwrap();
        let (code, err) = start_in_foreground(&cluster);
        assert_eq!(code, Some(1), "byte {at} changed: {err}");
        assert!(
            err.contains("raft-log/") && err.contains("corrupt"),
            "byte {at} changed: {err}"
        );
    }

    // Cut in the middle of the last record, as a crash during a write leaves it: that record
    // was never acknowledged, so it is dropped and the node starts.
    std::fs::write(&log, &original[..end - 3]).unwrap();
    cluster.start_node(1);
    cluster.wait_leader(&[1], T);
    assert!(cluster.stop(1).success());
    let mut c = {
        std::fs::write(&log, &original).unwrap();
        cluster.start_node(1);
        cluster.wait_leader(&[1], T);
        cluster.login(1, "solo")
    };
    c.join("#r");
    let page = c.request(json!({"type": "history", "room": "#r"})).unwrap();
    assert!(
        page["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["text"] == "kept")),
        "the acknowledged message is still there: {page}"
    );
    drop(c);
    assert!(cluster.stop(1).success());

    // A compacted log without its snapshot would drop committed entries: refused.
    std::fs::write(&log, &original).unwrap();
    std::fs::write(cluster.data_dir(1).join("snapshot.json"), b"{broken").unwrap();
    let (code, err) = start_in_foreground(&cluster);
    assert_eq!(code, Some(1));
    assert!(err.contains("snapshot"), "{err}");
    // A snapshot cut short after its header line.
    std::fs::write(
        cluster.data_dir(1).join("snapshot.json"),
        b"{\"format\":2,\"meta\":{}}\n{\"sessions\":{",
    )
    .unwrap();
    let (code, err) = start_in_foreground(&cluster);
    assert_eq!(code, Some(1));
    assert!(err.contains("snapshot.json"), "names the file: {err}");
    std::fs::remove_file(cluster.data_dir(1).join("snapshot.json")).unwrap();

    // A damaged message history.
    let history = cluster.data_dir(1).join("chat-history.redb");
    let mut garbage = std::fs::read(&history).unwrap();
    for b in garbage.iter_mut().take(4096) {
        *b = 0x5A;
    }
    std::fs::write(&history, &garbage).unwrap();
    let (code, err) = start_in_foreground(&cluster);
    assert_eq!(code, Some(1));
    assert!(err.contains("chat-history.redb"), "names the file: {err}");
}
