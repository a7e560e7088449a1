//! The log's writes: the storage thread that groups queued operations into one write and one
//! fsync, and the writer it shares with a follower's caller (see `log_store`'s module doc).

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use tokio::sync::oneshot;

use super::super::types::{Entry, LogId, TypeConfig, Vote};
use super::super::wal::{Record, WalWriter};
use super::{LogMem, SyncObserver};

/// Most operations one durable commit takes.
const MAX_BATCH: usize = 4096;

/// The log file's writer, shared by the storage thread and a follower's caller (see the
/// module doc), and what each needs to know about the other.
pub(super) struct Writer {
    pub(super) wal: Mutex<WalWriter>,
    /// Operations sent to the storage thread and not yet written (those it holds back too).
    pub(super) queued: AtomicUsize,
    /// How long the latest durable write took, in microseconds.
    pub(super) last_sync_micros: AtomicU64,
    pub(super) path: std::path::PathBuf,
    pub(super) on_sync: SyncObserver,
}

impl Op {
    /// Whether the write must be on disk before it is reported done. The commit index and a
    /// purge need not be: after a crash the node applies up to an older commit index and
    /// learns the newer one from the leader (every committed entry is on a majority's disk),
    /// and purged entries that come back are purged again.
    pub(super) fn needs_fsync(&self) -> bool {
        matches!(self, Op::Append(..) | Op::SaveVote(..) | Op::Truncate(..))
    }
}

pub(super) enum Op {
    /// Entries, who to tell, and `LogMem::truncations` when they were queued.
    Append(Vec<Entry>, IOFlushed<TypeConfig>, u64),
    SaveVote(Vote, oneshot::Sender<io::Result<()>>),
    SaveCommitted(Option<LogId>),
    /// Delete every entry from this index on.
    Truncate(u64, oneshot::Sender<io::Result<()>>),
    Purge(LogId),
}

/// Writes that need no fsync of their own (the commit index, purges) wait this long at most
/// for a durable batch to ride on, then are written without one.
const DEFERRED_FLUSH: Duration = Duration::from_millis(200);

/// The commit index is not queued: `save_committed` only records it in `LogMem`, and this
/// thread writes it with the next batch (or alone, without an fsync, when nothing else came
/// for `DEFERRED_FLUSH`). A commit advances once per write, so queueing it woke this thread a
/// second time for every message.
pub(super) fn storage_thread(writer: &Writer, mem: &Mutex<LogMem>, rx: mpsc::Receiver<Op>) {
    let mut deferred: Vec<Op> = Vec::new();
    let mut deferred_since = Instant::now();
    loop {
        let wait = if deferred.is_empty() {
            DEFERRED_FLUSH
        } else {
            DEFERRED_FLUSH.saturating_sub(deferred_since.elapsed())
        };
        let first = match rx.recv_timeout(wait) {
            Ok(op) => op,
            Err(why) => {
                // Nothing came for a while (or the store is gone): what waited is written
                // without an fsync.
                let batch = std::mem::take(&mut deferred);
                writer.write_queued(mem, batch, false);
                if why == mpsc::RecvTimeoutError::Disconnected {
                    return;
                }
                continue;
            }
        };
        // What waited goes first: the order of writes is the order they were queued.
        let waited = !deferred.is_empty();
        let mut batch = std::mem::take(&mut deferred);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if batch.iter().any(Op::needs_fsync) {
            writer.write_queued(mem, batch, true);
        } else if batch.len() >= MAX_BATCH || (waited && deferred_since.elapsed() >= DEFERRED_FLUSH)
        {
            writer.write_queued(mem, batch, false);
        } else {
            if !waited {
                deferred_since = Instant::now();
            }
            deferred = batch;
        }
    }
}

/// Appends the commit index to `batch` if it moved since the log last wrote one, and only once
/// the log (with this batch) holds the entry it names: a log on disk never says more is
/// committed than it has.
fn add_committed(batch: &mut Vec<Op>, wal: &WalWriter, mem: &Mutex<LogMem>) {
    let committed = mem.lock().unwrap_or_else(|p| p.into_inner()).committed;
    if committed == wal.committed() {
        return;
    }
    let batch_end = batch
        .iter()
        .filter_map(|op| match op {
            Op::Append(entries, _, _) => entries.last().map(|e| e.index()),
            _ => None,
        })
        .max();
    let covered = wal.end().max(batch_end);
    if committed.as_ref().map(|c| c.index()) <= covered {
        batch.push(Op::SaveCommitted(committed));
    }
}

impl Writer {
    /// The storage thread's write of operations it was sent (none is the commit index alone).
    pub(super) fn write_queued(&self, mem: &Mutex<LogMem>, batch: Vec<Op>, durable: bool) {
        let sent = batch.len();
        let mut wal = self.wal.lock().unwrap_or_else(|p| p.into_inner());
        self.write(&mut wal, mem, batch, durable);
        self.queued.fetch_sub(sent, Ordering::SeqCst);
    }

    /// Writes `batch`, with the commit index when it moved, in one write (with an fsync when
    /// `durable`); `wal` is this writer's, held by the caller.
    pub(super) fn write(
        &self,
        wal: &mut WalWriter,
        mem: &Mutex<LogMem>,
        mut batch: Vec<Op>,
        durable: bool,
    ) {
        add_committed(&mut batch, wal, mem);
        if !batch.is_empty() {
            self.commit(wal, mem, batch, durable);
        }
    }

    /// Writes `batch` in one write (with an fsync when `durable`) and reports each write's
    /// outcome.
    fn commit(&self, wal: &mut WalWriter, mem: &Mutex<LogMem>, batch: Vec<Op>, durable: bool) {
        let started = Instant::now();
        let result = write_batch(wal, &batch, durable);
        if result.is_ok() {
            if durable {
                let took = started.elapsed();
                self.last_sync_micros
                    .store(took.as_micros() as u64, Ordering::Relaxed);
                (self.on_sync)(took);
            }
            mem.lock()
                .unwrap_or_else(|p| p.into_inner())
                .written(&batch);
        } else if let Err(e) = &result {
            tracing::error!(path = %self.path.display(), error = %e, "raft log write failed");
        }
        report(batch, &result);
    }
}

/// Tells everyone waiting on `batch` how its write went.
fn report(batch: Vec<Op>, result: &io::Result<()>) {
    for op in batch {
        let outcome = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| io::Error::other(e.to_string()));
        match op {
            Op::Append(_, done, _) => done.io_completed(outcome),
            Op::SaveVote(_, done) | Op::Truncate(_, done) => {
                let _ = done.send(outcome);
            }
            Op::SaveCommitted(_) | Op::Purge(_) => {}
        }
    }
}

fn write_batch(wal: &mut WalWriter, batch: &[Op], durable: bool) -> io::Result<()> {
    let mut records = Vec::with_capacity(batch.len());
    for op in batch {
        match op {
            Op::Append(entries, _, _) => records.extend(entries.iter().map(Record::Entry)),
            Op::SaveVote(vote, _) => records.push(Record::Vote(vote)),
            Op::SaveCommitted(committed) => records.push(Record::Committed(committed)),
            Op::Truncate(from, _) => records.push(Record::Truncate(*from)),
            Op::Purge(upto) => records.push(Record::Purge(upto)),
        }
    }
    wal.write(&records, durable)
}
