//! Committed messages on disk (redb), by log index and by room or user.
//!
//! A message's key is its log index and a message never changes, so writing the same message
//! twice (re-applying the log after a restart) is harmless. All calls block: callers run them
//! on a blocking thread.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::command::StoredMessage;
use super::names::{fold, is_room_target};

const MESSAGES: TableDefinition<u64, &str> = TableDefinition::new("messages");
/// (room key or `@user` key, index) → ().
const BY_TARGET: TableDefinition<(&str, u64), ()> = TableDefinition::new("by_target");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history store: {0}")]
    Store(#[from] redb::Error),
    #[error("{0}")]
    Open(String),
    #[error("history store: corrupt message at index {index}: {reason}")]
    Corrupt { index: u64, reason: String },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for HistoryError {
            fn from(e: $t) -> Self {
                HistoryError::Store(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

pub struct History {
    db: Database,
}

/// The keys a message is filed under: its room, or both ends of a direct message.
fn target_keys(msg: &StoredMessage) -> Vec<String> {
    if is_room_target(&msg.to) {
        vec![fold(&msg.to)]
    } else {
        let mut keys = vec![user_key(&msg.from), user_key(&msg.to)];
        keys.dedup();
        keys
    }
}

/// The key under which a user's direct messages are filed.
pub fn user_key(user: &str) -> String {
    format!("@{}", fold(user))
}

impl History {
    pub fn open(path: &Path) -> Result<History, HistoryError> {
        let db = crate::disk::open_database(path).map_err(HistoryError::Open)?;
        let txn = db.begin_write()?;
        txn.open_table(MESSAGES)?;
        txn.open_table(BY_TARGET)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(History { db })
    }

    /// Stores messages. Not durable by itself: `flush` makes every earlier write durable, and
    /// the log keeps the entries until a snapshot (which flushes first) covers them.
    pub fn write(&self, messages: &[&StoredMessage]) -> Result<(), HistoryError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut by_index = txn.open_table(MESSAGES)?;
            let mut by_target = txn.open_table(BY_TARGET)?;
            for msg in messages {
                let json = serde_json::to_string(msg).map_err(|e| HistoryError::Corrupt {
                    index: msg.index,
                    reason: e.to_string(),
                })?;
                by_index.insert(msg.index, json.as_str())?;
                for key in target_keys(msg) {
                    by_target.insert((key.as_str(), msg.index), ())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Makes every earlier write durable (one fsync).
    pub fn flush(&self) -> Result<(), HistoryError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let n = meta.get("flushes")?.map(|v| v.value()).unwrap_or(0);
            meta.insert("flushes", n + 1)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Replaces everything with `messages` (installing a snapshot), durably.
    pub fn replace_all(&self, messages: &[StoredMessage]) -> Result<(), HistoryError> {
        let txn = self.db.begin_write()?;
        txn.delete_table(MESSAGES)?;
        txn.delete_table(BY_TARGET)?;
        {
            let mut by_index = txn.open_table(MESSAGES)?;
            let mut by_target = txn.open_table(BY_TARGET)?;
            for msg in messages {
                let json = serde_json::to_string(msg).map_err(|e| HistoryError::Corrupt {
                    index: msg.index,
                    reason: e.to_string(),
                })?;
                by_index.insert(msg.index, json.as_str())?;
                for key in target_keys(msg) {
                    by_target.insert((key.as_str(), msg.index), ())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every message with index ≤ `upto`, ascending (for snapshots).
    pub fn all_upto(&self, upto: u64) -> Result<Vec<StoredMessage>, HistoryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MESSAGES)?;
        let mut out = Vec::new();
        for row in table.range(..=upto)? {
            let (k, v) = row?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Messages filed under `key` (a folded room, or `user_key`), ascending, never above
    /// `upto`: with `after` the earliest `limit` above it, otherwise the latest `limit`
    /// below `before` (or below `upto`).
    pub fn page(
        &self,
        key: &str,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
        upto: u64,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let txn = self.db.begin_read()?;
        let by_target = txn.open_table(BY_TARGET)?;
        let messages = txn.open_table(MESSAGES)?;
        let high = before.map_or(upto, |b| b.saturating_sub(1).min(upto));
        let low = after.map_or(0, |a| a.saturating_add(1));
        if low > high {
            return Ok(Vec::new());
        }
        let range = by_target.range((key, low)..=(key, high))?;
        let mut indexes = Vec::new();
        if after.is_some() {
            for row in range.take(limit) {
                indexes.push(row?.0.value().1);
            }
        } else {
            for row in range.rev().take(limit) {
                indexes.push(row?.0.value().1);
            }
            indexes.reverse();
        }
        indexes
            .into_iter()
            .filter_map(|i| match messages.get(i) {
                Ok(Some(v)) => Some(decode(i, v.value())),
                Ok(None) => None,
                Err(e) => Some(Err(e.into())),
            })
            .collect()
    }

    /// What a resuming session missed: messages under any of `keys` with index in
    /// (`after`, `upto`], ascending, at most `limit`.
    pub fn missed(
        &self,
        keys: &[String],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let mut all = Vec::new();
        for key in keys {
            all.extend(self.page(key, Some(after), None, limit, upto)?);
        }
        all.sort_by_key(|m| m.index);
        all.dedup_by_key(|m| m.index);
        all.truncate(limit);
        Ok(all)
    }
}

fn decode(index: u64, json: &str) -> Result<StoredMessage, HistoryError> {
    serde_json::from_str(json).map_err(|e| HistoryError::Corrupt {
        index,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(index: u64, to: &str) -> StoredMessage {
        StoredMessage {
            index,
            to: to.into(),
            from: "alice".into(),
            id: index.to_string(),
            text: "t".into(),
            ts_ms: 0,
        }
    }

    #[test]
    fn pages_and_missed() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(&dir.path().join("h.redb")).unwrap();
        let batch: Vec<_> = (1..=10)
            .map(|i| msg(i, if i % 2 == 0 { "#Even" } else { "bob" }))
            .collect();
        h.write(&batch.iter().collect::<Vec<_>>()).unwrap();
        let idx = |v: Vec<StoredMessage>| v.into_iter().map(|m| m.index).collect::<Vec<_>>();
        assert_eq!(
            idx(h.page("#even", None, None, 2, 100).unwrap()),
            vec![8, 10]
        );
        assert_eq!(
            idx(h.page("#even", Some(2), None, 2, 100).unwrap()),
            vec![4, 6]
        );
        assert_eq!(
            idx(h.page("#even", None, Some(8), 10, 100).unwrap()),
            vec![2, 4, 6]
        );
        assert_eq!(
            idx(h.page("#even", None, None, 10, 6).unwrap()),
            vec![2, 4, 6]
        );
        assert_eq!(
            idx(h.page(&user_key("BOB"), Some(5), None, 10, 100).unwrap()),
            vec![7, 9]
        );
        let keys = vec!["#even".to_string(), user_key("alice")];
        assert_eq!(idx(h.missed(&keys, 6, 9, 100).unwrap()), vec![7, 8, 9]);
        assert_eq!(h.all_upto(3).unwrap().len(), 3);
    }
}
