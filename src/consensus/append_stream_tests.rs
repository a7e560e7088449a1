//! The leader's end of a replication connection against a scripted follower.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use openraft::raft::AppendEntriesRequest;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

use super::*;
use crate::consensus::rpc_client::{ClientTls, RpcClient, RpcObservers};
use crate::consensus::types::Vote;

/// What the scripted follower does with the `n`-th frame (from 0) of session `s`: answer it
/// after the delay, or never.
type Script = fn(u64, usize) -> Option<Duration>;

/// A follower that upgrades every connection and answers frames as `script` says, in order.
async fn follower(script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {PROTOCOL}\r\n\r\n"
                );
                tokio::io::AsyncWriteExt::write_all(&mut socket, answer.as_bytes())
                    .await
                    .unwrap();
                let mut frames = Framed::new(socket, codec());
                let mut seen = std::collections::HashMap::<u64, usize>::new();
                while let Some(Ok(frame)) = frames.next().await {
                    let session = u64::from_be_bytes(frame[..8].try_into().unwrap());
                    let n = seen.entry(session).or_default();
                    let delay = script(session, *n);
                    *n += 1;
                    let Some(delay) = delay else { continue };
                    tokio::time::sleep(delay).await;
                    // Matching up to index 100 × session + n: which request it answers.
                    let matched = openraft::testing::log_id::<TypeConfig>(
                        1,
                        1,
                        100 * session + *n as u64 - 1,
                    );
                    let result: StreamAppendResult<TypeConfig> = Ok(Some(matched));
                    let mut answer = session.to_be_bytes().to_vec();
                    answer.push(ANSWER);
                    answer.extend_from_slice(&rmp_serde::to_vec_named(&result).unwrap());
                    if frames.send(Bytes::from(answer)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    }
}

fn rpc() -> RpcClient {
    RpcClient::new("secret", RpcObservers::default(), ClientTls::Plain)
}

#[tokio::test]
async fn answers_for_an_abandoned_session_are_skipped() {
    // Session 1's answer comes late; session 2's after it, on the same connection.
    let addr =
        follower(|session, _| Some(Duration::from_millis(if session == 1 { 300 } else { 0 })))
            .await;
    let mut replication = Replication::default();
    assert!(replication.ready(&rpc(), 2, &addr).await);
    {
        let mut answers = replication.session(futures_util::stream::iter([heartbeat()]), rpc(), 2);
        let waited = tokio::time::timeout(Duration::from_millis(50), answers.next()).await;
        assert!(waited.is_err(), "session 1 answered early");
    }
    assert!(replication.connection.is_some());
    let mut answers = replication.session(
        futures_util::stream::iter([heartbeat(), heartbeat()]),
        rpc(),
        2,
    );
    for n in 0..2 {
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.next()).await;
        let Ok(Some(Ok(Ok(Some(matched))))) = answer else {
            panic!("answer {n}: {answer:?}");
        };
        // Session 1's late answer (index 100) was skipped.
        assert_eq!(matched.index, 200 + n);
    }
    // Every request sent and answered: the session ends, the connection stays.
    let end = tokio::time::timeout(Duration::from_secs(5), answers.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(answers);
    assert!(replication.connection.is_some());
}

#[tokio::test]
async fn a_session_without_answers_fails_and_the_next_goes_over_http() {
    let addr = follower(|_, _| None).await;
    let mut replication = Replication::default();
    assert!(replication.ready(&rpc(), 2, &addr).await);
    let started = Instant::now();
    let mut answers = replication.session(futures_util::stream::iter([heartbeat()]), rpc(), 2);
    let answer = tokio::time::timeout(Duration::from_secs(5), answers.next()).await;
    assert!(matches!(answer, Ok(Some(Err(_)))), "{answer:?}");
    assert!(started.elapsed() >= ANSWER_TIMEOUT);
    assert!(answers.next().await.is_none());
    drop(answers);
    // The connection is gone, and none is tried again for a while.
    assert!(replication.connection.is_none());
    assert!(!replication.ready(&rpc(), 2, &addr).await);
}

#[tokio::test]
async fn a_peer_that_refuses_the_upgrade_gets_http_for_a_while() {
    // Not our protocol: a plain HTTP answer to the upgrade.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = tokio::io::AsyncWriteExt::write_all(
                &mut socket,
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            )
            .await;
        }
    });
    let mut replication = Replication::default();
    assert!(!replication.ready(&rpc(), 2, &addr).await);
    assert!(!replication.ready(&rpc(), 2, &addr).await);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dropped_session_lets_go_of_its_input_at_once() {
    // openraft's request stream holds the replication state while it waits for new logs,
    // and the next session needs it: dropping a session must drop its input right away, not
    // whenever a task it spawned is next scheduled.
    let addr = follower(|_, _| Some(Duration::ZERO)).await;
    let mut replication = Replication::default();
    assert!(replication.ready(&rpc(), 2, &addr).await);
    let held = Arc::new(());
    let holder = held.clone();
    let input = futures_util::stream::iter([heartbeat()])
        .chain(futures_util::stream::pending())
        .map(move |request| {
            let _ = &holder;
            request
        });
    let mut answers = replication.session(Box::pin(input), rpc(), 2);
    let answer = tokio::time::timeout(Duration::from_secs(5), answers.next()).await;
    assert!(matches!(answer, Ok(Some(Ok(Ok(_))))), "{answer:?}");
    // Waiting for more input, as a replication session does between writes.
    let waited = tokio::time::timeout(Duration::from_millis(50), answers.next()).await;
    assert!(waited.is_err(), "{waited:?}");
    drop(answers);
    assert_eq!(
        Arc::strong_count(&held),
        1,
        "the input outlived its session"
    );
    assert!(replication.connection.is_some());
}

#[test]
fn every_kind_of_entry_and_answer_survives_the_frame_encoding() {
    use crate::chat::command::ChatCommand;
    use crate::consensus::types::{Entry, NodeAddr, Request};
    use openraft::entry::RaftEntry;
    let log_id = |index| openraft::testing::log_id::<TypeConfig>(3, 1, index);
    let addr = |n: u64| NodeAddr {
        chat: format!("127.0.0.1:{n}"),
        raft: format!("127.0.0.1:1{n}"),
        metrics: format!("127.0.0.1:2{n}"),
        advertise_chat: (n == 2).then(|| "chat.example:6667".to_string()),
    };
    // Voters 1 to 3 and a learner, 4; node 2 advertises another chat address.
    let nodes =
        std::collections::BTreeMap::from([(1, addr(1)), (2, addr(2)), (3, addr(3)), (4, addr(4))]);
    let membership =
        openraft::Membership::<u64, NodeAddr>::new(vec![[1, 2, 3].into()], nodes).unwrap();
    let request = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(log_id(9)),
        leader_commit: Some(log_id(8)),
        entries: vec![
            Entry::new_blank(log_id(10)),
            Entry::new_membership(log_id(11), membership),
            Entry::new_normal(
                log_id(12),
                Request {
                    ts_ms: 1_765_000_000_123,
                    command: ChatCommand::Send {
                        session: "s1".into(),
                        id: "m-1".into(),
                        to: "#ünïcode".into(),
                        text: "quotes \" and \\ and \u{1F600} and \n".into(),
                    }
                    .into(),
                },
            ),
            Entry::new_normal(
                log_id(13),
                Request {
                    ts_ms: -1,
                    command: ChatCommand::Attach {
                        session: "s2".into(),
                        user: "ann".into(),
                        node: 2,
                        replaces: None,
                        resume: Some("s0".into()),
                        adopt: true,
                        authenticated: false,
                    }
                    .into(),
                },
            ),
            Entry::new_normal(
                log_id(14),
                Request {
                    ts_ms: 7,
                    command: ChatCommand::Configure {
                        settings: crate::chat::state::Settings {
                            session_ttl_ms: 5,
                            retention: crate::chat::history::Retention {
                                max_per_room: 3,
                                max_age_ms: 4,
                            },
                        },
                    }
                    .into(),
                },
            ),
        ],
    };
    // JSON (the HTTP fallback, the log on disk) keeps the command's `op` tag.
    let json = serde_json::to_value(&request.entries[2]).unwrap();
    assert_eq!(json["payload"]["Normal"]["command"]["op"], "send", "{json}");
    let mut frame = BytesMut::new();
    encode_into(&mut frame, &request).unwrap();
    let back: AppendEntriesRequest<TypeConfig> = decode(&frame).unwrap();
    assert_eq!(back.vote, request.vote);
    assert_eq!(back.prev_log_id, request.prev_log_id);
    assert_eq!(back.leader_commit, request.leader_commit);
    assert_eq!(back.entries, request.entries);

    let answers: [StreamAppendResult<TypeConfig>; 4] = [
        Ok(Some(log_id(13))),
        Ok(None),
        Err(openraft::raft::StreamAppendError::Conflict(log_id(9))),
        Err(openraft::raft::StreamAppendError::HigherVote(Vote::new(
            4, 2,
        ))),
    ];
    for answer in answers {
        let mut frame = BytesMut::new();
        encode_into(&mut frame, &answer).unwrap();
        assert_eq!(
            decode::<StreamAppendResult<TypeConfig>>(&frame).unwrap(),
            answer
        );
    }
    // Garbage is an error, not a panic.
    assert!(decode::<AppendEntriesRequest<TypeConfig>>(b"\xc1\xff{").is_err());
}
