//! How a connection's messages are grouped into the batches it writes to the log.
//!
//! A connection writes one batch at a time (its acks stay in order). A client that keeps
//! several messages in flight answers each batch's acks with as many new messages, and they
//! arrive spread over a few hundred microseconds; taking whatever is there at the first one
//! split 32 such senders into two batches of about 16, and every batch costs the cluster an
//! fsync on each node, a replication round and several thread wake-ups (BENCHMARKS.md, "32
//! senders"). So the next batch expects the messages that waited while the last one was
//! written plus as many as it held (their senders' next ones), and lingers briefly for
//! them: two groups that alternate merge into one. A client with one message in flight
//! never waits, and a connection whose linger ran out (its client answers more slowly than
//! that) does not linger for its next few batches.

use std::time::Duration;

use tokio::sync::mpsc;

/// Messages in one batch at most.
pub const SEND_BATCH: usize = 256;

/// How long a batch smaller than the last one waits for the rest. Tokio's timer ticks each
/// millisecond, so the wait is at most about two.
const LINGER: Duration = Duration::from_millis(1);

/// Batches that go without lingering after a linger ran out.
const REST_AFTER_MISS: u32 = 8;

/// A connection's outgoing messages, taken in batches.
pub struct SendBatches<T> {
    rx: mpsc::Receiver<T>,
    last_len: usize,
    /// Messages that were waiting when the last batch was written.
    waited: usize,
    /// Batches left that go at once, after a linger ran out.
    rest: u32,
}

impl<T> SendBatches<T> {
    pub fn new(rx: mpsc::Receiver<T>) -> SendBatches<T> {
        SendBatches {
            rx,
            last_len: 0,
            waited: 0,
            rest: 0,
        }
    }

    /// Fills `batch` (which must be empty) with the next batch; false once the senders are
    /// gone and nothing is left.
    pub async fn next(&mut self, batch: &mut Vec<T>) -> bool {
        if self.rx.recv_many(batch, SEND_BATCH).await == 0 {
            return false;
        }
        let want = (self.last_len + std::mem::take(&mut self.waited)).min(SEND_BATCH);
        if self.rest > 0 {
            self.rest -= 1;
        } else if batch.len() < want {
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < want {
                let more = want - batch.len();
                match tokio::time::timeout_at(deadline, self.rx.recv_many(batch, more)).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => {
                        self.rest = REST_AFTER_MISS;
                        break;
                    }
                }
            }
        }
        self.last_len = batch.len();
        true
    }

    /// The last batch is written: called before its acks go out, so what waits now came
    /// while it was being written, not in answer to it.
    pub fn written(&mut self) {
        self.waited = self.rx.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches over a queue that has just taken a batch of four (0..4).
    async fn after_a_batch_of_four() -> (mpsc::Sender<u32>, SendBatches<u32>, Vec<u32>) {
        let (tx, rx) = mpsc::channel(64);
        let mut batches = SendBatches::new(rx);
        let mut batch = Vec::new();
        for i in 0..4 {
            tx.send(i).await.unwrap();
        }
        assert!(batches.next(&mut batch).await);
        assert_eq!(batch.len(), 4);
        batch.clear();
        (tx, batches, batch)
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_message_never_waits() {
        let (tx, rx) = mpsc::channel(16);
        let mut batches = SendBatches::new(rx);
        let mut batch = Vec::new();
        for i in 0..3 {
            tx.send(i).await.unwrap();
            let started = tokio::time::Instant::now();
            assert!(batches.next(&mut batch).await);
            assert_eq!(batch, vec![i]);
            assert_eq!(started.elapsed(), Duration::ZERO);
            batch.clear();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_smaller_batch_waits_for_the_rest_of_the_last_ones_size() {
        let (tx, mut batches, mut batch) = after_a_batch_of_four().await;
        // The next group trickles in: the batch takes all four.
        tx.send(10).await.unwrap();
        let late = tx.clone();
        tokio::spawn(async move {
            for i in 11..14 {
                tokio::task::yield_now().await;
                late.send(i).await.unwrap();
            }
        });
        let started = tokio::time::Instant::now();
        assert!(batches.next(&mut batch).await);
        assert_eq!(batch, vec![10, 11, 12, 13]);
        // It went as soon as it was whole, not at the end of the linger.
        assert!(started.elapsed() < LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn two_alternating_groups_merge() {
        let (tx, mut batches, mut batch) = after_a_batch_of_four().await;
        // While the first group was written, a second one of four came...
        for i in 4..8 {
            tx.send(i).await.unwrap();
        }
        batches.written();
        // ...and the first group's senders answer their acks a moment later.
        let late = tx.clone();
        tokio::spawn(async move {
            for i in 8..12 {
                tokio::task::yield_now().await;
                late.send(i).await.unwrap();
            }
        });
        assert!(batches.next(&mut batch).await);
        assert_eq!(batch, (4..12).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded_and_the_size_adapts() {
        let (tx, mut batches, mut batch) = after_a_batch_of_four().await;
        tx.send(4).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(batches.next(&mut batch).await);
        assert_eq!(batch, vec![4]);
        assert!(started.elapsed() <= Duration::from_millis(2));
        batch.clear();
        // The last batch held one: the next single message goes at once.
        tx.send(5).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(batches.next(&mut batch).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_linger_ran_out_the_next_batches_go_at_once() {
        let (tx, mut batches, mut batch) = after_a_batch_of_four().await;
        // Two of the four come back: the linger runs out.
        tx.send(4).await.unwrap();
        tx.send(5).await.unwrap();
        assert!(batches.next(&mut batch).await);
        assert_eq!(batch, vec![4, 5]);
        batch.clear();
        for round in 0..REST_AFTER_MISS {
            // Half of what the last batch held waited while it was written.
            tx.send(round).await.unwrap();
            batches.written();
            let started = tokio::time::Instant::now();
            assert!(batches.next(&mut batch).await);
            assert_eq!(started.elapsed(), Duration::ZERO, "round {round}");
            batch.clear();
        }
        // Then it lingers again.
        tx.send(100).await.unwrap();
        batches.written();
        let started = tokio::time::Instant::now();
        assert!(batches.next(&mut batch).await);
        assert!(started.elapsed() >= LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_left_is_taken_when_the_senders_are_gone() {
        let (tx, mut batches, mut batch) = after_a_batch_of_four().await;
        tx.send(4).await.unwrap();
        drop(tx);
        assert!(batches.next(&mut batch).await);
        assert_eq!(batch, vec![4]);
        batch.clear();
        assert!(!batches.next(&mut batch).await);
    }
}
