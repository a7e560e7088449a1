//! The raft log's files: an append-only write-ahead log in segments.
//!
//! A directory of segment files (`00000000000000000001.wal`, …), each zero-filled before use
//! (`spare_segment` says why not fallocated), starting with a magic header and then records
//! `[len u32][crc32 u32][kind u8][payload]`. A batch of records is one `pwrite` and (when it
//! must be durable) one `fdatasync`: appends overwrite blocks already written, so the sync
//! writes only the new data and never commits the file system's journal. redb, which held
//! the log before, rewrote about ten B-tree pages per commit and each sync cost 0.5–0.9 ms.
//!
//! Replaying the segments in order rebuilds the log: entries, truncations, purges, the vote
//! and the commit index. A new segment begins with a checkpoint of the vote, the commit index
//! and the last purge, so older segments can be deleted once every entry in them is purged.
//!
//! A crash in the middle of a write leaves a torn record at the end of the last segment: it is
//! recognised (cut short by the end of the file, or with a 512-byte sector never written) and
//! dropped, with anything after it zeroed. A record that fails its checksum any other way is
//! corruption, and opening the log fails naming the file and the offset.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::entry::RaftEntry;

use super::spare_segment::SpareSegment;
use super::types::{Entry, LogId, Vote};

const MAGIC: &[u8; 8] = b"RCWAL01\n";
/// Each segment is zero-filled to this size; a batch that does not fit starts a new one (the
/// next file is prepared once the current one is half full).
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// A new log's first segment is smaller: it is filled before the node can start, and a node
/// that starts late on a busy disk campaigns before it hears from the leader.
const FIRST_SEGMENT_BYTES: u64 = 1024 * 1024;
const RECORD_HEADER: usize = 9;
/// No record is larger (an entry is a chat command, well under this).
const MAX_RECORD: usize = 64 * 1024 * 1024;
const SECTOR: u64 = 512;

const KIND_ENTRY: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_COMMITTED: u8 = 3;
const KIND_TRUNCATE: u8 = 4;
const KIND_PURGE: u8 = 5;

/// One write to the log.
pub enum Record<'a> {
    Entry(&'a Entry),
    Vote(&'a Vote),
    Committed(&'a Option<LogId>),
    /// Every entry from this index on is gone.
    Truncate(u64),
    /// Every entry up to this log id is gone.
    Purge(&'a LogId),
}

/// What replaying the log found, in the order it was written.
pub enum Replayed {
    Entry(Entry),
    Vote(Vote),
    Committed(Option<LogId>),
    Truncate(u64),
    Purge(LogId),
}

/// Where an entry's record is.
#[derive(Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

/// Where every entry in the log is, and the open segment files, shared by the writer and
/// readers. One `Loc` per entry: the log is bounded by snapshots, not by the history.
#[derive(Default)]
struct Index {
    first: u64,
    locs: VecDeque<Loc>,
    files: BTreeMap<u64, Arc<File>>,
}

impl Index {
    fn next(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    /// The index of the last entry, if it holds any.
    fn last(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.next() - 1)
    }

    fn push(&mut self, index: u64, loc: Loc) {
        if self.locs.is_empty() {
            self.first = index;
        } else if index < self.next() {
            self.truncate(index);
            if self.locs.is_empty() {
                self.first = index;
            }
        }
        self.locs.push_back(loc);
    }

    fn truncate(&mut self, from: u64) {
        if from <= self.first {
            self.locs.clear();
        } else {
            self.locs.truncate((from - self.first) as usize);
        }
    }

    fn purge(&mut self, upto: u64) {
        while !self.locs.is_empty() && self.first <= upto {
            self.locs.pop_front();
            self.first += 1;
        }
        if self.locs.is_empty() {
            self.first = upto + 1;
        }
    }
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log {} is corrupt: {what}", path.display()),
    )
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// The segment files in `dir`, oldest first.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let name = item?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name.strip_suffix(".wal").and_then(|s| s.parse().ok()) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Whether `dir` holds a log.
pub fn exists(dir: &Path) -> bool {
    list_segments(dir).is_ok_and(|s| !s.is_empty())
}

/// Reads entries from the log's files (any thread; blocking).
#[derive(Clone)]
pub struct WalReader {
    index: Arc<Mutex<Index>>,
}

impl WalReader {
    /// The index of the last entry in the log, if it holds any.
    pub fn last_index(&self) -> Option<u64> {
        self.index().last()
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries in [`start`, `end`), stopping once about `budget` bytes are read (after at
    /// least one entry).
    pub fn read(&self, start: u64, end: u64, budget: usize) -> io::Result<Vec<Entry>> {
        let wanted: Vec<(Loc, Arc<File>)> = {
            let index = self.index();
            let from = start.max(index.first);
            let to = end.min(index.next());
            let mut bytes = 0;
            let mut wanted = Vec::new();
            for i in from..to {
                let loc = index.locs[(i - index.first) as usize];
                let Some(file) = index.files.get(&loc.segment) else {
                    break;
                };
                wanted.push((loc, file.clone()));
                bytes += loc.len as usize;
                if bytes >= budget {
                    break;
                }
            }
            wanted
        };
        let mut out = Vec::with_capacity(wanted.len());
        let mut buf = Vec::new();
        for (loc, file) in wanted {
            buf.resize(loc.len as usize, 0);
            file.read_exact_at(&mut buf, loc.offset)?;
            match decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                Replayed::Entry(entry) => out.push(entry),
                _ => {
                    return Err(io::Error::other(format!(
                        "raft log segment {} offset {}: not an entry",
                        loc.segment, loc.offset
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// Appends to the log (one thread owns it).
pub struct WalWriter {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    /// Segments oldest first, with the highest entry index each holds.
    segments: VecDeque<(u64, Option<u64>)>,
    file: Arc<File>,
    offset: u64,
    /// The current segment's size: a batch that does not fit starts the next segment.
    segment_len: u64,
    /// A write failed part-way: start a new segment before the next one.
    broken: bool,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    buf: Vec<u8>,
    spare: SpareSegment,
}

impl WalWriter {
    /// Opens the log in `dir` (creating it), replaying every record into `on_record`.
    pub fn open(
        dir: &Path,
        on_record: impl FnMut(Replayed) -> io::Result<()>,
    ) -> io::Result<(WalWriter, WalReader)> {
        std::fs::create_dir_all(dir)?;
        let Replay {
            mut index,
            mut segments,
            vote,
            committed,
            last_purged,
            tail,
        } = replay(dir, on_record)?;
        let mut spare = SpareSegment::new(dir, SEGMENT_BYTES);
        let (file, offset, segment_len) = match tail {
            Some((seq, at, junk)) => {
                let Some(file) = index.files.get(&seq).cloned() else {
                    return Err(io::Error::other("raft log: last segment vanished"));
                };
                if let Some(junk) = junk {
                    // A torn write's remains: zeroed, so no later replay reads them.
                    file.write_all_at(&vec![0; junk + 1], at)?;
                    file.sync_data()?;
                }
                let len = file.metadata()?.len();
                (file, at, len)
            }
            None => {
                let (file, head, len) = create_segment(
                    dir,
                    &mut spare,
                    FIRST_SEGMENT_BYTES,
                    1,
                    &vote,
                    &committed,
                    &last_purged,
                )?;
                let file = Arc::new(file);
                index.files.insert(1, file.clone());
                segments.push_back((1, None));
                (file, head, len)
            }
        };
        let index = Arc::new(Mutex::new(index));
        let writer = WalWriter {
            dir: dir.to_path_buf(),
            index: index.clone(),
            segments,
            file,
            offset,
            segment_len,
            broken: false,
            vote,
            committed,
            last_purged,
            buf: Vec::new(),
            spare,
        };
        Ok((writer, WalReader { index }))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest index the log covers: its last entry, or its last purge if it holds none.
    pub fn end(&self) -> Option<u64> {
        let last = self.index().last();
        last.max(self.last_purged.map(|p| p.index()))
    }

    /// The commit index the log on disk holds (the last one written).
    pub fn committed(&self) -> Option<LogId> {
        self.committed
    }

    /// Starts segment `seq` and writes into it from now on.
    fn start_segment(&mut self, seq: u64) -> io::Result<()> {
        let (file, head, len) = create_segment(
            &self.dir,
            &mut self.spare,
            SEGMENT_BYTES,
            seq,
            &self.vote,
            &self.committed,
            &self.last_purged,
        )?;
        let file = Arc::new(file);
        self.index().files.insert(seq, file.clone());
        self.segments.push_back((seq, None));
        self.file = file;
        self.offset = head;
        self.segment_len = len;
        self.broken = false;
        Ok(())
    }

    /// Whether `bytes` more fit in the segment being written, so writing them starts no new
    /// one.
    pub fn fits_in_segment(&self, bytes: u64) -> bool {
        !self.broken && self.offset + bytes <= self.segment_len
    }

    /// Writes `records` in one write, then an fsync when `durable`.
    pub fn write(&mut self, records: &[Record<'_>], durable: bool) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut starts = Vec::with_capacity(records.len());
        for record in records {
            starts.push(buf.len());
            encode(&mut buf, record)?;
        }
        let result = self.write_encoded(&buf, records, &starts, durable);
        self.buf = buf;
        // Keep no huge buffer from one large batch.
        if self.buf.capacity() > 4 * 1024 * 1024 {
            self.buf = Vec::new();
        }
        result
    }

    fn write_encoded(
        &mut self,
        buf: &[u8],
        records: &[Record<'_>],
        starts: &[usize],
        durable: bool,
    ) -> io::Result<()> {
        let header = MAGIC.len() as u64 + 512;
        if self.broken
            || (self.offset > header && self.offset + buf.len() as u64 > self.segment_len)
        {
            // What is in the old segment was synced when it was written, except writes that
            // needed no sync: sync them before leaving it.
            self.file.sync_data()?;
            let next = self.segments.back().map_or(1, |(seq, _)| seq + 1);
            self.start_segment(next)?;
        }
        if let Err(e) = self.file.write_all_at(buf, self.offset) {
            self.broken = true;
            // Part of the batch may be there: zero it, so a replay never reads it.
            let _ = self.file.write_all_at(&vec![0; buf.len()], self.offset);
            return Err(e);
        }
        if durable && let Err(e) = self.file.sync_data() {
            self.broken = true;
            return Err(e);
        }
        let seq = self.segments.back().map_or(0, |(seq, _)| *seq);
        let mut purged = None;
        {
            let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            for (n, record) in records.iter().enumerate() {
                let end = starts.get(n + 1).copied().unwrap_or(buf.len());
                match record {
                    Record::Entry(entry) => {
                        let loc = Loc {
                            segment: seq,
                            offset: self.offset + starts[n] as u64,
                            len: (end - starts[n]) as u32,
                        };
                        index.push(entry.index(), loc);
                        if let Some((_, max)) = self.segments.back_mut() {
                            *max = (*max).max(Some(entry.index()));
                        }
                    }
                    Record::Vote(v) => self.vote = Some(**v),
                    Record::Committed(c) => self.committed = **c,
                    Record::Truncate(from) => index.truncate(*from),
                    Record::Purge(upto) => {
                        index.purge(upto.index());
                        self.last_purged = Some(**upto);
                        purged = Some(upto.index());
                    }
                }
            }
        }
        self.offset += buf.len() as u64;
        if self.offset > self.segment_len / 2 {
            self.spare.prepare_ahead();
        }
        if let Some(upto) = purged {
            self.delete_purged(upto, durable);
        }
        Ok(())
    }

    /// Deletes the oldest segments while every entry in them is purged (never the one being
    /// written: it holds the newest checkpoint).
    fn delete_purged(&mut self, upto: u64, synced: bool) {
        let mut synced = synced;
        while self.segments.len() > 1 {
            let Some(&(seq, max)) = self.segments.front() else {
                return;
            };
            if max.is_some_and(|m| m > upto) {
                return;
            }
            // The purge that allows it must be on disk first: after a crash, a replay that
            // finds the segment gone but not the purge would see a hole.
            if !synced {
                if let Err(e) = self.file.sync_data() {
                    tracing::warn!(error = %e, "could not sync the raft log before deleting a segment");
                    return;
                }
                synced = true;
            }
            let path = segment_path(&self.dir, seq);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a purged raft log segment");
                return;
            }
            self.segments.pop_front();
            self.index().files.remove(&seq);
        }
    }
}

/// What replaying a log directory found.
pub struct Replay {
    index: Index,
    segments: VecDeque<(u64, Option<u64>)>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
    /// The last segment, where its records end, and its last non-zero byte after that.
    tail: Option<(u64, u64, Option<usize>)>,
}

/// Reads every segment in `dir` in order, passing each record to `on_record` (writes nothing).
pub fn replay(
    dir: &Path,
    mut on_record: impl FnMut(Replayed) -> io::Result<()>,
) -> io::Result<Replay> {
    let mut index = Index::default();
    let mut segments = VecDeque::new();
    let (mut vote, mut committed, mut last_purged) = (None, None, None);
    let seqs = list_segments(dir)?;
    let mut tail = None;
    for (n, &seq) in seqs.iter().enumerate() {
        let path = segment_path(dir, seq);
        let file = File::options().read(true).write(true).open(&path)?;
        let data = std::fs::read(&path)?;
        let last = n + 1 == seqs.len();
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            return Err(corrupt(&path, "no segment header"));
        }
        let mut at = MAGIC.len();
        let mut max_index = None;
        loop {
            match next_record(&data, at) {
                Scan::Record(end) => {
                    let loc = Loc {
                        segment: seq,
                        offset: at as u64,
                        len: (end - at) as u32,
                    };
                    let record = decode(&data[at..end])
                        .map_err(|e| corrupt(&path, format!("offset {at}: {e}")))?;
                    match &record {
                        Replayed::Entry(entry) => {
                            let i = entry.index();
                            let purged = last_purged.as_ref().map(|l: &LogId| l.index());
                            if purged.is_some_and(|p| i <= p) {
                                at = end;
                                continue;
                            }
                            // After a gap, entries may resume higher up: the segments holding
                            // the gap were deleted behind a purge recorded further on (checked
                            // once everything is replayed).
                            if !index.locs.is_empty() && i > index.next() {
                                return Err(corrupt(
                                    &path,
                                    format!("expected entry {}, found {i}", index.next()),
                                ));
                            }
                            index.push(i, loc);
                            max_index = max_index.max(Some(i));
                        }
                        Replayed::Vote(v) => vote = Some(*v),
                        Replayed::Committed(c) => committed = *c,
                        Replayed::Truncate(from) => index.truncate(*from),
                        Replayed::Purge(upto) => {
                            index.purge(upto.index());
                            last_purged = Some(*upto);
                        }
                    }
                    on_record(record)?;
                    at = end;
                }
                Scan::End => break,
                Scan::Torn if last => break,
                Scan::Torn => {
                    return Err(corrupt(
                        &path,
                        format!("record at offset {at} is cut short"),
                    ));
                }
                Scan::Corrupt(why) => {
                    return Err(corrupt(&path, format!("offset {at}: {why}")));
                }
            }
        }
        if last {
            tail = Some((seq, at as u64, data[at..].iter().rposition(|b| *b != 0)));
        }
        index.files.insert(seq, Arc::new(file));
        segments.push_back((seq, max_index));
    }
    if let Some(purged) = &last_purged
        && !index.locs.is_empty()
        && index.first != purged.index() + 1
    {
        return Err(corrupt(
            dir,
            format!(
                "entries {} to {} are missing (purged up to {})",
                purged.index() + 1,
                index.first - 1,
                purged.index()
            ),
        ));
    }
    Ok(Replay {
        index,
        segments,
        vote,
        committed,
        last_purged,
        tail,
    })
}

/// Creates segment `seq`: zero-filled, headed by a checkpoint of the log's state, on disk.
/// Returns it, where its records begin and its size.
fn create_segment(
    dir: &Path,
    spare: &mut SpareSegment,
    bytes: u64,
    seq: u64,
    vote: &Option<Vote>,
    committed: &Option<LogId>,
    last_purged: &Option<LogId>,
) -> io::Result<(File, u64, u64)> {
    let path = segment_path(dir, seq);
    let file = spare.take(&path, bytes)?;
    let prepared = (|| {
        let mut head = MAGIC.to_vec();
        if let Some(vote) = vote {
            encode(&mut head, &Record::Vote(vote))?;
        }
        encode(&mut head, &Record::Committed(committed))?;
        if let Some(purged) = last_purged {
            encode(&mut head, &Record::Purge(purged))?;
        }
        file.write_all_at(&head, 0)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok((head.len() as u64, file.metadata()?.len()))
    })();
    match prepared {
        Ok((head, len)) => Ok((file, head, len)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

fn encode(buf: &mut Vec<u8>, record: &Record<'_>) -> io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEADER]);
    let kind = match record {
        Record::Entry(e) => {
            serde_json::to_writer(&mut *buf, e).map_err(io::Error::other)?;
            KIND_ENTRY
        }
        Record::Vote(v) => {
            serde_json::to_writer(&mut *buf, v).map_err(io::Error::other)?;
            KIND_VOTE
        }
        Record::Committed(c) => {
            serde_json::to_writer(&mut *buf, c).map_err(io::Error::other)?;
            KIND_COMMITTED
        }
        Record::Truncate(from) => {
            buf.extend_from_slice(&from.to_le_bytes());
            KIND_TRUNCATE
        }
        Record::Purge(upto) => {
            serde_json::to_writer(&mut *buf, upto).map_err(io::Error::other)?;
            KIND_PURGE
        }
    };
    let len = buf.len() - start;
    if len > MAX_RECORD {
        buf.truncate(start);
        return Err(io::Error::other(format!(
            "raft log record of {len} bytes is over the limit"
        )));
    }
    buf[start + 8] = kind;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes one whole record (header included).
fn decode(record: &[u8]) -> Result<Replayed, String> {
    let Some(&kind) = record.get(8) else {
        return Err("record too short".into());
    };
    let payload = &record[RECORD_HEADER..];
    let json = |what: &str, e: serde_json::Error| format!("{what}: {e}");
    Ok(match kind {
        KIND_ENTRY => {
            Replayed::Entry(serde_json::from_slice(payload).map_err(|e| json("entry", e))?)
        }
        KIND_VOTE => Replayed::Vote(serde_json::from_slice(payload).map_err(|e| json("vote", e))?),
        KIND_COMMITTED => {
            Replayed::Committed(serde_json::from_slice(payload).map_err(|e| json("committed", e))?)
        }
        KIND_TRUNCATE => {
            let bytes: [u8; 8] = payload
                .try_into()
                .map_err(|_| "truncation record of the wrong size".to_string())?;
            Replayed::Truncate(u64::from_le_bytes(bytes))
        }
        KIND_PURGE => {
            Replayed::Purge(serde_json::from_slice(payload).map_err(|e| json("purge", e))?)
        }
        other => return Err(format!("unknown record kind {other}")),
    })
}

enum Scan {
    /// A whole record ends here.
    Record(usize),
    /// No more records (zeros, or the end of the file).
    End,
    /// A record a crash interrupted.
    Torn,
    Corrupt(String),
}

/// What is at `at` in a segment's bytes.
fn next_record(data: &[u8], at: usize) -> Scan {
    if at + 4 > data.len() {
        return if data[at..].iter().all(|b| *b == 0) {
            Scan::End
        } else {
            Scan::Torn
        };
    }
    let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
    if len == 0 {
        return Scan::End;
    }
    if !(RECORD_HEADER..=MAX_RECORD).contains(&len) {
        return Scan::Corrupt(format!("record length {len}"));
    }
    let end = at + len;
    if end > data.len() {
        return Scan::Torn;
    }
    let crc = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
    if crc32fast::hash(&data[at + 8..end]) == crc {
        return Scan::Record(end);
    }
    // A sector of the record never written: the write was cut by a crash.
    let mut sector = (at as u64 / SECTOR) * SECTOR;
    while sector < end as u64 {
        let from = (sector as usize).max(at);
        let to = ((sector + SECTOR) as usize).min(end);
        if data[from..to].iter().all(|b| *b == 0) {
            return Scan::Torn;
        }
        sector += SECTOR;
    }
    Scan::Corrupt("checksum mismatch".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::command::ChatCommand;

    fn entry(term: u64, index: u64) -> Entry {
        crate::consensus::log_store::tests::entry(term, index, 300)
    }

    /// A reopened log: its (term, index) list, its vote, and the writer and reader.
    type Reopened = (Vec<(u64, u64)>, Option<Vote>, WalWriter, WalReader);

    /// Replays `dir`: the entries' (term, index) in log order after truncations and purges.
    fn reopen(dir: &Path) -> io::Result<Reopened> {
        let mut log: BTreeMap<u64, u64> = BTreeMap::new();
        let mut vote = None;
        let (w, r) = WalWriter::open(dir, |rec| {
            match rec {
                Replayed::Entry(e) => {
                    log.insert(e.index(), e.log_id().leader_id.term);
                }
                Replayed::Truncate(from) => log.retain(|i, _| *i < from),
                Replayed::Purge(upto) => log.retain(|i, _| *i > upto.index()),
                Replayed::Vote(v) => vote = Some(v),
                Replayed::Committed(_) => {}
            }
            Ok(())
        })?;
        Ok((log.into_iter().map(|(i, t)| (t, i)).collect(), vote, w, r))
    }

    #[test]
    fn a_reopened_log_has_its_entries_truncations_purges_and_vote() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, _, mut w, r) = reopen(dir.path()).unwrap();
            let es: Vec<Entry> = (1..=10).map(|i| entry(1, i)).collect();
            let recs: Vec<Record> = es.iter().map(Record::Entry).collect();
            w.write(&recs, true).unwrap();
            let new: Vec<Entry> = (6..=8).map(|i| entry(2, i)).collect();
            let mut recs = vec![Record::Truncate(6)];
            recs.extend(new.iter().map(Record::Entry));
            let vote = Vote::new(2, 1);
            recs.push(Record::Vote(&vote));
            w.write(&recs, true).unwrap();
            let upto = es[2].log_id();
            w.write(&[Record::Purge(&upto)], false).unwrap();
            let read = r.read(0, 100, usize::MAX).unwrap();
            let got: Vec<(u64, u64)> = read
                .iter()
                .map(|e| (e.log_id().leader_id.term, e.index()))
                .collect();
            assert_eq!(got, vec![(1, 4), (1, 5), (2, 6), (2, 7), (2, 8)]);
        }
        let (log, vote, _, r) = reopen(dir.path()).unwrap();
        assert_eq!(log, vec![(1, 4), (1, 5), (2, 6), (2, 7), (2, 8)]);
        assert_eq!(vote, Some(Vote::new(2, 1)));
        assert_eq!(r.read(7, 100, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_write_fits_in_its_segment_until_the_segment_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, mut w, _) = reopen(dir.path()).unwrap();
        let room = w.segment_len - w.offset;
        assert!(w.fits_in_segment(room));
        assert!(!w.fits_in_segment(room + 1));
        // Fill the segment, and one more write starts the next: it fits again.
        let mut next = 1;
        while w.segments.len() < 2 {
            let es: Vec<Entry> = (next..next + 100).map(|i| entry(1, i)).collect();
            next += 100;
            let recs: Vec<Record> = es.iter().map(Record::Entry).collect();
            w.write(&recs, false).unwrap();
        }
        assert!(w.fits_in_segment(1024));
    }

    #[test]
    fn segments_roll_over_and_purged_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, mut w, r) = reopen(dir.path()).unwrap();
        let per_batch = 1000;
        let mut last = None;
        for batch in 0..120u64 {
            let es: Vec<Entry> = (0..per_batch)
                .map(|i| entry(1, 1 + batch * per_batch + i))
                .collect();
            let recs: Vec<Record> = es.iter().map(Record::Entry).collect();
            w.write(&recs, false).unwrap();
            last = es.last().map(|e| e.log_id());
        }
        let before = list_segments(dir.path()).unwrap().len();
        assert!(before > 3, "{before} segments");
        let vote = Vote::new(3, 2);
        w.write(&[Record::Vote(&vote)], true).unwrap();
        let upto = last.unwrap();
        let keep_from = upto.index() - 10;
        let purge = entry(1, keep_from - 1).log_id();
        w.write(&[Record::Purge(&purge)], true).unwrap();
        let after = list_segments(dir.path()).unwrap().len();
        assert!(after < before, "{after} segments left of {before}");
        assert_eq!(r.read(keep_from, u64::MAX, usize::MAX).unwrap().len(), 11);
        drop(w);
        let (log, vote_back, _, _) = reopen(dir.path()).unwrap();
        assert_eq!(log.len(), 11);
        assert_eq!(log.first().map(|l| l.1), Some(keep_from));
        assert_eq!(vote_back, Some(vote));
        let _ = upto;
    }

    #[test]
    fn a_log_reopens_after_segments_behind_a_later_purge_were_deleted() {
        // A segment's checkpoint carries the purge of its time; the segments after it hold
        // entries far above it once older segments are deleted behind a newer purge.
        let dir = tempfile::tempdir().unwrap();
        let (_, _, mut w, _) = reopen(dir.path()).unwrap();
        let mut next = 1u64;
        let mut write = |w: &mut WalWriter, n: u64| {
            let es: Vec<Entry> = (next..next + n).map(|i| entry(1, i)).collect();
            let recs: Vec<Record> = es.iter().map(Record::Entry).collect();
            w.write(&recs, true).unwrap();
            next += n;
        };
        for round in 0..6u64 {
            for _ in 0..20 {
                write(&mut w, 1000);
            }
            let upto = entry(1, (round + 1) * 20_000 - 500).log_id();
            w.write(&[Record::Purge(&upto)], false).unwrap();
        }
        let segments = list_segments(dir.path()).unwrap().len();
        assert!(
            segments < 10,
            "purged segments are deleted: {segments} left"
        );
        drop(w);
        let (log, _, _, r) = reopen(dir.path()).unwrap();
        assert_eq!(log.first().map(|l| l.1), Some(119_501));
        assert_eq!(log.last().map(|l| l.1), Some(120_000));
        assert_eq!(r.read(119_990, u64::MAX, usize::MAX).unwrap().len(), 11);
    }

    fn last_segment(dir: &Path) -> PathBuf {
        segment_path(dir, *list_segments(dir).unwrap().last().unwrap())
    }

    #[test]
    fn a_torn_tail_is_dropped_and_overwritten_but_a_damaged_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, mut w, _) = reopen(dir.path()).unwrap();
        for i in 1..=4 {
            w.write(&[Record::Entry(&entry(1, i))], true).unwrap();
        }
        // The last entry spans several sectors.
        let mut big = entry(1, 5);
        if let openraft::EntryPayload::Normal(req) = &mut big.payload
            && let ChatCommand::Send { text, .. } = std::sync::Arc::make_mut(&mut req.command)
        {
            *text = "y".repeat(3000);
        }
        w.write(&[Record::Entry(&big)], true).unwrap();
        let end = w.offset as usize;
        drop(w);
        let path = last_segment(dir.path());
        let original = std::fs::read(&path).unwrap();
        // The last record's last sectors never reached the disk (zeros, as preallocated).
        let mut torn = original.clone();
        for b in &mut torn[end - 1200..end] {
            *b = 0;
        }
        std::fs::write(&path, &torn).unwrap();
        let (log, _, mut w, _) = reopen(dir.path()).unwrap();
        assert_eq!(log.len(), 4, "the torn record is dropped");
        // The next write goes where the torn record was, and nothing of it is read again.
        w.write(&[Record::Entry(&entry(2, 5))], true).unwrap();
        drop(w);
        let (log, _, _, _) = reopen(dir.path()).unwrap();
        assert_eq!(log.last(), Some(&(2, 5)));
        assert_eq!(log.len(), 5);
        // The file cut short in the middle of a record: also a crash, also dropped.
        std::fs::write(&path, &original[..end - 3]).unwrap();
        let (log, _, _, _) = reopen(dir.path()).unwrap();
        assert_eq!(log.len(), 4);
        // A byte flipped inside an earlier record: corruption, refused with file and offset.
        let mut damaged = original.clone();
        damaged[MAGIC.len() + 60] ^= 0x55;
        std::fs::write(&path, &damaged).unwrap();
        let err = reopen(dir.path()).err().unwrap().to_string();
        assert!(err.contains(".wal") && err.contains("checksum"), "{err}");
        // No header: refused.
        std::fs::write(&path, b"garbage!garbage!").unwrap();
        let err = reopen(dir.path()).err().unwrap().to_string();
        assert!(err.contains("header"), "{err}");
    }
}
