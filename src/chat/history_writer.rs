//! The history's writer: a thread of its own that moves applied messages into `History`, off
//! the apply path, in index order.
//!
//! Applying only queues a batch's messages. The thread writes whatever is queued in one
//! transaction, at most once every `LINGER` (or `MAX_LINGER` while fewer than `COMPANY`
//! messages wait) unless someone waits for it: a reader that needs the history up to an index
//! (`ready`) ends the linger at once. Under a steady trickle of
//! writes that is one B-tree commit and one wake-up for several batches instead of one each;
//! what lingers is in memory only, and the log keeps it until a snapshot (which waits for
//! the writer first) covers it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::command::{MessageEvent, StoredMessage};
use super::history::{History, HistoryError, HistoryRun, Retention};

/// How long queued messages wait for company when nobody needs them yet…
const LINGER: Duration = Duration::from_millis(5);
/// …and how long when fewer than `COMPANY` came meanwhile. Every write wakes the thread and
/// commits a transaction: at a thousand messages a second, writing every 5 ms cost 27 µs of
/// CPU per message per node. Under load `COMPANY` comes within `LINGER`, and writes stay
/// small: a 25-ms batch for 32 senders took the CPU long enough to raise their ack p99 from
/// 4.2–4.9 ms to 5.6–7.6 (`bench/compare`'s cases; readers never wait, `ready` ends the
/// linger).
const MAX_LINGER: Duration = Duration::from_millis(25);
/// Queued messages worth a write once `LINGER` has passed.
const COMPANY: usize = 64;
/// Queued messages that are written at once, linger or not.
const WRITE_AT: usize = 4096;
/// Queued messages beyond which applying waits for the writer (`backlog`).
const MAX_QUEUED: usize = 64 * 1024;

/// Messages that share one retention setting (a retention change takes effect at its own
/// entry on every node), as of entry time `now_ms`.
pub struct Run {
    pub messages: Vec<Arc<MessageEvent>>,
    pub retention: Retention,
    pub now_ms: i64,
}

/// How far the history has been written, or that a write failed (then it stays failed: the
/// history would have a hole, so nothing after it is written).
#[derive(Clone, Copy, Debug, Default)]
struct Written {
    upto: u64,
    failed: bool,
}

#[derive(Default)]
struct Queue {
    runs: Vec<Run>,
    messages: usize,
    /// The highest index the queued runs reach.
    upto: u64,
    /// Someone waits for the queued runs: write without lingering.
    urgent: bool,
    /// The thread sleeps with nothing queued; a new run must wake it.
    idle: bool,
    /// The thread waits past `LINGER` for `COMPANY` messages; the run that makes them up
    /// wakes it.
    wants_company: bool,
    /// The thread is writing runs it took from the queue.
    writing: bool,
    closed: bool,
}

struct Shared {
    history: Arc<History>,
    queue: Mutex<Queue>,
    wake: Condvar,
    written: tokio::sync::watch::Sender<Written>,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_written(&self, upto: u64) {
        self.written.send_if_modified(|w| {
            let raised = upto > w.upto;
            w.upto = w.upto.max(upto);
            raised
        });
    }
}

pub struct HistoryWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HistoryWriter {
    pub fn start(history: Arc<History>) -> std::io::Result<HistoryWriter> {
        let shared = Arc::new(Shared {
            history,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            written: tokio::sync::watch::Sender::new(Written::default()),
        });
        let thread = std::thread::Builder::new()
            .name("chat-history".into())
            .spawn({
                let shared = shared.clone();
                move || write_loop(&shared)
            })?;
        Ok(HistoryWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues an applied batch's runs, which reach up to index `upto`. True when the queue is
    /// so long that the caller should wait for it (`ready`) before applying more.
    pub fn push(&self, runs: Vec<Run>, upto: u64) -> bool {
        let added: usize = runs.iter().map(|r| r.messages.len()).sum();
        let mut q = self.shared.queue();
        let nothing_to_write = added == 0 && runs.iter().all(|r| r.retention.max_age_ms == 0);
        if nothing_to_write {
            q.upto = q.upto.max(upto);
            if q.runs.is_empty() && !q.writing {
                // Nothing before it is still on its way: written as soon as it is applied.
                self.shared.mark_written(upto);
            }
            return false;
        }
        q.runs.extend(runs);
        q.messages += added;
        q.upto = q.upto.max(upto);
        if q.idle
            || q.urgent
            || q.messages >= WRITE_AT
            || (q.wants_company && q.messages >= COMPANY)
        {
            q.idle = false;
            q.wants_company = false;
            self.shared.wake.notify_one();
        }
        q.messages >= MAX_QUEUED
    }

    /// Everything up to `upto` is written (after a snapshot install: the history holds it, or
    /// records it as a gap).
    pub fn mark_written(&self, upto: u64) {
        self.shared.mark_written(upto);
    }

    /// Whether a write failed; applying stops then.
    pub fn failed(&self) -> bool {
        self.shared.written.borrow().failed
    }

    /// Waits until the history holds every message up to `upto` that was queued, asking the
    /// writer not to linger.
    pub async fn ready(&self, upto: u64) -> Result<(), HistoryError> {
        let mut written = self.shared.written.subscribe();
        if written.borrow().upto < upto {
            // Also when nothing is queued yet: what `upto` names may be applied but not
            // queued yet, and is then written as soon as it comes.
            let mut q = self.shared.queue();
            if !q.urgent {
                q.urgent = true;
                if !q.runs.is_empty() {
                    self.shared.wake.notify_one();
                }
            }
        }
        let now = written
            .wait_for(|w| w.failed || w.upto >= upto)
            .await
            .map(|w| *w)
            .map_err(|_| HistoryError::WriteFailed)?;
        if now.failed {
            return Err(HistoryError::WriteFailed);
        }
        Ok(())
    }
}

impl Drop for HistoryWriter {
    /// Writes what is queued, then stops the thread.
    fn drop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(shared: &Shared) {
    let mut last_write: Option<Instant> = None;
    loop {
        let (runs, upto) = {
            let mut q = shared.queue();
            loop {
                if q.runs.is_empty() {
                    if q.closed {
                        return;
                    }
                    q.idle = true;
                    q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let since = last_write.map_or(MAX_LINGER, |t| t.elapsed());
                if q.urgent
                    || q.closed
                    || q.messages >= WRITE_AT
                    || (since >= LINGER && q.messages >= COMPANY)
                    || since >= MAX_LINGER
                {
                    break;
                }
                let wait = if since < LINGER {
                    LINGER - since
                } else {
                    q.wants_company = true;
                    MAX_LINGER - since
                };
                q = shared
                    .wake
                    .wait_timeout(q, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                q.wants_company = false;
            }
            q.urgent = false;
            q.messages = 0;
            q.writing = true;
            (std::mem::take(&mut q.runs), q.upto)
        };
        if shared.written.borrow().failed {
            // Queued after a failed write: dropped, the node is stopping.
            shared.queue().writing = false;
            continue;
        }
        let messages: Vec<Vec<&StoredMessage>> = runs
            .iter()
            .map(|r| r.messages.iter().map(|m| &m.message).collect())
            .collect();
        let history_runs: Vec<HistoryRun<'_>> = runs
            .iter()
            .zip(&messages)
            .map(|(run, messages)| HistoryRun {
                messages,
                retention: run.retention,
                now_ms: run.now_ms,
            })
            .collect();
        let result = shared.history.write_runs(&history_runs);
        last_write = Some(Instant::now());
        let mut q = shared.queue();
        q.writing = false;
        match result {
            // Batches without messages that came meanwhile are written too.
            Ok(()) if q.runs.is_empty() => shared.mark_written(q.upto),
            Ok(()) => shared.mark_written(upto),
            Err(e) => {
                tracing::error!(error = %e, "could not write the chat history; applying stops");
                shared.written.send_modify(|w| w.failed = true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(index: u64) -> Arc<MessageEvent> {
        MessageEvent::new(StoredMessage {
            index,
            to: "#r".into(),
            from: "a".into(),
            id: format!("m{index}"),
            text: "t".into(),
            ts_ms: 0,
            parties: Vec::new(),
        })
    }

    fn run(indexes: std::ops::RangeInclusive<u64>) -> Vec<Run> {
        vec![Run {
            messages: indexes.map(message).collect(),
            retention: Retention::default(),
            now_ms: 0,
        }]
    }

    #[tokio::test]
    async fn queued_batches_are_written_in_order_and_readers_do_not_wait_for_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(History::open(&dir.path().join("h.redb"), 1 << 20).unwrap());
        let writer = HistoryWriter::start(history.clone()).unwrap();
        for i in 0..50 {
            assert!(!writer.push(run(i * 4 + 1..=i * 4 + 4), i * 4 + 4));
        }
        let started = Instant::now();
        writer.ready(200).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let page = history.range(0, 1000, 1000, 1 << 20).unwrap();
        let indexes: Vec<u64> = page.messages.iter().map(|m| m.index).collect();
        assert_eq!(indexes, (1..=200).collect::<Vec<_>>());
        // Dropping the writer writes what is still queued.
        writer.push(run(201..=202), 202);
        drop(writer);
        assert_eq!(
            history
                .range(0, 1000, 1000, 1 << 20)
                .unwrap()
                .messages
                .len(),
            202
        );
    }

    /// Polls the history until it holds `n` messages, without asking the writer (`ready`
    /// would end its linger).
    async fn wait_for_written(history: &History, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let held = history
                .range(0, 1 << 20, 1000, 1 << 20)
                .unwrap()
                .messages
                .len();
            if held >= n {
                return;
            }
            assert!(Instant::now() < deadline, "{held} of {n} messages written");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_trickle_and_a_flood_are_both_written_without_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(History::open(&dir.path().join("h.redb"), 1 << 20).unwrap());
        let writer = HistoryWriter::start(history.clone()).unwrap();
        // The first write goes at once; the trickle after it waits for company, then alone.
        writer.push(run(1..=1), 1);
        wait_for_written(&history, 1).await;
        for i in 2..=4 {
            writer.push(run(i..=i), i);
        }
        wait_for_written(&history, 4).await;
        // A flood while the writer waits for company past `LINGER` wakes it.
        tokio::time::sleep(LINGER * 2).await;
        writer.push(run(5..=5), 5);
        tokio::time::sleep(LINGER * 2).await;
        let flood = 6..=(6 + COMPANY as u64);
        let upto = *flood.end();
        writer.push(run(flood), upto);
        wait_for_written(&history, upto as usize).await;
        assert!(writer.shared.written.borrow().upto >= upto);
    }

    #[tokio::test]
    async fn a_batch_without_messages_counts_as_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(History::open(&dir.path().join("h.redb"), 1 << 20).unwrap());
        let writer = HistoryWriter::start(history).unwrap();
        let empty = Run {
            messages: Vec::new(),
            retention: Retention::default(),
            now_ms: 0,
        };
        writer.push(vec![empty], 7);
        tokio::time::timeout(Duration::from_millis(100), writer.ready(7))
            .await
            .expect("no write needed")
            .unwrap();
    }
}
