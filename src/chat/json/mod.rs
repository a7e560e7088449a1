//! The JSON dialect (SPEC 3a): newline-delimited JSON objects, one per line. This module serves
//! a connection (login, sends in batches, deliveries); `wire` is what its lines and frames are.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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
use super::lines::{Line, LineBuf, Verdict, read_line};
use super::service::{Attached, ChatService, Outgoing};

mod wire;

pub use wire::rfc3339;
use wire::{
    ClientRequest, ErrorCode, MessageView, NodeInfo, ProtocolError, ServerFrame, error_frame, parse,
};

/// Messages a connection may have queued for replication before it stops reading.
const SEND_QUEUE: usize = 1024;
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
    let mut buf = LineBuf::default();
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
        let Ok(text) = std::str::from_utf8(buf.bytes()) else {
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
