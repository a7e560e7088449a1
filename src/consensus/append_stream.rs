//! Replication on one connection per peer: openraft's pipelined AppendEntries
//! (`stream_append`) over an HTTP/1.1 connection upgraded to length-prefixed frames.
//!
//! A leader sends a follower its next entries as soon as they are appended, without waiting
//! for the answer to the ones before; the follower hands them to openraft's own pipeline,
//! whose log writes share fsyncs, and answers in order. One HTTP request per AppendEntries
//! (the fallback) waits a round trip and the follower's fsync before the next may go.
//!
//! A connection outlives one openraft stream (a "session": a replication payload, or one
//! heartbeat). Every frame carries its session's number, and answers that arrive for a
//! session its leader gave up on are skipped. While no connection can be had (the peer is
//! down or paused, or has just failed one), sessions go one HTTP request at a time, hedged
//! (see `rpc_client`), and a new connection is tried a little later.
//!
//! Frames (4-byte big-endian length first): leader to follower, the session (8 bytes) and an
//! `AppendEntriesRequest`; follower to leader, the session, a kind byte (`ANSWER`: openraft's
//! `StreamAppendResult`; `STOPPED`: the follower's raft stopped, as text). Both are MessagePack
//! with field names (`rmp_serde`'s named form): like the JSON of the HTTP requests, a field
//! added later is skipped by a node that does not know it, but a chat message's text is
//! copied rather than escaped, and numbers are not printed. A node of a version that still
//! spoke the JSON frames (`raftchat-append/1`) refuses this protocol, and its peers replicate
//! to it over HTTP until it is upgraded.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, Stream, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use openraft::base::BoxStream;
use openraft::error::{NetworkError, RPCError};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::Consensus;
use super::rpc_client::{RpcClient, RpcError};
use super::types::TypeConfig;

/// The path a leader asks to upgrade, and the protocol it names.
pub const PATH: &str = "/raft/stream";
pub const PROTOCOL: &str = "raftchat-append/2";

/// Largest frame either side accepts: the raft port's largest request body.
const MAX_FRAME: usize = super::rpc_client::MAX_RPC_BODY;
/// AppendEntries sent and not yet answered, per session (openraft's follower side holds 64).
const MAX_IN_FLIGHT: usize = 64;
/// Frames queued for a connection's writer.
const WRITE_QUEUE: usize = 64;
/// A session fails when its oldest unanswered request waited this long (as one request with
/// entries may over HTTP): the connection is dropped and the next session starts afresh.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long opening a connection may take before the session goes over HTTP instead.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// After a connection could not be opened or failed, sessions use HTTP for this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A follower closes a connection that sent nothing for this long (a leader that vanished
/// behind a partition); a leader reconnects when it next has something to send.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

const ANSWER: u8 = 0;
const STOPPED: u8 = 1;

type Io = TokioIo<Upgraded>;
type Result<T, E = RPCError<TypeConfig>> = std::result::Result<T, E>;
type Answers<'s> = BoxStream<'s, Result<StreamAppendResult<TypeConfig>>>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Appends `value` to a frame being built.
fn encode_into<T: serde::Serialize>(frame: &mut BytesMut, value: &T) -> Result<(), String> {
    rmp_serde::encode::write_named(&mut frame.writer(), value).map_err(|e| e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(frame).map_err(|e| e.to_string())
}

fn network_error(reason: impl Into<String>) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(reason.into()))
}

/// Aborts a task when dropped.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_guarded<F>(task: F) -> TaskGuard
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    TaskGuard(tokio::spawn(task).abort_handle())
}

/// Writes queued frames, flushing when the queue runs dry (several frames, one write).
async fn write_frames(
    mut sink: FramedWrite<WriteHalf<Io>, LengthDelimitedCodec>,
    mut queue: mpsc::Receiver<Bytes>,
) {
    while let Some(frame) = queue.recv().await {
        if sink.feed(frame).await.is_err() {
            return;
        }
        while let Ok(frame) = queue.try_recv() {
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
            return;
        }
    }
}

/// One end of an upgraded connection: frames in, a queue of frames out.
struct Connection {
    /// Only ever used through `&mut` (`frames_in()`); the mutex makes the client `Sync`, as
    /// openraft needs, where the upgraded connection is not.
    frames_in: Mutex<FramedRead<ReadHalf<Io>, LengthDelimitedCodec>>,
    frames_out: mpsc::Sender<Bytes>,
    _writer: TaskGuard,
}

impl Connection {
    fn new(io: Upgraded) -> Connection {
        let (read, write) = tokio::io::split(TokioIo::new(io));
        let (frames_out, queue) = mpsc::channel(WRITE_QUEUE);
        Connection {
            frames_in: Mutex::new(FramedRead::new(read, codec())),
            frames_out,
            _writer: spawn_guarded(write_frames(FramedWrite::new(write, codec()), queue)),
        }
    }

    fn frames_in(&mut self) -> &mut FramedRead<ReadHalf<Io>, LengthDelimitedCodec> {
        self.frames_in.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

/// A leader's replication connection to one peer (one per openraft network client).
#[derive(Default)]
pub struct Replication {
    connection: Option<Connection>,
    next_session: u64,
    /// No new connection is tried before this (after one failed).
    retry_after: Option<Instant>,
}

impl Replication {
    /// Makes sure a connection is open; false when sessions should use HTTP for now.
    pub async fn ready(&mut self, rpc: &RpcClient, target: u64, addr: &str) -> bool {
        if self.connection.is_some() {
            return true;
        }
        if self.retry_after.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        // Set first: openraft may drop this future (a heartbeat's time ran out), and a peer
        // that does not answer (paused) must not get a new connection every heartbeat.
        self.retry_after = Some(Instant::now() + RETRY_AFTER);
        match rpc
            .upgrade(target, addr, PATH, PROTOCOL, CONNECT_TIMEOUT)
            .await
        {
            Ok(io) => {
                tracing::debug!(peer = target, "replication connection open");
                self.connection = Some(Connection::new(io));
                self.retry_after = None;
                true
            }
            Err(e) => {
                tracing::debug!(peer = target, error = %e, "no replication connection; HTTP for now");
                false
            }
        }
    }

    /// Runs one openraft stream on the open connection: requests go out as `input` yields
    /// them (at most `MAX_IN_FLIGHT` unanswered), answers come back in order. The input is
    /// polled only while openraft polls the answers, in the same task: openraft's request
    /// stream holds its replication state while it waits for logs, and must let go of it as
    /// soon as openraft drops this session.
    pub fn session<'s, S>(&'s mut self, input: S, rpc: RpcClient, target: u64) -> Answers<'s>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        self.next_session += 1;
        let state = SessionState {
            session: self.next_session,
            replication: self,
            input: Some(input),
            unanswered: VecDeque::with_capacity(MAX_IN_FLIGHT),
            rpc,
            target,
            ended: false,
        };
        Box::pin(futures_util::stream::unfold(
            state,
            |mut state| async move {
                if state.ended {
                    return None;
                }
                let item = state.next_answer().await?;
                state.ended = !matches!(item, Ok(Ok(_)));
                Some((item, state))
            },
        ))
    }
}

struct SessionState<'s, S> {
    replication: &'s mut Replication,
    session: u64,
    /// `None` once openraft has no more requests for this session.
    input: Option<S>,
    /// When each unanswered request was sent, oldest first.
    unanswered: VecDeque<Instant>,
    rpc: RpcClient,
    target: u64,
    ended: bool,
}

/// What a session waited for.
enum Step {
    Frame(Option<std::result::Result<BytesMut, std::io::Error>>),
    Request(Option<AppendEntriesRequest<TypeConfig>>),
    NoAnswerInTime,
}

impl<S> SessionState<'_, S>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    /// The session's next answer; `None` once every request was sent and answered, or when
    /// the connection closed with nothing unanswered (openraft starts the next session, on a
    /// new connection).
    async fn next_answer(&mut self) -> Option<Result<StreamAppendResult<TypeConfig>>> {
        loop {
            if self.input.is_none() && self.unanswered.is_empty() {
                return None;
            }
            let oldest = self.unanswered.front().copied();
            let may_send = self.input.is_some() && self.unanswered.len() < MAX_IN_FLIGHT;
            let connection = self.replication.connection.as_mut()?;
            // Both futures are cancel-safe: a frame half read stays in the reader's buffer,
            // a request half built stays in openraft's stream. Requests first: every commit
            // waits for a follower to write them.
            let step = tokio::select! {
                biased;
                request = next_request(&mut self.input), if may_send => Step::Request(request),
                frame = connection.frames_in().next() => Step::Frame(frame),
                _ = answer_due(oldest), if oldest.is_some() => Step::NoAnswerInTime,
            };
            match step {
                Step::Request(None) => self.input = None,
                Step::Request(Some(request)) => {
                    if let Err(reason) = self.send(&request).await {
                        return Some(Err(self.fail(reason)));
                    }
                }
                Step::NoAnswerInTime => {
                    let reason = format!("no answer within {} ms", ANSWER_TIMEOUT.as_millis());
                    return Some(Err(self.fail(reason)));
                }
                Step::Frame(Some(Ok(frame))) => {
                    if let Some(item) = self.answer(frame) {
                        return Some(item);
                    }
                }
                Step::Frame(other) => {
                    if self.unanswered.is_empty() {
                        self.replication.connection = None;
                        return None;
                    }
                    let reason = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "the connection closed".to_string(),
                    };
                    return Some(Err(self.fail(reason)));
                }
            }
        }
    }

    /// Queues one request for the connection's writer.
    async fn send(&mut self, request: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
        let mut frame = BytesMut::with_capacity(256);
        frame.put_u64(self.session);
        encode_into(&mut frame, request)
            .map_err(|e| format!("an AppendEntries could not be encoded: {e}"))?;
        let Some(connection) = self.replication.connection.as_ref() else {
            return Err("the connection closed".into());
        };
        self.unanswered.push_back(Instant::now());
        // The queue is full only while the follower reads nothing: wait as long as an answer
        // may take.
        let queued =
            tokio::time::timeout(ANSWER_TIMEOUT, connection.frames_out.send(frame.freeze()));
        match queued.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the connection's writer stopped".into()),
            Err(_) => Err(format!(
                "could not send for {} ms",
                ANSWER_TIMEOUT.as_millis()
            )),
        }
    }

    /// The item an answer frame stands for; `None` for an answer to a session given up on.
    fn answer(&mut self, frame: BytesMut) -> Option<Result<StreamAppendResult<TypeConfig>>> {
        let mut frame = frame.freeze();
        if frame.len() < 9 {
            return Some(Err(self.fail("a frame too short".into())));
        }
        if frame.get_u64() != self.session {
            return None;
        }
        let kind = frame.get_u8();
        let took = self
            .unanswered
            .pop_front()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let item = match kind {
            ANSWER => decode::<StreamAppendResult<TypeConfig>>(&frame)
                .map_err(|e| self.fail(format!("bad answer: {e}"))),
            _ => Err(network_error(format!(
                "remote: {}",
                String::from_utf8_lossy(&frame)
            ))),
        };
        let outcome: Result<(), RpcError> = match &item {
            Ok(_) => Ok(()),
            Err(e) => Err(RpcError::Network {
                addr: format!("node {}", self.target),
                reason: e.to_string(),
            }),
        };
        self.rpc
            .observe_answer("append", self.target, took, &outcome);
        Some(item)
    }

    /// Drops the connection after a failure; sessions go over HTTP for a while.
    fn fail(&mut self, reason: String) -> RPCError<TypeConfig> {
        self.replication.connection = None;
        self.replication.retry_after = Some(Instant::now() + RETRY_AFTER);
        let reason = format!("replication connection: {reason}");
        let error = RpcError::Network {
            addr: format!("node {}", self.target),
            reason: reason.clone(),
        };
        self.rpc
            .observe_answer("append", self.target, Duration::ZERO, &Err::<(), _>(error));
        network_error(reason)
    }
}

/// The session's next request; never ready once its input ended.
async fn next_request<S>(input: &mut Option<S>) -> Option<AppendEntriesRequest<TypeConfig>>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    match input {
        Some(input) => input.next().await,
        None => std::future::pending().await,
    }
}

/// Ready when the oldest unanswered request, sent at `oldest`, has waited too long.
async fn answer_due(oldest: Option<Instant>) {
    match oldest {
        Some(sent) => tokio::time::sleep(ANSWER_TIMEOUT.saturating_sub(sent.elapsed())).await,
        None => std::future::pending().await,
    }
}

/// A follower's end of one replication connection: each session's requests go to openraft's
/// pipeline (`Raft::stream_append`), its answers back in order.
pub async fn serve(consensus: Arc<Consensus>, io: Upgraded) {
    let mut connection = Connection::new(io);
    let _counted = Counted::new(consensus.replication_connections.clone());
    // The session being served: its number, its requests' queue, the task sending answers.
    let mut current: Option<(
        u64,
        mpsc::Sender<AppendEntriesRequest<TypeConfig>>,
        TaskGuard,
    )> = None;
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, connection.frames_in().next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "replication connection ended");
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let mut frame = frame.freeze();
        if frame.len() < 8 {
            tracing::warn!("a replication frame too short; closing the connection");
            return;
        }
        let session = frame.get_u64();
        let request: AppendEntriesRequest<TypeConfig> = match decode(&frame) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(error = %e, "a bad AppendEntries; closing the connection");
                return;
            }
        };
        let requests = match &current {
            Some((s, requests, _)) if *s == session => requests.clone(),
            _ => {
                // A new session: the one before (if any) is given up on by its leader.
                let (requests, queue) = mpsc::channel(MAX_IN_FLIGHT);
                let input = futures_util::stream::unfold(queue, |mut queue| async move {
                    queue.recv().await.map(|r| (r, queue))
                });
                let answers = consensus.raft.stream_append(input);
                let leader = request.vote.leader_id.node_id;
                let sender = spawn_guarded(send_answers(
                    consensus.clone(),
                    session,
                    leader,
                    answers,
                    connection.frames_out.clone(),
                ));
                current = Some((session, requests.clone(), sender));
                requests
            }
        };
        // Fails once the session's pipeline ended (after a conflict): its leader starts anew.
        let _ = requests.send(request).await;
    }
}

/// Counts a served connection while it lives.
struct Counted(super::ConnectionObserver);

impl Counted {
    fn new(observer: super::ConnectionObserver) -> Counted {
        observer(1);
        Counted(observer)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.0)(-1);
    }
}

async fn send_answers<A>(
    consensus: Arc<Consensus>,
    session: u64,
    leader: u64,
    answers: A,
    frames_out: mpsc::Sender<Bytes>,
) where
    A: Stream<
        Item = std::result::Result<
            StreamAppendResult<TypeConfig>,
            openraft::error::Fatal<TypeConfig>,
        >,
    >,
{
    let mut answers = pin!(answers);
    while let Some(answer) = answers.next().await {
        let mut frame = BytesMut::with_capacity(64);
        frame.put_u64(session);
        let last = match &answer {
            Ok(result) => {
                if result.is_ok() {
                    consensus.note_contact(leader);
                }
                frame.put_u8(ANSWER);
                if let Err(e) = encode_into(&mut frame, result) {
                    tracing::error!(error = %e, "an AppendEntries answer could not be encoded");
                    return;
                }
                result.is_err()
            }
            Err(fatal) => {
                frame.put_u8(STOPPED);
                frame.put_slice(fatal.to_string().as_bytes());
                true
            }
        };
        if frames_out.send(frame.freeze()).await.is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
#[path = "append_stream_tests.rs"]
mod tests;
