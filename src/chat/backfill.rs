//! Copying the history a snapshot skipped.
//!
//! A follower that falls behind the leader's purge point receives a snapshot of the chat state
//! only. The history between what it had applied and the snapshot (the *gap*, recorded durably
//! by `ChatStore::install`) is copied here from a peer, the leader first, one page of at most
//! 1,000 messages or 2 MiB at a time, over the raft port. Memory stays bounded by one page
//! whatever the history's size, and the time taken follows what the node missed, not the
//! whole history. Until the gap is closed the node answers `hello` and history requests with
//! `unavailable` and `/readyz` says why, so clients use a node that has the history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::store::ChatStore;
use crate::consensus::Consensus;

/// How long to wait before asking again when no peer could serve a page.
const RETRY: Duration = Duration::from_millis(200);

pub async fn run(store: Arc<ChatStore>, consensus: Arc<Consensus>, shutdown: CancellationToken) {
    loop {
        let Some(gap) = store.gap() else {
            tokio::select! {
                _ = store.gap_opened.notified() => continue,
                _ = shutdown.cancelled() => return,
            }
        };
        tracing::info!(
            after = gap.after,
            upto = gap.upto,
            "copying skipped history from peers"
        );
        let started = Instant::now();
        let mut pages = 0u64;
        let mut messages = 0u64;
        let mut current = Some(gap);
        while let Some(gap) = current {
            let mut filled = None;
            for peer in consensus.peers_leader_first() {
                let fetched = tokio::select! {
                    r = consensus.fetch_history(peer, gap.after, gap.upto) => r,
                    _ = shutdown.cancelled() => return,
                };
                match fetched {
                    Ok(page) => {
                        messages += page.messages.len() as u64;
                        let writer = store.clone();
                        let written =
                            tokio::task::spawn_blocking(move || writer.fill_gap(&page)).await;
                        match written {
                            Ok(Ok(next)) => filled = Some(next),
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "cannot store copied history")
                            }
                            Err(e) => tracing::error!(error = %e, "history copy task failed"),
                        }
                        break;
                    }
                    Err(why) => tracing::debug!(peer, %why, "peer cannot serve history yet"),
                }
            }
            match filled {
                Some(next) => {
                    pages += 1;
                    current = next;
                }
                None => {
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    current = store.gap();
                }
            }
        }
        tracing::info!(
            pages,
            messages,
            seconds = started.elapsed().as_secs_f64(),
            "history copied; serving clients again"
        );
    }
}
