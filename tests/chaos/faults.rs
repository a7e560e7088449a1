//! The faults of the chaos schedule and the network rules behind the partitions.
//!
//! Every node runs under its own uid, so iptables' owner match can drop exactly one node's
//! packets to another node's raft and chat ports. Rules are tagged with a comment unique to
//! this run and removed on heal and on drop. Only loopback traffic is ever touched.

use std::process::Command;

use rand::Rng;
use rand::rngs::StdRng;

use crate::common::Cluster;

/// One node's ports and uid, as the rules need them.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: u64,
    pub uid: u32,
    pub chat: u16,
    pub raft: u16,
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// Every node of `cluster`, node `id` under uid `base_uid + id`, each started under it.
pub fn run_under_own_uids(cluster: &mut Cluster, nodes: u64, base_uid: u32) -> Vec<Peer> {
    let peers: Vec<Peer> = (1..=nodes)
        .map(|id| {
            let n = cluster.node(id);
            Peer {
                id,
                uid: base_uid + id as u32,
                chat: port(&n.chat),
                raft: port(&n.raft),
            }
        })
        .collect();
    for p in &peers {
        cluster.run_as(p.id, p.uid);
    }
    for id in 1..=nodes {
        cluster.start_node(id);
    }
    peers
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    KillLeader,
    KillFollower,
    PauseLeader,
    PauseFollower,
    TermLeader,
    FullRestart,
    QuorumLoss,
    IsolateLeader,
    IsolateFollower,
    OneWayFromLeader,
    PacketLoss,
    FullDisk,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::KillLeader,
        Kind::KillFollower,
        Kind::PauseLeader,
        Kind::PauseFollower,
        Kind::TermLeader,
        Kind::FullRestart,
        Kind::QuorumLoss,
        Kind::IsolateLeader,
        Kind::IsolateFollower,
        Kind::OneWayFromLeader,
        Kind::PacketLoss,
        Kind::FullDisk,
    ];

    /// Picks a fault among `allowed`; the ones that take the cluster down entirely are rarer.
    pub fn pick(rng: &mut StdRng, allowed: &[Kind]) -> Kind {
        loop {
            let kind = allowed[rng.random_range(0..allowed.len())];
            if allowed.len() == 1 {
                return kind;
            }
            let rare = matches!(kind, Kind::FullRestart | Kind::QuorumLoss | Kind::FullDisk);
            if !rare || rng.random_bool(0.4) {
                return kind;
            }
        }
    }

    /// Whether a majority stays able to commit while it lasts (for the stall figures).
    pub fn keeps_a_majority(self) -> bool {
        !matches!(self, Kind::FullRestart | Kind::QuorumLoss)
    }
}

/// The iptables rules this run added.
pub struct Net {
    tag: String,
}

impl Net {
    pub fn new() -> Net {
        let net = Net {
            tag: format!("raftchat-chaos-{}", std::process::id()),
        };
        net.heal();
        net
    }

    fn drop_rule(&self, spec: &[String]) {
        let mut args: Vec<String> = ["-A", "OUTPUT", "-o", "lo", "-p", "tcp"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(spec.iter().cloned());
        args.extend(
            ["-m", "comment", "--comment", &self.tag, "-j", "DROP"]
                .iter()
                .map(|s| s.to_string()),
        );
        let ok = Command::new("iptables")
            .args(&args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "iptables {}", args.join(" "));
    }

    fn owner(uid: u32) -> Vec<String> {
        vec![
            "-m".into(),
            "owner".into(),
            "--uid-owner".into(),
            uid.to_string(),
        ]
    }

    /// Drops `from`'s packets to `to`'s raft and chat ports.
    fn cut(&self, from: &Peer, to: &Peer) {
        for port in [to.raft, to.chat] {
            let mut spec = Self::owner(from.uid);
            spec.extend(["--dport".into(), port.to_string()]);
            self.drop_rule(&spec);
        }
    }

    /// `node` can neither reach nor be reached by the others.
    pub fn isolate(&self, node: &Peer, all: &[Peer]) {
        for other in all.iter().filter(|p| p.id != node.id) {
            self.cut(node, other);
            self.cut(other, node);
        }
    }

    /// Everything `node` sends to the other nodes is lost: its requests and its answers on
    /// the raft port. What the others send it still arrives.
    pub fn one_way_from(&self, node: &Peer, all: &[Peer]) {
        for other in all.iter().filter(|p| p.id != node.id) {
            self.cut(node, other);
        }
        let mut spec = Self::owner(node.uid);
        spec.extend(["--sport".into(), node.raft.to_string()]);
        self.drop_rule(&spec);
    }

    /// Drops `percent` % of the packets on every node-to-node raft link.
    pub fn lossy(&self, percent: u32, all: &[Peer]) {
        for from in all {
            for to in all.iter().filter(|p| p.id != from.id) {
                let mut spec = Self::owner(from.uid);
                spec.extend([
                    "--dport".into(),
                    to.raft.to_string(),
                    "-m".into(),
                    "statistic".into(),
                    "--mode".into(),
                    "random".into(),
                    "--probability".into(),
                    format!("{:.2}", f64::from(percent) / 100.0),
                ]);
                self.drop_rule(&spec);
            }
        }
    }

    /// Removes every rule of this run.
    pub fn heal(&self) {
        let Ok(out) = Command::new("iptables").args(["-S", "OUTPUT"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if !line.contains(&self.tag) {
                continue;
            }
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            let args: Vec<String> = std::iter::once("-D".to_string())
                .chain(split_rule(rule))
                .collect();
            let _ = Command::new("iptables").args(&args).status();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.heal();
    }
}

/// Splits an `iptables -S` rule into arguments (quoted comments stay one argument).
fn split_rule(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}
