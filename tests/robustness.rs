//! The raft port's secret, writes without a leader, and slow clients.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[test]
fn raft_port_requires_the_secret_and_applies_nothing_without_it() {
    let cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let mut c = cluster.login(leader, "victim");
    c.join("#locked");
    let before = cluster.status(leader).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    let body = json!({
        "commands": [{"op": "send", "session": c.session.clone().unwrap(), "id": "forged", "to": "#locked", "text": "forged"}],
        "timeout_ms": 1000
    })
    .to_string();
    let raft = &cluster.node(leader).raft;
    for secret_header in ["", "x-raftchat-secret: wrong\r\n"] {
        let request = format!(
            "POST /api/write HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{secret_header}x-raftchat-target: {leader}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (code, _) = http_raw(raft, &request).unwrap();
        assert_eq!(code, 401, "with {secret_header:?}");
        let append = format!(
            "POST /raft/append HTTP/1.1\r\nHost: x\r\n{secret_header}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        assert_eq!(http_raw(raft, &append).unwrap().0, 401);
    }
    // Nothing was applied: the room's history is empty and the applied index did not move
    // because of the forged write.
    assert!(c.full_history("#locked").is_empty());
    let after = cluster.status(leader).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    assert!(after <= before + 1, "applied {before} -> {after}");
}

#[test]
fn a_write_without_a_leader_is_answered_unavailable_not_held_forever() {
    let mut cluster = Cluster::start(3, "[chat]\nwrite_timeout_ms = 1500\n");
    cluster.wait_leader(&[1, 2, 3], T);
    let mut c = cluster.login(1, "alone");
    c.join("#quorum");
    assert_eq!(c.say("#quorum", "ok", "with quorum")["type"], "ack");
    cluster.kill(2);
    cluster.kill(3);
    let started = Instant::now();
    let reply = c.say("#quorum", "lost", "without quorum");
    let waited = started.elapsed();
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert_eq!(reply["id"], "lost");
    assert!(
        waited >= Duration::from_millis(1000),
        "held only {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "held {waited:?}");
    // /readyz says why.
    wait_for(T, "/readyz to turn 503", || {
        let (code, body) = http_get(&cluster.node(1).metrics, "/readyz").ok()?;
        (code == 503 && body.contains("not ready")).then_some(())
    });
    // The same id goes through once a majority is back, and is stored once.
    cluster.start_node(2);
    let acked = wait_for(T, "the retry to be acknowledged", || {
        let r = c.say("#quorum", "lost", "without quorum");
        (r["type"] == "ack").then_some(r)
    });
    assert!(acked["index"].as_u64().unwrap() > 0);
    let history = c.full_history("#quorum");
    let ids: Vec<&str> = history.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["ok", "lost"]);
}

#[test]
fn a_client_that_stops_reading_is_disconnected_and_others_carry_on() {
    let cluster = Cluster::start(
        3,
        "[chat]\nclient_queue_events = 1024\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    );
    cluster.wait_leader(&[1, 2, 3], T);
    // The slow client joins and then never reads.
    let mut slow = cluster.login(1, "sloth");
    slow.join("#firehose");
    let mut reader = cluster.login(1, "reader");
    reader.join("#firehose");
    let mut writer = cluster.login(2, "firehose");
    writer.join("#firehose");
    let _writer_drain = writer.drain_in_background();
    // Far more than the queue, the connection's frame buffer and the socket buffers hold.
    let total = 8000;
    let reading = std::thread::spawn(move || {
        // 32 MB through three debug-build nodes: ~20 s alone, longer beside the whole suite.
        reader.wait_messages(4 * T, "every message at the reader", |m| m.len() >= total);
        reader.messages.len()
    });
    let text = "y".repeat(4000);
    for i in 0..total {
        writer
            .send(json!({"type": "send", "to": "#firehose", "id": format!("f{i}"), "text": text}))
            .unwrap();
    }
    assert_eq!(reading.join().unwrap(), total, "the reader got everything");
    // The slow one was cut off with a reason instead of stalling the node.
    let mut saw_error = false;
    while let Some(v) = slow.next_reply(Duration::from_secs(5)) {
        if v["type"] == "error" {
            // Too far behind the event stream, or too many bytes queued: either closes it.
            assert!(v["code"] == "unavailable" || v["code"] == "slow", "{v}");
            saw_error = true;
        }
    }
    assert!(saw_error, "the slow client got no disconnect reason");
    assert!(slow.closed_within(T));
}

/// The client library reads from the server no faster than its application takes events:
/// an application that does not read while its room gets eight times what the library
/// queues finds at most `MAX_QUEUED_BYTES` waiting; the server, no longer read, cuts the
/// connection off as slow; and the library resumes, so the application still gets every
/// message once, in order. Before, the library's queue to the application had no bound.
#[test]
fn the_client_library_holds_a_bounded_number_of_events_for_an_application_that_does_not_read() {
    use raftchat::client::{Client as ChatClient, ClientConfig, Event, MAX_QUEUED_BYTES};
    let cluster = Cluster::start(
        1,
        "[chat]\nclient_queue_events = 1024\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    );
    cluster.wait_leader(&[1], T);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = ClientConfig::new(vec![cluster.node(1).chat.clone()], "idler");
    config.rooms = vec!["#pile".into()];
    let mut idler = runtime.block_on(async {
        let mut idler = ChatClient::start(config);
        loop {
            let event = tokio::time::timeout(T, idler.next_event()).await;
            if let Some(Event::Joined { .. }) = event.expect("joined in time") {
                return idler;
            }
        }
    });
    // Its driver keeps running on the runtime's threads while nobody reads its events.
    // Several times what the library, the server's queue and both sockets' buffers hold.
    let text = "z".repeat(4000);
    let total = 8 * MAX_QUEUED_BYTES / text.len();
    let mut writer = cluster.login(1, "piler");
    writer.join("#pile");
    // Its acks are read (and dropped) until the node stops at the end of the test.
    let _acks = writer.drain_in_background();
    let applied = || {
        cluster
            .status(1)
            .and_then(|s| s["applied_index"].as_u64())
            .unwrap_or(0)
    };
    let before = applied();
    for i in 0..total {
        writer
            .send(json!({"type": "send", "to": "#pile", "id": format!("p{i}"), "text": text}))
            .unwrap();
    }
    let within_bound = |idler: &ChatClient| {
        let queued = idler.queued_bytes();
        assert!(queued <= MAX_QUEUED_BYTES, "{queued} bytes queued");
        queued
    };
    wait_for(4 * T, "the idle client's queue to fill", || {
        // Filled but for less than one hand-over (at most 256 messages).
        (within_bound(&idler) >= MAX_QUEUED_BYTES / 2).then_some(())
    });
    wait_for(4 * T, "every message to be applied", || {
        within_bound(&idler);
        (applied() >= before + total as u64).then_some(())
    });
    // Now it reads: each message once, in order, none missing.
    let (ids, cut_off) = runtime.block_on(async {
        let mut ids = Vec::new();
        let mut cut_off = false;
        while ids.len() < total {
            let event = tokio::time::timeout(4 * T, idler.next_event()).await;
            match event.expect("every message in time") {
                Some(Event::Message(m)) if m.to == "#pile" => ids.push(m.id),
                Some(Event::Refused { code, .. }) if code == "slow" => cut_off = true,
                // The server's close can reach it as a reset, before the reason.
                Some(Event::Disconnected { .. }) => cut_off = true,
                Some(Event::SessionLost { .. }) => panic!("the session was lost"),
                Some(Event::Failed(why)) => panic!("the client failed: {why}"),
                Some(_) => {}
                None => panic!("the client ended"),
            }
        }
        (ids, cut_off)
    });
    let want: Vec<String> = (0..total).map(|i| format!("p{i}")).collect();
    assert!(
        ids == want,
        "{} messages, out of order or repeated",
        ids.len()
    );
    // The client stopped reading, so the server saw a slow reader (a client that read on
    // into an unbounded queue would never be one).
    assert!(cut_off, "the server never found the idle client slow");
}

#[test]
fn a_client_that_asks_for_much_and_never_reads_is_cut_off_at_its_output_budget() {
    // A 1 MiB budget (the default is 8) gets there with less work beside the other tests.
    let cluster = Cluster::start(
        3,
        "[chat]\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\nmax_output_bytes = 1048576\nmax_text_bytes = 16384\n",
    );
    cluster.wait_leader(&[1, 2, 3], T);
    // 100 messages of 15 KB: every full history answer is over a megabyte.
    let mut filler = cluster.login(2, "filler");
    filler.join("#big");
    let text = "z".repeat(15 * 1024);
    for i in 0..100 {
        let ack = filler.say("#big", &format!("b{i}"), &text);
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let pid = cluster.pid(1).unwrap();
    let rss_before = rss_bytes(pid).unwrap();

    let mut attacker = cluster.login(1, "hoarder");
    attacker.join("#big");
    let mut bystander = cluster.login(1, "bystander");
    bystander.join("#calm");
    // Ask again and again, never read: without a byte budget each request queues megabytes.
    let mut sent = 0;
    for _ in 0..100 {
        let asked = json!({"type": "history", "room": "#big", "limit": 1000});
        if attacker.send(asked).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 0);
    wait_for(T, "the node to cut the hoarder off", || {
        cluster.log(1).contains("telling it `slow`").then_some(())
    });
    // Reading again: what the socket held, then why it was cut off, then the end.
    let hoarder = std::thread::spawn(move || {
        let mut told = None;
        while let Some(v) = attacker.next_reply(Duration::from_secs(10)) {
            if v["type"] == "error" {
                told = Some(v);
            }
        }
        (told, attacker.closed_within(T))
    });
    // The node goes on serving others on the same node meanwhile.
    for i in 0..20 {
        let ack = bystander.say("#calm", &format!("c{i}"), "still fine");
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let rss_after = rss_bytes(pid).unwrap();
    assert!(
        rss_after < 300 * 1024 * 1024,
        "node RSS {rss_after} bytes (was {rss_before}) after a client hoarded output"
    );
    let (told, closed) = hoarder.join().unwrap();
    let told = told.expect("the hoarder was told why it was disconnected");
    assert_eq!(told["code"], "slow", "{told}");
    assert!(closed);
    wait_for(T, "the slow disconnect to be counted", || {
        let metrics = http_get(&cluster.node(1).metrics, "/metrics").ok()?.1;
        metrics
            .lines()
            .any(|l| {
                l.starts_with("raftchat_client_disconnects_total") && l.contains("reason=\"slow\"")
            })
            .then_some(())
    });
}

#[test]
fn limits_refuse_long_texts_too_many_rooms_and_too_many_connections_from_one_address() {
    let cluster = Cluster::start(
        1,
        "[chat]\nmax_text_bytes = 100\nmax_rooms_per_session = 2\nmax_clients_per_ip = 3\nidle_timeout_secs = 2\n",
    );
    cluster.wait_leader(&[1], T);
    let mut c = cluster.login(1, "limited");
    c.join("#a");
    let long = c
        .request(json!({"type": "send", "to": "#a", "id": "l1", "text": "x".repeat(101)}))
        .unwrap();
    assert_eq!(
        (long["type"].as_str(), long["code"].as_str()),
        (Some("error"), Some("limit")),
        "{long}"
    );
    assert_eq!(
        c.say("#a", "s1", "short")["type"],
        "ack",
        "the connection goes on"
    );
    c.join("#b");
    let third = c.request(json!({"type": "join", "room": "#c"})).unwrap();
    assert_eq!(third["code"], "limit", "{third}");
    // Rejoining a room it is in is not a new room.
    assert_eq!(
        c.request(json!({"type": "join", "room": "#a"})).unwrap()["type"],
        "joined"
    );

    // Three connections from 127.0.0.1 at once at most (`c` is one).
    assert_eq!(c.request(json!({"type": "ping"})).unwrap()["type"], "pong");
    let _two = cluster.client(1);
    let _three = cluster.client(1);
    let mut fourth = cluster.client(1);
    let refused = fourth.next_reply(T).expect("a refusal");
    assert_eq!(refused["code"], "limit", "{refused}");
    assert!(fourth.closed_within(T));
    let s = scrape_metric(&cluster, "raftchat_bad_requests_total{reason=\"ip_limit\"}");
    assert_eq!(s, Some(1.0));
    let _ = c.request(json!({"type": "ping"}));
    drop((_two, _three));

    // Idle for over `idle_timeout_secs` after hello: closed; a client that pings stays.
    let mut pinger = wait_for(T, "a slot for the pinger", || {
        let mut p = Client::try_connect(&cluster.node(1).chat)?;
        let w = p.request(json!({"type": "hello", "user": "pinger"}))?;
        (w["type"] == "welcome").then_some(p)
    });
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        assert!(
            pinger.request(json!({"type": "ping"})).is_some(),
            "the pinger was closed"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(c.closed_within(T), "the idle connection was not closed");
}

fn scrape_metric(cluster: &Cluster, series: &str) -> Option<f64> {
    cluster.metric(1, series)
}

#[test]
fn the_metrics_port_caps_its_connections_and_recovers() {
    let cluster = Cluster::start(1, "");
    cluster.wait_leader(&[1], T);
    let addr = cluster.node(1).metrics.clone();
    // Idle sockets up to the cap (128), then one more: it is closed at once.
    let held: Vec<std::net::TcpStream> = (0..128)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    wait_for(T, "a connection past the cap to be closed", || {
        let mut extra = std::net::TcpStream::connect(&addr).ok()?;
        extra.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut byte = [0u8; 1];
        (std::io::Read::read(&mut extra, &mut byte).ok()? == 0).then_some(())
    });
    drop(held);
    wait_for(T, "/healthz once the idle sockets are gone", || {
        (http_get(&addr, "/healthz").ok()?.0 == 200).then_some(())
    });
}
