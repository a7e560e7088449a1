//! openraft's state machine over the chat store.
//!
//! Durability: messages are written to the history without an fsync, after the apply that
//! answered their writers (by the history's writer thread; a snapshot or an install first
//! waits for it); the chat state lives in memory. A snapshot first makes the
//! history durable, then writes the chat state and its meta to `snapshot.json` (see
//! `snapshot_store`). After a crash the node restores that
//! snapshot and openraft re-applies the log above it (the log is never purged past a durable
//! snapshot), so nothing committed is lost and re-written messages are identical.
//!
//! A snapshot carries no history. Installing one from the leader records the skipped history
//! range as a gap in the history store *before* the snapshot file is replaced, and
//! `chat::backfill` copies that range from a peer in pages.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};

use super::log_store::SyncObserver;
use super::snapshot_store::{SnapshotBlob, SnapshotStore, read_blob};
use super::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use crate::chat::command::ChatResponse;
use crate::chat::store::{AppliedEntry, ChatStore};

pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotBlob>;

#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

struct Inner {
    chat: Arc<ChatStore>,
    snapshots: Arc<SnapshotStore>,
    applied: Mutex<Applied>,
    on_built: SyncObserver,
}

#[derive(Clone, Default)]
struct Applied {
    last: Option<LogId>,
    membership: StoredMembership,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

fn index_of(meta: &SnapshotMeta) -> u64 {
    meta.last_log_id.as_ref().map_or(0, |l| l.index())
}

impl StateMachine {
    /// Restores the last snapshot in `dir`, if any, into `chat`.
    pub fn open(
        dir: &Path,
        chat: Arc<ChatStore>,
        on_built: SyncObserver,
    ) -> io::Result<StateMachine> {
        let (snapshots, restored) = SnapshotStore::open(dir)?;
        let mut applied = Applied::default();
        if let Some((meta, state)) = restored {
            chat.install(state, index_of(&meta), false)
                .map_err(io_err)?;
            applied.last = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
        }
        Ok(StateMachine {
            inner: Arc::new(Inner {
                chat,
                snapshots: Arc::new(snapshots),
                applied: Mutex::new(applied),
                on_built,
            }),
        })
    }

    /// The log id of the last durable snapshot, if any.
    pub fn snapshot_log_id(&self) -> Option<LogId> {
        self.inner
            .snapshots
            .current_meta()
            .and_then(|m| m.last_log_id)
    }

    /// Where received snapshots are stored.
    pub fn snapshots(&self) -> Arc<SnapshotStore> {
        self.inner.snapshots.clone()
    }

    fn applied(&self) -> MutexGuard<'_, Applied> {
        self.inner.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the history holds everything applied; a failed history write fails it.
    async fn history_written(&self) -> io::Result<()> {
        let chat = &self.inner.chat;
        chat.history_ready(chat.applied()).await.map_err(io_err)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotBlob;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let a = self.applied();
        Ok((a.last, a.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.try_next().await? {
            batch.push(item);
        }
        let Some((last, _)) = batch.last() else {
            return Ok(());
        };
        let last_log_id = last.log_id();
        let mut membership = None;
        for (entry, _) in &batch {
            if let EntryPayload::Membership(m) = &entry.payload {
                membership = Some(StoredMembership::new(Some(entry.log_id()), m.clone()));
            }
        }
        let applied: Vec<AppliedEntry<'_>> = batch
            .iter()
            .map(|(entry, _)| match &entry.payload {
                EntryPayload::Normal(req) => AppliedEntry {
                    index: entry.index(),
                    ts_ms: req.ts_ms,
                    command: Some(&*req.command),
                },
                _ => AppliedEntry {
                    index: entry.index(),
                    ts_ms: 0,
                    command: None,
                },
            })
            .collect();
        // In memory only: the history writer's thread writes the messages afterwards.
        let outcome = self.inner.chat.apply(&applied).map_err(io_err)?;
        drop(applied);
        {
            let mut a = self.applied();
            a.last = Some(last_log_id);
            if let Some(m) = membership {
                a.membership = m;
            }
        }
        for ((_, responder), response) in batch.into_iter().zip(outcome.responses) {
            if let Some(responder) = responder {
                responder.send(response.unwrap_or(ChatResponse::Done));
            }
        }
        if outcome.backlog {
            // The history writer is far behind (a slow disk): wait rather than queue more.
            self.history_written().await?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called in sequence with `apply`, so the state is a consistent point in time. It is
        // written to a temporary file right here, from the live state: no copy of it is held
        // in memory while the snapshot is completed.
        let started = std::time::Instant::now();
        // The snapshot's messages must be in the history before `build_snapshot` flushes it.
        let history = self.history_written().await;
        let a = self.applied().clone();
        let meta = SnapshotMeta {
            last_log_id: a.last,
            last_membership: a.membership,
        };
        let inner = self.inner.clone();
        let written_meta = meta.clone();
        let written = match history {
            Ok(()) => {
                blocking(move || {
                    let state = inner.chat.state();
                    inner.snapshots.write_temporary(&written_meta, &state)
                })
                .await
            }
            Err(e) => Err(e),
        };
        SnapshotBuilder {
            sm: self.clone(),
            written: Some(written),
            meta,
            started,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotBlob,
    ) -> Result<(), io::Error> {
        self.history_written().await?;
        let inner = self.inner.clone();
        let meta_copy = meta.clone();
        blocking(move || {
            let (file_meta, state) = read_blob(&snapshot)?;
            if file_meta != meta_copy {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "received snapshot's file does not match its meta",
                ));
            }
            // The gap is recorded before the snapshot file moves: a crash in between leaves
            // the old snapshot with a gap to copy, never a new snapshot without one.
            inner
                .chat
                .install(state, index_of(&meta_copy), true)
                .map_err(io_err)?;
            inner.snapshots.commit_incoming(&meta_copy, &snapshot)
        })
        .await?;
        let mut a = self.applied();
        a.last = meta.last_log_id;
        a.membership = meta.last_membership.clone();
        tracing::info!(index = index_of(meta), "installed snapshot from leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let snapshots = self.inner.snapshots.clone();
        let current = blocking(move || snapshots.current()).await?;
        Ok(current.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

pub struct SnapshotBuilder {
    sm: StateMachine,
    /// The state's temporary file, written when the builder was made.
    written: Option<io::Result<std::path::PathBuf>>,
    meta: SnapshotMeta,
    started: std::time::Instant,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotBlob;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let inner = self.sm.inner.clone();
        let meta = self.meta.clone();
        let tmp = self
            .written
            .take()
            .unwrap_or_else(|| Err(io::Error::other("snapshot builder used twice")))?;
        let (written, current) = blocking(move || {
            // Every message up to the snapshot must be durable before the log behind it can go.
            inner.chat.history().flush().map_err(io_err)?;
            let written = inner.snapshots.commit_temporary(&meta, &tmp)?;
            Ok((written, inner.snapshots.current()?))
        })
        .await?;
        let Some((meta, snapshot)) = current else {
            return Err(io::Error::other("snapshot vanished after it was written"));
        };
        if written {
            (self.sm.inner.on_built)(self.started.elapsed());
            tracing::info!(index = index_of(&meta), "built snapshot");
        } else {
            tracing::info!(
                index = index_of(&meta),
                "a newer snapshot was already in place; kept it"
            );
        }
        Ok(Snapshot { meta, snapshot })
    }
}

#[cfg(test)]
mod tests {
    //! The snapshot defects of the long-lived-cluster issue, each reproduced at the state
    //! machine: meta and state must travel together, an older snapshot must never replace a
    //! newer one, and a snapshot carries no history.
    use super::*;
    use crate::chat::command::ChatCommand;
    use crate::chat::history::History;
    use crate::chat::state::ChatState;
    use crate::consensus::types::{Entry, Request};
    use openraft::entry::RaftEntry;

    fn store(dir: &Path) -> Arc<ChatStore> {
        let history = History::open(&dir.join("h.redb"), 1 << 20).unwrap();
        Arc::new(ChatStore::new(history, 1024).unwrap())
    }

    /// Entry `index` attaches user `u{index}` (so a state shows which index it reflects).
    fn entry(index: u64) -> Entry {
        let command = ChatCommand::Attach {
            session: format!("s{index}"),
            user: format!("u{index}"),
            node: 1,
            replaces: None,
            resume: None,
            adopt: false,
            authenticated: false,
        };
        Entry::new_normal(
            openraft::testing::log_id::<TypeConfig>(1, 1, index),
            Request {
                ts_ms: 0,
                command: command.into(),
            },
        )
    }

    async fn apply(sm: &mut StateMachine, range: std::ops::RangeInclusive<u64>) {
        let entries: Vec<io::Result<EntryResponder<TypeConfig>>> =
            range.map(|i| Ok((entry(i), None))).collect();
        sm.apply(futures_util::stream::iter(entries)).await.unwrap();
    }

    /// The highest `u{n}` session a state holds: the index it reflects.
    fn reflects(state: &ChatState) -> u64 {
        (1..=1000)
            .rev()
            .find(|i| state.holder_of(&format!("u{i}")).is_some())
            .unwrap_or(0)
    }

    fn current(dir: &Path) -> (SnapshotMeta, ChatState) {
        let file = std::fs::File::open(dir.join("snapshot.json")).unwrap();
        super::super::snapshot_store::read_file(&file, &dir.join("snapshot.json")).unwrap()
    }

    #[tokio::test]
    async fn an_older_build_finishing_late_never_replaces_a_newer_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), store(dir.path()), Arc::new(|_| {})).unwrap();
        apply(&mut sm, 1..=5).await;
        let mut older = sm.get_snapshot_builder().await;
        apply(&mut sm, 6..=9).await;
        let mut newer = sm.get_snapshot_builder().await;
        newer.build_snapshot().await.unwrap();
        // The slow build of index 5 finishes after the build of index 9.
        let built = older.build_snapshot().await.unwrap();
        assert_eq!(index_of(&built.meta), 9, "the newer snapshot stays current");
        let (meta, state) = current(dir.path());
        assert_eq!((index_of(&meta), reflects(&state)), (9, 9));
        // And the node restarts on it.
        drop((sm, older, newer));
        let sm = StateMachine::open(dir.path(), store(dir.path()), Arc::new(|_| {})).unwrap();
        assert_eq!(sm.snapshot_log_id().map(|l| l.index()), Some(9));
    }

    #[tokio::test]
    async fn an_install_is_not_undone_by_a_build_that_started_before_it() {
        let leader_dir = tempfile::tempdir().unwrap();
        let mut leader = StateMachine::open(
            leader_dir.path(),
            store(leader_dir.path()),
            Arc::new(|_| {}),
        )
        .unwrap();
        apply(&mut leader, 1..=20).await;
        leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let sent = leader.get_current_snapshot().await.unwrap().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut follower =
            StateMachine::open(dir.path(), store(dir.path()), Arc::new(|_| {})).unwrap();
        apply(&mut follower, 1..=3).await;
        let mut stale = follower.get_snapshot_builder().await;
        // The leader's snapshot arrives as a file in the data directory.
        let incoming = follower.snapshots().incoming_path();
        let mut src = sent.snapshot.file;
        let mut dst = std::fs::File::create(&incoming).unwrap();
        std::io::copy(&mut src, &mut dst).unwrap();
        let blob = SnapshotBlob {
            file: std::fs::OpenOptions::new()
                .read(true)
                .open(&incoming)
                .unwrap(),
            incoming: Some(incoming),
        };
        follower.install_snapshot(&sent.meta, blob).await.unwrap();
        stale.build_snapshot().await.unwrap();
        let got = follower.get_current_snapshot().await.unwrap().unwrap();
        let (meta, state) = super::super::snapshot_store::read_blob(&got.snapshot).unwrap();
        assert_eq!(got.meta, meta, "meta and state come from one file");
        assert_eq!((index_of(&meta), reflects(&state)), (20, 20));
        // The history the snapshot skipped is recorded as a gap to copy.
        let gap = follower.inner.chat.gap().unwrap();
        assert_eq!((gap.after, gap.upto), (3, 20));
    }

    #[tokio::test]
    async fn current_snapshot_meta_always_matches_its_state_under_concurrent_builds() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), store(dir.path()), Arc::new(|_| {})).unwrap();
        let reader = sm.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_reading = stop.clone();
        let checks = tokio::spawn(async move {
            let mut reader = reader;
            let mut seen = 0;
            while !stop_reading.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(s) = reader.get_current_snapshot().await.unwrap() {
                    let (_, state) = read_blob(&s.snapshot).unwrap();
                    assert_eq!(
                        reflects(&state),
                        index_of(&s.meta),
                        "meta paired with another state"
                    );
                    seen += 1;
                }
                tokio::task::yield_now().await;
            }
            seen
        });
        let mut builds = Vec::new();
        for i in 1..=40 {
            apply(&mut sm, i..=i).await;
            let mut builder = sm.get_snapshot_builder().await;
            builds.push(tokio::spawn(async move {
                builder.build_snapshot().await.unwrap()
            }));
        }
        for b in builds {
            b.await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(checks.await.unwrap() > 0);
        let (meta, state) = current(dir.path());
        assert_eq!((index_of(&meta), reflects(&state)), (40, 40));
    }

    /// Messages reach the history after their apply answered: a reader that waits for the
    /// applied index finds every one, and a snapshot built right after flushes them all.
    #[tokio::test]
    async fn history_readers_see_every_applied_message() {
        let dir = tempfile::tempdir().unwrap();
        let chat = store(dir.path());
        let mut sm = StateMachine::open(dir.path(), chat.clone(), Arc::new(|_| {})).unwrap();
        apply(&mut sm, 1..=1).await;
        let join = ChatCommand::Join {
            session: "s1".into(),
            room: "#r".into(),
        };
        let normal = |index: u64, command: ChatCommand| {
            Ok((
                Entry::new_normal(
                    openraft::testing::log_id::<TypeConfig>(1, 1, index),
                    Request {
                        ts_ms: 0,
                        command: command.into(),
                    },
                ),
                None,
            ))
        };
        sm.apply(futures_util::stream::iter(vec![normal(2, join)]))
            .await
            .unwrap();
        for round in 0..20u64 {
            let entries: Vec<io::Result<EntryResponder<TypeConfig>>> = (0..5u64)
                .map(|i| {
                    let index = 3 + round * 5 + i;
                    let send = ChatCommand::Send {
                        session: "s1".into(),
                        id: index.to_string(),
                        to: "#r".into(),
                        text: "x".into(),
                    };
                    normal(index, send)
                })
                .collect();
            sm.apply(futures_util::stream::iter(entries)).await.unwrap();
            let applied = chat.applied();
            chat.history_ready(applied).await.unwrap();
            let stored = chat
                .history()
                .count_missed(&["#r".to_string()], 0, applied)
                .unwrap();
            assert_eq!(stored, (round + 1) * 5, "after applying up to {applied}");
        }
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        drop(sm);
        // Reopened without the log: the flushed history holds all 100.
        drop(chat);
        let reopened = store(dir.path());
        let stored = reopened
            .history()
            .count_missed(&["#r".to_string()], 0, 200)
            .unwrap();
        assert_eq!(stored, 100);
    }

    #[tokio::test]
    async fn a_snapshot_holds_no_history() {
        let dir = tempfile::tempdir().unwrap();
        let chat = store(dir.path());
        let mut sm = StateMachine::open(dir.path(), chat, Arc::new(|_| {})).unwrap();
        apply(&mut sm, 1..=1).await;
        let join = ChatCommand::Join {
            session: "s1".into(),
            room: "#r".into(),
        };
        let mut entries: Vec<io::Result<EntryResponder<TypeConfig>>> = vec![Ok((
            Entry::new_normal(
                openraft::testing::log_id::<TypeConfig>(1, 1, 2),
                Request {
                    ts_ms: 0,
                    command: join.into(),
                },
            ),
            None,
        ))];
        for i in 3..=200u64 {
            let send = ChatCommand::Send {
                session: "s1".into(),
                id: i.to_string(),
                to: "#r".into(),
                text: "x".repeat(10_000),
            };
            entries.push(Ok((
                Entry::new_normal(
                    openraft::testing::log_id::<TypeConfig>(1, 1, i),
                    Request {
                        ts_ms: 0,
                        command: send.into(),
                    },
                ),
                None,
            )));
        }
        sm.apply(futures_util::stream::iter(entries)).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let size = std::fs::metadata(dir.path().join("snapshot.json"))
            .unwrap()
            .len();
        // ~2 MB of messages; the snapshot is the state (one session, its dedup window).
        assert!(size < 64 * 1024, "snapshot is {size} bytes");
    }
}
