//! One log line when a peer's raft RPCs start failing, one when they work again, and a
//! summary every `SUMMARY_EVERY` in between, instead of a line per failed heartbeat (a dead
//! peer fails ~20 RPCs a second). openraft's own per-RPC warnings are filtered by default.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SUMMARY_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Reachability {
    /// Peers whose last RPC failed; bounded by the membership.
    failing: Mutex<BTreeMap<u64, Failing>>,
}

struct Failing {
    since: Instant,
    last_summary: Instant,
    failures_since_summary: u64,
    failures: u64,
}

impl Reachability {
    pub fn record<T, E: Display>(&self, rpc: &'static str, peer: u64, result: &Result<T, E>) {
        let now = Instant::now();
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => {
                if let Some(f) = failing.remove(&peer) {
                    tracing::info!(
                        peer,
                        failed_rpcs = f.failures,
                        down_ms = now.duration_since(f.since).as_millis() as u64,
                        "raft RPCs to the peer succeed again"
                    );
                }
            }
            Err(e) => match failing.get_mut(&peer) {
                None => {
                    tracing::warn!(peer, rpc, error = %e, "raft RPCs to the peer fail");
                    failing.insert(
                        peer,
                        Failing {
                            since: now,
                            last_summary: now,
                            failures_since_summary: 1,
                            failures: 1,
                        },
                    );
                }
                Some(f) => {
                    f.failures += 1;
                    f.failures_since_summary += 1;
                    if now.duration_since(f.last_summary) >= SUMMARY_EVERY {
                        tracing::warn!(
                            peer,
                            failed_rpcs = f.failures_since_summary,
                            down_secs = now.duration_since(f.since).as_secs(),
                            last_error = %e,
                            "raft RPCs to the peer still fail"
                        );
                        f.last_summary = now;
                        f.failures_since_summary = 0;
                    }
                }
            },
        }
    }
}
