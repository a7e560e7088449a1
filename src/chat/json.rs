//! The JSON dialect (SPEC 3a): newline-delimited JSON objects, one per line.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batching::{SEND_BATCH, SendBatches};
use super::command::{MessageEvent, StoredMessage};
use super::conn::{
    ChatIo, CloseReason, Follow, Outbound, Outbox, Render, SendPipeline, Sends, Wire, counted,
    deliver, rate_limiter, reconnect_span, replay_planned,
};
use super::delivery::DeliveryFilter;
use super::fanout::Subscriber;
use super::lines::{Line, Verdict, read_line};
use super::service::{Attached, ChatError, ChatService, Outgoing};

/// Messages a connection may have queued for replication before it stops reading.
const SEND_QUEUE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    MissingField,
    BadName,
    LineTooLong,
    NotLoggedIn,
    NameTaken,
    RateLimited,
    BadEncoding,
    Unavailable,
    NotMember,
    Internal,
    Slow,
    Limit,
    AuthRequired,
    AuthFailed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadName => "bad_name",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::Slow => "slow",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BadEncoding => "bad_encoding",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Internal => "internal",
            ErrorCode::Limit => "limit",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::AuthFailed => "auth_failed",
        }
    }
}

/// A request that could not be served, as the client will see it.
#[derive(Debug)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<String>,
}

impl ProtocolError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            id: None,
        }
    }
}

impl From<ChatError> for ProtocolError {
    fn from(e: ChatError) -> Self {
        let code = match &e {
            ChatError::BadName(_) | ChatError::NoSuchUser(_) => ErrorCode::BadName,
            ChatError::NameTaken(_) => ErrorCode::NameTaken,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::UnknownSession => ErrorCode::NotLoggedIn,
            ChatError::Unavailable(_) => ErrorCode::Unavailable,
            ChatError::Internal(_) => ErrorCode::Internal,
            ChatError::Limit { .. } => ErrorCode::Limit,
            ChatError::AuthRequired => ErrorCode::AuthRequired,
            ChatError::AuthFailed => ErrorCode::AuthFailed,
        };
        ProtocolError::new(code, e.to_string())
    }
}

#[derive(Debug, PartialEq)]
pub enum ClientRequest {
    Hello {
        user: String,
        session: Option<String>,
        resume_from: Option<u64>,
        password: Option<String>,
        /// False: the session's own messages are not pushed back to it live.
        echo: bool,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Send {
        to: String,
        id: String,
        text: String,
    },
    History {
        room: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    },
    Who {
        room: String,
    },
    Ping,
}

fn field_str(v: &Value, name: &str) -> Result<String, ProtocolError> {
    match v.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadJson,
            format!("field `{name}` must be a string"),
        )),
        None => Err(ProtocolError::new(
            ErrorCode::MissingField,
            format!("missing field `{name}`"),
        )),
    }
}

fn opt_str(v: &Value, name: &str) -> Result<Option<String>, ProtocolError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => field_str(v, name).map(Some),
    }
}

fn opt_bool(v: &Value, name: &str) -> Result<Option<bool>, ProtocolError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadJson,
            format!("field `{name}` must be true or false"),
        )),
    }
}

fn opt_u64(v: &Value, name: &str) -> Result<Option<u64>, ProtocolError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadJson,
                format!("field `{name}` must be a non-negative integer"),
            )
        }),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadJson,
            format!("field `{name}` must be a non-negative integer"),
        )),
    }
}

/// A well-formed `send`, the line a connection reads most: decoded into its fields directly
/// (borrowing what has no escapes), not into a `Value` map first. Anything else, errors
/// included, goes the general way (`parse`), which decides every answer.
#[derive(serde::Deserialize)]
struct SendLine<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    to: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

fn parse_send(line: &str) -> Option<ClientRequest> {
    let send: SendLine<'_> = serde_json::from_str(line).ok()?;
    (send.kind == "send" && !send.id.is_empty() && send.id.len() <= 128).then(|| {
        ClientRequest::Send {
            to: send.to.into_owned(),
            id: send.id.into_owned(),
            text: send.text.into_owned(),
        }
    })
}

/// Parses one line of the JSON dialect.
pub fn parse(line: &str) -> Result<ClientRequest, ProtocolError> {
    if let Some(send) = parse_send(line) {
        return Ok(send);
    }
    let v: Value = serde_json::from_str(line)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "expected a JSON object",
        ));
    }
    let kind = field_str(&v, "type")?;
    let request = match kind.as_str() {
        "hello" => ClientRequest::Hello {
            user: field_str(&v, "user")?,
            session: opt_str(&v, "session")?,
            resume_from: opt_u64(&v, "resume_from")?,
            password: opt_str(&v, "password")?,
            echo: opt_bool(&v, "echo")?.unwrap_or(true),
        },
        "join" => ClientRequest::Join {
            room: field_str(&v, "room")?,
        },
        "leave" => ClientRequest::Leave {
            room: field_str(&v, "room")?,
        },
        "send" => {
            let id = field_str(&v, "id").map_err(|mut e| {
                e.id = None;
                e
            })?;
            let with_id = |mut e: ProtocolError| {
                e.id = Some(id.clone());
                e
            };
            let to = field_str(&v, "to").map_err(with_id)?;
            let text = field_str(&v, "text").map_err(with_id)?;
            if id.is_empty() || id.len() > 128 {
                return Err(with_id(ProtocolError::new(
                    ErrorCode::BadJson,
                    "field `id` must be 1 to 128 bytes",
                )));
            }
            ClientRequest::Send { to, id, text }
        }
        "history" => ClientRequest::History {
            room: field_str(&v, "room")?,
            before: opt_u64(&v, "before")?,
            after: opt_u64(&v, "after")?,
            limit: opt_u64(&v, "limit")?.unwrap_or(100).clamp(1, 1000) as usize,
        },
        "who" => ClientRequest::Who {
            room: field_str(&v, "room")?,
        },
        "ping" => ClientRequest::Ping,
        other => {
            return Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!("unknown type `{other}`"),
            ));
        }
    };
    Ok(request)
}

#[derive(Serialize)]
pub struct NodeInfo {
    pub id: u64,
    pub chat: String,
    pub healthy: bool,
}

#[derive(Serialize)]
pub struct MessageView<'a> {
    pub index: u64,
    pub to: &'a str,
    pub from: &'a str,
    pub id: &'a str,
    pub text: &'a str,
    pub ts: String,
}

impl<'a> From<&'a StoredMessage> for MessageView<'a> {
    fn from(m: &'a StoredMessage) -> Self {
        MessageView {
            index: m.index,
            to: &m.to,
            from: &m.from,
            id: &m.id,
            text: &m.text,
            ts: rfc3339(m.ts_ms),
        }
    }
}

pub fn rfc3339(ts_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ts_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        node: u64,
        leader: Option<u64>,
        commit_index: u64,
        nodes: Vec<NodeInfo>,
        /// How many missed messages follow this welcome (a resumed session's replay).
        replayed: u64,
        /// The session asked for was resumed.
        resumed: bool,
        /// Retention removed some of what the client asked for...
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        /// ...and this is the oldest index still kept.
        #[serde(skip_serializing_if = "Option::is_none")]
        oldest_index: Option<u64>,
    },
    Joined {
        room: &'a str,
        members: &'a [String],
    },
    Left {
        room: &'a str,
    },
    Ack {
        id: &'a str,
        index: u64,
    },
    History {
        room: &'a str,
        messages: Vec<MessageView<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        oldest_index: Option<u64>,
    },
    Members {
        room: &'a str,
        users: &'a [String],
    },
    Pong,
    Message(MessageView<'a>),
    Presence {
        room: &'a str,
        user: &'a str,
        state: &'static str,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Bytes {
        let mut bytes = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"encoding failed: {e}"}}"#)
                .into_bytes()
        });
        bytes.push(b'\n');
        Bytes::from(bytes)
    }
}

fn error_frame(e: &ProtocolError) -> Bytes {
    ServerFrame::Error {
        code: e.code,
        message: &e.message,
        id: e.id.as_deref(),
    }
    .encode()
}

const DIALECT: &str = "json";

/// Serves one JSON-dialect connection until it closes.
pub async fn serve(io: ChatIo, svc: Arc<ChatService>, shutdown: CancellationToken) {
    let counted_svc = svc.clone();
    counted(&counted_svc, DIALECT, |reason| {
        serve_until_closed(io, svc, shutdown, reason)
    })
    .await;
}

async fn serve_until_closed(
    io: ChatIo,
    svc: Arc<ChatService>,
    shutdown: CancellationToken,
    reason: Arc<CloseReason>,
) {
    let slow = error_frame(&ProtocolError::new(
        ErrorCode::Slow,
        "this client did not read what it was sent; disconnecting",
    ));
    let peer = io.peer.clone();
    let mut wire = Wire::open(io, &shutdown, &svc, slow, reason.clone());
    let closed = wire.closed.clone();
    let mut conn = Connection {
        peer,
        svc: svc.clone(),
        out: wire.out.clone(),
        closed: closed.clone(),
        attached: None,
        sends: None,
        reason: reason.clone(),
    };
    let mut limiter = rate_limiter(&svc.config);
    let mut buf = Vec::new();
    let max = svc.config.max_line_bytes;
    let hello_deadline = tokio::time::sleep(Duration::from_millis(svc.config.hello_timeout_ms));
    tokio::pin!(hello_deadline);
    let idle = super::conn::IdleTimer::new(svc.config.idle_timeout_secs);
    tokio::pin!(idle);
    loop {
        let line = tokio::select! {
            line = read_line(&mut wire.reader, &mut buf, max) => line,
            _ = idle.as_mut().expired(), if conn.attached.is_some() => {
                reason.set("idle");
                conn.fatal(ProtocolError::new(ErrorCode::Limit, idle.message())).await;
                break;
            }
            _ = closed.cancelled() => {
                if shutdown.is_cancelled() {
                    reason.set("shutdown");
                }
                break;
            }
            _ = &mut hello_deadline, if conn.attached.is_none() => {
                reason.set("login_timeout");
                conn.fatal(ProtocolError::new(ErrorCode::NotLoggedIn, "no hello within the login timeout")).await;
                break;
            }
        };
        match line {
            Ok(Line::Eof) => break,
            Err(_) => {
                reason.set("error");
                break;
            }
            Ok(Line::TooLong) => {
                reason.set("abuse");
                let e = ProtocolError::new(
                    ErrorCode::LineTooLong,
                    format!("line longer than {max} bytes"),
                );
                conn.fatal(e).await;
                break;
            }
            Ok(Line::Data) => {}
        }
        idle.as_mut().touch();
        let Ok(text) = std::str::from_utf8(&buf) else {
            reason.set("abuse");
            conn.fatal(ProtocolError::new(
                ErrorCode::BadEncoding,
                "line is not valid UTF-8",
            ))
            .await;
            break;
        };
        let request = parse(text);
        // Every line is charged, blank and junk ones too.
        match limiter.check() {
            Verdict::Allow => {}
            Verdict::Reject => {
                let mut e =
                    ProtocolError::new(ErrorCode::RateLimited, "too many requests; slow down");
                // A refused send names its id, so that its client sends it again later
                // instead of waiting for an ack that will never come.
                if let Ok(ClientRequest::Send { id, .. }) = request {
                    e.id = Some(id);
                }
                conn.reply_error(e).await;
                continue;
            }
            Verdict::Close => {
                reason.set("abuse");
                conn.fatal(ProtocolError::new(
                    ErrorCode::RateLimited,
                    "flooding for too long; closing",
                ))
                .await;
                break;
            }
        }
        match request {
            // Boxed: a command's state exists only while it runs, not in every idle connection.
            Ok(request) => Box::pin(conn.handle(request)).await,
            Err(e) => conn.reply_error(e).await,
        }
    }
    let sends = conn.sends.take().and_then(Sends::into_pipeline);
    let attached = conn.attached.take();
    drop(conn);
    Box::pin(wire.finish(&svc, sends, attached.as_ref())).await;
}

struct Connection {
    svc: Arc<ChatService>,
    out: Outbox,
    closed: CancellationToken,
    attached: Option<Attached>,
    sends: Option<Sends>,
    reason: Arc<CloseReason>,
    /// The client's address, for spans (`network.peer.address`).
    peer: String,
}

impl Connection {
    async fn reply(&self, frame: Bytes) {
        let _ = self.out.send(Outbound::Frame(frame)).await;
    }

    async fn reply_error(&self, e: ProtocolError) {
        self.svc.metrics.bad_request(e.code.as_str());
        self.reply(error_frame(&e)).await;
    }

    async fn fatal(&self, e: ProtocolError) {
        self.svc.metrics.bad_request(e.code.as_str());
        let _ = self.out.send(Outbound::Fatal(error_frame(&e))).await;
    }

    async fn handle(&mut self, request: ClientRequest) {
        let session = match (&request, &self.attached) {
            (ClientRequest::Hello { .. }, Some(_)) => {
                return self
                    .reply_error(ProtocolError::new(
                        ErrorCode::UnknownType,
                        "already said hello",
                    ))
                    .await;
            }
            (ClientRequest::Hello { .. }, None) | (ClientRequest::Ping, _) => String::new(),
            (_, Some(a)) => a.session.clone(),
            (_, None) => {
                return self
                    .reply_error(ProtocolError::new(
                        ErrorCode::NotLoggedIn,
                        "say hello first",
                    ))
                    .await;
            }
        };
        let result = match request {
            ClientRequest::Hello {
                user,
                session,
                resume_from,
                password,
                echo,
            } => {
                self.hello(
                    &user,
                    session.as_deref(),
                    resume_from,
                    password.as_deref(),
                    echo,
                )
                .await
            }
            ClientRequest::Ping => {
                self.reply(ServerFrame::Pong.encode()).await;
                Ok(())
            }
            ClientRequest::Join { room } => match self.svc.join(&session, &room).await {
                Ok((room, members, _)) => {
                    self.reply(
                        ServerFrame::Joined {
                            room: &room,
                            members: &members,
                        }
                        .encode(),
                    )
                    .await;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            ClientRequest::Leave { room } => match self.svc.leave(&session, &room).await {
                Ok(room) => {
                    self.reply(ServerFrame::Left { room: &room }.encode()).await;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            ClientRequest::Send { to, id, text } => match ChatService::check_target(&to) {
                Ok(()) => {
                    self.queue_send(id, to, text).await;
                    Ok(())
                }
                Err(e) => {
                    let mut e = ProtocolError::from(e);
                    e.id = Some(id);
                    Err(e)
                }
            },
            ClientRequest::History {
                room,
                before,
                after,
                limit,
            } => match self
                .svc
                .history(&session, &room, before, after, limit)
                .await
            {
                Ok((room, page)) => {
                    let frame = ServerFrame::History {
                        room: &room,
                        messages: page.messages.iter().map(MessageView::from).collect(),
                        truncated: page.truncated,
                        oldest_index: page.oldest_index,
                    };
                    self.reply(frame.encode()).await;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
            ClientRequest::Who { room } => match self.svc.who(&room) {
                Ok(users) => {
                    self.reply(
                        ServerFrame::Members {
                            room: &room,
                            users: &users,
                        }
                        .encode(),
                    )
                    .await;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            },
        };
        if let Err(e) = result {
            self.reply_error(e).await;
        }
    }

    async fn hello(
        &mut self,
        user: &str,
        token: Option<&str>,
        resume_from: Option<u64>,
        password: Option<&str>,
        echo: bool,
    ) -> Result<(), ProtocolError> {
        let attached = self.svc.attach(user, token, false, password).await?;
        self.svc.register(&attached);
        // Subscribe before reading state: every event above `sub.applied` will arrive.
        let sub = self.svc.store.subscribe(Subscriber {
            session: &attached.session,
            session_id: attached.id,
            user: &attached.user,
        });
        let rooms = sub.rooms;
        let status = self.svc.consensus.status();
        let nodes = self
            .svc
            .nodes()
            .into_iter()
            .map(|n| NodeInfo {
                id: n.id,
                chat: n.chat,
                healthy: n.healthy,
            })
            .collect();
        let metrics = &self.svc.metrics;
        let replay = match resume_from.filter(|_| attached.resumed) {
            Some(after) => Some(
                self.svc
                    .replay(&attached.session, after, sub.applied)
                    .await?,
            ),
            None => None,
        };
        let replayed = replay.as_ref().map_or(0, |r| r.count);
        let welcome = ServerFrame::Welcome {
            session: &attached.session,
            node: self.svc.node_id,
            leader: status.leader,
            commit_index: status.commit_index.max(sub.applied),
            nodes,
            replayed,
            resumed: attached.resumed,
            truncated: replay.as_ref().is_some_and(|r| r.truncated_at.is_some()),
            oldest_index: replay.as_ref().and_then(|r| r.truncated_at),
        };
        self.reply(welcome.encode()).await;
        let mut filter = DeliveryFilter::new(
            attached.session.clone(),
            attached.id,
            attached.attachment,
            &attached.user,
            rooms,
            sub.applied,
        );
        if !echo {
            filter = filter.without_echo();
        }
        // A resumed session is a reconnect; its span stays open until the client's first
        // re-sends are answered, to count how many were duplicates.
        let reconnect_span = attached
            .resumed
            .then(|| reconnect_span(&self.svc, DIALECT, &self.peer, attached.id, replayed));
        if let Some(replay) = &replay {
            let sent = replay_planned(&self.svc, replay, &JsonRender, &self.out).await?;
            metrics.replayed_messages.inc_by(sent);
        }
        // Never below what the client said it has seen, whatever this node had applied.
        filter.advance(
            sub.applied
                .max(resume_from.filter(|_| attached.resumed).unwrap_or(0)),
        );
        let follow = Follow {
            session: attached.session.clone(),
            user: attached.user.clone(),
            filter,
            events: sub.events,
        };
        tokio::spawn(deliver(
            self.svc.clone(),
            follow,
            JsonRender,
            self.out.clone(),
            self.closed.clone(),
            self.reason.clone(),
        ));
        let (svc, session, out) = (self.svc.clone(), attached.session.clone(), self.out.clone());
        self.sends = Some(Sends::new(move || {
            let (tx, rx) = mpsc::channel(SEND_QUEUE);
            let task = tokio::spawn(send_loop(svc, session, rx, out, reconnect_span));
            SendPipeline { queue: tx, task }
        }));
        self.attached = Some(attached);
        Ok(())
    }

    async fn queue_send(&mut self, id: String, to: String, text: String) {
        if let Some(queue) = self.sends.as_mut().and_then(Sends::queue) {
            let message = Outgoing {
                id,
                to,
                text,
                received: std::time::Instant::now(),
            };
            let _ = queue.send(message).await;
        }
    }
}

/// Replicates a connection's messages in the order they arrived, batching whatever queued up
/// while the previous batch was in flight.
async fn send_loop(
    svc: Arc<ChatService>,
    session: String,
    rx: mpsc::Receiver<Outgoing>,
    out: Outbox,
    mut reconnect_span: Option<tracing::Span>,
) {
    let mut batches = SendBatches::new(rx);
    let mut batch = Vec::with_capacity(SEND_BATCH);
    while batches.next(&mut batch).await {
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        // Boxed: the write's state exists only while a batch is in flight.
        let results = Box::pin(svc.send_batch(&session, std::mem::take(&mut batch))).await;
        batches.written();
        let mut duplicates = 0u64;
        // The batch's answers go to the writer as one frame.
        let mut answers = bytes::BytesMut::new();
        for (id, result) in ids.iter().zip(results) {
            let frame = match result {
                Ok(sent) => {
                    duplicates += u64::from(sent.duplicate);
                    ServerFrame::Ack {
                        id,
                        index: sent.index,
                    }
                    .encode()
                }
                Err(e) => {
                    let mut e = ProtocolError::from(e);
                    e.id = Some(id.clone());
                    error_frame(&e)
                }
            };
            answers.extend_from_slice(&frame);
        }
        if out.send(Outbound::Frame(answers.freeze())).await.is_err() {
            return;
        }
        if let Some(span) = reconnect_span.take() {
            span.record("deduplicated", duplicates);
        }
    }
}

/// The JSON dialect's frames for the shared delivery loop.
struct JsonRender;

impl Render for JsonRender {
    fn message(&self, m: &MessageEvent) -> Option<Bytes> {
        Some(
            m.json
                .get_or_init(|| ServerFrame::Message((&m.message).into()).encode())
                .clone(),
        )
    }

    fn stored(&self, m: &StoredMessage) -> Option<Bytes> {
        Some(ServerFrame::Message(m.into()).encode())
    }

    fn presence(&self, room: &str, user: &str, joined: bool) -> Bytes {
        ServerFrame::Presence {
            room,
            user,
            state: if joined { "joined" } else { "left" },
        }
        .encode()
    }

    fn too_slow(&self, behind: u64) -> Bytes {
        error_frame(&ProtocolError::new(
            ErrorCode::Unavailable,
            format!("client too slow: fell {behind} events behind; resume to continue"),
        ))
    }

    fn replaced(&self, why: &str) -> Bytes {
        error_frame(&ProtocolError::new(ErrorCode::NameTaken, why))
    }

    fn unavailable(&self, why: &str) -> Bytes {
        error_frame(&ProtocolError::new(ErrorCode::Unavailable, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_have_codes() {
        assert_eq!(parse("{").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            parse(r#"{"type":"dance"}"#).unwrap_err().code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            parse(r#"{"type":"join"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        assert_eq!(
            parse(r#"{"user":"a"}"#).unwrap_err().code,
            ErrorCode::MissingField
        );
        let e = parse(r##"{"type":"send","id":"7","to":"#r"}"##).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::MissingField, Some("7"))
        );
    }

    #[test]
    fn a_send_reads_the_same_on_the_direct_way_and_the_general_one() {
        let general = |line: &str| {
            let v: Value = serde_json::from_str(line).unwrap();
            (
                field_str(&v, "to").unwrap(),
                field_str(&v, "id").unwrap(),
                field_str(&v, "text").unwrap(),
            )
        };
        for line in [
            r##"{"type":"send","id":"7","to":"#r","text":"hi"}"##,
            r##"{"text":"esc \" \\ \n \u00e9 é","to":"#r","id":"a b","type":"send","extra":[1,{"x":2}]}"##,
            r##"{"type":"send","id":"7","to":"bob","text":""}"##,
        ] {
            let Some(ClientRequest::Send { to, id, text }) = parse_send(line) else {
                panic!("not taken directly: {line}");
            };
            assert_eq!((to, id, text), general(line), "{line}");
        }
        // Lines the direct way leaves to the general one, which answers as it always did.
        let long_id = format!(
            r##"{{"type":"send","id":"{}","to":"#r","text":"x"}}"##,
            "i".repeat(129)
        );
        for (line, code) in [
            (
                r##"{"type":"send","id":"","to":"#r","text":"x"}"##,
                ErrorCode::BadJson,
            ),
            (long_id.as_str(), ErrorCode::BadJson),
            (
                r##"{"type":"send","id":"7","to":"#r","text":null}"##,
                ErrorCode::BadJson,
            ),
            (
                r##"{"type":"send","id":"7","to":"#r","text":5}"##,
                ErrorCode::BadJson,
            ),
            (
                r##"{"type":"send","id":"7","to":"#r"}"##,
                ErrorCode::MissingField,
            ),
            (
                r##"{"type":"sned","id":"7","to":"#r","text":"x"}"##,
                ErrorCode::UnknownType,
            ),
        ] {
            assert!(parse_send(line).is_none(), "{line}");
            assert_eq!(parse(line).unwrap_err().code, code, "{line}");
        }
        // A repeated field: the general way keeps the last value, as before.
        let twice = r##"{"type":"send","id":"7","to":"#a","to":"#b","text":"x"}"##;
        assert!(parse_send(twice).is_none());
        assert!(matches!(parse(twice), Ok(ClientRequest::Send { to, .. }) if to == "#b"));
    }

    #[test]
    fn parse_requests() {
        assert_eq!(
            parse(r#"{"type":"hello","user":"a","session":"s","resume_from":4}"#).unwrap(),
            ClientRequest::Hello {
                user: "a".into(),
                session: Some("s".into()),
                resume_from: Some(4),
                password: None,
                echo: true,
            }
        );
        assert_eq!(
            parse(r#"{"type":"hello","user":"a","echo":false}"#).unwrap(),
            ClientRequest::Hello {
                user: "a".into(),
                session: None,
                resume_from: None,
                password: None,
                echo: false,
            }
        );
        assert_eq!(
            parse(r#"{"type":"hello","user":"a","echo":"no"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadJson
        );
        assert_eq!(
            parse(r##"{"type":"history","room":"#r","limit":5000}"##).unwrap(),
            ClientRequest::History {
                room: "#r".into(),
                before: None,
                after: None,
                limit: 1000
            }
        );
    }

    #[test]
    fn frames_encode_as_one_line() {
        let m = StoredMessage {
            index: 3,
            to: "#r".into(),
            from: "a".into(),
            id: "1".into(),
            text: "hi\nthere".into(),
            ts_ms: 0,
            parties: Vec::new(),
        };
        let line = ServerFrame::Message((&m).into()).encode();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["index"], 3);
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
    }
}
