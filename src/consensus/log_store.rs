//! The raft log on disk (`consensus::wal`), with group commit.
//!
//! Entries live in memory from `append` on, so they are readable at once; a dedicated storage
//! thread drains every queued write into one write and one fsync, then reports each
//! append as flushed. Under load many client writes share one durable commit. Writes are
//! applied in the order they were queued, so a truncate or purge is never reordered against a
//! later append or vote.
//!
//! One exception: a follower's append that would be the storage thread's only work is written
//! by the thread that appends it (raft's), while the disk answers within `WRITE_HERE_MAX`.
//! Handing it over and being told it is done were two thread wake-ups on the path of every
//! acknowledged message, costlier on this kind of machine than the write itself
//! (BENCHMARKS.md, the eighteenth session). A leader's own appends always go to the storage
//! thread: its raft runtime must keep sending entries while they are written. So does an
//! append that would start a new segment (creating and syncing files, perhaps filling one
//! with zeros, is not the one fsync this exception bounds).
//!
//! Memory is bounded: an entry stays in memory until it is durable, and after that only while
//! it is among the newest `CACHE_BYTES` of entries (what replication to a healthy follower
//! reads). A lagging follower's older entries are read from the log's files on a blocking
//! thread.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use tokio::sync::oneshot;

use super::types::{Entry, LogId, TypeConfig, Vote};
use super::wal::{Replayed, WalReader, WalWriter};
use writer::{Op, Writer, storage_thread};

mod writer;

/// Durable entries kept in memory for replication, by approximate size.
const CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of entries one AppendEntries carries.
const REPLICATION_BYTES: usize = 1024 * 1024;

/// A follower's append is written by its caller only while the last durable write took at
/// most this long: it bounds how long raft's runtime waits on the disk (on this machine an
/// fsync takes 0.1-0.3 ms), and a slow disk sends every write back to the storage thread.
const WRITE_HERE_MAX: Duration = Duration::from_millis(1);

/// Reports the duration of each durable commit (the storage sync histogram).
pub type SyncObserver = Arc<dyn Fn(Duration) + Send + Sync>;

#[derive(Clone)]
pub struct LogStore {
    mem: Arc<Mutex<LogMem>>,
    ops: mpsc::Sender<Op>,
    files: WalReader,
    writer: Arc<Writer>,
    /// This node's id: entries another node's leadership appended make this node a follower.
    own_id: u64,
}

#[derive(Default)]
struct LogMem {
    /// Entries not yet durable, and the newest durable ones, with their approximate size.
    cache: BTreeMap<u64, (Entry, usize)>,
    cache_bytes: usize,
    /// Every entry up to this index is on disk as the log has it (and may leave the cache).
    durable_upto: u64,
    /// How many truncations happened: an append queued before the latest one may have
    /// written entries that are no longer the log's, so it proves nothing durable.
    truncations: u64,
    last: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

/// Roughly what an entry costs in memory: its chat payload plus bookkeeping.
fn approx_size(entry: &Entry) -> usize {
    use crate::chat::command::ChatCommand;
    let payload = match &entry.payload {
        openraft::EntryPayload::Normal(req) => match &*req.command {
            ChatCommand::Send {
                session,
                id,
                to,
                text,
            } => session.len() + id.len() + to.len() + text.len(),
            _ => 128,
        },
        _ => 256,
    };
    payload + 160
}

impl LogMem {
    fn insert(&mut self, entry: Entry) {
        let size = approx_size(&entry);
        if let Some((_, old)) = self.cache.insert(entry.index(), (entry, size)) {
            self.cache_bytes -= old;
        }
        self.cache_bytes += size;
    }

    /// Drops the oldest durable entries while the cache is over its budget.
    fn evict(&mut self) {
        while self.cache_bytes > CACHE_BYTES {
            let Some((&first, _)) = self.cache.first_key_value() else {
                return;
            };
            if first > self.durable_upto {
                return;
            }
            if let Some((_, size)) = self.cache.remove(&first) {
                self.cache_bytes -= size;
            }
        }
    }

    /// Takes appended entries in; returns the truncation count they were appended under.
    fn appended(&mut self, entries: &[Entry]) -> u64 {
        for e in entries {
            self.last = Some(e.log_id());
            self.insert(e.clone());
        }
        self.truncations
    }

    /// Forgets entries from `from` on.
    fn truncated(&mut self, from: u64, last: Option<LogId>) {
        self.forget_from(from);
        self.last = last.or(self.last_purged);
        // Until the truncation is written, the disk still holds the old entries from `from` on:
        // entries appended there must stay in memory until they are written themselves.
        self.truncations += 1;
        self.durable_upto = self.durable_upto.min(from.saturating_sub(1));
    }

    /// Records what a written batch made durable, then evicts.
    fn written(&mut self, batch: &[Op]) {
        for op in batch {
            match op {
                Op::Append(entries, _, truncations) => {
                    // Written before a later truncation: the disk holds them until that
                    // truncation is written, but the log no longer does.
                    if let Some(last) = entries.last()
                        && *truncations == self.truncations
                    {
                        self.durable_upto = last.index();
                    }
                }
                Op::Truncate(from, _) => {
                    self.durable_upto = self.durable_upto.min(from.saturating_sub(1));
                }
                _ => {}
            }
        }
        self.evict();
    }

    /// Forgets the entries from `from` on. Cuts the ordered cache once instead of visiting
    /// every entry it holds (it holds up to `CACHE_BYTES`).
    fn forget_from(&mut self, from: u64) {
        for (_, (_, size)) in self.cache.split_off(&from) {
            self.cache_bytes -= size;
        }
    }

    /// Forgets the entries up to `upto`; a purge runs every few hundred entries, so this
    /// visits only what it removes.
    fn forget_upto(&mut self, upto: u64) {
        while let Some(first) = self.cache.first_entry() {
            if *first.key() > upto {
                return;
            }
            let (_, size) = first.remove();
            self.cache_bytes -= size;
        }
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens (or creates) the log in the directory `dir` and starts the storage thread. A log
    /// written by an older version into the redb file `legacy` is moved into `dir` first.
    /// A log that cannot be decoded or has a hole is refused with an error naming the problem.
    /// `own_id` is this node's id.
    pub fn open(
        dir: &Path,
        legacy: &Path,
        on_sync: SyncObserver,
        own_id: u64,
    ) -> io::Result<LogStore> {
        if legacy.exists() && !super::wal::exists(dir) {
            super::legacy_log::import(legacy, dir)?;
        }
        let mut mem = LogMem::default();
        let (writer, files) = WalWriter::open(dir, |record| {
            match record {
                Replayed::Entry(entry) => {
                    mem.durable_upto = entry.index();
                    // Every entry is checked; only the newest stay in memory.
                    mem.insert(entry);
                    mem.evict();
                }
                Replayed::Vote(vote) => mem.vote = Some(vote),
                Replayed::Committed(committed) => mem.committed = committed,
                Replayed::Truncate(from) => {
                    mem.forget_from(from);
                    mem.durable_upto = mem.durable_upto.min(from.saturating_sub(1));
                }
                Replayed::Purge(upto) => {
                    mem.forget_upto(upto.index());
                    mem.last_purged = Some(upto);
                }
            }
            Ok(())
        })?;
        mem.last = match files.last_index() {
            Some(last) => match mem.cache.get(&last) {
                Some((entry, _)) => Some(entry.log_id()),
                None => files.read(last, last + 1, 1)?.first().map(|e| e.log_id()),
            },
            None => mem.last_purged,
        };
        if let Some(committed) = &mem.committed
            && mem.last.as_ref().map(|l| l.index()) < Some(committed.index())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "raft log {} is corrupt: committed index {} is beyond the last entry",
                    dir.display(),
                    committed.index()
                ),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let mem = Arc::new(Mutex::new(mem));
        let writer = Arc::new(Writer {
            wal: Mutex::new(writer),
            queued: AtomicUsize::new(0),
            last_sync_micros: AtomicU64::new(0),
            path: dir.to_path_buf(),
            on_sync,
        });
        let (thread_mem, thread_writer) = (mem.clone(), writer.clone());
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || storage_thread(&thread_writer, &thread_mem, rx))?;
        Ok(LogStore {
            mem,
            ops: tx,
            files,
            writer,
            own_id,
        })
    }

    fn mem(&self) -> MutexGuard<'_, LogMem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, op: Op) -> io::Result<()> {
        // Counted before it can be written, so a caller never writes ahead of it.
        self.writer.queued.fetch_add(1, Ordering::SeqCst);
        self.ops.send(op).map_err(|_| {
            self.writer.queued.fetch_sub(1, Ordering::SeqCst);
            io::Error::other("raft log storage thread has stopped")
        })
    }

    /// Entries another node's leadership appended, while the disk is quick.
    fn may_write_here(&self, entries: &[Entry]) -> bool {
        let appended_by_another_leader = entries
            .first()
            .is_some_and(|e| e.log_id.leader_id.node_id != self.own_id);
        let disk_is_quick = self.writer.last_sync_micros.load(Ordering::Relaxed)
            <= WRITE_HERE_MAX.as_micros() as u64;
        appended_by_another_leader && disk_is_quick
    }

    /// Writes a follower's append here and now when the rules of the module doc allow it;
    /// otherwise gives it back, to be queued.
    fn write_here(&self, op: Op) -> Option<Op> {
        let Op::Append(entries, _, _) = &op else {
            return Some(op);
        };
        if !self.may_write_here(entries) {
            return Some(op);
        }
        let mut wal = match self.writer.wal.try_lock() {
            Ok(wal) => wal,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // The storage thread is writing: this append rides on its next batch.
            Err(TryLockError::WouldBlock) => return Some(op),
        };
        // With the writer held, nothing queued means nothing is written ahead of this.
        if self.writer.queued.load(Ordering::SeqCst) != 0
            || !wal.fits_in_segment(encoded_bound(entries))
        {
            return Some(op);
        }
        self.writer.write(&mut wal, &self.mem, vec![op], true);
        None
    }
}

/// At least the bytes `entries` take in the log with the commit index beside them: JSON
/// escapes a text's byte in at most six.
fn encoded_bound(entries: &[Entry]) -> u64 {
    let approx: usize = entries.iter().map(approx_size).sum();
    6 * approx as u64 + 512
}

impl LogStore {
    /// Entries in [`start`, `end`): the part below the cache from disk, the rest from memory,
    /// stopping after about `budget` bytes (never before the first entry).
    async fn read(&self, start: u64, end: u64, budget: usize) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut cursor = start;
        while cursor < end && bytes < budget {
            // Everything below the cache is durable, so it is on disk.
            let cache_start = self.mem().cache.keys().next().copied();
            let disk_end = cache_start.map_or(end, |first| first.min(end));
            if cursor < disk_end {
                let files = self.files.clone();
                let left = budget - bytes;
                let read = tokio::task::spawn_blocking(move || files.read(cursor, disk_end, left))
                    .await
                    .map_err(other)??;
                let Some(last) = read.last() else {
                    return Ok(entries);
                };
                cursor = last.index() + 1;
                bytes += read.iter().map(approx_size).sum::<usize>();
                entries.extend(read);
                continue;
            }
            let mem = self.mem();
            // Entries may have left the cache since it was looked at: read them from disk.
            if mem.cache.keys().next().is_none_or(|first| *first > cursor) {
                if mem.cache.is_empty() {
                    return Ok(entries);
                }
                continue;
            }
            for (entry, size) in mem.cache.range(cursor..end).map(|(_, v)| v) {
                entries.push(entry.clone());
                bytes += size;
                if bytes >= budget {
                    break;
                }
            }
            break;
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        self.read(start, end, usize::MAX).await
    }

    /// What replication sends in one AppendEntries: at most `REPLICATION_BYTES` of entries
    /// (at least one), so a lagging follower never costs both ends a huge request.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read(start, end, REPLICATION_BYTES).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.mem().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = self.mem();
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last.or(mem.last_purged),
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
        // Written by the storage thread with its next batch (see `storage_thread`).
        self.mem().committed = committed;
        Ok(())
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
        let truncations = self.mem().appended(&entries);
        match self.write_here(Op::Append(entries, callback, truncations)) {
            Some(op) => self.send(op),
            None => Ok(()),
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        self.mem().truncated(from, last_log_id);
        let (tx, rx) = oneshot::channel();
        self.send(Op::Truncate(from, tx))?;
        rx.await
            .map_err(|_| io::Error::other("raft log storage thread has stopped"))?
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        {
            let mut mem = self.mem();
            mem.forget_upto(log_id.index());
            mem.last_purged = Some(log_id);
            if mem.last.as_ref().map(|l| l.index()) < Some(log_id.index()) {
                mem.last = Some(log_id);
            }
        }
        self.send(Op::Purge(log_id))
    }
}

#[cfg(test)]
pub(crate) mod tests;
