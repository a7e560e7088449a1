//! `raftchat bench --idle N`: what idle connections cost one node. A small room's ack latency
//! (one client awaiting each ack) is measured alone, then again while N idle connections
//! (each logged in and in a room of its own) are held on the same node; the node's resident
//! memory is read before and after they connect.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::status::fetch_text;

/// How many idle connections log in at once.
const LOGIN_CONCURRENCY: usize = 64;

pub struct IdleTarget<'a> {
    pub chat: &'a str,
    pub metrics: &'a str,
}

/// Runs the idle-connection measurement against one node; adds its results to `report`.
pub async fn run(
    target: IdleTarget<'_>,
    idle: usize,
    probe: Duration,
    report: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let run = format!("{:x}", std::process::id());
    let alone = ack_latency(target.chat, &format!("idlebench{run}a"), probe).await?;
    let rss_before = resident_bytes(target.metrics).await?;
    let started = Instant::now();
    let held = connect_idle(target.chat, &run, idle).await?;
    let login_s = started.elapsed().as_secs_f64();
    // Let the node settle (allocator, the last acks) before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = resident_bytes(target.metrics).await?;
    let busy = ack_latency(target.chat, &format!("idlebench{run}b"), probe).await?;
    drop(held);

    let growth = rss_after.saturating_sub(rss_before);
    report.insert("idle_connections".into(), json!(idle));
    report.insert("idle_login_s".into(), json!(login_s));
    report.insert("rss_before_mb".into(), json!(mb(rss_before)));
    report.insert("rss_with_idle_mb".into(), json!(mb(rss_after)));
    report.insert("rss_growth_mb".into(), json!(mb(growth)));
    report.insert(
        "rss_per_idle_connection_kb".into(),
        json!((growth as f64 / idle.max(1) as f64 / 1024.0 * 10.0).round() / 10.0),
    );
    for (name, h) in [("alone", &alone), ("with_idle", &busy)] {
        report.insert(format!("small_room_ack_p50_ms_{name}"), json!(ms(h, 0.5)));
        report.insert(format!("small_room_ack_p99_ms_{name}"), json!(ms(h, 0.99)));
        report.insert(format!("small_room_acks_{name}"), json!(h.len()));
    }
    report.insert(
        "small_room_ack_p50_ratio".into(),
        json!((ms(&busy, 0.5) / ms(&alone, 0.5).max(0.001) * 100.0).round() / 100.0),
    );
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// `process_resident_memory_bytes` from the node's metrics port.
async fn resident_bytes(metrics: &str) -> anyhow::Result<u64> {
    let text = fetch_text(metrics, "/metrics", Duration::from_secs(5)).await?;
    text.lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("the node reports no process_resident_memory_bytes")
}

/// A JSON-dialect connection that reads frames line by line.
struct Line {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    buf: String,
}

impl Line {
    async fn connect(addr: &str) -> anyhow::Result<Line> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        Ok(Line {
            reader: BufReader::with_capacity(1024, read),
            writer,
            buf: String::new(),
        })
    }

    async fn send(&mut self, frame: Value) -> anyhow::Result<()> {
        let mut line = frame.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        Ok(())
    }

    /// The next frame of type `want`; an error frame or a closed connection fails.
    async fn expect(&mut self, want: &str) -> anyhow::Result<Value> {
        loop {
            self.buf.clear();
            let read = tokio::time::timeout(
                Duration::from_secs(30),
                self.reader.read_line(&mut self.buf),
            )
            .await
            .context("no answer within 30 s")??;
            if read == 0 {
                bail!("the node closed the connection");
            }
            let frame: Value = serde_json::from_str(&self.buf)?;
            match frame["type"].as_str() {
                Some(t) if t == want => return Ok(frame),
                Some("error") => bail!("the node answered {frame}"),
                _ => {}
            }
        }
    }

    async fn login(addr: &str, user: &str, room: &str) -> anyhow::Result<Line> {
        let mut c = Line::connect(addr).await?;
        c.send(json!({"type": "hello", "user": user})).await?;
        c.expect("welcome").await?;
        c.send(json!({"type": "join", "room": room})).await?;
        c.expect("joined").await?;
        Ok(c)
    }
}

/// Opens `n` connections, each logged in and in its own room, and returns them held open.
async fn connect_idle(addr: &str, run: &str, n: usize) -> anyhow::Result<Vec<Line>> {
    use futures_util::StreamExt;
    let logins = futures_util::stream::iter(0..n)
        .map(|i| async move {
            Line::login(addr, &format!("idle{run}x{i}"), &format!("#idle{run}x{i}")).await
        })
        .buffer_unordered(LOGIN_CONCURRENCY);
    tokio::pin!(logins);
    let mut held = Vec::with_capacity(n);
    while let Some(c) = logins.next().await {
        held.push(c.context("an idle connection could not log in")?);
        if held.len() % 1000 == 0 {
            eprintln!("bench: {} idle connections", held.len());
        }
    }
    Ok(held)
}

/// One client in a room of its own sends for `probe`, awaiting each ack.
async fn ack_latency(addr: &str, user: &str, probe: Duration) -> anyhow::Result<Histogram<u64>> {
    let room = format!("#{user}");
    let mut c = Line::login(addr, user, &room).await?;
    let mut acks = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let mut seq = 0u64;
    while started.elapsed() < probe {
        seq += 1;
        let sent = Instant::now();
        c.send(json!({"type": "send", "to": room, "id": format!("p{seq}"), "text": "ping from a small room"}))
            .await?;
        c.expect("ack").await?;
        acks.record(sent.elapsed().as_micros().max(1) as u64)?;
    }
    Ok(acks)
}
