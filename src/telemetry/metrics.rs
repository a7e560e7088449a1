//! The node's one Prometheus registry and every metric family of SPEC section 6.
//!
//! Every family exists from startup with zero values for its known label values (each
//! configured peer, each dialect, each result), so dashboards and alerts never see gaps.
//! Label values stay bounded: node ids, dialects, fixed reasons; never user names or addresses.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::node::VERSION;

pub const DIALECTS: [&str; 2] = ["json", "irc"];

/// Why a client connection ended (the `reason` label of disconnects).
pub const DISCONNECT_REASONS: [&str; 8] = [
    "idle",
    "closed",
    "error",
    "slow",
    "abuse",
    "login_timeout",
    "replaced",
    "shutdown",
];

/// Bad request kinds (the `reason` label of bad requests): the SPEC's error codes for input
/// a client got wrong.
pub const BAD_REQUEST_REASONS: [&str; 16] = [
    "auth_failed",
    "text_too_long",
    "too_many_rooms",
    "ip_limit",
    "session_rate",
    "not_tls",
    "tls_handshake",
    "bad_json",
    "unknown_type",
    "missing_field",
    "bad_name",
    "line_too_long",
    "not_logged_in",
    "rate_limited",
    "bad_encoding",
    "not_member",
];

const RPCS: [&str; 4] = ["append", "vote", "snapshot", "forward"];

/// Why a message was not stored (the `reason` label of failed messages).
pub const MESSAGE_FAILURES: [&str; 5] = [
    "unavailable",
    "internal",
    "unknown_session",
    "refused",
    "bad_request",
];

/// The stores of `raftchat_storage_bytes`.
pub const STORES: [&str; 3] = ["log", "history", "state"];

/// Sub-millisecond probes and RPCs up to multi-second stalls.
const FAST_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
/// Failovers: tens of milliseconds to tens of seconds.
const FAILOVER_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    // Health probes.
    pub probes: IntCounterVec,
    pub probe_duration: HistogramVec,
    pub peer_up: IntGaugeVec,
    pub peer_transitions: IntCounterVec,
    // Raft and leadership.
    pub raft_term: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_has_leader: IntGauge,
    /// 1 once openraft stopped with a fatal error (the node then exits).
    pub raft_fatal: IntGauge,
    /// History entries this node still has to copy from peers after a snapshot.
    pub history_gap_entries: IntGauge,
    pub raft_leader_id: IntGauge,
    pub raft_leader_changes: IntCounter,
    pub raft_leader_lost: IntCounter,
    pub raft_leader_recovered: IntCounter,
    pub raft_last_log_index: IntGauge,
    pub raft_replication_connections: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_replication_lag: IntGaugeVec,
    pub raft_leader_transfers: IntCounterVec,
    pub raft_rpc_duration: HistogramVec,
    pub storage_sync_duration: Histogram,
    // Failover.
    pub failovers: IntCounter,
    pub failover_duration: Histogram,
    pub leaderless_seconds: prometheus::Counter,
    // Clients.
    pub client_connections: IntGaugeVec,
    pub client_connects: IntCounterVec,
    pub client_reconnects: IntCounterVec,
    pub client_disconnects: IntCounterVec,
    pub resends_deduplicated: IntCounter,
    pub replayed_messages: IntCounter,
    // Messages.
    pub messages_committed: IntCounter,
    pub message_commit_duration: Histogram,
    pub messages_delivered: IntCounter,
    pub messages_failed: IntCounterVec,
    // Raft internals and storage.
    pub raft_commit_index: IntGauge,
    pub raft_voters: IntGauge,
    pub raft_rpc_failures: IntCounterVec,
    pub raft_rpc_hedged: IntCounterVec,
    pub storage_bytes: IntGaugeVec,
    pub storage_available_bytes: IntGauge,
    pub storage_capacity_bytes: IntGauge,
    pub snapshot_duration: Histogram,
    pub snapshot_bytes: IntGauge,
    /// Bytes queued for client sockets, across this node's connections.
    pub client_output_bytes: IntGauge,
    pub bad_requests: IntCounterVec,
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Registers every family for node `node` whose peers are `peers`.
    pub fn new(node: u64, peers: &[u64]) -> prometheus::Result<Metrics> {
        let r = Registry::new();
        let m = Metrics {
            probes: counter_vec(
                &r,
                "raftchat_health_probes_total",
                "TCP health probes of peers, by result.",
                &["peer", "result"],
            )?,
            probe_duration: histogram_vec(
                &r,
                "raftchat_health_probe_duration_seconds",
                "Duration of a TCP health probe (connect) of a peer.",
                &["peer"],
                &FAST_BUCKETS,
            )?,
            peer_up: gauge_vec(
                &r,
                "raftchat_peer_up",
                "1 if the peer passes health probes, 0 if it is down.",
                &["peer"],
            )?,
            peer_transitions: counter_vec(
                &r,
                "raftchat_peer_transitions_total",
                "Peer health state changes, by new state.",
                &["peer", "to"],
            )?,
            raft_term: gauge(&r, "raftchat_raft_term", "Current raft term.")?,
            raft_is_leader: gauge(
                &r,
                "raftchat_raft_is_leader",
                "1 if this node is the raft leader.",
            )?,
            raft_has_leader: gauge(
                &r,
                "raftchat_raft_has_leader",
                "1 if this node knows a healthy leader.",
            )?,
            raft_fatal: gauge(
                &r,
                "raftchat_raft_fatal",
                "1 once raft stopped with a fatal error (storage failure, panic); the node exits.",
            )?,
            history_gap_entries: gauge(
                &r,
                "raftchat_history_gap_entries",
                "Log entries whose history this node still copies from peers after installing a snapshot.",
            )?,
            raft_leader_id: gauge(
                &r,
                "raftchat_raft_leader_id",
                "Id of the leader this node knows, 0 when none.",
            )?,
            raft_leader_changes: counter(
                &r,
                "raftchat_raft_leader_changes_total",
                "Times this node learned of a new leader (the first election included).",
            )?,
            raft_leader_lost: counter(
                &r,
                "raftchat_raft_leader_lost_total",
                "Times this node lost contact with its leader (whether or not the leader changed).",
            )?,
            raft_leader_recovered: counter(
                &r,
                "raftchat_raft_leader_recovered_total",
                "Times this node regained the leader it had lost, in the same term (no failover).",
            )?,
            raft_last_log_index: gauge(
                &r,
                "raftchat_raft_last_log_index",
                "Index of the last entry in this node's log.",
            )?,
            raft_replication_connections: gauge(
                &r,
                "raftchat_raft_replication_connections",
                "Pipelined replication connections this node serves to its leader.",
            )?,
            raft_applied_index: gauge(
                &r,
                "raftchat_raft_applied_index",
                "Index of the last entry applied on this node.",
            )?,
            raft_replication_lag: gauge_vec(
                &r,
                "raftchat_raft_replication_lag_entries",
                "On the leader: entries each follower is behind.",
                &["follower"],
            )?,
            raft_leader_transfers: counter_vec(
                &r,
                "raftchat_raft_leader_transfers_total",
                "Leader changes that were handed over on purpose (graceful shutdown).",
                &["reason"],
            )?,
            raft_rpc_duration: histogram_vec(
                &r,
                "raftchat_raft_rpc_duration_seconds",
                "Duration of raft RPCs and forwarded writes to a peer.",
                &["rpc", "peer"],
                &FAST_BUCKETS,
            )?,
            storage_sync_duration: histogram(
                &r,
                "raftchat_storage_sync_duration_seconds",
                "Duration of each durable write (fsync) of the raft log store.",
                &FAST_BUCKETS,
            )?,
            failovers: counter(
                &r,
                "raftchat_failovers_total",
                "Leader changes that followed the loss of the previous leader.",
            )?,
            failover_duration: histogram(
                &r,
                "raftchat_failover_duration_seconds",
                "From the last contact with the lost leader to knowing the new one, on this node.",
                &FAILOVER_BUCKETS,
            )?,
            leaderless_seconds: {
                let c = prometheus::Counter::new(
                    "raftchat_leaderless_seconds_total",
                    "Seconds this node spent without a healthy leader.",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            client_connections: gauge_vec(
                &r,
                "raftchat_client_connections",
                "Open client connections.",
                &["dialect"],
            )?,
            client_connects: counter_vec(
                &r,
                "raftchat_client_connects_total",
                "Client connections opened.",
                &["dialect"],
            )?,
            client_reconnects: counter_vec(
                &r,
                "raftchat_client_reconnects_total",
                "Sessions resumed by a returning client.",
                &["dialect"],
            )?,
            client_disconnects: counter_vec(
                &r,
                "raftchat_client_disconnects_total",
                "Client connections closed, by reason.",
                &["dialect", "reason"],
            )?,
            resends_deduplicated: counter(
                &r,
                "raftchat_client_resends_deduplicated_total",
                "Re-sent messages acknowledged with their original index instead of stored again.",
            )?,
            replayed_messages: counter(
                &r,
                "raftchat_client_replayed_messages_total",
                "Messages replayed to resuming sessions.",
            )?,
            messages_committed: counter(
                &r,
                "raftchat_messages_committed_total",
                "Messages received on this node and acknowledged after commit.",
            )?,
            message_commit_duration: histogram(
                &r,
                "raftchat_message_commit_duration_seconds",
                "From receiving a message on this node to acknowledging it.",
                &FAST_BUCKETS,
            )?,
            messages_delivered: counter(
                &r,
                "raftchat_messages_delivered_total",
                "Messages pushed to clients of this node.",
            )?,
            messages_failed: counter_vec(
                &r,
                "raftchat_messages_failed_total",
                "Messages received on this node and answered with an error, by reason.",
                &["reason"],
            )?,
            raft_commit_index: gauge(
                &r,
                "raftchat_raft_commit_index",
                "Index of the last entry this node knows is committed.",
            )?,
            raft_voters: gauge(
                &r,
                "raftchat_raft_voters",
                "Voting members in the raft membership this node holds.",
            )?,
            raft_rpc_failures: counter_vec(
                &r,
                "raftchat_raft_rpc_failures_total",
                "Raft RPCs and forwarded writes to a peer that failed (unreachable, timeout, error answer).",
                &["rpc", "peer"],
            )?,
            raft_rpc_hedged: counter_vec(
                &r,
                "raftchat_raft_rpc_hedged_total",
                "Second copies of an unanswered AppendEntries or forwarded write, sent on another connection (a lossy or slow link).",
                &["rpc", "peer"],
            )?,
            storage_bytes: gauge_vec(
                &r,
                "raftchat_storage_bytes",
                "Bytes on disk of this node's stores: the raft log, the message history, the state snapshot.",
                &["store"],
            )?,
            storage_available_bytes: gauge(
                &r,
                "raftchat_storage_available_bytes",
                "Bytes available to this node on the filesystem of its data directory.",
            )?,
            storage_capacity_bytes: gauge(
                &r,
                "raftchat_storage_capacity_bytes",
                "Size of the filesystem of this node's data directory.",
            )?,
            snapshot_duration: histogram(
                &r,
                "raftchat_snapshot_duration_seconds",
                "Duration of building (and making durable) a raft snapshot of the chat state.",
                &FAST_BUCKETS,
            )?,
            snapshot_bytes: gauge(
                &r,
                "raftchat_snapshot_bytes",
                "Size of the current raft snapshot (the chat state, no history).",
            )?,
            client_output_bytes: gauge(
                &r,
                "raftchat_client_output_bytes",
                "Bytes queued for client sockets across this node's connections.",
            )?,
            bad_requests: counter_vec(
                &r,
                "raftchat_bad_requests_total",
                "Requests refused as bad input, by reason.",
                &["reason"],
            )?,
            registry: r,
        };
        let build = gauge_vec(
            &m.registry,
            "raftchat_build_info",
            "Build information; always 1.",
            &["version", "node"],
        )?;
        build
            .with_label_values(&[VERSION, &node.to_string()])
            .set(1);
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for peer in peers {
            m.add_peer(*peer);
        }
        m.raft_leader_transfers.with_label_values(&["planned"]);
        for dialect in DIALECTS {
            m.client_connections.with_label_values(&[dialect]);
            m.client_connects.with_label_values(&[dialect]);
            m.client_reconnects.with_label_values(&[dialect]);
            for reason in DISCONNECT_REASONS {
                m.client_disconnects.with_label_values(&[dialect, reason]);
            }
        }
        for reason in BAD_REQUEST_REASONS {
            m.bad_requests.with_label_values(&[reason]);
        }
        for reason in MESSAGE_FAILURES {
            m.messages_failed.with_label_values(&[reason]);
        }
        for store in STORES {
            m.storage_bytes.with_label_values(&[store]);
        }
        Ok(m)
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Adds the span exporter's counters to the registry.
    pub fn register_exports(&self, counters: &super::ExportCounters) -> prometheus::Result<()> {
        self.registry
            .register(Box::new(counters.exported.clone()))?;
        self.registry.register(Box::new(counters.dropped.clone()))
    }

    /// Creates `peer`'s series at zero (a member joined). `raftchat_peer_up` appears with the
    /// first probe: before it nothing is known.
    pub fn add_peer(&self, peer: u64) {
        let peer = peer.to_string();
        for result in ["success", "failure"] {
            self.probes.with_label_values(&[&peer, result]);
        }
        self.probe_duration.with_label_values(&[&peer]);
        for to in ["up", "down"] {
            self.peer_transitions.with_label_values(&[&peer, to]);
        }
        self.raft_replication_lag.with_label_values(&[&peer]);
        for rpc in RPCS {
            self.raft_rpc_duration.with_label_values(&[rpc, &peer]);
            self.raft_rpc_failures.with_label_values(&[rpc, &peer]);
            self.raft_rpc_hedged.with_label_values(&[rpc, &peer]);
        }
    }

    /// Drops `peer`'s series (it left the membership): a removed node stops alerting.
    pub fn remove_peer(&self, peer: u64) {
        let peer = peer.to_string();
        for result in ["success", "failure"] {
            let _ = self.probes.remove_label_values(&[&peer, result]);
        }
        let _ = self.probe_duration.remove_label_values(&[&peer]);
        let _ = self.peer_up.remove_label_values(&[&peer]);
        for to in ["up", "down"] {
            let _ = self.peer_transitions.remove_label_values(&[&peer, to]);
        }
        let _ = self.raft_replication_lag.remove_label_values(&[&peer]);
        for rpc in RPCS {
            let _ = self.raft_rpc_duration.remove_label_values(&[rpc, &peer]);
            let _ = self.raft_rpc_failures.remove_label_values(&[rpc, &peer]);
            let _ = self.raft_rpc_hedged.remove_label_values(&[rpc, &peer]);
        }
    }

    pub fn message_failed(&self, reason: &str) {
        if MESSAGE_FAILURES.contains(&reason) {
            self.messages_failed.with_label_values(&[reason]).inc();
        }
    }

    pub fn bad_request(&self, reason: &str) {
        if BAD_REQUEST_REASONS.contains(&reason) {
            self.bad_requests.with_label_values(&[reason]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported_from_startup() {
        let m = Metrics::new(1, &[2, 3]).unwrap();
        let text = m.render();
        for family in [
            "raftchat_health_probes_total",
            "raftchat_health_probe_duration_seconds",
            "raftchat_peer_transitions_total",
            "raftchat_raft_replication_lag_entries",
            "raftchat_raft_rpc_duration_seconds",
            "raftchat_client_disconnects_total",
            "raftchat_build_info",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(family), "{family} missing");
        }
        assert!(
            !text.contains(r#"raftchat_peer_up{peer="2"}"#),
            "peer_up is unknown before the first probe"
        );
        assert!(text.contains(r#"raftchat_health_probes_total{peer="2",result="failure"} 0"#));
        m.remove_peer(2);
        assert!(!m.render().contains(r#"peer="2""#));
        assert!(text.contains(r#"raftchat_client_connections{dialect="irc"} 0"#));
    }
}
