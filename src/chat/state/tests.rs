//! Tests of `ChatState`.

use super::dedup::DEDUP_WINDOW;
use super::*;

const TTL: i64 = 3_600_000;

struct Harness {
    state: ChatState,
    index: u64,
    events: Vec<Event>,
}

impl Harness {
    fn new() -> Self {
        let mut h = Harness {
            state: ChatState::default(),
            index: 0,
            events: Vec::new(),
        };
        h.run_at(
            0,
            ChatCommand::Configure {
                settings: Settings {
                    session_ttl_ms: TTL,
                    retention: Retention::default(),
                },
            },
        );
        h
    }
    fn run_at(&mut self, ts: i64, cmd: ChatCommand) -> ChatResponse {
        self.index += 1;
        self.state.apply(self.index, ts, &cmd, &mut self.events)
    }
    fn run(&mut self, cmd: ChatCommand) -> ChatResponse {
        self.run_at(1000, cmd)
    }
    fn attach(&mut self, token: &str, user: &str, node: u64) -> ChatResponse {
        self.run(attach_cmd(token, user, node, None))
    }
    /// Attaches a session that must be accepted; returns its attachment.
    fn attached(&mut self, token: &str, user: &str, node: u64) -> u64 {
        match self.attach(token, user, node) {
            ChatResponse::Attached { attachment, .. } => attachment,
            other => panic!("not attached: {other:?}"),
        }
    }
    fn detach(&mut self, token: &str, attachment: u64) -> ChatResponse {
        self.run(ChatCommand::Detach {
            session: token.into(),
            attachment,
        })
    }
    /// A session that joined `room` on node 1, then detached.
    fn detached_member(&mut self, token: &str, user: &str, room: &str) {
        let attachment = self.attached(token, user, 1);
        self.run(join(token, room));
        self.detach(token, attachment);
    }
}

fn attach_cmd(token: &str, user: &str, node: u64, resume: Option<&str>) -> ChatCommand {
    ChatCommand::Attach {
        session: token.into(),
        user: user.into(),
        node,
        replaces: None,
        resume: resume.map(String::from),
        adopt: false,
        authenticated: false,
    }
}

fn send(session: &str, id: &str, to: &str) -> ChatCommand {
    ChatCommand::Send {
        session: session.into(),
        id: id.into(),
        to: to.into(),
        text: "hi".into(),
    }
}

fn join(session: &str, room: &str) -> ChatCommand {
    ChatCommand::Join {
        session: session.into(),
        room: room.into(),
    }
}

/// A random mix of every command, with time jumps that expire sessions.
fn random_commands(seed: u64, n: usize) -> Vec<(i64, ChatCommand)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ts = 0;
    let tokens: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    let pick = |rng: &mut rand::rngs::StdRng| tokens[rng.random_range(0..tokens.len())].clone();
    (0..n)
        .map(|i| {
            ts += if rng.random_ratio(1, 50) {
                TTL
            } else {
                rng.random_range(0..2000)
            };
            let user = format!("u{}", rng.random_range(0..5));
            let room = format!("#r{}", rng.random_range(0..3));
            let cmd = match rng.random_range(0..10) {
                0 | 1 => ChatCommand::Attach {
                    session: pick(&mut rng),
                    user,
                    node: rng.random_range(1..=3),
                    replaces: rng.random_bool(0.2).then(|| pick(&mut rng)),
                    resume: rng.random_bool(0.5).then(|| pick(&mut rng)),
                    adopt: rng.random_bool(0.3),
                    authenticated: rng.random_bool(0.5),
                },
                5 if rng.random_ratio(1, 5) => ChatCommand::SetAccount {
                    user,
                    hash: rng.random_bool(0.7).then(|| "h".to_string()),
                },
                2 => join(&pick(&mut rng), &room),
                3 => ChatCommand::Leave {
                    session: pick(&mut rng),
                    room,
                },
                4 => ChatCommand::Detach {
                    session: pick(&mut rng),
                    attachment: rng.random_range(0..i as u64 + 1),
                },
                5 if rng.random_ratio(1, 10) => ChatCommand::DetachNode {
                    node: rng.random_range(1..=3),
                },
                _ => {
                    let to = if rng.random_bool(0.8) { room } else { user };
                    send(
                        &pick(&mut rng),
                        &format!("m{}", rng.random_range(0..40)),
                        &to,
                    )
                }
            };
            (ts, cmd)
        })
        .collect()
}

#[test]
fn a_state_restored_from_its_snapshot_goes_on_exactly_like_the_original() {
    for seed in 0..40 {
        let commands = random_commands(seed, 600);
        let split = 1 + (seed as usize * 37) % 599;
        let mut original = ChatState::default();
        let mut events = Vec::new();
        for (i, (ts, cmd)) in commands[..split].iter().enumerate() {
            original.apply(i as u64 + 1, *ts, cmd, &mut events);
        }
        let snapshot = serde_json::to_vec(&original).unwrap();
        let mut restored: ChatState = serde_json::from_slice(&snapshot).unwrap();
        assert_eq!(
            restored.fingerprint(),
            original.fingerprint(),
            "seed {seed}"
        );
        for (i, (ts, cmd)) in commands.iter().enumerate().skip(split) {
            let index = i as u64 + 1;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let ra = original.apply(index, *ts, cmd, &mut a);
            let rb = restored.apply(index, *ts, cmd, &mut b);
            assert_eq!(ra, rb, "seed {seed}, entry {index}");
            assert_eq!(
                format!("{a:?}"),
                format!("{b:?}"),
                "seed {seed}, entry {index}"
            );
        }
        assert_eq!(restored, original, "seed {seed}");
        assert_eq!(
            restored.fingerprint(),
            original.fingerprint(),
            "seed {seed}"
        );
    }
}

#[test]
fn a_registered_name_is_claimed_only_when_authenticated() {
    let mut h = Harness::new();
    h.run(ChatCommand::SetAccount {
        user: "Alice".into(),
        hash: Some("$argon2id$x".into()),
    });
    assert_eq!(h.attach("s1", "alice", 1), ChatResponse::AuthRequired);
    let ok = h.run(ChatCommand::Attach {
        session: "s1".into(),
        user: "alice".into(),
        node: 1,
        replaces: None,
        resume: None,
        adopt: false,
        authenticated: true,
    });
    assert!(matches!(ok, ChatResponse::Attached { .. }), "{ok:?}");
    h.run(ChatCommand::SetAccount {
        user: "alice".into(),
        hash: None,
    });
    assert!(h.state.account("ALICE").is_none());
}

#[test]
fn the_fingerprint_tells_states_apart() {
    let mut h = Harness::new();
    h.attach("s1", "alice", 1);
    let before = h.state.fingerprint();
    h.run(join("s1", "#general"));
    assert_ne!(h.state.fingerprint(), before);
    let joined = h.state.fingerprint();
    h.run(send("s1", "m1", "#general"));
    assert_ne!(
        h.state.fingerprint(),
        joined,
        "the dedup window is part of it"
    );
}

#[test]
fn resend_is_deduplicated() {
    let mut h = Harness::new();
    h.attach("s1", "alice", 1);
    h.run(join("s1", "#general"));
    let first = h.run(send("s1", "m1", "#general"));
    let again = h.run(send("s1", "m1", "#general"));
    let ChatResponse::Sent { index, duplicate } = first else {
        panic!("{first:?}")
    };
    assert!(!duplicate);
    assert_eq!(
        again,
        ChatResponse::Sent {
            index,
            duplicate: true
        }
    );
    let messages = h
        .events
        .iter()
        .filter(|e| matches!(e, Event::Message(_)))
        .count();
    assert_eq!(messages, 1);
}

#[test]
fn names_are_unique_while_attached() {
    let mut h = Harness::new();
    h.attach("s1", "Alice", 1);
    assert_eq!(h.attach("s2", "alice", 2), ChatResponse::NameTaken);
    // The accepting node found s1's node dead: compare-and-swap takeover.
    let r = h.run(ChatCommand::Attach {
        session: "s2".into(),
        user: "alice".into(),
        node: 2,
        replaces: Some("s1".into()),
        resume: None,
        adopt: false,
        authenticated: false,
    });
    assert!(matches!(r, ChatResponse::Attached { resumed: false, .. }));
    assert!(h.state.session("s1").is_none());
}

#[test]
fn detached_name_can_be_claimed() {
    let mut h = Harness::new();
    let attachment = h.attached("s1", "alice", 1);
    h.detach("s1", attachment);
    assert!(matches!(
        h.attach("s2", "alice", 2),
        ChatResponse::Attached { .. }
    ));
}

#[test]
fn stale_detach_does_not_detach_a_newer_connection() {
    let mut h = Harness::new();
    let attachment = h.attached("s1", "alice", 1);
    assert!(matches!(
        h.attach("s1", "alice", 2),
        ChatResponse::Attached { resumed: true, .. }
    ));
    h.detach("s1", attachment);
    assert!(h.state.session("s1").unwrap().attached.is_some());
}

#[test]
fn send_requires_membership_and_known_users() {
    let mut h = Harness::new();
    h.attach("s1", "alice", 1);
    assert!(matches!(
        h.run(send("s1", "a", "#x")),
        ChatResponse::NotMember { .. }
    ));
    assert!(matches!(
        h.run(send("s1", "b", "bob")),
        ChatResponse::NoSuchUser { .. }
    ));
    h.attach("s2", "bob", 1);
    assert!(matches!(
        h.run(send("s1", "c", "BOB")),
        ChatResponse::Sent { .. }
    ));
}

#[test]
fn detached_sessions_expire_with_their_dedup_state() {
    let mut h = Harness::new();
    h.detached_member("s1", "alice", "#r");
    h.run_at(
        1000 + TTL + SWEEP_EVERY_MS,
        ChatCommand::DetachNode { node: 9 },
    );
    assert!(h.state.session("s1").is_none());
    assert!(h.state.holder_of("alice").is_none());
    assert!(h.state.room_name("#r").is_none());
}

#[test]
fn resume_is_decided_on_the_state_at_the_entry() {
    let mut h = Harness::new();
    h.detached_member("s1", "alice", "#r");
    // A lagging node proposes a fresh token but names the session to resume.
    let r = h.run(attach_cmd("fresh", "alice", 3, Some("s1")));
    assert!(
        matches!(&r, ChatResponse::Attached { session, resumed: true, .. } if session == "s1"),
        "{r:?}"
    );
    assert!(h.state.session("fresh").is_none());
    assert!(h.state.session("s1").unwrap().rooms.contains("#r"));
    // Another user's token is not resumable: a new session.
    let r = h.run(attach_cmd("s2", "bob", 3, Some("s1")));
    assert!(
        matches!(r, ChatResponse::Attached { resumed: false, .. }),
        "{r:?}"
    );
}

#[test]
fn adopt_resumes_the_session_a_name_left_behind() {
    let mut h = Harness::new();
    let attachment = h.attached("s1", "alice", 1);
    let mut adopt = attach_cmd("s9", "alice", 2, None);
    if let ChatCommand::Attach { adopt, .. } = &mut adopt {
        *adopt = true;
    }
    assert_eq!(
        h.run(adopt.clone()),
        ChatResponse::NameTaken,
        "holder still attached"
    );
    h.detach("s1", attachment);
    assert!(
        matches!(h.run(adopt), ChatResponse::Attached { resumed: true, session, .. } if session == "s1")
    );
}

#[test]
fn same_log_same_state() {
    let cmds = [
        attach_cmd("s1", "a", 1, None),
        join("s1", "#r"),
        send("s1", "1", "#r"),
        ChatCommand::Leave {
            session: "s1".into(),
            room: "#r".into(),
        },
    ];
    let run = || {
        let mut h = Harness::new();
        for (i, c) in cmds.iter().enumerate() {
            h.run_at(i as i64 * 7, c.clone());
        }
        h.state
    };
    assert_eq!(run(), run());
}

#[test]
fn a_dedup_window_keeps_its_serialized_form_and_its_newest_ids() {
    // Snapshots carry the window as a map and a list of strings.
    let json = r#"{"ids":{"a":1,"b":2},"order":["a","b"]}"#;
    let mut window: DedupWindow = serde_json::from_str(json).unwrap();
    assert_eq!((window.get("a"), window.get("b")), (Some(1), Some(2)));
    let back: serde_json::Value = serde_json::to_value(&window).unwrap();
    assert_eq!(
        back,
        serde_json::from_str::<serde_json::Value>(json).unwrap()
    );
    for i in 0..DEDUP_WINDOW as u64 {
        window.insert(&format!("n{i}"), 10 + i);
    }
    assert_eq!(window.len(), DEDUP_WINDOW);
    assert_eq!((window.get("a"), window.get("b")), (None, None));
    assert_eq!(window.iter().next(), Some(("n0", 10)));
    assert_eq!(window.get("n0"), Some(10));
}
