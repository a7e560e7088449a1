//! The chat port: accepts connections, reads the first byte to pick the dialect (`{` is JSON,
//! anything else IRC) and serves them until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::service::ChatService;
use super::{irc, json};

pub async fn serve_chat_port(
    listener: TcpListener,
    svc: Arc<ChatService>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(svc.config.max_clients));
    let per_ip = Arc::new(PerIp::new(svc.config.max_clients_per_ip));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, FULL));
            continue;
        };
        let Some(ip_slot) = PerIp::acquire(&per_ip, peer.ip()) else {
            svc.metrics.bad_request("ip_limit");
            tokio::spawn(refuse(stream, IP_LIMIT));
            continue;
        };
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(stream, svc, shutdown).await;
            drop(ip_slot);
            drop(permit);
        });
    }
}

const FULL: &[u8] =
    br#"{"type":"error","code":"unavailable","message":"server full: too many clients"}"#;
const IP_LIMIT: &[u8] =
    br#"{"type":"error","code":"limit","message":"too many connections from this address"}"#;

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

async fn serve_connection(stream: TcpStream, svc: Arc<ChatService>, shutdown: CancellationToken) {
    let mut first = [0u8; 1];
    let wait = Duration::from_millis(svc.config.hello_timeout_ms);
    let peeked = tokio::select! {
        r = tokio::time::timeout(wait, stream.peek(&mut first)) => r,
        _ = shutdown.cancelled() => return,
    };
    match peeked {
        // Closed without a byte (a health probe), silent past the login timeout, or broken.
        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => {}
        Ok(Ok(_)) if first[0] == b'{' => json::serve(stream, svc, shutdown).await,
        Ok(Ok(_)) => irc::serve(stream, svc, shutdown).await,
    }
}
