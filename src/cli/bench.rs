//! `raftchat bench`: a load generator and a failover timer.
//!
//! Load: N clients spread round-robin over the servers, all in one room, each keeping a window
//! of messages in flight. It measures acknowledged messages per second, ack latency and
//! delivery latency to clients on other nodes, and checks that every acknowledged message
//! reached every client exactly once.
//!
//! Without `--servers` it starts a local cluster of `--nodes` child processes on free ports
//! (release builds measure what users run); `--failovers`, `--client-failovers` and
//! `--handoffs` then crash or stop its leader and time what that costs (`failover_bench`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::cluster::LocalCluster;
use super::failover_bench::{client_failovers, failovers, handoffs};
use super::status::fetch_status;
use crate::client::{Client, ClientConfig, Event};
use crate::config::{self, Config, FlagOverrides, NodeConfig};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Chat addresses of a running cluster, comma-separated. Without it, a local cluster is started.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of load (0: no load phase).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// The room every client joins.
    #[arg(long, default_value = "#bench")]
    room: String,
    /// Messages each client keeps in flight.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Nodes of the local cluster (without --servers).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Settings for the local cluster's nodes (its `nodes` and `data_dir` are replaced).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kill the local cluster's leader this many times and time each recovery.
    #[arg(long, default_value_t = 0)]
    failovers: usize,
    /// Connect one client to the local cluster's leader, SIGKILL that node this many times,
    /// and time how long the client takes to resume its session elsewhere.
    #[arg(long, default_value_t = 0)]
    client_failovers: usize,
    /// SIGTERM the local cluster's leader this many times while `--clients` clients on the
    /// other nodes write, and time the longest pause between acknowledgements.
    #[arg(long, default_value_t = 0)]
    handoffs: usize,
    /// Export the local cluster's spans over OTLP to a sink inside the bench (measures the
    /// cost of tracing).
    #[arg(long)]
    otlp: bool,
    /// Hold this many idle connections (each logged in, in a room of its own) on the local
    /// cluster's leader; report its memory growth and a small room's ack latency without
    /// and with them.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Seconds of small-room ack measurement before and during `--idle`.
    #[arg(long, default_value_t = 5)]
    idle_probe_secs: u64,
    /// Fill one room with this many members, spread over every node, and measure how a
    /// message written at `--room-rate` per second reaches all of them.
    #[arg(long, default_value_t = 0)]
    room_members: usize,
    /// Messages per second written to the `--room-members` room.
    #[arg(long, default_value_t = 1000)]
    room_rate: u64,
    /// Seconds the `--room-members` room is written to (after a second of warm-up).
    #[arg(long, default_value_t = 10)]
    room_secs: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    /// Sends the cluster refused for good (not counted as lost).
    refused: AtomicU64,
    /// Refusals, lost connections and failed attempts.
    errors: AtomicU64,
}

struct Latencies {
    ack: Histogram<u64>,
    delivery: Histogram<u64>,
}

/// What one client received: per sender, per sequence number, how many times.
struct Received {
    counts: Vec<Vec<u8>>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.window == 0 {
        bail!("flags `--clients` and `--window` must be positive");
    }
    if args.size < 32 {
        bail!("flag `--size` must be at least 32 bytes");
    }
    let mut local = None;
    let sink = if args.otlp {
        if !args.servers.is_empty() {
            bail!("flag `--otlp` needs a local cluster: leave out `--servers`");
        }
        Some(OtlpSink::start().await?)
    } else {
        None
    };
    let servers = if args.servers.is_empty() {
        let endpoint = sink.as_ref().map(|s| s.endpoint.clone());
        let (cluster, dir) = start_local(&args, endpoint).await?;
        let servers = cluster
            .config
            .nodes
            .iter()
            .map(|n| n.chat.clone())
            .collect();
        local = Some((cluster, dir));
        servers
    } else {
        if args.failovers > 0 || args.client_failovers > 0 || args.handoffs > 0 {
            bail!(
                "flags `--failovers`, `--client-failovers` and `--handoffs` need a local cluster: leave out `--servers`"
            );
        }
        args.servers.clone()
    };

    let mut report = serde_json::Map::new();
    if args.duration > 0 {
        let term_before = match &local {
            Some((cluster, _)) => Some(highest_term(cluster).await),
            None => None,
        };
        let load = load(&args, &servers).await?;
        report.extend(load);
        // Every election bumps the term: a healthy cluster under load holds none.
        if let (Some(before), Some((cluster, _))) = (term_before, &local) {
            let after = highest_term(cluster).await;
            report.insert(
                "elections_during_load".into(),
                json!(after.saturating_sub(before)),
            );
        }
    }
    if args.failovers > 0
        && let Some((cluster, _)) = local.as_mut()
    {
        let times = failovers(cluster, args.failovers).await?;
        let elected: Vec<f64> = times.iter().map(|t| t.0).collect();
        let acked: Vec<f64> = times.iter().map(|t| t.1).collect();
        summarize(&mut report, "failover", &elected);
        summarize(&mut report, "failover_ack", &acked);
    }
    if args.handoffs > 0
        && let Some((cluster, _)) = local.as_mut()
    {
        let times = handoffs(cluster, args.handoffs, args.clients).await?;
        summarize(&mut report, "handoff_pause", &times);
    }
    if args.client_failovers > 0
        && let Some((cluster, _)) = local.as_mut()
    {
        let times = client_failovers(cluster, args.client_failovers).await?;
        summarize(&mut report, "client_downtime", &times);
    }
    if args.idle > 0 {
        let Some((cluster, _)) = &local else {
            bail!("flag `--idle` needs a local cluster: leave out `--servers`");
        };
        let leader = wait_for_leader(cluster, &[], Duration::from_secs(30)).await?;
        let node = cluster
            .config
            .nodes
            .iter()
            .find(|n| n.id == leader)
            .context("the leader is not in the config")?;
        let target = super::idle_bench::IdleTarget {
            chat: &node.chat,
            metrics: &node.metrics,
        };
        let probe = Duration::from_secs(args.idle_probe_secs.max(1));
        super::idle_bench::run(target, args.idle, probe, &mut report).await?;
    }
    if args.room_members > 0 {
        // The sender writes through the leader, as clients of a busy room mostly do not
        // need to: any node forwards; this measures the fan-out, not the forwarding.
        let mut ordered = servers.clone();
        if let Some((cluster, _)) = &local {
            let leader = wait_for_leader(cluster, &[], Duration::from_secs(30)).await?;
            if let Some(node) = cluster.config.nodes.iter().find(|n| n.id == leader) {
                ordered.retain(|s| *s != node.chat);
                ordered.insert(0, node.chat.clone());
            }
        }
        let load = super::room_bench::RoomLoad {
            members: args.room_members,
            rate: args.room_rate.max(1),
            duration: Duration::from_secs(args.room_secs.max(1)),
            size: args.size,
        };
        super::room_bench::run(&ordered, load, &mut report).await?;
    }
    if let Some((cluster, _)) = &local
        && let Some(p99) = probe_p99_ms(cluster).await
    {
        report.insert("probe_p99_ms".into(), json!(p99));
    }
    if let Some(sink) = &sink {
        report.insert(
            "otlp_exports".into(),
            json!(sink.requests.load(Ordering::Relaxed)),
        );
        report.insert(
            "otlp_bytes".into(),
            json!(sink.bytes.load(Ordering::Relaxed)),
        );
    }
    if let Some((mut cluster, dir)) = local {
        cluster.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    print_report(&args, &report);
    Ok(())
}

/// The highest raft term any node of the local cluster reports.
async fn highest_term(cluster: &LocalCluster) -> u64 {
    let mut highest = 0;
    for n in &cluster.config.nodes {
        if let Ok(s) = fetch_status(&n.metrics, Duration::from_millis(500)).await {
            highest = highest.max(s["term"].as_u64().unwrap_or(0));
        }
    }
    highest
}

/// `{name}_ms` (every round), `{name}_median_ms` and `{name}_max_ms`.
fn summarize(report: &mut serde_json::Map<String, Value>, name: &str, times: &[f64]) {
    let mut sorted = times.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    report.insert(format!("{name}_ms"), json!(times));
    report.insert(
        format!("{name}_median_ms"),
        json!(percentile(&sorted, 50.0)),
    );
    report.insert(
        format!("{name}_max_ms"),
        json!(sorted.last().copied().unwrap_or(0.0)),
    );
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn start_local(
    args: &BenchArgs,
    otlp_endpoint: Option<String>,
) -> anyhow::Result<(LocalCluster, PathBuf)> {
    let base = match &args.config {
        Some(path) => config::load_settings(Some(path), &FlagOverrides::default())?,
        None => Config::default(),
    };
    let mut listeners = Vec::new();
    for _ in 0..args.nodes * 3 {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0").context("no free port")?);
    }
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    drop(listeners);
    let dir = std::env::temp_dir().join(format!("raftchat-bench-{}", std::process::id()));
    let nodes = (0..args.nodes as usize)
        .map(|i| NodeConfig {
            id: i as u64 + 1,
            chat: format!("127.0.0.1:{}", ports[3 * i]),
            raft: format!("127.0.0.1:{}", ports[3 * i + 1]),
            metrics: format!("127.0.0.1:{}", ports[3 * i + 2]),
            advertise_chat: None,
            chat_tls: None,
        })
        .collect();
    let mut config = Config {
        nodes,
        data_dir: dir.join("node-{id}").display().to_string(),
        secret: uuid::Uuid::new_v4().simple().to_string(),
        ..base
    };
    if otlp_endpoint.is_some() {
        config.telemetry.otlp_endpoint = otlp_endpoint;
    }
    if args.config.is_none() {
        // A load generator is a flood by design: measure the cluster, not the limiter.
        config.chat.rate_limit_per_sec = 1_000_000;
        config.chat.rate_limit_burst = 1_000_000;
        config.chat.max_text_bytes = config.chat.max_text_bytes.max(args.size);
        config.chat.max_line_bytes = config.chat.max_line_bytes.max(args.size + 1024);
        config.chat.max_clients_per_ip = 0;
        config.chat.max_new_sessions_per_ip_per_sec = 0;
        config.chat.max_clients = config
            .chat
            .max_clients
            .max(args.idle + args.room_members + 1024);
    }
    config.validate()?;
    let cluster = LocalCluster::start(config, &dir, true)?;
    wait_for_leader(&cluster, &[], Duration::from_secs(30)).await?;
    eprintln!(
        "bench: local cluster of {} nodes in {}",
        args.nodes,
        dir.display()
    );
    Ok((cluster, dir))
}

/// Waits until every node not in `down` reports the same leader, which is up; returns it.
pub(super) async fn wait_for_leader(
    cluster: &LocalCluster,
    down: &[u64],
    timeout: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut leaders = Vec::new();
        for n in cluster
            .config
            .nodes
            .iter()
            .filter(|n| !down.contains(&n.id))
        {
            let leader = fetch_status(&n.metrics, Duration::from_millis(200))
                .await
                .ok()
                .and_then(|s| s["leader"].as_u64());
            leaders.push(leader);
        }
        if let Some(Some(first)) = leaders.first()
            && !down.contains(first)
            && leaders.iter().all(|l| *l == Some(*first))
        {
            return Ok(*first);
        }
        if Instant::now() > deadline {
            bail!("no leader within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(super) async fn wait_caught_up(
    cluster: &LocalCluster,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut applied = Vec::new();
        for n in &cluster.config.nodes {
            let s = fetch_status(&n.metrics, Duration::from_millis(500))
                .await
                .ok();
            applied.push(s.and_then(|s| s["applied_index"].as_u64()));
        }
        if applied.iter().all(|a| a.is_some() && *a == applied[0]) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nodes did not catch up within {timeout:?}: {applied:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Per-run state shared by every bench client.
struct Shared {
    counters: Counters,
    latencies: std::sync::Mutex<Latencies>,
    /// Per sender: which sequence numbers were acknowledged.
    acked_seqs: Vec<std::sync::Mutex<Vec<bool>>>,
    /// Per client: the node it is connected to (for delivery latency across nodes).
    node_of: Vec<AtomicU64>,
    reconnects: AtomicU64,
    epoch: Instant,
}

async fn load(
    args: &BenchArgs,
    servers: &[String],
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let clients = args.clients;
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        latencies: std::sync::Mutex::new(Latencies {
            ack: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            delivery: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        }),
        acked_seqs: (0..clients)
            .map(|_| std::sync::Mutex::new(Vec::new()))
            .collect(),
        node_of: (0..clients).map(|_| AtomicU64::new(0)).collect(),
        reconnects: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let run = format!("{:x}", std::process::id());
    // 0: logging in, 1: sending, 2: draining.
    let phase = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Semaphore::new(0));
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..clients {
        // Round-robin over the servers: client i starts at server i.
        let mut order: Vec<String> = servers.to_vec();
        order.rotate_left(i % servers.len());
        let mut config = ClientConfig::new(order, &format!("bench{run}x{i}"));
        config.rooms = vec![args.room.clone()];
        let received = Arc::new(std::sync::Mutex::new(Received {
            counts: vec![Vec::new(); clients],
        }));
        receivers.push(received.clone());
        tasks.push(tokio::spawn(bench_client(
            i,
            config,
            args.room.clone(),
            args.size,
            args.window,
            shared.clone(),
            received,
            phase.clone(),
            ready.clone(),
        )));
    }
    // Everyone logged in and joined before anyone sends, so every client sees every message.
    let login =
        tokio::time::timeout(Duration::from_secs(60), ready.acquire_many(clients as u32)).await;
    if login.is_err() {
        bail!("not every client could log in within 60 s");
    }
    eprintln!(
        "bench: {clients} clients logged in over {} servers",
        servers.len()
    );
    let counters = &shared.counters;
    let started = Instant::now();
    phase.store(1, Ordering::SeqCst);
    let mut last = 0;
    for second in 1..=args.duration {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        let acked = counters.acked.load(Ordering::Relaxed);
        eprintln!(
            "bench: {second:>3}s  acked {acked:>9}  ({:>7}/s)  errors {}  reconnects {}",
            acked - last,
            counters.errors.load(Ordering::Relaxed),
            shared.reconnects.load(Ordering::Relaxed)
        );
        last = acked;
    }
    phase.store(2, Ordering::SeqCst);
    let elapsed_at_stop = started.elapsed();
    let acked_at_stop = counters.acked.load(Ordering::Relaxed);
    // Wait for the in-flight acks, then for every acked message to reach every client.
    let deadline = Instant::now() + Duration::from_secs(15);
    while counters.acked.load(Ordering::Relaxed) + counters.refused.load(Ordering::Relaxed)
        < counters.sent.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let complete = || {
        let mut lost = 0u64;
        let mut duplicated = 0u64;
        for r in &receivers {
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            for (sender, flags) in shared.acked_seqs.iter().enumerate() {
                let flags = flags.lock().unwrap_or_else(|p| p.into_inner());
                let counts = &r.counts[sender];
                for (seq, acked) in flags.iter().enumerate() {
                    match (acked, counts.get(seq).copied().unwrap_or(0)) {
                        (true, 0) => lost += 1,
                        (_, 0 | 1) => {}
                        _ => duplicated += 1,
                    }
                }
            }
        }
        (lost, duplicated)
    };
    let (lost, duplicated) = loop {
        let (lost, duplicated) = complete();
        if lost == 0 || Instant::now() > deadline {
            break (lost, duplicated);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for t in tasks {
        t.abort();
    }

    let l = shared.latencies.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut out = serde_json::Map::new();
    let throughput = acked_at_stop as f64 / elapsed_at_stop.as_secs_f64();
    out.insert("clients".into(), json!(clients));
    out.insert("servers".into(), json!(servers.len()));
    out.insert("size".into(), json!(args.size));
    out.insert("duration_s".into(), json!(elapsed_at_stop.as_secs_f64()));
    out.insert("throughput_msgs_per_s".into(), json!(throughput.round()));
    out.insert("ack_p50_ms".into(), json!(ms(&l.ack, 0.50)));
    out.insert("ack_p99_ms".into(), json!(ms(&l.ack, 0.99)));
    out.insert("ack_max_ms".into(), json!(l.ack.max() as f64 / 1000.0));
    out.insert("delivery_p50_ms".into(), json!(ms(&l.delivery, 0.50)));
    out.insert("delivery_p99_ms".into(), json!(ms(&l.delivery, 0.99)));
    out.insert("sent".into(), json!(counters.sent.load(Ordering::Relaxed)));
    out.insert(
        "acked".into(),
        json!(counters.acked.load(Ordering::Relaxed)),
    );
    out.insert("lost".into(), json!(lost));
    out.insert("duplicated".into(), json!(duplicated));
    out.insert(
        "errors".into(),
        json!(counters.errors.load(Ordering::Relaxed)),
    );
    out.insert(
        "reconnects".into(),
        json!(shared.reconnects.load(Ordering::Relaxed)),
    );
    Ok(out)
}

/// One bench client: logs in, then keeps `window` messages in flight while the run lasts,
/// and records every message it receives.
#[allow(clippy::too_many_arguments)]
async fn bench_client(
    i: usize,
    config: ClientConfig,
    room: String,
    size: usize,
    window: usize,
    shared: Arc<Shared>,
    received: Arc<std::sync::Mutex<Received>>,
    phase: Arc<AtomicU64>,
    ready: Arc<Semaphore>,
) {
    let clients = shared.acked_seqs.len();
    let mut client = Client::start(config);
    // seq → when it was first sent.
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut next_seq = 0u64;
    let mut joined = false;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        // Top up the window while the run lasts.
        while joined && phase.load(Ordering::Relaxed) == 1 && in_flight.len() < window {
            let seq = next_seq;
            let sent_us = shared.epoch.elapsed().as_micros() as u64;
            let head = format!("{i} {seq} {sent_us} ");
            let text = format!("{head}{}", "x".repeat(size.saturating_sub(head.len())));
            if client
                .send_with_id(&format!("{i}-{seq}"), &room, &text)
                .is_err()
            {
                // The client keeps as much unacknowledged as it may: top up after acks.
                break;
            }
            next_seq += 1;
            in_flight.insert(seq, Instant::now());
            shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        let event = tokio::select! {
            e = client.next_event() => e,
            _ = tick.tick() => continue,
        };
        let Some(event) = event else { return };
        match event {
            Event::Connected { node, .. } => shared.node_of[i].store(node, Ordering::Relaxed),
            Event::Reconnected(r) => {
                shared.node_of[i].store(r.to_node, Ordering::Relaxed);
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            Event::Joined { .. } if !joined => {
                joined = true;
                ready.add_permits(1);
            }
            Event::Acked { id, .. } => {
                let Some(seq) = id.split_once('-').and_then(|(_, s)| s.parse::<u64>().ok()) else {
                    continue;
                };
                if let Some(sent) = in_flight.remove(&seq) {
                    let us = sent.elapsed().as_micros() as u64;
                    if let Ok(mut l) = shared.latencies.lock() {
                        let _ = l.ack.record(us.max(1));
                    }
                    shared.counters.acked.fetch_add(1, Ordering::Relaxed);
                    let mut flags = shared.acked_seqs[i]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let seq = seq as usize;
                    if flags.len() <= seq {
                        flags.resize(seq + 1, false);
                    }
                    flags[seq] = true;
                }
            }
            Event::Refused { id, .. } => {
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(seq) =
                    id.and_then(|id| id.split_once('-').and_then(|(_, s)| s.parse::<u64>().ok()))
                    && in_flight.remove(&seq).is_some()
                {
                    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Disconnected { .. } | Event::Retrying { .. } => {
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Event::Failed(reason) => {
                eprintln!("bench: client {i} gave up: {reason}");
                return;
            }
            Event::Message(m) => {
                let mut parts = m.text.splitn(4, ' ');
                let sender = parts.next().and_then(|p| p.parse::<usize>().ok());
                let seq = parts.next().and_then(|p| p.parse::<usize>().ok());
                let sent_us = parts.next().and_then(|p| p.parse::<u64>().ok());
                if let (Some(sender), Some(seq), Some(sent_us)) = (sender, seq, sent_us)
                    && sender < clients
                {
                    {
                        let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
                        let counts = &mut r.counts[sender];
                        if counts.len() <= seq {
                            counts.resize(seq + 1, 0);
                        }
                        counts[seq] = counts[seq].saturating_add(1);
                    }
                    let mine = shared.node_of[i].load(Ordering::Relaxed);
                    if shared.node_of[sender].load(Ordering::Relaxed) != mine {
                        let now_us = shared.epoch.elapsed().as_micros() as u64;
                        if let Ok(mut l) = shared.latencies.lock() {
                            let _ = l.delivery.record(now_us.saturating_sub(sent_us).max(1));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// An OTLP/HTTP endpoint that accepts every export and counts it.
struct OtlpSink {
    endpoint: String,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl OtlpSink {
    async fn start() -> anyhow::Result<OtlpSink> {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (r, b) = (requests.clone(), bytes.clone());
        let handler = move |req: hyper::Request<hyper::body::Incoming>| {
            let (r, b) = (r.clone(), b.clone());
            async move {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes().len())
                    .unwrap_or(0);
                r.fetch_add(1, Ordering::Relaxed);
                b.fetch_add(body as u64, Ordering::Relaxed);
                crate::http::text(hyper::StatusCode::OK, "")
            }
        };
        tokio::spawn(crate::http::serve(
            listener,
            handler,
            64,
            tokio_util::sync::CancellationToken::new(),
            None,
        ));
        Ok(OtlpSink {
            endpoint,
            requests,
            bytes,
        })
    }
}

/// The p99 of every node's health probe durations, interpolated from the histogram buckets
/// as Prometheus' `histogram_quantile` does.
async fn probe_p99_ms(cluster: &LocalCluster) -> Option<f64> {
    let mut buckets: std::collections::BTreeMap<u64, f64> = std::collections::BTreeMap::new();
    let mut infinite = 0.0;
    for node in &cluster.config.nodes {
        let text = super::status::fetch_text(&node.metrics, "/metrics", Duration::from_secs(2))
            .await
            .ok()?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("raftchat_health_probe_duration_seconds_bucket{")
            else {
                continue;
            };
            let (labels, value) = rest.rsplit_once("} ")?;
            let count: f64 = value.trim().parse().ok()?;
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            if le == "+Inf" {
                infinite += count;
            } else {
                let bound: f64 = le.parse().ok()?;
                *buckets.entry((bound * 1e9) as u64).or_default() += count;
            }
        }
    }
    if infinite == 0.0 {
        return None;
    }
    let rank = 0.99 * infinite;
    let mut lower = (0.0, 0.0);
    for (bound_ns, count) in &buckets {
        let bound = *bound_ns as f64 / 1e9;
        if *count >= rank {
            let (lo_bound, lo_count) = lower;
            let fraction = if count > &lo_count {
                (rank - lo_count) / (count - lo_count)
            } else {
                1.0
            };
            return Some((lo_bound + (bound - lo_bound) * fraction) * 1000.0);
        }
        lower = (bound, *count);
    }
    Some(lower.0 * 1000.0)
}

fn print_report(args: &BenchArgs, report: &serde_json::Map<String, Value>) {
    if args.json {
        println!("{}", Value::Object(report.clone()));
        return;
    }
    for (key, value) in report {
        println!("{key:<24} {value}");
    }
}
