//! The task that owns a client's connection: connects, says hello (resuming the session),
//! sends what the application queued, hands what arrives to the application (`events`),
//! and reconnects when the connection is lost or goes silent.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::conn::{ClientError, FrameReader, FrameWriter, SendFrame, connect};
use super::events;
use super::outstanding::{self, Outstanding};
use super::{ClientConfig, Command, Event, Frame, Message, Reconnect, backoff};

struct Pending {
    id: String,
    to: String,
    text: String,
}

impl Pending {
    /// What it was counted as when the application sent it.
    fn cost(&self) -> usize {
        outstanding::cost(&self.id, &self.to, &self.text)
    }
}

pub(super) struct Driver {
    config: ClientConfig,
    events: events::EventSender,
    outstanding: Arc<Outstanding>,
    /// (node id once known, chat address, healthy as last reported).
    known: Vec<(Option<u64>, String, bool)>,
    session: Option<String>,
    /// Highest message index handed to the application.
    last_index: u64,
    /// Sent or queued, not yet acknowledged, in send order.
    unacked: VecDeque<Pending>,
    rooms: BTreeSet<String>,
    node: Option<u64>,
    /// When this client last gave up waiting for the answer to a resuming `hello`. That hello
    /// may still be committed later, after a newer one, and take the session over from the
    /// connection that replaced it: that is not someone else's claim.
    gave_up_on_resume: Option<Instant>,
}

/// Sends one connection could not get taken yet (no leader in time, rate limited), and when
/// to send them again. A new connection sends every unacknowledged one anyway.
#[derive(Default)]
struct Deferred {
    ids: HashSet<String>,
    retry_at: Option<tokio::time::Instant>,
}

/// How long a resuming `hello` this client gave up on may still take its session over: the
/// server retries a write for `chat.write_timeout_ms` (5 s by default) and then some.
const STALE_RESUME_WINDOW: Duration = Duration::from_secs(30);

/// How a connection ended.
enum Ended {
    Lost(String),
    /// The application dropped its handle.
    Closed,
    /// Nothing can fix it by reconnecting.
    Fatal(String),
}

impl Driver {
    pub(super) fn new(
        config: ClientConfig,
        events: events::EventSender,
        outstanding: Arc<Outstanding>,
    ) -> Driver {
        Driver {
            known: config
                .servers
                .iter()
                .map(|s| (None, s.clone(), true))
                .collect(),
            config,
            events,
            outstanding,
            session: None,
            last_index: 0,
            unacked: VecDeque::new(),
            rooms: BTreeSet::new(),
            node: None,
            gave_up_on_resume: None,
        }
    }

    /// Servers to try, healthy ones first, starting after the one that just failed.
    fn candidates(&self) -> Vec<String> {
        let start = self
            .node
            .and_then(|n| self.known.iter().position(|(id, _, _)| *id == Some(n)))
            .map_or(0, |p| p + 1);
        let mut ordered: Vec<&(Option<u64>, String, bool)> = self
            .known
            .iter()
            .cycle()
            .skip(start)
            .take(self.known.len())
            .collect();
        ordered.sort_by_key(|(id, _, healthy)| (!healthy, *id == self.node && self.node.is_some()));
        ordered
            .into_iter()
            .map(|(_, addr, _)| addr.clone())
            .collect()
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        self.drive(&mut commands).await;
        // The last events (a failure, say) wait for the application's room like the others.
        self.events.finish().await;
    }

    /// Connects, serves and reconnects until the application or the retry limit ends it.
    async fn drive(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) {
        let mut attempt: u32 = 0;
        let mut lost_at: Option<Instant> = None;
        let mut first = true;
        loop {
            let mut connected = None;
            let mut last_error = String::from("no servers");
            for server in self.candidates() {
                match self.open(&server).await {
                    Ok(c) => {
                        connected = Some((server, c));
                        break;
                    }
                    Err(e) => last_error = e,
                }
            }
            let Some((server, (mut reader, mut writer, welcome))) = connected else {
                attempt += 1;
                if self.config.max_attempts.is_some_and(|max| attempt >= max) {
                    self.events.emit(Event::Failed(format!(
                        "gave up after {attempt} attempts: {last_error}"
                    )));
                    return;
                }
                let delay = backoff(
                    attempt,
                    self.config.backoff_initial,
                    self.config.backoff_max,
                );
                self.events.emit(Event::Retrying {
                    attempt,
                    error: last_error,
                    retry_in: delay,
                });
                // Keep taking commands while waiting, so nothing the app sends is lost.
                let wake = tokio::time::sleep(delay);
                tokio::pin!(wake);
                loop {
                    tokio::select! {
                        _ = &mut wake => break,
                        cmd = commands.recv() => match cmd {
                            Some(cmd) => self.queue(cmd),
                            None => return,
                        },
                    }
                }
                continue;
            };
            attempt = 0;
            let from_node = self.node;
            let node = welcome["node"].as_u64().unwrap_or(0);
            self.node = Some(node);
            self.learn_nodes(&welcome);
            let replayed = welcome["replayed"].as_u64().unwrap_or(0) as usize;
            let previous = self.session.take();
            self.session = welcome["session"].as_str().map(String::from);
            let resumed = welcome["resumed"]
                .as_bool()
                .unwrap_or(previous.is_some() && previous == self.session);
            if let Some(previous) = previous.filter(|_| !resumed) {
                // Re-sending under a new session would store again what the old one stored.
                // Sends the application made meanwhile still wait in the queue.
                let unacked: Vec<String> = self
                    .unacked
                    .drain(..)
                    .map(|p| {
                        self.outstanding.release(p.cost());
                        p.id
                    })
                    .collect();
                self.events.emit(Event::SessionLost {
                    previous,
                    session: self.session.clone().unwrap_or_default(),
                    unacked,
                });
            }
            let resent = self.unacked.len();
            if first {
                self.events.emit(Event::Connected {
                    node,
                    server: server.clone(),
                    session: self.session.clone().unwrap_or_default(),
                });
                first = false;
            } else {
                self.events.emit(Event::Reconnected(Reconnect {
                    from_node,
                    to_node: node,
                    downtime: lost_at.map_or(Duration::ZERO, |t| t.elapsed()),
                    replayed,
                    resent,
                }));
            }
            let ended = self.serve(&mut reader, &mut writer, commands).await;
            self.events.flush();
            match ended {
                Ended::Lost(reason) => {
                    lost_at = Some(Instant::now());
                    self.events.emit(Event::Disconnected {
                        node: self.node,
                        reason,
                    });
                }
                Ended::Closed => return,
                Ended::Fatal(reason) => {
                    self.events.emit(Event::Failed(reason));
                    return;
                }
            }
        }
    }

    /// Connects and says hello (resuming the session when there is one).
    async fn open(&mut self, server: &str) -> Result<(FrameReader, FrameWriter, Value), String> {
        let hello_sent = std::sync::atomic::AtomicBool::new(false);
        let connecting = async {
            let (mut reader, mut writer) = connect(server).await.map_err(|e| e.to_string())?;
            let mut hello = json!({"type": "hello", "user": self.config.user});
            if let Some(password) = &self.config.password {
                hello["password"] = json!(password);
            }
            if !self.config.echo {
                hello["echo"] = json!(false);
            }
            if let Some(session) = &self.session {
                hello["session"] = json!(session);
                hello["resume_from"] = json!(self.last_index);
            }
            writer.send(&hello).await.map_err(|e| e.to_string())?;
            hello_sent.store(true, Ordering::Relaxed);
            let welcome = reader
                .reply("welcome", self.config.read_timeout * 4)
                .await
                .map_err(|e| e.to_string())?;
            Ok((reader, writer, welcome))
        };
        let opened = tokio::time::timeout(self.config.read_timeout * 5, connecting)
            .await
            .map_err(|_| format!("{server}: no welcome in time"))
            .and_then(|r| r);
        if opened.is_err() && hello_sent.load(Ordering::Relaxed) && self.session.is_some() {
            self.gave_up_on_resume = Some(Instant::now());
        }
        opened
    }

    fn learn_nodes(&mut self, welcome: &Value) {
        let Some(nodes) = welcome["nodes"].as_array() else {
            return;
        };
        let learned: Vec<(Option<u64>, String, bool)> = nodes
            .iter()
            .filter_map(|n| {
                Some((
                    n["id"].as_u64(),
                    n["chat"].as_str()?.to_string(),
                    n["healthy"].as_bool().unwrap_or(true),
                ))
            })
            .collect();
        if !learned.is_empty() {
            self.known = learned;
        }
    }

    fn queue(&mut self, cmd: Command) {
        match cmd {
            Command::Send { id, to, text } => self.unacked.push_back(Pending { id, to, text }),
            Command::Join(room) => {
                self.rooms.insert(room);
            }
            Command::Leave(room) => {
                self.rooms.remove(&room);
            }
            Command::Who(_) | Command::History { .. } => {}
        }
    }

    /// A pushed message, handed on unless it was delivered before.
    fn delivered(&mut self, message: Message) {
        // Replays and re-sends can repeat what was delivered: index order decides.
        if message.index > self.last_index {
            self.last_index = message.index;
            self.events.hold(Event::Message(message));
        }
    }

    /// `id` is acknowledged at `index` (acks come in send order: the first unacked is it).
    fn acked(&mut self, id: String, index: u64) {
        if let Some(pos) = self.unacked.iter().position(|p| p.id == id) {
            if let Some(p) = self.unacked.remove(pos) {
                self.outstanding.release(p.cost());
            }
            self.events.hold(Event::Acked { id, index });
        }
    }

    fn send_frame(pending: &Pending) -> SendFrame<'_> {
        SendFrame {
            kind: "send",
            to: &pending.to,
            id: &pending.id,
            text: &pending.text,
        }
    }

    /// Runs one connection until it ends.
    async fn serve(
        &mut self,
        reader: &mut FrameReader,
        writer: &mut FrameWriter,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Ended {
        let lost = |e: ClientError| Ended::Lost(e.to_string());
        // A new session has no rooms, and a join asked for while disconnected was never sent:
        // join them all (joining a room again is harmless).
        self.rooms.extend(self.config.rooms.iter().cloned());
        for room in &self.rooms {
            if let Err(e) = writer.feed(&json!({"type": "join", "room": room})).await {
                return lost(e);
            }
        }
        for pending in &self.unacked {
            if let Err(e) = writer.feed(&Self::send_frame(pending)).await {
                return lost(e);
            }
        }
        if let Err(e) = writer.flush().await {
            return lost(e);
        }
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        // One timer for the read timeout, moved on when it fires rather than set per frame
        // (a fan-out receiver reads hundreds of thousands of frames a second).
        let read_deadline = tokio::time::sleep(self.config.read_timeout);
        tokio::pin!(read_deadline);
        let mut deferred = Deferred::default();
        loop {
            // A frame already read from the socket is handled before anything is waited for,
            // and the messages and acks held meanwhile are handed over together.
            let buffered = reader.frame_buffered();
            if !buffered {
                self.events.flush();
            }
            // The application's queue is full: read nothing until it takes something.
            let backlogged = self.events.backlogged();
            let room_waiter = self.events.room_waiter();
            let retry_at = deferred.retry_at;
            tokio::select! {
                _ = events::room(room_waiter), if backlogged => {
                    // Hands over what now fits (or lets go, if the application is gone).
                    self.events.flush();
                    // The server was not read meanwhile: its silence is not counted.
                    last_heard = Instant::now();
                }
                frame = reader.next_frame(), if !backlogged => {
                    let frame = match frame {
                        Err(e) => return lost(e),
                        Ok(None) => return Ended::Lost("the server closed the connection".into()),
                        Ok(Some(frame)) => frame,
                    };
                    // Frames that came in one read were heard together (a clock read per
                    // frame costs a busy receiver more than decoding some of them).
                    if !buffered {
                        last_heard = Instant::now();
                    }
                    if let Some(ended) = self.on_frame(frame, &mut deferred) {
                        return ended;
                    }
                }
                () = &mut read_deadline, if !backlogged => {
                    let due = last_heard + self.config.read_timeout;
                    if Instant::now() >= due {
                        return Ended::Lost(format!("no answer for {:?}", self.config.read_timeout));
                    }
                    read_deadline.as_mut().reset(due.into());
                }
                cmd = commands.recv() => {
                    // A write can wait for the socket: what was read goes to the application
                    // first (so in the two branches below).
                    self.events.flush();
                    let Some(cmd) = cmd else { return Ended::Closed };
                    // Batch whatever else is queued into the same write.
                    let mut next = Some(cmd);
                    while let Some(cmd) = next {
                        let fed = match &cmd {
                            Command::Send { id, to, text } => {
                                let frame = SendFrame { kind: "send", to, id, text };
                                writer.feed(&frame).await
                            }
                            other => writer.feed(&command_frame(other)).await,
                        };
                        self.queue(cmd);
                        if let Err(e) = fed {
                            return lost(e);
                        }
                        next = commands.try_recv().ok();
                    }
                    if let Err(e) = writer.flush().await {
                        return lost(e);
                    }
                }
                _ = ping.tick() => {
                    self.events.flush();
                    if let Err(e) = writer.send(&json!({"type": "ping"})).await {
                        return lost(e);
                    }
                }
                () = sleep_until(retry_at), if retry_at.is_some() => {
                    self.events.flush();
                    // Try what the cluster could not take again (the rest is on its way).
                    let ids = std::mem::take(&mut deferred).ids;
                    for pending in self.unacked.iter().filter(|p| ids.contains(&p.id)) {
                        if let Err(e) = writer.feed(&Self::send_frame(pending)).await {
                            return lost(e);
                        }
                    }
                    if let Err(e) = writer.flush().await {
                        return lost(e);
                    }
                }
            }
        }
    }

    /// Handles one frame; `Some` ends the connection.
    fn on_frame(&mut self, frame: Frame, deferred: &mut Deferred) -> Option<Ended> {
        let frame = match frame {
            Frame::Message(message) => {
                self.delivered(message);
                return None;
            }
            Frame::Ack { id, index } => {
                self.acked(id, index);
                return None;
            }
            Frame::Other(frame) => frame,
        };
        let text = |k: &str| frame[k].as_str().unwrap_or("").to_string();
        match frame["type"].as_str() {
            Some("message") => self.delivered(parse_message(&frame)),
            Some("ack") => self.acked(text("id"), frame["index"].as_u64().unwrap_or(0)),
            Some("presence") => self.events.emit(Event::Presence {
                room: text("room"),
                user: text("user"),
                joined: frame["state"] == "joined",
            }),
            Some("joined") => self.events.emit(Event::Joined {
                room: text("room"),
                members: strings(&frame["members"]),
            }),
            Some("left") => self.events.emit(Event::Left { room: text("room") }),
            Some("members") => self.events.emit(Event::Members {
                room: text("room"),
                users: strings(&frame["users"]),
            }),
            Some("history") => self.events.emit(Event::History {
                room: text("room"),
                messages: frame["messages"]
                    .as_array()
                    .map(|ms| ms.iter().map(parse_message).collect())
                    .unwrap_or_default(),
            }),
            Some("error") => {
                let code = text("code");
                let id = frame["id"].as_str().map(String::from);
                match (code.as_str(), &id) {
                    // No leader in time, or rate limited: keep it and try it again shortly.
                    ("unavailable" | "rate_limited", Some(id)) => {
                        // Only what it holds: a server cannot grow the set.
                        if self.unacked.iter().any(|p| &p.id == id) {
                            deferred.ids.insert(id.clone());
                        }
                        deferred.retry_at.get_or_insert_with(|| {
                            tokio::time::Instant::now() + Duration::from_millis(200)
                        });
                        self.events.emit(Event::Deferred {
                            id: id.clone(),
                            code,
                            message: text("message"),
                        });
                        return None;
                    }
                    // The connection is being closed for a reason a new one fixes.
                    ("unavailable", None) => return Some(Ended::Lost(text("message"))),
                    // This client's own earlier resume, committed late, took the session
                    // over: resume again (the newest resume wins).
                    ("name_taken", None)
                        if self
                            .gave_up_on_resume
                            .is_some_and(|t| t.elapsed() < STALE_RESUME_WINDOW) =>
                    {
                        return Some(Ended::Lost(text("message")));
                    }
                    ("name_taken", None) => return Some(Ended::Fatal(text("message"))),
                    (_, Some(id)) => {
                        if let Some(pos) = self.unacked.iter().position(|p| &p.id == id)
                            && let Some(p) = self.unacked.remove(pos)
                        {
                            self.outstanding.release(p.cost());
                        }
                    }
                    _ => {}
                }
                self.events.emit(Event::Refused {
                    code,
                    message: text("message"),
                    id,
                });
            }
            _ => {}
        }
        None
    }
}

fn command_frame(cmd: &Command) -> Value {
    match cmd {
        Command::Send { id, to, text } => json!({"type": "send", "to": to, "id": id, "text": text}),
        Command::Join(room) => json!({"type": "join", "room": room}),
        Command::Leave(room) => json!({"type": "leave", "room": room}),
        Command::Who(room) => json!({"type": "who", "room": room}),
        Command::History { room, limit } => {
            json!({"type": "history", "room": room, "limit": limit})
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_message(v: &Value) -> Message {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    Message {
        index: v["index"].as_u64().unwrap_or(0),
        to: s("to"),
        from: s("from"),
        id: s("id"),
        text: s("text"),
        ts: s("ts"),
    }
}

/// Sleeps until `at`, or for ever; no timer exists unless there is a time.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
