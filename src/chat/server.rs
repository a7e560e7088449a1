//! The chat ports: accept connections (plain, and TLS on `chat_tls`), read the first byte to
//! pick the dialect (`{` is JSON, anything else IRC) and serve them until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::conn::{ChatIo, ChatRead, ChatWrite};
use super::service::ChatService;
use super::{irc, json};
use crate::tls::Tls;

/// One chat listener; with `tls`, every connection first completes a TLS handshake.
pub struct ChatListener {
    pub listener: TcpListener,
    pub tls: Option<Arc<Tls>>,
}

/// Serves every chat listener of the node; `chat.max_clients` and `chat.max_clients_per_ip`
/// count connections across all of them.
pub async fn serve_chat_ports(
    listeners: Vec<ChatListener>,
    svc: Arc<ChatService>,
    shutdown: CancellationToken,
) {
    let admission = Arc::new(Admission {
        slots: Arc::new(Semaphore::new(svc.config.max_clients)),
        per_ip: Arc::new(PerIp::new(svc.config.max_clients_per_ip)),
        new_per_ip: NewPerIp::new(svc.config.max_new_sessions_per_ip_per_sec),
    });
    let loops = listeners
        .into_iter()
        .map(|l| accept_loop(l, svc.clone(), admission.clone(), shutdown.clone()));
    futures_util::future::join_all(loops).await;
}

struct Admission {
    slots: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    new_per_ip: NewPerIp,
}

/// New connections per client address and second (governor's keyed GCRA). Addresses that
/// have been quiet long enough to be back at a full burst are forgotten now and then, so the
/// table holds only recent ones.
struct NewPerIp {
    limiter: Option<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    accepted: std::sync::atomic::AtomicU64,
}

/// How often (in accepted connections) quiet addresses are dropped from the table.
const FORGET_EVERY: u64 = 4096;

impl NewPerIp {
    fn new(per_sec: u32) -> NewPerIp {
        let limiter = std::num::NonZeroU32::new(per_sec).map(|rate| {
            let burst = rate.saturating_mul(std::num::NonZeroU32::new(10).unwrap_or(rate));
            governor::RateLimiter::hashmap(governor::Quota::per_second(rate).allow_burst(burst))
        });
        NewPerIp {
            limiter,
            accepted: Default::default(),
        }
    }

    fn allow(&self, ip: std::net::IpAddr) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let n = self
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % FORGET_EVERY == FORGET_EVERY - 1 {
            limiter.retain_recent();
        }
        limiter.check_key(&ip).is_ok()
    }
}

async fn accept_loop(
    chat: ChatListener,
    svc: Arc<ChatService>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = chat.listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        if !admission.new_per_ip.allow(peer.ip()) {
            svc.metrics.bad_request("session_rate");
            tokio::spawn(refuse(stream, SESSION_RATE));
            continue;
        }
        let Ok(permit) = admission.slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, FULL));
            continue;
        };
        let Some(ip_slot) = PerIp::acquire(&admission.per_ip, peer.ip()) else {
            svc.metrics.bad_request("ip_limit");
            tokio::spawn(refuse(stream, IP_LIMIT));
            continue;
        };
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        let tls = chat.tls.clone();
        tokio::spawn(async move {
            let peer = peer.ip().to_string();
            let io = match tls {
                None => Some(plain(stream, peer)),
                Some(tls) => handshake(stream, peer, &tls, &svc, &shutdown).await,
            };
            if let Some(io) = io {
                serve_connection(io, svc, shutdown).await;
            }
            drop(ip_slot);
            drop(permit);
        });
    }
}

/// Read buffer of a chat connection; longer lines are assembled beyond it.
const READ_BUFFER: usize = 2048;

fn plain(stream: TcpStream, peer: String) -> ChatIo {
    let (read, write) = stream.into_split();
    ChatIo {
        reader: BufReader::with_capacity(READ_BUFFER, Box::new(read) as ChatRead),
        writer: Box::new(write) as ChatWrite,
        peer,
    }
}

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Completes the TLS handshake on a `chat_tls` connection. A client speaking plain text is
/// told so in its own dialect and closed.
async fn handshake(
    stream: TcpStream,
    peer: String,
    tls: &Tls,
    svc: &ChatService,
    shutdown: &CancellationToken,
) -> Option<ChatIo> {
    let wait = Duration::from_millis(svc.config.hello_timeout_ms);
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout(wait, stream.peek(&mut first)) => r,
        _ = shutdown.cancelled() => return None,
    };
    match peeked {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1)) => {
            svc.metrics.bad_request("not_tls");
            let line = if first[0] == b'{' {
                NOT_TLS_JSON
            } else {
                NOT_TLS_IRC
            };
            refuse(stream, line).await;
            return None;
        }
        // A TCP health probe, a silent client or a broken connection.
        _ => return None,
    }
    let accepted = tokio::select! {
        r = tokio::time::timeout(wait, tls.chat_acceptor().accept(stream)) => r,
        _ = shutdown.cancelled() => return None,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let (read, write) = tokio::io::split(stream);
            Some(ChatIo {
                reader: BufReader::with_capacity(READ_BUFFER, Box::new(read) as ChatRead),
                writer: Box::new(write) as ChatWrite,
                peer,
            })
        }
        Ok(Err(e)) => {
            svc.metrics.bad_request("tls_handshake");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

const FULL: &[u8] =
    br#"{"type":"error","code":"unavailable","message":"server full: too many clients"}"#;
const IP_LIMIT: &[u8] =
    br#"{"type":"error","code":"limit","message":"too many connections from this address"}"#;
const SESSION_RATE: &[u8] = br#"{"type":"error","code":"limit","message":"too many new connections from this address; try again in a few seconds"}"#;
const NOT_TLS_JSON: &[u8] = br#"{"type":"error","code":"bad_request","message":"this port speaks TLS; connect with TLS or use the plain chat port"}"#;
const NOT_TLS_IRC: &[u8] =
    b"ERROR :This port speaks TLS; connect with TLS or use the plain chat port\r";

/// Connections per client address, bounded by `chat.max_clients_per_ip` (0: unlimited). The
/// map holds only addresses with a live connection, so it is bounded by `chat.max_clients`.
struct PerIp {
    max: usize,
    counts: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in its address' count; released on drop.
struct IpSlot {
    table: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn new(max: usize) -> PerIp {
        PerIp {
            max,
            counts: Default::default(),
        }
    }

    fn acquire(table: &Arc<PerIp>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut counts = table.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if table.max > 0 && *n >= table.max {
            if *n == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, line: &'static [u8]) {
    let _ = stream.write_all(line).await;
    let _ = stream.write_all(b"\n").await;
    let _ = stream.shutdown().await;
}

async fn serve_connection(mut io: ChatIo, svc: Arc<ChatService>, shutdown: CancellationToken) {
    let wait = Duration::from_millis(svc.config.hello_timeout_ms);
    let first = tokio::select! {
        r = tokio::time::timeout(wait, io.reader.fill_buf()) => match r {
            Ok(Ok(buf)) => buf.first().copied(),
            Ok(Err(_)) | Err(_) => None,
        },
        _ = shutdown.cancelled() => return,
    };
    match first {
        // Closed without a byte (a health probe), silent past the login timeout, or broken.
        None => {}
        Some(b'{') => json::serve(io, svc, shutdown).await,
        Some(_) => irc::serve(io, svc, shutdown).await,
    }
}
