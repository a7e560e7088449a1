//! Committed messages on disk (redb), by log index and by room or user.
//!
//! The history is never part of a Raft snapshot: every node writes it as it applies the log,
//! and a node that installs a snapshot copies the range it skipped from a peer in bounded
//! pages (see `chat::backfill`). Until that copy is complete the node records the *gap* here,
//! durably, and does not serve reads.
//!
//! Retention (`keep newest N per room`, `drop older than age`) is applied while writing, with
//! settings and a clock that come from the log (`chat::state::Settings`, entry timestamps), so
//! every node drops the same messages. Both rules only ever remove a prefix (of a room, or of
//! the whole history), so a node that copied a peer's already pruned pages and then prunes
//! again ends with the same messages. `pruned` remembers, per room or user, the highest index
//! removed, so a request for older messages can say it was truncated.
//!
//! A message's key is its log index and a message never changes, so writing the same message
//! twice (re-applying the log after a restart) is harmless. All calls block: callers run them
//! on a blocking thread. Every read returns at most one bounded page.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::command::StoredMessage;
use super::names::{fold, is_room_target};

const MESSAGES: TableDefinition<u64, &str> = TableDefinition::new("messages");
/// (room key or `@user` key, index) → ().
const BY_TARGET: TableDefinition<(&str, u64), ()> = TableDefinition::new("by_target");
/// Room or user key → messages kept under it.
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
/// Room or user key → highest index removed by retention.
const PRUNED: TableDefinition<&str, u64> = TableDefinition::new("pruned");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Bytes written without an fsync before a write is made durable anyway, so redb never holds
/// an unbounded amount of uncommitted pages between snapshots.
const DURABLE_EVERY_BYTES: u64 = 16 * 1024 * 1024;
/// Most messages one page of any read holds.
pub const MAX_PAGE: usize = 1000;
/// Most bytes of stored messages one `history` answer carries (at least one message): a page
/// of large messages is cut short, and the client pages on from the last index it got.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history store: {0}")]
    Store(#[from] redb::Error),
    #[error("{0}")]
    Open(String),
    #[error("history store: corrupt message at index {index}: {reason}")]
    Corrupt { index: u64, reason: String },
    #[error("history store: an earlier write failed; this node stops applying")]
    WriteFailed,
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

/// What the history keeps; both limits come from the replicated settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Newest messages kept per room (0: all).
    pub max_per_room: u64,
    /// Messages older than this, by entry time, are dropped (0: never).
    pub max_age_ms: i64,
}

/// A page of one room's or user's messages.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<StoredMessage>,
    /// The request reached below what retention kept.
    pub truncated: bool,
    /// The oldest index still kept under the key (when truncated).
    pub oldest_index: Option<u64>,
}

/// A range of the whole history, for a peer that is filling its gap.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RangePage {
    pub messages: Vec<StoredMessage>,
    /// Everything up to this index is covered by this page and earlier ones.
    pub covered_upto: u64,
    /// The sender's retention watermarks (sent with the last page).
    #[serde(default)]
    pub pruned: Vec<(String, u64)>,
}

/// The range (`after`, `upto`] of the history this node skipped by installing a snapshot and
/// has not copied from a peer yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub after: u64,
    pub upto: u64,
}

pub struct History {
    db: Database,
    unsynced_bytes: std::sync::atomic::AtomicU64,
}

/// Messages written under one retention setting, as of entry time `now_ms`.
pub struct HistoryRun<'a> {
    pub messages: &'a [&'a StoredMessage],
    pub retention: Retention,
    pub now_ms: i64,
}

/// The keys a message is filed under: its room, or the sessions of a direct message (by
/// name for direct messages stored before sessions had ids; no session replays those).
fn target_keys(msg: &StoredMessage) -> Vec<String> {
    if is_room_target(&msg.to) {
        vec![fold(&msg.to)]
    } else if !msg.parties.is_empty() {
        msg.parties.iter().map(|id| party_key(*id)).collect()
    } else {
        let mut keys = vec![user_key(&msg.from), user_key(&msg.to)];
        keys.dedup();
        keys
    }
}

/// The key under which the direct messages a session may see are filed.
pub fn party_key(session_id: u64) -> String {
    format!("~{session_id}")
}

/// The key under which direct messages were filed before sessions had ids.
pub fn user_key(user: &str) -> String {
    format!("@{}", fold(user))
}

struct Tables<'t> {
    messages: Table<'t, u64, &'static str>,
    by_target: Table<'t, (&'static str, u64), ()>,
    counts: Table<'t, &'static str, u64>,
    pruned: Table<'t, &'static str, u64>,
    /// Count changes not yet written: a batch of a room's messages updates its count once
    /// (`finish`), not once per message.
    count_deltas: HashMap<String, i64>,
    /// Pruning watermarks read (or raised) in this transaction.
    pruned_seen: HashMap<String, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, HistoryError> {
        Ok(Tables {
            messages: txn.open_table(MESSAGES)?,
            by_target: txn.open_table(BY_TARGET)?,
            counts: txn.open_table(COUNTS)?,
            pruned: txn.open_table(PRUNED)?,
            count_deltas: HashMap::new(),
            pruned_seen: HashMap::new(),
        })
    }

    /// Writes the counts changed in this transaction; call before it commits.
    fn finish(mut self) -> Result<(), HistoryError> {
        for (key, delta) in std::mem::take(&mut self.count_deltas) {
            if delta == 0 {
                continue;
            }
            let now = self
                .counts
                .get(key.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            let next = now.saturating_add_signed(delta);
            if next == 0 {
                self.counts.remove(key.as_str())?;
            } else {
                self.counts.insert(key.as_str(), next)?;
            }
        }
        Ok(())
    }

    fn add_count(&mut self, key: &str, delta: i64) {
        match self.count_deltas.get_mut(key) {
            Some(d) => *d += delta,
            None => {
                self.count_deltas.insert(key.to_string(), delta);
            }
        }
    }

    fn count(&self, key: &str) -> Result<u64, HistoryError> {
        let stored = self.counts.get(key)?.map(|v| v.value()).unwrap_or(0);
        Ok(stored.saturating_add_signed(self.count_deltas.get(key).copied().unwrap_or(0)))
    }

    fn pruned_upto(&mut self, key: &str) -> Result<u64, HistoryError> {
        if let Some(upto) = self.pruned_seen.get(key) {
            return Ok(*upto);
        }
        let upto = self.pruned.get(key)?.map(|v| v.value()).unwrap_or(0);
        self.pruned_seen.insert(key.to_string(), upto);
        Ok(upto)
    }

    fn raise_pruned(&mut self, key: &str, index: u64) -> Result<(), HistoryError> {
        if index > self.pruned_upto(key)? {
            self.pruned.insert(key, index)?;
            self.pruned_seen.insert(key.to_string(), index);
        }
        Ok(())
    }

    /// Stores one message; returns the bytes it took (0 when it was already there or pruned).
    fn insert(&mut self, msg: &StoredMessage) -> Result<u64, HistoryError> {
        let json = serde_json::to_string(msg).map_err(|e| HistoryError::Corrupt {
            index: msg.index,
            reason: e.to_string(),
        })?;
        let keys = target_keys(msg);
        // A message that retention already removed must not come back through a re-apply.
        for key in &keys {
            if self.pruned_upto(key)? >= msg.index {
                return Ok(0);
            }
        }
        if self.messages.insert(msg.index, json.as_str())?.is_some() {
            return Ok(0);
        }
        for key in &keys {
            self.by_target.insert((key.as_str(), msg.index), ())?;
            self.add_count(key, 1);
        }
        Ok(json.len() as u64)
    }

    /// Removes one stored message and files it as pruned under each of its keys.
    fn remove(&mut self, index: u64) -> Result<(), HistoryError> {
        let Some(json) = self.messages.remove(index)?.map(|v| v.value().to_string()) else {
            return Ok(());
        };
        let msg = decode(index, &json)?;
        for key in target_keys(&msg) {
            if self.by_target.remove((key.as_str(), index))?.is_some() {
                self.add_count(&key, -1);
            }
            self.raise_pruned(&key, index)?;
        }
        Ok(())
    }

    /// Keeps the newest `max` messages of `room`.
    fn trim_room(&mut self, room: &str, max: u64) -> Result<(), HistoryError> {
        if max == 0 {
            return Ok(());
        }
        let count = self.count(room)?;
        if count <= max {
            return Ok(());
        }
        let excess = (count - max) as usize;
        let doomed: Vec<u64> = self
            .by_target
            .range((room, 0)..=(room, u64::MAX))?
            .take(excess)
            .map(|row| row.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for index in doomed {
            self.remove(index)?;
        }
        Ok(())
    }

    /// Drops every message whose entry time is before `cutoff_ms`. Entry time never goes
    /// backwards along the log, so these are a prefix of the history.
    fn drop_before(&mut self, cutoff_ms: i64) -> Result<(), HistoryError> {
        loop {
            let first = self
                .messages
                .first()?
                .map(|(k, v)| (k.value(), v.value().to_string()));
            let Some((index, json)) = first else {
                return Ok(());
            };
            if decode(index, &json)?.ts_ms >= cutoff_ms {
                return Ok(());
            }
            self.remove(index)?;
        }
    }

    fn retain(
        &mut self,
        rooms: &BTreeSet<String>,
        retention: Retention,
        now_ms: i64,
    ) -> Result<(), HistoryError> {
        for room in rooms {
            self.trim_room(room, retention.max_per_room)?;
        }
        if retention.max_age_ms > 0 {
            self.drop_before(now_ms.saturating_sub(retention.max_age_ms))?;
        }
        Ok(())
    }
}

/// Durable commits of the history also save redb's allocator state: after a crash redb then
/// reopens at once instead of walking the whole file (a full repair is O(history)).
fn quick_repair(txn: &mut WriteTransaction) {
    txn.set_quick_repair(true);
}

fn read_gap(txn: &ReadTransaction) -> Result<Option<Gap>, HistoryError> {
    let meta = txn.open_table(META)?;
    let after = meta.get("gap_after")?.map(|v| v.value());
    let upto = meta.get("gap_upto")?.map(|v| v.value());
    Ok(match (after, upto) {
        (Some(after), Some(upto)) if after < upto => Some(Gap { after, upto }),
        _ => None,
    })
}

impl History {
    /// Opens (or creates) the history at `path`; `cache_bytes` bounds redb's page cache.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<History, HistoryError> {
        let db = crate::disk::open_database(path, cache_bytes).map_err(HistoryError::Open)?;
        let mut txn = db.begin_write()?;
        quick_repair(&mut txn);
        let counted = txn
            .open_table(META)?
            .get("counts_v1")?
            .is_some_and(|v| v.value() == 1);
        {
            let mut t = Tables::open(&txn)?;
            txn.open_table(META)?;
            if !counted {
                // Stores written before per-key counts existed: count once, page by page.
                let mut counts: BTreeMap<String, u64> = BTreeMap::new();
                for row in t.by_target.iter()? {
                    let (k, _) = row?;
                    *counts.entry(k.value().0.to_string()).or_default() += 1;
                }
                for (key, n) in counts {
                    t.counts.insert(key.as_str(), n)?;
                }
            }
            t.finish()?;
        }
        txn.open_table(META)?.insert("counts_v1", 1)?;
        txn.commit()?;
        Ok(History {
            db,
            unsynced_bytes: Default::default(),
        })
    }

    /// One run of `write_runs` (tests write this way).
    #[cfg(test)]
    pub fn write(
        &self,
        messages: &[&StoredMessage],
        retention: Retention,
        now_ms: i64,
    ) -> Result<(), HistoryError> {
        self.write_runs(&[HistoryRun {
            messages,
            retention,
            now_ms,
        }])
    }

    /// Stores messages, run after run in one transaction, applying each run's `retention` as
    /// of its entry time. Not durable by itself (an fsync every `DURABLE_EVERY_BYTES`): `flush`
    /// makes every earlier write durable, and the log keeps the entries until a snapshot (which
    /// flushes first) covers them.
    pub fn write_runs(&self, runs: &[HistoryRun<'_>]) -> Result<(), HistoryError> {
        if runs
            .iter()
            .all(|r| r.messages.is_empty() && r.retention.max_age_ms == 0)
        {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        let mut written = 0;
        {
            let mut t = Tables::open(&txn)?;
            for run in runs {
                let mut rooms = BTreeSet::new();
                for msg in run.messages {
                    written += t.insert(msg)?;
                    if is_room_target(&msg.to) {
                        rooms.insert(fold(&msg.to));
                    }
                }
                t.retain(&rooms, run.retention, run.now_ms)?;
            }
            t.finish()?;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let total = self.unsynced_bytes.fetch_add(written, Relaxed) + written;
        if total >= DURABLE_EVERY_BYTES {
            self.unsynced_bytes.store(0, Relaxed);
            quick_repair(&mut txn);
        } else {
            txn.set_durability(Durability::None)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Makes every earlier write durable (one fsync).
    pub fn flush(&self) -> Result<(), HistoryError> {
        let mut txn = self.db.begin_write()?;
        quick_repair(&mut txn);
        {
            let mut meta = txn.open_table(META)?;
            let n = meta.get("flushes")?.map(|v| v.value()).unwrap_or(0);
            meta.insert("flushes", n + 1)?;
        }
        txn.commit()?;
        self.unsynced_bytes
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The range this node still has to copy from a peer, if any.
    pub fn gap(&self) -> Result<Option<Gap>, HistoryError> {
        read_gap(&self.db.begin_read()?)
    }

    /// Records, durably, that (`after`, `upto`] was skipped; merges with an open gap.
    pub fn open_gap(&self, after: u64, upto: u64) -> Result<Option<Gap>, HistoryError> {
        let mut txn = self.db.begin_write()?;
        quick_repair(&mut txn);
        let gap = {
            let mut meta = txn.open_table(META)?;
            let old_after = meta.get("gap_after")?.map(|v| v.value());
            let old_upto = meta.get("gap_upto")?.map(|v| v.value());
            let (after, upto) = match (old_after, old_upto) {
                (Some(a), Some(u)) if a < u => (a.min(after), u.max(upto)),
                _ => (after, upto),
            };
            meta.insert("gap_after", after)?;
            meta.insert("gap_upto", upto)?;
            (after < upto).then_some(Gap { after, upto })
        };
        txn.commit()?;
        Ok(gap)
    }

    /// Stores a page copied from a peer, moves the gap's start to `page.covered_upto`, and
    /// applies `retention` (durably, in one transaction).
    pub fn fill_gap(
        &self,
        page: &RangePage,
        retention: Retention,
        now_ms: i64,
    ) -> Result<Option<Gap>, HistoryError> {
        let mut txn = self.db.begin_write()?;
        quick_repair(&mut txn);
        {
            let mut t = Tables::open(&txn)?;
            let mut rooms = BTreeSet::new();
            for msg in &page.messages {
                t.insert(msg)?;
                if is_room_target(&msg.to) {
                    rooms.insert(fold(&msg.to));
                }
            }
            for (key, upto) in &page.pruned {
                t.raise_pruned(key, *upto)?;
            }
            t.retain(&rooms, retention, now_ms)?;
            t.finish()?;
            let mut meta = txn.open_table(META)?;
            let after = meta.get("gap_after")?.map(|v| v.value()).unwrap_or(0);
            meta.insert("gap_after", after.max(page.covered_upto))?;
        }
        txn.commit()?;
        self.gap()
    }

    /// For a peer filling its gap: messages in (`after`, `upto`], ascending, at most
    /// `max_messages` or about `max_bytes`. With the last page come the retention watermarks.
    pub fn range(
        &self,
        after: u64,
        upto: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<RangePage, HistoryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MESSAGES)?;
        let mut page = RangePage {
            covered_upto: upto,
            ..RangePage::default()
        };
        if after >= upto {
            return Ok(page);
        }
        let mut bytes = 0;
        for row in table.range(after + 1..=upto)? {
            let (k, v) = row?;
            if page.messages.len() >= max_messages || bytes >= max_bytes {
                // Covered up to just below the first message not sent.
                page.covered_upto = k.value() - 1;
                return Ok(page);
            }
            bytes += v.value().len();
            page.messages.push(decode(k.value(), v.value())?);
        }
        let pruned = txn.open_table(PRUNED)?;
        for row in pruned.iter()? {
            let (k, v) = row?;
            page.pruned.push((k.value().to_string(), v.value()));
        }
        Ok(page)
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
    ) -> Result<Page, HistoryError> {
        let limit = limit.min(MAX_PAGE);
        let txn = self.db.begin_read()?;
        let by_target = txn.open_table(BY_TARGET)?;
        let messages = txn.open_table(MESSAGES)?;
        let pruned = txn.open_table(PRUNED)?.get(key)?.map_or(0, |v| v.value());
        let oldest = by_target
            .range((key, 0)..=(key, u64::MAX))?
            .next()
            .transpose()?
            .map(|(k, _)| k.value().1);
        let high = before.map_or(upto, |b| b.saturating_sub(1).min(upto));
        let low = after.map_or(0, |a| a.saturating_add(1));
        let mut page = Page::default();
        // Whether the byte budget, not the range or `limit`, ended the page.
        let mut capped = false;
        if low <= high {
            let range = by_target.range((key, low)..=(key, high))?;
            let rows: Box<dyn Iterator<Item = _>> = if after.is_some() {
                Box::new(range)
            } else {
                Box::new(range.rev())
            };
            let mut bytes = 0;
            for row in rows {
                if page.messages.len() == limit {
                    break;
                }
                let i = row?.0.value().1;
                let Some(v) = messages.get(i)? else { continue };
                let stored = v.value();
                if !page.messages.is_empty() && bytes + stored.len() > MAX_PAGE_BYTES {
                    capped = true;
                    break;
                }
                bytes += stored.len();
                page.messages.push(decode(i, stored)?);
            }
            if after.is_none() {
                page.messages.reverse();
            }
        }
        // Older messages were asked for (explicitly, or by a page that reached the oldest
        // kept one) and retention had removed some of them.
        let reached_oldest = (!capped && page.messages.len() < limit)
            || page.messages.first().map(|m| m.index) == oldest;
        page.truncated = pruned > 0
            && match after {
                Some(a) => a < pruned,
                None => reached_oldest && low <= pruned,
            };
        if page.truncated {
            page.oldest_index = Some(oldest.unwrap_or(pruned + 1));
        }
        Ok(page)
    }

    /// One page of what a resuming session missed: messages under any of `keys` with index
    /// in (`after`, `upto`], ascending, at most `limit`. Call again with the last index.
    pub fn missed(
        &self,
        keys: &[String],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let mut all = Vec::new();
        for key in keys {
            all.extend(self.page(key, Some(after), None, limit, upto)?.messages);
        }
        all.sort_by_key(|m| m.index);
        all.dedup_by_key(|m| m.index);
        all.truncate(limit);
        Ok(all)
    }

    /// How many messages `missed` would return in total, without reading them.
    pub fn count_missed(
        &self,
        keys: &[String],
        after: u64,
        upto: u64,
    ) -> Result<u64, HistoryError> {
        if after >= upto {
            return Ok(0);
        }
        let txn = self.db.begin_read()?;
        let by_target = txn.open_table(BY_TARGET)?;
        let mut seen = 0u64;
        let mut dm = BTreeSet::new();
        for key in keys {
            for row in by_target.range((key.as_str(), after + 1)..=(key.as_str(), upto))? {
                let index = row?.0.value().1;
                // A direct message between two of the keys counts once.
                if key.starts_with('@') {
                    dm.insert(index);
                } else {
                    seen += 1;
                }
            }
        }
        Ok(seen + dm.len() as u64)
    }

    /// The highest index retention removed under any of `keys` (0: none).
    pub fn pruned_upto(&self, keys: &[String]) -> Result<u64, HistoryError> {
        let txn = self.db.begin_read()?;
        let pruned = txn.open_table(PRUNED)?;
        let mut high = 0;
        for key in keys {
            high = high.max(pruned.get(key.as_str())?.map_or(0, |v| v.value()));
        }
        Ok(high)
    }

    /// The lowest index still kept under any of `keys`.
    pub fn oldest_kept(&self, keys: &[String]) -> Result<Option<u64>, HistoryError> {
        let txn = self.db.begin_read()?;
        let by_target = txn.open_table(BY_TARGET)?;
        let mut low: Option<u64> = None;
        for key in keys {
            if let Some(row) = by_target
                .range((key.as_str(), 0)..=(key.as_str(), u64::MAX))?
                .next()
            {
                let index = row?.0.value().1;
                low = Some(low.map_or(index, |l| l.min(index)));
            }
        }
        Ok(low)
    }
}

/// A fingerprint of the history in (`after`, `upto`], to compare nodes without moving messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    #[serde(default)]
    pub after: u64,
    pub upto: u64,
    pub count: u64,
    /// FNV-1a over every kept message's index and stored form, in index order.
    pub fnv: u64,
}

impl History {
    /// Reads every message in (`after`, `upto`] once (O(range) time, one page of memory).
    pub fn digest(&self, after: u64, upto: u64) -> Result<Digest, HistoryError> {
        const PRIME: u64 = 0x0100_0000_01b3;
        let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                fnv ^= u64::from(*b);
                fnv = fnv.wrapping_mul(PRIME);
            }
        };
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MESSAGES)?;
        let mut count = 0;
        if after >= upto {
            return Ok(Digest {
                after,
                upto,
                count,
                fnv,
            });
        }
        for row in table.range(after + 1..=upto)? {
            let (k, v) = row?;
            feed(&k.value().to_le_bytes());
            feed(v.value().as_bytes());
            count += 1;
        }
        Ok(Digest {
            after,
            upto,
            count,
            fnv,
        })
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
            ts_ms: index as i64 * 1000,
            parties: Vec::new(),
        }
    }

    fn open(dir: &tempfile::TempDir) -> History {
        History::open(&dir.path().join("h.redb"), 1 << 20).unwrap()
    }

    fn idx(v: Vec<StoredMessage>) -> Vec<u64> {
        v.into_iter().map(|m| m.index).collect()
    }

    #[test]
    fn a_page_of_large_messages_stops_at_the_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(&dir);
        let batch: Vec<_> = (1..=10)
            .map(|i| StoredMessage {
                text: "x".repeat(300 * 1024),
                ..msg(i, "#big")
            })
            .collect();
        h.write(&batch.iter().collect::<Vec<_>>(), Retention::default(), 0)
            .unwrap();
        let page = |after| idx(h.page("#big", after, None, 1000, 100).unwrap().messages);
        // 1 MiB holds three of them: the earliest after an index, or the latest.
        assert_eq!(page(Some(0)), vec![1, 2, 3]);
        assert_eq!(page(Some(3)), vec![4, 5, 6]);
        assert_eq!(page(None), vec![8, 9, 10]);
    }

    #[test]
    fn pages_and_missed() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(&dir);
        let batch: Vec<_> = (1..=10)
            .map(|i| msg(i, if i % 2 == 0 { "#Even" } else { "bob" }))
            .collect();
        h.write(&batch.iter().collect::<Vec<_>>(), Retention::default(), 0)
            .unwrap();
        let page = |after, before, limit, upto| {
            idx(h
                .page("#even", after, before, limit, upto)
                .unwrap()
                .messages)
        };
        assert_eq!(page(None, None, 2, 100), vec![8, 10]);
        assert_eq!(page(Some(2), None, 2, 100), vec![4, 6]);
        assert_eq!(page(None, Some(8), 10, 100), vec![2, 4, 6]);
        assert_eq!(page(None, None, 10, 6), vec![2, 4, 6]);
        assert_eq!(
            idx(h
                .page(&user_key("BOB"), Some(5), None, 10, 100)
                .unwrap()
                .messages),
            vec![7, 9]
        );
        let keys = vec!["#even".to_string(), user_key("alice")];
        assert_eq!(idx(h.missed(&keys, 6, 9, 100).unwrap()), vec![7, 8, 9]);
        assert_eq!(idx(h.missed(&keys, 0, 100, 3).unwrap()), vec![1, 2, 3]);
        assert_eq!(h.count_missed(&keys, 6, 9).unwrap(), 3);
        assert_eq!(h.count_missed(&keys, 0, 100).unwrap(), 10);
    }

    #[test]
    fn retention_keeps_the_newest_per_room_and_says_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(&dir);
        let keep = Retention {
            max_per_room: 3,
            max_age_ms: 0,
        };
        for i in 1..=10 {
            h.write(&[&msg(i, "#r")], keep, 0).unwrap();
        }
        let page = h.page("#r", Some(0), None, 100, 100).unwrap();
        assert_eq!(idx(page.messages), vec![8, 9, 10]);
        assert!(page.truncated);
        assert_eq!(page.oldest_index, Some(8));
        let latest = h.page("#r", None, None, 2, 100).unwrap();
        assert!(!latest.truncated, "the newest two are all there");
        let all = h.page("#r", None, None, 100, 100).unwrap();
        assert!(all.truncated, "asked for more than is kept");
        assert!(!h.page("#r", Some(7), None, 100, 100).unwrap().truncated);
        // A re-applied old message does not come back.
        h.write(&[&msg(2, "#r")], keep, 0).unwrap();
        assert_eq!(h.count_missed(&["#r".into()], 0, 100).unwrap(), 3);
        assert_eq!(h.pruned_upto(&["#r".into()]).unwrap(), 7);
    }

    /// Counts change once per batch: a batch over the cap, a re-applied batch, and batches of
    /// direct messages must leave every room at its cap and the counts equal to the rows.
    #[test]
    fn batched_counts_match_the_rows() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(&dir);
        let keep = Retention {
            max_per_room: 10,
            max_age_ms: 0,
        };
        let first: Vec<_> = (1..=50)
            .map(|i| msg(i, if i % 5 == 0 { "bob" } else { "#r" }))
            .collect();
        h.write(&first.iter().collect::<Vec<_>>(), keep, 0).unwrap();
        // Re-applied (a restart replays the log above the snapshot), then five more.
        h.write(&first.iter().collect::<Vec<_>>(), keep, 0).unwrap();
        let more: Vec<_> = (51..=55).map(|i| msg(i, "#r")).collect();
        h.write(&more.iter().collect::<Vec<_>>(), keep, 0).unwrap();
        let room: Vec<u64> = (36..=55).filter(|i| i % 5 != 0 || *i > 50).collect();
        let kept = idx(h.page("#r", Some(0), None, 100, 100).unwrap().messages);
        assert_eq!(kept, room[room.len() - 10..].to_vec());
        let txn = h.db.begin_read().unwrap();
        let counts = txn.open_table(COUNTS).unwrap();
        let by_target = txn.open_table(BY_TARGET).unwrap();
        for key in ["#r", "@alice", "@bob"] {
            let rows = by_target.range((key, 0)..=(key, u64::MAX)).unwrap().count() as u64;
            let counted = counts.get(key).unwrap().map_or(0, |v| v.value());
            assert_eq!(counted, rows, "{key}");
        }
        assert_eq!(counts.get("@bob").unwrap().map(|v| v.value()), Some(10));
    }

    #[test]
    fn retention_by_age_drops_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(&dir);
        let all: Vec<_> = (1..=10).map(|i| msg(i, "#r")).collect();
        h.write(&all.iter().collect::<Vec<_>>(), Retention::default(), 0)
            .unwrap();
        let age = Retention {
            max_per_room: 0,
            max_age_ms: 4_500,
        };
        // Entry time 10 s: everything before 5.5 s goes.
        h.write(&[], age, 10_000).unwrap();
        assert_eq!(
            idx(h.missed(&["#r".into()], 0, 100, 100).unwrap()),
            vec![6, 7, 8, 9, 10]
        );
        assert_eq!(h.oldest_kept(&["#r".into()]).unwrap(), Some(6));
    }

    #[test]
    fn range_pages_fill_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let source = open(&dir);
        let all: Vec<_> = (1..=25).map(|i| msg(i, "#r")).collect();
        source
            .write(&all.iter().collect::<Vec<_>>(), Retention::default(), 0)
            .unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let copy = open(&dir2);
        copy.write(&[&msg(1, "#r")], Retention::default(), 0)
            .unwrap();
        assert_eq!(
            copy.open_gap(1, 20).unwrap(),
            Some(Gap { after: 1, upto: 20 })
        );
        let mut gap = copy.gap().unwrap();
        let mut pages = 0;
        while let Some(g) = gap {
            let page = source.range(g.after, g.upto, 7, usize::MAX).unwrap();
            gap = copy.fill_gap(&page, Retention::default(), 0).unwrap();
            pages += 1;
        }
        assert_eq!(pages, 3);
        assert_eq!(copy.count_missed(&["#r".into()], 0, 100).unwrap(), 20);
    }
}
