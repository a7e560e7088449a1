//! Accounts: a registered name is usable only with its password (JSON `hello.password`, IRC
//! `PASS` and SASL PLAIN), `chat.auth = "required"`, and `raftchat admin` managing them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn admin(cluster: &Cluster, change: &[&str], stdin: &str) -> (Option<i32>, String) {
    cluster.admin(change, stdin)
}

fn hello(cluster: &Cluster, node: u64, user: &str, password: Option<&str>) -> serde_json::Value {
    let mut c = cluster.client(node);
    let mut req = json!({"type": "hello", "user": user});
    if let Some(p) = password {
        req["password"] = json!(p);
    }
    c.request(req).expect("an answer to hello")
}

/// A raw IRC connection.
struct Irc {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Irc {
    fn connect(addr: &str) -> Irc {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Irc { stream, reader }
    }

    fn send(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
    }

    /// Reads lines until one contains `needle` (or the connection ends); all lines read.
    fn until(&mut self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return seen,
                Ok(_) => {}
            }
            let done = line.contains(needle);
            seen.push(line.trim_end().to_string());
            if done {
                return seen;
            }
        }
    }
}

fn sasl_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}\0{user}\0{password}"))
}

#[test]
fn a_registered_name_needs_its_password_in_both_dialects() {
    let cluster = Cluster::start(3, "");
    cluster.wait_leader(&[1, 2, 3], T);
    let (code, text) = admin(&cluster, &["add-user", "alice"], "wonderland-42\n");
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = admin(&cluster, &["add-user", "shorty"], "short\n");
    assert_eq!(code, Some(1), "a short password is refused: {text}");

    // The account is replicated: every node enforces it.
    for node in 1..=3 {
        let w = wait_for(T, "the account on every node", || {
            let w = hello(&cluster, node, "alice", None);
            (w["code"] == "auth_required").then_some(w)
        });
        assert_eq!(w["type"], "error", "{w}");
    }
    let wrong = hello(&cluster, 2, "alice", Some("wonderland-41"));
    assert_eq!(wrong["code"], "auth_failed", "{wrong}");
    let right = hello(&cluster, 2, "alice", Some("wonderland-42"));
    assert_eq!(right["type"], "welcome", "{right}");
    // Free names stay free in open mode.
    assert_eq!(hello(&cluster, 1, "bob", None)["type"], "welcome");

    // IRC: SASL PLAIN as irssi and weechat send it.
    let irc = cluster.node(3).chat.clone();
    let mut c = Irc::connect(&irc);
    c.send("CAP LS 302");
    let ls = c.until(" LS ");
    assert!(ls.last().is_some_and(|l| l.contains("sasl")), "{ls:?}");
    c.send("CAP REQ :sasl");
    c.until(" ACK ");
    c.send("AUTHENTICATE PLAIN");
    c.until("AUTHENTICATE +");
    c.send(&format!(
        "AUTHENTICATE {}",
        sasl_plain("alice", "wonderland-42")
    ));
    let done = c.until(" 903 ");
    assert!(done.iter().any(|l| l.contains(" 900 ")), "{done:?}");
    // The JSON connection above left; its session is detached, so the name can be taken.
    c.send("NICK alice");
    c.send("USER alice 0 * :Alice");
    c.send("CAP END");
    let welcome = c.until(" 001 ");
    assert!(
        welcome.last().is_some_and(|l| l.contains(" 001 ")),
        "{welcome:?}"
    );

    // A wrong SASL password: 904, and registering the name without it is refused (464).
    let mut bad = Irc::connect(&irc);
    bad.send("CAP REQ :sasl");
    bad.until(" ACK ");
    bad.send("AUTHENTICATE PLAIN");
    bad.until("AUTHENTICATE +");
    bad.send(&format!("AUTHENTICATE {}", sasl_plain("alice", "guess")));
    let failed = bad.until(" 904 ");
    assert!(
        failed.last().is_some_and(|l| l.contains(" 904 ")),
        "{failed:?}"
    );
    drop(c);
    bad.send("NICK alice");
    bad.send("USER alice 0 * :Mallory");
    bad.send("CAP END");
    let refused = bad.until(" 464 ");
    assert!(
        refused.last().is_some_and(|l| l.contains(" 464 ")),
        "{refused:?}"
    );

    // PASS works too.
    let mut pass = Irc::connect(&irc);
    pass.send("PASS wonderland-42");
    pass.send("NICK alice");
    pass.send("USER alice 0 * :Alice");
    let lines = pass.until(" 001 ");
    assert!(
        lines.last().is_some_and(|l| l.contains(" 001 "))
            || lines.iter().any(|l| l.contains(" 433 ")),
        "{lines:?}"
    );

    // Removed: the name is free again.
    drop(pass);
    let (code, text) = admin(&cluster, &["remove-user", "alice"], "");
    assert_eq!(code, Some(0), "{text}");
    wait_for(T, "alice to be free", || {
        (hello(&cluster, 1, "alice", None)["type"] == "welcome").then_some(())
    });
}

#[test]
fn with_auth_required_every_login_needs_an_account() {
    let cluster = Cluster::start(1, "[chat]\nauth = \"required\"\n");
    cluster.wait_leader(&[1], T);
    assert_eq!(hello(&cluster, 1, "nobody", None)["code"], "auth_required");
    assert_eq!(
        hello(&cluster, 1, "nobody", Some("whatever-123"))["code"],
        "auth_failed"
    );
    let (code, text) = admin(&cluster, &["add-user", "carol"], "carols-password\n");
    assert_eq!(code, Some(0), "{text}");
    wait_for(T, "carol to log in", || {
        (hello(&cluster, 1, "carol", Some("carols-password"))["type"] == "welcome").then_some(())
    });
    // IRC without credentials is refused and closed.
    let mut irc = Irc::connect(&cluster.node(1).chat);
    irc.send("NICK dave");
    irc.send("USER dave 0 * :Dave");
    let lines = irc.until(" 464 ");
    assert!(
        lines.last().is_some_and(|l| l.contains(" 464 ")),
        "{lines:?}"
    );
}
