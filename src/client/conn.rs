//! One JSON-dialect connection, split into a reading and a writing
//! half so that sends can be pipelined while acks and messages stream in.

use std::io;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter, Lines};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("{addr} closed the connection")]
    Closed { addr: String },
    #[error("{addr} refused: {frame}")]
    Refused { addr: String, frame: Value },
    #[error("{addr} did not answer within {0:?}", .timeout)]
    Timeout { addr: String, timeout: Duration },
}

pub struct FrameReader {
    addr: String,
    lines: Lines<BufReader<OwnedReadHalf>>,
}

pub struct FrameWriter {
    addr: String,
    writer: BufWriter<OwnedWriteHalf>,
}

impl FrameReader {
    /// The next frame; `Ok(None)` when the server closed the connection.
    pub async fn next(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .map_err(|source| ClientError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            let Some(line) = line else { return Ok(None) };
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| ClientError::Io {
                    addr: self.addr.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                });
        }
    }

    /// Skips pushed frames until a reply of type `want` (or an error frame) arrives.
    pub async fn reply(&mut self, want: &str, timeout: Duration) -> Result<Value, ClientError> {
        let wait = async {
            loop {
                let Some(frame) = self.next().await? else {
                    return Err(ClientError::Closed {
                        addr: self.addr.clone(),
                    });
                };
                match frame["type"].as_str() {
                    Some(t) if t == want => return Ok(frame),
                    Some("error") => {
                        return Err(ClientError::Refused {
                            addr: self.addr.clone(),
                            frame,
                        });
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout {
                addr: self.addr.clone(),
                timeout,
            })?
    }
}

impl FrameWriter {
    /// Queues a frame; `flush` sends what is queued.
    pub async fn feed(&mut self, frame: &Value) -> Result<(), ClientError> {
        let mut line = frame.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| ClientError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.writer.flush().await.map_err(|source| ClientError::Io {
            addr: self.addr.clone(),
            source,
        })
    }

    pub async fn send(&mut self, frame: &Value) -> Result<(), ClientError> {
        self.feed(frame).await?;
        self.flush().await
    }
}

/// Connects to `addr` and returns the two halves.
pub async fn connect(addr: &str) -> Result<(FrameReader, FrameWriter), ClientError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Io {
            addr: addr.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    Ok((
        FrameReader {
            addr: addr.to_string(),
            lines: BufReader::new(read).lines(),
        },
        FrameWriter {
            addr: addr.to_string(),
            writer: BufWriter::new(write),
        },
    ))
}

/// Connects, says hello as `user` and joins `room`; returns the halves and the welcome.
pub async fn login(
    addr: &str,
    user: &str,
    room: &str,
    timeout: Duration,
) -> Result<(FrameReader, FrameWriter, Value), ClientError> {
    let (mut reader, mut writer) = connect(addr).await?;
    writer.send(&json!({"type": "hello", "user": user})).await?;
    let welcome = reader.reply("welcome", timeout).await?;
    writer.send(&json!({"type": "join", "room": room})).await?;
    reader.reply("joined", timeout).await?;
    Ok((reader, writer, welcome))
}
