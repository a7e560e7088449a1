//! The applied chat state of one node: the in-memory `ChatState`, the on-disk `History`, and
//! the fan-out of applied events to this node's connections, in index order.
//!
//! Applying a batch changes the state and publishes its events at once; the batch's messages
//! reach the history afterwards (`chat::history_writer`, a thread of its own), so the writers'
//! acknowledgements do not wait for the history's B-tree commit. Whoever reads the history
//! first waits until it holds what it asks for (`history_ready`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::command::{ChatCommand, ChatResponse, Event};
use super::fanout::{Fanout, Receiver, Subscriber};
use super::history::{Gap, History, HistoryError, RangePage};
use super::history_writer::{HistoryWriter, Run};
use super::state::ChatState;

/// One log entry as the chat layer sees it: blank and membership entries carry no command.
pub struct AppliedEntry<'a> {
    pub index: u64,
    pub ts_ms: i64,
    pub command: Option<&'a ChatCommand>,
}

pub struct ChatStore {
    state: RwLock<ChatState>,
    /// Highest index whose effects are in `state`, in `history` and published.
    applied: AtomicU64,
    history: Arc<History>,
    /// The history range skipped by installing a snapshot, not yet copied from a peer.
    gap: std::sync::Mutex<Option<Gap>>,
    /// Wakes the history copier (`chat::backfill`) when a gap opens.
    pub gap_opened: tokio::sync::Notify,
    fanout: Arc<Fanout>,
    /// Moves applied messages into `history`.
    writer: HistoryWriter,
}

/// What applying a batch answered its writers, and whether the history writer is far behind.
pub struct Applied {
    pub responses: Vec<Option<ChatResponse>>,
    pub backlog: bool,
}

/// A consistent starting point for a connection: events above `applied` that concern it
/// arrive on `events`, everything up to it can be read from the state and the history.
pub struct Subscription {
    pub applied: u64,
    /// The session's rooms at `applied` (folded names).
    pub rooms: Vec<String>,
    pub events: Receiver,
}

impl ChatStore {
    pub fn new(history: History, queue_events: usize) -> Result<ChatStore, HistoryError> {
        let gap = history.gap()?;
        let history = Arc::new(history);
        let writer = HistoryWriter::start(history.clone())
            .map_err(|e| HistoryError::Open(format!("cannot start the history writer: {e}")))?;
        Ok(ChatStore {
            state: RwLock::new(ChatState::default()),
            applied: AtomicU64::new(0),
            history,
            gap: std::sync::Mutex::new(gap),
            gap_opened: tokio::sync::Notify::new(),
            fanout: Fanout::new(queue_events),
            writer,
        })
    }

    /// Applies a batch of committed entries to the state, publishes its events and queues its
    /// messages for the history. Fails once a history write has failed. `backlog` says the
    /// history writer is far behind: wait for `history_ready(applied)` before applying more.
    pub fn apply(&self, entries: &[AppliedEntry<'_>]) -> Result<Applied, HistoryError> {
        if self.writer.failed() {
            return Err(HistoryError::WriteFailed);
        }
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());
        let mut runs = Vec::new();
        let mut run_start = 0;
        for e in entries {
            if matches!(e.command, Some(ChatCommand::Configure { .. })) {
                runs.push(self.history_run(&events[run_start..]));
                run_start = events.len();
            }
            let response = {
                let mut state = self.write_state();
                e.command
                    .map(|cmd| state.apply(e.index, e.ts_ms, cmd, &mut events))
            };
            if let (Some(cmd), Some(r)) = (e.command, &response) {
                trace_outcome(e.index, cmd, r);
            }
            responses.push(response);
        }
        runs.push(self.history_run(&events[run_start..]));
        let upto = entries.last().map_or(0, |e| e.index);
        // Publishing under the state lock makes `subscribe` see either all or none of a batch.
        let _guard = self.write_state();
        if !entries.is_empty() {
            self.applied.store(upto, Ordering::Release);
        }
        self.fanout.publish(events);
        drop(_guard);
        let backlog = self.writer.push(runs, upto);
        Ok(Applied { responses, backlog })
    }

    /// The messages among `events`, with the retention in force now.
    fn history_run(&self, events: &[Event]) -> Run {
        let messages = events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        let state = self.state();
        Run {
            messages,
            retention: state.settings().retention,
            now_ms: state.last_ts_ms(),
        }
    }

    /// Waits until the history holds every message up to `upto` that this node applied.
    pub async fn history_ready(&self, upto: u64) -> Result<(), HistoryError> {
        self.writer.ready(upto).await
    }

    /// Stores a page of history copied from a peer; returns what is still missing.
    pub fn fill_gap(&self, page: &RangePage) -> Result<Option<Gap>, HistoryError> {
        let (settings, now) = {
            let state = self.state();
            (state.settings(), state.last_ts_ms())
        };
        let gap = self.history.fill_gap(page, settings.retention, now)?;
        *self.gap.lock().unwrap_or_else(|p| p.into_inner()) = gap;
        Ok(gap)
    }

    /// The history range this node still lacks, if any.
    pub fn gap(&self) -> Option<Gap> {
        *self.gap.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn state(&self) -> RwLockReadGuard<'_, ChatState> {
        // A poisoned lock means a panic while applying; the state itself is still whole
        // because apply mutates only through `ChatState::apply`, which does not panic midway.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, ChatState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `who` to the events after the current applied index that concern it.
    pub fn subscribe(&self, who: Subscriber<'_>) -> Subscription {
        let state = self.state();
        let rooms = state
            .session(who.session)
            .map(|s| s.rooms.iter().cloned().collect())
            .unwrap_or_default();
        Subscription {
            applied: self.applied(),
            rooms,
            events: self.fanout.subscribe(who, &state),
        }
    }

    /// Connections events are routed to.
    pub fn subscribers(&self) -> usize {
        self.fanout.subscribers()
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Replaces the state with a snapshot's (blocking). With `from_peer` the snapshot came
    /// from the leader and this node skipped the entries between what it had applied and the
    /// snapshot: that history range is recorded as a gap, durably, before the state moves on.
    pub fn install(
        &self,
        state: ChatState,
        applied: u64,
        from_peer: bool,
    ) -> Result<(), HistoryError> {
        let before = self.applied();
        if from_peer && before < applied {
            let gap = self.history.open_gap(before, applied)?;
            *self.gap.lock().unwrap_or_else(|p| p.into_inner()) = gap;
            self.gap_opened.notify_one();
        }
        let mut guard = self.write_state();
        *guard = state;
        self.applied.store(applied, Ordering::Release);
        self.fanout.resync(&guard, applied);
        // Everything up to a snapshot is in the history, or in the gap just recorded.
        self.writer.mark_written(applied);
        Ok(())
    }
}

/// What applying decided for a refused or resumed entry, at debug level: when nodes disagree,
/// their logs say at which entry (tokens are secrets and are not logged).
fn trace_outcome(index: u64, command: &ChatCommand, response: &ChatResponse) {
    match (command, response) {
        (
            ChatCommand::Send { id, to, .. },
            ChatResponse::Sent {
                duplicate: false, ..
            },
        ) => {
            tracing::trace!(index, id, to, "applied: sent");
        }
        (ChatCommand::Send { id, to, .. }, r) => {
            tracing::debug!(index, id, to, outcome = ?r, "applied: send not stored");
        }
        (
            ChatCommand::Attach {
                user, node, resume, ..
            },
            r,
        ) => {
            tracing::debug!(index, user, node, resuming = resume.is_some(), outcome = %outcome_kind(r), "applied: attach");
        }
        (ChatCommand::Join { room, .. }, r) => {
            tracing::debug!(index, room, outcome = %outcome_kind(r), "applied: join");
        }
        (ChatCommand::Leave { room, .. }, r) => {
            tracing::debug!(index, room, outcome = %outcome_kind(r), "applied: leave");
        }
        _ => {}
    }
}

fn outcome_kind(response: &ChatResponse) -> &'static str {
    match response {
        ChatResponse::Attached { resumed: true, .. } => "resumed",
        ChatResponse::Attached { resumed: false, .. } => "new session",
        ChatResponse::NameTaken => "name taken",
        ChatResponse::AuthRequired => "auth required",
        ChatResponse::SessionMismatch => "session mismatch",
        ChatResponse::UnknownSession => "unknown session",
        ChatResponse::Joined { .. } => "joined",
        ChatResponse::Left { .. } => "left",
        ChatResponse::Sent { .. } => "sent",
        ChatResponse::NotMember { .. } => "not a member",
        ChatResponse::NoSuchUser { .. } => "no such user",
        ChatResponse::Done => "done",
    }
}
