//! One JSON-dialect connection, split into a reading and a writing
//! half so that sends can be pipelined while acks and messages stream in.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
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

/// A busy room's frames arrive a server batch at a time (tens of kilobytes): read them in
/// few calls rather than 8 KiB at a time.
const READ_BUFFER: usize = 32 * 1024;

pub struct FrameReader {
    addr: String,
    reader: BufReader<OwnedReadHalf>,
    /// The line being read, reused from frame to frame.
    line: Vec<u8>,
}

/// A frame as the client reads it: the two kinds that stream at a high rate (pushed messages
/// and acks) decoded straight into their fields, anything else as a JSON value.
pub enum Frame {
    Message(super::Message),
    Ack { id: String, index: u64 },
    Other(Value),
}

/// The fields of a `message` or `ack` frame; others are skipped.
#[derive(Deserialize)]
struct Streamed<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    index: Option<u64>,
    // Borrowed from the line unless escaped: each is copied once, into its owned field.
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ts: Option<Cow<'a, str>>,
}

fn owned(field: Option<Cow<'_, str>>) -> String {
    field.map(Cow::into_owned).unwrap_or_default()
}

/// A `send` frame, written without building a JSON value first.
#[derive(Serialize)]
pub struct SendFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub to: &'a str,
    pub id: &'a str,
    pub text: &'a str,
}

pub struct FrameWriter {
    addr: String,
    writer: BufWriter<OwnedWriteHalf>,
}

impl FrameReader {
    /// Reads until `line` holds a line that is not blank; `Ok(false)` when the server closed
    /// the connection. Cancel-safe: a read cut short (the caller's `select!` took another
    /// branch) leaves its part in `line`, and the next call reads on from there. Whoever
    /// consumes the line clears it.
    async fn next_line(&mut self) -> Result<bool, ClientError> {
        loop {
            // `read_until` appends to `line` as it reads (`read_line` does not keep a part
            // read before a cancel).
            let read = self
                .reader
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|source| ClientError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            if self.line.iter().all(u8::is_ascii_whitespace) {
                self.line.clear();
                if read == 0 {
                    return Ok(false);
                }
                continue;
            }
            return Ok(true);
        }
    }

    fn invalid(&self, e: serde_json::Error) -> ClientError {
        ClientError::Io {
            addr: self.addr.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }

    /// Whether a whole frame was already read from the socket: `next_frame` then returns
    /// it without waiting.
    pub fn frame_buffered(&self) -> bool {
        // As `next_line` reads: the part already in `line`, then whole lines, blank ones
        // skipped.
        let mut blank_so_far = self.line.iter().all(u8::is_ascii_whitespace);
        let mut rest = self.reader.buffer();
        while let Some(end) = memchr::memchr(b'\n', rest) {
            if !blank_so_far || !rest[..end].iter().all(u8::is_ascii_whitespace) {
                return true;
            }
            rest = &rest[end + 1..];
            blank_so_far = true;
        }
        false
    }

    /// The next frame, messages and acks decoded without a JSON value; `Ok(None)` when the
    /// server closed the connection.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        if !self.next_line().await? {
            return Ok(None);
        }
        let frame = self.decode();
        self.line.clear();
        frame.map(Some)
    }

    /// The frame in `line`.
    fn decode(&self) -> Result<Frame, ClientError> {
        if let Ok(frame) = serde_json::from_slice::<Streamed<'_>>(&self.line) {
            match frame.kind.as_ref() {
                "message" => {
                    return Ok(Frame::Message(super::Message {
                        index: frame.index.unwrap_or(0),
                        to: owned(frame.to),
                        from: owned(frame.from),
                        id: owned(frame.id),
                        text: owned(frame.text),
                        ts: owned(frame.ts),
                    }));
                }
                "ack" => {
                    return Ok(Frame::Ack {
                        id: owned(frame.id),
                        index: frame.index.unwrap_or(0),
                    });
                }
                _ => {}
            }
        }
        serde_json::from_slice(&self.line)
            .map(Frame::Other)
            .map_err(|e| self.invalid(e))
    }

    /// Skips pushed frames until a reply of type `want` (or an error frame) arrives.
    pub async fn reply(&mut self, want: &str, timeout: Duration) -> Result<Value, ClientError> {
        let wait = async {
            loop {
                let Some(frame) = self.next_frame().await? else {
                    return Err(ClientError::Closed {
                        addr: self.addr.clone(),
                    });
                };
                // Messages and acks are never the reply waited for.
                let Frame::Other(frame) = frame else { continue };
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
    pub async fn feed(&mut self, frame: &impl Serialize) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(frame).map_err(|e| ClientError::Io {
            addr: self.addr.clone(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
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

    pub async fn send(&mut self, frame: &impl Serialize) -> Result<(), ClientError> {
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
            reader: BufReader::with_capacity(READ_BUFFER, read),
            line: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn streamed_frames_are_decoded_directly_and_others_as_json() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let lines = concat!(
                r##"{"type":"message","index":7,"to":"#r","from":"a","id":"1","text":"say \"hi\"\n","ts":"t"}"##,
                "\n\n",
                r#"{"type":"ack","id":"1","index":7}"#,
                "\n",
                r#"{"type":"welcome","session":"s","nodes":[{"id":1}]}"#,
                "\n",
                r#"{"type":"message","index":"not a number"}"#,
                "\n",
            );
            stream.write_all(lines.as_bytes()).await.unwrap();
        });
        let (mut reader, _writer) = connect(&addr).await.unwrap();
        match reader.next_frame().await.unwrap() {
            Some(Frame::Message(m)) => {
                assert_eq!(
                    (m.index, m.text.as_str(), m.to.as_str()),
                    (7, "say \"hi\"\n", "#r")
                )
            }
            _ => panic!("a message"),
        }
        assert!(matches!(
            reader.next_frame().await.unwrap(),
            Some(Frame::Ack { ref id, index: 7 }) if id == "1"
        ));
        match reader.next_frame().await.unwrap() {
            Some(Frame::Other(v)) => assert_eq!(v["session"], "s"),
            _ => panic!("a welcome as JSON"),
        }
        // Not the shape of a message: handed on as JSON, as before.
        match reader.next_frame().await.unwrap() {
            Some(Frame::Other(v)) => assert_eq!(v["index"], "not a number"),
            _ => panic!("JSON"),
        }
        assert!(reader.next_frame().await.unwrap().is_none());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_frame_counts_as_buffered_only_when_a_whole_line_of_it_is_in() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (written, all_in) = tokio::sync::oneshot::channel::<()>();
        let (go_on, rest_wanted) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let first = concat!(
                r#"{"type":"ack","id":"1","index":1}"#,
                "\n",
                r#"{"type":"ack","id":"2","index":2}"#,
                "\n  \n",
                r#"{"type":"ack","id":"3""#,
            );
            stream.write_all(first.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            written.send(()).unwrap();
            let _ = rest_wanted.await;
            stream.write_all(b",\"index\":3}\n").await.unwrap();
        });
        let (mut reader, _writer) = connect(&addr).await.unwrap();
        all_in.await.unwrap();
        let ack = |f: Option<Frame>| match f {
            Some(Frame::Ack { index, .. }) => index,
            _ => panic!("an ack"),
        };
        assert!(!reader.frame_buffered(), "nothing read yet");
        assert_eq!(ack(reader.next_frame().await.unwrap()), 1);
        assert!(reader.frame_buffered(), "the second ack is in");
        assert_eq!(ack(reader.next_frame().await.unwrap()), 2);
        // A blank line and half a frame: reading on would wait for the socket.
        assert!(!reader.frame_buffered());
        go_on.send(()).unwrap();
        assert_eq!(ack(reader.next_frame().await.unwrap()), 3);
        assert!(!reader.frame_buffered());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_read_cancelled_mid_line_loses_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (half_sent, half_read) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(br#"{"type":"ack","id":"4"#).await.unwrap();
            stream.flush().await.unwrap();
            let _ = half_read.await;
            stream.write_all(b"2\",\"index\":9}\n").await.unwrap();
        });
        let (mut reader, _writer) = connect(&addr).await.unwrap();
        // The caller gives up while half the line is in: as a `select!` does.
        let cut = tokio::time::timeout(Duration::from_millis(200), reader.next_frame()).await;
        assert!(cut.is_err(), "no whole line yet");
        half_sent.send(()).unwrap();
        assert!(matches!(
            reader.next_frame().await.unwrap(),
            Some(Frame::Ack { ref id, index: 9 }) if id == "42"
        ));
        server.await.unwrap();
    }
}
