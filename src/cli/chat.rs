//! `raftchat chat`: a terminal chat on the reconnecting client. Lines from stdin are sent to
//! the current room; `/join`, `/leave`, `/msg`, `/who`, `/history` and `/quit` are commands.
//! Messages print as `[HH:MM:SS] #room <user> text`; connection news goes to stderr.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::chat::names::{is_valid_room, is_valid_user};
use crate::client::{Client, ClientConfig, Event, Message};

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Chat addresses of the cluster's nodes, comma-separated (more are learned on connect).
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// Your user name.
    #[arg(long)]
    user: String,
    /// The room to join and talk in.
    #[arg(long, default_value = "#general")]
    room: String,
    /// Exit 1 if the cluster cannot be reached within this many seconds, or if at the end of
    /// input what was sent is not acknowledged within it. Without it the client keeps trying.
    #[arg(long)]
    timeout: Option<u64>,
    /// The account's password, for a registered name (kept out of `ps`: environment only).
    #[arg(skip = std::env::var("RAFTCHAT_PASSWORD").ok())]
    password: Option<String>,
}

pub fn run(args: ChatArgs) -> ExitCode {
    if !is_valid_user(&args.user) {
        eprintln!(
            "raftchat: flag `--user`: {:?} is not a valid user name",
            args.user
        );
        return ExitCode::from(2);
    }
    if !is_valid_room(&args.room) {
        eprintln!(
            "raftchat: flag `--room`: {:?} is not a room name (like #general)",
            args.room
        );
        return ExitCode::from(2);
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(chat(args)),
        Err(e) => {
            eprintln!("raftchat: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// `[HH:MM:SS]` from an RFC 3339 timestamp.
fn clock(ts: &str) -> &str {
    ts.split_once('T')
        .map_or("", |(_, t)| t.get(..8).unwrap_or(t))
}

fn print_message(m: &Message) {
    if m.to.starts_with('#') {
        println!("[{}] {} <{}> {}", clock(&m.ts), m.to, m.from, m.text);
    } else {
        println!("[{}] @{} <{}> {}", clock(&m.ts), m.to, m.from, m.text);
    }
}

enum Input {
    Say(String),
    Join(String),
    Leave(Option<String>),
    Msg(String, String),
    Who(Option<String>),
    History(usize),
    Quit,
    Help(String),
}

fn parse_input(line: &str) -> Input {
    let Some(command) = line.strip_prefix('/') else {
        return Input::Say(line.to_string());
    };
    let mut words = command.splitn(3, ' ');
    let name = words.next().unwrap_or("");
    let arg = words.next().map(str::trim).filter(|a| !a.is_empty());
    let rest = words.next();
    match (name, arg) {
        ("join", Some(room)) => Input::Join(room.to_string()),
        ("leave", room) => Input::Leave(room.map(String::from)),
        ("msg", Some(user)) => Input::Msg(user.to_string(), rest.unwrap_or("").to_string()),
        ("who", room) => Input::Who(room.map(String::from)),
        ("history", n) => Input::History(n.and_then(|n| n.parse().ok()).unwrap_or(20)),
        ("quit", _) => Input::Quit,
        _ => Input::Help(format!(
            "unknown command /{name}; use /join #room, /leave, /msg user text, /who, /history N, /quit"
        )),
    }
}

/// Sends `text` to `to`, or gives it back when the client holds all the unacknowledged
/// messages it may (it is sent once acks free room, before stdin is read on).
fn send_or_keep(client: &mut Client, to: String, text: String) -> Option<(String, String)> {
    match client.send(&to, &text) {
        Ok(_) => None,
        Err(e) => {
            eprintln!("raftchat: {e}; it goes once there is room");
            Some((to, text))
        }
    }
}

/// Resolves once the client has room for the line it could not send.
fn room_for(
    client: &Client,
    unsent: &Option<(String, String)>,
) -> impl std::future::Future<Output = ()> + use<> {
    let (to, text) = unsent
        .as_ref()
        .map_or(("", ""), |(to, text)| (to.as_str(), text.as_str()));
    client.room_to_send(to, text)
}

async fn chat(args: ChatArgs) -> ExitCode {
    let mut config = ClientConfig::new(args.servers.clone(), &args.user);
    config.rooms = vec![args.room.clone()];
    config.password = args.password.clone();
    let mut client = Client::start(config);
    let mut room = args.room.clone();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let interactive = std::io::stdin().is_terminal();
    let timeout = args.timeout.map(Duration::from_secs);
    let started = Instant::now();
    let mut connected = false;
    let mut eof_at: Option<Instant> = None;
    let mut quitting = false;
    // Answers still owed to stdin's commands: in a pipeline each is printed before exit.
    let mut owed = Owed::default();
    let mut check = tokio::time::interval(Duration::from_millis(50));
    // A line the client had no room for yet: stdin waits until acks free some.
    let mut unsent: Option<(String, String)> = None;
    loop {
        tokio::select! {
            _ = room_for(&client, &unsent), if unsent.is_some() => {
                if let Some((to, text)) = unsent.take() {
                    unsent = send_or_keep(&mut client, to, text);
                }
            }
            line = lines.next_line(), if eof_at.is_none() && !quitting && unsent.is_none() => match line {
                Ok(Some(line)) => {
                    let line = line.trim_end();
                    if line.is_empty() {
                        continue;
                    }
                    match parse_input(line) {
                        Input::Say(text) => unsent = send_or_keep(&mut client, room.clone(), text),
                        Input::Join(r) => {
                            if is_valid_room(&r) {
                                client.join(&r);
                                owed.joins += 1;
                                room = r;
                            } else {
                                eprintln!("raftchat: {r:?} is not a room name");
                            }
                        }
                        Input::Leave(r) => {
                            client.leave(r.as_deref().unwrap_or(&room));
                            owed.leaves += 1;
                        }
                        Input::Msg(user, text) => unsent = send_or_keep(&mut client, user, text),
                        Input::Who(r) => {
                            client.who(r.as_deref().unwrap_or(&room));
                            owed.who += 1;
                        }
                        Input::History(n) => {
                            client.history(&room, n.clamp(1, 1000));
                            owed.history += 1;
                        }
                        Input::Quit => quitting = true,
                        Input::Help(text) => eprintln!("raftchat: {text}"),
                    }
                }
                Ok(None) | Err(_) => eof_at = Some(Instant::now()),
            },
            event = client.next_event() => {
                let Some(event) = event else {
                    eprintln!("raftchat: the client stopped");
                    return ExitCode::from(1);
                };
                match event {
                    Event::Connected { node, server, .. } => {
                        connected = true;
                        eprintln!("connected to node {node} ({server}) as {}", args.user);
                    }
                    Event::Reconnected(r) => eprintln!(
                        "reconnected to node {} after {} ms, {} replayed, {} re-sent",
                        r.to_node,
                        r.downtime.as_millis(),
                        r.replayed,
                        r.resent
                    ),
                    Event::Disconnected { node, reason } => match node {
                        Some(n) => eprintln!("lost node {n}: {reason}; reconnecting"),
                        None => eprintln!("connection lost: {reason}; reconnecting"),
                    },
                    Event::Retrying { attempt, error, retry_in } => eprintln!(
                        "cannot reach the cluster (attempt {attempt}): {error}; retrying in {} ms",
                        retry_in.as_millis()
                    ),
                    Event::Message(m) => print_message(&m),
                    Event::Presence { room, user, joined } => {
                        if interactive {
                            println!("-- {user} {} {room}", if joined { "joined" } else { "left" });
                        }
                    }
                    Event::Joined { room, members } => {
                        owed.joins = owed.joins.saturating_sub(1);
                        eprintln!("joined {room} ({} members: {})", members.len(), members.join(", "));
                    }
                    Event::Left { room } => {
                        owed.leaves = owed.leaves.saturating_sub(1);
                        eprintln!("left {room}");
                    }
                    Event::Members { room, users } => {
                        owed.who = owed.who.saturating_sub(1);
                        println!("{room}: {}", users.join(", "));
                    }
                    Event::History { messages, .. } => {
                        owed.history = owed.history.saturating_sub(1);
                        messages.iter().for_each(print_message);
                    }
                    Event::Refused { code, message, id } => {
                        if id.is_none() {
                            owed.refused();
                        }
                        eprintln!("raftchat: {code}: {message}");
                    }
                    Event::Deferred { code, message, .. } => {
                        eprintln!("raftchat: {code}: {message}; sending it again shortly")
                    }
                    Event::Acked { .. } => {}
                    Event::SessionLost { unacked, .. } => eprintln!(
                        "raftchat: session lost (expired or taken over); continuing in a new session; {} unacknowledged message(s) not re-sent: they may or may not have been delivered",
                        unacked.len()
                    ),
                    Event::Failed(reason) => {
                        eprintln!("raftchat: {reason}");
                        return ExitCode::from(1);
                    }
                }
            }
            _ = check.tick() => {}
        }
        let done = connected && client.unacked() == 0 && owed.none();
        if (eof_at.is_some() || quitting) && done {
            return ExitCode::SUCCESS;
        }
        if let Some(limit) = timeout {
            if !connected && started.elapsed() > limit {
                eprintln!(
                    "raftchat: could not reach any of {} within {} s",
                    args.servers.join(", "),
                    limit.as_secs()
                );
                return ExitCode::from(1);
            }
            if let Some(eof) = eof_at
                && eof.elapsed() > limit
            {
                eprintln!(
                    "raftchat: {} sent messages not acknowledged within {} s",
                    client.unacked(),
                    limit.as_secs()
                );
                return ExitCode::from(1);
            }
        }
    }
}

/// Answers owed to commands read from stdin, by kind.
#[derive(Default)]
struct Owed {
    joins: usize,
    leaves: usize,
    who: usize,
    history: usize,
}

impl Owed {
    fn none(&self) -> bool {
        self.joins + self.leaves + self.who + self.history == 0
    }

    /// A request (not a message) was refused: one answer fewer is owed.
    fn refused(&mut self) {
        for n in [
            &mut self.history,
            &mut self.who,
            &mut self.joins,
            &mut self.leaves,
        ] {
            if *n > 0 {
                *n -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert!(matches!(parse_input("hello"), Input::Say(t) if t == "hello"));
        assert!(matches!(parse_input("/join #x"), Input::Join(r) if r == "#x"));
        assert!(
            matches!(parse_input("/msg bob hi there"), Input::Msg(u, t) if u == "bob" && t == "hi there")
        );
        assert!(matches!(parse_input("/history 5"), Input::History(5)));
        assert!(matches!(parse_input("/leave"), Input::Leave(None)));
        assert!(matches!(parse_input("/quit"), Input::Quit));
        assert!(matches!(parse_input("/bogus"), Input::Help(_)));
        assert_eq!(clock("2026-11-26T14:52:11.546Z"), "14:52:11");
    }
}
