//! Routes applied events to the connections they concern: a room's messages and presence to
//! the connections of its members, a direct message to the sessions it names, session events
//! to that session's connections. An event costs work only for its recipients, never a
//! wake-up per connection. Membership is followed in index order, from the events themselves,
//! so a connection's routes always match the state at the event it is routed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::command::Event;
use super::names::{fold, is_room_target};
use super::state::ChatState;

/// One subscriber's queue of events, bounded; a subscriber that lets it fill is dropped from
/// the routes and learns how many events it missed when it has read what was queued.
/// Events arrive a published batch at a time (one channel send and one wake-up per subscriber
/// per batch, not per event), and `recv` hands them out one by one.
pub struct Receiver {
    rx: mpsc::Receiver<Box<Events>>,
    taken: std::vec::IntoIter<Arc<Event>>,
    shared: Arc<SubShared>,
    fanout: Arc<Fanout>,
    id: u64,
}

/// One published batch's events for one subscriber. Boxed in the queue: a queue allocates
/// its slots in blocks of 32 as soon as it exists, and a pointer-sized slot keeps an idle
/// connection's queue as small as it was with one event per slot.
struct Events(Vec<Arc<Event>>);

/// Why `recv` returned no event.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The queue overflowed: this many events (at least) were not delivered.
    Lagged(u64),
    /// The router is gone (the node is shutting down).
    Closed,
}

#[derive(Default)]
struct SubShared {
    missed: AtomicU64,
    /// Events published to the subscriber and not yet handed out by `recv`: the queue's
    /// bound counts events, whatever batches they came in.
    queued: AtomicUsize,
}

impl Receiver {
    pub async fn recv(&mut self) -> Result<Arc<Event>, Ended> {
        if let Some(event) = self.next_taken() {
            return Ok(event);
        }
        match self.rx.recv().await {
            Some(batch) => {
                self.taken = batch.0.into_iter();
                self.next_taken().ok_or(Ended::Closed)
            }
            None => match self.shared.missed.load(Ordering::Acquire) {
                0 => Err(Ended::Closed),
                n => Err(Ended::Lagged(n)),
            },
        }
    }

    /// An event already queued, without waiting; `None` if there is none or the queue
    /// ended (the next `recv` says why).
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        if let Some(event) = self.next_taken() {
            return Some(event);
        }
        self.taken = self.rx.try_recv().ok()?.0.into_iter();
        self.next_taken()
    }

    fn next_taken(&mut self) -> Option<Arc<Event>> {
        let event = self.taken.next()?;
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        Some(event)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.fanout.remove(self.id);
    }
}

/// Who a subscriber is, for routing.
pub struct Subscriber<'a> {
    pub session: &'a str,
    pub session_id: u64,
    pub user: &'a str,
}

struct Sub {
    tx: mpsc::Sender<Box<Events>>,
    shared: Arc<SubShared>,
    session: String,
    session_id: u64,
    user_key: String,
    rooms: HashSet<String>,
}

#[derive(Default)]
struct Routes {
    next_id: u64,
    subs: HashMap<u64, Sub>,
    by_room: HashMap<String, HashSet<u64>>,
    by_session: HashMap<String, HashSet<u64>>,
    by_session_id: HashMap<u64, HashSet<u64>>,
    by_user: HashMap<String, HashSet<u64>>,
}

pub struct Fanout {
    routes: Mutex<Routes>,
    queue: usize,
}

impl Sub {
    /// Queues as much of `batch` as the bound of `queue` events leaves room for; false if
    /// any of it did not fit or the subscriber is gone.
    fn offer(&self, mut batch: Vec<Arc<Event>>, queue: usize) -> bool {
        let room = queue.saturating_sub(self.shared.queued.load(Ordering::Acquire));
        let whole = batch.len() <= room;
        batch.truncate(room);
        if batch.is_empty() {
            return whole;
        }
        let len = batch.len();
        self.shared.queued.fetch_add(len, Ordering::AcqRel);
        if self.tx.try_send(Box::new(Events(batch))).is_err() {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        whole
    }
}

fn index_add<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<u64>>, key: K, id: u64) {
    map.entry(key).or_default().insert(id);
}

fn index_remove<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<u64>>, key: &K, id: u64) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl Routes {
    fn remove(&mut self, id: u64) -> Option<Sub> {
        let sub = self.subs.remove(&id)?;
        for room in &sub.rooms {
            index_remove(&mut self.by_room, room, id);
        }
        index_remove(&mut self.by_session, &sub.session, id);
        index_remove(&mut self.by_session_id, &sub.session_id, id);
        index_remove(&mut self.by_user, &sub.user_key, id);
        Some(sub)
    }

    fn set_rooms(&mut self, id: u64, rooms: HashSet<String>) {
        let Some(sub) = self.subs.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut sub.rooms, rooms.clone());
        for room in &old {
            index_remove(&mut self.by_room, room, id);
        }
        for room in rooms {
            index_add(&mut self.by_room, room, id);
        }
    }

    /// The subscribers `event` concerns.
    fn recipients(&self, event: &Event, out: &mut Vec<u64>) {
        let mut add = |set: Option<&HashSet<u64>>| out.extend(set.into_iter().flatten());
        match event {
            Event::Message(m) => {
                let m = &m.message;
                if is_room_target(&m.to) {
                    add(self.by_room.get(&fold(&m.to)));
                } else if !m.parties.is_empty() {
                    for party in &m.parties {
                        add(self.by_session_id.get(party));
                    }
                } else {
                    add(self.by_user.get(&fold(&m.to)));
                    add(self.by_user.get(&fold(&m.from)));
                }
            }
            Event::Presence { room, session, .. } => {
                add(self.by_room.get(&fold(room)));
                add(self.by_session.get(session));
            }
            Event::SessionAttached { session, .. } | Event::SessionClosed { session, .. } => {
                add(self.by_session.get(session));
            }
            Event::Resync { .. } => out.extend(self.subs.keys()),
        }
        out.sort_unstable();
        out.dedup();
    }

    /// A session's own join or leave moves its subscribers' routes.
    fn follow_membership(&mut self, event: &Event) {
        let Event::Presence {
            room,
            session,
            joined,
            ..
        } = event
        else {
            return;
        };
        let Some(ids) = self.by_session.get(session) else {
            return;
        };
        let key = fold(room);
        for id in ids.clone() {
            let Some(sub) = self.subs.get_mut(&id) else {
                continue;
            };
            if *joined {
                sub.rooms.insert(key.clone());
                index_add(&mut self.by_room, key.clone(), id);
            } else {
                sub.rooms.remove(&key);
                index_remove(&mut self.by_room, &key, id);
            }
        }
    }
}

impl Fanout {
    /// Each subscriber may have `queue` events waiting.
    pub fn new(queue: usize) -> Arc<Fanout> {
        Arc::new(Fanout {
            routes: Mutex::new(Routes::default()),
            queue: queue.max(1),
        })
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes with the session's rooms as of `state` (the caller holds the state still,
    /// so no event is applied in between).
    pub fn subscribe(self: &Arc<Self>, who: Subscriber<'_>, state: &ChatState) -> Receiver {
        let rooms: HashSet<String> = state
            .session(who.session)
            .map(|s| s.rooms.iter().cloned().collect())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(self.queue);
        let shared = Arc::new(SubShared::default());
        let mut routes = self.routes();
        routes.next_id += 1;
        let id = routes.next_id;
        let user_key = fold(who.user);
        for room in &rooms {
            index_add(&mut routes.by_room, room.clone(), id);
        }
        index_add(&mut routes.by_session, who.session.to_string(), id);
        index_add(&mut routes.by_session_id, who.session_id, id);
        index_add(&mut routes.by_user, user_key.clone(), id);
        routes.subs.insert(
            id,
            Sub {
                tx,
                shared: shared.clone(),
                session: who.session.to_string(),
                session_id: who.session_id,
                user_key,
                rooms,
            },
        );
        Receiver {
            rx,
            taken: Vec::new().into_iter(),
            shared,
            fanout: self.clone(),
            id,
        }
    }

    fn remove(&self, id: u64) {
        self.routes().remove(id);
    }

    /// Routes applied events, in index order. A subscriber gets all of its events of the batch
    /// in one send, so it is woken once for them, not once per event.
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        let mut routes = self.routes();
        let mut recipients = Vec::new();
        // (subscriber, event) in index order, then grouped by subscriber (a stable sort keeps
        // each one's events in index order; measured faster than a hash map per batch).
        let mut sends: Vec<(u64, Arc<Event>)> = Vec::new();
        for event in events {
            recipients.clear();
            routes.recipients(&event, &mut recipients);
            routes.follow_membership(&event);
            if recipients.is_empty() {
                continue;
            }
            let event = Arc::new(event);
            sends.extend(recipients.iter().map(|id| (*id, event.clone())));
        }
        sends.sort_by_key(|(id, _)| *id);
        let mut sends = sends.into_iter().peekable();
        while let Some((id, first)) = sends.next() {
            let mut batch = vec![first];
            while let Some((_, event)) = sends.next_if(|(next, _)| *next == id) {
                batch.push(event);
            }
            let Some(sub) = routes.subs.get(&id) else {
                continue;
            };
            if !sub.offer(batch, self.queue) {
                // Full (a client that does not keep up) or gone: stop routing to it; the
                // connection reads what is queued, then learns it fell behind.
                sub.shared.missed.fetch_add(1, Ordering::AcqRel);
                routes.remove(id);
            }
        }
    }

    /// The state was replaced by a snapshot: every subscriber's rooms are read again from it,
    /// and each is told to resynchronise.
    pub fn resync(&self, state: &ChatState, index: u64) {
        {
            let mut routes = self.routes();
            let subs: Vec<(u64, String)> = routes
                .subs
                .iter()
                .map(|(id, s)| (*id, s.session.clone()))
                .collect();
            for (id, session) in subs {
                let rooms = state
                    .session(&session)
                    .map(|s| s.rooms.iter().cloned().collect())
                    .unwrap_or_default();
                routes.set_rooms(id, rooms);
            }
        }
        self.publish([Event::Resync { index }]);
    }

    /// How many subscribers are routed to (for tests and metrics).
    pub fn subscribers(&self) -> usize {
        self.routes().subs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::command::{MessageEvent, StoredMessage};

    fn message(index: u64, to: &str, from: &str, parties: Vec<u64>) -> Event {
        Event::Message(MessageEvent::new(StoredMessage {
            index,
            to: to.into(),
            from: from.into(),
            id: format!("m{index}"),
            text: "t".into(),
            ts_ms: 0,
            parties,
        }))
    }

    fn presence(index: u64, room: &str, session: &str, joined: bool) -> Event {
        Event::Presence {
            index,
            room: room.into(),
            user: session.into(),
            session: session.into(),
            joined,
        }
    }

    /// Subscribes session `s` of user `u`.
    fn user_u(fanout: &Arc<Fanout>, state: &ChatState) -> Receiver {
        let who = Subscriber {
            session: "s",
            session_id: 1,
            user: "u",
        };
        fanout.subscribe(who, state)
    }

    fn drain(rx: &mut Receiver) -> Vec<u64> {
        let mut got = Vec::new();
        while let Some(e) = rx.try_recv() {
            got.push(e.index());
        }
        got
    }

    #[test]
    fn events_reach_only_the_connections_they_concern() {
        let fanout = Fanout::new(16);
        let state = ChatState::default();
        let who = |session, session_id, user| Subscriber {
            session,
            session_id,
            user,
        };
        let mut a = fanout.subscribe(who("sa", 1, "alice"), &state);
        let mut b = fanout.subscribe(who("sb", 2, "bob"), &state);
        let mut idle = fanout.subscribe(who("sc", 3, "carol"), &state);
        fanout.publish([
            presence(10, "#Room", "sa", true),
            message(11, "#room", "alice", vec![]),
            presence(12, "#room", "sb", true),
            message(13, "#ROOM", "bob", vec![]),
            message(14, "bob", "alice", vec![1, 2]),
            presence(15, "#room", "sa", false),
            message(16, "#room", "bob", vec![]),
        ]);
        assert_eq!(drain(&mut a), vec![10, 11, 12, 13, 14, 15]);
        assert_eq!(drain(&mut b), vec![12, 13, 14, 15, 16]);
        assert!(drain(&mut idle).is_empty(), "no wake-up for others");
        drop(b);
        assert_eq!(fanout.subscribers(), 2);
        let routes = fanout.routes();
        assert!(!routes.by_room.contains_key("#room"), "no stale routes");
    }

    #[tokio::test]
    async fn a_subscriber_that_overflows_is_dropped_and_told_how_far_behind() {
        let fanout = Fanout::new(2);
        let state = ChatState::default();
        let mut slow = user_u(&fanout, &state);
        fanout.publish((1..=5).map(|i| message(i, "u", "x", vec![])));
        assert_eq!(slow.recv().await.map(|e| e.index()), Ok(1));
        assert_eq!(slow.recv().await.map(|e| e.index()), Ok(2));
        assert_eq!(slow.recv().await.err(), Some(Ended::Lagged(1)));
        assert_eq!(fanout.subscribers(), 0);
    }

    #[tokio::test]
    async fn the_bound_counts_events_across_batches_and_reading_frees_room() {
        let fanout = Fanout::new(3);
        let state = ChatState::default();
        let mut sub = user_u(&fanout, &state);
        fanout.publish((1..=2).map(|i| message(i, "u", "x", vec![])));
        assert_eq!(sub.recv().await.map(|e| e.index()), Ok(1));
        // Two queued would not fit a third and a fourth; one read left room for both.
        fanout.publish((3..=4).map(|i| message(i, "u", "x", vec![])));
        assert_eq!(drain(&mut sub), vec![2, 3, 4]);
        assert_eq!(fanout.subscribers(), 1);
        fanout.publish((5..=8).map(|i| message(i, "u", "x", vec![])));
        assert_eq!(drain(&mut sub), vec![5, 6, 7]);
        assert_eq!(sub.recv().await.err(), Some(Ended::Lagged(1)));
        assert_eq!(fanout.subscribers(), 0);
    }
}
