//! openraft's state machine over the chat store.
//!
//! Durability: messages are written to the history without an fsync on apply; the chat state
//! lives in memory. A snapshot first makes the history durable, then writes the chat state and
//! the snapshot's log id to `snapshot.json` atomically. After a crash the node restores that
//! snapshot and openraft re-applies the log above it (the log is never purged past a durable
//! snapshot), so nothing committed is lost and re-written messages are identical.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::chat::command::{ChatResponse, StoredMessage};
use crate::chat::state::ChatState;
use crate::chat::store::{AppliedEntry, ChatStore};

pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotPayload>;

/// What a snapshot carries between nodes: the whole chat state and every message it covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotPayload {
    pub state: ChatState,
    pub messages: Vec<StoredMessage>,
}

/// The local snapshot file: messages stay in the history store, which is flushed first.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    state: ChatState,
}

#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

struct Inner {
    chat: Arc<ChatStore>,
    snapshot_path: PathBuf,
    applied: Mutex<Applied>,
}

#[derive(Clone, Default)]
struct Applied {
    last: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<SnapshotMeta>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

impl StateMachine {
    /// Restores the last snapshot in `dir`, if any, into `chat`.
    pub fn open(dir: &Path, chat: Arc<ChatStore>) -> io::Result<StateMachine> {
        let snapshot_path = dir.join("snapshot.json");
        let mut applied = Applied::default();
        match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let file: SnapshotFile = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("snapshot {} is corrupt: {e}", snapshot_path.display()),
                    )
                })?;
                let index = file.meta.last_log_id.as_ref().map_or(0, |l| l.index());
                chat.install(file.state, index, None).map_err(io_err)?;
                applied.last = file.meta.last_log_id;
                applied.membership = file.meta.last_membership.clone();
                applied.snapshot = Some(file.meta);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(StateMachine {
            inner: Arc::new(Inner {
                chat,
                snapshot_path,
                applied: Mutex::new(applied),
            }),
        })
    }

    /// The log id of the last durable snapshot, if any.
    pub fn snapshot_log_id(&self) -> Option<LogId> {
        self.applied().snapshot.as_ref().and_then(|m| m.last_log_id)
    }

    fn applied(&self) -> MutexGuard<'_, Applied> {
        self.inner.applied.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes `file` next to `path` and renames it over `path`, fsyncing both.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn payload_for(
    chat: &ChatStore,
    state: ChatState,
    meta: &SnapshotMeta,
) -> io::Result<SnapshotPayload> {
    let upto = meta.last_log_id.as_ref().map_or(0, |l| l.index());
    let messages = chat.history().all_upto(upto).map_err(io_err)?;
    Ok(SnapshotPayload { state, messages })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotPayload;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let a = self.applied();
        Ok((a.last, a.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        let Some((last, _)) = batch.last() else {
            return Ok(());
        };
        let last_log_id = last.log_id();
        let mut membership = None;
        for (entry, _) in &batch {
            if let EntryPayload::Membership(m) = &entry.payload {
                membership = Some(StoredMembership::new(Some(entry.log_id()), m.clone()));
            }
        }
        let chat = self.inner.chat.clone();
        let (batch, responses) = blocking(move || {
            let applied: Vec<AppliedEntry<'_>> = batch
                .iter()
                .map(|(entry, _)| match &entry.payload {
                    EntryPayload::Normal(req) => AppliedEntry {
                        index: entry.index(),
                        ts_ms: req.ts_ms,
                        command: Some(&req.command),
                    },
                    _ => AppliedEntry {
                        index: entry.index(),
                        ts_ms: 0,
                        command: None,
                    },
                })
                .collect();
            let responses = chat.apply(&applied).map_err(io_err)?;
            drop(applied);
            Ok((batch, responses))
        })
        .await?;
        {
            let mut a = self.applied();
            a.last = Some(last_log_id);
            if let Some(m) = membership {
                a.membership = m;
            }
        }
        for ((_, responder), response) in batch.into_iter().zip(responses) {
            if let Some(responder) = responder {
                responder.send(response.unwrap_or(ChatResponse::Done));
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called in sequence with `apply`: the copy is a consistent point in time.
        let (state, _) = self.inner.chat.snapshot();
        let a = self.applied().clone();
        SnapshotBuilder {
            sm: self.clone(),
            state,
            meta: SnapshotMeta {
                last_log_id: a.last,
                last_membership: a.membership,
            },
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotPayload,
    ) -> Result<(), io::Error> {
        let inner = self.inner.clone();
        let meta_copy = meta.clone();
        blocking(move || {
            let index = meta_copy.last_log_id.as_ref().map_or(0, |l| l.index());
            let file = SnapshotFile {
                meta: meta_copy,
                state: snapshot.state.clone(),
            };
            inner
                .chat
                .install(snapshot.state, index, Some(&snapshot.messages))
                .map_err(io_err)?;
            write_atomically(
                &inner.snapshot_path,
                &serde_json::to_vec(&file).map_err(io_err)?,
            )
        })
        .await?;
        let mut a = self.applied();
        a.last = meta.last_log_id;
        a.membership = meta.last_membership.clone();
        a.snapshot = Some(meta.clone());
        tracing::info!(index = ?meta.last_log_id.as_ref().map(|l| l.index()), "installed snapshot from leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let Some(meta) = self.applied().snapshot.clone() else {
            return Ok(None);
        };
        let inner = self.inner.clone();
        blocking(move || {
            let bytes = std::fs::read(&inner.snapshot_path)?;
            let file: SnapshotFile = serde_json::from_slice(&bytes).map_err(io_err)?;
            let snapshot = payload_for(&inner.chat, file.state, &meta)?;
            Ok(Some(Snapshot { meta, snapshot }))
        })
        .await
    }
}

pub struct SnapshotBuilder {
    sm: StateMachine,
    state: ChatState,
    meta: SnapshotMeta,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotPayload;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let inner = self.sm.inner.clone();
        let file = SnapshotFile {
            meta: self.meta.clone(),
            state: self.state.clone(),
        };
        let meta = self.meta.clone();
        let snapshot = blocking(move || {
            // Every message up to the snapshot must be durable before the log behind it can go.
            inner.chat.history().flush().map_err(io_err)?;
            write_atomically(
                &inner.snapshot_path,
                &serde_json::to_vec(&file).map_err(io_err)?,
            )?;
            payload_for(&inner.chat, file.state, &file.meta)
        })
        .await?;
        self.sm.applied().snapshot = Some(meta.clone());
        tracing::info!(index = ?meta.last_log_id.as_ref().map(|l| l.index()), "built snapshot");
        Ok(Snapshot { meta, snapshot })
    }
}
