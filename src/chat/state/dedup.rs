//! A session's deduplication window: the newest `DEDUP_WINDOW` client message ids it sent,
//! each with the log index it got.
//!
//! Every applied message inserts an id and, once the window is full, evicts the oldest, on
//! every node. So the window is a ring of `(id, index)` slots in insertion order plus a hash
//! table of slot numbers: an insert into a full window reuses the oldest slot's string buffer
//! and finds the evicted entry by its slot, not by comparing strings. The ring grows only
//! as ids come, so a quiet session holds little.
//!
//! Snapshots carry the window as before (`{"ids": {id: index}, "order": [id, ...]}`), so
//! states written by earlier versions load unchanged.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use serde::de::Deserializer;
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

/// Client message ids remembered per session; a client only re-sends recent, unacknowledged
/// messages, so an old id falling out of this window cannot come back.
pub(super) const DEDUP_WINDOW: usize = 10_000;

#[derive(Clone, Default)]
pub(super) struct DedupWindow {
    /// `(id, index)`; once full, `oldest` is the slot the next insert reuses.
    slots: Vec<(String, u64)>,
    oldest: usize,
    /// Slot numbers, hashed by their id. The ids are chosen by clients, so the hash is std's
    /// randomly keyed SipHash, as `HashMap`'s.
    by_id: HashTable<u32>,
    hasher: RandomState,
}

impl DedupWindow {
    pub(super) fn get(&self, id: &str) -> Option<u64> {
        let hash = self.hasher.hash_one(id);
        let slot = self.by_id.find(hash, |&s| self.slots[s as usize].0 == id)?;
        Some(self.slots[*slot as usize].1)
    }

    pub(super) fn insert(&mut self, id: &str, index: u64) {
        let hash = self.hasher.hash_one(id);
        let slots = &mut self.slots;
        if let Some(&slot) = self.by_id.find(hash, |&s| slots[s as usize].0 == id) {
            slots[slot as usize].1 = index;
            return;
        }
        let slot = if slots.len() < DEDUP_WINDOW {
            slots.push((id.to_owned(), index));
            slots.len() - 1
        } else {
            let slot = self.oldest;
            self.oldest = (slot + 1) % slots.len();
            let evicted = self.hasher.hash_one(slots[slot].0.as_str());
            if let Ok(entry) = self.by_id.find_entry(evicted, |&s| s as usize == slot) {
                entry.remove();
            }
            let (old_id, old_index) = &mut slots[slot];
            old_id.clear();
            old_id.push_str(id);
            *old_index = index;
            slot
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_id.insert_unique(hash, slot as u32, |&s| {
            hasher.hash_one(slots[s as usize].0.as_str())
        });
    }

    /// `(id, index)`, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        let (newer, older) = self.slots.split_at(self.oldest);
        older
            .iter()
            .chain(newer)
            .map(|(id, index)| (id.as_str(), *index))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }
}

impl std::fmt::Debug for DedupWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl PartialEq for DedupWindow {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

/// The map's order is insertion order, like the list's.
struct IdsInOrder<'a>(&'a DedupWindow);

impl Serialize for IdsInOrder<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter())
    }
}

struct Order<'a>(&'a DedupWindow);

impl Serialize for Order<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(id, _)| id))
    }
}

impl Serialize for DedupWindow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("DedupWindow", 2)?;
        s.serialize_field("ids", &IdsInOrder(self))?;
        s.serialize_field("order", &Order(self))?;
        s.end()
    }
}

#[derive(Deserialize)]
struct Stored {
    ids: BTreeMap<String, u64>,
    order: Vec<String>,
}

impl<'de> Deserialize<'de> for DedupWindow {
    /// Rebuilt from the list's order with the map's indexes; an id listed without an index
    /// (never written so) is skipped, and only the newest `DEDUP_WINDOW` are kept.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = Stored::deserialize(deserializer)?;
        let mut window = DedupWindow::default();
        let skip = stored.order.len().saturating_sub(DEDUP_WINDOW);
        for id in stored.order.into_iter().skip(skip) {
            if let Some(&index) = stored.ids.get(&id) {
                window.insert(&id, index);
            }
        }
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_forgets_its_oldest_ids_in_insertion_order() {
        let mut window = DedupWindow::default();
        for i in 0..DEDUP_WINDOW as u64 + 5 {
            window.insert(&format!("id-{i}"), 100 + i);
        }
        assert_eq!(window.len(), DEDUP_WINDOW);
        assert_eq!(window.by_id.len(), DEDUP_WINDOW);
        for i in 0..5 {
            assert_eq!(window.get(&format!("id-{i}")), None, "id-{i} kept");
        }
        for i in 5..DEDUP_WINDOW as u64 + 5 {
            assert_eq!(window.get(&format!("id-{i}")), Some(100 + i), "id-{i} lost");
        }
        let order: Vec<u64> = window.iter().map(|(_, index)| index).collect();
        let expected: Vec<u64> = (105..100 + DEDUP_WINDOW as u64 + 5).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn an_id_inserted_again_keeps_its_place_and_takes_the_new_index() {
        let mut window = DedupWindow::default();
        window.insert("a", 1);
        window.insert("b", 2);
        window.insert("a", 3);
        let entries: Vec<(&str, u64)> = window.iter().collect();
        assert_eq!(entries, vec![("a", 3), ("b", 2)]);
    }

    #[test]
    fn a_window_survives_its_serialized_form_after_wrapping() {
        let mut window = DedupWindow::default();
        for i in 0..DEDUP_WINDOW as u64 + 3 {
            window.insert(&format!("{i}"), i);
        }
        let json = serde_json::to_string(&window).unwrap();
        let back: DedupWindow = serde_json::from_str(&json).unwrap();
        assert!(back == window);
        assert_eq!(back.iter().next(), Some(("3", 3)));
    }

    #[test]
    fn an_overlong_or_inconsistent_stored_window_loads_its_newest_listed_ids() {
        let ids: Vec<String> = (0..DEDUP_WINDOW + 2).map(|i| format!("\"{i}\"")).collect();
        let map: Vec<String> = (0..DEDUP_WINDOW + 2)
            .filter(|i| *i != 7)
            .map(|i| format!("\"{i}\":{i}"))
            .collect();
        let json = format!(
            r#"{{"ids":{{{},"stray":1}},"order":[{}]}}"#,
            map.join(","),
            ids.join(",")
        );
        let window: DedupWindow = serde_json::from_str(&json).unwrap();
        assert_eq!(
            window.len(),
            DEDUP_WINDOW - 1,
            "2 too old, 1 without an index"
        );
        assert_eq!(window.get("1"), None);
        assert_eq!(window.get("7"), None);
        assert_eq!(window.get("stray"), None);
        assert_eq!(window.get("2"), Some(2));
        assert_eq!(window.iter().last(), Some(("10001", 10_001)));
    }
}
