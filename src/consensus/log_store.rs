//! The raft log on disk (redb), with group commit.
//!
//! Entries live in memory from `append` on, so they are readable at once; a dedicated storage
//! thread drains every queued write into one redb transaction and one fsync, then reports each
//! append as flushed. Under load many client writes share one durable commit, and no fsync
//! ever runs on the async runtime. Writes are applied in the order they were queued, so a
//! truncate or purge is never reordered against a later append or vote.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::types::{Entry, LogId, TypeConfig, Vote};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Most operations one durable commit takes.
const MAX_BATCH: usize = 4096;

/// Reports the duration of each durable commit (the storage sync histogram).
pub type SyncObserver = Arc<dyn Fn(Duration) + Send + Sync>;

#[derive(Clone)]
pub struct LogStore {
    mem: Arc<Mutex<LogMem>>,
    ops: mpsc::Sender<Op>,
}

#[derive(Default)]
struct LogMem {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

enum Op {
    Append(Vec<Entry>, IOFlushed<TypeConfig>),
    SaveVote(Vote, oneshot::Sender<io::Result<()>>),
    SaveCommitted(Option<LogId>),
    /// Delete every entry from this index on.
    Truncate(u64, oneshot::Sender<io::Result<()>>),
    Purge(LogId),
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log {} is corrupt: {what}", path.display()),
    )
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens (or creates) the log at `path`, loads it and starts the storage thread.
    /// A log that cannot be decoded or has a hole is refused with an error naming the problem.
    pub fn open(path: &Path, on_sync: SyncObserver) -> io::Result<LogStore> {
        let db = crate::disk::open_database(path).map_err(io::Error::other)?;
        let mut mem = LogMem::default();
        {
            let txn = db.begin_write().map_err(other)?;
            txn.open_table(LOGS).map_err(other)?;
            txn.open_table(META).map_err(other)?;
            txn.commit().map_err(other)?;
        }
        {
            let txn = db.begin_read().map_err(other)?;
            let meta = txn.open_table(META).map_err(other)?;
            let read_meta = |key: &str| -> io::Result<Option<Vec<u8>>> {
                Ok(meta.get(key).map_err(other)?.map(|v| v.value().to_vec()))
            };
            if let Some(bytes) = read_meta("vote")? {
                mem.vote = Some(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| corrupt(path, format!("vote: {e}")))?,
                );
            }
            if let Some(bytes) = read_meta("committed")? {
                mem.committed = serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(path, format!("committed: {e}")))?;
            }
            if let Some(bytes) = read_meta("last_purged")? {
                mem.last_purged = serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(path, format!("last_purged: {e}")))?;
            }
            let logs = txn.open_table(LOGS).map_err(other)?;
            let mut expected = mem.last_purged.as_ref().map(|l| l.index() + 1);
            for row in logs.iter().map_err(other)? {
                let (k, v) = row.map_err(other)?;
                let index = k.value();
                if let Some(exp) = expected
                    && exp != index
                {
                    return Err(corrupt(
                        path,
                        format!("expected entry {exp}, found {index}"),
                    ));
                }
                let entry: Entry = serde_json::from_slice(v.value())
                    .map_err(|e| corrupt(path, format!("entry {index}: {e}")))?;
                if entry.index() != index {
                    return Err(corrupt(
                        path,
                        format!("entry stored at {index} says {}", entry.index()),
                    ));
                }
                expected = Some(index + 1);
                mem.entries.insert(index, entry);
            }
        }
        if let (Some(committed), last) = (&mem.committed, mem.entries.keys().next_back())
            && last
                .copied()
                .or(mem.last_purged.as_ref().map(|l| l.index()))
                < Some(committed.index())
        {
            return Err(corrupt(
                path,
                format!(
                    "committed index {} is beyond the last entry",
                    committed.index()
                ),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || storage_thread(db, rx, &thread_path, on_sync))?;
        Ok(LogStore {
            mem: Arc::new(Mutex::new(mem)),
            ops: tx,
        })
    }

    fn mem(&self) -> MutexGuard<'_, LogMem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.ops
            .send(op)
            .map_err(|_| io::Error::other("raft log storage thread has stopped"))
    }
}

fn storage_thread(db: Database, rx: mpsc::Receiver<Op>, path: &Path, on_sync: SyncObserver) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = write_batch(&db, &batch);
        if result.is_ok() {
            on_sync(started.elapsed());
        } else if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "raft log write failed");
        }
        for op in batch {
            let outcome = result
                .as_ref()
                .map(|_| ())
                .map_err(|e| io::Error::other(e.to_string()));
            match op {
                Op::Append(_, done) => done.io_completed(outcome),
                Op::SaveVote(_, done) | Op::Truncate(_, done) => {
                    let _ = done.send(outcome);
                }
                Op::SaveCommitted(_) | Op::Purge(_) => {}
            }
        }
    }
}

fn write_batch(db: &Database, batch: &[Op]) -> io::Result<()> {
    let txn = db.begin_write().map_err(other)?;
    {
        let mut logs = txn.open_table(LOGS).map_err(other)?;
        let mut meta = txn.open_table(META).map_err(other)?;
        for op in batch {
            match op {
                Op::Append(entries, _) => {
                    for entry in entries {
                        let bytes = serde_json::to_vec(entry).map_err(other)?;
                        logs.insert(entry.index(), bytes.as_slice())
                            .map_err(other)?;
                    }
                }
                Op::SaveVote(vote, _) => {
                    let bytes = serde_json::to_vec(vote).map_err(other)?;
                    meta.insert("vote", bytes.as_slice()).map_err(other)?;
                }
                Op::SaveCommitted(committed) => {
                    let bytes = serde_json::to_vec(committed).map_err(other)?;
                    meta.insert("committed", bytes.as_slice()).map_err(other)?;
                }
                Op::Truncate(from, _) => {
                    logs.retain_in(*from.., |_, _| false).map_err(other)?;
                }
                Op::Purge(upto) => {
                    logs.retain_in(..=upto.index(), |_, _| false)
                        .map_err(other)?;
                    let bytes = serde_json::to_vec(upto).map_err(other)?;
                    meta.insert("last_purged", bytes.as_slice())
                        .map_err(other)?;
                }
            }
        }
    }
    txn.commit().map_err(other)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self
            .mem()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.mem().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = self.mem();
        let last = mem.entries.values().next_back().map(|e| e.log_id());
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: last.or_else(|| mem.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::SaveVote(*vote, tx))?;
        rx.await
            .map_err(|_| io::Error::other("raft log storage thread has stopped"))??;
        self.mem().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.mem().committed = committed;
        self.send(Op::SaveCommitted(committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.mem().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut mem = self.mem();
            for e in &entries {
                mem.entries.insert(e.index(), e.clone());
            }
        }
        self.send(Op::Append(entries, callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        self.mem().entries.retain(|&i, _| i < from);
        let (tx, rx) = oneshot::channel();
        self.send(Op::Truncate(from, tx))?;
        rx.await
            .map_err(|_| io::Error::other("raft log storage thread has stopped"))?
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        {
            let mut mem = self.mem();
            mem.entries.retain(|&i, _| i > log_id.index());
            mem.last_purged = Some(log_id);
        }
        self.send(Op::Purge(log_id))
    }
}
