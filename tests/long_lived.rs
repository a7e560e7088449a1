//! A cluster that runs longer than a demo: history far larger than a snapshot, followers that
//! fall behind the purge point, resumes on lagging nodes, retention, a disk that fills.
//! Real node processes on loopback; every wait has a deadline.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Client, Cluster, free_bytes, rss_bytes, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// Samples the resident memory of every node process of `cluster` until stopped; keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(config: std::path::PathBuf) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let needle = config.display().to_string();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                // Every process started with this test's config: restarts included.
                if let Ok(dir) = std::fs::read_dir("/proc") {
                    for entry in dir.flatten() {
                        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                            continue;
                        };
                        let cmdline =
                            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        if String::from_utf8_lossy(&cmdline).contains(&needle)
                            && let Some(rss) = rss_bytes(pid)
                        {
                            p.fetch_max(rss, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak_mb(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed) / (1024 * 1024)
    }
}

/// Sends `count` messages of `size` bytes through `client`, `window` in flight; returns the
/// acknowledged indexes.
fn pump(c: &mut Client, room: &str, prefix: &str, count: usize, size: usize) -> Vec<u64> {
    let text = "m".repeat(size);
    let window = 16;
    let mut acked = Vec::new();
    let mut sent = 0;
    while acked.len() < count {
        while sent < count && sent - acked.len() < window {
            c.send(
                json!({"type": "send", "to": room, "id": format!("{prefix}{sent}"), "text": text}),
            )
            .unwrap();
            sent += 1;
        }
        let r = c.next_reply(T).expect("ack");
        assert_eq!(r["type"], "ack", "{r}");
        acked.push(r["index"].as_u64().unwrap());
        // Pushed copies of our own messages are not needed here.
        c.messages.clear();
    }
    acked
}

fn leader_applied(cluster: &Cluster, leader: u64) -> u64 {
    cluster.status(leader).unwrap()["applied_index"]
        .as_u64()
        .unwrap()
}

fn ready(cluster: &Cluster, id: u64) -> bool {
    common::http_get(&cluster.node(id).metrics, "/readyz").is_ok_and(|(code, _)| code == 200)
}

#[test]
fn a_follower_behind_the_purge_point_catches_up_with_memory_independent_of_history() {
    // 64 KiB messages, snapshot every 200 entries: about 200 MiB of history, far more than
    // any snapshot or in-memory structure may hold.
    let mut cluster = Cluster::start(
        3,
        "[raft]\nsnapshot_every_entries = 200\nkeep_entries_after_snapshot = 50\n\
         [chat]\nmax_line_bytes = 131072\nmax_text_bytes = 131072\nclient_queue_events = 1024\n",
    );
    let mut rss = RssSampler::start(cluster.config.clone());
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut writer = cluster.login(leader, "filler");
    writer.join("#big");
    let size = 64 * 1024;
    let started = Instant::now();
    pump(&mut writer, "#big", "a", 1600, size);
    cluster.kill(follower);
    // Past the purge point: the follower can only come back through a snapshot.
    let after_kill = pump(&mut writer, "#big", "b", 1700, size);
    let fill_seconds = started.elapsed().as_secs_f64();
    let purged = cluster.status(leader).unwrap()["purged_index"]
        .as_u64()
        .unwrap();
    assert!(purged > 1700, "leader purged only up to {purged}");
    let restarted = Instant::now();
    cluster.start_node(follower);
    let target = *after_kill.last().unwrap();
    let applied = cluster.wait_applied_equal(&[1, 2, 3], target, T);
    wait_for(T, "the follower to copy the history it skipped", || {
        ready(&cluster, follower).then_some(())
    });
    let catch_up = restarted.elapsed().as_secs_f64();
    eprintln!("filled in {fill_seconds:.1} s, caught up in {catch_up:.1} s");
    let peak = rss.peak_mb();
    let log = cluster.log(follower);
    assert!(
        log.contains("installed snapshot from leader"),
        "caught up by snapshot"
    );
    assert!(log.contains("history copied"), "copied the skipped history");
    let digests: Vec<Value> = (1..=3)
        .map(|id| {
            wait_for(T, "a history digest", || {
                cluster.history_digest(id, applied)
            })
        })
        .collect();
    assert_eq!(digests[0]["count"], 3300, "{digests:?}");
    assert!(
        digests.iter().all(|d| d == &digests[0]),
        "histories differ: {digests:?}"
    );
    let snapshot = std::fs::metadata(cluster.data_dir(leader).join("snapshot.json"))
        .unwrap()
        .len();
    eprintln!(
        "history {} MiB written in {fill_seconds:.1} s; follower caught up in {catch_up:.1} s; peak node RSS {peak} MB; snapshot {snapshot} bytes",
        3300 * size / (1024 * 1024)
    );
    assert!(
        snapshot < 1024 * 1024,
        "the snapshot holds no history: {snapshot} bytes"
    );
    assert!(
        peak <= 300,
        "peak node RSS {peak} MB with ~206 MiB of history"
    );
}

#[test]
fn a_resume_on_a_lagging_node_keeps_the_session_and_skips_nothing() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    // The lagging node and the two that keep going; the client starts on `first`.
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    let first = leader;
    let through = (1..=3).find(|id| *id != leader && *id != lagging).unwrap();
    cluster.pause(lagging);

    let mut c = cluster.login(first, "resumer");
    c.join("#lag");
    let ack = c.say("#lag", "r0", "before");
    let resume_from = ack["index"].as_u64().unwrap();
    let session = c.session.clone().unwrap();
    for i in 1..=10 {
        c.send(json!({"type": "send", "to": "#lag", "id": format!("r{i}"), "text": "unacked?"}))
            .unwrap();
    }
    drop(c);

    let mut w = cluster.login(through, "writer");
    w.join("#lag");
    pump(&mut w, "#lag", "w", 3000, 100);
    let committed = leader_applied(&cluster, leader);

    // Resume on the node that missed all of it, the moment it runs again.
    cluster.resume(lagging);
    let started = Instant::now();
    let (mut c, welcome) = wait_for(T, "the lagging node to accept the resume", || {
        let mut c = Client::try_connect(&cluster.node(lagging).chat)?;
        let w = c.request(json!({"type": "hello", "user": "resumer", "session": session, "resume_from": resume_from}))?;
        (w["type"] == "welcome").then_some((c, w))
    });
    assert_eq!(welcome["session"], session.as_str(), "{welcome}");
    assert_eq!(welcome["resumed"], true, "{welcome}");
    for i in 1..=10 {
        c.send(json!({"type": "send", "to": "#lag", "id": format!("r{i}"), "text": "unacked?"}))
            .unwrap();
    }
    let mut acks = HashMap::new();
    while acks.len() < 10 {
        let r = c.next_reply(T).expect("ack of a re-send");
        assert_eq!(r["type"], "ack", "{r}");
        acks.insert(
            r["id"].as_str().unwrap().to_string(),
            r["index"].as_u64().unwrap(),
        );
    }
    let expected = committed - resume_from; // at least: every entry above is not a message
    c.wait_messages(T, "every message after the resume point", |m| {
        m.iter().any(|m| m["id"] == "w2999")
            && acks
                .values()
                .all(|i| m.iter().any(|m| m["index"].as_u64() == Some(*i)))
    });
    eprintln!(
        "resumed on the lagging node after {:?}; {} messages delivered",
        started.elapsed(),
        c.messages.len()
    );
    let indexes: Vec<u64> = c
        .messages
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .collect();
    assert!(
        indexes.iter().all(|i| *i > resume_from),
        "delivered at or below the resume point"
    );
    assert!(
        indexes.windows(2).all(|w| w[0] < w[1]),
        "not strictly increasing"
    );
    let history = c.full_history("#lag");
    let after: Vec<u64> = history
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .filter(|i| *i > resume_from && *i <= *indexes.last().unwrap())
        .collect();
    assert_eq!(indexes, after, "the stream skipped or repeated messages");
    assert!(after.len() as u64 <= expected + 10);
    let ids: Vec<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a message was stored twice");
    for i in 1..=10 {
        assert!(unique.contains(format!("r{i}").as_str()), "r{i} lost");
    }
}

fn history_page(c: &mut Client, room: &str, after: u64) -> Value {
    let page = c
        .request(json!({"type": "history", "room": room, "after": after, "limit": 1000}))
        .expect("history");
    assert_eq!(page["type"], "history", "{page}");
    page
}

#[test]
fn retention_drops_the_same_messages_on_every_node_and_says_truncated() {
    let cluster = Cluster::start(
        3,
        "[chat]\nhistory_max_messages_per_room = 5\nhistory_max_age = \"6s\"\n",
    );
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let mut c = cluster.login(leader, "keeper");
    c.join("#capped");
    let first = c.say("#capped", "c0", "oldest")["index"].as_u64().unwrap();
    let session = c.session.clone().unwrap();
    let started = Instant::now();
    let mut indexes = vec![first];
    for i in 1..12 {
        indexes.push(
            c.say("#capped", &format!("c{i}"), "x")["index"]
                .as_u64()
                .unwrap(),
        );
    }
    let kept: Vec<u64> = indexes[7..].to_vec();
    cluster.wait_applied_equal(&[1, 2, 3], indexes[11], T);
    for id in 1..=3 {
        let mut reader = cluster.login(id, &format!("reader{id}"));
        reader.join("#capped");
        let page = history_page(&mut reader, "#capped", 0);
        let got: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["index"].as_u64().unwrap())
            .collect();
        assert_eq!(got, kept, "node {id}");
        assert_eq!(page["truncated"], true, "node {id}: {page}");
        assert_eq!(page["oldest_index"], kept[0], "node {id}: {page}");
        // Asking from inside what is kept is not truncated.
        let page = history_page(&mut reader, "#capped", kept[0]);
        assert!(page.get("truncated").is_none(), "{page}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "too slow for the age check below"
    );
    // A resume from before what is kept says so.
    drop(c);
    let mut again = wait_for(T, "resume", || {
        let mut c = Client::try_connect(&cluster.node(leader).chat)?;
        let w = c.request(
            json!({"type": "hello", "user": "keeper", "session": session, "resume_from": first}),
        )?;
        (w["type"] == "welcome").then_some((c, w))
    });
    assert_eq!(again.1["resumed"], true, "{}", again.1);
    assert_eq!(again.1["truncated"], true, "{}", again.1);
    assert_eq!(again.1["oldest_index"], kept[0], "{}", again.1);
    again
        .0
        .wait_messages(T, "the kept messages replayed", |m| m.len() >= 5);

    // By age: once entries are stamped 6 s later, everything older is gone everywhere.
    std::thread::sleep(
        Duration::from_secs(6).saturating_sub(started.elapsed()) + Duration::from_millis(500),
    );
    let mut late = cluster.login(leader, "late");
    late.join("#fresh");
    let fresh = late.say("#fresh", "f0", "new")["index"].as_u64().unwrap();
    // Status may lag the acknowledgement: wait for the acknowledged index itself.
    let applied = cluster.wait_applied_equal(&[1, 2, 3], fresh, T);
    let digests: Vec<Value> = (1..=3)
        .map(|id| wait_for(T, "digest", || cluster.history_digest(id, applied)))
        .collect();
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    assert_eq!(
        digests[0]["count"], 1,
        "only the new message is kept: {digests:?}"
    );
}

#[test]
fn a_node_whose_disk_fills_stops_serving_and_loses_nothing() {
    if !common::is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root: this test must not skip"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut cluster = Cluster::configure(
        3,
        "[chat]\nmax_line_bytes = 131072\nmax_text_bytes = 131072\n",
    );
    let full = 3;
    let dir = cluster.data_dir(full);
    let _tmpfs = common::Tmpfs::mount(&dir, "64m");
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_leader(&[1, 2, 3], T);
    let mut victim = cluster.login(full, "victim");
    victim.join("#disk");
    let other = if full == 1 { 2 } else { 1 };
    let mut w = cluster.login(other, "filler");
    w.join("#disk");
    w.say("#disk", "warm", "up");
    // Leave about 1 MiB free on the node's disk.
    let filler = dir.join("filler");
    let room = free_bytes(&dir).saturating_sub(1024 * 1024);
    std::fs::write(&filler, vec![0u8; room as usize]).unwrap();

    let text = "d".repeat(32 * 1024);
    let mut acked: Vec<(String, u64)> = Vec::new();
    let deadline = Instant::now() + T;
    let mut n = 0;
    while cluster.is_running(full) {
        assert!(
            Instant::now() < deadline,
            "the node with the full disk kept running"
        );
        for _ in 0..8 {
            w.send(json!({"type": "send", "to": "#disk", "id": format!("d{n}"), "text": text}))
                .unwrap();
            n += 1;
        }
        for _ in 0..8 {
            let r = w.next_reply(T).expect("an answer");
            assert_eq!(r["type"], "ack", "the majority keeps acknowledging: {r}");
            acked.push((
                r["id"].as_str().unwrap().to_string(),
                r["index"].as_u64().unwrap(),
            ));
        }
        w.messages.clear();
    }
    let code = cluster.wait_exit(full, T);
    assert_eq!(code, Some(1), "exits non-zero so a supervisor restarts it");
    assert!(
        victim.closed_within(T),
        "its clients are closed so they move on"
    );
    let log = cluster.log(full);
    assert!(log.contains("raft stopped fatally"), "says why:\n{log}");

    // Space returns; the node restarts and catches up with everything acknowledged.
    std::fs::remove_file(&filler).unwrap();
    cluster.start_node(full);
    let top = acked.iter().map(|(_, i)| *i).max().unwrap();
    let applied = cluster.wait_applied_equal(&[1, 2, 3], top, T);
    wait_for(T, "the restarted node to be ready", || {
        ready(&cluster, full).then_some(())
    });
    let digests: Vec<Value> = (1..=3)
        .map(|id| wait_for(T, "digest", || cluster.history_digest(id, applied)))
        .collect();
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    let mut check = cluster.login(full, "checker");
    check.join("#disk");
    let history = check.full_history("#disk");
    let stored: HashMap<String, u64> = history
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["index"].as_u64().unwrap(),
            )
        })
        .collect();
    for (id, index) in &acked {
        assert_eq!(
            stored.get(id),
            Some(index),
            "acknowledged {id} lost or moved"
        );
    }
    eprintln!(
        "{} messages acknowledged while the disk filled; none lost",
        acked.len()
    );
}
