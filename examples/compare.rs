//! The load generator behind `bench/compare`: the same shapes of work against NATS JetStream
//! (async-nats, an R3 file stream) and raftchat (its client library), so the two can be
//! compared case by case in one run.
//!
//! ```text
//! compare nats     --url nats://127.0.0.1:4222 --pids 11,12,13 [--seconds 6] [--case NAME]
//! compare raftchat --servers 127.0.0.1:7001,… --pids 21,22,23 [--seconds 6] [--case NAME]
//! ```
//!
//! Cases: `one` (1 sender, awaits each ack), `concurrent` (32 senders on one connection,
//! each awaits its ack), `inflight` (1 sender, 256 acks outstanding), `fanout` (1 sender
//! with 64 in flight, 32 receivers of every message). Each prints one JSON line: throughput,
//! ack (or delivery) p50/p99 in ms, and the servers' CPU seconds per 1,000 messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use raftchat::client::{Client, ClientConfig, Event};
use serde_json::json;
use tokio::sync::{Mutex, mpsc, oneshot};

const SIZE: usize = 200;
const CONCURRENT: usize = 32;
const INFLIGHT: usize = 256;
const FANOUT_RECEIVERS: usize = 32;
const FANOUT_INFLIGHT: usize = 64;
const CASES: [&str; 4] = ["one", "concurrent", "inflight", "fanout"];

struct Args {
    system: String,
    target: String,
    pids: Vec<u32>,
    seconds: u64,
    cases: Vec<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let system = it.next().context("usage: compare nats|raftchat …")?;
    let (mut target, mut pids, mut seconds, mut cases) = (String::new(), Vec::new(), 6, Vec::new());
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" | "--servers" => target = value,
            "--pids" => {
                pids = value
                    .split(',')
                    .map(|p| p.parse())
                    .collect::<Result<_, _>>()
                    .context("--pids: comma-separated process ids")?
            }
            "--seconds" => seconds = value.parse().context("--seconds")?,
            "--case" => cases.push(value),
            other => bail!("unknown flag {other}"),
        }
    }
    if !matches!(system.as_str(), "nats" | "raftchat") {
        bail!("the first argument is `nats` or `raftchat`, not {system}");
    }
    if cases.is_empty() {
        cases = CASES.iter().map(|c| c.to_string()).collect();
    }
    Ok(Args {
        system,
        target,
        pids,
        seconds,
        cases,
    })
}

/// CPU seconds (user + system) the processes have used so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .sum()
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A payload of `SIZE` bytes that starts with the send time in microseconds.
fn payload(seq: u64) -> String {
    let head = format!("{} {seq} ", now_micros());
    format!("{head}{}", "x".repeat(SIZE.saturating_sub(head.len())))
}

fn sent_at(text: &str) -> Option<u64> {
    text.split(' ').next()?.parse().ok()
}

struct Measured {
    messages: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

/// Sends through one connection: `send` publishes and resolves when the ack arrives.
enum Sender {
    Nats(Box<NatsSender>),
    Raftchat(RaftchatSender),
}

impl Sender {
    async fn send(&self, seq: u64) -> anyhow::Result<()> {
        match self {
            Sender::Nats(s) => s.send(seq).await,
            Sender::Raftchat(s) => s.send(seq).await,
        }
    }
}

/// `senders` tasks, each keeping `window` sends outstanding, for `seconds`.
async fn drive(sender: Arc<Sender>, senders: usize, window: usize, seconds: u64) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(std::sync::Mutex::new(histogram()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..senders * window {
        let (sender, stop, seq, latency) =
            (sender.clone(), stop.clone(), seq.clone(), latency.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if sender.send(n).await.is_err() {
                    continue;
                }
                let us = t.elapsed().as_micros().max(1) as u64;
                if let Ok(mut h) = latency.lock() {
                    let _ = h.record(us);
                }
                acked += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut messages = 0;
    for t in tasks {
        messages += t.await.unwrap_or(0);
    }
    let latency = latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    Measured {
        messages,
        elapsed,
        latency,
    }
}

// ---- NATS JetStream ----

struct NatsSender {
    js: async_nats::jetstream::Context,
}

impl NatsSender {
    async fn send(&self, seq: u64) -> anyhow::Result<()> {
        let ack = self.js.publish("chat.bench", payload(seq).into()).await?;
        ack.await?;
        Ok(())
    }
}

/// A fresh R3 file stream for `chat.>`; retried while the JetStream cluster forms.
async fn nats_stream(url: &str) -> anyhow::Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let client = async_nats::connect(url).await?;
            let js = async_nats::jetstream::new(client.clone());
            let _ = js.delete_stream("CHAT").await;
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "CHAT".into(),
                subjects: vec!["chat.>".into()],
                num_replicas: 3,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("cannot create the R3 file stream");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn nats_case(url: &str, case: &str, seconds: u64) -> anyhow::Result<Measured> {
    let client = nats_stream(url).await?;
    let sender = Arc::new(Sender::Nats(Box::new(NatsSender {
        js: async_nats::jetstream::new(client.clone()),
    })));
    Ok(match case {
        "one" => drive(sender, 1, 1, seconds).await,
        "concurrent" => drive(sender, CONCURRENT, 1, seconds).await,
        "inflight" => drive(sender, 1, INFLIGHT, seconds).await,
        _ => {
            let mut receivers = Vec::new();
            let delivered = Arc::new(AtomicU64::new(0));
            let latency = Arc::new(std::sync::Mutex::new(histogram()));
            for _ in 0..FANOUT_RECEIVERS {
                let mut sub = async_nats::connect(url)
                    .await?
                    .subscribe("chat.bench")
                    .await?;
                let (delivered, latency) = (delivered.clone(), latency.clone());
                receivers.push(tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        record_delivery(&String::from_utf8_lossy(&m.payload), &delivered, &latency);
                    }
                }));
            }
            fanout(sender, receivers, delivered, latency, seconds).await
        }
    })
}

fn record_delivery(text: &str, delivered: &AtomicU64, latency: &std::sync::Mutex<Histogram<u64>>) {
    delivered.fetch_add(1, Ordering::Relaxed);
    if let Some(at) = sent_at(text)
        && let Ok(mut h) = latency.lock()
    {
        let _ = h.record(now_micros().saturating_sub(at).max(1));
    }
}

async fn fanout(
    sender: Arc<Sender>,
    receivers: Vec<tokio::task::JoinHandle<()>>,
    delivered: Arc<AtomicU64>,
    latency: Arc<std::sync::Mutex<Histogram<u64>>>,
    seconds: u64,
) -> Measured {
    // Let the subscriptions settle before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = delivered.load(Ordering::Relaxed);
    if let Ok(mut h) = latency.lock() {
        h.reset();
    }
    let sent = drive(sender, 1, FANOUT_INFLIGHT, seconds).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in receivers {
        r.abort();
    }
    Measured {
        messages: delivered.load(Ordering::Relaxed) - before,
        elapsed: sent.elapsed,
        latency: latency
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| histogram()),
    }
}

// ---- raftchat ----

/// One raftchat connection shared by many senders: a task owns the client and hands each
/// ack to whoever sent that message.
struct RaftchatSender {
    requests: mpsc::Sender<(String, oneshot::Sender<()>)>,
}

const ROOM: &str = "#compare";

impl RaftchatSender {
    async fn start(servers: &[String], user: &str) -> anyhow::Result<RaftchatSender> {
        let mut config = ClientConfig::new(servers.to_vec(), user);
        config.rooms = vec![ROOM.into()];
        // A publisher, as on NATS: it is told its messages are committed, not sent them back.
        config.echo = false;
        let mut client = Client::start(config);
        wait_joined(&mut client).await?;
        let (requests, mut rx) = mpsc::channel::<(String, oneshot::Sender<()>)>(4096);
        tokio::spawn(async move {
            let waiting: Mutex<HashMap<String, oneshot::Sender<()>>> = Mutex::new(HashMap::new());
            let mut next = 0u64;
            loop {
                tokio::select! {
                    request = rx.recv() => {
                        let Some((text, done)) = request else { return };
                        next += 1;
                        let id = format!("c{next}");
                        // The cases keep at most 256 messages in flight, far below the client's
                        // budget; a refused send fails its request (its `done` is dropped).
                        if client.send_with_id(&id, ROOM, &text).is_ok() {
                            waiting.lock().await.insert(id.clone(), done);
                        }
                    }
                    event = client.next_event() => match event {
                        Some(Event::Acked { id, .. }) => {
                            if let Some(done) = waiting.lock().await.remove(&id) {
                                let _ = done.send(());
                            }
                        }
                        Some(_) => {}
                        None => return,
                    }
                }
            }
        });
        Ok(RaftchatSender { requests })
    }
}

impl RaftchatSender {
    async fn send(&self, seq: u64) -> anyhow::Result<()> {
        let (done, acked) = oneshot::channel();
        self.requests.send((payload(seq), done)).await?;
        acked.await?;
        Ok(())
    }
}

async fn wait_joined(client: &mut Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), client.next_event()).await {
            Ok(Some(Event::Joined { .. })) => return Ok(()),
            Ok(Some(Event::Failed(why))) => bail!("client failed: {why}"),
            Ok(None) => bail!("client stopped"),
            _ => {}
        }
    }
    bail!("not joined within 30 s")
}

async fn raftchat_case(
    servers: &[String],
    case: &str,
    seconds: u64,
    run: &str,
) -> anyhow::Result<Measured> {
    let sender = Arc::new(Sender::Raftchat(
        RaftchatSender::start(servers, &format!("sender{run}{case}")).await?,
    ));
    Ok(match case {
        "one" => drive(sender, 1, 1, seconds).await,
        "concurrent" => drive(sender, CONCURRENT, 1, seconds).await,
        "inflight" => drive(sender, 1, INFLIGHT, seconds).await,
        _ => {
            let delivered = Arc::new(AtomicU64::new(0));
            let latency = Arc::new(std::sync::Mutex::new(histogram()));
            let mut receivers = Vec::new();
            for i in 0..FANOUT_RECEIVERS {
                let mut config = ClientConfig::new(servers.to_vec(), &format!("recv{run}x{i}"));
                config.rooms = vec![ROOM.into()];
                let mut client = Client::start(config);
                wait_joined(&mut client).await?;
                let (delivered, latency) = (delivered.clone(), latency.clone());
                receivers.push(tokio::spawn(async move {
                    while let Some(event) = client.next_event().await {
                        if let Event::Message(m) = event {
                            record_delivery(&m.text, &delivered, &latency);
                        }
                    }
                }));
            }
            fanout(sender, receivers, delivered, latency, seconds).await
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let servers: Vec<String> = args.target.split(',').map(String::from).collect();
    let run = format!("{:x}", std::process::id());
    for case in &args.cases {
        if !CASES.contains(&case.as_str()) {
            bail!("unknown case {case}; cases: {}", CASES.join(", "));
        }
        let cpu_before = cpu_seconds(&args.pids);
        let m = match args.system.as_str() {
            "nats" => nats_case(&args.target, case, args.seconds).await?,
            _ => raftchat_case(&servers, case, args.seconds, &run).await?,
        };
        let cpu = cpu_seconds(&args.pids) - cpu_before;
        let rate = m.messages as f64 / m.elapsed.as_secs_f64();
        let ms = |q: f64| m.latency.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{}",
            json!({
                "system": args.system,
                "case": case,
                "msgs_per_s": rate.round(),
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "server_cpu_s_per_1000": if m.messages > 0 { cpu / m.messages as f64 * 1000.0 } else { 0.0 },
                "messages": m.messages,
            })
        );
    }
    Ok(())
}
