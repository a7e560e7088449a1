//! Which applied events one connection receives, decided in index order so a connection's
//! view of its own rooms is always the view at the event's index.

use std::collections::HashSet;
use std::sync::Arc;

use super::command::{Event, MessageEvent};
use super::names::{fold, is_room_target};

/// What a connection does with one event.
#[derive(Debug)]
pub enum Delivery {
    Message(Arc<MessageEvent>),
    Presence {
        room: String,
        user: String,
        joined: bool,
    },
    /// The session moved to another connection, or no longer exists.
    Close(&'static str),
    /// The state jumped to a snapshot: fetch what was missed up to `upto` from the history.
    Resync {
        upto: u64,
    },
}

pub struct DeliveryFilter {
    session: String,
    /// The session's public id: direct messages name who may see them by it.
    session_id: u64,
    attachment: u64,
    user_key: String,
    rooms: HashSet<String>,
    /// Highest index delivered (or known to be covered); lower events are duplicates.
    last: u64,
    /// Whether the session's own messages come back to it live (`hello`'s `echo`).
    echo: bool,
}

impl DeliveryFilter {
    pub fn new(
        session: String,
        session_id: u64,
        attachment: u64,
        user: &str,
        rooms: impl IntoIterator<Item = String>,
        last: u64,
    ) -> Self {
        DeliveryFilter {
            session,
            session_id,
            attachment,
            user_key: fold(user),
            rooms: rooms.into_iter().collect(),
            last,
            echo: true,
        }
    }

    /// Leaves out the session's own messages (its acknowledgements say they are committed).
    pub fn without_echo(mut self) -> Self {
        self.echo = false;
        self
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// Marks everything up to `index` as delivered (after a replay from history).
    pub fn advance(&mut self, index: u64) {
        self.last = self.last.max(index);
    }

    pub fn set_rooms(&mut self, rooms: impl IntoIterator<Item = String>) {
        self.rooms = rooms.into_iter().collect();
    }

    pub fn on_event(&mut self, event: &Event) -> Option<Delivery> {
        match event {
            Event::Message(event) => {
                let m = &event.message;
                if m.index <= self.last {
                    return None;
                }
                let mine = if is_room_target(&m.to) {
                    self.rooms.contains(&event.to_key)
                } else if !m.parties.is_empty() {
                    m.parties.contains(&self.session_id)
                } else {
                    fold(&m.to) == self.user_key || fold(&m.from) == self.user_key
                };
                if !mine {
                    return None;
                }
                self.last = m.index;
                if !self.echo && event.sender == self.session {
                    return None;
                }
                Some(Delivery::Message(event.clone()))
            }
            Event::Presence {
                index,
                room,
                user,
                session,
                joined,
            } => {
                if *index <= self.last {
                    return None;
                }
                let key = fold(room);
                if *session == self.session {
                    // The session's own join or leave: its `joined`/`left` answer says so.
                    if *joined {
                        self.rooms.insert(key);
                    } else {
                        self.rooms.remove(&key);
                    }
                    return None;
                }
                self.rooms.contains(&key).then(|| Delivery::Presence {
                    room: room.clone(),
                    user: user.clone(),
                    joined: *joined,
                })
            }
            Event::SessionAttached { index, session, .. } => {
                (*session == self.session && *index != self.attachment && *index > self.attachment)
                    .then_some(Delivery::Close(
                        "the session was resumed by another connection",
                    ))
            }
            Event::SessionClosed { session, .. } => (*session == self.session)
                .then_some(Delivery::Close("the session was taken over or expired")),
            Event::Resync { index } => {
                (*index > self.last).then_some(Delivery::Resync { upto: *index })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(index: u64, to: &str, from: &str) -> Event {
        dm(index, to, from, Vec::new())
    }

    fn dm(index: u64, to: &str, from: &str, parties: Vec<u64>) -> Event {
        Event::Message(MessageEvent::new(crate::chat::command::StoredMessage {
            index,
            to: to.into(),
            from: from.into(),
            id: "x".into(),
            text: "t".into(),
            ts_ms: 0,
            parties,
        }))
    }

    #[test]
    fn without_echo_a_session_gets_others_messages_but_not_its_own() {
        let sent = |index, sender: &str| {
            Event::Message(MessageEvent::sent_by(
                crate::chat::command::StoredMessage {
                    index,
                    to: "#r".into(),
                    from: "alice".into(),
                    id: "x".into(),
                    text: "t".into(),
                    ts_ms: 0,
                    parties: Vec::new(),
                },
                sender.into(),
            ))
        };
        let mut quiet =
            DeliveryFilter::new("s1".into(), 1, 1, "alice", ["#r".into()], 1).without_echo();
        let mut echoed = DeliveryFilter::new("s1".into(), 1, 1, "alice", ["#r".into()], 1);
        // Its own session's message: skipped (but counted as seen), another session's kept,
        // even under the same name.
        assert!(quiet.on_event(&sent(2, "s1")).is_none());
        assert_eq!(quiet.last(), 2);
        assert!(matches!(
            quiet.on_event(&sent(3, "s9")),
            Some(Delivery::Message(_))
        ));
        assert!(matches!(
            echoed.on_event(&sent(2, "s1")),
            Some(Delivery::Message(_))
        ));
    }

    #[test]
    fn a_direct_message_reaches_only_the_sessions_it_names() {
        // Session 7 holds "bob" now; session 3 held it when the message was committed.
        let mut new_holder = DeliveryFilter::new("s7".into(), 7, 7, "bob", [], 7);
        assert!(
            new_holder
                .on_event(&dm(8, "bob", "alice", vec![2, 3]))
                .is_none()
        );
        let mut sender = DeliveryFilter::new("s2".into(), 2, 2, "alice", [], 7);
        assert!(matches!(
            sender.on_event(&dm(8, "bob", "alice", vec![2, 3])),
            Some(Delivery::Message(_))
        ));
        let mut target = DeliveryFilter::new("s3".into(), 3, 3, "bob", [], 7);
        assert!(matches!(
            target.on_event(&dm(8, "bob", "alice", vec![2, 3])),
            Some(Delivery::Message(_))
        ));
    }

    #[test]
    fn follows_own_membership_in_order() {
        let mut f = DeliveryFilter::new("s".into(), 1, 1, "Alice", [], 1);
        assert!(f.on_event(&msg(2, "#r", "bob")).is_none());
        let join = Event::Presence {
            index: 3,
            room: "#R".into(),
            user: "Alice".into(),
            session: "s".into(),
            joined: true,
        };
        assert!(
            f.on_event(&join).is_none(),
            "own join is answered by `joined`"
        );
        let other = Event::Presence {
            index: 4,
            room: "#r".into(),
            user: "bob".into(),
            session: "t".into(),
            joined: true,
        };
        assert!(matches!(
            f.on_event(&other),
            Some(Delivery::Presence { joined: true, .. })
        ));
        assert!(matches!(
            f.on_event(&msg(5, "#r", "bob")),
            Some(Delivery::Message(_))
        ));
        assert!(
            f.on_event(&msg(5, "#r", "bob")).is_none(),
            "duplicate index"
        );
        assert!(matches!(
            f.on_event(&msg(6, "alice", "bob")),
            Some(Delivery::Message(_))
        ));
        assert!(f.on_event(&msg(7, "carol", "bob")).is_none());
    }

    #[test]
    fn closes_when_resumed_elsewhere() {
        let mut f = DeliveryFilter::new("s".into(), 5, 5, "a", [], 5);
        let other = Event::SessionAttached {
            index: 9,
            session: "s".into(),
            node: 2,
        };
        assert!(matches!(f.on_event(&other), Some(Delivery::Close(_))));
    }
}
