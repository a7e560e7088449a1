//! The IRC dialect (SPEC 3b): an RFC 2812 subset with IRCv3 `server-time`, `message-tags`
//! and `echo-message`, enough for irssi, weechat and ii.
//!
//! Be strict in what is sent: tags only to clients that negotiated them, full
//! `nick!user@host` sources, `PING :token` with the colon, the trailing parameter always
//! `:`-prefixed. A nick that returns after its connection died resumes the session it left
//! (its channels included), and JOIN replays the channel's last `chat.history_on_join`
//! messages, so a client that reconnects after a failover sees what it missed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::command::{MessageEvent, StoredMessage};
use super::conn::{
    ChatIo, CloseReason, Follow, Outbound, Outbox, Render, SendPipeline, Sends, Wire, counted,
    deliver, rate_limiter,
};
use super::delivery::DeliveryFilter;
use super::fanout::Subscriber;
use super::json::rfc3339;
use super::lines::{Line, Verdict, read_line};
use super::names::{fold, is_room_target, is_valid_room, is_valid_user};
use super::service::{Attached, ChatError, ChatService, Outgoing};
use crate::node::VERSION;

const DIALECT: &str = "irc";
const SERVER: &str = "raftchat";
/// A line's tags may take 8191 bytes; the rest, CRLF included, 512.
const MAX_TAGS: usize = 8191;
const MAX_BODY: usize = 510;
const SEND_QUEUE: usize = 1024;
const SEND_BATCH: usize = 256;
/// Capabilities offered in `CAP LS`.
const CAPS: [&str; 4] = ["server-time", "message-tags", "echo-message", "sasl"];

/// One parsed client line.
#[derive(Debug, PartialEq)]
pub struct IrcLine {
    pub command: String,
    pub params: Vec<String>,
}

/// What a command costs the rate limit: one per target of a target list.
fn write_cost(line: &IrcLine) -> u32 {
    match line.command.as_str() {
        "PRIVMSG" | "NOTICE" | "JOIN" | "PART" => line.params.first().map_or(1, |targets| {
            targets.split(',').filter(|t| !t.is_empty()).count().max(1)
        }) as u32,
        _ => 1,
    }
}

/// Splits a line into command and parameters (tags and source are dropped). `None` for a
/// line with no command.
pub fn parse(line: &str) -> Option<IrcLine> {
    let mut rest = line.trim_start();
    if let Some(tagged) = rest.strip_prefix('@') {
        rest = tagged.split_once(' ').map_or("", |(_, r)| r).trim_start();
    }
    if let Some(sourced) = rest.strip_prefix(':') {
        rest = sourced.split_once(' ').map_or("", |(_, r)| r).trim_start();
    }
    let (command, mut rest) = match rest.split_once(' ') {
        Some((c, r)) => (c, r),
        None => (rest, ""),
    };
    if command.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        if let Some(trailing) = rest.strip_prefix(':') {
            params.push(trailing.to_string());
            break;
        }
        match rest.split_once(' ') {
            Some((p, r)) => {
                params.push(p.to_string());
                rest = r;
            }
            None => {
                params.push(rest.to_string());
                break;
            }
        }
    }
    Some(IrcLine {
        command: command.to_ascii_uppercase(),
        params,
    })
}

/// The negotiated capabilities.
#[derive(Debug, Default, Clone, Copy)]
struct Caps {
    server_time: bool,
    message_tags: bool,
    echo: bool,
    sasl: bool,
}

/// Text safe for one IRC line: no CR or LF, cut to fit the 512-byte limit.
fn line_safe(text: &str, budget: usize) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if clean.len() > budget {
        let mut cut = budget;
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
    }
    clean
}

fn source(nick: &str) -> String {
    format!("{nick}!{nick}@{SERVER}")
}

/// `:from!from@raftchat PRIVMSG target :text`, with `time`/`msgid` tags when `tagged`, and
/// an `[HH:MM:SS]` prefix on the text when `stamp` (replays to clients without server-time).
fn privmsg(m: &StoredMessage, tagged: bool, stamp: bool) -> Bytes {
    let head = format!(":{} PRIVMSG {} :", source(&m.from), m.to);
    let ts = rfc3339(m.ts_ms);
    let text = if stamp {
        format!("[{}] {}", ts.get(11..19).unwrap_or(""), m.text)
    } else {
        m.text.clone()
    };
    let body = format!(
        "{head}{}",
        line_safe(&text, MAX_BODY.saturating_sub(head.len()))
    );
    let line = if tagged {
        format!("@time={ts};msgid={} {body}\r\n", m.index)
    } else {
        format!("{body}\r\n")
    };
    Bytes::from(line)
}

fn raw(line: String) -> Bytes {
    Bytes::from(format!("{line}\r\n"))
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
    let mut buf = Vec::new();
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
                        reason.set("login_timeout");
                        conn.fatal(&format!("Ping timeout: {} seconds", ping_timeout.as_secs())).await;
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
                let text = String::from_utf8_lossy(&buf).into_owned();
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

    /// SASL PLAIN (the only mechanism): `AUTHENTICATE PLAIN`, then one base64 line of
    /// `authzid NUL authcid NUL password`. The password is checked at registration, against
    /// the account of the nick (which must equal authcid).
    async fn authenticate(&mut self, line: &IrcLine) {
        let arg = line.params.first().cloned().unwrap_or_default();
        if self.attached.is_some() {
            self.numeric("907", &[], "You have already authenticated")
                .await;
            return;
        }
        if !self.caps.sasl {
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        }
        if arg.eq_ignore_ascii_case("PLAIN") {
            self.sasl_started = true;
            self.send(raw("AUTHENTICATE +".into())).await;
            return;
        }
        if !self.sasl_started {
            self.numeric("908", &["PLAIN"], "are available SASL mechanisms")
                .await;
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        }
        self.sasl_started = false;
        let decoded = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(arg.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let mut parts = decoded.as_deref().unwrap_or("").split('\0');
        let (_authz, authc, password) = (parts.next(), parts.next(), parts.next());
        let (Some(authc), Some(password)) = (authc, password) else {
            self.svc.metrics.bad_request("auth_failed");
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        };
        let hash = self
            .svc
            .store
            .state()
            .account(authc)
            .map(|a| a.hash.clone());
        let candidate = password.to_string();
        let ok = match hash {
            Some(hash) => {
                tokio::task::spawn_blocking(move || super::accounts::verify(&candidate, &hash))
                    .await
                    .unwrap_or(false)
            }
            None => false,
        };
        if !ok {
            self.svc.metrics.bad_request("auth_failed");
            self.numeric("904", &[], "SASL authentication failed").await;
            return;
        }
        self.password = Some(password.to_string());
        let me = self.me().to_string();
        self.numeric(
            "900",
            &[&format!("{me}!{authc}@{SERVER}"), authc],
            &format!("You are now logged in as {authc}"),
        )
        .await;
        self.numeric("903", &[], "SASL authentication successful")
            .await;
    }

    async fn cap(&mut self, line: &IrcLine) {
        let sub = line
            .params
            .first()
            .map(|s| s.to_ascii_uppercase())
            .unwrap_or_default();
        match sub.as_str() {
            "LS" => {
                if self.attached.is_none() {
                    self.negotiating = true;
                }
                self.send(raw(format!(
                    ":{SERVER} CAP {} LS :{}",
                    self.me(),
                    CAPS.join(" ")
                )))
                .await;
            }
            "LIST" => {
                let mut on = Vec::new();
                if self.caps.server_time {
                    on.push("server-time");
                }
                if self.caps.message_tags {
                    on.push("message-tags");
                }
                if self.caps.echo {
                    on.push("echo-message");
                }
                self.send(raw(format!(
                    ":{SERVER} CAP {} LIST :{}",
                    self.me(),
                    on.join(" ")
                )))
                .await;
            }
            "REQ" => {
                if self.attached.is_none() {
                    self.negotiating = true;
                }
                let wanted = line.params.get(1).cloned().unwrap_or_default();
                let all_known = wanted
                    .split_whitespace()
                    .all(|c| CAPS.contains(&c.trim_start_matches('-')));
                if all_known {
                    for cap in wanted.split_whitespace() {
                        let (on, name) = match cap.strip_prefix('-') {
                            Some(n) => (false, n),
                            None => (true, cap),
                        };
                        match name {
                            "server-time" => self.caps.server_time = on,
                            "message-tags" => self.caps.message_tags = on,
                            "sasl" => self.caps.sasl = on,
                            _ => self.caps.echo = on,
                        }
                    }
                    self.send(raw(format!(":{SERVER} CAP {} ACK :{wanted}", self.me())))
                        .await;
                } else {
                    self.send(raw(format!(":{SERVER} CAP {} NAK :{wanted}", self.me())))
                        .await;
                }
            }
            "END" => {
                self.negotiating = false;
                self.try_register().await;
            }
            _ => self.numeric("410", &[&sub], "Invalid CAP command").await,
        }
    }

    async fn nick(&mut self, line: &IrcLine) {
        let Some(nick) = line.params.first().filter(|n| !n.is_empty()) else {
            self.svc.metrics.bad_request("missing_field");
            self.numeric("431", &[], "No nickname given").await;
            return;
        };
        if !is_valid_user(nick) {
            self.svc.metrics.bad_request("bad_name");
            self.numeric("432", &[nick], "Erroneous nickname").await;
            return;
        }
        if let Some(a) = &self.attached {
            if fold(nick) != fold(&a.user) {
                self.notice("Changing nicks is not supported; reconnect with the new nick")
                    .await;
            }
            return;
        }
        self.nick = Some(nick.clone());
        self.try_register().await;
    }

    /// Registers once NICK and USER are in and CAP negotiation (if any) has ended.
    async fn try_register(&mut self) {
        if self.attached.is_some() || self.negotiating || !self.user_given {
            return;
        }
        let Some(nick) = self.nick.clone() else {
            return;
        };
        let password = self.password.clone();
        let attached = match self
            .svc
            .attach(&nick, None, true, password.as_deref())
            .await
        {
            Ok(a) => a,
            Err(ChatError::NameTaken(_)) => {
                self.nick = None;
                self.send(raw(format!(
                    ":{SERVER} 433 * {nick} :Nickname is already in use"
                )))
                .await;
                return;
            }
            Err(ChatError::BadName(_)) => {
                self.nick = None;
                self.numeric("432", &[&nick], "Erroneous nickname").await;
                return;
            }
            Err(e @ (ChatError::AuthRequired | ChatError::AuthFailed)) => {
                self.numeric("464", &[], &format!("Password incorrect: {e}"))
                    .await;
                self.fatal(&e.to_string()).await;
                self.closed.cancel();
                return;
            }
            Err(e) => {
                self.fatal(&format!("cannot register now: {e}")).await;
                self.closed.cancel();
                return;
            }
        };
        self.svc.register(&attached);
        self.nick = Some(attached.user.clone());
        let me = attached.user.clone();
        self.numeric(
            "001",
            &[],
            &format!("Welcome to the raftchat Network, {}", source(&me)),
        )
        .await;
        self.numeric(
            "002",
            &[],
            &format!("Your host is {SERVER}, running version {VERSION}"),
        )
        .await;
        self.numeric("003", &[], "This server was created with Raft")
            .await;
        self.send(raw(format!(":{SERVER} 004 {me} {SERVER} {VERSION} i nt")))
            .await;
        self.numeric(
            "005",
            &[
                "NETWORK=raftchat",
                "CASEMAPPING=ascii",
                "CHANTYPES=#",
                "NICKLEN=30",
                "CHANNELLEN=50",
                "PREFIX=()",
                "CHANMODES=,,,nt",
            ],
            "are supported by this server",
        )
        .await;
        self.motd().await;
        let sub = self.svc.store.subscribe(Subscriber {
            session: &attached.session,
            session_id: attached.id,
            user: &me,
        });
        let rooms = sub.rooms;
        if attached.resumed {
            self.svc
                .metrics
                .client_reconnects
                .with_label_values(&[DIALECT])
                .inc();
            let _span = tracing::info_span!(
                "chat.client.reconnect",
                otel.kind = "server",
                network.peer.address = %self.peer,
                dialect = DIALECT,
                // The session's public id: the token is a secret and never leaves the node.
                session = attached.id,
                node = self.svc.node_id,
                replayed = 0u64,
                deduplicated = 0u64,
            );
        }
        let filter = DeliveryFilter::new(
            attached.session.clone(),
            attached.id,
            attached.attachment,
            &me,
            rooms,
            sub.applied,
        );
        let follow = Follow {
            session: attached.session.clone(),
            user: me.clone(),
            filter,
            events: sub.events,
        };
        let render = IrcRender {
            caps: self.caps,
            me,
        };
        tokio::spawn(deliver(
            self.svc.clone(),
            follow,
            render,
            self.out.clone(),
            self.closed.clone(),
            self.reason.clone(),
        ));
        let (svc, session, out, nick) = (
            self.svc.clone(),
            attached.session.clone(),
            self.out.clone(),
            self.nick.clone().unwrap_or_default(),
        );
        self.sends = Some(Sends::new(move || {
            let (tx, rx) = mpsc::channel(SEND_QUEUE);
            let task = tokio::spawn(send_loop(svc, session, rx, out, nick));
            SendPipeline { queue: tx, task }
        }));
        self.attached = Some(attached);
    }

    async fn motd(&self) {
        match &self.svc.config.motd {
            Some(motd) => {
                self.numeric("375", &[], &format!("- {SERVER} Message of the day -"))
                    .await;
                for line in motd.lines() {
                    self.numeric("372", &[], &format!("- {line}")).await;
                }
                self.numeric("376", &[], "End of /MOTD command.").await;
            }
            None => self.numeric("422", &[], "MOTD File is missing").await,
        }
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
    mut rx: mpsc::Receiver<Outgoing>,
    out: Outbox,
    nick: String,
) {
    let mut batch = Vec::with_capacity(SEND_BATCH);
    while rx.recv_many(&mut batch, SEND_BATCH).await > 0 {
        let targets: Vec<String> = batch.iter().map(|m| m.to.clone()).collect();
        // Boxed: the write's state exists only while a batch is in flight.
        let results = Box::pin(svc.send_batch(&session, std::mem::take(&mut batch))).await;
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

/// IRC lines for the shared delivery loop.
struct IrcRender {
    caps: Caps,
    me: String,
}

impl IrcRender {
    fn tagged(&self) -> bool {
        self.caps.server_time || self.caps.message_tags
    }

    /// Without echo-message a client prints its own lines itself.
    fn skip(&self, m: &StoredMessage) -> bool {
        !self.caps.echo && fold(&m.from) == fold(&self.me)
    }
}

impl Render for IrcRender {
    fn message(&self, m: &MessageEvent) -> Option<Bytes> {
        if self.skip(&m.message) {
            return None;
        }
        let cache = if self.tagged() { &m.irc_tagged } else { &m.irc };
        Some(
            cache
                .get_or_init(|| privmsg(&m.message, self.tagged(), false))
                .clone(),
        )
    }

    fn stored(&self, m: &StoredMessage) -> Option<Bytes> {
        (!self.skip(m)).then(|| privmsg(m, self.tagged(), !self.tagged()))
    }

    fn presence(&self, room: &str, user: &str, joined: bool) -> Bytes {
        let verb = if joined { "JOIN" } else { "PART" };
        raw(format!(":{} {verb} {room}", source(user)))
    }

    fn too_slow(&self, _behind: u64) -> Bytes {
        raw("ERROR :Closing link: client too slow".into())
    }

    fn replaced(&self, why: &str) -> Bytes {
        raw(format!("ERROR :Closing link: {why}"))
    }

    fn unavailable(&self, why: &str) -> Bytes {
        raw(format!("ERROR :Closing link: {why}"))
    }
}

/// Most rooms a LIST, users a WHO answers with (each is a line; the output budget bounds the
/// rest).
const MAX_LIST: usize = 1000;

/// An IRC line is at most 512 bytes with its CRLF.
const MAX_LINE: usize = 512;

/// `names` in space-separated runs that fit after a `prefix_len`-byte prefix in one line.
fn split_names(prefix_len: usize, names: &[String]) -> Vec<String> {
    let budget = MAX_LINE.saturating_sub(prefix_len + 2).max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for name in names {
        if !line.is_empty() && line.len() + 1 + name.len() > budget {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(name);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_split_to_fit_512_byte_lines() {
        let names: Vec<String> = (0..300).map(|i| format!("user{i:04}")).collect();
        let prefix = ":raftchat 353 somebody = #big :".len();
        let lines = split_names(prefix, &names);
        assert!(lines.len() > 1);
        for l in &lines {
            assert!(
                prefix + l.len() + 2 <= 512,
                "{} bytes",
                prefix + l.len() + 2
            );
        }
        let back: Vec<&str> = lines.iter().flat_map(|l| l.split(' ')).collect();
        assert_eq!(back, names.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(split_names(prefix, &[]), vec![String::new()]);
    }

    use super::*;

    #[test]
    fn parses_tags_source_and_trailing() {
        let l = parse("@label=x :nick!u@h PRIVMSG #chan :hello there").unwrap();
        assert_eq!(l.command, "PRIVMSG");
        assert_eq!(l.params, vec!["#chan", "hello there"]);
        let l = parse("user alice 0 * :Alice Liddell").unwrap();
        assert_eq!(l.command, "USER");
        assert_eq!(l.params, vec!["alice", "0", "*", "Alice Liddell"]);
        assert_eq!(parse("PING").unwrap().params, Vec::<String>::new());
        assert_eq!(parse("JOIN  #a,#b").unwrap().params, vec!["#a,#b"]);
        assert!(parse("   ").is_none());
    }

    #[test]
    fn relayed_lines_are_single_and_bounded() {
        let m = StoredMessage {
            index: 7,
            to: "#r".into(),
            from: "alice".into(),
            id: "1".into(),
            text: format!("two\nlines {}", "x".repeat(2000)),
            ts_ms: 0,
            parties: Vec::new(),
        };
        let plain = privmsg(&m, false, false);
        let text = std::str::from_utf8(&plain).unwrap();
        assert!(text.starts_with(":alice!alice@raftchat PRIVMSG #r :two lines"));
        assert!(text.len() <= 512);
        assert_eq!(text.matches("\r\n").count(), 1);
        let tagged = privmsg(&m, true, false);
        assert!(
            std::str::from_utf8(&tagged)
                .unwrap()
                .starts_with("@time=1970-01-01T00:00:00.000Z;msgid=7 :alice!")
        );
    }
}
