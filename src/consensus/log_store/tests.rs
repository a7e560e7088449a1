use super::*;
use crate::chat::command::ChatCommand;
use crate::consensus::types::Request;
use std::time::Instant;

/// The node that appended `entry`'s entries.
const LEADER: u64 = 1;

/// A chat message entry with `text_bytes` of text (also used by the WAL's tests).
pub(crate) fn entry(term: u64, index: u64, text_bytes: usize) -> Entry {
    Entry::new_normal(
        openraft::testing::log_id::<TypeConfig>(term, LEADER, index),
        Request {
            ts_ms: 0,
            command: ChatCommand::Send {
                session: "s".into(),
                id: format!("{term}-{index}"),
                to: "#r".into(),
                text: "x".repeat(text_bytes),
            }
            .into(),
        },
    )
}

fn term_at(mem: &LogMem, index: u64) -> Option<u64> {
    mem.cache
        .get(&index)
        .map(|(e, _)| e.log_id().leader_id.term)
}

#[test]
fn entries_appended_after_a_truncation_stay_in_memory_until_written() {
    // A follower got a large run of entries from an old leader (not yet written), then a
    // new leader truncated them and sent its own. When the old run's write completes,
    // the disk holds the old entries at those indexes: the new ones must not be evicted in
    // favour of reading the disk, or the node would apply entries that were never committed.
    let mut mem = LogMem::default();
    let big = CACHE_BYTES / 100;
    let old: Vec<Entry> = (1..=200).map(|i| entry(1, i, big)).collect();
    let old_truncations = mem.appended(&old);
    let new: Vec<Entry> = (101..=200).map(|i| entry(2, i, big)).collect();
    mem.truncated(101, Some(old[99].log_id()));
    let new_truncations = mem.appended(&new);
    let old_write = Op::Append(old, IOFlushed::noop(), old_truncations);
    mem.written(std::slice::from_ref(&old_write));
    assert!(mem.durable_upto <= 100, "durable_upto {}", mem.durable_upto);
    for i in 101..=200 {
        assert_eq!(
            term_at(&mem, i),
            Some(2),
            "entry {i} left memory before it was written"
        );
    }
    // Once the truncation and the new entries are written, they may go.
    let (tx, _rx) = oneshot::channel();
    mem.written(&[
        Op::Truncate(101, tx),
        Op::Append(new, IOFlushed::noop(), new_truncations),
    ]);
    assert_eq!(mem.durable_upto, 200);
    assert!(mem.cache_bytes <= CACHE_BYTES);
}

/// The commit index as the disk holds it (what a restart would read).
fn stored_committed(dir: &Path) -> Option<LogId> {
    let mut committed = None;
    crate::consensus::wal::replay(dir, |r| {
        if let Replayed::Committed(c) = r {
            committed = c;
        }
        Ok(())
    })
    .ok()?;
    committed
}

/// The indexes of the entries the log in `dir` holds, as a restart would read them.
fn replayed_indexes(dir: &Path) -> Vec<u64> {
    let mut indexes = Vec::new();
    crate::consensus::wal::replay(dir, |r| {
        if let Replayed::Entry(e) = r {
            indexes.push(e.index());
        }
        Ok(())
    })
    .unwrap();
    indexes
}

/// A log store in `dir` and how many durable writes it has made.
fn counted_store(dir: &Path) -> (LogStore, Arc<std::sync::atomic::AtomicUsize>) {
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = syncs.clone();
    let store = LogStore::open(
        dir,
        &dir.join("legacy.redb"),
        Arc::new(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
        LEADER,
    )
    .unwrap();
    (store, syncs)
}

async fn wait_for_syncs(syncs: &std::sync::atomic::AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while syncs.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the log never synced {n} times");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_commit_index_is_written_without_an_fsync_of_its_own_but_soon() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, syncs) = counted_store(dir.path());
    let entries: Vec<Entry> = (1..=10).map(|i| entry(1, i, 10)).collect();
    store.append(entries, IOFlushed::noop()).await.unwrap();
    wait_for_syncs(&syncs, 1).await;
    let committed = openraft::testing::log_id::<TypeConfig>(1, 1, 7);
    store.save_committed(Some(committed)).await.unwrap();
    // Alone, it is written within the deferral, with no fsync.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored_committed(dir.path()) != Some(committed) {
        assert!(
            Instant::now() < deadline,
            "the commit index was never written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Behind a vote (durable), it rides on the vote's commit.
    let later = openraft::testing::log_id::<TypeConfig>(1, 1, 9);
    store.save_committed(Some(later)).await.unwrap();
    store.save_vote(&Vote::new(2, 1)).await.unwrap();
    assert_eq!(stored_committed(dir.path()), Some(later));
    assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_commit_index_on_disk_never_runs_ahead_of_the_entries_on_disk() {
    // A leader may count two followers' acks before its own append is written: the
    // commit index it knows then names an entry its log file does not hold yet.
    let dir = tempfile::tempdir().unwrap();
    let (mut store, syncs) = counted_store(dir.path());
    let ahead = openraft::testing::log_id::<TypeConfig>(1, 1, 3);
    store.save_committed(Some(ahead)).await.unwrap();
    store.save_vote(&Vote::new(1, 1)).await.unwrap();
    assert_eq!(stored_committed(dir.path()), None);
    let entries: Vec<Entry> = (1..=3).map(|i| entry(1, i, 10)).collect();
    store.append(entries, IOFlushed::noop()).await.unwrap();
    wait_for_syncs(&syncs, 2).await;
    assert_eq!(stored_committed(dir.path()), Some(ahead));
    drop(store);
    // And the log reopens with it.
    let reopened = LogStore::open(
        dir.path(),
        &dir.path().join("legacy.redb"),
        Arc::new(|_| {}),
        LEADER,
    );
    assert!(reopened.is_ok());
}

#[tokio::test]
async fn a_followers_append_is_durable_when_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = syncs.clone();
    let on_sync: SyncObserver = Arc::new(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let follower = LEADER + 1;
    let mut store = LogStore::open(
        dir.path(),
        &dir.path().join("legacy.redb"),
        on_sync,
        follower,
    )
    .unwrap();
    for round in 0..3 {
        // However long this machine's last fsync took (the rule has its own test).
        store.writer.last_sync_micros.store(0, Ordering::Relaxed);
        let (tx, mut rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        let entries: Vec<Entry> = (1..=4).map(|i| entry(1, round * 4 + i, 10)).collect();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        // Written by this call: no storage thread had to wake for it.
        assert!(
            matches!(rx.try_recv(), Ok(Ok(()))),
            "round {round}: not flushed when append returned"
        );
    }
    assert_eq!(syncs.load(Ordering::SeqCst), 3);
    drop(store);
    assert_eq!(replayed_indexes(dir.path()), (1..=12).collect::<Vec<u64>>());
}

#[tokio::test]
// The writer's mutex is held across the append on purpose: it stands for the storage thread
// in the middle of a write.
#[allow(clippy::await_holding_lock)]
async fn a_followers_append_waits_its_turn_while_the_storage_thread_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(
        dir.path(),
        &dir.path().join("legacy.redb"),
        Arc::new(|_| {}),
        LEADER + 1,
    )
    .unwrap();
    let oneshot = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot::<io::Result<()>>;
    let run = |from: u64| {
        (from..from + 4)
            .map(|i| entry(1, i, 10))
            .collect::<Vec<Entry>>()
    };
    let writer = store.writer.clone();
    let writing = writer.wal.lock().unwrap();
    let (tx, mut first) = oneshot();
    store.append(run(1), IOFlushed::signal(tx)).await.unwrap();
    assert!(
        first.try_recv().is_err(),
        "written past a write in progress"
    );
    assert_eq!(store.writer.queued.load(Ordering::SeqCst), 1);
    // The storage thread now holds the first run; the second must not be written before it.
    drop(writing);
    let (tx, second) = oneshot();
    store.append(run(5), IOFlushed::signal(tx)).await.unwrap();
    for (n, flushed) in [(1, first), (2, second)] {
        let flushed = tokio::time::timeout(Duration::from_secs(5), flushed).await;
        assert!(
            matches!(flushed, Ok(Ok(Ok(())))),
            "run {n} was never written"
        );
    }
    // Once the storage thread has nothing left, the caller writes again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.writer.queued.load(Ordering::SeqCst) != 0 {
        assert!(
            Instant::now() < deadline,
            "the storage thread never finished"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.writer.last_sync_micros.store(0, Ordering::Relaxed);
    let (tx, mut third) = oneshot();
    store.append(run(9), IOFlushed::signal(tx)).await.unwrap();
    assert!(
        matches!(third.try_recv(), Ok(Ok(()))),
        "not written by the caller"
    );
    drop(store);
    assert_eq!(replayed_indexes(dir.path()), (1..=12).collect::<Vec<u64>>());
}

#[tokio::test]
async fn only_a_followers_appends_on_a_quick_disk_are_written_by_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = counted_store(dir.path());
    let own = [entry(1, 1, 10)];
    let theirs = [Entry::new_normal(
        openraft::testing::log_id::<TypeConfig>(2, LEADER + 1, 1),
        Request {
            ts_ms: 0,
            command: ChatCommand::Join {
                session: "s".into(),
                room: "#r".into(),
            }
            .into(),
        },
    )];
    assert!(!store.may_write_here(&own), "a leader's own append");
    assert!(store.may_write_here(&theirs), "a follower's append");
    let slow = WRITE_HERE_MAX.as_micros() as u64 + 1;
    store.writer.last_sync_micros.store(slow, Ordering::Relaxed);
    assert!(
        !store.may_write_here(&theirs),
        "a follower's append on a slow disk"
    );
}

#[test]
fn the_bound_on_an_appends_bytes_covers_a_text_of_escapes() {
    // Every byte of this text is written as a six-byte escape.
    let mut escaped = entry(1, 1, 0);
    if let openraft::EntryPayload::Normal(request) = &mut escaped.payload {
        request.command = ChatCommand::Send {
            session: "\u{1}".repeat(64),
            id: "\u{1}".repeat(64),
            to: "#r".into(),
            text: "\u{1}".repeat(4000),
        }
        .into();
    }
    let committed = openraft::testing::log_id::<TypeConfig>(1, LEADER, 1);
    let written = serde_json::to_vec(&escaped).unwrap().len()
        + serde_json::to_vec(&Some(committed)).unwrap().len()
        + 2 * 9;
    assert!(
        encoded_bound(std::slice::from_ref(&escaped)) >= written as u64,
        "bound {} < {written}",
        encoded_bound(std::slice::from_ref(&escaped))
    );
}

#[tokio::test]
async fn a_followers_append_that_would_start_a_segment_goes_to_the_storage_thread() {
    let dir = tempfile::tempdir().unwrap();
    let writers = Arc::new(Mutex::new(Vec::new()));
    let seen = writers.clone();
    let on_sync: SyncObserver = Arc::new(move |_| {
        let name = std::thread::current().name().unwrap_or("").to_string();
        seen.lock().unwrap().push(name);
    });
    let mut store = LogStore::open(
        dir.path(),
        &dir.path().join("legacy.redb"),
        on_sync,
        LEADER + 1,
    )
    .unwrap();
    let by_storage_thread =
        |names: &[String]| names.iter().filter(|n| *n == "raft-log-sync").count();
    let mut index = 1;
    loop {
        let next = [entry(1, index, 10_000)];
        let fits = store
            .writer
            .wal
            .lock()
            .unwrap()
            .fits_in_segment(encoded_bound(&next));
        store.writer.last_sync_micros.store(0, Ordering::Relaxed);
        let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        store.append(next, IOFlushed::signal(tx)).await.unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert!(
            matches!(flushed, Ok(Ok(Ok(())))),
            "entry {index} never written"
        );
        let queued = by_storage_thread(&writers.lock().unwrap());
        index += 1;
        if !fits {
            assert_eq!(
                queued, 1,
                "the segment's last append was written by its caller"
            );
            break;
        }
        assert_eq!(queued, 0, "entry {} went to the storage thread", index - 1);
        assert!(index < 1000, "the first segment never filled");
    }
    drop(store);
    assert_eq!(
        replayed_indexes(dir.path()),
        (1..index).collect::<Vec<u64>>()
    );
}

#[test]
fn a_purge_and_a_truncation_drop_exactly_their_entries_and_their_bytes() {
    let mut mem = LogMem::default();
    let entries: Vec<Entry> = (1..=10).map(|i| entry(1, i, 10 * i as usize)).collect();
    mem.appended(&entries);
    let bytes_of = |range: std::ops::RangeInclusive<usize>| -> usize {
        entries[range.start() - 1..*range.end()]
            .iter()
            .map(approx_size)
            .sum()
    };
    let cached = |mem: &LogMem| mem.cache.keys().copied().collect::<Vec<_>>();
    assert_eq!(mem.cache_bytes, bytes_of(1..=10));
    mem.forget_upto(3);
    assert_eq!(cached(&mem), (4..=10).collect::<Vec<_>>());
    assert_eq!(mem.cache_bytes, bytes_of(4..=10));
    mem.forget_upto(3);
    assert_eq!(
        mem.cache_bytes,
        bytes_of(4..=10),
        "a second purge to the same index"
    );
    mem.forget_from(8);
    assert_eq!(cached(&mem), (4..=7).collect::<Vec<_>>());
    assert_eq!(mem.cache_bytes, bytes_of(4..=7));
    mem.forget_from(20);
    mem.forget_upto(7);
    assert!(mem.cache.is_empty());
    assert_eq!(mem.cache_bytes, 0);
}
