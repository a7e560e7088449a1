//! Metrics, health endpoints and OpenTelemetry spans, against real node processes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prometheus_parse::{Scrape, Value};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Every family SPEC section 6 names, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("raftchat_health_probes_total", "counter"),
    ("raftchat_health_probe_duration_seconds", "histogram"),
    ("raftchat_peer_up", "gauge"),
    ("raftchat_peer_transitions_total", "counter"),
    ("raftchat_raft_term", "gauge"),
    ("raftchat_raft_is_leader", "gauge"),
    ("raftchat_raft_has_leader", "gauge"),
    ("raftchat_raft_leader_id", "gauge"),
    ("raftchat_raft_leader_changes_total", "counter"),
    ("raftchat_raft_last_log_index", "gauge"),
    ("raftchat_raft_applied_index", "gauge"),
    ("raftchat_raft_replication_lag_entries", "gauge"),
    ("raftchat_raft_leader_transfers_total", "counter"),
    ("raftchat_raft_rpc_duration_seconds", "histogram"),
    ("raftchat_storage_sync_duration_seconds", "histogram"),
    ("raftchat_failovers_total", "counter"),
    ("raftchat_failover_duration_seconds", "histogram"),
    ("raftchat_leaderless_seconds_total", "counter"),
    ("raftchat_client_connections", "gauge"),
    ("raftchat_client_connects_total", "counter"),
    ("raftchat_client_reconnects_total", "counter"),
    ("raftchat_client_disconnects_total", "counter"),
    ("raftchat_client_resends_deduplicated_total", "counter"),
    ("raftchat_client_replayed_messages_total", "counter"),
    ("raftchat_messages_committed_total", "counter"),
    ("raftchat_message_commit_duration_seconds", "histogram"),
    ("raftchat_messages_delivered_total", "counter"),
    ("raftchat_bad_requests_total", "counter"),
    ("raftchat_build_info", "gauge"),
    // SPEC 9d.
    ("raftchat_messages_failed_total", "counter"),
    ("raftchat_raft_commit_index", "gauge"),
    ("raftchat_raft_voters", "gauge"),
    ("raftchat_raft_rpc_failures_total", "counter"),
    ("raftchat_raft_rpc_hedged_total", "counter"),
    ("raftchat_storage_bytes", "gauge"),
    ("raftchat_snapshot_duration_seconds", "histogram"),
    ("raftchat_snapshot_bytes", "gauge"),
    ("raftchat_client_output_bytes", "gauge"),
    ("raftchat_raft_leader_lost_total", "counter"),
    ("raftchat_raft_leader_recovered_total", "counter"),
    ("raftchat_storage_available_bytes", "gauge"),
    ("raftchat_storage_capacity_bytes", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
];

fn scrape(cluster: &Cluster, id: u64) -> Option<Scrape> {
    let (code, body) = http_get(&cluster.node(id).metrics, "/metrics").ok()?;
    if code != 200 {
        return None;
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()
}

/// The value of a counter or gauge sample (summed over series matching `labels`).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Counter(_) => "counter",
        Value::Gauge(_) => "gauge",
        Value::Histogram(_) => "histogram",
        Value::Summary(_) => "summary",
        Value::Untyped(_) => "untyped",
    }
}

#[test]
fn metrics_follow_health_leadership_failover_and_reconnects() {
    let mut cluster = Cluster::start(
        3,
        "[health]\nprobe_interval_ms = 200\nprobe_timeout_ms = 200\n",
    );
    let leader = cluster.wait_leader(&[1, 2, 3], T);

    // Every SPEC family, with its type, on every node; one leader, all know it.
    let scrapes: Vec<Scrape> = (1..=3)
        .map(|id| {
            wait_for(T, "has_leader on every node", || {
                let s = scrape(&cluster, id)?;
                (value(&s, "raftchat_raft_has_leader", &[]) == 1.0).then_some(s)
            })
        })
        .collect();
    for (i, s) in scrapes.iter().enumerate() {
        for (family, want) in FAMILIES {
            let sample = s.samples.iter().find(|x| x.metric == *family);
            let sample = sample.unwrap_or_else(|| panic!("node {}: {family} missing", i + 1));
            assert_eq!(
                kind(&sample.value),
                *want,
                "node {}: type of {family}",
                i + 1
            );
        }
    }
    let leaders: Vec<f64> = scrapes
        .iter()
        .map(|s| value(s, "raftchat_raft_is_leader", &[]))
        .collect();
    assert_eq!(
        leaders.iter().filter(|v| **v == 1.0).count(),
        1,
        "{leaders:?}"
    );

    // A resumed session on another node counts as a reconnect there.
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (a, b) = (survivors[0], survivors[1]);
    let mut c = cluster.login(a, "roamer");
    c.join("#obs");
    let session = c.session.clone().unwrap();
    drop(c);
    let reconnects = |id| {
        value(
            &scrape(&cluster, id).unwrap(),
            "raftchat_client_reconnects_total",
            &[("dialect", "json")],
        )
    };
    let before = reconnects(b);
    wait_for(T, "resume on another node", || {
        let mut c = Client::try_connect(&cluster.node(b).chat)?;
        let w = c.request(
            json!({"type": "hello", "user": "roamer", "session": session, "resume_from": 0}),
        )?;
        (w["type"] == "welcome").then_some(())
    });
    assert_eq!(reconnects(b), before + 1.0);

    // Kill the leader: survivors see it down, a leader change and a timed failover.
    let counters = |id| {
        let s = scrape(&cluster, id).unwrap();
        (
            value(&s, "raftchat_raft_leader_changes_total", &[]),
            value(&s, "raftchat_failovers_total", &[]),
            value(&s, "raftchat_failover_duration_seconds_count", &[]),
        )
    };
    let before: BTreeMap<u64, (f64, f64, f64)> =
        survivors.iter().map(|id| (*id, counters(*id))).collect();
    cluster.kill(leader);
    let killed = leader.to_string();
    for id in &survivors {
        wait_for(
            Duration::from_secs(10),
            "the survivors to see the leader down and a failover",
            || {
                let s = scrape(&cluster, *id)?;
                let (changes, failovers, timed) = before[id];
                let ok = value(&s, "raftchat_peer_up", &[("peer", &killed)]) == 0.0
                    && value(&s, "raftchat_raft_leader_changes_total", &[]) > changes
                    && value(&s, "raftchat_failovers_total", &[]) > failovers
                    && value(&s, "raftchat_failover_duration_seconds_count", &[]) > timed
                    && value(
                        &s,
                        "raftchat_peer_transitions_total",
                        &[("peer", &killed), ("to", "down")],
                    ) >= 1.0;
                ok.then_some(())
            },
        );
    }

    // RPCs to the dead node are counted as failures (not as latency samples); the new
    // families carry real values.
    wait_for(T, "failed RPCs to the killed node", || {
        let failed: f64 = survivors
            .iter()
            .filter_map(|id| scrape(&cluster, *id))
            .map(|s| value(&s, "raftchat_raft_rpc_failures_total", &[("peer", &killed)]))
            .sum();
        (failed > 0.0).then_some(())
    });
    let s = wait_for(T, "storage sizes measured", || {
        let s = scrape(&cluster, a)?;
        (value(&s, "raftchat_storage_bytes", &[("store", "log")]) > 0.0).then_some(s)
    });
    assert_eq!(value(&s, "raftchat_raft_voters", &[]), 3.0);
    assert!(value(&s, "raftchat_raft_commit_index", &[]) > 0.0);
    assert!(value(&s, "raftchat_storage_bytes", &[("store", "history")]) > 0.0);
    assert!(value(&s, "raftchat_storage_capacity_bytes", &[]) > 0.0);

    // A node cut off from the majority is not ready, and is again once it heals.
    cluster.wait_leader(&survivors, T);
    wait_for(T, "ready before the cut", || {
        (http_get(&cluster.node(a).metrics, "/readyz").ok()?.0 == 200).then_some(())
    });
    cluster.pause(b);
    wait_for(T, "/readyz 503 without a majority", || {
        let (code, body) = http_get(&cluster.node(a).metrics, "/readyz").ok()?;
        (code == 503 && body.contains("not ready")).then_some(())
    });
    cluster.resume(b);
    wait_for(T, "/readyz 200 after healing", || {
        (http_get(&cluster.node(a).metrics, "/readyz").ok()?.0 == 200).then_some(())
    });
}

#[test]
fn metrics_port_answers_bad_requests_and_stays_up() {
    let cluster = Cluster::start(1, "");
    cluster.wait_leader(&[1], T);
    let addr = &cluster.node(1).metrics;
    assert_eq!(http_get(addr, "/nope").unwrap().0, 404);
    let post =
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eq!(http_raw(addr, post).unwrap().0, 405);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    assert_eq!(http_raw(addr, &huge).unwrap().0, 431);
    let (code, body) = http_get(addr, "/healthz").unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = http_get(addr, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    for key in [
        "id",
        "role",
        "term",
        "leader",
        "commit_index",
        "applied_index",
        "peers",
        "clients",
        "version",
    ] {
        assert!(status.get(key).is_some(), "/status lacks {key}: {status}");
    }
}

/// One exported span, as the collector sees it.
#[derive(Clone, Debug)]
struct SpanSeen {
    name: String,
    trace: Vec<u8>,
    /// The node id from the resource.
    node: i64,
    /// Start, ns since the Unix epoch.
    start: u64,
    duration_ns: u64,
    /// OTLP span kind (1 internal, 2 server, 3 client).
    kind: i32,
    /// OTLP status code (2: error).
    status: i32,
    /// Span attributes and resource attributes, as text.
    attributes: BTreeMap<String, String>,
    resource: BTreeMap<String, String>,
}

/// A minimal OTLP/HTTP receiver: decodes every `ExportTraceServiceRequest` it is sent.
fn otlp_receiver() -> (String, Arc<Mutex<Vec<SpanSeen>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    use prost::Message;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let spans: Arc<Mutex<Vec<SpanSeen>>> = Arc::default();
    let sink = spans.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut headers = HashMap::new();
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
                        }
                    }
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(req) = ExportTraceServiceRequest::decode(body.as_slice()) {
                        let mut seen = sink.lock().unwrap();
                        let text = |kv: &opentelemetry_proto::tonic::common::v1::KeyValue| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(AnyValue::StringValue(s)) => s.clone(),
                                Some(AnyValue::IntValue(i)) => i.to_string(),
                                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                                Some(AnyValue::BoolValue(b)) => b.to_string(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), v)
                        };
                        for rs in req.resource_spans {
                            let resource: BTreeMap<String, String> = rs
                                .resource
                                .iter()
                                .flat_map(|r| r.attributes.iter())
                                .map(text)
                                .collect();
                            let node = resource
                                .get("raftchat.node.id")
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            for ss in rs.scope_spans {
                                for span in ss.spans {
                                    seen.push(SpanSeen {
                                        name: span.name,
                                        trace: span.trace_id,
                                        node,
                                        start: span.start_time_unix_nano,
                                        duration_ns: span
                                            .end_time_unix_nano
                                            .saturating_sub(span.start_time_unix_nano),
                                        kind: span.kind,
                                        status: span.status.map_or(0, |s| s.code),
                                        attributes: span.attributes.iter().map(text).collect(),
                                        resource: resource.clone(),
                                    });
                                }
                            }
                        }
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, spans)
}

#[test]
fn spans_arrive_over_otlp_and_a_forwarded_send_is_one_trace() {
    let (collector, spans) = otlp_receiver();
    let mut cluster = Cluster::start(
        3,
        &format!(
            "[health]\nprobe_interval_ms = 200\n[telemetry]\notlp_endpoint = \"http://{collector}\"\n"
        ),
    );
    let started = std::time::Instant::now();
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut c = cluster.login(follower, "tracer");
    c.join("#traced");
    assert_eq!(c.say("#traced", "t1", "follow me")["type"], "ack");
    wait_for(T, "chat.send spans from two nodes in one trace", || {
        let seen = spans.lock().unwrap();
        let mut nodes_by_trace: HashMap<&Vec<u8>, BTreeSet<i64>> = HashMap::new();
        for s in seen.iter() {
            if s.name == "chat.send" {
                nodes_by_trace.entry(&s.trace).or_default().insert(s.node);
            }
        }
        nodes_by_trace
            .values()
            .any(|nodes| nodes.contains(&(follower as i64)) && nodes.contains(&(leader as i64)))
            .then_some(())
    });

    let session = c.session.clone().unwrap();
    drop(c);
    let healthy_phase = started.elapsed();
    // Only spans that started after the kill count from here on.
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    cluster.kill(leader);
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    cluster.wait_leader(&survivors, T);
    let other = *survivors.iter().find(|id| **id != follower).unwrap();
    wait_for(T, "resume on another node", || {
        let mut c = Client::try_connect(&cluster.node(other).chat)?;
        let w = c.request(
            json!({"type": "hello", "user": "tracer", "session": session, "resume_from": 0}),
        )?;
        (w["type"] == "welcome").then_some(())
    });
    wait_for(
        T,
        "probe, leader change, failover and reconnect spans",
        || {
            let seen = spans.lock().unwrap();
            let names: BTreeSet<&str> = seen
                .iter()
                .filter(|s| s.start + s.duration_ns >= killed_at)
                .map(|s| s.name.as_str())
                .collect();
            [
                "health.probe",
                "raft.leader_change",
                "raft.failover",
                "chat.client.reconnect",
            ]
            .iter()
            .all(|n| names.contains(n))
            .then_some(())
        },
    );
    // Semantic conventions, on what arrived.
    let seen = spans.lock().unwrap().clone();
    let find = |name: &'static str| seen.iter().filter(move |s| s.name == name);
    for s in &seen {
        assert!(s.resource.contains_key("service.version"), "{s:?}");
        // The session token is a secret: it is in no span.
        assert!(
            !s.attributes.values().any(|v| v.contains(&session)),
            "a session token was exported: {s:?}"
        );
    }
    assert!(
        find("chat.send").all(|s| s.kind == 2),
        "chat.send is a server span"
    );
    assert!(find("chat.client.reconnect").all(|s| s.kind == 2));
    let probe = find("health.probe").next().expect("a probe span");
    assert_eq!(probe.kind, 3, "a probe is a client span: {probe:?}");
    assert!(probe.attributes.contains_key("server.address"), "{probe:?}");
    let failed = find("health.probe")
        .find(|s| s.attributes.get("outcome").map(String::as_str) == Some("failure"))
        .expect("a failed probe of the killed node");
    assert_eq!(
        failed.status, 2,
        "a failed probe has error status: {failed:?}"
    );
    assert!(failed.attributes.contains_key("error.type"), "{failed:?}");
    // A failover span lasts as long as the failover (not a zero-length marker).
    let failover = find("raft.failover").next().unwrap();
    assert!(failover.duration_ns >= 1_000_000, "{failover:?}");
    // Healthy probes are sampled: far fewer spans than probes (6 probes/s at 200 ms).
    let healthy_probes = find("health.probe")
        .filter(|s| {
            s.start < killed_at
                && s.attributes.get("outcome").map(String::as_str) == Some("success")
        })
        .count();
    let probes = (healthy_phase.as_secs_f64() / 0.2 * 6.0) as usize;
    assert!(
        healthy_probes <= 6 + probes / 10,
        "{healthy_probes} probe spans for about {probes} healthy probes"
    );
}

#[test]
fn a_paused_follower_counts_no_leader_change_and_no_failover() {
    let cluster = Cluster::start(
        3,
        "[health]\nprobe_interval_ms = 200\nprobe_timeout_ms = 200\n",
    );
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let counters = |s: &Scrape| {
        (
            value(s, "raftchat_raft_leader_changes_total", &[]),
            value(s, "raftchat_failovers_total", &[]),
            value(s, "raftchat_raft_term", &[]),
        )
    };
    // From a scrape in which the follower has counted its first leader (it may learn of the
    // leader after the others do).
    let before = wait_for(T, "a scrape where the follower knows its leader", || {
        let s = scrape(&cluster, follower)?;
        (value(&s, "raftchat_raft_has_leader", &[]) == 1.0
            && value(&s, "raftchat_raft_leader_id", &[]) == leader as f64
            && value(&s, "raftchat_raft_leader_changes_total", &[]) >= 1.0)
            .then_some(s)
    });
    cluster.pause(follower);
    std::thread::sleep(Duration::from_millis(1500));
    cluster.resume(follower);
    // The follower hears from its leader again (same leader, same term); a loss it noticed
    // is reported as recovered. Counted from `before`: a cluster's first election may already
    // have ended in a second term, a loss that ended in a leader change, not a recovery.
    let unrecovered_losses = |s: &Scrape| {
        value(s, "raftchat_raft_leader_lost_total", &[])
            - value(s, "raftchat_raft_leader_recovered_total", &[])
    };
    let unrecovered_before = unrecovered_losses(&before);
    let after = wait_for(T, "the follower to know its leader again", || {
        let s = scrape(&cluster, follower)?;
        (value(&s, "raftchat_raft_has_leader", &[]) == 1.0
            && value(&s, "raftchat_raft_leader_id", &[]) == leader as f64
            && unrecovered_losses(&s) == unrecovered_before)
            .then_some(s)
    });
    assert_eq!(
        cluster.wait_leader(&[1, 2, 3], T),
        leader,
        "the leader did not change"
    );
    assert_eq!(
        counters(&after),
        counters(&before),
        "(leader changes, failovers, term) moved on the paused follower"
    );
}

#[test]
fn a_peer_down_for_ten_seconds_is_logged_once_not_on_every_heartbeat() {
    let mut cluster = Cluster::start(3, "");
    let leader = cluster.wait_leader(&[1, 2, 3], T);
    let dead = (1..=3).find(|id| *id != leader).unwrap();
    let before = cluster.log(leader).len();
    cluster.kill(dead);
    std::thread::sleep(Duration::from_secs(10));
    let log = cluster.log(leader);
    let warnings: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("raft RPCs to the peer fail")),
        "the failure is logged: {warnings:#?}"
    );
    assert!(
        warnings.len() <= 4,
        "{} warnings in 10 s for one dead peer:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
}

#[test]
fn failing_trace_exports_are_logged_and_counted() {
    // A collector address nothing listens on.
    let dead = format!("127.0.0.1:{}", free_ports(1)[0]);
    let cluster = Cluster::start(
        1,
        &format!("[telemetry]\notlp_endpoint = \"http://{dead}\"\n"),
    );
    cluster.wait_leader(&[1], T);
    let mut c = cluster.login(1, "untraced");
    c.join("#void");
    assert_eq!(c.say("#void", "v1", "into the void")["type"], "ack");
    wait_for(T, "dropped spans counted", || {
        let s = scrape(&cluster, 1)?;
        (value(&s, "raftchat_spans_dropped_total", &[]) > 0.0).then_some(())
    });
    let log = cluster.log(1);
    assert_eq!(
        log.matches("exporting traces failed").count(),
        1,
        "logged once, not per batch:\n{log}"
    );
}
