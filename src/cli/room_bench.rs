//! `raftchat bench --room-members N --room-rate R`: one big room. N members, spread over
//! every node, each receive every message one sender writes at R messages a second; the
//! bench reports deliveries per second and the delivery latency (send to receipt, one clock).
//!
//! Members read raw lines and look only for the send time the sender put at the start of the
//! text, so one bench process can take in a million deliveries a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How many members log in at once.
const LOGIN_CONCURRENCY: usize = 64;
/// Marks the send time in a message's text: `T<micros>:`.
const MARK: &str = "\"text\":\"T";

pub struct RoomLoad {
    pub members: usize,
    pub rate: u64,
    pub duration: Duration,
    pub size: usize,
}

/// Runs the big-room measurement: members on `servers` (round robin), the sender on
/// `servers[0]`; adds its results to `report`.
pub async fn run(
    servers: &[String],
    load: RoomLoad,
    report: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    if servers.is_empty() {
        bail!("no servers to connect to");
    }
    let run = format!("{:x}", std::process::id());
    let room = format!("#room{run}");
    let clock = Instant::now();
    let window_from = Arc::new(AtomicU64::new(u64::MAX));
    let stop = CancellationToken::new();
    let members = connect_members(servers, &run, &room, load.members).await?;
    eprintln!("bench: {} members in {room}", members.len());
    let mut readers = Vec::with_capacity(members.len());
    for (server, member) in members {
        let received = tokio::spawn(receive(member, clock, window_from.clone(), stop.clone()));
        readers.push((server, received));
    }

    let sender = login(&servers[0], &format!("roomsender{run}"), &room).await?;
    let (sender_read, mut sender_write) = tokio::io::split(sender);
    let mut sender_read = BufReader::new(sender_read);
    // Acks are read and dropped; the sender never waits for one.
    let acks = Arc::new(AtomicU64::new(0));
    let counted = acks.clone();
    let ack_reader = tokio::spawn(async move {
        let mut line = Vec::new();
        loop {
            line.clear();
            match sender_read.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) if line.starts_with(b"{\"type\":\"ack\"") => {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
            }
        }
    });

    // A warm-up second, then the measured window.
    let warmup = Duration::from_secs(1);
    let tick = Duration::from_millis(10);
    let per_tick = (load.rate as f64 * tick.as_secs_f64()).max(1.0);
    let mut owed = 0.0;
    let mut seq = 0u64;
    let mut sent_measured = 0u64;
    let started = Instant::now();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let padding = "x".repeat(load.size.saturating_sub(24));
    while started.elapsed() < warmup + load.duration {
        interval.tick().await;
        let in_window = started.elapsed() >= warmup;
        if in_window && window_from.load(Ordering::Relaxed) == u64::MAX {
            window_from.store(clock.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        owed += per_tick;
        let mut batch = String::new();
        while owed >= 1.0 {
            owed -= 1.0;
            seq += 1;
            let micros = clock.elapsed().as_micros();
            let frame = json!({"type": "send", "to": room, "id": format!("r{seq}"),
                "text": format!("T{micros}:{padding}")});
            batch.push_str(&frame.to_string());
            batch.push('\n');
            if in_window {
                sent_measured += 1;
            }
        }
        sender_write.write_all(batch.as_bytes()).await?;
    }
    let window = started.elapsed().saturating_sub(warmup);
    // What is still on its way arrives within a few seconds or is late.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    ack_reader.abort();

    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    // In `servers` order: the sender's node first (the leader of a local cluster).
    let mut by_server = vec![Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?; servers.len()];
    let mut delivered = 0u64;
    let mut closed = 0usize;
    for (server, reader) in readers {
        let got = reader.await??;
        latency.add(&got.latency)?;
        by_server[server].add(&got.latency)?;
        delivered += got.count;
        closed += usize::from(got.closed);
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let per_server = |q: f64| -> Vec<f64> {
        by_server
            .iter()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .collect()
    };
    let expected = sent_measured * load.members as u64;
    report.insert("room_members".into(), json!(load.members));
    report.insert("room_rate".into(), json!(load.rate));
    report.insert("room_sent".into(), json!(sent_measured));
    report.insert("room_acked".into(), json!(acks.load(Ordering::Relaxed)));
    report.insert(
        "room_msgs_per_s".into(),
        json!((sent_measured as f64 / window.as_secs_f64()).round()),
    );
    report.insert(
        "room_deliveries_per_s".into(),
        json!((delivered as f64 / window.as_secs_f64()).round()),
    );
    report.insert(
        "room_deliveries_missing".into(),
        json!(expected.saturating_sub(delivered)),
    );
    report.insert("room_members_disconnected".into(), json!(closed));
    report.insert("room_delivery_p50_ms".into(), json!(ms(0.5)));
    report.insert("room_delivery_p99_ms".into(), json!(ms(0.99)));
    report.insert("room_servers".into(), json!(servers));
    report.insert(
        "room_delivery_p50_ms_by_server".into(),
        json!(per_server(0.5)),
    );
    report.insert(
        "room_delivery_p99_ms_by_server".into(),
        json!(per_server(0.99)),
    );
    report.insert(
        "room_delivery_max_ms".into(),
        json!(latency.max() as f64 / 1000.0),
    );
    Ok(())
}

type Member = BufReader<TcpStream>;

/// What one member received in the measured window.
struct Received {
    latency: Histogram<u64>,
    count: u64,
    closed: bool,
}

/// Reads a member's lines until `stop`: the latency of every message sent from
/// `window_from` (micros on `clock`) on, how many there were, whether the node closed it.
/// Lines are taken a socket read at a time, with one clock reading per read.
async fn receive(
    member: Member,
    clock: Instant,
    window_from: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<Received> {
    use tokio::io::AsyncReadExt;
    let mut got = Received {
        latency: Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?,
        count: 0,
        closed: false,
    };
    let mut pending = member.buffer().to_vec();
    let mut stream = member.into_inner();
    loop {
        pending.reserve(64 * 1024);
        tokio::select! {
            _ = stop.cancelled() => break,
            read = stream.read_buf(&mut pending) => if !matches!(read, Ok(n) if n > 0) {
                got.closed = true;
                break;
            },
        }
        let now = clock.elapsed().as_micros() as u64;
        let from = window_from.load(Ordering::Relaxed);
        let mut consumed = 0;
        while let Some(end) = memchr::memchr(b'\n', &pending[consumed..]) {
            let line = &pending[consumed..consumed + end];
            consumed += end + 1;
            if let Some(sent) = sent_micros(line)
                && sent >= from
            {
                got.latency
                    .saturating_record(now.saturating_sub(sent).max(1));
                got.count += 1;
            }
        }
        pending.drain(..consumed);
    }
    Ok(got)
}

/// The send time a message line carries, if it is one of the bench's messages.
fn sent_micros(line: &[u8]) -> Option<u64> {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(MARK));
    let at = FINDER.find(line)? + MARK.len();
    let mut micros = 0u64;
    let mut digits = 0;
    for b in &line[at..] {
        if !b.is_ascii_digit() {
            break;
        }
        micros = micros.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(micros)
}

async fn login(addr: &str, user: &str, room: &str) -> anyhow::Result<Member> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut member = BufReader::with_capacity(64 * 1024, stream);
    let hello = json!({"type": "hello", "user": user});
    let join = json!({"type": "join", "room": room});
    member
        .get_mut()
        .write_all(format!("{hello}\n{join}\n").as_bytes())
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        let read = tokio::time::timeout(Duration::from_secs(30), member.read_line(&mut line))
            .await
            .context("no answer within 30 s")??;
        if read == 0 {
            bail!("{addr} closed the connection during login");
        }
        if line.starts_with("{\"type\":\"joined\"") {
            return Ok(member);
        }
        if line.starts_with("{\"type\":\"error\"") {
            bail!("{addr} refused the login: {}", line.trim());
        }
    }
}

/// Logs in `n` members round robin over `servers`; each with the index of its server.
async fn connect_members(
    servers: &[String],
    run: &str,
    room: &str,
    n: usize,
) -> anyhow::Result<Vec<(usize, Member)>> {
    use futures_util::StreamExt;
    let logins = futures_util::stream::iter(0..n)
        .map(|i| {
            let server = i % servers.len();
            let addr = servers[server].clone();
            async move {
                let member = login(&addr, &format!("member{run}x{i}"), room).await;
                member.map(|m| (server, m))
            }
        })
        .buffer_unordered(LOGIN_CONCURRENCY);
    tokio::pin!(logins);
    let mut held = Vec::with_capacity(n);
    while let Some(m) = logins.next().await {
        held.push(m.context("a member could not log in")?);
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_time_is_found_in_a_message_line() {
        let line =
            br##"{"type":"message","room":"#r","from":"a","text":"T123456:xxxx","index":7}"##;
        assert_eq!(sent_micros(line), Some(123_456));
        assert_eq!(sent_micros(br#"{"type":"ack","id":"r1"}"#), None);
    }
}
