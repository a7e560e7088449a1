//! `raftchat bench`: a load generator and a failover timer.
//!
//! Load: N clients spread round-robin over the servers, all in one room, each keeping a window
//! of messages in flight. It measures acknowledged messages per second, ack latency and
//! delivery latency to clients on other nodes, and checks that every acknowledged message
//! reached every client exactly once.
//!
//! Without `--servers` it starts a local cluster of `--nodes` child processes on free ports
//! (release builds measure what users run); `--failovers K` then SIGKILLs the leader K times
//! and times how long the survivors take to agree on a new one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

use super::cluster::LocalCluster;
use super::status::fetch_status;
use crate::client;
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
    /// Export the local cluster's spans over OTLP to a sink inside the bench (measures the
    /// cost of tracing).
    #[arg(long)]
    otlp: bool,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
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
        if args.failovers > 0 {
            bail!("flag `--failovers` needs a local cluster: leave out `--servers`");
        }
        args.servers.clone()
    };

    let mut report = serde_json::Map::new();
    if args.duration > 0 {
        let load = load(&args, &servers).await?;
        report.extend(load);
    }
    if args.failovers > 0
        && let Some((cluster, _)) = local.as_mut()
    {
        let times = failovers(cluster, args.failovers).await?;
        report.insert("failover_ms".into(), json!(times));
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        report.insert(
            "failover_median_ms".into(),
            json!(percentile(&sorted, 50.0)),
        );
        report.insert(
            "failover_max_ms".into(),
            json!(sorted.last().copied().unwrap_or(0.0)),
        );
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
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
        Some(path) => config::load(Some(path), &FlagOverrides::default())?,
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
async fn wait_for_leader(
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

async fn failovers(cluster: &mut LocalCluster, rounds: usize) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for round in 1..=rounds {
        let leader = wait_for_leader(cluster, &[], Duration::from_secs(30)).await?;
        // Let the cluster settle: everyone applied to the same point.
        wait_caught_up(cluster, Duration::from_secs(30)).await?;
        let killed_at = Instant::now();
        cluster.kill(leader).await;
        let new_leader = wait_for_leader(cluster, &[leader], Duration::from_secs(30)).await?;
        let ms = killed_at.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "bench: failover {round}/{rounds}: leader {leader} killed, {new_leader} leads after {ms:.0} ms"
        );
        times.push(ms);
        cluster.start_node(leader)?;
    }
    Ok(times)
}

async fn wait_caught_up(cluster: &LocalCluster, timeout: Duration) -> anyhow::Result<()> {
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

async fn load(
    args: &BenchArgs,
    servers: &[String],
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(Latencies {
        ack: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        delivery: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    }));
    let epoch = Instant::now();
    let run = format!("{:x}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = args.clients;

    // Log everyone in first, so every client sees every message.
    let mut sessions = Vec::new();
    for i in 0..clients {
        let server = servers[i % servers.len()].clone();
        let user = format!("bench{run}x{i}");
        let (reader, writer, welcome) =
            client::login(&server, &user, &args.room, Duration::from_secs(30))
                .await
                .with_context(|| format!("client {i} could not log in"))?;
        let node = welcome["node"].as_u64().unwrap_or(0);
        sessions.push((reader, writer, node));
    }
    let nodes_of: Arc<Vec<u64>> = Arc::new(sessions.iter().map(|s| s.2).collect());
    // Per sender: which sequence numbers were acknowledged.
    let acked_seqs: Arc<Vec<std::sync::Mutex<Vec<bool>>>> = Arc::new(
        (0..clients)
            .map(|_| std::sync::Mutex::new(Vec::new()))
            .collect(),
    );
    let in_flight_total = Arc::new(AtomicU64::new(0));
    eprintln!(
        "bench: {clients} clients logged in over {} servers",
        servers.len()
    );

    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for (i, (mut reader, mut writer, node)) in sessions.into_iter().enumerate() {
        let window = Arc::new(Semaphore::new(args.window));
        // seq → (first send, send time in µs since epoch).
        let in_flight: Arc<std::sync::Mutex<HashMap<u64, (Instant, u64)>>> = Arc::default();
        let (retry_tx, mut retry_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let received = Arc::new(std::sync::Mutex::new(Received {
            counts: vec![Vec::new(); clients],
        }));
        receivers.push(received.clone());
        // Sender: new messages while the run lasts, re-sends (same id) until acknowledged.
        {
            let window = window.clone();
            let in_flight = in_flight.clone();
            let in_flight_total = in_flight_total.clone();
            let counters = counters.clone();
            let stop = stop.clone();
            let size = args.size;
            let room = args.room.clone();
            tasks.push(tokio::spawn(async move {
                let mut next_seq = 0u64;
                let sent_us_of = |seq: u64| {
                    in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&seq)
                        .map_or(0, |(_, us)| *us)
                };
                loop {
                    let retry = if stop.load(Ordering::Relaxed) {
                        // The run is over: only re-sends are left.
                        match tokio::time::timeout(Duration::from_millis(50), retry_rx.recv()).await
                        {
                            Ok(Some(seq)) => Some(seq),
                            Ok(None) => break,
                            Err(_) => continue,
                        }
                    } else {
                        tokio::select! {
                            biased;
                            Some(seq) = retry_rx.recv() => Some(seq),
                            permit = window.clone().acquire_owned() => match permit {
                                Ok(p) => {
                                    p.forget();
                                    None
                                }
                                Err(_) => break,
                            },
                        }
                    };
                    let seq = match retry {
                        Some(seq) => {
                            // Refused (rate limit, no leader): give the cluster a moment.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            seq
                        }
                        None => {
                            let seq = next_seq;
                            next_seq += 1;
                            let sent_us = epoch.elapsed().as_micros() as u64;
                            in_flight
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(seq, (Instant::now(), sent_us));
                            in_flight_total.fetch_add(1, Ordering::Relaxed);
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                            seq
                        }
                    };
                    if !send_one(&mut writer, &room, i, seq, sent_us_of(seq), size).await {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                writer
            }));
        }
        // Receiver.
        {
            let counters = counters.clone();
            let latencies = latencies.clone();
            let nodes_of = nodes_of.clone();
            let acked_seqs = acked_seqs.clone();
            let in_flight_total = in_flight_total.clone();
            tokio::spawn(async move {
                while let Ok(Some(frame)) = reader.next().await {
                    match frame["type"].as_str() {
                        Some("ack") => {
                            let Some(seq) = seq_of(&frame) else { continue };
                            let sent = in_flight
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&seq);
                            let Some((sent, _)) = sent else { continue };
                            in_flight_total.fetch_sub(1, Ordering::Relaxed);
                            let us = sent.elapsed().as_micros() as u64;
                            let _ = latencies.lock().await.ack.record(us.max(1));
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                            {
                                let mut flags =
                                    acked_seqs[i].lock().unwrap_or_else(|p| p.into_inner());
                                let seq = seq as usize;
                                if flags.len() <= seq {
                                    flags.resize(seq + 1, false);
                                }
                                flags[seq] = true;
                            }
                            window.add_permits(1);
                        }
                        Some("error") => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            let retryable = matches!(
                                frame["code"].as_str(),
                                Some("unavailable" | "rate_limited")
                            );
                            let Some(seq) = seq_of(&frame) else { continue };
                            if retryable {
                                let _ = retry_tx.send(seq);
                                continue;
                            }
                            // Refused for good: stop waiting for it.
                            let forgotten = in_flight
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&seq)
                                .is_some();
                            if forgotten {
                                in_flight_total.fetch_sub(1, Ordering::Relaxed);
                                window.add_permits(1);
                            }
                        }
                        Some("message") => {
                            let text = frame["text"].as_str().unwrap_or("");
                            let mut parts = text.splitn(4, ' ');
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
                                if nodes_of[sender] != node {
                                    let now_us = epoch.elapsed().as_micros() as u64;
                                    let _ = latencies
                                        .lock()
                                        .await
                                        .delivery
                                        .record(now_us.saturating_sub(sent_us).max(1));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
    }

    // Progress once a second.
    let mut last = 0;
    for second in 1..=args.duration {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        let acked = counters.acked.load(Ordering::Relaxed);
        eprintln!(
            "bench: {second:>3}s  acked {acked:>9}  ({:>7}/s)  errors {}",
            acked - last,
            counters.errors.load(Ordering::Relaxed)
        );
        last = acked;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed_at_stop = started.elapsed();
    let acked_at_stop = counters.acked.load(Ordering::Relaxed);
    // Wait for the in-flight acks, then for every acked message to reach every client.
    let deadline = Instant::now() + Duration::from_secs(15);
    while in_flight_total.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let complete = |receivers: &[Arc<std::sync::Mutex<Received>>]| {
        let mut lost = 0u64;
        let mut duplicated = 0u64;
        for r in receivers {
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            for (sender, flags) in acked_seqs.iter().enumerate() {
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
        let (lost, duplicated) = complete(&receivers);
        if lost == 0 || Instant::now() > deadline {
            break (lost, duplicated);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for t in tasks {
        t.abort();
    }

    let l = latencies.lock().await;
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
    out.insert("reconnects".into(), json!(0));
    Ok(out)
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
            tokio_util::sync::CancellationToken::new(),
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

/// The sequence number in a frame's `id` (`{client}-{seq}`).
fn seq_of(frame: &Value) -> Option<u64> {
    frame["id"].as_str()?.split_once('-')?.1.parse().ok()
}

/// Sends message `seq` of client `client`; false when the connection is gone.
async fn send_one(
    writer: &mut client::FrameWriter,
    room: &str,
    client: usize,
    seq: u64,
    sent_us: u64,
    size: usize,
) -> bool {
    let head = format!("{client} {seq} {sent_us} ");
    let text = format!("{head}{}", "x".repeat(size.saturating_sub(head.len())));
    let frame = json!({"type": "send", "to": room, "id": format!("{client}-{seq}"), "text": text});
    writer.send(&frame).await.is_ok()
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
