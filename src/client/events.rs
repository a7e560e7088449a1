//! The driver's events on their way to the application, handed over a batch at a time, and
//! bounded by bytes.
//!
//! A receiver in a busy room reads many frames per socket read. Handing each one over on its
//! own costs a channel operation and often a wake-up of the application's task per message;
//! the driver holds the messages and acks it decodes from one read and hands them over
//! together, before it waits for anything.
//!
//! What the application has not taken yet is bounded: every hand-over counts its events'
//! approximate size against a budget of `MAX_QUEUED_BYTES`, which the application gives back
//! as it takes them. Without room the driver keeps what it decoded and reads no more
//! from the socket until the application takes something; beyond that, the server's own
//! bound on a slow reader applies (it may close the connection, and the client resumes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

use super::{Event, Message};

/// Most events held back for one hand-over.
const MAX_HELD: usize = 256;
/// Approximate bytes of events handed over and not yet taken by the application, at most.
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

/// Roughly what an event takes in memory: its strings and a fixed cost (never more than the
/// whole budget, so any one event can be handed over).
fn cost(event: &Event) -> usize {
    fn message(m: &Message) -> usize {
        m.to.len() + m.from.len() + m.id.len() + m.text.len() + m.ts.len() + 128
    }
    fn strings(v: &[String]) -> usize {
        v.iter().map(|s| s.len() + 24).sum()
    }
    let bytes = match event {
        Event::Message(m) => message(m),
        Event::History { room, messages } => {
            room.len() + messages.iter().map(message).sum::<usize>()
        }
        Event::Joined { room, members } => room.len() + strings(members),
        Event::Members { room, users } => room.len() + strings(users),
        Event::SessionLost { unacked, .. } => strings(unacked),
        Event::Acked { id, .. } => id.len(),
        _ => 0,
    };
    (bytes + 128).min(MAX_QUEUED_BYTES)
}

/// A hand-over: its events and the bytes they count for.
type Batch = (Vec<Event>, usize);

/// Bytes handed over and not yet taken; only the driver adds, only the application takes
/// away, so a check then an add never overshoots. No lock on either side: a fan-out
/// receiver makes a hand-over of a few events for every socket read.
#[derive(Default)]
struct Budget {
    used: AtomicUsize,
    /// The application dropped its handle.
    closed: AtomicBool,
    /// Told when bytes are given back (or the application is gone).
    freed: Notify,
}

impl Budget {
    /// Whether `bytes` more fit (anything fits an empty budget).
    fn fits(&self, bytes: usize) -> bool {
        let used = self.used.load(Ordering::Acquire);
        used == 0 || used + bytes <= MAX_QUEUED_BYTES
    }
}

pub(super) struct EventSender {
    tx: mpsc::UnboundedSender<Batch>,
    held: Vec<Event>,
    /// The last flush left events held for want of room (not merely held for company).
    starved: bool,
    budget: Arc<Budget>,
}

pub(super) struct EventReceiver {
    rx: mpsc::UnboundedReceiver<Batch>,
    taken: std::vec::IntoIter<Event>,
    /// The bytes the hand-over being taken counts for, given back with its last event.
    taken_bytes: usize,
    budget: Arc<Budget>,
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        // A driver waiting for room learns that nobody will make any.
        self.budget.closed.store(true, Ordering::Release);
        self.budget.freed.notify_one();
    }
}

/// The next hand-over: the first `events` held events, `bytes` of them.
struct NextBatch {
    events: usize,
    bytes: usize,
}

/// What waiting for room needs: the budget, and the bytes of the next hand-over.
pub(super) struct RoomWaiter {
    budget: Arc<Budget>,
    bytes: usize,
}

pub(super) fn channel() -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Budget::default());
    (
        EventSender {
            tx,
            held: Vec::new(),
            starved: false,
            budget: budget.clone(),
        },
        EventReceiver {
            rx,
            taken: Vec::new().into_iter(),
            taken_bytes: 0,
            budget,
        },
    )
}

impl EventSender {
    /// Hands `event` over now if the application has room, after whatever is held (the
    /// order is kept).
    pub fn emit(&mut self, event: Event) {
        self.held.push(event);
        self.flush();
    }

    /// Holds `event` until `flush`; the driver flushes before it waits for anything.
    pub fn hold(&mut self, event: Event) {
        self.held.push(event);
        if self.held.len() >= MAX_HELD {
            self.flush();
        }
    }

    /// The next hand-over: at most `MAX_HELD` of the held events and `MAX_QUEUED_BYTES`, at
    /// least one event.
    fn next_batch(&self) -> NextBatch {
        let mut next = NextBatch {
            events: 0,
            bytes: 0,
        };
        for event in self.held.iter().take(MAX_HELD) {
            let c = cost(event);
            if next.events > 0 && next.bytes + c > MAX_QUEUED_BYTES {
                break;
            }
            next.bytes += c;
            next.events += 1;
        }
        next
    }

    /// Hands what is held over while the application has room; the rest stays held (see
    /// `backlogged`).
    pub fn flush(&mut self) {
        if self.budget.closed.load(Ordering::Acquire) {
            // The application dropped its handle: nobody waits for these.
            self.held.clear();
            return;
        }
        self.starved = false;
        while !self.held.is_empty() {
            let next = self.next_batch();
            if !self.budget.fits(next.bytes) {
                self.starved = true;
                return;
            }
            self.hand_over(next);
        }
    }

    fn hand_over(&mut self, next: NextBatch) {
        let batch = if next.events < self.held.len() {
            let rest = self.held.split_off(next.events);
            std::mem::replace(&mut self.held, rest)
        } else {
            // The next hand-over is likely as large as this one: one allocation for it.
            let next = Vec::with_capacity(self.held.len());
            std::mem::replace(&mut self.held, next)
        };
        self.budget.used.fetch_add(next.bytes, Ordering::AcqRel);
        let _ = self.tx.send((batch, next.bytes));
    }

    /// Events wait that the application has no room for: read nothing more until it has.
    /// (Events held until the next flush are not a backlog.)
    pub fn backlogged(&self) -> bool {
        self.starved && !self.held.is_empty()
    }

    /// While backlogged, what `room` waits for (it does not borrow the sender).
    pub fn room_waiter(&self) -> Option<RoomWaiter> {
        self.backlogged().then(|| RoomWaiter {
            budget: self.budget.clone(),
            bytes: self.next_batch().bytes,
        })
    }

    /// Waits until everything held is handed over (or the application is gone).
    pub async fn finish(&mut self) {
        self.flush();
        while self.backlogged() {
            // With room, this hands over; with the application gone, it lets go.
            room(self.room_waiter()).await;
            self.flush();
        }
    }
}

/// Waits for room for the next hand-over (forever without a waiter): true when there is
/// room, false when the application is gone. Only the driver adds to the budget, so room
/// seen here is still there when it flushes.
pub(super) async fn room(waiter: Option<RoomWaiter>) -> bool {
    let Some(RoomWaiter { budget, bytes }) = waiter else {
        return std::future::pending().await;
    };
    loop {
        let freed = budget.freed.notified();
        tokio::pin!(freed);
        // Registered before looking, so bytes given back meanwhile are not missed.
        freed.as_mut().enable();
        if budget.closed.load(Ordering::Acquire) {
            return false;
        }
        if budget.fits(bytes) {
            return true;
        }
        freed.await;
    }
}

impl EventReceiver {
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.taken.next() {
                if self.taken.len() == 0 {
                    let bytes = std::mem::take(&mut self.taken_bytes);
                    self.budget.used.fetch_sub(bytes, Ordering::AcqRel);
                    self.budget.freed.notify_one();
                }
                return Some(event);
            }
            let (batch, bytes) = self.rx.recv().await?;
            self.taken = batch.into_iter();
            self.taken_bytes = bytes;
        }
    }

    /// Approximate bytes of events handed over and not yet taken by the application.
    pub fn queued_bytes(&self) -> usize {
        self.budget.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn left(room: &str) -> Event {
        Event::Left { room: room.into() }
    }

    fn room_of(event: Option<Event>) -> Option<String> {
        match event {
            Some(Event::Left { room }) => Some(room),
            _ => None,
        }
    }

    #[tokio::test]
    async fn held_events_arrive_only_when_flushed_and_in_order() {
        let (mut tx, mut rx) = channel();
        tx.hold(left("#a"));
        tx.hold(left("#b"));
        let nothing_yet = tokio::time::timeout(Duration::from_millis(20), rx.recv());
        assert!(nothing_yet.await.is_err(), "a held event was handed over");
        // An event handed over at once still comes after what was held.
        tx.emit(left("#c"));
        for want in ["#a", "#b", "#c"] {
            assert_eq!(room_of(rx.recv().await).as_deref(), Some(want));
        }
        drop(tx);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_full_hold_is_handed_over_by_itself() {
        let (mut tx, mut rx) = channel();
        for i in 0..MAX_HELD {
            tx.hold(left(&format!("#{i}")));
        }
        assert_eq!(room_of(rx.recv().await).as_deref(), Some("#0"));
    }

    fn message(i: usize, text_bytes: usize) -> Event {
        Event::Message(Message {
            index: i as u64 + 1,
            to: "#r".into(),
            from: "u".into(),
            id: format!("{i}"),
            text: "x".repeat(text_bytes),
            ts: String::new(),
        })
    }

    fn index_of(event: Option<Event>) -> Option<u64> {
        match event {
            Some(Event::Message(m)) => Some(m.index),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_full_budget_holds_events_back_until_the_application_takes_some() {
        let (mut tx, mut rx) = channel();
        // Three budgets' worth of 4-KiB messages, handed over as they come.
        let each = cost(&message(0, 4096));
        let total = 3 * MAX_QUEUED_BYTES / each;
        for i in 0..total {
            tx.emit(message(i, 4096));
        }
        assert!(tx.backlogged(), "a full budget took more");
        let queued = rx.queued_bytes();
        assert!(
            queued <= MAX_QUEUED_BYTES && queued + each > MAX_QUEUED_BYTES,
            "{queued}"
        );
        let no_room = tokio::time::timeout(Duration::from_millis(20), room(tx.room_waiter()));
        assert!(no_room.await.is_err(), "room while nothing was taken");
        // Taking events makes room, and everything comes in order, none twice.
        for want in 1..=total as u64 {
            if rx.queued_bytes() < MAX_QUEUED_BYTES / 2
                && let Some(waiter) = tx.room_waiter()
            {
                assert!(room(Some(waiter)).await, "the receiver is there");
                tx.flush();
            }
            assert!(rx.queued_bytes() <= MAX_QUEUED_BYTES);
            assert_eq!(index_of(rx.recv().await), Some(want));
        }
        assert!(!tx.backlogged());
        assert_eq!(rx.queued_bytes(), 0, "the budget is whole again");
    }

    #[tokio::test]
    async fn an_event_larger_than_the_budget_still_goes_alone() {
        let (mut tx, mut rx) = channel();
        tx.hold(message(0, 10));
        tx.hold(message(1, MAX_QUEUED_BYTES + 1));
        tx.flush();
        assert!(tx.backlogged(), "both went over the budget");
        assert_eq!(index_of(rx.recv().await), Some(1));
        assert!(room(tx.room_waiter()).await, "room once the first is taken");
        tx.flush();
        assert_eq!(index_of(rx.recv().await), Some(2));
        assert_eq!(rx.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn held_events_are_let_go_when_the_application_is_gone() {
        let (mut tx, rx) = channel();
        for i in 0..2 * MAX_QUEUED_BYTES / 4096 {
            tx.emit(message(i, 4096));
        }
        assert!(tx.backlogged());
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), tx.finish())
            .await
            .expect("finish does not wait for an application that is gone");
        assert!(!tx.backlogged());
    }
}
