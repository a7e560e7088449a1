//! Pipelined replication: a leader replicates to each follower over upgraded connections of
//! the raft port (`/raft/stream`), which only a holder of the cluster secret can open and
//! which a malformed frame closes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);
const CONNECTIONS: &str = "raftchat_raft_replication_connections ";

/// Opens `/raft/stream` on `addr` with the given extra header lines; the status code and the
/// socket, positioned after the answer's head.
fn upgrade(addr: &str, target: u64, headers: &str) -> (u16, TcpStream) {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(T)).unwrap();
    let request = format!(
        "POST /raft/stream HTTP/1.1\r\nHost: x\r\nx-raftchat-target: {target}\r\n{headers}Content-Length: 0\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(socket.read(&mut byte).unwrap(), 1, "answer cut: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, socket)
}

fn frame(session: u64, body: &[u8]) -> Vec<u8> {
    let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads one frame: its session, kind and body.
fn read_frame(socket: &mut TcpStream) -> (u64, u8, Vec<u8>) {
    let mut length = [0u8; 4];
    socket.read_exact(&mut length).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
    socket.read_exact(&mut body).unwrap();
    let session = u64::from_be_bytes(body[..8].try_into().unwrap());
    (session, body[8], body[9..].to_vec())
}

/// Whether the peer closed `socket` (rather than leaving it open) within `T`.
fn closed(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn followers_serve_their_leaders_replication_on_upgraded_connections() {
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let mut c = cluster.login(leader, "writer");
    c.join("#pipe");
    for i in 0..50 {
        assert_eq!(c.say("#pipe", &format!("m{i}"), "hello")["type"], "ack");
    }
    // One connection for the leader's replication to each follower, one for its heartbeats.
    for &id in &followers {
        wait_for(T, "a follower serving its leader's connections", || {
            (cluster.metric(id, CONNECTIONS)? == 2.0).then_some(())
        });
    }
    assert_eq!(cluster.metric(leader, CONNECTIONS), Some(0.0));
    // The answers that came back on them count as the leader's append RPCs.
    let appends = format!(
        "raftchat_raft_rpc_duration_seconds_count{{peer=\"{}\",rpc=\"append\"}}",
        followers[0]
    );
    assert!(cluster.metric(leader, &appends).unwrap_or(0.0) >= 1.0);
    cluster.wait_applied_equal(&[1, 2, 3], 50, T);

    // A follower that comes back is served again, and catches up on what it missed.
    let back = followers[0];
    cluster.kill(back);
    for i in 50..80 {
        assert_eq!(c.say("#pipe", &format!("m{i}"), "hello")["type"], "ack");
    }
    cluster.start_node(back);
    wait_for(T, "the restarted follower serving its leader again", || {
        (cluster.metric(back, CONNECTIONS)? == 2.0).then_some(())
    });
    let applied = cluster.status(leader).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    cluster.wait_applied_equal(&[1, 2, 3], applied, T);
    assert_eq!(c.full_history("#pipe").len(), 80);
}

#[test]
fn the_replication_upgrade_needs_the_secret_and_a_bad_frame_closes_it() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let raft = &cluster.node(follower).raft;
    let upgrade_headers = "Connection: upgrade\r\nUpgrade: raftchat-append/2\r\n";

    let (code, _) = upgrade(raft, follower, upgrade_headers);
    assert_eq!(code, 401, "without the secret");
    let (code, _) = upgrade(
        raft,
        follower,
        &format!("x-raftchat-secret: wrong\r\n{upgrade_headers}"),
    );
    assert_eq!(code, 401, "with a wrong secret");
    let (code, _) = upgrade(raft, follower, "x-raftchat-secret: test-secret\r\n");
    assert_eq!(code, 400, "without the upgrade");
    let secret = format!("x-raftchat-secret: test-secret\r\n{upgrade_headers}");
    let (code, _) = upgrade(raft, leader, &secret);
    assert_eq!(code, 421, "meant for another node");
    // The JSON frames of older versions: refused, so such a leader replicates over HTTP.
    let (code, _) = upgrade(
        raft,
        follower,
        "x-raftchat-secret: test-secret\r\nConnection: upgrade\r\nUpgrade: raftchat-append/1\r\n",
    );
    assert_eq!(code, 400, "the older protocol");

    // An AppendEntries from a leader of term 0 is answered (the follower's vote is higher),
    // on the session it came with.
    let (code, mut socket) = upgrade(raft, follower, &secret);
    assert_eq!(code, 101);
    let stale = json!({
        "vote": {"leader_id": {"term": 0, "node_id": leader}, "committed": true},
        "prev_log_id": null,
        "leader_commit": null,
        "entries": []
    });
    // Frames are MessagePack with field names.
    let stale = rmp_serde::to_vec_named(&stale).unwrap();
    socket.write_all(&frame(7, &stale)).unwrap();
    let (session, kind, body) = read_frame(&mut socket);
    assert_eq!((session, kind), (7, 0));
    let answer: serde_json::Value = rmp_serde::from_slice(&body).unwrap();
    assert!(answer["Err"]["HigherVote"].is_object(), "{answer}");

    // Not an AppendEntries: the connection is closed.
    socket.write_all(&frame(8, b"{not json")).unwrap();
    assert!(
        closed(&mut socket),
        "a bad AppendEntries left the connection open"
    );
    // Shorter than a session number; larger than any frame may be.
    let (_, mut socket) = upgrade(raft, follower, &secret);
    socket.write_all(&[0, 0, 0, 3, 1, 2, 3]).unwrap();
    assert!(
        closed(&mut socket),
        "a short frame left the connection open"
    );
    let (_, mut socket) = upgrade(raft, follower, &secret);
    socket.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    assert!(closed(&mut socket), "a huge frame left the connection open");

    // The cluster still works, and nothing was applied by any of it.
    let mut c = cluster.login(leader, "after");
    c.join("#after");
    assert_eq!(c.say("#after", "1", "still fine")["type"], "ack");
    let applied = cluster.status(leader).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    cluster.wait_applied_equal(&[1, 2, 3], applied, T);
}
