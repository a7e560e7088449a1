//! The reconnecting client library (JSON dialect), used by `raftchat chat`, `raftchat bench`
//! and the tests (SPEC section 4).
//!
//! A background task owns the connection. It connects to the first reachable server, learns
//! the cluster from `welcome.nodes`, and when the connection is lost or goes silent (no frame
//! within the read deadline although it pings) it reconnects, healthy nodes first, with
//! exponential backoff and jitter (the first retry at once). It resumes its session from the
//! last message index it delivered, re-sends every unacknowledged message with its original
//! id, and hands each message to the application once, in index order. What the application
//! has not taken yet is bounded (`events`): a full queue stops the reading, not the memory.
//! So is what it has sent and the cluster has not acknowledged (`outstanding`): a send that
//! does not fit is refused, and the application waits for acks (`Client::room_to_send`).

pub mod conn;
mod driver;
mod events;
mod outstanding;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;

pub use conn::{ClientError, Frame, FrameReader, FrameWriter, connect, login};
pub use events::MAX_QUEUED_BYTES;
pub use outstanding::{MAX_UNACKED_BYTES, SendQueueFull};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Chat addresses to try first, in order.
    pub servers: Vec<String>,
    pub user: String,
    /// Rooms to be in; joined on the first connection (and again if the session is lost).
    pub rooms: Vec<String>,
    /// Ping this often when nothing else is sent.
    pub ping_interval: Duration,
    /// A connection that sends nothing for this long is dead.
    pub read_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Give up after this many failed connection attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
    /// The account's password, sent with every `hello` (a registered name needs it on each
    /// reconnect too).
    pub password: Option<String>,
    /// False: the server does not push this client's own messages back to it (their
    /// acknowledgements still come).
    pub echo: bool,
}

impl ClientConfig {
    pub fn new(servers: Vec<String>, user: &str) -> ClientConfig {
        ClientConfig {
            servers,
            user: user.to_string(),
            rooms: Vec::new(),
            ping_interval: Duration::from_millis(500),
            read_timeout: Duration::from_millis(2000),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_attempts: None,
            password: None,
            echo: true,
        }
    }
}

/// A committed chat message as the application receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub index: u64,
    pub to: String,
    pub from: String,
    pub id: String,
    pub text: String,
    pub ts: String,
}

/// What a reconnect looked like, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconnect {
    pub from_node: Option<u64>,
    pub to_node: u64,
    pub downtime: Duration,
    pub replayed: usize,
    pub resent: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The first connection.
    Connected {
        node: u64,
        server: String,
        session: String,
    },
    Reconnected(Reconnect),
    /// The connection was lost; the client is reconnecting.
    Disconnected {
        node: Option<u64>,
        reason: String,
    },
    /// A connection attempt failed; the next comes after `retry_in`.
    Retrying {
        attempt: u32,
        error: String,
        retry_in: Duration,
    },
    Message(Message),
    Presence {
        room: String,
        user: String,
        joined: bool,
    },
    Acked {
        id: String,
        index: u64,
    },
    Joined {
        room: String,
        members: Vec<String>,
    },
    Left {
        room: String,
    },
    Members {
        room: String,
        users: Vec<String>,
    },
    History {
        room: String,
        messages: Vec<Message>,
    },
    /// The cluster could not take a send just now (no leader in time, or a rate limit): the
    /// client keeps it and sends it again shortly, on this connection or the next.
    Deferred {
        id: String,
        code: String,
        message: String,
    },
    /// The server refused a request (with the message id when it was a send).
    Refused {
        code: String,
        message: String,
        id: Option<String>,
    },
    /// The session could not be resumed (it expired, or its name was taken over): the client
    /// goes on under a new session, rejoins its rooms, and does *not* re-send `unacked`, whose
    /// fate is unknown (each may or may not have been stored).
    SessionLost {
        previous: String,
        session: String,
        unacked: Vec<String>,
    },
    /// The client stopped for good (attempts exhausted, name taken).
    Failed(String),
}

enum Command {
    Send {
        id: String,
        to: String,
        text: String,
    },
    Join(String),
    Leave(String),
    Who(String),
    History {
        room: String,
        limit: usize,
    },
}

/// The application's handle: commands in, events out.
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    events: events::EventReceiver,
    outstanding: Arc<outstanding::Outstanding>,
    id_prefix: String,
    next_id: u64,
}

impl Client {
    /// Starts the client; it connects in the background (watch for `Event::Connected`).
    pub fn start(config: ClientConfig) -> Client {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = events::channel();
        let outstanding = Arc::new(outstanding::Outstanding::default());
        let driver = driver::Driver::new(config, event_tx, outstanding.clone());
        tokio::spawn(driver.run(command_rx));
        Client {
            commands,
            events,
            outstanding,
            id_prefix: format!("{:x}", rand::rng().random::<u32>()),
            next_id: 0,
        }
    }

    /// Queues a message; returns its id. It is sent (and re-sent after reconnects) until
    /// acknowledged. Refused when the messages not acknowledged yet would take more than
    /// `MAX_UNACKED_BYTES` with it: wait for acks (`room_to_send`) and send it again.
    pub fn send(&mut self, to: &str, text: &str) -> Result<String, SendQueueFull> {
        let id = self.next_message_id();
        self.send_with_id(&id, to, text)?;
        self.next_id += 1;
        Ok(id)
    }

    /// As `send`, with the application's own id.
    pub fn send_with_id(&mut self, id: &str, to: &str, text: &str) -> Result<(), SendQueueFull> {
        self.outstanding.add(outstanding::cost(id, to, text))?;
        let _ = self.commands.send(Command::Send {
            id: id.to_string(),
            to: to.to_string(),
            text: text.to_string(),
        });
        Ok(())
    }

    /// The id `send` gives the next message.
    fn next_message_id(&self) -> String {
        format!("{}-{}", self.id_prefix, self.next_id + 1)
    }

    /// Resolves once a message of these sizes would be taken by `send` (the future holds no
    /// borrow of the client, so it can wait beside `next_event`, which frees the room).
    pub fn room_to_send(&self, to: &str, text: &str) -> impl Future<Output = ()> + Send + use<> {
        let id = self.next_message_id();
        let (cost, outstanding) = (outstanding::cost(&id, to, text), self.outstanding.clone());
        async move { outstanding.room(cost).await }
    }

    pub fn join(&self, room: &str) {
        let _ = self.commands.send(Command::Join(room.to_string()));
    }

    pub fn leave(&self, room: &str) {
        let _ = self.commands.send(Command::Leave(room.to_string()));
    }

    pub fn who(&self, room: &str) {
        let _ = self.commands.send(Command::Who(room.to_string()));
    }

    pub fn history(&self, room: &str, limit: usize) {
        let _ = self.commands.send(Command::History {
            room: room.to_string(),
            limit,
        });
    }

    /// Messages sent but not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.outstanding.count()
    }

    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Approximate bytes of events received and not yet taken with `next_event` (at most
    /// `MAX_QUEUED_BYTES`: beyond that the client reads no more from the server until the
    /// application takes some).
    pub fn queued_bytes(&self) -> usize {
        self.events.queued_bytes()
    }
}

/// Exponential backoff with full jitter: attempt 1 waits up to `initial`, doubling to `max`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let cap = exp.min(max);
    let jitter = rand::rng().random_range(0.5..=1.0);
    cap.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    async fn next_hello(listener: &TcpListener) -> (BufReader<TcpStream>, Value) {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        (stream, serde_json::from_str(&line).unwrap())
    }

    async fn say(stream: &mut BufReader<TcpStream>, frame: Value) {
        let line = format!("{frame}\n");
        stream.get_mut().write_all(line.as_bytes()).await.unwrap();
    }

    fn welcome(resumed: bool) -> Value {
        json!({"type": "welcome", "session": "s1", "node": 1, "resumed": resumed, "nodes": []})
    }

    #[tokio::test]
    async fn a_late_commit_of_its_own_abandoned_resume_does_not_stop_the_client() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut config = ClientConfig::new(vec![addr], "alice");
        config.read_timeout = Duration::from_millis(100);
        let mut client = Client::start(config);
        let (mut first, _) = next_hello(&listener).await;
        say(&mut first, welcome(false)).await;
        drop(first);
        // A resume nobody answers: the client gives up on it...
        let (_abandoned, hello) = next_hello(&listener).await;
        assert_eq!(hello["session"], "s1");
        // ...and resumes on the next connection, which the abandoned one, committed late,
        // then takes over.
        let (mut third, _) = next_hello(&listener).await;
        say(&mut third, welcome(true)).await;
        say(
            &mut third,
            json!({"type": "error", "code": "name_taken",
                   "message": "the session was resumed by another connection"}),
        )
        .await;
        let (_fourth, hello) = tokio::time::timeout(Duration::from_secs(10), next_hello(&listener))
            .await
            .expect("the client resumes again");
        assert_eq!(hello["session"], "s1");
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(50), client.next_event()).await
        {
            assert!(!matches!(event, Event::Failed(_)), "{event:?}");
        }
    }

    #[tokio::test]
    async fn a_lost_session_does_not_lose_count_of_sends_made_meanwhile() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut client = Client::start(ClientConfig::new(vec![addr], "alice"));
        let (mut first, _) = next_hello(&listener).await;
        say(&mut first, welcome(false)).await;
        client.send_with_id("m1", "#r", "one").unwrap();
        // The send reached the server; then the connection breaks, unacknowledged.
        let mut line = String::new();
        while !line.contains("m1") {
            line.clear();
            first.read_line(&mut line).await.unwrap();
        }
        drop(first);
        let (mut second, hello) = next_hello(&listener).await;
        assert_eq!(hello["session"], "s1");
        // A send made while the client waits for its welcome...
        client.send_with_id("m2", "#r", "two").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...and the session could not be resumed: m1's fate is unknown, m2 is still to go.
        say(
            &mut second,
            json!({"type": "welcome", "session": "s2", "node": 1, "resumed": false, "nodes": []}),
        )
        .await;
        let mut line = String::new();
        while !line.contains("m2") {
            line.clear();
            second.read_line(&mut line).await.unwrap();
        }
        assert_eq!(client.unacked(), 1);
        say(&mut second, json!({"type": "ack", "id": "m2", "index": 7})).await;
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(Event::Acked { id, .. }) = client.next_event().await {
                    return id;
                }
            }
        })
        .await;
        assert_eq!(acked.as_deref(), Ok("m2"));
        assert_eq!(client.unacked(), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        assert!(backoff(1, i, m) <= i);
        assert!(backoff(3, i, m) <= Duration::from_millis(400));
        assert!(backoff(3, i, m) >= Duration::from_millis(200));
        for n in 10..40 {
            assert!(backoff(n, i, m) <= m);
        }
    }

    #[tokio::test]
    async fn sends_the_cluster_has_not_acknowledged_are_bounded_and_refused_beyond() {
        // Nobody listens: every send stays unacknowledged.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut client = Client::start(ClientConfig::new(vec![addr], "alice"));
        let text = "x".repeat(64 * 1024);
        let mut taken = 0;
        let refused = loop {
            match client.send("#r", &text) {
                Ok(_) => taken += 1,
                Err(full) => break full,
            }
            assert!(taken <= 64, "{taken} messages of 64 KiB kept");
        };
        assert_eq!(
            taken, 63,
            "a 4-MiB budget of 64-KiB messages and their costs"
        );
        assert_eq!(refused.unacked, taken);
        assert!(refused.bytes <= MAX_UNACKED_BYTES, "{refused}");
        assert_eq!(client.unacked(), taken);
        // No room for another large one comes while nothing is acknowledged; what is left of
        // the budget still takes a small one.
        let wait = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            client.room_to_send("#r", &text),
        );
        assert!(wait.await.is_err(), "room without an ack");
        assert!(client.send("#r", "small").is_ok());
        assert_eq!(client.unacked(), taken + 1);
    }
}
