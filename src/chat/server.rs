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
    loop {
        let (stream, _) = tokio::select! {
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
            tokio::spawn(refuse(stream));
            continue;
        };
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(stream, svc, shutdown).await;
            drop(permit);
        });
    }
}

async fn refuse(mut stream: TcpStream) {
    let line =
        br#"{"type":"error","code":"unavailable","message":"server full: too many clients"}"#;
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
