//! The driver's events on their way to the application, handed over a batch at a time.
//!
//! A receiver in a busy room reads many frames per socket read. Handing each one over on its
//! own costs a channel operation and often a wake-up of the application's task per message;
//! the driver holds the messages and acks it decodes from one read and hands them over
//! together, before it waits for anything.

use tokio::sync::mpsc;

use super::Event;

/// Most events held back for one hand-over.
const MAX_HELD: usize = 256;

pub(super) struct EventSender {
    tx: mpsc::UnboundedSender<Vec<Event>>,
    held: Vec<Event>,
}

pub(super) struct EventReceiver {
    rx: mpsc::UnboundedReceiver<Vec<Event>>,
    taken: std::vec::IntoIter<Event>,
}

pub(super) fn channel() -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        EventSender {
            tx,
            held: Vec::new(),
        },
        EventReceiver {
            rx,
            taken: Vec::new().into_iter(),
        },
    )
}

impl EventSender {
    /// Hands `event` over now, after whatever is held (the order is kept).
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

    pub fn flush(&mut self) {
        if !self.held.is_empty() {
            // The next hand-over is likely as large as this one: one allocation for it.
            let next = Vec::with_capacity(self.held.len());
            // The application may have dropped its handle: then nobody waits for these.
            let _ = self.tx.send(std::mem::replace(&mut self.held, next));
        }
    }
}

impl EventReceiver {
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.taken.next() {
                return Some(event);
            }
            self.taken = self.rx.recv().await?.into_iter();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(room: &str) -> Event {
        Event::Left { room: room.into() }
    }

    fn room(event: Option<Event>) -> Option<String> {
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
        let nothing_yet = tokio::time::timeout(std::time::Duration::from_millis(20), rx.recv());
        assert!(nothing_yet.await.is_err(), "a held event was handed over");
        // An event handed over at once still comes after what was held.
        tx.emit(left("#c"));
        for want in ["#a", "#b", "#c"] {
            assert_eq!(room(rx.recv().await).as_deref(), Some(want));
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
        assert_eq!(room(rx.recv().await).as_deref(), Some("#0"));
    }
}
