//! Moves a raft log written by raftchat 0.1 (one redb file) into the segment log.

use std::io;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{Entry, LogId, Vote};
use super::wal::{Record, WalWriter};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Entries copied per write.
const BATCH: usize = 1024;

fn corrupt(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log {} is corrupt: {what}", path.display()),
    )
}

/// Copies the redb log at `legacy` into a new segment log at `dir`, then deletes `legacy`.
/// The copy is written beside `dir` and renamed into place, so a crash leaves either the old
/// file alone or the finished copy.
pub fn import(legacy: &Path, dir: &Path) -> io::Result<()> {
    let other = |e: redb::Error| io::Error::other(format!("{}: {e}", legacy.display()));
    let db =
        crate::disk::open_database(legacy, 16 * 1024 * 1024).map_err(|e| corrupt(legacy, e))?;
    let txn = db.begin_read().map_err(|e| other(e.into()))?;
    let meta = txn.open_table(META).map_err(|e| other(e.into()))?;
    fn read<T: serde::de::DeserializeOwned>(
        legacy: &Path,
        meta: &redb::ReadOnlyTable<&str, &[u8]>,
        key: &str,
    ) -> io::Result<Option<T>> {
        let Some(bytes) = meta
            .get(key)
            .map_err(|e| io::Error::other(format!("{}: {e}", legacy.display())))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(bytes.value()).map_err(|e| corrupt(legacy, format!("{key}: {e}")))
    }
    let vote: Option<Vote> = read(legacy, &meta, "vote")?;
    let committed: Option<LogId> = read(legacy, &meta, "committed")?;
    let purged: Option<LogId> = read(legacy, &meta, "last_purged")?;

    let staging = dir.with_extension("importing");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let (mut wal, _) = WalWriter::open(&staging, |_| Ok(()))?;
    if let Some(purged) = &purged {
        wal.write(&[Record::Purge(purged)], false)?;
    }
    let logs = txn.open_table(LOGS).map_err(|e| other(e.into()))?;
    let mut batch: Vec<Entry> = Vec::with_capacity(BATCH);
    for row in logs.iter().map_err(|e| other(e.into()))? {
        let (k, v) = row.map_err(|e| other(e.into()))?;
        let entry: Entry = serde_json::from_slice(v.value())
            .map_err(|e| corrupt(legacy, format!("entry {}: {e}", k.value())))?;
        batch.push(entry);
        if batch.len() == BATCH {
            let records: Vec<Record> = batch.iter().map(Record::Entry).collect();
            wal.write(&records, false)?;
            batch.clear();
        }
    }
    let mut records: Vec<Record> = batch.iter().map(Record::Entry).collect();
    if let Some(vote) = &vote {
        records.push(Record::Vote(vote));
    }
    records.push(Record::Committed(&committed));
    wal.write(&records, true)?;
    drop(wal);
    std::fs::rename(&staging, dir)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    drop(logs);
    drop(meta);
    drop(txn);
    drop(db);
    std::fs::remove_file(legacy)?;
    tracing::info!(from = %legacy.display(), to = %dir.display(), "moved the raft log into segment files");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::command::ChatCommand;
    use crate::consensus::types::{Request, TypeConfig};
    use crate::consensus::wal::Replayed;
    use openraft::entry::RaftEntry;

    #[test]
    fn a_redb_log_is_moved_into_segments_with_its_vote_commit_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("raft-log.redb");
        let log_id = |i| openraft::testing::log_id::<TypeConfig>(3, 1, i);
        {
            let db = redb::Database::create(&legacy).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut logs = txn.open_table(LOGS).unwrap();
                for i in 5..=9 {
                    let entry = Entry::new_normal(
                        log_id(i),
                        Request {
                            ts_ms: 0,
                            command: ChatCommand::Send {
                                session: "s".into(),
                                id: i.to_string(),
                                to: "#r".into(),
                                text: "hi".into(),
                            }
                            .into(),
                        },
                    );
                    let bytes = serde_json::to_vec(&entry).unwrap();
                    logs.insert(i, bytes.as_slice()).unwrap();
                }
                let mut meta = txn.open_table(META).unwrap();
                let vote = serde_json::to_vec(&Vote::new(3, 1)).unwrap();
                meta.insert("vote", vote.as_slice()).unwrap();
                let committed = serde_json::to_vec(&Some(log_id(8))).unwrap();
                meta.insert("committed", committed.as_slice()).unwrap();
                let purged = serde_json::to_vec(&log_id(4)).unwrap();
                meta.insert("last_purged", purged.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let wal = dir.path().join("raft-log");
        import(&legacy, &wal).unwrap();
        assert!(!legacy.exists(), "the old file is removed once copied");
        let mut entries = Vec::new();
        let replay = crate::consensus::wal::replay(&wal, |r| {
            if let Replayed::Entry(e) = r {
                entries.push(e.index());
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(entries, vec![5, 6, 7, 8, 9]);
        assert_eq!(replay.vote, Some(Vote::new(3, 1)));
        assert_eq!(replay.committed, Some(log_id(8)));
        assert_eq!(replay.last_purged, Some(log_id(4)));
    }
}
