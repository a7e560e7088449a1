//! The applied chat state of one node: the in-memory `ChatState`, the on-disk `History`, and
//! the fan-out of applied events to this node's connections, in index order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::broadcast;

use super::command::{ChatCommand, ChatResponse, Event, StoredMessage};
use super::history::{History, HistoryError};
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
    history: History,
    events: broadcast::Sender<Arc<Event>>,
    session_ttl_ms: i64,
}

/// A consistent starting point for a connection: events above `applied` arrive on `events`,
/// everything up to it can be read from the state and the history.
pub struct Subscription {
    pub applied: u64,
    pub events: broadcast::Receiver<Arc<Event>>,
}

impl ChatStore {
    pub fn new(history: History, queue_events: usize, session_ttl_ms: i64) -> ChatStore {
        let (events, _) = broadcast::channel(queue_events);
        ChatStore {
            state: RwLock::new(ChatState::default()),
            applied: AtomicU64::new(0),
            history,
            events,
            session_ttl_ms,
        }
    }

    /// Applies a batch of committed entries (blocking: writes the history).
    pub fn apply(
        &self,
        entries: &[AppliedEntry<'_>],
    ) -> Result<Vec<Option<ChatResponse>>, HistoryError> {
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());
        {
            let mut state = self.write_state();
            for e in entries {
                responses.push(e.command.map(|cmd| {
                    state.apply(e.index, e.ts_ms, cmd, self.session_ttl_ms, &mut events)
                }));
            }
        }
        let messages: Vec<&StoredMessage> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(&m.message),
                _ => None,
            })
            .collect();
        self.history.write(&messages)?;
        // Publishing under the state lock makes `subscribe` see either all or none of a batch.
        let _guard = self.write_state();
        if let Some(last) = entries.last() {
            self.applied.store(last.index, Ordering::Release);
        }
        for event in events {
            // No receivers is fine: nobody is connected to this node.
            let _ = self.events.send(Arc::new(event));
        }
        Ok(responses)
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

    /// Subscribes to events after the current applied index.
    pub fn subscribe(&self) -> Subscription {
        let _guard = self.state();
        Subscription {
            applied: self.applied(),
            events: self.events.subscribe(),
        }
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// A copy of the state and the index it reflects, for a snapshot.
    pub fn snapshot(&self) -> (ChatState, u64) {
        let state = self.state();
        (state.clone(), self.applied())
    }

    /// Replaces everything with a snapshot's content (blocking).
    pub fn install(
        &self,
        state: ChatState,
        applied: u64,
        messages: Option<&[StoredMessage]>,
    ) -> Result<(), HistoryError> {
        if let Some(messages) = messages {
            self.history.replace_all(messages)?;
        }
        let mut guard = self.write_state();
        *guard = state;
        self.applied.store(applied, Ordering::Release);
        let _ = self.events.send(Arc::new(Event::Resync { index: applied }));
        Ok(())
    }
}
