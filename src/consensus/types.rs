//! The openraft type configuration and the application payload of a log entry.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chat::command::{ChatCommand, ChatResponse};

/// A log entry's application payload: a chat command stamped by the leader that appended it,
/// so applying it never reads the applying node's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub ts_ms: i64,
    /// Shared, not copied, each time openraft clones the entry: into the log's cache, for each
    /// follower's AppendEntries and for the apply. Encoded as the command itself (externally
    /// tagged in the replication frames).
    #[serde(with = "crate::chat::command::shared_command_encoding")]
    pub command: Arc<ChatCommand>,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} @{}", self.command, self.ts_ms)
    }
}

/// A member's addresses, carried in the replicated membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub chat: String,
    pub raft: String,
    pub metrics: String,
    /// What clients are told to connect to, when not `chat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_chat: Option<String>,
}

impl NodeAddr {
    /// The chat address clients are given.
    pub fn client_chat(&self) -> &str {
        self.advertise_chat.as_deref().unwrap_or(&self.chat)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = ChatResponse,
        NodeId = u64,
        Node = NodeAddr,
);

pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
