//! `raftchat chat` and `raftchat bench` as users run them: real processes, real pipes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

/// A `raftchat chat` process whose stdout and stderr lines are collected.
struct ChatProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl ChatProcess {
    fn start(servers: &[&str], user: &str, extra: &[&str]) -> ChatProcess {
        let mut child = Command::new(BIN)
            .args([
                "chat",
                "--servers",
                &servers.join(","),
                "--user",
                user,
                "--room",
                "#pipes",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn raftchat chat");
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        ChatProcess {
            stdin: child.stdin.take(),
            child,
            out,
            err,
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn wait_err(&self, what: &str, pred: impl Fn(&str) -> bool) {
        wait_for(T, what, || {
            self.err
                .lock()
                .unwrap()
                .iter()
                .any(|l| pred(l))
                .then_some(())
        });
    }

    fn wait_out(&self, what: &str, pred: impl Fn(&[String]) -> bool) {
        wait_for(T, what, || pred(&self.out.lock().unwrap()).then_some(()));
    }

    /// Closes stdin and waits for the exit code.
    fn finish(mut self) -> (Option<i32>, Vec<String>, Vec<String>) {
        drop(self.stdin.take());
        let status = wait_for(T, "raftchat chat to exit", || {
            self.child.try_wait().ok().flatten()
        });
        std::thread::sleep(Duration::from_millis(100));
        let out = self.out.lock().unwrap().clone();
        let err = self.err.lock().unwrap().clone();
        (status.code(), out, err)
    }
}

impl Drop for ChatProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks the `[HH:MM:SS] #room <user> text` shape.
fn is_message_line(line: &str, user: &str, text: &str) -> bool {
    let b = line.as_bytes();
    line.len() > 11
        && b[0] == b'['
        && b[3] == b':'
        && b[6] == b':'
        && b[9] == b']'
        && line[10..] == format!(" #pipes <{user}> {text}")
}

#[test]
fn two_chat_pipelines_on_different_nodes_exchange_lines() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut alice = ChatProcess::start(&[&cluster.node(1).chat], "alice", &[]);
    let mut bob = ChatProcess::start(&[&cluster.node(3).chat], "bob", &[]);
    alice.wait_err("alice to join", |l| l.starts_with("joined #pipes"));
    bob.wait_err("bob to join", |l| l.starts_with("joined #pipes"));
    alice.say("hello from alice");
    bob.wait_out("alice's line at bob", |o| {
        o.iter()
            .any(|l| is_message_line(l, "alice", "hello from alice"))
    });
    bob.say("hi from bob");
    alice.wait_out("bob's line at alice", |o| {
        o.iter().any(|l| is_message_line(l, "bob", "hi from bob"))
    });
    let (code_a, out_a, _) = alice.finish();
    let (code_b, out_b, _) = bob.finish();
    assert_eq!((code_a, code_b), (Some(0), Some(0)));
    assert_eq!(out_a[..2], out_b[..2], "one order on both nodes");
}

#[test]
fn a_sender_whose_node_is_killed_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let (victim, other) = (1, 2);
    let receiver = ChatProcess::start(&[&cluster.node(other).chat], "receiver", &[]);
    receiver.wait_err("the receiver to join", |l| l.starts_with("joined #pipes"));
    let servers = [
        cluster.node(victim).chat.as_str(),
        cluster.node(other).chat.as_str(),
    ];
    let mut sender = ChatProcess::start(&servers, "sender", &[]);
    sender.wait_err("the sender to connect to the victim", |l| {
        l.contains(&format!("connected to node {victim}"))
    });
    let total = 200;
    let started = Instant::now();
    for n in 0..total {
        if n == total / 3 {
            cluster.kill(victim);
        }
        sender.say(&format!("line-{n:04}"));
        std::thread::sleep(Duration::from_millis(5));
    }
    sender.wait_err("the sender to reconnect", |l| {
        l.starts_with("reconnected to node")
    });
    let (code, _, err) = sender.finish();
    assert_eq!(code, Some(0), "{err:?}");
    let reconnect = err
        .iter()
        .find(|l| l.starts_with("reconnected to node"))
        .unwrap();
    assert!(
        reconnect.contains(" ms, ")
            && reconnect.contains("replayed")
            && reconnect.contains("re-sent"),
        "{reconnect}"
    );
    receiver.wait_out("every line at the receiver", |o| {
        o.iter().filter(|l| l.contains("<sender>")).count() >= total
    });
    let got: Vec<String> = receiver
        .out
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("<sender>"))
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..total).map(|n| format!("line-{n:04}")).collect();
    assert_eq!(
        got,
        want,
        "no gap, no duplicate, in order (took {:?})",
        started.elapsed()
    );
}

#[test]
fn a_paused_server_is_detected_and_left() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let paused = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != paused).unwrap();
    let receiver = ChatProcess::start(&[&cluster.node(other).chat], "watcher", &[]);
    receiver.wait_err("the watcher to join", |l| l.starts_with("joined #pipes"));
    let mut c = ChatProcess::start(&[&cluster.node(paused).chat], "patient", &[]);
    c.wait_err("connected to the node to pause", |l| {
        l.contains(&format!("connected to node {paused}"))
    });
    c.wait_err("joined", |l| l.starts_with("joined #pipes"));
    cluster.pause(paused);
    let paused_at = Instant::now();
    c.say("are you there?");
    c.wait_err("the silent server to be left", |l| {
        l.starts_with("reconnected to node")
    });
    let waited = paused_at.elapsed();
    receiver.wait_out("the line sent during the pause", |o| {
        o.iter()
            .any(|l| is_message_line(l, "patient", "are you there?"))
    });
    cluster.resume(paused);
    assert!(
        waited < Duration::from_secs(15),
        "took {waited:?} to notice"
    );
    let (code, _, _) = c.finish();
    assert_eq!(code, Some(0));
}

#[test]
fn unreachable_servers_are_retried_then_given_up_with_timeout() {
    let ports = free_ports(2);
    let servers = [
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
    ];
    let started = Instant::now();
    let out = Command::new(BIN)
        .args([
            "chat",
            "--servers",
            &servers.join(","),
            "--user",
            "lonely",
            "--timeout",
            "2",
        ])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("could not reach"), "{err}");
    assert!(
        err.matches("retrying in").count() >= 2,
        "backs off and retries: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn bench_on_a_live_cluster_reports_no_loss() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let servers: Vec<&str> = cluster.nodes.iter().map(|n| n.chat.as_str()).collect();
    let out = Command::new(BIN)
        .args([
            "bench",
            "--servers",
            &servers.join(","),
            "--clients",
            "8",
            "--duration",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        report["throughput_msgs_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0, "{report}");
    assert_eq!(report["clients"], 8);
}

#[test]
fn history_and_who_are_answered_in_a_pipeline_before_exit() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut writer = cluster.login(1, "dora");
    writer.join("#lobby");
    for i in 0..3 {
        assert_eq!(
            writer.say("#lobby", &format!("h{i}"), &format!("old news {i}"))["type"],
            "ack"
        );
    }
    let servers: Vec<&str> = cluster.nodes.iter().map(|n| n.chat.as_str()).collect();
    let mut child = Command::new(BIN)
        .args([
            "chat",
            "--servers",
            &servers.join(","),
            "--user",
            "carol",
            "--room",
            "#lobby",
            "--timeout",
            "20",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"/history 5\n/who\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        assert!(
            stdout.contains(&format!("old news {i}")),
            "history not printed: {stdout}"
        );
    }
    assert!(
        stdout.contains("#lobby: ") && stdout.contains("dora"),
        "who not printed: {stdout}"
    );
}
