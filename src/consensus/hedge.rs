//! When to send a second copy of an idempotent RPC on another connection.
//!
//! One TCP connection on a lossy link stalls for its retransmission timeouts (200 ms, then
//! 400, 800, …): three lost copies of one segment hold a request for 1.4 s. A second copy on
//! another connection meets independent losses, so the request waits only while both are
//! stuck. A copy goes out once the first has taken several times the usual answer time for
//! that RPC to that peer (the median of recent answers: a slow tail of lost packets does not
//! move it), and only while few copies are out, so an overloaded leader does not get its work
//! doubled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Answers remembered per (RPC, peer).
const SAMPLES: usize = 32;
/// A second copy waits at least this long: below it, scheduling noise alone would trigger it.
const MIN_DELAY: Duration = Duration::from_millis(20);
/// … and at most this long, however slow the answers have been lately.
const MAX_DELAY: Duration = Duration::from_millis(400);
/// Before there are enough answers to judge.
const DEFAULT_DELAY: Duration = Duration::from_millis(150);
/// The second copy goes out after this many times the median answer time.
const MEDIAN_FACTOR: u32 = 3;
/// At most this many second copies in flight per client.
const MAX_IN_FLIGHT: usize = 32;

#[derive(Default)]
struct Ring {
    micros: Vec<u32>,
    next: usize,
}

impl Ring {
    fn push(&mut self, sample: Duration) {
        let micros = u32::try_from(sample.as_micros()).unwrap_or(u32::MAX);
        if self.micros.len() < SAMPLES {
            self.micros.push(micros);
        } else {
            self.micros[self.next] = micros;
        }
        self.next = (self.next + 1) % SAMPLES;
    }

    fn median(&self) -> Option<Duration> {
        if self.micros.len() < SAMPLES / 4 {
            return None;
        }
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        Some(Duration::from_micros(u64::from(sorted[sorted.len() / 2])))
    }
}

/// Answer times and the budget of second copies, shared by one node's RPC client.
#[derive(Default)]
pub struct Hedging {
    answers: Mutex<HashMap<(&'static str, u64), Ring>>,
    in_flight: AtomicUsize,
}

/// A second copy in flight; returns its slot to the budget when dropped.
pub struct HedgeSlot {
    hedging: Arc<Hedging>,
}

impl Drop for HedgeSlot {
    fn drop(&mut self) {
        self.hedging.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hedging {
    /// Remembers how long a successful `rpc` to `peer` took.
    pub fn answered(&self, rpc: &'static str, peer: u64, took: Duration) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.entry((rpc, peer)).or_default().push(took);
    }

    /// How long to wait for an answer before sending a second copy.
    pub fn delay(&self, rpc: &'static str, peer: u64) -> Duration {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        match answers.get(&(rpc, peer)).and_then(Ring::median) {
            Some(median) => (median * MEDIAN_FACTOR).clamp(MIN_DELAY, MAX_DELAY),
            None => DEFAULT_DELAY,
        }
    }

    /// A slot for a second copy, if the budget has one.
    pub fn slot(self: &Arc<Self>) -> Option<HedgeSlot> {
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            });
        taken.ok().map(|_| HedgeSlot {
            hedging: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_follows_the_median_not_the_lossy_tail() {
        let hedging = Hedging::default();
        assert_eq!(hedging.delay("append", 2), DEFAULT_DELAY);
        for i in 0..SAMPLES {
            // A third of the answers waited for a retransmission.
            let took = if i % 3 == 0 { 600 } else { 15 };
            hedging.answered("append", 2, Duration::from_millis(took));
        }
        assert_eq!(hedging.delay("append", 2), Duration::from_millis(45));
        assert_eq!(hedging.delay("append", 3), DEFAULT_DELAY);
        for _ in 0..SAMPLES {
            hedging.answered("forward", 2, Duration::from_micros(300));
        }
        assert_eq!(hedging.delay("forward", 2), MIN_DELAY);
        for _ in 0..SAMPLES {
            hedging.answered("forward", 2, Duration::from_secs(2));
        }
        assert_eq!(hedging.delay("forward", 2), MAX_DELAY);
    }

    #[test]
    fn second_copies_are_bounded() {
        let hedging = Arc::new(Hedging::default());
        let slots: Vec<_> = (0..MAX_IN_FLIGHT).filter_map(|_| hedging.slot()).collect();
        assert_eq!(slots.len(), MAX_IN_FLIGHT);
        assert!(hedging.slot().is_none());
        drop(slots);
        assert!(hedging.slot().is_some());
    }
}
