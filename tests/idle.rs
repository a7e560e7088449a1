//! Idle connections are cheap: 2,000 of them (each logged in, in a room of its own) cost a
//! bounded amount of memory and do not slow a small room's acks, because an applied event
//! reaches only the connections it concerns. The 10,000-connection figures are a benchmark
//! (`raftchat bench --idle 10000`, BENCHMARKS.md).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const IDLE: usize = 2000;

/// Median ack latency of `n` sends, each awaited, from a client alone in its room.
fn ack_p50(client: &mut Client, room: &str, tag: &str, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let started = Instant::now();
            let ack = client.say(room, &format!("{tag}{i}"), "ping");
            assert_eq!(ack["type"], "ack", "{ack}");
            started.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

#[test]
fn two_thousand_idle_connections_cost_little_memory_and_do_not_slow_a_small_room() {
    // This process holds the 2,000 client sockets.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 2 * IDLE as u64 + 500,
        "open-file hard limit {hard} is too low"
    );
    let cluster = Cluster::start(
        1,
        "[chat]\nmax_clients_per_ip = 0\nmax_new_sessions_per_ip_per_sec = 0\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    );
    cluster.wait_leader(&[1], T);
    let pid = cluster.pid(1).unwrap();
    let mut probe = cluster.login(1, "probe");
    probe.join("#small");
    // Warm up (first writes, allocator), then measure alone.
    ack_p50(&mut probe, "#small", "w", 50);
    let alone = ack_p50(&mut probe, "#small", "a", 300);
    let rss_before = rss_bytes(pid).unwrap();

    let idle: Vec<Client> = (0..IDLE)
        .map(|i| {
            let mut c = cluster.client(1);
            c.hello(&format!("idle{i}"));
            let joined = c.join(&format!("#idle{i}"));
            assert_eq!(joined["type"], "joined", "{joined}");
            c
        })
        .collect();
    let rss_after = rss_bytes(pid).unwrap();
    let with_idle = ack_p50(&mut probe, "#small", "b", 300);

    let per_connection = rss_after.saturating_sub(rss_before) / IDLE as u64;
    eprintln!(
        "{IDLE} idle: {} KB each; small-room ack p50 {alone:?} alone, {with_idle:?} beside them",
        per_connection / 1024
    );
    // The release budget is 15 KB per idle connection (BENCHMARKS.md); this debug build
    // carries larger futures, so its bound is twice that.
    assert!(
        per_connection <= 30 * 1024,
        "{per_connection} bytes per idle connection"
    );
    // Before events were routed by membership, every applied event woke every connection.
    assert!(
        with_idle <= alone * 3 + Duration::from_millis(2),
        "small-room ack p50 {with_idle:?} beside {IDLE} idle connections, {alone:?} alone"
    );
    // They are still there and still served.
    let mut last = idle.into_iter().last().unwrap();
    let pong = last.request(json!({"type": "ping"})).unwrap();
    assert_eq!(pong["type"], "pong", "{pong}");
}
