//! What the chaos suite checks once the cluster is healed:
//! - every acknowledged message is in every node's history exactly once, at its acked index;
//! - all nodes' histories are identical (and their digests agree);
//! - no message appears that no client sent;
//! - every client's stream is strictly increasing, matches the history at each index, and has
//!   no gap from its first received index on (across its reconnects);
//! - every sent message was finally acknowledged, and no session was lost;
//! - no node logged a panic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::common::{Cluster, wait_for};
use super::faults::Kind;
use super::{Applied, NODES, Seen};

/// One fault kind's figures; stalls and gaps count only faults that began on a healthy cluster.
#[derive(Default, Debug)]
pub struct KindStats {
    pub count: usize,
    /// Began while the cluster was still recovering from the previous fault.
    pub unhealthy_start: usize,
    /// The longest time without any ack anywhere.
    pub stall: Duration,
    /// The longest time between two acks of one client that stayed on a node the fault did
    /// not hit (the experience of someone on the majority side).
    pub majority_gap: Duration,
}

#[derive(Default, Debug)]
pub struct Summary {
    pub faults: usize,
    pub acked: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub reordered: usize,
    pub gaps: usize,
    pub diverged: usize,
    pub unsent_in_history: usize,
    pub never_acked: usize,
    pub sessions_lost: usize,
    pub clients_gave_up: usize,
    pub panics: usize,
    pub worst_stall: Duration,
    pub per_kind: BTreeMap<Kind, KindStats>,
    pub problems: Vec<String>,
    /// Long stalls, with when they happened (seconds from the first fault), to study.
    pub notes: Vec<String>,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "faults {}, acked {}, lost {}, duplicated {}, reordered {}, gaps {}, diverged {}, worst stall {} ms",
            self.faults,
            self.acked,
            self.lost,
            self.duplicated,
            self.reordered,
            self.gaps,
            self.diverged,
            self.worst_stall.as_millis()
        )
    }

    pub fn notes(&self) -> String {
        self.notes.iter().map(|n| format!("chaos: {n}\n")).collect()
    }

    pub fn per_kind(&self) -> String {
        let mut out = String::from(
            "chaos: per fault kind (faults begun on a healthy cluster): worst stall anywhere, \
             worst gap for a client on the majority side",
        );
        for (kind, k) in &self.per_kind {
            out.push_str(&format!(
                "\n  {kind:?}: {} faults ({} began unhealthy), stall {} ms, majority gap {} ms",
                k.count,
                k.unhealthy_start,
                k.stall.as_millis(),
                k.majority_gap.as_millis()
            ));
        }
        out
    }

    pub fn assert_clean(&self, seed: u64) {
        let clean = self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.gaps == 0
            && self.diverged == 0
            && self.unsent_in_history == 0
            && self.never_acked == 0
            && self.sessions_lost == 0
            && self.clients_gave_up == 0
            && self.panics == 0;
        assert!(
            clean,
            "chaos found problems (replay with CHAOS_SEED={seed}): {self:?}\n{}",
            self.problems.join("\n")
        );
    }
}

/// The longest time without an ack that overlaps [`from`, `to`], and when it began.
fn stall_within(acks: &[Instant], from: Instant, to: Instant) -> (Duration, Instant) {
    let mut worst = (Duration::ZERO, from);
    let mut previous = from;
    for t in acks.iter().copied().filter(|t| *t > from) {
        let end = t.min(to);
        if end.saturating_duration_since(previous) > worst.0 {
            worst = (end.saturating_duration_since(previous), previous);
        }
        if t >= to {
            return worst;
        }
        previous = t;
    }
    if to.saturating_duration_since(previous) > worst.0 {
        worst = (to.saturating_duration_since(previous), previous);
    }
    worst
}

/// For a client that was on a node `fault` did not hit, and stayed there from its last ack
/// before the fault until `end`: the longest time between its acks in [start, `end`].
fn majority_gap(ack_log: &[(Instant, u64)], fault: &Applied, end: Instant) -> Option<Duration> {
    let before = ack_log.iter().rev().find(|(t, _)| *t <= fault.started)?;
    let node = before.1;
    if Some(node) == fault.target {
        return None;
    }
    let during: Vec<&(Instant, u64)> = ack_log
        .iter()
        .filter(|(t, _)| *t > fault.started && *t <= end)
        .collect();
    if during.iter().any(|(_, n)| *n != node) {
        return None; // It moved: its gap is a reconnect, not the majority's experience.
    }
    let mut previous = fault.started;
    let mut worst = Duration::ZERO;
    for (t, _) in during {
        worst = worst.max(*t - previous);
        previous = *t;
    }
    Some(worst.max(end.saturating_duration_since(previous)))
}

fn history_of(cluster: &Cluster, id: u64, room: &str) -> Vec<(u64, String)> {
    let mut c = cluster.login(id, &format!("checker{id}"));
    c.join(room);
    c.full_history(room)
        .iter()
        .map(|m| {
            (
                m["index"].as_u64().unwrap_or(0),
                m["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

pub fn check(
    cluster: &Cluster,
    seen: &[Seen],
    applied: &[Applied],
    acks: &[Instant],
    sending_until: Instant,
    room: &str,
) -> Summary {
    let mut s = Summary {
        faults: applied.len(),
        ..Summary::default()
    };
    let mut acks = acks.to_vec();
    acks.sort();
    for (i, fault) in applied.iter().enumerate() {
        // A fault's stall runs until the first ack after it was healed: at most until the
        // next fault began, or 10 s on.
        let end = applied
            .get(i + 1)
            .map_or(fault.healed + Duration::from_secs(10), |next| next.started)
            .min(sending_until);
        let (within, stall_began) = stall_within(&acks, fault.started, end);
        let stall = within.min(
            acks.iter()
                .find(|t| **t > fault.healed)
                .map_or(Duration::from_secs(10), |t| {
                    t.saturating_duration_since(fault.started)
                }),
        );
        if stall > Duration::from_secs(1) && fault.healthy && fault.kind.keeps_a_majority() {
            let at = |t: Instant| {
                t.saturating_duration_since(applied[0].started)
                    .as_secs_f64()
            };
            s.notes.push(format!(
                "{:?} on node {:?} from +{:.2}s, healed +{:.2}s: no ack from +{:.2}s for {} ms",
                fault.kind,
                fault.target,
                at(fault.started),
                at(fault.healed),
                at(stall_began),
                stall.as_millis()
            ));
        }
        let entry = s.per_kind.entry(fault.kind).or_default();
        entry.count += 1;
        if !fault.healthy {
            entry.unhealthy_start += 1;
            continue;
        }
        entry.stall = entry.stall.max(stall);
        if fault.kind.keeps_a_majority() {
            s.worst_stall = s.worst_stall.max(stall);
            let gap_end = applied
                .get(i + 1)
                .map_or(fault.healed + Duration::from_secs(2), |next| next.started)
                .min(fault.healed + Duration::from_secs(2))
                .min(sending_until);
            let worst = seen
                .iter()
                .filter_map(|c| majority_gap(&c.ack_log, fault, gap_end).map(|g| (g, c)))
                .max_by_key(|(g, _)| *g);
            let gap = worst.map_or(Duration::ZERO, |(g, _)| g);
            if let Some((g, c)) = worst
                && g > Duration::from_secs(1)
            {
                let at = |t: Instant| {
                    t.saturating_duration_since(applied[0].started)
                        .as_secs_f64()
                };
                let node = c
                    .ack_log
                    .iter()
                    .rev()
                    .find(|(t, _)| *t <= fault.started)
                    .map(|a| a.1);
                s.notes.push(format!(
                    "{:?} from +{:.2}s: {} on node {node:?} waited {} ms between acks",
                    fault.kind,
                    at(fault.started),
                    c.user,
                    g.as_millis()
                ));
            }
            entry.majority_gap = entry.majority_gap.max(gap);
        }
    }

    let top = seen
        .iter()
        .flat_map(|c| c.acked.values().copied())
        .max()
        .unwrap_or(0);
    let ids: Vec<u64> = (1..=NODES).collect();
    let applied_index = cluster.wait_applied_equal(&ids, top, Duration::from_secs(90));
    let histories: Vec<Vec<(u64, String)>> = ids
        .iter()
        .map(|id| history_of(cluster, *id, room))
        .collect();
    let digests: Vec<_> = ids
        .iter()
        .map(|id| {
            wait_for(Duration::from_secs(90), "a history digest", || {
                cluster.history_digest(*id, applied_index)
            })
        })
        .collect();
    for (i, h) in histories.iter().enumerate().skip(1) {
        if *h != histories[0] {
            s.diverged += 1;
            let first = h
                .iter()
                .zip(&histories[0])
                .position(|(a, b)| a != b)
                .unwrap_or(h.len().min(histories[0].len()));
            s.problems.push(format!(
                "node {} {room} history differs from node 1 ({} vs {} messages); first at \
                 position {first}: {:?} vs {:?}",
                i + 1,
                h.len(),
                histories[0].len(),
                h.get(first),
                histories[0].get(first),
            ));
        } else if digests[i] != digests[0] {
            s.diverged += 1;
            s.problems.push(format!(
                "node {} history digest differs from node 1: {} vs {}; {}",
                i + 1,
                digests[i],
                digests[0],
                first_difference(cluster, i as u64 + 1, 1, applied_index)
            ));
        }
    }
    // The chat states must agree too (sessions, rooms, dedup windows): a state that diverged
    // shows in the history only once some message is decided differently.
    // Detaches of the stopped clients may still be applying: compare at one applied index.
    let states: Vec<(u64, u64)> =
        wait_for(Duration::from_secs(60), "equal applied indexes", || {
            let states: Vec<(u64, u64)> = ids
                .iter()
                .map(|id| cluster.state_digest(*id))
                .collect::<Option<_>>()?;
            states.iter().all(|d| d.0 == states[0].0).then_some(states)
        });
    if states.iter().any(|d| d.1 != states[0].1) {
        s.diverged += 1;
        s.problems.push(format!(
            "chat states differ: (applied index, fingerprint) per node {states:?}"
        ));
    }
    let reference = &histories[0];
    let at: HashMap<u64, &str> = reference.iter().map(|(i, id)| (*i, id.as_str())).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (_, id) in reference {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    s.duplicated = counts.values().filter(|n| **n > 1).count();
    let sent: HashSet<&str> = seen
        .iter()
        .flat_map(|c| c.sent.iter().map(String::as_str))
        .collect();
    s.unsent_in_history = counts.keys().filter(|id| !sent.contains(*id)).count();
    let room_indexes: Vec<u64> = reference.iter().map(|(i, _)| *i).collect();
    for c in seen {
        s.acked += c.acked.len();
        s.sessions_lost += c.sessions_lost;
        if let Some(why) = &c.gave_up {
            s.clients_gave_up += 1;
            s.problems.push(format!("{} gave up: {why}", c.user));
        }
        s.never_acked += c.sent.len().saturating_sub(c.acked.len());
        for (code, id) in c.refused.iter().take(5) {
            s.problems
                .push(format!("{} was refused {code} for {id:?}", c.user));
        }
        for (id, index) in &c.acked {
            if at.get(index) != Some(&id.as_str()) {
                s.lost += 1;
                if s.problems.len() < 20 {
                    s.problems.push(format!(
                        "{id} acked at {index}, history has {:?}",
                        at.get(index)
                    ));
                }
            }
        }
        let stream: Vec<u64> = c.received.iter().map(|(i, _)| *i).collect();
        s.reordered += stream.windows(2).filter(|w| w[0] >= w[1]).count();
        for (index, id) in &c.received {
            if at.get(index) != Some(&id.as_str()) {
                s.diverged += 1;
                if s.problems.len() < 20 {
                    s.problems.push(format!(
                        "{} received {id} at {index}, history has {:?}",
                        c.user,
                        at.get(index)
                    ));
                }
            }
        }
        if let (Some(first), Some(last)) = (stream.first(), stream.last()) {
            let got: HashSet<u64> = stream.iter().copied().collect();
            let missing = room_indexes
                .iter()
                .filter(|i| **i >= *first && **i <= *last && !got.contains(i))
                .count();
            if missing > 0 {
                s.problems
                    .push(format!("{} missed {missing} messages", c.user));
            }
            s.gaps += missing;
        }
    }
    for id in ids {
        if cluster.log(id).contains("panicked") {
            s.panics += 1;
            s.problems.push(format!("node {id} logged a panic"));
        }
    }
    s
}

/// Narrows a digest mismatch between nodes `a` and `b` down to one index and shows what each
/// stores there (so a divergence report says what diverged, not only that something did).
fn first_difference(cluster: &Cluster, a: u64, b: u64, upto: u64) -> String {
    let digest = |id: u64, after: u64, upto: u64| {
        wait_for(Duration::from_secs(90), "a history digest", || {
            cluster.history_digest_range(id, after, upto)
        })
    };
    let (mut lo, mut hi) = (0, upto);
    // Invariant: (0, lo] agrees, (lo, hi] differs.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if digest(a, lo, mid) == digest(b, lo, mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let stored = |id: u64| {
        cluster
            .raft_post(
                id,
                "/raft/history",
                &serde_json::json!({"after": lo, "upto": hi}),
            )
            .map(|(_, v)| v.to_string())
    };
    format!(
        "first difference at index {hi}: node {a} has {:?}, node {b} has {:?}",
        stored(a),
        stored(b)
    )
}
