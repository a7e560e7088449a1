//! Plumbing both dialects share: the outbound frame queue, why a connection closed, and the
//! task that writes frames to the socket.

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What goes to the socket writer.
pub enum Outbound {
    Frame(Bytes),
    /// Write this error, then close.
    Fatal(Bytes),
}

/// Why a connection ended; the first reason recorded wins.
#[derive(Default)]
pub struct CloseReason(std::sync::OnceLock<&'static str>);

impl CloseReason {
    pub fn set(&self, reason: &'static str) {
        let _ = self.0.set(reason);
    }

    pub fn get(&self) -> &'static str {
        self.0.get().copied().unwrap_or("closed")
    }
}

/// Writes queued frames, flushing when the queue runs dry; stops after a `Fatal` frame or
/// when `closed` fires (after draining what is queued).
pub async fn write_loop(
    write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outbound>,
    closed: CancellationToken,
) {
    let mut writer = BufWriter::new(write);
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = closed.cancelled() => {
                // Drain what is already queued (the last acks or an error), then stop.
                rx.try_recv().ok()
            }
        };
        let Some(item) = item else { break };
        let (bytes, last) = match item {
            Outbound::Frame(b) => (b, false),
            Outbound::Fatal(b) => (b, true),
        };
        if writer.write_all(&bytes).await.is_err() {
            break;
        }
        if (last || rx.is_empty()) && writer.flush().await.is_err() {
            break;
        }
        if last {
            closed.cancel();
            break;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}
