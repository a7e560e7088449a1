//! The replicated chat state: sessions, names, rooms and per-session deduplication.
//!
//! `apply` is a pure function of the state and the entry (index, leader timestamp, command):
//! it never reads a clock or the environment, so every node that applies the same log holds
//! the same state. Messages themselves are returned as events and stored by `history`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{ChatCommand, ChatResponse, Event, MessageEvent, StoredMessage};
use super::history::Retention;
use super::names::{fold, is_room_target};

mod dedup;
use dedup::DedupWindow;

/// How often (in entry time) detached sessions are checked for expiry.
const SWEEP_EVERY_MS: i64 = 60_000;

/// What applying decides with, replicated through the log (`ChatCommand::Configure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// A detached session expires after this long without activity (entry time).
    pub session_ttl_ms: i64,
    pub retention: Retention,
}

impl Default for Settings {
    /// What a log without a `Configure` entry means: the built-in defaults.
    fn default() -> Self {
        Settings {
            session_ttl_ms: 24 * 3600 * 1000,
            retention: Retention::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatState {
    #[serde(default)]
    settings: Settings,
    sessions: BTreeMap<String, Session>,
    /// Folded user name → session token holding it.
    names: BTreeMap<String, String>,
    /// Folded room name → room.
    rooms: BTreeMap<String, Room>,
    last_ts_ms: i64,
    next_sweep_ms: i64,
    /// Folded user name → registered account.
    #[serde(default)]
    accounts: BTreeMap<String, Account>,
}

/// A registered name: usable only with its password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub user: String,
    /// argon2id, PHC string format.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub user: String,
    /// Folded room names.
    pub rooms: BTreeSet<String>,
    pub attached: Option<Attachment>,
    pub last_active_ms: i64,
    sent: DedupWindow,
    /// The index of the entry that created the session: its public identity (the token is a
    /// secret). Direct messages name the sessions that may see them by it. 0 in states from
    /// before it existed, until the session next attaches or takes part in a direct message.
    #[serde(default)]
    pub id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub node: u64,
    /// Log index of the `Attach` entry: identifies one connection.
    pub index: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Room {
    pub name: String,
    /// Session tokens.
    pub members: BTreeSet<String>,
}

/// FNV-1a over values' JSON (every map fed to it is ordered).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn feed(&mut self, value: &impl Serialize) {
        // Serializing plain data into a Vec cannot fail.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        for b in bytes.iter().chain(b"\n") {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// An `Attach` entry's request, as applying decides it.
struct Claim<'a> {
    new_token: &'a str,
    user: &'a str,
    node: u64,
    replaces: Option<&'a str>,
    resume: Option<&'a str>,
    adopt: bool,
    authenticated: bool,
}

impl ChatState {
    /// Applies one committed entry at `index`, stamped `ts_ms` by the leader.
    pub fn apply(
        &mut self,
        index: u64,
        ts_ms: i64,
        command: &ChatCommand,
        events: &mut Vec<Event>,
    ) -> ChatResponse {
        let session_ttl_ms = self.settings.session_ttl_ms;
        // Leaders' clocks may disagree: entry time never goes backwards.
        let ts = ts_ms.max(self.last_ts_ms);
        self.last_ts_ms = ts;
        if ts >= self.next_sweep_ms {
            self.expire_sessions(index, ts, session_ttl_ms, events);
            self.next_sweep_ms = ts + SWEEP_EVERY_MS;
        }
        match command {
            ChatCommand::Attach {
                session,
                user,
                node,
                replaces,
                resume,
                adopt,
                authenticated,
            } => {
                let claim = Claim {
                    new_token: session,
                    user,
                    node: *node,
                    replaces: replaces.as_deref(),
                    resume: resume.as_deref(),
                    adopt: *adopt,
                    authenticated: *authenticated,
                };
                self.attach(index, ts, claim, events)
            }
            ChatCommand::SetAccount { user, hash } => {
                let key = fold(user);
                match hash {
                    Some(hash) => {
                        self.accounts.insert(
                            key,
                            Account {
                                user: user.clone(),
                                hash: hash.clone(),
                            },
                        );
                    }
                    None => {
                        self.accounts.remove(&key);
                    }
                }
                ChatResponse::Done
            }
            ChatCommand::Configure { settings } => {
                self.settings = *settings;
                ChatResponse::Done
            }
            ChatCommand::Detach {
                session,
                attachment,
            } => {
                if let Some(s) = self.sessions.get_mut(session)
                    && s.attached.is_some_and(|a| a.index == *attachment)
                {
                    s.attached = None;
                    s.last_active_ms = ts;
                }
                ChatResponse::Done
            }
            ChatCommand::DetachNode { node } => {
                for s in self.sessions.values_mut() {
                    if s.attached.is_some_and(|a| a.node == *node) {
                        s.attached = None;
                        s.last_active_ms = ts;
                    }
                }
                ChatResponse::Done
            }
            ChatCommand::Join { session, room } => self.join(index, ts, session, room, events),
            ChatCommand::Leave { session, room } => self.leave(index, ts, session, room, events),
            ChatCommand::Send {
                session,
                id,
                to,
                text,
            } => self.send(index, ts, session, id, to, text, events),
        }
    }

    fn attach(
        &mut self,
        index: u64,
        ts: i64,
        claim: Claim<'_>,
        events: &mut Vec<Event>,
    ) -> ChatResponse {
        let attachment = Attachment {
            node: claim.node,
            index,
        };
        let key = fold(claim.user);
        if self.accounts.contains_key(&key) && !claim.authenticated {
            return ChatResponse::AuthRequired;
        }
        let holder = self.names.get(&key).cloned();
        let holder_gone = holder.as_ref().is_some_and(|h| {
            claim.replaces == Some(h.as_str())
                || self.sessions.get(h).is_none_or(|s| s.attached.is_none())
        });
        // Which existing session this connection continues, if any. The proposed new token is
        // checked too: entries written before `resume` existed carried the token there.
        let resumable = [claim.resume, Some(claim.new_token)]
            .into_iter()
            .flatten()
            .find(|t| self.sessions.get(*t).is_some_and(|s| fold(&s.user) == key))
            .map(str::to_string)
            .or_else(|| holder.clone().filter(|_| claim.adopt && holder_gone));
        if let Some(token) = resumable
            && let Some(session) = self.sessions.get_mut(&token)
        {
            session.attached = Some(attachment);
            session.last_active_ms = ts;
            if session.id == 0 {
                session.id = index;
            }
            let user = session.user.clone();
            events.push(Event::SessionAttached {
                index,
                session: token.clone(),
                node: claim.node,
            });
            return ChatResponse::Attached {
                session: token,
                user,
                resumed: true,
                attachment: index,
            };
        }
        if let Some(holder) = holder {
            if !holder_gone {
                return ChatResponse::NameTaken;
            }
            self.remove_session(index, &holder, events);
        }
        let token = claim.new_token.to_string();
        self.names.insert(key, token.clone());
        self.sessions.insert(
            token.clone(),
            Session {
                user: claim.user.to_string(),
                rooms: BTreeSet::new(),
                attached: Some(attachment),
                last_active_ms: ts,
                sent: DedupWindow::default(),
                id: index,
            },
        );
        events.push(Event::SessionAttached {
            index,
            session: token.clone(),
            node: claim.node,
        });
        ChatResponse::Attached {
            session: token,
            user: claim.user.to_string(),
            resumed: false,
            attachment: index,
        }
    }

    fn join(
        &mut self,
        index: u64,
        ts: i64,
        token: &str,
        room: &str,
        events: &mut Vec<Event>,
    ) -> ChatResponse {
        let Some(session) = self.sessions.get_mut(token) else {
            return ChatResponse::UnknownSession;
        };
        session.last_active_ms = ts;
        let key = fold(room);
        let entry = self.rooms.entry(key.clone()).or_insert_with(|| Room {
            name: room.to_string(),
            members: BTreeSet::new(),
        });
        if entry.members.insert(token.to_string()) {
            session.rooms.insert(key.clone());
            events.push(Event::Presence {
                index,
                room: entry.name.clone(),
                user: session.user.clone(),
                session: token.to_string(),
                joined: true,
            });
        }
        ChatResponse::Joined {
            room: entry.name.clone(),
            members: self.member_names(&key),
        }
    }

    fn leave(
        &mut self,
        index: u64,
        ts: i64,
        token: &str,
        room: &str,
        events: &mut Vec<Event>,
    ) -> ChatResponse {
        let Some(session) = self.sessions.get_mut(token) else {
            return ChatResponse::UnknownSession;
        };
        session.last_active_ms = ts;
        let key = fold(room);
        let name = self
            .rooms
            .get(&key)
            .map_or_else(|| room.to_string(), |r| r.name.clone());
        if session.rooms.remove(&key) {
            let user = session.user.clone();
            self.leave_room(index, token, &key, &user, events);
        }
        ChatResponse::Left { room: name }
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        index: u64,
        ts: i64,
        token: &str,
        id: &str,
        to: &str,
        text: &str,
        events: &mut Vec<Event>,
    ) -> ChatResponse {
        let Some(session) = self.sessions.get(token) else {
            return ChatResponse::UnknownSession;
        };
        if let Some(original) = session.sent.get(id) {
            return ChatResponse::Sent {
                index: original,
                duplicate: true,
            };
        }
        let key = fold(to);
        let (target, parties) = if is_room_target(to) {
            if !session.rooms.contains(&key) {
                return ChatResponse::NotMember {
                    room: to.to_string(),
                };
            }
            let room = self
                .rooms
                .get(&key)
                .map_or_else(|| to.to_string(), |r| r.name.clone());
            (room, Vec::new())
        } else {
            let Some(target_token) = self.names.get(&key).cloned() else {
                return ChatResponse::NoSuchUser {
                    user: to.to_string(),
                };
            };
            let Some(target) = self.sessions.get(&target_token).map(|t| t.user.clone()) else {
                return ChatResponse::NoSuchUser {
                    user: to.to_string(),
                };
            };
            // Only the two sessions holding the names now may ever see it.
            let mut parties = vec![
                self.session_id(token, index),
                self.session_id(&target_token, index),
            ];
            parties.dedup();
            (target, parties)
        };
        let Some(session) = self.sessions.get_mut(token) else {
            return ChatResponse::UnknownSession;
        };
        let from = session.user.clone();
        session.sent.insert(id, index);
        session.last_active_ms = ts;
        events.push(Event::Message(MessageEvent::sent_by(
            StoredMessage {
                index,
                to: target,
                from,
                id: id.to_string(),
                text: text.to_string(),
                ts_ms: ts,
                parties,
            },
            token.to_string(),
        )));
        ChatResponse::Sent {
            index,
            duplicate: false,
        }
    }

    fn expire_sessions(&mut self, index: u64, now: i64, ttl_ms: i64, events: &mut Vec<Event>) {
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.attached.is_none() && s.last_active_ms.saturating_add(ttl_ms) <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for token in expired {
            self.remove_session(index, &token, events);
        }
    }

    fn remove_session(&mut self, index: u64, token: &str, events: &mut Vec<Event>) {
        let Some(session) = self.sessions.remove(token) else {
            return;
        };
        let key = fold(&session.user);
        if self.names.get(&key).is_some_and(|t| t == token) {
            self.names.remove(&key);
        }
        for room in &session.rooms {
            self.leave_room(index, token, room, &session.user, events);
        }
        events.push(Event::SessionClosed {
            index,
            session: token.to_string(),
        });
    }

    fn leave_room(
        &mut self,
        index: u64,
        token: &str,
        key: &str,
        user: &str,
        events: &mut Vec<Event>,
    ) {
        if let Some(room) = self.rooms.get_mut(key) {
            room.members.remove(token);
            events.push(Event::Presence {
                index,
                room: room.name.clone(),
                user: user.to_string(),
                session: token.to_string(),
                joined: false,
            });
            if room.members.is_empty() {
                self.rooms.remove(key);
            }
        }
    }

    fn member_names(&self, room_key: &str) -> Vec<String> {
        let Some(room) = self.rooms.get(room_key) else {
            return Vec::new();
        };
        room.members
            .iter()
            .filter_map(|t| self.sessions.get(t).map(|s| s.user.clone()))
            .collect()
    }

    /// A fingerprint of the whole state, the same on every node that applied the same log
    /// (maps are ordered; a dedup window is read in its insertion order), so operators and the
    /// chaos checker can tell diverged state from diverged history.
    pub fn fingerprint(&self) -> u64 {
        let mut hash = Fnv::default();
        hash.feed(&self.settings);
        hash.feed(&self.names);
        hash.feed(&self.rooms);
        hash.feed(&(self.last_ts_ms, self.next_sweep_ms));
        hash.feed(&self.accounts);
        for (token, s) in &self.sessions {
            hash.feed(&(
                token,
                &s.user,
                &s.rooms,
                &s.attached,
                s.last_active_ms,
                s.id,
            ));
            for (id, index) in s.sent.iter() {
                hash.feed(&(id, Some(index)));
            }
        }
        hash.0
    }

    // ---- queries used by connections ----

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The entry time of the last applied entry (never decreasing).
    pub fn last_ts_ms(&self) -> i64 {
        self.last_ts_ms
    }

    /// The public identity of session `token`, assigning one (`index`) to a session from a
    /// state written before identities existed.
    fn session_id(&mut self, token: &str, index: u64) -> u64 {
        match self.sessions.get_mut(token) {
            Some(s) if s.id == 0 => {
                s.id = index;
                index
            }
            Some(s) => s.id,
            None => 0,
        }
    }

    /// The registered account of `user`, if any.
    pub fn account(&self, user: &str) -> Option<&Account> {
        self.accounts.get(&fold(user))
    }

    pub fn session(&self, token: &str) -> Option<&Session> {
        self.sessions.get(token)
    }

    /// The session token holding `user`, if any.
    pub fn holder_of(&self, user: &str) -> Option<(&str, &Session)> {
        let token = self.names.get(&fold(user))?;
        self.sessions.get(token).map(|s| (token.as_str(), s))
    }

    /// Members' user names of a room (empty when the room does not exist).
    pub fn members(&self, room: &str) -> Vec<String> {
        self.member_names(&fold(room))
    }

    /// The display name of a room, if it exists.
    pub fn room_name(&self, room: &str) -> Option<&str> {
        self.rooms.get(&fold(room)).map(|r| r.name.as_str())
    }

    /// Every room's name and member count.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        self.rooms
            .values()
            .map(|r| (r.name.clone(), r.members.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
