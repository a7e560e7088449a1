//! The one place that turns raft's view into leadership events: leader changed, leader lost,
//! failover completed. It also keeps the raft gauges current.
//!
//! A leader counts as lost when this node knows none, or when the health prober marks the
//! known leader down (openraft keeps naming a dead leader until its own election timer fires).
//! A failover is a new leader after a loss, never the first election; its duration runs from
//! the last message this node got from the lost leader to knowing the new one. A change that
//! follows an announced leadership transfer is planned, not a failover. Regaining the same
//! leader in the same term (this node was paused or cut off, the cluster was not) is a
//! recovery: no leader change, no failover. Leaderless time runs from the last contact with
//! the lost leader, so it is the whole gap, not only the part after the loss was noticed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::consensus::{Consensus, RaftStatus, Role};
use crate::health::HealthTable;
use crate::telemetry::{self, metrics::Metrics};

/// A transfer announced this recently explains the next leader change.
const TRANSFER_WINDOW: Duration = Duration::from_secs(5);
/// A leader heard from this recently has not been away (two heartbeats).
const RECENT_CONTACT: Duration = Duration::from_millis(100);
/// How often leaderless time and the leader's health are re-checked without raft news.
const TICK: Duration = Duration::from_millis(50);

/// The leader this node can count on: itself while it holds its lease, or a peer that
/// `alive` vouches for. openraft alone is not enough: with Pre-Vote a cut-off follower keeps
/// naming its old leader, and a TCP probe cannot tell a paused peer from a live one.
pub fn effective_leader(status: &RaftStatus, alive: impl Fn(u64) -> bool) -> Option<u64> {
    match status.leader {
        Some(l) if l == status.id => status.leader_lease_valid.then_some(l),
        Some(l) => alive(l).then_some(l),
        None => None,
    }
}

/// Whether a peer leader is alive: the health prober sees it up and it was heard from within
/// `stale_after` (leaders send heartbeats every `raft.heartbeat_ms`).
pub struct LeaderLiveness {
    pub consensus: Arc<Consensus>,
    pub health: Arc<HealthTable>,
    pub stale_after: Duration,
}

impl LeaderLiveness {
    pub fn alive(&self, leader: u64) -> bool {
        self.health.is_up(leader)
            && self
                .consensus
                .last_contact(leader)
                .is_some_and(|t| t.elapsed() < self.stale_after)
    }

    pub fn leader(&self, status: &RaftStatus) -> Option<u64> {
        effective_leader(status, |l| self.alive(l))
    }
}

/// What happened, for logs, metrics and spans.
#[derive(Debug, Clone, PartialEq)]
pub enum LeadershipEvent {
    Changed {
        term: u64,
        previous: Option<u64>,
        new: u64,
    },
    Lost {
        previous: u64,
    },
    Failover {
        previous: Option<u64>,
        new: u64,
        duration: Duration,
    },
    PlannedTransfer {
        previous: Option<u64>,
        new: u64,
    },
    /// The lost leader is back, in the term it was lost in.
    Recovered {
        leader: u64,
        after: Duration,
    },
}

/// The tracker's memory between observations.
#[derive(Default)]
pub struct Tracker {
    /// The healthy leader this node follows, with the term it was adopted in.
    current: Option<(u64, u64)>,
    /// A leader was known before (so the next change is not the first election).
    had_leader: bool,
    /// When the lost leader was last heard from.
    lost_since: Option<Instant>,
    /// The lost leader and the term it led.
    lost_leader: Option<(u64, u64)>,
    last_observed: Option<Instant>,
}

impl Tracker {
    /// Feeds one observation; returns the events it implies. `alive` says whether a peer
    /// leader is alive; `last_contact` when a leader was last heard from; `transfer` when a
    /// planned transfer was last announced.
    pub fn observe(
        &mut self,
        status: &RaftStatus,
        now: Instant,
        alive: impl Fn(u64) -> bool,
        last_contact: impl Fn(u64) -> Option<Instant>,
        transfer: Option<Instant>,
    ) -> (Vec<LeadershipEvent>, Duration) {
        let me = status.id;
        let mut leaderless_for = match (self.current, self.last_observed) {
            (None, Some(last)) => now.saturating_duration_since(last),
            _ => Duration::ZERO,
        };
        self.last_observed = Some(now);
        let effective = effective_leader(status, alive);
        let mut events = Vec::new();
        let changed = match (self.current, effective) {
            (Some((old, term)), Some(new)) if old == new && status.term > term && new != me => {
                // Re-elected in a new term. Heard from a moment ago, it never went away: no
                // change and no failover, only the term moves on. Not heard from for longer,
                // it may have restarted and won again: a change.
                let heard = last_contact(new)
                    .is_some_and(|t| now.saturating_duration_since(t) < RECENT_CONTACT);
                if heard {
                    self.current = Some((new, status.term));
                }
                !heard
            }
            (Some((old, _)), Some(new)) => old != new,
            (None, Some(_)) => true,
            (Some(_), None) => {
                let (previous, term) = self.current.take().unwrap_or_default();
                self.lost_leader = Some((previous, term));
                let since = last_contact(previous).unwrap_or(now).min(now);
                self.lost_since = Some(since);
                // Leaderless since the last contact, not since the loss was noticed.
                leaderless_for += now.saturating_duration_since(since);
                events.push(LeadershipEvent::Lost { previous });
                false
            }
            (None, None) => false,
        };
        if changed
            && let Some(new) = effective
            && self.current.is_none()
            && self.lost_leader == Some((new, status.term))
        {
            // The same leader in the same term: this node lost contact, the cluster did not
            // change leaders.
            let since = self.lost_since.unwrap_or(now);
            events.push(LeadershipEvent::Recovered {
                leader: new,
                after: now.saturating_duration_since(since),
            });
            self.current = Some((new, status.term));
            self.lost_since = None;
            self.lost_leader = None;
            return (events, leaderless_for);
        }
        if changed && let Some(new) = effective {
            let previous = self
                .current
                .map(|(l, _)| l)
                .or(self.lost_leader.map(|(l, _)| l));
            events.push(LeadershipEvent::Changed {
                term: status.term,
                previous,
                new,
            });
            if self.had_leader {
                let planned =
                    transfer.is_some_and(|t| now.saturating_duration_since(t) < TRANSFER_WINDOW);
                if planned {
                    events.push(LeadershipEvent::PlannedTransfer { previous, new });
                } else {
                    let since = self
                        .lost_since
                        .or_else(|| previous.and_then(&last_contact))
                        .unwrap_or(now)
                        .min(now);
                    if self.lost_since.is_none() {
                        // Replaced without a leaderless observation in between.
                        leaderless_for += now.saturating_duration_since(since);
                    }
                    events.push(LeadershipEvent::Failover {
                        previous,
                        new,
                        duration: now.saturating_duration_since(since),
                    });
                }
            }
            self.current = Some((new, status.term));
            self.had_leader = true;
            self.lost_since = None;
            self.lost_leader = None;
        }
        (events, leaderless_for)
    }

    pub fn has_leader(&self) -> Option<u64> {
        self.current.map(|(l, _)| l)
    }
}

/// Runs the tracker until `shutdown`, publishing metrics, logs and spans.
pub async fn run(liveness: LeaderLiveness, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let consensus = liveness.consensus.clone();
    let mut tracker = Tracker::default();
    let mut watch = consensus.watch();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            alive = watch.changed() => if !alive { return },
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let status = consensus.status();
        let (events, leaderless) = tracker.observe(
            &status,
            Instant::now(),
            |l| liveness.alive(l),
            |l| consensus.last_contact(l),
            consensus.transfer_announced(),
        );
        let peers: Vec<u64> = consensus
            .peer_chat_addrs()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        publish_gauges(&metrics, &status, tracker.has_leader(), &peers);
        if !leaderless.is_zero() {
            metrics.leaderless_seconds.inc_by(leaderless.as_secs_f64());
        }
        // A leader change that ends a failover lasted as long as the failover.
        let gap = events.iter().find_map(|e| match e {
            LeadershipEvent::Failover { duration, .. } => Some(*duration),
            _ => None,
        });
        for event in events {
            report(&metrics, &event, gap.unwrap_or_default());
        }
    }
}

fn publish_gauges(metrics: &Metrics, status: &RaftStatus, leader: Option<u64>, peers: &[u64]) {
    metrics.raft_term.set(status.term as i64);
    metrics
        .raft_is_leader
        .set(i64::from(status.role == Role::Leader));
    metrics.raft_has_leader.set(i64::from(leader.is_some()));
    metrics.raft_leader_id.set(leader.unwrap_or(0) as i64);
    metrics
        .raft_last_log_index
        .set(status.last_log_index as i64);
    metrics.raft_applied_index.set(status.applied_index as i64);
    metrics.raft_commit_index.set(status.commit_index as i64);
    metrics.raft_voters.set(status.voters as i64);
    for peer in peers {
        let lag = status.replication_lag.get(peer).copied().unwrap_or(0);
        metrics
            .raft_replication_lag
            .with_label_values(&[&peer.to_string()])
            .set(lag as i64);
    }
}

/// Logs, counts and traces one event. Leader-change and failover spans cover the real
/// interval (`gap`: from the last contact with the lost leader to knowing the new one).
fn report(metrics: &Metrics, event: &LeadershipEvent, gap: Duration) {
    use opentelemetry::KeyValue;
    let id = |l: &Option<u64>| l.unwrap_or(0);
    match event {
        LeadershipEvent::Changed {
            term,
            previous,
            new,
        } => {
            metrics.raft_leader_changes.inc();
            telemetry::interval_span(
                "raft.leader_change",
                gap,
                vec![
                    KeyValue::new("term", *term as i64),
                    KeyValue::new("previous", id(previous) as i64),
                    KeyValue::new("new", *new as i64),
                ],
            );
            tracing::info!(term, previous = id(previous), new, "leader changed");
        }
        LeadershipEvent::Lost { previous } => {
            metrics.raft_leader_lost.inc();
            tracing::warn!(previous, "leader lost");
        }
        LeadershipEvent::Recovered { leader, after } => {
            metrics.raft_leader_recovered.inc();
            tracing::info!(
                leader,
                after_ms = after.as_secs_f64() * 1000.0,
                "leader reachable again (same leader, same term)"
            );
        }
        LeadershipEvent::Failover {
            previous,
            new,
            duration,
        } => {
            metrics.failovers.inc();
            metrics.failover_duration.observe(duration.as_secs_f64());
            let ms = duration.as_secs_f64() * 1000.0;
            telemetry::interval_span(
                "raft.failover",
                *duration,
                vec![
                    KeyValue::new("previous", id(previous) as i64),
                    KeyValue::new("new", *new as i64),
                    KeyValue::new("duration_ms", ms),
                ],
            );
            tracing::info!(
                previous = id(previous),
                new,
                duration_ms = ms,
                "failover completed"
            );
        }
        LeadershipEvent::PlannedTransfer { previous, new } => {
            metrics
                .raft_leader_transfers
                .with_label_values(&["planned"])
                .inc();
            tracing::info!(
                previous = id(previous),
                new,
                "leadership handed over as planned"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn status(leader: Option<u64>, term: u64) -> RaftStatus {
        RaftStatus {
            id: 1,
            role: Role::Follower,
            term,
            leader,
            commit_index: 0,
            applied_index: 0,
            last_log_index: 0,
            snapshot_index: 0,
            purged_index: 0,
            replication_lag: BTreeMap::new(),
            leader_lease_valid: true,
            fatal: None,
            voters: 3,
        }
    }

    #[test]
    fn first_election_is_a_change_not_a_failover() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let (events, _) = t.observe(&status(Some(2), 1), now, |_| true, |_| None, None);
        assert_eq!(
            events,
            vec![LeadershipEvent::Changed {
                term: 1,
                previous: None,
                new: 2
            }]
        );
    }

    #[test]
    fn failover_is_timed_from_the_last_contact_with_the_old_leader() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.observe(&status(Some(2), 1), t0, |_| true, |_| None, None);
        let contact = t0 + Duration::from_millis(100);
        // The old leader is replaced directly (no leaderless observation in between).
        let now = t0 + Duration::from_millis(500);
        let (events, _) = t.observe(
            &status(Some(3), 2),
            now,
            |_| true,
            |l| (l == 2).then_some(contact),
            None,
        );
        assert!(events.contains(&LeadershipEvent::Failover {
            previous: Some(2),
            new: 3,
            duration: Duration::from_millis(400)
        }));
    }

    #[test]
    fn a_leader_marked_down_is_lost_and_leaderless_time_counts() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.observe(&status(Some(2), 1), t0, |_| true, |_| None, None);
        let (events, _) = t.observe(
            &status(Some(2), 1),
            t0 + Duration::from_secs(1),
            |p| p != 2,
            |_| None,
            None,
        );
        assert_eq!(events, vec![LeadershipEvent::Lost { previous: 2 }]);
        let (_, leaderless) = t.observe(
            &status(None, 2),
            t0 + Duration::from_secs(2),
            |p| p != 2,
            |_| None,
            None,
        );
        assert_eq!(leaderless, Duration::from_secs(1));
        let (events, _) = t.observe(
            &status(Some(3), 2),
            t0 + Duration::from_secs(3),
            |p| p != 2,
            |_| None,
            None,
        );
        assert!(matches!(
            events[1],
            LeadershipEvent::Failover {
                previous: Some(2),
                new: 3,
                ..
            }
        ));
    }

    #[test]
    fn the_same_leader_regained_in_its_term_is_a_recovery_not_a_failover() {
        // A paused follower: the leader looks dead to it, then is heard from again.
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.observe(&status(Some(2), 4), t0, |_| true, |_| None, None);
        let contact = t0 + Duration::from_millis(100);
        let lost_at = t0 + Duration::from_millis(1600);
        let (events, leaderless) = t.observe(
            &status(Some(2), 4),
            lost_at,
            |_| false,
            |_| Some(contact),
            None,
        );
        assert_eq!(events, vec![LeadershipEvent::Lost { previous: 2 }]);
        assert_eq!(
            leaderless,
            Duration::from_millis(1500),
            "counted from the last contact"
        );
        let (events, leaderless) = t.observe(
            &status(Some(2), 4),
            lost_at + Duration::from_millis(20),
            |_| true,
            |_| Some(lost_at),
            None,
        );
        assert_eq!(
            events,
            vec![LeadershipEvent::Recovered {
                leader: 2,
                after: Duration::from_millis(1520)
            }]
        );
        assert_eq!(leaderless, Duration::from_millis(20));
        // A later real change still counts as a failover.
        let (events, _) = t.observe(
            &status(Some(3), 5),
            lost_at + Duration::from_secs(5),
            |_| true,
            |_| None,
            None,
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, LeadershipEvent::Failover { .. }))
        );
    }

    #[test]
    fn the_same_leader_in_a_new_term_is_a_change() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.observe(&status(Some(2), 4), t0, |_| true, |_| None, None);
        t.observe(
            &status(Some(2), 4),
            t0 + Duration::from_secs(1),
            |_| false,
            |_| None,
            None,
        );
        let (events, _) = t.observe(
            &status(Some(2), 5),
            t0 + Duration::from_secs(2),
            |_| true,
            |_| None,
            None,
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, LeadershipEvent::Changed { term: 5, .. }))
        );
    }

    #[test]
    fn the_same_leader_re_elected_while_in_contact_is_no_change() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.observe(&status(Some(2), 4), t0, |_| true, |_| None, None);
        let later = t0 + Duration::from_secs(1);
        let (events, leaderless) = t.observe(
            &status(Some(2), 5),
            later,
            |_| true,
            |_| Some(later - Duration::from_millis(1)),
            None,
        );
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(leaderless, Duration::ZERO);
        // Later it goes away, and another node takes over: one failover, from 2.
        let (events, _) = t.observe(
            &status(Some(3), 6),
            later + Duration::from_secs(1),
            |_| true,
            |_| Some(later),
            None,
        );
        assert!(events.iter().any(|e| matches!(
            e,
            LeadershipEvent::Failover {
                previous: Some(2),
                new: 3,
                ..
            }
        )));
    }

    #[test]
    fn an_announced_transfer_is_planned() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.observe(&status(Some(2), 1), t0, |_| true, |_| None, None);
        let (events, _) = t.observe(
            &status(Some(3), 2),
            t0 + Duration::from_secs(1),
            |_| true,
            |_| None,
            Some(t0),
        );
        assert!(events.contains(&LeadershipEvent::PlannedTransfer {
            previous: Some(2),
            new: 3
        }));
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, LeadershipEvent::Failover { .. }))
        );
    }
}
