//! Chat operations shared by both dialects: they validate, replicate through consensus and
//! answer in dialect-neutral terms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::command::{ChatCommand, ChatResponse, StoredMessage};
use super::history::{Page, Retention, party_key};
use super::names::{fold, is_room_target, is_valid_room, is_valid_user};
use super::state::Settings;
use super::store::ChatStore;
use crate::config::ChatConfig;
use crate::consensus::{Consensus, WriteError};
use crate::health::HealthTable;
use crate::telemetry::{self, metrics::Metrics};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    BadName(String),
    #[error("the name {0} is in use")]
    NameTaken(String),
    #[error("not a member of {0}")]
    NotMember(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("the session no longer exists; say hello again")]
    UnknownSession,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error("this server requires an account and its password")]
    AuthRequired,
    #[error("wrong user name or password")]
    AuthFailed,
    /// A limit refused it; `reason` is the metrics label.
    #[error("{message}")]
    Limit {
        reason: &'static str,
        message: String,
    },
}

impl ChatError {
    /// The `reason` label of `raftchat_messages_failed_total` for a message that failed so.
    pub fn failure_reason(&self) -> &'static str {
        match self {
            ChatError::Unavailable(_) => "unavailable",
            ChatError::Internal(_) => "internal",
            ChatError::UnknownSession => "unknown_session",
            ChatError::NotMember(_)
            | ChatError::NoSuchUser(_)
            | ChatError::Limit { .. }
            | ChatError::AuthRequired
            | ChatError::AuthFailed => "refused",
            _ => "bad_request",
        }
    }
}

impl From<WriteError> for ChatError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Unavailable(m) => {
                ChatError::Unavailable(format!("no leader available: {m}"))
            }
            WriteError::Internal(m) => ChatError::Internal(m),
        }
    }
}

/// A connection's attachment to its session.
#[derive(Debug, Clone)]
pub struct Attached {
    pub session: String,
    pub user: String,
    pub resumed: bool,
    pub attachment: u64,
    /// The session's public id (who may see a direct message).
    pub id: u64,
}

/// Messages one page of a resume replay holds.
pub const REPLAY_PAGE: usize = 256;

/// What a resuming session will be replayed, decided once at `hello`.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The session's rooms and its direct-message key.
    pub keys: Vec<String>,
    pub after: u64,
    pub upto: u64,
    pub count: u64,
    /// Set when retention removed messages the client asked for: the oldest index kept.
    pub truncated_at: Option<u64>,
}

/// A chat message a client sent, waiting to be replicated.
#[derive(Debug)]
pub struct Outgoing {
    pub id: String,
    pub to: String,
    pub text: String,
    /// When this node received it (for the commit latency histogram).
    pub received: std::time::Instant,
}

/// An acknowledged message: its log index, and whether it was a re-send of a stored one.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub index: u64,
    pub duplicate: bool,
}

/// One member of the cluster as clients see it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: u64,
    pub chat: String,
    pub healthy: bool,
}

pub struct ChatService {
    pub node_id: u64,
    pub consensus: Arc<Consensus>,
    pub store: Arc<ChatStore>,
    pub health: Arc<HealthTable>,
    pub config: ChatConfig,
    pub metrics: Arc<Metrics>,
    /// Sessions with a live connection on this node: session → attachment index.
    live: Mutex<HashMap<String, u64>>,
    /// True once the cluster knows that this node's connections from before its restart are
    /// gone; attaching waits for it so that release can never detach a new connection.
    released: tokio::sync::watch::Sender<bool>,
}

fn unexpected(r: ChatResponse) -> ChatError {
    ChatError::Internal(format!("unexpected answer from the state machine: {r:?}"))
}

impl ChatService {
    pub fn new(
        node_id: u64,
        consensus: Arc<Consensus>,
        store: Arc<ChatStore>,
        health: Arc<HealthTable>,
        config: ChatConfig,
        metrics: Arc<Metrics>,
    ) -> ChatService {
        ChatService {
            node_id,
            consensus,
            store,
            health,
            config,
            metrics,
            live: Mutex::new(HashMap::new()),
            released: tokio::sync::watch::channel(false).0,
        }
    }

    /// Tells the cluster that no connection this node had before it started is alive.
    /// Retries until it is replicated or `shutdown` fires.
    pub async fn release_previous_connections(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let attempt = tokio::select! {
                r = self.consensus.write(ChatCommand::DetachNode { node: self.node_id }) => r,
                _ = shutdown.cancelled() => return,
            };
            match attempt {
                Ok(_) => {
                    self.released.send_replace(true);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "release of previous connections not yet replicated")
                }
            }
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for `user`, or resumes `token` if it is that user's session.
    /// A name held by a connection that is gone (its node is down, or it was on this node and
    /// closed) is taken over; a name held by a live connection is refused.
    /// With `adopt_orphan` (IRC, which has no session tokens) a returning name resumes the
    /// session it left behind instead of replacing it, keeping its rooms.
    pub async fn attach(
        &self,
        user: &str,
        token: Option<&str>,
        adopt_orphan: bool,
        password: Option<&str>,
    ) -> Result<Attached, ChatError> {
        if !is_valid_user(user) {
            return Err(ChatError::BadName(format!("invalid user name: {user:?}")));
        }
        let authenticated = self.authenticate(user, password).await?;
        let mut released = self.released.subscribe();
        let wait = std::time::Duration::from_millis(self.config.write_timeout_ms);
        if !matches!(
            tokio::time::timeout(wait, released.wait_for(|r| *r)).await,
            Ok(Ok(_))
        ) {
            return Err(ChatError::Unavailable(
                "this node has not joined the cluster yet".into(),
            ));
        }
        if let Some(gap) = self.store.gap() {
            return Err(ChatError::Unavailable(format!(
                "this node is still copying history ({}..{}) from its peers; try another node",
                gap.after, gap.upto
            )));
        }
        // Whether the name's holder is gone is this node's view (its health table); the
        // claim is a compare-and-swap decided in apply. Resume and adopt are decided there
        // too, on the state at the entry, never on this node's possibly stale copy.
        let replaces = {
            let state = self.store.state();
            state.holder_of(user).and_then(|(holder, s)| {
                let gone = match s.attached {
                    None => true,
                    Some(a) if a.node == self.node_id => self.live().get(holder) != Some(&a.index),
                    Some(a) => !self.health.is_up(a.node),
                };
                gone.then(|| holder.to_string())
            })
        };
        let done = self
            .consensus
            .write(ChatCommand::Attach {
                session: uuid::Uuid::new_v4().simple().to_string(),
                user: user.to_string(),
                node: self.node_id,
                replaces,
                resume: token.map(str::to_string),
                adopt: adopt_orphan,
                authenticated,
            })
            .await?;
        // Read barrier: everything this connection reads or replays is at least as new as its
        // own attach entry, which is newer than anything the client saw before.
        if !self.consensus.wait_applied(done.index, wait).await {
            // Release the attachment nobody will serve, so the name is not held by it.
            if let ChatResponse::Attached { session, .. } = &done.response {
                let consensus = self.consensus.clone();
                let detach = ChatCommand::Detach {
                    session: session.clone(),
                    attachment: done.index,
                };
                tokio::spawn(async move { consensus.write(detach).await });
            }
            return Err(ChatError::Unavailable(
                "this node has not caught up with the cluster yet; try again".into(),
            ));
        }
        match done.response {
            ChatResponse::Attached {
                session,
                user,
                resumed,
                attachment,
            } => {
                // Applied here (the read barrier above), so the state knows the session.
                let id = self.store.state().session(&session).map_or(0, |s| s.id);
                Ok(Attached {
                    session,
                    user,
                    resumed,
                    attachment,
                    id,
                })
            }
            ChatResponse::NameTaken => Err(ChatError::NameTaken(user.to_string())),
            ChatResponse::AuthRequired => Err(ChatError::AuthRequired),
            other => Err(unexpected(other)),
        }
    }

    /// Checks `password` against `user`'s account on this node's state: `Ok(true)` when it
    /// matches, `Ok(false)` for a free name in open mode. The check is repeated in apply for
    /// registered names (an attach that is not authenticated is refused there).
    async fn authenticate(&self, user: &str, password: Option<&str>) -> Result<bool, ChatError> {
        let hash = self.store.state().account(user).map(|a| a.hash.clone());
        let required = self.config.auth == crate::config::AuthMode::Required;
        match (hash, password) {
            (Some(hash), Some(password)) => {
                let password = password.to_string();
                let ok =
                    tokio::task::spawn_blocking(move || super::accounts::verify(&password, &hash))
                        .await
                        .unwrap_or(false);
                if ok {
                    Ok(true)
                } else {
                    self.metrics.bad_request("auth_failed");
                    Err(ChatError::AuthFailed)
                }
            }
            (Some(_), None) => Err(ChatError::AuthRequired),
            (None, Some(_)) if required => {
                self.metrics.bad_request("auth_failed");
                Err(ChatError::AuthFailed)
            }
            (None, None) if required => Err(ChatError::AuthRequired),
            (None, _) => Ok(false),
        }
    }

    /// The settings every node should decide with, from this node's config.
    fn desired_settings(&self) -> Settings {
        Settings {
            session_ttl_ms: (self.config.session_idle_timeout_secs as i64).saturating_mul(1000),
            retention: Retention {
                max_per_room: self.config.history_max_messages_per_room,
                max_age_ms: self.config.history_max_age_ms(),
            },
        }
    }

    /// While this node leads, makes the replicated settings match its config (one
    /// `Configure` entry whenever they differ), until `shutdown`.
    pub async fn replicate_settings(&self, shutdown: tokio_util::sync::CancellationToken) {
        let desired = self.desired_settings();
        let mut watch = self.consensus.watch();
        loop {
            let status = self.consensus.status();
            let leading = status.leader == Some(self.node_id) && status.leader_lease_valid;
            // Only once this leader has applied its whole log is the state's setting current.
            if leading
                && self.store.applied() >= status.commit_index
                && self.store.state().settings() != desired
            {
                match self
                    .consensus
                    .write(ChatCommand::Configure { settings: desired })
                    .await
                {
                    Ok(_) => tracing::info!(?desired, "replicated settings"),
                    Err(e) => {
                        tracing::debug!(error = %e, "settings not replicated yet");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
                continue;
            }
            // Leading with settings not yet replicated: what is awaited (the lease, the apply
            // of the log) is raft progress, so wait on that; otherwise on leader changes.
            let pending =
                status.leader == Some(self.node_id) && self.store.state().settings() != desired;
            let wait = std::time::Duration::from_millis(500);
            tokio::select! {
                changed = watch.changed(), if !pending => if !changed { return },
                _ = self.consensus.progress_changed(wait), if pending => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Marks a connection live on this node.
    pub fn register(&self, attached: &Attached) {
        self.live()
            .insert(attached.session.clone(), attached.attachment);
    }

    /// The connection closed: frees the name for others (the session itself lives on for
    /// resume until it expires).
    pub fn unregister(self: &Arc<Self>, attached: &Attached) {
        let mut live = self.live();
        if live.get(&attached.session) == Some(&attached.attachment) {
            live.remove(&attached.session);
        }
        drop(live);
        let svc = self.clone();
        let command = ChatCommand::Detach {
            session: attached.session.clone(),
            attachment: attached.attachment,
        };
        tokio::spawn(async move {
            if let Err(e) = svc.consensus.write(command).await {
                tracing::debug!(error = %e, "detach not replicated");
            }
        });
    }

    pub fn live_connections(&self) -> usize {
        self.live().len()
    }

    /// Joins `room`; returns its name, its members and the log index of the join.
    pub async fn join(
        &self,
        session: &str,
        room: &str,
    ) -> Result<(String, Vec<String>, u64), ChatError> {
        if !is_valid_room(room) {
            return Err(ChatError::BadName(format!("invalid room name: {room:?}")));
        }
        let max = self.config.max_rooms_per_session;
        let already =
            self.store.state().session(session).is_some_and(|s| {
                s.rooms.len() >= max && !s.rooms.contains(&super::names::fold(room))
            });
        if already {
            self.metrics.bad_request("too_many_rooms");
            return Err(ChatError::Limit {
                reason: "too_many_rooms",
                message: format!("a session may be in at most {max} rooms"),
            });
        }
        let done = self
            .consensus
            .write(ChatCommand::Join {
                session: session.to_string(),
                room: room.to_string(),
            })
            .await?;
        match done.response {
            ChatResponse::Joined { room, members } => Ok((room, members, done.index)),
            ChatResponse::UnknownSession => Err(ChatError::UnknownSession),
            other => Err(unexpected(other)),
        }
    }

    pub async fn leave(&self, session: &str, room: &str) -> Result<String, ChatError> {
        if !is_valid_room(room) {
            return Err(ChatError::BadName(format!("invalid room name: {room:?}")));
        }
        let done = self
            .consensus
            .write(ChatCommand::Leave {
                session: session.to_string(),
                room: room.to_string(),
            })
            .await?;
        match done.response {
            ChatResponse::Left { room } => Ok(room),
            ChatResponse::UnknownSession => Err(ChatError::UnknownSession),
            other => Err(unexpected(other)),
        }
    }

    /// Checks a message's target before it is replicated.
    pub fn check_target(to: &str) -> Result<(), ChatError> {
        let ok = if is_room_target(to) {
            is_valid_room(to)
        } else {
            is_valid_user(to)
        };
        if ok {
            Ok(())
        } else {
            Err(ChatError::BadName(format!("invalid target: {to:?}")))
        }
    }

    /// Sends messages of one session, in order, as consecutive log entries. Each gets its
    /// log index (the original one for a re-sent id) or an error. Every message is traced as a
    /// `chat.send` span, which the leader continues when the write is forwarded.
    pub async fn send_batch(
        &self,
        session: &str,
        messages: Vec<Outgoing>,
    ) -> Vec<Result<Sent, ChatError>> {
        // Texts over the limit are refused here; the rest are written in one batch.
        let max = self.config.max_text_bytes;
        if messages.iter().any(|m| m.text.len() > max) {
            let (long, ok): (Vec<_>, Vec<_>) = messages
                .into_iter()
                .enumerate()
                .partition(|(_, m)| m.text.len() > max);
            let order: Vec<usize> = ok.iter().map(|(i, _)| *i).collect();
            let mut results: Vec<Option<Result<Sent, ChatError>>> =
                (0..order.len() + long.len()).map(|_| None).collect();
            for (i, _) in &long {
                self.metrics.bad_request("text_too_long");
                results[*i] = Some(Err(ChatError::Limit {
                    reason: "text_too_long",
                    message: format!("a message text may be at most {max} bytes"),
                }));
            }
            let written =
                Box::pin(self.send_batch(session, ok.into_iter().map(|(_, m)| m).collect())).await;
            for (i, r) in order.into_iter().zip(written) {
                results[i] = Some(r);
            }
            return results.into_iter().flatten().collect();
        }
        let spans: Vec<tracing::Span> = messages
            .iter()
            .map(|m| {
                tracing::info_span!(
                    "chat.send",
                    otel.kind = "server",
                    id = %m.id,
                    to = %m.to,
                    node = self.node_id,
                    index = tracing::field::Empty,
                    error.type = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                )
            })
            .collect();
        let traceparents = spans.iter().map(telemetry::traceparent).collect();
        let received: Vec<std::time::Instant> = messages.iter().map(|m| m.received).collect();
        let commands = messages
            .into_iter()
            .map(|m| ChatCommand::Send {
                session: session.to_string(),
                id: m.id,
                to: m.to,
                text: m.text,
            })
            .collect();
        let results = self
            .consensus
            .write_batch_traced(commands, traceparents)
            .await;
        let outcomes: Vec<Result<Sent, ChatError>> = results
            .into_iter()
            .zip(received)
            .map(|(r, received)| match r?.response {
                ChatResponse::Sent { index, duplicate } => {
                    self.metrics.messages_committed.inc();
                    self.metrics
                        .message_commit_duration
                        .observe(received.elapsed().as_secs_f64());
                    if duplicate {
                        self.metrics.resends_deduplicated.inc();
                    }
                    Ok(Sent { index, duplicate })
                }
                ChatResponse::NotMember { room } => Err(ChatError::NotMember(room)),
                ChatResponse::NoSuchUser { user } => Err(ChatError::NoSuchUser(user)),
                ChatResponse::UnknownSession => Err(ChatError::UnknownSession),
                other => Err(unexpected(other)),
            })
            .collect();
        for (outcome, span) in outcomes.iter().zip(&spans) {
            match outcome {
                Ok(sent) => {
                    span.record("index", sent.index);
                }
                Err(failed) => {
                    self.metrics.message_failed(failed.failure_reason());
                    span.record("error.type", failed.failure_reason());
                    span.record("otel.status_code", "ERROR");
                }
            }
        }
        drop(spans);
        outcomes
    }

    /// Refuses reads while this node lacks part of the history.
    fn history_complete(&self) -> Result<(), ChatError> {
        match self.store.gap() {
            None => Ok(()),
            Some(gap) => Err(ChatError::Unavailable(format!(
                "this node is still copying history ({}..{}) from its peers",
                gap.after, gap.upto
            ))),
        }
    }

    async fn read_history<T: Send + 'static>(
        &self,
        read: impl FnOnce(&super::history::History) -> Result<T, super::history::HistoryError>
        + Send
        + 'static,
    ) -> Result<T, ChatError> {
        self.history_complete()?;
        // Everything applied so far, written.
        self.store
            .history_ready(self.store.applied())
            .await
            .map_err(|e| ChatError::Internal(e.to_string()))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(store.history()))
            .await
            .map_err(|e| ChatError::Internal(e.to_string()))?
            .map_err(|e| ChatError::Internal(e.to_string()))
    }

    /// A page of a room's history, for a member of the room.
    pub async fn history(
        &self,
        session: &str,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(String, Page), ChatError> {
        let key = fold(room);
        let name = {
            let state = self.store.state();
            let member = state
                .session(session)
                .is_some_and(|s| s.rooms.contains(&key));
            if !member {
                return Err(ChatError::NotMember(room.to_string()));
            }
            state.room_name(room).unwrap_or(room).to_string()
        };
        let upto = self.store.applied();
        let page = self
            .read_history(move |h| h.page(&key, after, before, limit, upto))
            .await?;
        Ok((name, page))
    }

    /// What `session` missed after `after`, up to what this node has applied: its rooms and
    /// the direct messages it may see, how many, and whether retention cut some.
    pub async fn replay(&self, session: &str, after: u64, upto: u64) -> Result<Replay, ChatError> {
        let mut keys: Vec<String> = self
            .store
            .state()
            .session(session)
            .map(|s| s.rooms.iter().cloned().collect())
            .unwrap_or_default();
        if let Some(id) = self.store.state().session(session).map(|s| s.id) {
            keys.push(party_key(id));
        }
        let read_keys = keys.clone();
        let (count, pruned, oldest) = self
            .read_history(move |h| {
                Ok((
                    h.count_missed(&read_keys, after, upto)?,
                    h.pruned_upto(&read_keys)?,
                    h.oldest_kept(&read_keys)?,
                ))
            })
            .await?;
        let truncated_at = (after < pruned).then(|| oldest.unwrap_or(pruned + 1));
        Ok(Replay {
            keys,
            after,
            upto,
            count,
            truncated_at,
        })
    }

    /// The next page of `replay` after index `after` (empty when done).
    pub async fn replay_page(
        &self,
        replay: &Replay,
        after: u64,
    ) -> Result<Vec<StoredMessage>, ChatError> {
        let keys = replay.keys.clone();
        let upto = replay.upto;
        self.read_history(move |h| h.missed(&keys, after, upto, REPLAY_PAGE))
            .await
    }

    /// Every room with its member count.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        self.store.state().rooms()
    }

    pub fn who(&self, room: &str) -> Result<Vec<String>, ChatError> {
        if !is_valid_room(room) {
            return Err(ChatError::BadName(format!("invalid room name: {room:?}")));
        }
        Ok(self.store.state().members(room))
    }

    /// The cluster's members with their chat address and this node's view of their health.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.consensus
            .member_chat_addrs()
            .into_iter()
            .map(|(id, chat)| NodeView {
                id,
                chat,
                healthy: id == self.node_id || self.health.is_up(id),
            })
            .collect()
    }
}
