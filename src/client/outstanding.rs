//! What the application has sent and the cluster has not acknowledged yet: the client keeps
//! each such message to send it again after a reconnect, so their bytes are bounded. Only the
//! application adds (`Client::send`), only the driver takes away (an ack, a refusal, a lost
//! session), so a check and the add that follows it cannot race another add.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Most bytes of unacknowledged messages a client keeps (their texts, ids and targets, plus a
/// fixed cost each). A message larger than this still goes when nothing else waits.
pub const MAX_UNACKED_BYTES: usize = 4 * 1024 * 1024;

/// What one kept message is counted as, besides its strings.
const PER_MESSAGE: usize = 64;

/// `Client::send` found no room: the application should wait for acknowledgements
/// (`Client::room_to_send`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{unacked} messages ({bytes} bytes) await acknowledgement, at most {MAX_UNACKED_BYTES} bytes may; wait for acks"
)]
pub struct SendQueueFull {
    pub unacked: usize,
    pub bytes: usize,
}

/// The count and bytes of unacknowledged messages, shared by the application's handle and the
/// driver.
#[derive(Default)]
pub(super) struct Outstanding {
    count: AtomicUsize,
    bytes: AtomicUsize,
    freed: Notify,
}

/// What a message with these strings counts for.
pub(super) fn cost(id: &str, to: &str, text: &str) -> usize {
    id.len() + to.len() + text.len() + PER_MESSAGE
}

impl Outstanding {
    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn fits(&self, cost: usize) -> bool {
        self.count() == 0 || self.bytes.load(Ordering::SeqCst) + cost <= MAX_UNACKED_BYTES
    }

    /// Counts a message of `cost` if it fits.
    pub(super) fn add(&self, cost: usize) -> Result<(), SendQueueFull> {
        if !self.fits(cost) {
            return Err(SendQueueFull {
                unacked: self.count(),
                bytes: self.bytes.load(Ordering::SeqCst),
            });
        }
        self.bytes.fetch_add(cost, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// A message of `cost` was acknowledged, refused or given up.
    pub(super) fn release(&self, cost: usize) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.bytes.fetch_sub(cost, Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    /// Waits until a message of `cost` fits.
    pub(super) async fn room(&self, cost: usize) {
        loop {
            let freed = self.freed.notified();
            if self.fits(cost) {
                return;
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn messages_are_kept_up_to_the_budget_and_one_alone_always_goes() {
        let outstanding = Outstanding::default();
        let big = MAX_UNACKED_BYTES / 4;
        for _ in 0..4 {
            assert!(outstanding.add(big).is_ok());
        }
        let full = outstanding.add(1);
        assert_eq!(
            full,
            Err(SendQueueFull {
                unacked: 4,
                bytes: MAX_UNACKED_BYTES
            })
        );
        for _ in 0..4 {
            outstanding.release(big);
        }
        assert!(outstanding.add(2 * MAX_UNACKED_BYTES).is_ok(), "alone");
        assert!(outstanding.add(1).is_err());
    }

    #[tokio::test]
    async fn a_waiting_sender_is_woken_when_an_ack_frees_room() {
        let outstanding = std::sync::Arc::new(Outstanding::default());
        outstanding.add(MAX_UNACKED_BYTES).unwrap();
        let waiter = {
            let outstanding = outstanding.clone();
            tokio::spawn(async move { outstanding.room(1024).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "room while the budget is full");
        outstanding.release(MAX_UNACKED_BYTES);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was never woken")
            .unwrap();
    }
}
