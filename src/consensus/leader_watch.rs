//! Seeing a dead leader at once.
//!
//! openraft's followers wait `election_timeout_max` (their leader lease) plus a random
//! election timeout without heartbeats before they campaign, and refuse votes while their own
//! lease runs: 400–500 ms with no leader after a crash. But a leader process that died is
//! visible much sooner: its sockets are closed by the kernel and its port refuses connections.
//!
//! Each follower keeps one long-poll request open to the leader (`/raft/watch`; the leader
//! answers when it stops leading, or after `HOLD`). When that request fails, the follower
//! connects to the leader's raft port: *connection refused* means no process listens there,
//! so the follower campaigns at once as if the dead leader had handed leadership to it
//! (openraft's leadership transfer: voters grant the vote although their lease runs). Any
//! other outcome (a pause, a partition, a restarted leader) is left to the election timeouts.
//! Survivors campaign one after another (`STAGGER` apart, in id order) so two of them do not
//! split the vote; a survivor whose vote moved on in the meantime does nothing.
//!
//! Safety does not depend on any of this: a vote is still granted only to a candidate whose
//! log is at least as up to date, in a higher term.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::TransferLeaderRequest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Consensus;
use super::types::Vote;

/// How long the leader holds a watch request before answering anyway.
pub const HOLD: Duration = Duration::from_secs(20);
/// Between two survivors' campaigns after a crash.
const STAGGER: Duration = Duration::from_millis(60);
/// A connect to a live process on a reachable host answers well within this.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(serde::Serialize, serde::Deserialize)]
pub struct WatchAnswer {
    /// Who this node believes leads now.
    pub leader: Option<u64>,
}

/// The leader's side: answers when this node stops leading, raft stops, or after `HOLD`.
pub async fn hold(consensus: &Consensus) -> WatchAnswer {
    let id = consensus.id;
    consensus
        .wait_server(Some(HOLD), |m| m.current_leader != Some(id))
        .await;
    WatchAnswer {
        leader: consensus.status().leader,
    }
}

/// The follower's side: watches whoever leads until `shutdown`.
pub async fn run(consensus: Arc<Consensus>, shutdown: CancellationToken) {
    tokio::select! {
        _ = watch_leaders(&consensus) => {}
        _ = shutdown.cancelled() => {}
    }
}

async fn watch_leaders(consensus: &Consensus) {
    loop {
        let Some((leader, vote, addr)) = followed_leader(consensus) else {
            let id = consensus.id;
            consensus
                .wait_server(Some(Duration::from_secs(1)), |m| {
                    m.vote.committed && m.current_leader.is_some_and(|l| l != id)
                })
                .await;
            continue;
        };
        let answer = consensus
            .rpc
            .post::<_, WatchAnswer>(
                "watch",
                leader,
                &addr,
                "/raft/watch",
                &(),
                HOLD + Duration::from_secs(5),
                &[],
            )
            .await;
        if answer.is_ok() {
            continue;
        }
        if is_refused(&addr).await && followed_leader(consensus).is_some_and(|f| f.1 == vote) {
            tracing::info!(
                leader,
                "the leader's raft port refuses connections: campaigning now"
            );
            campaign_after_crash(consensus, leader, vote).await;
        } else {
            // Alive, paused or cut off: the election timeouts decide. Do not spin.
            consensus.status_changed(Duration::from_millis(100)).await;
        }
    }
}

/// The leader this follower follows (by committed vote), its vote and raft address.
fn followed_leader(consensus: &Consensus) -> Option<(u64, Vote, String)> {
    let metrics = consensus.raft.metrics();
    let m = metrics.borrow_watched();
    let leader = m.current_leader?;
    if leader == consensus.id || !m.vote.committed {
        return None;
    }
    let addr = m
        .membership_config
        .nodes()
        .find(|(id, _)| **id == leader)
        .map(|(_, n)| n.raft.clone())?;
    Some((leader, m.vote, addr))
}

async fn is_refused(addr: &str) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

async fn campaign_after_crash(consensus: &Consensus, dead: u64, vote: Vote) {
    let rank = {
        let metrics = consensus.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != dead)
            .position(|id| id == consensus.id)
    };
    let Some(rank) = rank else {
        return; // A learner does not campaign.
    };
    tokio::time::sleep(STAGGER * rank as u32).await;
    // Someone else campaigned meanwhile (this node's vote moved on): leave it to them.
    if followed_leader(consensus).is_none_or(|f| f.1 != vote) {
        return;
    }
    // As if the dead leader had handed over to this node; the last log id is this node's own,
    // so nothing is awaited.
    let request = TransferLeaderRequest::new(vote, consensus.id, None);
    match consensus.raft.handle_transfer_leader(request).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "campaign after the leader crashed refused"),
        Err(e) => tracing::debug!(error = %e, "raft stopped"),
    }
    // Give the election a moment before watching again.
    consensus.status_changed(Duration::from_millis(200)).await;
}
