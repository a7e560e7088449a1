//! Everything openraft: the type config, the log store, the state machine, the transport and
//! the raft port. This is the only module that names openraft types; the rest of the crate
//! talks to [`Consensus`] in chat commands and plain status values.

mod append_stream;
mod hedge;
mod leader_watch;
mod legacy_log;
mod log_store;
mod network;
mod reachability;
mod rpc_client;
mod runtime;
mod server;
mod snapshot_store;
mod spare_segment;
mod state_machine;
mod types;
mod wal;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::ClientWriteError;
use openraft::{ChangeMembers, Instant as _, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::chat::command::{ChatCommand, ChatResponse};
use crate::chat::store::ChatStore;
use crate::config::Config;
pub use leader_watch::run as watch_leader;
use log_store::LogStore;
pub use log_store::SyncObserver;
use network::Network;
use rpc_client::{ClientTls, Hedge, RpcClient};
pub use rpc_client::{HedgeObserver, RpcObserver, RpcObservers};
pub use runtime::ConsensusRuntime;
pub use server::serve_raft_port;
use state_machine::StateMachine;
use types::{NodeAddr, Request, TypeConfig};

type RaftHandle = Raft<TypeConfig, StateMachine>;

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("cannot open the data directory {path}: {reason}")]
    Storage { path: String, reason: String },
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a write was not acknowledged.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum WriteError {
    /// No leader could take the write in time; retrying the same command is safe.
    #[error("no leader available: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A committed write: its log index and what applying it answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    pub index: u64,
    pub response: ChatResponse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// The raft log's directory (segment files) in the data directory.
pub const LOG_DIR: &str = "raft-log";
/// Where raftchat 0.1 kept the raft log (moved into `LOG_DIR` on start).
const LEGACY_LOG_FILE: &str = "raft-log.redb";
pub use snapshot_store::SNAPSHOT_FILE;

/// This node's view of the cluster, from openraft's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    /// Entries up to this index were compacted away (0: none).
    pub purged_index: u64,
    /// On the leader: entries each follower is behind.
    pub replication_lag: BTreeMap<u64, u64>,
    /// Whether this leader heard from a quorum within the leader lease.
    pub leader_lease_valid: bool,
    /// openraft stopped with a fatal error (storage failure, panic).
    pub fatal: Option<String>,
    /// Voting members in the membership this node holds.
    pub voters: u64,
}

/// A membership change, sent by `raftchat admin` to the raft port.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    AddNode {
        id: u64,
        chat: String,
        raft: String,
        metrics: String,
        #[serde(default)]
        advertise_chat: Option<String>,
    },
    RemoveNode {
        id: u64,
    },
}

/// What a membership change answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminAnswer {
    Done {
        voters: Vec<u64>,
    },
    /// Ask the leader instead (its raft address, when known).
    NotLeader {
        leader: Option<u64>,
        raft: Option<String>,
    },
    Failed(String),
}

/// How an operator reaches the raft/admin port: the cluster secret, and with `[tls] raft`
/// a client certificate from the cluster's CA.
pub struct Operator {
    pub secret: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Sends `request` to the raft/admin port at `addr`.
pub async fn admin_request(
    addr: &str,
    operator: &Operator,
    request: &AdminRequest,
) -> Result<AdminAnswer, String> {
    admin_post(
        addr,
        operator,
        "/admin/membership",
        request,
        Duration::from_secs(60),
    )
    .await
}

/// One operator call to the raft/admin port at `addr`.
async fn admin_post<Req: Serialize, Resp: serde::de::DeserializeOwned + Send + 'static>(
    addr: &str,
    operator: &Operator,
    path: &str,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, String> {
    let tls = match &operator.tls {
        Some(config) => ClientTls::Fixed(config.clone()),
        None => ClientTls::Plain,
    };
    let rpc = RpcClient::new(&operator.secret, RpcObservers::default(), tls);
    rpc.post("admin", 0, addr, path, request, timeout, &[])
        .await
        .map_err(|e| e.to_string())
}

/// Sets (with a password) or removes (without) the account of `user`: `raftchat admin
/// add-user / passwd / remove-user`. The node asked hashes the password; the hash is what is
/// replicated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRequest {
    pub user: String,
    pub password: Option<String>,
}

/// Sends an account change to the raft/admin port at `addr` (any node; writes are forwarded).
pub async fn account_request(
    addr: &str,
    operator: &Operator,
    request: &AccountRequest,
) -> Result<Result<(), String>, String> {
    admin_post(
        addr,
        operator,
        "/admin/account",
        request,
        Duration::from_secs(30),
    )
    .await
}

impl Consensus {
    /// Hashes and replicates an account change.
    pub async fn set_account(&self, req: AccountRequest) -> Result<(), String> {
        if !crate::chat::names::is_valid_user(&req.user) {
            return Err(format!("invalid user name: {:?}", req.user));
        }
        let hash = match req.password {
            Some(password) => Some(
                tokio::task::spawn_blocking(move || crate::chat::accounts::hash(&password))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        self.write(ChatCommand::SetAccount {
            user: req.user,
            hash,
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

/// A forwarded write, follower → leader, on the raft port.
#[derive(Serialize, Deserialize)]
struct ForwardRequest {
    commands: Vec<ChatCommand>,
    /// W3C trace context of each command, when traced.
    #[serde(default)]
    traceparents: Vec<Option<String>>,
    timeout_ms: u64,
}

#[derive(Serialize, Deserialize)]
enum ForwardAnswer {
    Results(Vec<ItemResult>),
    NotLeader,
}

/// The fate of one command of a batch.
#[derive(Debug, Serialize, Deserialize)]
enum ItemResult {
    Committed(Committed),
    /// Not known to be committed; safe to retry.
    Retry(String),
    Failed(WriteError),
}

impl ItemResult {
    fn committed_index(&self) -> Option<u64> {
        match self {
            ItemResult::Committed(c) => Some(c.index),
            _ => None,
        }
    }
}

pub struct Consensus {
    id: u64,
    chat: Arc<ChatStore>,
    snapshots: Arc<snapshot_store::SnapshotStore>,
    /// When each leader was last heard from (its last AppendEntries), for failover timing.
    contacts: std::sync::Mutex<BTreeMap<u64, Instant>>,
    /// When a leadership transfer was last announced to (or started by) this node.
    transfer_announced: std::sync::Mutex<Option<Instant>>,
    raft: RaftHandle,
    rpc: RpcClient,
    members: BTreeMap<u64, NodeAddr>,
    secret: String,
    write_timeout: Duration,
    lease: Duration,
    replication_connections: ConnectionObserver,
}

/// How long an acknowledgement of a forwarded write waits for this node to apply it.
const APPLIED_WAIT: Duration = Duration::from_millis(300);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hooks the telemetry layer attaches to the consensus internals.
#[derive(Clone)]
pub struct Observers {
    pub storage_sync: SyncObserver,
    pub rpc: RpcObservers,
    /// How long each snapshot build took, until it was durable.
    pub snapshot_built: SyncObserver,
    /// A replication connection opened (+1) or closed (-1) on this node's raft port.
    pub replication_connections: ConnectionObserver,
}

pub type ConnectionObserver = Arc<dyn Fn(i64) + Send + Sync>;

impl Default for Observers {
    fn default() -> Self {
        Observers {
            storage_sync: Arc::new(|_| {}),
            rpc: RpcObservers::default(),
            snapshot_built: Arc::new(|_| {}),
            replication_connections: Arc::new(|_| {}),
        }
    }
}

impl Consensus {
    /// Opens this node's log and state in `data_dir`, starts raft, and forms the cluster from
    /// `config.nodes` if this is a brand-new node.
    pub async fn start(
        config: &Config,
        id: u64,
        data_dir: &Path,
        chat: Arc<ChatStore>,
        observers: Observers,
        join: bool,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> Result<Arc<Consensus>, ConsensusError> {
        let storage_err = |reason: String| ConsensusError::Storage {
            path: data_dir.display().to_string(),
            reason,
        };
        let log_dir = data_dir.join(LOG_DIR);
        let legacy = data_dir.join(LEGACY_LOG_FILE);
        let fresh = !wal::exists(&log_dir) && !legacy.exists();
        let log = LogStore::open(&log_dir, &legacy, observers.storage_sync.clone(), id)
            .map_err(|e| storage_err(e.to_string()))?;
        let sm = StateMachine::open(data_dir, chat.clone(), observers.snapshot_built.clone())
            .map_err(|e| storage_err(e.to_string()))?;
        let snapshots = sm.snapshots();
        check_log_covers_state(&log, &sm)
            .await
            .map_err(storage_err)?;

        let r = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "raftchat".into(),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
            max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
            purge_batch_size: 256,
            // A node that starts late or comes back from a pause must not depose a healthy
            // leader: it first asks whether it could win.
            enable_pre_vote: Some(true),
            // A crashed leader may have sent followers entries it never wrote itself (they are
            // replicated from memory before its own fsync). Restored as leader in the same
            // term, it would write other entries under the same log ids, and a follower that
            // holds the old ones would keep them as matching: nodes would apply different
            // logs. So a restarted leader wins a new term first (standard Raft).
            enable_leader_restore: Some(false),
            max_payload_entries: 512,
            install_snapshot_timeout: 60_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Raft(e.to_string()))?;

        let tls = match tls {
            Some(tls) if tls.raft_client().is_some() => ClientTls::Node(tls),
            _ => ClientTls::Plain,
        };
        let rpc = RpcClient::new(&config.secret, observers.rpc.clone(), tls);
        let network = Network { rpc: rpc.clone() };
        let raft = Raft::new(id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| ConsensusError::Raft(e.to_string()))?;

        let members: BTreeMap<u64, NodeAddr> = config
            .nodes
            .iter()
            .map(|n| {
                (
                    n.id,
                    NodeAddr {
                        chat: n.chat.clone(),
                        raft: n.raft.clone(),
                        metrics: n.metrics.clone(),
                        advertise_chat: n.advertise_chat.clone(),
                    },
                )
            })
            .collect();
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| ConsensusError::Raft(e.to_string()))?;
        // A node that joins a running cluster waits to be added (`raftchat admin add-node`).
        if fresh && !initialized && !join {
            // Every configured node proposes the same membership at log index 0, so whichever
            // starts first, they agree; a node restarted on its data never does this again.
            if let Err(e) = raft.initialize(members.clone()).await {
                tracing::debug!(error = %e, "initialize skipped");
            } else {
                tracing::info!(members = members.len(), "formed a new cluster");
            }
        }
        Ok(Arc::new(Consensus {
            id,
            chat,
            snapshots,
            contacts: std::sync::Mutex::new(BTreeMap::new()),
            transfer_announced: std::sync::Mutex::new(None),
            raft,
            rpc,
            members,
            secret: config.secret.clone(),
            write_timeout: Duration::from_millis(config.chat.write_timeout_ms),
            lease: Duration::from_millis(r.election_timeout_max_ms),
            replication_connections: observers.replication_connections.clone(),
        }))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The other members and their chat addresses (as peers reach them, not as clients are
    /// told): the membership, or the config's nodes before the cluster has formed.
    pub fn peer_chat_addrs(&self) -> Vec<(u64, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let mut peers: Vec<(u64, String)> = m
            .membership_config
            .nodes()
            .map(|(id, node)| (*id, node.chat.clone()))
            .collect();
        if peers.is_empty() {
            peers = self
                .members
                .iter()
                .map(|(id, n)| (*id, n.chat.clone()))
                .collect();
        }
        peers.retain(|(id, _)| *id != self.id);
        peers
    }

    /// Member `id`'s raft address, from the membership.
    fn raft_addr(&self, id: u64) -> Option<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, node)| node.raft.clone())
    }

    /// The configured members and their chat addresses.
    pub fn member_chat_addrs(&self) -> Vec<(u64, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let from_membership: Vec<(u64, String)> = m
            .membership_config
            .nodes()
            .map(|(id, node)| {
                // The config file is the operator's current word on a member's address for
                // clients; the membership remembers what it was when the member joined.
                let node = self.members.get(id).unwrap_or(node);
                (*id, node.client_chat().to_string())
            })
            .collect();
        if from_membership.is_empty() {
            self.members
                .iter()
                .map(|(id, n)| (*id, n.client_chat().to_string()))
                .collect()
        } else {
            from_membership
        }
    }

    pub fn status(&self) -> RaftStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let last_log_index = m.last_log_index.unwrap_or(0);
        let replication_lag = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != self.id)
                    .map(|(id, matched)| {
                        let matched = matched.as_ref().map_or(0, |l| l.index());
                        (*id, last_log_index.saturating_sub(matched))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let voters = m.membership_config.membership().voter_ids().count() as u64;
        // A lone voter is its own quorum.
        let alone = voters <= 1;
        let leader_lease_valid = m.state == ServerState::Leader
            && (alone
                || m.last_quorum_acked
                    .as_ref()
                    .is_some_and(|acked| acked.elapsed() < self.lease));
        RaftStatus {
            id: self.id,
            role,
            term: m.current_term,
            leader: m.current_leader,
            commit_index: m.local_committed.as_ref().map_or(0, |l| l.index()),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index()),
            last_log_index,
            snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index()),
            purged_index: m.purged.as_ref().map_or(0, |l| l.index()),
            replication_lag,
            leader_lease_valid,
            fatal: m.running_state.as_ref().err().map(|e| e.to_string()),
            voters,
        }
    }

    /// Adds or removes a voter; only the leader does it.
    pub async fn change_members(&self, request: AdminRequest) -> AdminAnswer {
        let status = self.status();
        if status.leader != Some(self.id) {
            let raft = status.leader.and_then(|l| self.raft_addr_of(l));
            return AdminAnswer::NotLeader {
                leader: status.leader,
                raft,
            };
        }
        let outcome = match request {
            AdminRequest::AddNode {
                id,
                chat,
                raft,
                metrics,
                advertise_chat,
            } => {
                let node = NodeAddr {
                    chat,
                    raft,
                    metrics,
                    advertise_chat,
                };
                // Wait (bounded) for the new node to catch up as a learner before it votes.
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    self.raft.add_learner(id, node, true),
                )
                .await
                {
                    Err(_) => Err(format!(
                        "node {id} did not catch up within 30 s; is it running with --join?"
                    )),
                    Ok(Err(e)) => Err(e.to_string()),
                    Ok(Ok(_)) => self
                        .raft
                        .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                }
            }
            AdminRequest::RemoveNode { id } => self
                .raft
                .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match outcome {
            Ok(()) => AdminAnswer::Done {
                voters: self
                    .raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect(),
            },
            Err(e) => AdminAnswer::Failed(e),
        }
    }

    fn raft_addr_of(&self, id: u64) -> Option<String> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, addr)| addr.raft.clone())
    }

    /// Asks `peer` for a page of history in (`after`, `upto`] (see `chat::backfill`).
    pub async fn fetch_history(
        &self,
        peer: u64,
        after: u64,
        upto: u64,
    ) -> Result<crate::chat::history::RangePage, String> {
        let addr = self
            .raft_addr_of(peer)
            .ok_or_else(|| format!("node {peer} has no known address"))?;
        let answer: server::HistoryAnswer = self
            .rpc
            .post(
                "history",
                peer,
                &addr,
                "/raft/history",
                &server::HistoryRequest { after, upto },
                Duration::from_secs(30),
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        match answer {
            server::HistoryAnswer::Page(page) => Ok(page),
            server::HistoryAnswer::Unavailable(why) => Err(why),
        }
    }

    /// The other members, the leader first: where to copy history from.
    pub fn peers_leader_first(&self) -> Vec<u64> {
        let status = self.status();
        let mut peers: Vec<u64> = self
            .member_chat_addrs()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| *id != self.id)
            .collect();
        peers.sort_by_key(|id| Some(*id) != status.leader);
        peers
    }

    /// A handle that wakes when openraft's view of vote, role, leader or membership changes
    /// (not on every write).
    pub fn watch(&self) -> StatusWatch {
        StatusWatch {
            rx: self.raft.server_metrics(),
        }
    }

    pub(crate) fn note_contact(&self, leader: u64) {
        self.contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(leader, Instant::now());
    }

    /// When `leader` was last heard from (its last AppendEntries to this node).
    pub fn last_contact(&self, leader: u64) -> Option<Instant> {
        self.contacts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&leader)
            .copied()
    }

    pub(crate) fn note_transfer(&self) {
        *self
            .transfer_announced
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// When a planned leadership transfer was last announced, if ever.
    pub fn transfer_announced(&self) -> Option<Instant> {
        *self
            .transfer_announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until openraft's view of vote, role, leader or membership changes (or `timeout`
    /// passes).
    pub async fn status_changed(&self, timeout: Duration) {
        let mut rx = self.raft.server_metrics();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    /// Waits until any of openraft's metrics change, log and apply progress included (or
    /// `timeout` passes). They change on every write: for one waiter at a time, not per write.
    pub async fn progress_changed(&self, timeout: Duration) {
        let mut rx = self.raft.metrics();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    /// Waits (at most `timeout`) until `holds` is true of openraft's server metrics; false if
    /// the time ran out or raft stopped first. Server metrics (vote, role, leader, membership)
    /// change on elections, not on every write, so a waiter is not woken per commit.
    pub(crate) async fn wait_server(
        &self,
        timeout: Option<Duration>,
        holds: impl Fn(&openraft::metrics::RaftServerMetrics<TypeConfig>) -> bool,
    ) -> bool {
        let mut rx = self.raft.server_metrics();
        let wait = async {
            loop {
                if holds(&rx.borrow_watched()) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        match timeout {
            Some(limit) => tokio::time::timeout(limit, wait).await.unwrap_or(false),
            None => wait.await,
        }
    }

    /// Replicates `command` through the leader, wherever it is, and waits until it is
    /// committed and applied on this node. While there is no leader the write is held up to
    /// `chat.write_timeout_ms` and retried on whichever leader appears.
    pub async fn write(&self, command: ChatCommand) -> Result<Committed, WriteError> {
        self.write_batch(vec![command])
            .await
            .pop()
            .unwrap_or_else(|| Err(WriteError::Internal("empty write result".into())))
    }

    /// Replicates `commands` as consecutive log entries, in order, with one round trip to the
    /// leader. Each command gets its own result; a command whose fate is unknown after a leader
    /// change is retried on the new leader (applying is idempotent per session and client id).
    pub async fn write_batch(
        &self,
        commands: Vec<ChatCommand>,
    ) -> Vec<Result<Committed, WriteError>> {
        let traces = vec![None; commands.len()];
        self.write_batch_traced(commands, traces).await
    }

    /// `write_batch` with a W3C `traceparent` per command, carried to the leader when the
    /// batch is forwarded.
    pub async fn write_batch_traced(
        &self,
        commands: Vec<ChatCommand>,
        traceparents: Vec<Option<String>>,
    ) -> Vec<Result<Committed, WriteError>> {
        let deadline = Instant::now() + self.write_timeout;
        let mut results: Vec<Option<Result<Committed, WriteError>>> = vec![None; commands.len()];
        let mut last_problem = String::from("no leader elected");
        loop {
            let pending: Vec<usize> = (0..commands.len())
                .filter(|i| results[*i].is_none())
                .collect();
            if pending.is_empty() {
                break;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                for i in pending {
                    results[i] = Some(Err(WriteError::Unavailable(last_problem.clone())));
                }
                break;
            }
            let batch: Vec<ChatCommand> = pending.iter().map(|i| commands[*i].clone()).collect();
            let batch_traces: Vec<Option<String>> = pending
                .iter()
                .map(|i| traceparents.get(*i).cloned().flatten())
                .collect();
            let outcome = match self.status().leader {
                Some(leader) if leader == self.id => self.write_local(batch, remaining).await,
                Some(leader) => {
                    let outcome = self.forward(leader, batch, batch_traces, remaining).await;
                    if let Ok(items) = &outcome
                        && let Some(top) = items.iter().filter_map(|r| r.committed_index()).max()
                    {
                        // Read-your-writes here, but bounded: the write is committed, and a
                        // lossy link to this node must not hold the acknowledgement for long.
                        self.wait_applied(top, remaining.min(APPLIED_WAIT)).await;
                    }
                    outcome
                }
                None => Err(LocalWrite::NotLeader),
            };
            match outcome {
                Ok(items) => {
                    for (i, item) in pending.into_iter().zip(items) {
                        match item {
                            ItemResult::Committed(done) => results[i] = Some(Ok(done)),
                            // The node that had it could not commit it: try the next leader.
                            ItemResult::Failed(WriteError::Unavailable(problem)) => {
                                last_problem = problem
                            }
                            ItemResult::Failed(e) => results[i] = Some(Err(e)),
                            ItemResult::Retry(problem) => last_problem = problem,
                        }
                    }
                }
                Err(LocalWrite::NotLeader) => {}
                Err(LocalWrite::Retry(problem)) => last_problem = problem,
                Err(LocalWrite::Failed(e)) => {
                    for i in pending {
                        results[i] = Some(Err(e.clone()));
                    }
                    break;
                }
            }
            if results.iter().any(Option::is_none) {
                // Wait for news of a leader, but never spin: metrics change on every ack.
                let remaining = deadline.saturating_duration_since(Instant::now());
                self.status_changed(remaining.min(Duration::from_millis(20)))
                    .await;
                tokio::time::sleep(Duration::from_millis(5).min(remaining)).await;
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(WriteError::Internal("write not attempted".into()))))
            .collect()
    }

    /// Appends `commands` on this node, which believes it is the leader.
    async fn write_local(
        &self,
        commands: Vec<ChatCommand>,
        timeout: Duration,
    ) -> Result<Vec<ItemResult>, LocalWrite> {
        let ts_ms = now_ms();
        let requests: Vec<Request> = commands
            .into_iter()
            .map(|command| Request {
                ts_ms,
                command: command.into(),
            })
            .collect();
        let id = self.id;
        let lost_leadership = self.wait_server(None, |m| m.current_leader != Some(id));
        let write = async {
            let mut stream = self
                .raft
                .client_write_many(requests)
                .await
                // Raft stopped on this node (a fatal storage error): the entry's fate is
                // unknown here, and a re-send elsewhere is deduplicated.
                .map_err(|e| {
                    LocalWrite::Failed(WriteError::Unavailable(format!("raft stopped: {e}")))
                })?;
            let mut items = Vec::new();
            while let Some(next) = stream.next().await {
                let item = match next {
                    Ok(Ok(resp)) => ItemResult::Committed(Committed {
                        index: resp.log_id.index(),
                        response: resp.response,
                    }),
                    Ok(Err(ClientWriteError::ForwardToLeader(_)))
                    | Ok(Err(ClientWriteError::LogEntryDiscarded(_))) => {
                        ItemResult::Retry("leadership changed during the write".into())
                    }
                    Ok(Err(e)) => ItemResult::Failed(WriteError::Internal(e.to_string())),
                    Err(fatal) => {
                        return Err(LocalWrite::Failed(WriteError::Unavailable(format!(
                            "raft stopped: {fatal}"
                        ))));
                    }
                };
                items.push(item);
            }
            Ok(items)
        };
        tokio::select! {
            result = write => result,
            _ = lost_leadership => Err(LocalWrite::NotLeader),
            _ = tokio::time::sleep(timeout) => Err(LocalWrite::Failed(WriteError::Unavailable(
                "the write was not committed in time".into(),
            ))),
        }
    }

    async fn forward(
        &self,
        leader: u64,
        commands: Vec<ChatCommand>,
        traceparents: Vec<Option<String>>,
        timeout: Duration,
    ) -> Result<Vec<ItemResult>, LocalWrite> {
        let addr = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.raft.clone())
            .ok_or_else(|| LocalWrite::Retry(format!("leader {leader} has no known address")))?;
        // The header carries the first message's context for HTTP-level tracing; the body
        // carries one per message.
        let headers: Vec<(&str, String)> = traceparents
            .iter()
            .flatten()
            .next()
            .map(|tp| ("traceparent", tp.clone()))
            .into_iter()
            .collect();
        let request = ForwardRequest {
            commands,
            traceparents,
            timeout_ms: timeout.as_millis() as u64,
        };
        let leader_changed = self.wait_server(None, |m| m.current_leader != Some(leader));
        // Messages are deduplicated per session and client id when applied, so an unanswered
        // forward of messages only may go out again on another connection; a second attach or
        // join could decide differently.
        let messages_only = request
            .commands
            .iter()
            .all(|c| matches!(c, ChatCommand::Send { .. }));
        let hedge = if messages_only {
            Hedge::IfSlow
        } else {
            Hedge::Never
        };
        let call = self.rpc.post_with::<_, ForwardAnswer>(
            "forward",
            leader,
            &addr,
            "/api/write",
            &request,
            timeout,
            &headers,
            hedge,
        );
        tokio::select! {
            answer = call => match answer {
                Ok(ForwardAnswer::Results(items)) => Ok(items),
                Ok(ForwardAnswer::NotLeader) => Err(LocalWrite::Retry(format!("node {leader} is no longer the leader"))),
                Err(e) => Err(LocalWrite::Retry(e.to_string())),
            },
            _ = leader_changed => Err(LocalWrite::Retry(format!("leader {leader} was replaced"))),
        }
    }

    /// Waits (bounded) until this node has applied `index`, so a client that was acknowledged
    /// here can read its own write here. False when it has not in time.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "forwarded write applied")
            .await
            .is_ok()
    }

    /// A leader hands leadership to the most caught-up follower, so the cluster does not wait
    /// for an election timeout; true once another node leads. Call it while this node still
    /// serves its raft port: forwarded writes keep flowing until the new leader takes over.
    pub async fn hand_over(&self) -> bool {
        let status = self.status();
        let mut transferred = false;
        // Only a follower that acknowledged a heartbeat within the lease can take over (the
        // others may be stopping too): the least behind of them.
        let live: Vec<u64> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.heartbeat
                .iter()
                .flatten()
                .filter(|(_, acked)| acked.as_ref().is_some_and(|t| t.elapsed() < self.lease))
                .map(|(id, _)| *id)
                .collect()
        };
        let mut candidates: Vec<(u64, u64)> = status
            .replication_lag
            .iter()
            .filter(|(id, _)| live.contains(id))
            .map(|(id, lag)| (*id, *lag))
            .collect();
        candidates.sort_by_key(|(_, lag)| *lag);
        // A follower that stopped a moment ago still has a fresh heartbeat: its raft port
        // refusing connections tells.
        let mut target = None;
        for (id, lag) in candidates {
            if let Some(addr) = self.raft_addr(id)
                && tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(&addr),
                )
                .await
                .is_ok_and(|c| c.is_ok())
            {
                target = Some((id, lag));
                break;
            }
        }
        if status.role == Role::Leader && target.is_none() {
            tracing::info!("no live follower to hand leadership over to");
        }
        if status.role == Role::Leader
            && let Some((to, _)) = target
        {
            tracing::info!(to, "handing leadership over before shutdown");
            self.note_transfer();
            if self.raft.trigger().transfer_leader(to).await.is_ok() {
                let handed = self
                    .raft
                    .wait(Some(Duration::from_secs(2)))
                    .metrics(
                        |m| m.current_leader.is_some_and(|l| l != self.id),
                        "leader transferred",
                    )
                    .await;
                transferred = handed.is_ok();
            }
        }
        transferred
    }

    /// Stops raft on this node.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// Wakes when openraft's view of the cluster changes.
pub struct StatusWatch {
    rx: openraft::alias::WatchReceiverOf<
        TypeConfig,
        openraft::metrics::RaftServerMetrics<TypeConfig>,
    >,
}

impl StatusWatch {
    /// Returns when something changed; `false` once raft has shut down.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

enum LocalWrite {
    NotLeader,
    Retry(String),
    Failed(WriteError),
}

/// Refuses to start when the log was purged beyond the state it would rebuild from: that would
/// silently drop committed entries.
async fn check_log_covers_state(log: &LogStore, sm: &StateMachine) -> Result<(), String> {
    use openraft::storage::RaftLogStorage;
    let mut log = log.clone();
    let state = log.get_log_state().await.map_err(|e| e.to_string())?;
    let purged = state.last_purged_log_id.map_or(0, |l| l.index());
    let snapshot = sm.snapshot_log_id().map_or(0, |l| l.index());
    if purged > snapshot {
        return Err(format!(
            "the raft log was compacted up to entry {purged} but the snapshot covering it is missing (snapshot.json covers {snapshot}); refusing to start without those entries"
        ));
    }
    Ok(())
}
