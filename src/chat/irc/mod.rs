//! The IRC dialect (SPEC 3b): an RFC 2812 subset with IRCv3 `server-time`, `message-tags`
//! and `echo-message`, enough for irssi, weechat and ii.
//!
//! Be strict in what is sent: tags only to clients that negotiated them, full
//! `nick!user@host` sources, `PING :token` with the colon, the trailing parameter always
//! `:`-prefixed. A nick that returns after its connection died resumes the session it left
//! (its channels included), and JOIN replays the channel's last `chat.history_on_join`
//! messages, so a client that reconnects after a failover sees what it missed.
//!
//! `wire` holds the protocol text (parsing lines, writing replies and pushed messages);
//! `login` the registration: CAP negotiation, SASL PLAIN, PASS, NICK/USER.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batching::{SEND_BATCH, SendBatches};
use super::command::{MessageEvent, StoredMessage};
use super::conn::{
    ChatIo, CloseReason, Follow, Outbound, Outbox, Render, SendPipeline, Sends, Wire, counted,
    deliver, rate_limiter, reconnect_span,
};
use super::delivery::DeliveryFilter;
use super::fanout::Subscriber;
use super::json::rfc3339;
use super::lines::{Line, LineBuf, Verdict, read_line};
use super::names::{fold, is_room_target, is_valid_room, is_valid_user};
use super::service::{Attached, ChatError, ChatService, Outgoing};
use crate::node::VERSION;

mod login;
mod wire;

use wire::{IrcLine, IrcRender, MAX_LIST, parse, privmsg, raw, source, split_names, write_cost};

const DIALECT: &str = "irc";
const SERVER: &str = "raftchat";
/// A line's tags may take 8191 bytes; the rest, CRLF included, 512.
const MAX_TAGS: usize = 8191;
const MAX_BODY: usize = 510;
const SEND_QUEUE: usize = 1024;
/// Capabilities offered in `CAP LS`.
const CAPS: [&str; 4] = ["server-time", "message-tags", "echo-message", "sasl"];

/// The negotiated capabilities.
#[derive(Debug, Default, Clone, Copy)]
struct Caps {
    server_time: bool,
    message_tags: bool,
    echo: bool,
    sasl: bool,
}

/// Serves one IRC connection until it closes.
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
    let slow = raw("ERROR :Closing link: this client did not read what it was sent".into());
    let peer = io.peer.clone();
    let mut wire = Wire::open(io, &shutdown, &svc, slow, reason.clone());
    let closed = wire.closed.clone();
    let mut conn = IrcConn {
        peer,
        password: None,
        sasl_started: false,
        svc: svc.clone(),
        out: wire.out.clone(),
        closed: closed.clone(),
        reason: reason.clone(),
        caps: Caps::default(),
        negotiating: false,
        nick: None,
        user_given: false,
        attached: None,
        sends: None,
        next_id: 0,
        conn_id: format!("{:x}", rand::random::<u32>()),
    };
    let mut limiter = rate_limiter(&svc.config);
    let mut buf = LineBuf::default();
    let login_deadline = tokio::time::sleep(Duration::from_millis(svc.config.hello_timeout_ms));
    tokio::pin!(login_deadline);
    let ping_interval = Duration::from_millis(svc.config.irc_ping_interval_ms);
    let ping_timeout = Duration::from_millis(svc.config.irc_ping_timeout_ms);
    let mut last_heard = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(
        ping_interval.as_millis().clamp(10, 1000) as u64,
    ));
    loop {
        let line = tokio::select! {
            line = read_line(&mut wire.reader, &mut buf, MAX_TAGS + 1 + MAX_BODY) => line,
            _ = closed.cancelled() => {
                if shutdown.is_cancelled() {
                    reason.set("shutdown");
                }
                break;
            }
            _ = &mut login_deadline, if conn.attached.is_none() => {
                reason.set("login_timeout");
                conn.fatal("Registration timeout").await;
                break;
            }
            _ = tick.tick() => {
                match ping_sent {
                    Some(at) if at.elapsed() >= ping_timeout => {
                        reason.set("idle");
                        conn.fatal(&format!("Ping timeout: {} seconds", ping_timeout.as_secs_f64())).await;
                        break;
                    }
                    None if last_heard.elapsed() >= ping_interval => {
                        conn.send(raw(format!("PING :{SERVER}"))).await;
                        ping_sent = Some(Instant::now());
                    }
                    _ => {}
                }
                continue;
            }
        };
        match line {
            Ok(Line::Eof) => break,
            Err(_) => {
                reason.set("error");
                break;
            }
            Ok(Line::TooLong) | Ok(Line::Data) => {}
        }
        last_heard = Instant::now();
        ping_sent = None;
        let line = match line {
            Ok(Line::Data) => {
                // IRC has no single encoding; decode what is not UTF-8 lossily rather than fail.
                let text = String::from_utf8_lossy(buf.bytes()).into_owned();
                let body_len = if text.starts_with('@') {
                    text.split_once(' ').map_or(0, |(_, r)| r.len())
                } else {
                    text.len()
                };
                if body_len > MAX_BODY {
                    Err(true)
                } else {
                    parse(&text).ok_or(false)
                }
            }
            _ => Err(true),
        };
        // Every line is charged, junk too; a target list costs one per target.
        let cost = line.as_ref().map_or(1, write_cost);
        match limiter.check_n(cost) {
            Verdict::Allow => {}
            Verdict::Reject => {
                conn.svc.metrics.bad_request("rate_limited");
                conn.notice("You are sending too fast; slow down").await;
                continue;
            }
            Verdict::Close => {
                reason.set("abuse");
                conn.svc.metrics.bad_request("rate_limited");
                conn.fatal("Excess Flood").await;
                break;
            }
        }
        let line = match line {
            Ok(line) => line,
            Err(too_long) => {
                if too_long {
                    conn.numeric("417", &[], "Input line was too long").await;
                    conn.svc.metrics.bad_request("line_too_long");
                }
                continue;
            }
        };
        // Boxed: a command's state exists only while it runs, not in every idle connection.
        if !Box::pin(conn.handle(line)).await {
            break;
        }
    }
    let sends = conn.sends.take().and_then(Sends::into_pipeline);
    let attached = conn.attached.take();
    drop(conn);
    Box::pin(wire.finish(&svc, sends, attached.as_ref())).await;
}

struct IrcConn {
    svc: Arc<ChatService>,
    out: Outbox,
    closed: CancellationToken,
    reason: Arc<CloseReason>,
    caps: Caps,
    /// CAP LS/REQ was seen and CAP END not yet: registration waits.
    negotiating: bool,
    nick: Option<String>,
    user_given: bool,
    attached: Option<Attached>,
    sends: Option<Sends>,
    next_id: u64,
    conn_id: String,
    /// The client's address, for spans (`network.peer.address`).
    peer: String,
    /// From `PASS` or SASL PLAIN, checked at registration.
    password: Option<String>,
    /// `AUTHENTICATE PLAIN` was sent; the next AUTHENTICATE carries the credentials.
    sasl_started: bool,
}

impl IrcConn {
    fn me(&self) -> &str {
        self.nick.as_deref().unwrap_or("*")
    }

    async fn send(&self, line: Bytes) {
        let _ = self.out.send(Outbound::Frame(line)).await;
    }

    /// `:raftchat <code> <me> <params…> :<trailing>`
    async fn numeric(&self, code: &str, params: &[&str], trailing: &str) {
        let mut line = format!(":{SERVER} {code} {}", self.me());
        for p in params {
            line.push(' ');
            line.push_str(p);
        }
        line.push_str(" :");
        line.push_str(trailing);
        self.send(raw(line)).await;
    }

    async fn notice(&self, text: &str) {
        self.send(raw(format!(":{SERVER} NOTICE {} :{text}", self.me())))
            .await;
    }

    async fn fatal(&self, why: &str) {
        let _ = self
            .out
            .send(Outbound::Fatal(raw(format!("ERROR :Closing link: {why}"))))
            .await;
    }

    async fn need_params(&self, line: &IrcLine, n: usize) -> bool {
        if line.params.len() < n || line.params.iter().take(n).any(|p| p.is_empty()) {
            self.svc.metrics.bad_request("missing_field");
            self.numeric("461", &[&line.command], "Not enough parameters")
                .await;
            return false;
        }
        true
    }

    /// Handles one line; `false` closes the connection.
    async fn handle(&mut self, line: IrcLine) -> bool {
        let registered = self.attached.is_some();
        match line.command.as_str() {
            "CAP" => self.cap(&line).await,
            "PASS" if registered => self.numeric("462", &[], "You may not reregister").await,
            "PASS" => self.password = line.params.first().cloned(),
            "AUTHENTICATE" => self.authenticate(&line).await,
            "NICK" => self.nick(&line).await,
            "USER" if registered => self.numeric("462", &[], "You may not reregister").await,
            "USER" => {
                if self.need_params(&line, 4).await {
                    self.user_given = true;
                    self.try_register().await;
                }
            }
            "PING" => match line.params.first() {
                Some(token) => {
                    self.send(raw(format!(":{SERVER} PONG {SERVER} :{token}")))
                        .await
                }
                None => self.numeric("409", &[], "No origin specified").await,
            },
            "PONG" => {}
            "QUIT" => {
                self.reason.set("closed");
                self.fatal("Quit").await;
                return false;
            }
            _ if !registered => {
                self.svc.metrics.bad_request("not_logged_in");
                self.numeric("451", &[], "You have not registered").await;
            }
            "JOIN" => self.join(&line).await,
            "PART" => self.part(&line).await,
            "PRIVMSG" | "NOTICE" => self.privmsg(&line).await,
            "NAMES" => match line.params.first() {
                Some(rooms) => {
                    for room in rooms.split(',') {
                        self.names(room).await;
                    }
                }
                None => self.numeric("366", &["*"], "End of /NAMES list").await,
            },
            "TOPIC" => {
                if self.need_params(&line, 1).await {
                    let room = &line.params[0];
                    if self.svc.store.state().room_name(room).is_some() {
                        self.numeric("331", &[room], "No topic is set").await;
                    } else {
                        self.numeric("403", &[room], "No such channel").await;
                    }
                }
            }
            "LIST" => {
                self.numeric("321", &["Channel"], "Users  Name").await;
                let rooms = self.svc.rooms();
                if rooms.len() > MAX_LIST {
                    self.notice(&format!(
                        "LIST shows the first {MAX_LIST} of {} channels",
                        rooms.len()
                    ))
                    .await;
                }
                for (room, members) in rooms.into_iter().take(MAX_LIST) {
                    self.numeric("322", &[&room, &members.to_string()], "")
                        .await;
                }
                self.numeric("323", &[], "End of /LIST").await;
            }
            "WHO" => self.who(&line).await,
            "MOTD" => self.motd().await,
            "MODE" => {
                if self.need_params(&line, 1).await {
                    let target = &line.params[0];
                    if is_room_target(target) {
                        self.numeric("324", &[target, "+nt"], "").await;
                    } else if fold(target) == fold(self.me()) {
                        self.send(raw(format!(":{SERVER} 221 {} +i", self.me())))
                            .await;
                    }
                }
            }
            _ => {
                self.svc.metrics.bad_request("unknown_type");
                self.numeric("421", &[&line.command], "Unknown command")
                    .await;
            }
        }
        true
    }
    fn session(&self) -> &str {
        self.attached.as_ref().map_or("", |a| a.session.as_str())
    }

    async fn join(&mut self, line: &IrcLine) {
        if !self.need_params(line, 1).await {
            return;
        }
        let tagged = self.caps.server_time;
        for room in line.params[0].split(',').filter(|r| !r.is_empty()) {
            if !is_valid_room(room) {
                self.svc.metrics.bad_request("bad_name");
                self.numeric("403", &[room], "No such channel").await;
                continue;
            }
            let session = self.session().to_string();
            match self.svc.join(&session, room).await {
                Ok((name, members, index)) => {
                    let me = self.me().to_string();
                    self.send(raw(format!(":{} JOIN {name}", source(&me))))
                        .await;
                    self.numeric("331", &[&name], "No topic is set").await;
                    self.names_reply(&name, &members).await;
                    // What was said before this join (and is not delivered live).
                    let limit = self.svc.config.history_on_join;
                    if limit > 0
                        && let Ok((_, history)) = self
                            .svc
                            .history(&session, &name, Some(index), None, limit)
                            .await
                    {
                        for m in &history.messages {
                            self.send(privmsg(m, tagged, !tagged)).await;
                        }
                    }
                }
                Err(e) => self.chat_error(&e, room).await,
            }
        }
    }

    async fn part(&mut self, line: &IrcLine) {
        if !self.need_params(line, 1).await {
            return;
        }
        for room in line.params[0].split(',').filter(|r| !r.is_empty()) {
            let session = self.session().to_string();
            let member = self
                .svc
                .store
                .state()
                .session(&session)
                .is_some_and(|s| s.rooms.contains(&fold(room)));
            if !member {
                self.numeric("442", &[room], "You're not on that channel")
                    .await;
                continue;
            }
            match self.svc.leave(&session, room).await {
                Ok(name) => {
                    let me = self.me().to_string();
                    self.send(raw(format!(":{} PART {name}", source(&me))))
                        .await;
                }
                Err(e) => self.chat_error(&e, room).await,
            }
        }
    }

    async fn privmsg(&mut self, line: &IrcLine) {
        if !self.need_params(line, 2).await {
            return;
        }
        for target in line.params[0].split(',').filter(|t| !t.is_empty()) {
            if let Err(e) = ChatService::check_target(target) {
                self.chat_error(&e, target).await;
                continue;
            }
            self.next_id += 1;
            let message = Outgoing {
                id: format!("irc-{}-{}", self.conn_id, self.next_id),
                to: target.to_string(),
                text: line.params[1].clone(),
                received: Instant::now(),
            };
            if let Some(queue) = self.sends.as_mut().and_then(Sends::queue) {
                let _ = queue.send(message).await;
            }
        }
    }

    async fn names(&self, room: &str) {
        match self.svc.who(room) {
            Ok(members) if !members.is_empty() => {
                let name = self
                    .svc
                    .store
                    .state()
                    .room_name(room)
                    .unwrap_or(room)
                    .to_string();
                self.names_reply(&name, &members).await;
            }
            _ => self.numeric("366", &[room], "End of /NAMES list").await,
        }
    }

    async fn names_reply(&self, room: &str, members: &[String]) {
        // `:server 353 nick = #room :` then as many names as fit in one 512-byte line.
        let prefix = format!(":{SERVER} 353 {} = {room} :", self.me()).len();
        for names in split_names(prefix, members) {
            self.numeric("353", &["=", room], &names).await;
        }
        self.numeric("366", &[room], "End of /NAMES list").await;
    }

    async fn who(&self, line: &IrcLine) {
        let mask = line.params.first().cloned().unwrap_or_else(|| "*".into());
        let users: Vec<String> = if is_room_target(&mask) {
            self.svc.who(&mask).unwrap_or_default()
        } else {
            self.svc
                .store
                .state()
                .holder_of(&mask)
                .map(|(_, s)| vec![s.user.clone()])
                .unwrap_or_default()
        };
        let channel = if is_room_target(&mask) {
            mask.as_str()
        } else {
            "*"
        };
        if users.len() > MAX_LIST {
            self.notice(&format!(
                "WHO shows the first {MAX_LIST} of {} users",
                users.len()
            ))
            .await;
        }
        for user in users.iter().take(MAX_LIST) {
            self.numeric(
                "352",
                &[channel, user, SERVER, SERVER, user, "H"],
                &format!("0 {user}"),
            )
            .await;
        }
        self.numeric("315", &[&mask], "End of /WHO list").await;
    }

    async fn chat_error(&self, e: &ChatError, target: &str) {
        let (code, reason) = match e {
            ChatError::BadName(_) if is_room_target(target) => ("403", "bad_name"),
            ChatError::BadName(_) | ChatError::NoSuchUser(_) => ("401", "bad_name"),
            ChatError::NotMember(_) => ("404", "not_member"),
            ChatError::Limit { reason, .. } if *reason == "text_too_long" => {
                ("417", "text_too_long")
            }
            ChatError::Limit { reason, .. } if *reason == "too_many_rooms" => {
                ("405", "too_many_rooms")
            }
            _ => {
                self.notice(&format!("{target}: {e}")).await;
                return;
            }
        };
        // Limits are counted where they are decided.
        if !matches!(e, ChatError::Limit { .. }) {
            self.svc.metrics.bad_request(reason);
        }
        let text = match code {
            "403" => "No such channel",
            "401" => "No such nick/channel",
            "417" => "Input line was too long",
            "405" => "You have joined too many channels",
            _ => "Cannot send to channel",
        };
        self.numeric(code, &[target], text).await;
    }
}

/// Replicates a connection's messages in order; refusals come back as numerics.
async fn send_loop(
    svc: Arc<ChatService>,
    session: String,
    rx: mpsc::Receiver<Outgoing>,
    out: Outbox,
    nick: String,
) {
    let mut batches = SendBatches::new(rx);
    let mut batch = Vec::with_capacity(SEND_BATCH);
    while batches.next(&mut batch).await {
        let targets: Vec<String> = batch.iter().map(|m| m.to.clone()).collect();
        // Boxed: the write's state exists only while a batch is in flight.
        let results = Box::pin(svc.send_batch(&session, std::mem::take(&mut batch))).await;
        batches.written();
        for (target, result) in targets.iter().zip(results) {
            let line = match result {
                Ok(_) => continue,
                Err(ChatError::NotMember(_)) => {
                    svc.metrics.bad_request("not_member");
                    format!(":{SERVER} 404 {nick} {target} :Cannot send to channel")
                }
                Err(ChatError::NoSuchUser(_)) => {
                    svc.metrics.bad_request("bad_name");
                    format!(":{SERVER} 401 {nick} {target} :No such nick/channel")
                }
                Err(e) => format!(":{SERVER} NOTICE {nick} :{target}: not delivered: {e}"),
            };
            if out.send(Outbound::Frame(raw(line))).await.is_err() {
                return;
            }
        }
    }
}
