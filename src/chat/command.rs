//! What the chat layer replicates through the log, and what applying it answers.
//!
//! These types are written to disk and sent between nodes with field names (JSON; the
//! replication frames in MessagePack), so a node of a newer version can still read them when
//! a field is added.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One replicated chat operation. Both dialects produce these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ChatCommand {
    /// Claim `user` for a connection on `node`. Decided when applied, on the state at that
    /// index: resume `resume` if it is that user's session; with `adopt` (IRC, which has no
    /// tokens) resume the session the name left behind if its holder is gone; otherwise open
    /// the new session `session`. `replaces` names the session that holds the name now and
    /// that the accepting node found dead; the claim succeeds only if that is still the holder
    /// (compare-and-swap).
    Attach {
        session: String,
        user: String,
        node: u64,
        #[serde(default)]
        replaces: Option<String>,
        #[serde(default)]
        resume: Option<String>,
        #[serde(default)]
        adopt: bool,
        /// The accepting node checked this user's password (a registered name is only
        /// claimed with it).
        #[serde(default)]
        authenticated: bool,
    },
    /// Registers `user` with an argon2id `hash` (a PHC string), or removes the account.
    SetAccount {
        user: String,
        hash: Option<String>,
    },
    /// The leader's settings for what applying decides (session expiry, retention), so every
    /// node decides with the same values whatever its own config file says.
    Configure {
        settings: super::state::Settings,
    },
    /// The connection that attached at log index `attachment` is gone.
    Detach {
        session: String,
        attachment: u64,
    },
    /// Node `node` restarted: no connection from its previous life is alive.
    DetachNode {
        node: u64,
    },
    Join {
        session: String,
        room: String,
    },
    Leave {
        session: String,
        room: String,
    },
    /// A chat message to a room or a user; `id` is the client's, unique per session.
    Send {
        session: String,
        id: String,
        to: String,
        text: String,
    },
}

/// `ChatCommand` externally tagged, for encodings that are not human-readable (the replication
/// frames' MessagePack): its JSON's internal tag (`"op"`) makes serde buffer every command
/// before it knows the variant, which costs an allocation per field. Each variant must match
/// `ChatCommand`'s (the derive fails to compile otherwise); fields keep their defaults, so a
/// field added later still reads from an older peer.
#[derive(Serialize, Deserialize)]
#[serde(remote = "ChatCommand", rename_all = "snake_case")]
enum ExternallyTagged {
    Attach {
        session: String,
        user: String,
        node: u64,
        #[serde(default)]
        replaces: Option<String>,
        #[serde(default)]
        resume: Option<String>,
        #[serde(default)]
        adopt: bool,
        #[serde(default)]
        authenticated: bool,
    },
    SetAccount {
        user: String,
        hash: Option<String>,
    },
    Configure {
        settings: super::state::Settings,
    },
    Detach {
        session: String,
        attachment: u64,
    },
    DetachNode {
        node: u64,
    },
    Join {
        session: String,
        room: String,
    },
    Leave {
        session: String,
        room: String,
    },
    Send {
        session: String,
        id: String,
        to: String,
        text: String,
    },
}

/// `#[serde(with = "...")]` for a shared `ChatCommand`: JSON as `ChatCommand` itself (its
/// `"op"` tag, on disk and in HTTP requests), binary encodings externally tagged.
pub mod shared_command_encoding {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{ChatCommand, ExternallyTagged};

    pub fn serialize<S: Serializer>(command: &Arc<ChatCommand>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            command.serialize(s)
        } else {
            ExternallyTagged::serialize(command, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<ChatCommand>, D::Error> {
        if d.is_human_readable() {
            ChatCommand::deserialize(d).map(Arc::new)
        } else {
            ExternallyTagged::deserialize(d).map(Arc::new)
        }
    }
}

impl fmt::Display for ChatCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChatCommand::Attach { user, node, .. } => write!(f, "attach {user} on node {node}"),
            ChatCommand::Configure { settings } => write!(f, "configure {settings:?}"),
            ChatCommand::SetAccount { user, hash } => {
                write!(
                    f,
                    "{} account {user}",
                    if hash.is_some() { "set" } else { "remove" }
                )
            }
            ChatCommand::Detach { attachment, .. } => write!(f, "detach attachment {attachment}"),
            ChatCommand::DetachNode { node } => write!(f, "detach node {node}"),
            ChatCommand::Join { room, .. } => write!(f, "join {room}"),
            ChatCommand::Leave { room, .. } => write!(f, "leave {room}"),
            ChatCommand::Send { id, to, .. } => write!(f, "send {id} to {to}"),
        }
    }
}

/// The outcome of applying one command; deterministic on every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ChatResponse {
    Attached {
        session: String,
        user: String,
        resumed: bool,
        attachment: u64,
    },
    NameTaken,
    /// The name is a registered account and the claim was not authenticated.
    AuthRequired,
    /// The session token belongs to a different user name.
    SessionMismatch,
    UnknownSession,
    Joined {
        room: String,
        members: Vec<String>,
    },
    Left {
        room: String,
    },
    Sent {
        index: u64,
        duplicate: bool,
    },
    NotMember {
        room: String,
    },
    NoSuchUser {
        user: String,
    },
    Done,
}

/// A committed chat message as every node stores and delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub index: u64,
    pub to: String,
    pub from: String,
    pub id: String,
    pub text: String,
    /// Milliseconds since the Unix epoch, set by the leader that appended the entry.
    pub ts_ms: i64,
    /// For a direct message: the ids of the sessions that may see it (sender and target at
    /// commit time). Empty for rooms, and for direct messages stored before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parties: Vec<u64>,
}

/// A committed message on its way to this node's connections; each dialect encodes it once
/// for all of them.
#[derive(Debug)]
pub struct MessageEvent {
    pub message: StoredMessage,
    /// The session token of its writer (empty when not known): a connection that said
    /// `echo: false` is not sent its own session's messages.
    pub sender: String,
    /// `message.to` folded, once for every connection that checks it.
    pub to_key: String,
    pub json: OnceLock<Bytes>,
    /// The IRC line without tags, and with `time`/`msgid` tags.
    pub irc: OnceLock<Bytes>,
    pub irc_tagged: OnceLock<Bytes>,
}

impl MessageEvent {
    pub fn new(message: StoredMessage) -> Arc<MessageEvent> {
        Self::sent_by(message, String::new())
    }

    /// A message written by the session `sender` (its token).
    pub fn sent_by(message: StoredMessage, sender: String) -> Arc<MessageEvent> {
        Arc::new(MessageEvent {
            to_key: super::names::fold(&message.to),
            message,
            sender,
            json: OnceLock::new(),
            irc: OnceLock::new(),
            irc_tagged: OnceLock::new(),
        })
    }
}

/// What applying the log tells the fan-out hub, in index order.
#[derive(Debug, Clone)]
pub enum Event {
    Message(Arc<MessageEvent>),
    Presence {
        index: u64,
        room: String,
        user: String,
        session: String,
        joined: bool,
    },
    /// `session` is now served by the connection that attached at `index` on `node`;
    /// any other connection of that session must close.
    SessionAttached {
        index: u64,
        session: String,
        node: u64,
    },
    /// `session` no longer exists (its name was taken over, or it expired).
    SessionClosed {
        index: u64,
        session: String,
    },
    /// The whole state was replaced by a snapshot up to `index`.
    Resync {
        index: u64,
    },
}

impl Event {
    pub fn index(&self) -> u64 {
        match self {
            Event::Message(m) => m.message.index,
            Event::Presence { index, .. }
            | Event::SessionAttached { index, .. }
            | Event::SessionClosed { index, .. }
            | Event::Resync { index } => *index,
        }
    }
}
