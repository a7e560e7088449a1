//! A stock IRC client (Debian's weechat, headless) logs in with SASL PLAIN over `chat_tls`
//! against `chat.auth = "required"`, exactly as its users configure it; with a wrong
//! password it is refused. `scripts/test` installs weechat-headless.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::certs::{Ca, configure_chat_tls};
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// weechat-headless connected to `addr` over TLS as `user` with SASL PLAIN, joining `#stock`.
struct Weechat(Child);

impl Weechat {
    fn start(home: &Path, addr: &str, user: &str, password: &str) -> Weechat {
        std::fs::create_dir_all(home).unwrap();
        let (host, port) = addr.rsplit_once(':').unwrap();
        let commands = [
            // Its log is what the test reads: written at once, not every two minutes.
            "/set logger.file.flush_delay 0".into(),
            format!("/server add raftchat {host}/{port} -ssl"),
            // The test CA is not in the system store; TLS itself is still negotiated.
            "/set irc.server.raftchat.ssl_verify off".into(),
            "/set irc.server.raftchat.sasl_mechanism plain".into(),
            format!("/set irc.server.raftchat.sasl_username {user}"),
            format!("/set irc.server.raftchat.sasl_password {password}"),
            "/set irc.server.raftchat.sasl_fail continue".into(),
            format!("/set irc.server.raftchat.nicks {user}"),
            "/set irc.server.raftchat.autojoin #stock".into(),
            "/set irc.server.raftchat.autoreconnect off".into(),
            "/connect raftchat".into(),
        ];
        let child = Command::new("weechat-headless")
            .arg("--dir")
            .arg(home)
            .arg("-r")
            .arg(commands.join(";"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("weechat-headless (Debian package weechat-headless; scripts/test installs it)");
        Weechat(child)
    }

    /// What weechat logged for the server buffer.
    fn server_log(home: &Path) -> String {
        std::fs::read_to_string(home.join("logs/irc.server.raftchat.weechatlog"))
            .unwrap_or_default()
    }
}

impl Drop for Weechat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn add_user(cluster: &Cluster, name: &str, password: &str) {
    let (code, text) = cluster.admin(&["add-user", name], &format!("{password}\n"));
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn weechat_logs_in_with_sasl_plain_over_tls_and_a_wrong_password_is_refused() {
    let ca = Ca::new("raftchat test CA");
    let (mut cluster, tls_addr) = configure_chat_tls(&ca, "[chat]\nauth = \"required\"\n");
    let dir = cluster.dir.path().to_path_buf();
    cluster.start_node(1);
    cluster.wait_leader(&[1], T);

    add_user(&cluster, "alice", "wonderland-42");
    add_user(&cluster, "watcher", "watching-42");

    // A JSON client in the room sees who joins.
    let mut watcher = cluster.client(1);
    let w = watcher
        .request(json!({"type": "hello", "user": "watcher", "password": "watching-42"}))
        .unwrap();
    assert_eq!(w["type"], "welcome", "{w}");
    watcher.join("#stock");

    // Wrong password first: SASL fails (904), registration is refused, nobody joins.
    let wrong_home = dir.join("weechat-wrong");
    let refused_before = cluster
        .metric(1, "raftchat_bad_requests_total{reason=\"auth_failed\"}")
        .unwrap_or(0.0);
    let wrong = Weechat::start(&wrong_home, &tls_addr, "alice", "not-the-password");
    wait_for(T, "the wrong password to be refused", || {
        let refused = cluster
            .metric(1, "raftchat_bad_requests_total{reason=\"auth_failed\"}")
            .unwrap_or(0.0);
        (refused > refused_before).then_some(())
    });
    wait_for(T, "weechat to report the SASL failure", || {
        let log = Weechat::server_log(&wrong_home);
        log.contains("SASL authentication failed").then_some(log)
    });
    drop(wrong);

    // The right password: logged in, registered, joined.
    let home = dir.join("weechat");
    let _weechat = Weechat::start(&home, &tls_addr, "alice", "wonderland-42");
    wait_for(T, "weechat to join #stock", || {
        watcher.next_reply(Duration::from_millis(200));
        watcher
            .presences
            .iter()
            .any(|p| p["user"] == "alice" && p["state"] == "joined")
            .then_some(())
    });
    let log = Weechat::server_log(&home);
    assert!(log.contains("SASL authentication successful"), "{log}");
    assert!(log.contains("You are now logged in as alice"), "{log}");
    // Only the second weechat ever joined.
    let joins = watcher
        .presences
        .iter()
        .filter(|p| p["user"] == "alice" && p["state"] == "joined")
        .count();
    assert_eq!(joins, 1);
}
