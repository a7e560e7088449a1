//! Direct messages are private: only the sessions that held the sender's and the target's
//! names when a message was committed ever receive it, live or replayed.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn resume(cluster: &Cluster, node: u64, user: &str, session: &str) -> (Client, Value) {
    wait_for(T, "the resume to be accepted", || {
        let mut c = Client::try_connect(&cluster.node(node).chat)?;
        let w = c.request(
            json!({"type": "hello", "user": user, "session": session, "resume_from": 0}),
        )?;
        (w["type"] == "welcome").then_some((c, w))
    })
}

fn has_text(messages: &[Value], text: &str) -> bool {
    messages.iter().any(|m| m["text"] == text)
}

#[test]
fn a_new_holder_of_a_name_never_sees_earlier_direct_messages() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut alice = cluster.login(1, "alice");
    let mut bob = cluster.login(2, "bob");
    let bob_session = bob.session.clone().unwrap();
    let ack = alice.say("bob", "d1", "for bob only");
    assert_eq!(ack["type"], "ack", "{ack}");
    bob.wait_messages(T, "the direct message", |m| has_text(m, "for bob only"));
    // The sender sees its own message too.
    alice.wait_messages(T, "the sender's copy", |m| has_text(m, "for bob only"));

    // Bob's own session, resumed from the start on another node, replays it.
    drop(bob);
    let (mut bob, welcome) = resume(&cluster, 3, "bob", &bob_session);
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 1, "{welcome}");
    bob.wait_messages(T, "the replayed direct message", |m| {
        has_text(m, "for bob only")
    });
    drop(bob);

    // Someone else takes the free name "bob", leaves, and resumes that session from 0.
    let taker = cluster.login(3, "bob");
    let taker_session = taker.session.clone().unwrap();
    assert_ne!(taker_session, bob_session, "a new session, not bob's");
    drop(taker);
    let (mut taker, welcome) = resume(&cluster, 1, "bob", &taker_session);
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(
        welcome["replayed"], 0,
        "nothing sent before it held the name: {welcome}"
    );

    // What is sent to the name now reaches its holder now, and only that is replayed.
    let ack = alice.say("bob", "d2", "for whoever is bob now");
    assert_eq!(ack["type"], "ack", "{ack}");
    taker.wait_messages(T, "the new direct message", |m| {
        has_text(m, "for whoever is bob now")
    });
    assert!(
        !has_text(&taker.messages, "for bob only"),
        "{:?}",
        taker.messages
    );
    drop(taker);
    let (mut taker, welcome) = resume(&cluster, 2, "bob", &taker_session);
    assert_eq!(welcome["replayed"], 1, "{welcome}");
    taker.wait_messages(T, "the replay", |m| has_text(m, "for whoever is bob now"));
    assert!(!has_text(&taker.messages, "for bob only"));
}
