//! TLS: the `chat_tls` listener for both dialects (certificates reread on SIGHUP), plain text
//! on it refused in words, and mutual TLS on the raft port between nodes and for operators.
//! Certificates are made at test time (rcgen).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::certs::{Ca, configure_chat_tls};
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn roots(ca: &Ca) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    roots
}

fn client_config(ca: &Ca, identity: Option<&Ca>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots(ca));
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(issuer) => {
            let (cert, key) = issuer.issue("operator");
            let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(vec![cert], key).unwrap()
        }
    };
    Arc::new(config)
}

use rustls::pki_types::pem::PemObject;

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A line-oriented TLS client.
struct TlsLines {
    reader: BufReader<TlsStream>,
}

impl TlsLines {
    fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> std::io::Result<TlsLines> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsLines {
            reader: BufReader::new(stream),
        })
    }

    fn peer_certificate(&self) -> Vec<u8> {
        let conn = &self.reader.get_ref().conn;
        conn.peer_certificates().unwrap()[0].to_vec()
    }

    fn send(&mut self, line: &str) {
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes()).unwrap();
        stream.write_all(b"\r\n").unwrap();
        stream.flush().unwrap();
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        }
    }

    /// Lines until one contains `needle` (that one included).
    fn until(&mut self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + T;
        while std::time::Instant::now() < deadline {
            match self.line() {
                Some(l) => {
                    let done = l.contains(needle);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                None => break,
            }
        }
        panic!("no line with {needle:?}; saw {seen:?}");
    }

    fn json(&mut self, needle: &str) -> Value {
        let line = self.until(needle).pop().unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

/// A one-node cluster with `chat_tls`, started.
fn tls_node(ca: &Ca) -> (Cluster, String) {
    let (mut cluster, tls_addr) = configure_chat_tls(ca, "");
    cluster.start_node(1);
    cluster.wait_leader(&[1], T);
    (cluster, tls_addr)
}

/// Sends SIGHUP to node 1 and waits for its log to say `outcome`.
fn hangup(cluster: &Cluster, outcome: &str) {
    let pid = nix::unistd::Pid::from_raw(cluster.pid(1).unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_for(T, outcome, || {
        cluster.log(1).contains(outcome).then_some(())
    });
}

#[test]
fn chat_tls_serves_both_dialects_and_refuses_plain_text() {
    let ca = Ca::new("raftchat test CA");
    let (cluster, tls_addr) = tls_node(&ca);

    let mut json_client = TlsLines::connect(&tls_addr, client_config(&ca, None)).unwrap();
    json_client.send(&json!({"type": "hello", "user": "alice"}).to_string());
    assert_eq!(json_client.json("\"welcome\"")["type"], "welcome");
    json_client.send(&json!({"type": "join", "room": "#secure"}).to_string());
    json_client.json("\"joined\"");

    let mut irc = TlsLines::connect(&tls_addr, client_config(&ca, None)).unwrap();
    irc.send("NICK bob");
    irc.send("USER bob 0 * :Bob");
    irc.until(" 001 ");
    irc.send("JOIN #secure");
    irc.until(" 366 ");
    irc.send("PRIVMSG #secure :over TLS");
    let pushed = json_client.json("over TLS");
    assert_eq!(pushed["from"], "bob", "{pushed}");
    json_client.send(
        &json!({"type": "send", "to": "#secure", "id": "m1", "text": "and back"}).to_string(),
    );
    assert_eq!(json_client.json("\"ack\"")["type"], "ack");
    let line = irc.until("and back").pop().unwrap();
    assert!(line.contains("PRIVMSG #secure :and back"), "{line}");

    // Plain text to the TLS port: a clear error in the client's dialect, then close.
    for (hello, needle) in [
        (
            json!({"type": "hello", "user": "carol"}).to_string(),
            "\"bad_request\"",
        ),
        ("NICK carol".to_string(), "ERROR"),
    ] {
        let mut plain = TcpStream::connect(&tls_addr).unwrap();
        plain.set_read_timeout(Some(T)).unwrap();
        plain.write_all(format!("{hello}\r\n").as_bytes()).unwrap();
        let mut answer = String::new();
        plain.read_to_string(&mut answer).unwrap();
        assert!(
            answer.contains(needle) && answer.contains("TLS"),
            "{answer:?}"
        );
    }
    // A client that does not trust the certificate fails its handshake; the node goes on.
    let stranger = Ca::new("another CA");
    assert!(TlsLines::connect(&tls_addr, client_config(&stranger, None)).is_err());
    let mut again = TlsLines::connect(&tls_addr, client_config(&ca, None)).unwrap();
    again.send(&json!({"type": "hello", "user": "dave"}).to_string());
    assert_eq!(again.json("\"welcome\"")["type"], "welcome");
    drop(cluster);
}

#[test]
fn certificates_are_reread_on_sighup() {
    let ca = Ca::new("raftchat test CA");
    let (cluster, tls_addr) = tls_node(&ca);
    let dir = cluster.dir.path().to_path_buf();
    let before = TlsLines::connect(&tls_addr, client_config(&ca, None)).unwrap();
    let first = before.peer_certificate();

    // A broken file is refused and the old certificate stays.
    std::fs::write(dir.join("node.pem"), "not a certificate").unwrap();
    hangup(&cluster, "certificates not reloaded");
    let kept = TlsLines::connect(&tls_addr, client_config(&ca, None)).unwrap();
    assert_eq!(kept.peer_certificate(), first);

    ca.write(&dir, "node");
    hangup(&cluster, "certificates reloaded");
    let after = TlsLines::connect(&tls_addr, client_config(&ca, None)).unwrap();
    assert_ne!(
        after.peer_certificate(),
        first,
        "a new connection gets the new certificate"
    );
    // The connection made before the reload still works.
    let mut before = before;
    before.send(&json!({"type": "hello", "user": "erin"}).to_string());
    assert_eq!(before.json("\"welcome\"")["type"], "welcome");
}

/// One HTTPS request to a raft port; the status code, or `None` when refused.
fn raft_request(addr: &str, config: Arc<rustls::ClientConfig>) -> Option<u16> {
    let mut c = TlsLines::connect(addr, config).ok()?;
    let request = format!(
        "POST /admin/state-digest HTTP/1.1\r\nHost: {addr}\r\nx-raftchat-secret: test-secret\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let stream = c.reader.get_mut();
    stream.write_all(request.as_bytes()).ok()?;
    stream.flush().ok()?;
    let status = c.line()?;
    status.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn nodes_replicate_over_mutual_tls_and_refuse_peers_without_a_valid_certificate() {
    let ca = Ca::new("raftchat cluster CA");
    let mut cluster = Cluster::configure(2, "");
    let dir = cluster.dir.path().to_path_buf();
    ca.write(&dir, "node");
    let (cert, key) = ca.issue("operator");
    std::fs::write(dir.join("operator.pem"), cert).unwrap();
    std::fs::write(dir.join("operator.key"), key).unwrap();
    let mut config = std::fs::read_to_string(&cluster.config).unwrap();
    config.push_str(&format!(
        "[tls]\nraft = true\nca = \"{d}/ca.pem\"\ncert = \"{d}/node.pem\"\nkey = \"{d}/node.key\"\n",
        d = dir.display()
    ));
    std::fs::write(&cluster.config, config).unwrap();
    cluster.start_node(1);
    cluster.start_node(2);
    let leader = cluster.wait_leader(&[1, 2], T);
    let follower = 3 - leader;

    // A message through one node reaches a client of the other: replication over mTLS.
    let mut reader = cluster.login(follower, "reader");
    reader.join("#r");
    let mut writer = cluster.login(leader, "writer");
    writer.join("#r");
    assert_eq!(writer.say("#r", "m1", "hello over mTLS")["type"], "ack");
    reader.wait_messages(T, "the message through the other node", |m| {
        m.iter().any(|m| m["text"] == "hello over mTLS")
    });
    // The leader's pipelined replication connections are upgraded over TLS too.
    wait_for(T, "the follower serving replication connections", || {
        (cluster.metric(follower, "raftchat_raft_replication_connections ")? == 2.0).then_some(())
    });

    let raft = cluster.node(leader).raft.clone();
    // With a certificate from the cluster's CA: answered.
    assert_eq!(
        raft_request(&raft, client_config(&ca, Some(&ca))),
        Some(200)
    );
    // Without a client certificate, or with one from another CA: refused.
    assert_eq!(raft_request(&raft, client_config(&ca, None)), None);
    let rogue = Ca::new("rogue CA");
    assert_eq!(raft_request(&raft, client_config(&ca, Some(&rogue))), None);
    // Plain HTTP: no HTTP answer either.
    let plain = http_raw_within(
        &raft,
        "POST /admin/state-digest HTTP/1.1\r\nx-raftchat-secret: test-secret\r\nContent-Length: 2\r\n\r\n{}",
        Duration::from_secs(5),
    );
    assert!(
        !matches!(plain, Ok((code, _)) if code != 0),
        "plain HTTP answered: {plain:?}"
    );

    // Operators present a certificate too.
    let servers: Vec<&str> = cluster.nodes.iter().map(|n| n.raft.as_str()).collect();
    let admin = |tls: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["admin", "--servers", &servers.join(",")])
            .env("RAFTCHAT_SECRET", "test-secret");
        if tls {
            cmd.arg("--tls-ca")
                .arg(dir.join("ca.pem"))
                .arg("--tls-cert")
                .arg(dir.join("operator.pem"))
                .arg("--tls-key")
                .arg(dir.join("operator.key"));
        }
        cmd.args(["add-user", "alice"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"wonderland-42\n")
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let without = admin(false);
    assert!(!without.status.success(), "plain HTTP to an mTLS raft port");
    let with = admin(true);
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let needs = wait_for(T, "the account on the follower", || {
        let w = cluster
            .client(follower)
            .request(json!({"type": "hello", "user": "alice"}))?;
        (w["code"] == "auth_required").then_some(w)
    });
    assert_eq!(needs["type"], "error");
}

#[test]
fn a_missing_certificate_file_exits_2_naming_its_key() {
    let port = free_ports(1)[0];
    let mut cluster = Cluster::configure(1, "");
    let mut config = std::fs::read_to_string(&cluster.config).unwrap();
    config.push_str(&format!(
        "chat_tls = \"127.0.0.1:{port}\"\n[tls]\ncert = \"/nonexistent/node.pem\"\nkey = \"/nonexistent/node.key\"\n"
    ));
    std::fs::write(&cluster.config, config).unwrap();
    cluster.start_node(1);
    assert_eq!(cluster.wait_exit(1, T), Some(2));
    let log = cluster.log(1);
    assert!(
        log.contains("tls.cert") && log.contains("/nonexistent/node.pem"),
        "{log}"
    );
}

#[test]
fn a_node_without_tls_survives_sighup() {
    let cluster = Cluster::start(1, "");
    cluster.wait_leader(&[1], T);
    hangup(&cluster, "nothing to reload");
    let mut c = cluster.login(1, "still-here");
    assert_eq!(c.join("#r")["type"], "joined");
}
