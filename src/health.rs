//! The peer prober: a TCP connect to every peer's chat port on a schedule, and the table of
//! which peers are up. A peer goes down after `failures_before_down` failures in a row and
//! comes back up after one success. The peers are the Raft membership's other members, read
//! again every round: a node added with `raftchat admin add-node` is probed from then on, and
//! a removed one is forgotten.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::HealthConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerHealth {
    pub up: bool,
    pub consecutive_failures: u32,
    pub last_probe: Option<Instant>,
}

/// What the prober reports, for telemetry.
#[derive(Debug, Clone, Copy)]
pub enum ProbeEvent {
    /// `peer` joined the membership; it is probed from now on.
    Added(u64),
    /// `peer` left the membership; nothing more is reported about it.
    Removed(u64),
    Probed(ProbeOutcome),
}

/// What a probe saw, for telemetry.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOutcome {
    pub peer: u64,
    pub success: bool,
    pub duration: Duration,
    /// `Some(up)` when this probe changed the peer's state.
    pub transition: Option<bool>,
}

pub type ProbeObserver = Arc<dyn Fn(&ProbeEvent) + Send + Sync>;

/// The peers to probe now, with their chat addresses (the membership minus this node).
pub type PeerSource = Arc<dyn Fn() -> Vec<(u64, String)> + Send + Sync>;

pub struct HealthTable {
    peers: RwLock<BTreeMap<u64, PeerHealth>>,
}

impl HealthTable {
    /// Every peer starts up: a node that just started has no evidence against anyone.
    pub fn new(peers: impl IntoIterator<Item = u64>) -> HealthTable {
        let peers = peers
            .into_iter()
            .map(|id| {
                (
                    id,
                    PeerHealth {
                        up: true,
                        consecutive_failures: 0,
                        last_probe: None,
                    },
                )
            })
            .collect();
        HealthTable {
            peers: RwLock::new(peers),
        }
    }

    /// Whether `peer` is up; unknown peers (this node itself included) count as up.
    pub fn is_up(&self, peer: u64) -> bool {
        self.read().get(&peer).is_none_or(|p| p.up)
    }

    pub fn snapshot(&self) -> BTreeMap<u64, PeerHealth> {
        self.read().clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, PeerHealth>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, PeerHealth>> {
        self.peers.write().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, peer: u64) {
        self.write().entry(peer).or_insert(PeerHealth {
            up: true,
            consecutive_failures: 0,
            last_probe: None,
        });
    }

    fn remove(&self, peer: u64) {
        self.write().remove(&peer);
    }

    /// Records a probe result; returns `Some(up)` when the peer changed state.
    fn record(&self, peer: u64, success: bool, failures_before_down: u32) -> Option<bool> {
        let mut peers = self.write();
        let state = peers.get_mut(&peer)?;
        state.last_probe = Some(Instant::now());
        let was_up = state.up;
        if success {
            state.consecutive_failures = 0;
            state.up = true;
        } else {
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            if state.consecutive_failures >= failures_before_down {
                state.up = false;
            }
        }
        (state.up != was_up).then_some(state.up)
    }
}

/// A healthy peer's probes are traced one in this many (a probe every 500 ms is a span every
/// 50 s); a failing peer's are all traced.
const TRACE_EVERY: u64 = 100;

/// Probes every member but this node until `shutdown`; one task per peer so a slow peer
/// delays no other. The membership is read again every probe interval.
pub async fn run_prober(
    peers: PeerSource,
    config: HealthConfig,
    table: Arc<HealthTable>,
    observer: ProbeObserver,
    shutdown: CancellationToken,
) {
    let mut probers: BTreeMap<u64, (String, tokio::task::AbortHandle)> = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut membership = tokio::time::interval(Duration::from_millis(config.probe_interval_ms));
    membership.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = membership.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let current: BTreeMap<u64, String> = peers().into_iter().collect();
        // Peers the table started with (the config) that the membership does not have.
        let unknown: Vec<u64> = table
            .read()
            .keys()
            .filter(|id| !current.contains_key(id) && !probers.contains_key(id))
            .copied()
            .collect();
        for peer in unknown {
            table.remove(peer);
            observer(&ProbeEvent::Removed(peer));
        }
        let gone: Vec<u64> = probers
            .iter()
            .filter(|(id, (addr, _))| current.get(id) != Some(addr))
            .map(|(id, _)| *id)
            .collect();
        for peer in gone {
            if let Some((_, task)) = probers.remove(&peer) {
                task.abort();
            }
            if !current.contains_key(&peer) {
                table.remove(peer);
                observer(&ProbeEvent::Removed(peer));
                tracing::info!(peer, "no longer a member: not probed any more");
            }
        }
        for (peer, addr) in current {
            if probers.contains_key(&peer) {
                continue;
            }
            if table.read().get(&peer).is_none() {
                table.add(peer);
                observer(&ProbeEvent::Added(peer));
            }
            let task = tasks.spawn(probe_peer(
                peer,
                addr.clone(),
                config.clone(),
                table.clone(),
                observer.clone(),
                shutdown.clone(),
            ));
            probers.insert(peer, (addr, task));
        }
        // Reap finished (aborted) tasks so the set stays as small as the membership.
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
}

async fn probe_peer(
    peer: u64,
    addr: String,
    config: HealthConfig,
    table: Arc<HealthTable>,
    observer: ProbeObserver,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(config.probe_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: u64 = 0;
    let mut last_failed = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // Sampled: one healthy probe in `TRACE_EVERY`, and every probe of a failing peer.
        let traced = last_failed || round.is_multiple_of(TRACE_EVERY);
        round += 1;
        let span = if traced {
            tracing::info_span!(
                "health.probe",
                otel.kind = "client",
                peer,
                server.address = %addr,
                outcome = tracing::field::Empty,
                error.type = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        let timeout = Duration::from_millis(config.probe_timeout_ms);
        let connect = tokio::time::timeout(timeout, TcpStream::connect(&addr));
        let outcome = connect.instrument(span.clone()).await;
        let success = matches!(outcome, Ok(Ok(_)));
        let duration = started.elapsed();
        span.record("outcome", if success { "success" } else { "failure" });
        if !success {
            let kind = match &outcome {
                Err(_) => "timeout".to_string(),
                Ok(Err(e)) => format!("{:?}", e.kind()),
                Ok(Ok(_)) => String::new(),
            };
            span.record("error.type", kind.as_str());
            span.record("otel.status_code", "ERROR");
        }
        drop(span);
        last_failed = !success;
        let transition = table.record(peer, success, config.failures_before_down);
        match transition {
            Some(true) => tracing::info!(peer, %addr, "peer is up"),
            Some(false) => tracing::warn!(peer, %addr, "peer is down"),
            None => {}
        }
        observer(&ProbeEvent::Probed(ProbeOutcome {
            peer,
            success,
            duration,
            transition,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_threshold_up_after_one_success() {
        let t = HealthTable::new([2]);
        assert_eq!(t.record(2, false, 2), None);
        assert!(t.is_up(2));
        assert_eq!(t.record(2, false, 2), Some(false));
        assert!(!t.is_up(2));
        assert_eq!(t.record(2, false, 2), None);
        assert_eq!(t.record(2, true, 2), Some(true));
        assert!(t.is_up(99));
    }
}
