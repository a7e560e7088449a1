//! Plumbing both dialects share: connection accounting, the outbound frame queue, why a
//! connection closed, the task that writes frames to the socket, and the delivery of applied
//! events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::command::{MessageEvent, StoredMessage};
use super::delivery::{Delivery, DeliveryFilter};
use super::service::ChatService;

/// A connection's read side, plain or TLS.
pub type ChatRead = Box<dyn AsyncRead + Send + Unpin>;
/// A connection's write side, plain or TLS.
pub type ChatWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// An accepted chat connection whose first bytes are buffered in `reader` (the dialect was
/// picked from them).
pub struct ChatIo {
    pub reader: BufReader<ChatRead>,
    pub writer: ChatWrite,
    /// The client's address, for limits and spans.
    pub peer: String,
}

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

/// The frames queued for one connection's socket, bounded in bytes: a client that does not
/// read what it is sent costs at most `chat.max_output_bytes` (one frame larger than that
/// still goes out to a client that reads), then it is told `slow` and disconnected.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outbound>,
    shared: Arc<OutboxShared>,
}

struct OutboxShared {
    queued: AtomicUsize,
    /// Bytes queued across the node's connections (`raftchat_client_output_bytes`).
    node_queued: prometheus::IntGauge,
    max_bytes: usize,
    slow: AtomicBool,
    closed: CancellationToken,
    reason: Arc<CloseReason>,
}

impl OutboxShared {
    fn dequeued(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
        self.node_queued.sub(len as i64);
    }

    fn too_slow(&self) {
        self.reason.set("slow");
        if !self.slow.swap(true, Ordering::SeqCst) {
            tracing::info!(
                queued_bytes = self.queued.load(Ordering::SeqCst),
                "a client does not read what it is sent: telling it `slow` and disconnecting"
            );
        }
        self.closed.cancel();
    }
}

/// The connection is closing: nothing more is written.
#[derive(Debug)]
pub struct Closed;

impl Outbox {
    pub async fn send(&self, item: Outbound) -> Result<(), Closed> {
        if let Outbound::Frame(frame) = &item {
            let len = frame.len();
            let before = self.shared.queued.fetch_add(len, Ordering::Relaxed);
            if before > 0 && before + len > self.shared.max_bytes {
                self.shared.queued.fetch_sub(len, Ordering::Relaxed);
                self.shared.too_slow();
                return Err(Closed);
            }
            self.shared.node_queued.add(len as i64);
            if self.tx.send(item).await.is_err() {
                self.shared.dequeued(len);
                return Err(Closed);
            }
            return Ok(());
        }
        self.tx.send(item).await.map_err(|_| Closed)
    }
}

/// Queued frames are written once this many bytes have gathered (or the queue runs dry).
const WRITE_BATCH_BYTES: usize = 16 * 1024;

/// How long the last words to a connection that is closing normally may take.
const FAREWELL: Duration = Duration::from_millis(500);
/// How long a client cut off as `slow` has to read what its socket holds and the reason.
const SLOW_FAREWELL: Duration = Duration::from_secs(30);

/// Writes queued frames, flushing when the queue runs dry; stops after a `Fatal` frame, when
/// `closed` fires (after draining what is queued), or when the socket accepts nothing for
/// `write_timeout` (a `slow` client).
async fn write_loop(
    write: ChatWrite,
    mut rx: mpsc::Receiver<Outbound>,
    shared: Arc<OutboxShared>,
    write_timeout: Duration,
    slow_frame: Bytes,
) {
    let mut writer = write;
    // Frames that queued up behind each other go out in one write; the buffer exists only
    // while they do (an idle connection holds none). `pending[written..]` is what the socket
    // has not taken yet: a write cut short by the stall timer leaves the stream whole.
    let mut pending: Vec<u8> = Vec::new();
    let mut written = 0usize;
    let closed = shared.closed.clone();
    let stall = tokio::time::sleep(write_timeout);
    tokio::pin!(stall);
    loop {
        // A slow client's queue is dropped, not written.
        if shared.slow.load(Ordering::SeqCst) {
            break;
        }
        // What is queued goes first, also once the connection is closing (the last acks or
        // an error); the cancellation, behind a lock, is looked at only when the queue is dry.
        let item = match rx.try_recv() {
            Ok(item) => Some(item),
            Err(_) => tokio::select! {
                item = rx.recv() => item,
                _ = closed.cancelled() => rx.try_recv().ok(),
            },
        };
        let Some(item) = item else { break };
        let (bytes, last) = match item {
            Outbound::Frame(b) => (b, false),
            Outbound::Fatal(b) => (b, true),
        };
        let flush = last || rx.is_empty();
        // One timer for the whole connection, moved on at most once per timeout (a new timer
        // per frame costs more than the write): a write stuck for between one and two
        // `write_timeout`s ends the connection.
        let now = tokio::time::Instant::now();
        if stall.deadline() < now + write_timeout {
            stall.as_mut().reset(now + 2 * write_timeout);
        }
        pending.extend_from_slice(&bytes);
        let write = async {
            if !flush && pending.len() < WRITE_BATCH_BYTES {
                return Ok(());
            }
            while written < pending.len() {
                match writer.write(&pending[written..]).await? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    n => written += n,
                }
            }
            pending = Vec::new();
            written = 0;
            if flush {
                writer.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let wrote = tokio::select! {
            biased;
            wrote = write => Some(wrote),
            _ = &mut stall => None,
        };
        if !last {
            shared.dequeued(bytes.len());
        }
        match wrote {
            Some(Ok(())) => {}
            Some(Err(_)) => break,
            None => {
                shared.too_slow();
                break;
            }
        }
        if last {
            closed.cancel();
            break;
        }
    }
    // A socket that accepts nothing must not hold this task for long: the last words are
    // best effort. A slow client may still come back and read what its socket holds, so it
    // gets longer to take `slow` (what is queued is dropped first; the socket is kept).
    let slow = shared.slow.load(Ordering::SeqCst);
    // What is still queued is dropped: it no longer counts as queued output.
    rx.close();
    while let Ok(item) = rx.try_recv() {
        if let Outbound::Frame(b) = item {
            shared.dequeued(b.len());
        }
    }
    drop(rx);
    let farewell = if slow { SLOW_FAREWELL } else { FAREWELL };
    let _ = tokio::time::timeout(farewell, async {
        // The rest of what was being written: a frame cut in half would garble the next one.
        writer.write_all(&pending[written..]).await?;
        if slow {
            writer.write_all(&slow_frame).await?;
        }
        writer.flush().await?;
        writer.shutdown().await
    })
    .await;
}

/// Counts a connection in the `dialect` metrics around `serve`, which reports why it closed.
pub async fn counted<F, Fut>(svc: &ChatService, dialect: &'static str, serve: F)
where
    F: FnOnce(Arc<CloseReason>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let metrics = &svc.metrics;
    metrics.client_connects.with_label_values(&[dialect]).inc();
    let live = metrics.client_connections.with_label_values(&[dialect]);
    live.inc();
    let reason = Arc::new(CloseReason::default());
    serve(reason.clone()).await;
    live.dec();
    metrics
        .client_disconnects
        .with_label_values(&[dialect, reason.get()])
        .inc();
}

/// How a dialect writes what the delivery loop sends.
pub trait Render: Send + 'static {
    /// A live message; `None` skips it (an IRC client's own line without echo-message).
    fn message(&self, m: &MessageEvent) -> Option<Bytes>;
    /// A message caught up from the history after a snapshot.
    fn stored(&self, m: &StoredMessage) -> Option<Bytes>;
    fn presence(&self, room: &str, user: &str, joined: bool) -> Bytes;
    /// The last frame before closing: the client fell behind.
    fn too_slow(&self, behind: u64) -> Bytes;
    /// The last frame before closing: the session moved or ended.
    fn replaced(&self, why: &str) -> Bytes;
    /// The last frame before closing: this node cannot serve the connection now.
    fn unavailable(&self, why: &str) -> Bytes;
}

/// One connection's view of the cluster after login.
pub struct Follow {
    pub session: String,
    pub user: String,
    pub filter: DeliveryFilter,
    pub events: super::fanout::Receiver,
}

/// Frames of events that were already queued go to the writer as one item, up to this size:
/// a burst of events costs a connection one wake-up of its writer and one write, not one each.
const DELIVER_BATCH_BYTES: usize = 64 * 1024;

/// Frames gathered for one hand-off to the writer; a lone frame is passed on uncopied.
#[derive(Default)]
struct FrameBatch {
    first: Option<Bytes>,
    more: Option<bytes::BytesMut>,
}

impl FrameBatch {
    fn push(&mut self, frame: Bytes) {
        match (&mut self.first, &mut self.more) {
            (None, _) => self.first = Some(frame),
            (Some(_), Some(more)) => more.extend_from_slice(&frame),
            (Some(first), more @ None) => {
                let mut joined = bytes::BytesMut::with_capacity(first.len() + frame.len() * 4);
                joined.extend_from_slice(first);
                joined.extend_from_slice(&frame);
                *more = Some(joined);
            }
        }
    }

    fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(more)) => more.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        let first = self.first.take();
        match self.more.take() {
            Some(more) => Some(more.freeze()),
            None => first,
        }
    }

    /// Hands what was gathered to the writer; false once the connection is gone.
    async fn flush(&mut self, out: &Outbox) -> bool {
        match self.take() {
            Some(frames) => out.send(Outbound::Frame(frames)).await.is_ok(),
            None => true,
        }
    }
}

/// What a connection does after one event.
enum Next {
    Continue,
    Stop,
}

/// Pushes a connection's applied events, in index order, as `render` writes them. Events
/// already queued behind the one that woke it go out together. A client that falls further
/// behind than the event queue is disconnected; it can resume.
pub async fn deliver<R: Render>(
    svc: Arc<ChatService>,
    mut follow: Follow,
    render: R,
    out: Outbox,
    closed: CancellationToken,
    reason: Arc<CloseReason>,
) {
    let mut batch = FrameBatch::default();
    loop {
        let event = tokio::select! {
            e = follow.events.recv() => e,
            _ = closed.cancelled() => return,
        };
        let event = match event {
            Ok(e) => e,
            Err(super::fanout::Ended::Lagged(n)) => {
                reason.set("slow");
                let _ = out.send(Outbound::Fatal(render.too_slow(n))).await;
                return;
            }
            Err(super::fanout::Ended::Closed) => return,
        };
        let mut delivered = 0;
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let step = on_event(
                &svc,
                &mut follow,
                &render,
                &out,
                &reason,
                &event,
                &mut batch,
                &mut delivered,
            )
            .await;
            if matches!(step, Next::Stop) {
                return;
            }
            if batch.len() < DELIVER_BATCH_BYTES {
                // What ended the queue, if anything, the next `recv` reports.
                next = follow.events.try_recv();
            }
        }
        svc.metrics.messages_delivered.inc_by(delivered);
        if !batch.flush(&out).await {
            return;
        }
    }
}

/// Renders one event into `batch`, or acts on it (closing, replaying after a snapshot).
#[allow(clippy::too_many_arguments)]
async fn on_event<R: Render>(
    svc: &ChatService,
    follow: &mut Follow,
    render: &R,
    out: &Outbox,
    reason: &CloseReason,
    event: &super::command::Event,
    batch: &mut FrameBatch,
    delivered: &mut u64,
) -> Next {
    match follow.filter.on_event(event) {
        None => {}
        Some(Delivery::Message(m)) => {
            if let Some(frame) = render.message(&m) {
                *delivered += 1;
                batch.push(frame);
            }
        }
        Some(Delivery::Presence { room, user, joined }) => {
            batch.push(render.presence(&room, &user, joined));
        }
        Some(Delivery::Close(why)) => {
            reason.set("replaced");
            let _ = batch.flush(out).await;
            let _ = out.send(Outbound::Fatal(render.replaced(why))).await;
            return Next::Stop;
        }
        Some(Delivery::Resync { upto }) => {
            if !batch.flush(out).await {
                return Next::Stop;
            }
            // A snapshot from the leader replaced the state. Without the history it
            // skipped this node cannot replay what the client missed: send it elsewhere.
            if svc.store.gap().is_some() {
                reason.set("catching_up");
                let why = "this node is copying history from its peers; resume on another node";
                let _ = out.send(Outbound::Fatal(render.unavailable(why))).await;
                return Next::Stop;
            }
            let rooms: Vec<String> = svc
                .store
                .state()
                .session(&follow.session)
                .map(|s| s.rooms.iter().cloned().collect())
                .unwrap_or_default();
            follow.filter.set_rooms(rooms);
            let after = follow.filter.last();
            // Boxed: the replay's state exists only while it runs, not in every idle task.
            let replayed = Box::pin(replay(svc, &follow.session, after, upto, render, out));
            if let Err(e) = replayed.await {
                tracing::warn!(error = %e, "resync after snapshot failed");
                reason.set("error");
                let why = format!("cannot replay after a snapshot: {e}");
                let _ = out.send(Outbound::Fatal(render.unavailable(&why))).await;
                return Next::Stop;
            }
            follow.filter.advance(upto);
        }
    }
    Next::Continue
}

/// Sends what `session` missed in (`after`, `upto`] from the history, page by page, so a
/// long replay never sits in memory. Returns how many messages were sent.
pub async fn replay<R: Render>(
    svc: &ChatService,
    session: &str,
    after: u64,
    upto: u64,
    render: &R,
    out: &Outbox,
) -> Result<u64, super::service::ChatError> {
    let plan = svc.replay(session, after, upto).await?;
    replay_planned(svc, &plan, render, out).await
}

/// Sends a replay decided earlier (see `ChatService::replay`).
pub async fn replay_planned<R: Render>(
    svc: &ChatService,
    plan: &super::service::Replay,
    render: &R,
    out: &Outbox,
) -> Result<u64, super::service::ChatError> {
    let mut cursor = plan.after;
    let mut sent = 0;
    loop {
        let page = svc.replay_page(plan, cursor).await?;
        let Some(last) = page.last() else {
            return Ok(sent);
        };
        cursor = last.index;
        for frame in page.iter().filter_map(|m| render.stored(m)) {
            svc.metrics.messages_delivered.inc();
            sent += 1;
            if out.send(Outbound::Frame(frame)).await.is_err() {
                return Ok(sent);
            }
        }
    }
}

/// A connection's socket halves: lines come in through `reader`, frames go out through `out`
/// to a writer task; `closed` stops everything.
pub struct Wire {
    pub reader: BufReader<ChatRead>,
    pub out: Outbox,
    pub closed: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
}

/// A connection's queue of messages and the task replicating them in order.
pub struct SendPipeline {
    pub queue: mpsc::Sender<super::service::Outgoing>,
    pub task: tokio::task::JoinHandle<()>,
}

/// A connection's message pipeline, started by its first message: an idle connection holds
/// neither the queue nor the task.
pub struct Sends {
    started: Option<SendPipeline>,
    start: Option<Box<dyn FnOnce() -> SendPipeline + Send + Sync>>,
}

impl Sends {
    pub fn new(start: impl FnOnce() -> SendPipeline + Send + Sync + 'static) -> Sends {
        Sends {
            started: None,
            start: Some(Box::new(start)),
        }
    }

    /// The queue to the pipeline, starting it if this is the first message.
    pub fn queue(&mut self) -> Option<&mpsc::Sender<super::service::Outgoing>> {
        if self.started.is_none()
            && let Some(start) = self.start.take()
        {
            self.started = Some(start());
        }
        self.started.as_ref().map(|p| &p.queue)
    }

    /// The running pipeline, if a message ever started it.
    pub fn into_pipeline(self) -> Option<SendPipeline> {
        self.started
    }
}

/// Queue depth between a connection and its socket writer.
const OUT_QUEUE: usize = 1024;

impl Wire {
    /// `slow_frame` is what a client that stops reading is told (the dialect's words).
    pub fn open(
        io: ChatIo,
        shutdown: &CancellationToken,
        svc: &ChatService,
        slow_frame: Bytes,
        reason: Arc<CloseReason>,
    ) -> Wire {
        let config = &svc.config;
        let ChatIo {
            reader,
            writer: write,
            ..
        } = io;
        let (tx, rx) = mpsc::channel::<Outbound>(OUT_QUEUE);
        let closed = shutdown.child_token();
        let shared = Arc::new(OutboxShared {
            queued: AtomicUsize::new(0),
            node_queued: svc.metrics.client_output_bytes.clone(),
            max_bytes: config.max_output_bytes,
            slow: AtomicBool::new(false),
            closed: closed.clone(),
            reason,
        });
        let writer = tokio::spawn(write_loop(
            write,
            rx,
            shared.clone(),
            Duration::from_millis(config.write_timeout_ms),
            slow_frame,
        ));
        Wire {
            reader,
            out: Outbox { tx, shared },
            closed,
            writer,
        }
    }

    /// Tears the connection down: the session's queued messages are still replicated (their
    /// fate matters to a client that resumes), the session is released, and what is queued
    /// for the socket is written.
    pub async fn finish(
        self,
        svc: &Arc<ChatService>,
        sends: Option<SendPipeline>,
        attached: Option<&super::service::Attached>,
    ) {
        self.closed.cancel();
        if let Some(pipeline) = sends {
            drop(pipeline.queue);
            let _ = pipeline.task.await;
        }
        if let Some(attached) = attached {
            svc.unregister(attached);
        }
        drop(self.out);
        let _ = self.writer.await;
        // Closing with unread input makes the kernel reset the connection, and a reset can
        // discard what the client has not read yet (its last error line): read and discard
        // for a moment, until the client closes its side.
        let mut reader = self.reader;
        let _ = tokio::time::timeout(
            FAREWELL,
            tokio::io::copy(&mut reader, &mut tokio::io::sink()),
        )
        .await;
    }
}

/// Counts a resumed session as a reconnect and opens its `chat.client.reconnect` span (the
/// session's public id identifies it: the token is a secret and never leaves the node).
pub fn reconnect_span(
    svc: &ChatService,
    dialect: &'static str,
    peer: &str,
    session_id: u64,
    replayed: u64,
) -> tracing::Span {
    svc.metrics
        .client_reconnects
        .with_label_values(&[dialect])
        .inc();
    tracing::info_span!(
        "chat.client.reconnect",
        otel.kind = "server",
        network.peer.address = %peer,
        dialect,
        session = session_id,
        node = svc.node_id,
        replayed,
        deduplicated = 0u64,
    )
}

/// The per-connection rate limiter from the chat config.
pub fn rate_limiter(config: &crate::config::ChatConfig) -> super::lines::RateLimiter {
    super::lines::RateLimiter::new(
        config.rate_limit_per_sec,
        config.rate_limit_burst,
        std::time::Duration::from_millis(config.rate_limit_grace_ms),
    )
}

/// Closes a logged-in connection that sent nothing for `chat.idle_timeout_secs` (0: never);
/// any line (a `ping`, an IRC `PONG`) counts as activity. One timer per connection, moved on
/// at most once a second.
/// About 30 years: "never" for a timer.
const FAR_SECS: u64 = 30 * 365 * 24 * 3600;

pub struct IdleTimer {
    timeout: Option<Duration>,
    last_input: tokio::time::Instant,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    pub fn new(secs: u64) -> IdleTimer {
        // Capped so that `now + timeout` cannot overflow whatever the config says.
        let timeout = (secs > 0).then(|| Duration::from_secs(secs.min(FAR_SECS)));
        let now = tokio::time::Instant::now();
        IdleTimer {
            timeout,
            last_input: now,
            sleep: Box::pin(tokio::time::sleep_until(
                now + timeout.unwrap_or(Duration::from_secs(FAR_SECS)),
            )),
        }
    }

    /// Input arrived.
    pub fn touch(self: std::pin::Pin<&mut Self>) {
        self.get_mut().last_input = tokio::time::Instant::now();
    }

    /// Resolves once the connection has been idle for the timeout (never without one).
    pub async fn expired(self: std::pin::Pin<&mut Self>) {
        let this = self.get_mut();
        let Some(timeout) = this.timeout else {
            return std::future::pending().await;
        };
        loop {
            this.sleep.as_mut().await;
            let due = this.last_input + timeout;
            if tokio::time::Instant::now() >= due {
                return;
            }
            this.sleep.as_mut().reset(due);
        }
    }

    pub fn message(&self) -> String {
        format!(
            "idle for {} s; closing (send `ping` to stay connected)",
            self.timeout.map_or(0, |t| t.as_secs())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_timer_fires_after_its_timeout_and_never_without_one() {
        let _huge = IdleTimer::new(u64::MAX);
        let mut timer = Box::pin(IdleTimer::new(2));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        timer.as_mut().touch();
        let started = tokio::time::Instant::now();
        timer.as_mut().expired().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "counted from the last input"
        );
        let mut never = Box::pin(IdleTimer::new(0));
        let waited = tokio::time::timeout(Duration::from_secs(3600), never.as_mut().expired());
        assert!(waited.await.is_err());
    }
}
