//! Test harness: real `raftchat node` processes on free loopback ports, and a blocking JSON
//! client. Every wait has a deadline; nothing sleeps where it can poll a condition.
#![allow(dead_code)]

pub mod certs;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_raftchat");

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ports for test nodes, from below the kernel's ephemeral range (32768 and up here): a port
/// picked by binding `:0` can be taken by some client's outgoing connection before the node
/// binds it. Each test process walks its own stretch of the range, and a port is handed out
/// only if it can be bound right now.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = LOW + (std::process::id() * 997) % (HIGH - LOW);
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(step < HIGH - LOW, "no free test port left");
        let port = (LOW + (start - LOW + step) % (HIGH - LOW)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

pub struct NodeAddrs {
    pub id: u64,
    pub chat: String,
    pub raft: String,
    pub metrics: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeAddrs>,
    pub config: PathBuf,
    children: HashMap<u64, Child>,
    /// Nodes that run under their own uid (so network faults can target their packets).
    uids: HashMap<u64, u32>,
}

impl Cluster {
    /// Writes a config for `n` nodes with `extra` TOML appended, and starts every node.
    pub fn start(n: u64, extra: &str) -> Cluster {
        let mut c = Cluster::configure(n, extra);
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    pub fn configure(n: u64, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = free_ports(3 * n as usize);
        let nodes: Vec<NodeAddrs> = (0..n as usize)
            .map(|i| NodeAddrs {
                id: i as u64 + 1,
                chat: format!("127.0.0.1:{}", ports[3 * i]),
                raft: format!("127.0.0.1:{}", ports[3 * i + 1]),
                metrics: format!("127.0.0.1:{}", ports[3 * i + 2]),
            })
            .collect();
        let mut toml = format!(
            "secret = \"test-secret\"\ndata_dir = \"{}/node-{{id}}\"\n",
            dir.path().display()
        );
        for node in &nodes {
            toml.push_str(&format!(
                "[[nodes]]\nid = {}\nchat = \"{}\"\nraft = \"{}\"\nmetrics = \"{}\"\n",
                node.id, node.chat, node.raft, node.metrics
            ));
        }
        toml.push_str(extra);
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, toml).expect("write config");
        Cluster {
            dir,
            nodes,
            config,
            children: HashMap::new(),
            uids: HashMap::new(),
        }
    }

    pub fn node(&self, id: u64) -> &NodeAddrs {
        &self.nodes[id as usize - 1]
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    /// Runs node `id` under `uid` from now on (needs root): its data directory is handed to
    /// that uid and the process started through `setpriv`.
    pub fn run_as(&mut self, id: u64, uid: u32) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755));
        self.uids.insert(id, uid);
    }

    pub fn start_node(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("log file");
        let mut command = match self.uids.get(&id) {
            Some(uid) => {
                let data = self.data_dir(id);
                std::fs::create_dir_all(&data).expect("data dir");
                let owned = Command::new("chown")
                    .args(["-R", &format!("{uid}:{uid}")])
                    .arg(&data)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(owned, "chown {}", data.display());
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    BIN,
                ]);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(["node", "--config"])
            .arg(&self.config)
            .args(["--id", &id.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "info,openraft=error".into()),
            )
            // Export spans quickly so tests need not wait for the default 5 s batch.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn raftchat node");
        self.children.insert(id, child);
    }

    fn signal(&self, id: u64, sig: &str) {
        let pid = self
            .children
            .get(&id)
            .map(|c| c.id())
            .expect("node is running");
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.children.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) -> std::process::ExitStatus {
        self.signal(id, "-TERM");
        let mut child = self.children.remove(&id).expect("running");
        wait_for(
            Duration::from_secs(15),
            "node to exit after SIGTERM",
            || child.try_wait().ok().flatten(),
        )
    }

    /// SIGTERM (a graceful stop); `wait_exit` reaps it.
    pub fn terminate(&self, id: u64) {
        self.signal(id, "-TERM");
    }

    pub fn pause(&self, id: u64) {
        self.signal(id, "-STOP");
    }

    pub fn resume(&self, id: u64) {
        self.signal(id, "-CONT");
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children.get(&id).map(|c| c.id())
    }

    /// Waits for node `id` to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<i32> {
        let mut child = self.children.remove(&id).expect("running");
        let status = wait_for(timeout, "node to exit by itself", || {
            child.try_wait().ok().flatten()
        });
        status.code()
    }

    /// A fingerprint of node `id`'s history up to `upto` (raft port, with the secret).
    pub fn history_digest(&self, id: u64, upto: u64) -> Option<Value> {
        self.history_digest_range(id, 0, upto)
    }

    /// A POST with the cluster secret to node `id`'s raft port; the status and JSON answer.
    pub fn raft_post(&self, id: u64, path: &str, body: &Value) -> Option<(u16, Value)> {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-raftchat-secret: test-secret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // Reading a large history takes a while.
        let (code, body) =
            http_raw_within(&self.node(id).raft, &request, Duration::from_secs(120)).ok()?;
        Some((code, serde_json::from_str(&body).ok()?))
    }

    /// A fingerprint of node `id`'s history in (`after`, `upto`].
    pub fn history_digest_range(&self, id: u64, after: u64, upto: u64) -> Option<Value> {
        let (code, v) = self.raft_post(
            id,
            "/admin/history-digest",
            &json!({"after": after, "upto": upto}),
        )?;
        if v.get("Err").is_some() {
            eprintln!("node {id}: no digest yet: {v}");
        }
        (code == 200).then(|| v.get("Ok").cloned()).flatten()
    }

    /// Node `id`'s applied index and chat-state fingerprint (`/admin/state-digest`).
    pub fn state_digest(&self, id: u64) -> Option<(u64, u64)> {
        let (code, v) = self.raft_post(id, "/admin/state-digest", &json!({}))?;
        if code != 200 {
            return None;
        }
        Some((v["applied"].as_u64()?, v["fingerprint"].as_u64()?))
    }

    /// `raftchat admin <change>` against every node, `stdin` piped in; (exit code, output).
    pub fn admin(&self, change: &[&str], stdin: &str) -> (Option<i32>, String) {
        let servers: Vec<&str> = self.nodes.iter().map(|n| n.raft.as_str()).collect();
        let mut child = Command::new(BIN)
            .args(["admin", "--servers", &servers.join(",")])
            .args(change)
            .env("RAFTCHAT_SECRET", "test-secret")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("raftchat admin");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        let out = child.wait_with_output().expect("raftchat admin output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// The value of the first `/metrics` line of node `id` starting with `series`.
    pub fn metric(&self, id: u64, series: &str) -> Option<f64> {
        let body = http_get(&self.node(id).metrics, "/metrics").ok()?.1;
        body.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn is_running(&mut self, id: u64) -> bool {
        self.children
            .get_mut(&id)
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    pub fn status(&self, id: u64) -> Option<Value> {
        let (code, body) = http_get(&self.node(id).metrics, "/status").ok()?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// Waits until every running node in `ids` agrees on one leader; returns it.
    pub fn wait_leader(&self, ids: &[u64], timeout: Duration) -> u64 {
        wait_for(timeout, "a leader all nodes agree on", || {
            let leaders: Vec<Option<u64>> = ids
                .iter()
                .map(|id| self.status(*id).and_then(|s| s["leader"].as_u64()))
                .collect();
            let first = leaders.first().copied().flatten()?;
            let agreed = leaders.iter().all(|l| *l == Some(first)) && ids.contains(&first);
            let leader_says = self.status(first).is_some_and(|s| s["role"] == "leader");
            (agreed && leader_says).then_some(first)
        })
    }

    /// Waits until nodes `ids` have all applied the same index, at least `min`.
    pub fn wait_applied_equal(&self, ids: &[u64], min: u64, timeout: Duration) -> u64 {
        wait_for(timeout, "nodes to apply the same index", || {
            let applied: Vec<u64> = ids
                .iter()
                .map(|id| self.status(*id).and_then(|s| s["applied_index"].as_u64()))
                .collect::<Option<_>>()?;
            let first = applied[0];
            (first >= min && applied.iter().all(|a| *a == first)).then_some(first)
        })
    }

    pub fn client(&self, id: u64) -> Client {
        Client::connect(&self.node(id).chat)
    }

    /// A logged-in client, retrying until the cluster accepts the hello.
    pub fn login(&self, id: u64, user: &str) -> Client {
        wait_for(Duration::from_secs(30), "hello to be accepted", || {
            let mut c = Client::try_connect(&self.node(id).chat)?;
            let w = c.request(json!({"type": "hello", "user": user}))?;
            if w["type"] == "welcome" {
                c.session = w["session"].as_str().map(String::from);
                Some(c)
            } else {
                None
            }
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in ids {
            let _ = Command::new("kill")
                .args(["-CONT", &self.children[&id].id().to_string()])
                .status();
            self.kill(id);
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!("----- node {} log -----\n{}", node.id, self.log(node.id));
            }
        }
    }
}

/// A minimal HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

pub fn http_raw(addr: &str, request: &str) -> std::io::Result<(u16, String)> {
    http_raw_within(addr, request, Duration::from_secs(5))
}

pub fn http_raw_within(
    addr: &str,
    request: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// The body of a `Transfer-Encoding: chunked` response (large answers, e.g. Prometheus').
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    out
}

/// A blocking JSON-dialect client that keeps every pushed `message` it sees.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub session: Option<String>,
    /// Pushed messages, in arrival order.
    pub messages: Vec<Value>,
    /// Pushed presence frames (joins and leaves of others), in arrival order.
    pub presences: Vec<Value>,
    /// Other frames not yet consumed.
    pending: std::collections::VecDeque<Value>,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        Client::try_connect(addr).unwrap_or_else(|| panic!("connect to {addr}"))
    }

    pub fn try_connect(addr: &str) -> Option<Client> {
        let stream = TcpStream::connect(addr).ok()?;
        stream.set_nodelay(true).ok()?;
        let reader = BufReader::new(stream.try_clone().ok()?);
        Some(Client {
            stream,
            reader,
            session: None,
            messages: Vec::new(),
            presences: Vec::new(),
            pending: Default::default(),
        })
    }

    /// Reads and discards everything the server sends on this connection, on a thread, until
    /// it closes; returns how many lines arrived. Writes stay usable.
    pub fn drain_in_background(&self) -> std::thread::JoinHandle<usize> {
        let stream = self.stream.try_clone().expect("clone stream");
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(None);
            BufReader::new(stream).lines().map_while(Result::ok).count()
        })
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn send(&mut self, v: Value) -> std::io::Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes())
    }

    /// Reads one frame; `None` on EOF, error or timeout.
    fn read_frame(&mut self, timeout: Duration) -> Option<Value> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .ok()?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    /// Next frame that is not a pushed message/presence (those are recorded).
    pub fn next_reply(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(v) = self.pending.pop_front() {
            return Some(v);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let v = self.read_frame(left)?;
            match v["type"].as_str() {
                Some("message") => self.messages.push(v),
                Some("presence") => self.presences.push(v),
                _ => return Some(v),
            }
        }
    }

    /// Sends `v` and returns the next reply frame.
    pub fn request(&mut self, v: Value) -> Option<Value> {
        self.send(v).ok()?;
        self.next_reply(Duration::from_secs(15))
    }

    pub fn hello(&mut self, user: &str) -> Value {
        let w = self
            .request(json!({"type": "hello", "user": user}))
            .expect("welcome");
        self.session = w["session"].as_str().map(String::from);
        w
    }

    pub fn join(&mut self, room: &str) -> Value {
        self.request(json!({"type": "join", "room": room}))
            .expect("joined")
    }

    /// Sends a message and waits for its ack (or error) frame.
    pub fn say(&mut self, room: &str, id: &str, text: &str) -> Value {
        self.request(json!({"type": "send", "to": room, "id": id, "text": text}))
            .expect("ack")
    }

    /// Reads frames until `pred` holds for the recorded messages.
    pub fn wait_messages(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(&self.messages) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "timed out waiting for {what}; have {} messages",
                    self.messages.len()
                );
            }
            if let Some(v) = self.read_frame(left.min(Duration::from_millis(200))) {
                match v["type"].as_str() {
                    Some("message") => self.messages.push(v),
                    Some("presence") => self.presences.push(v),
                    _ => self.pending.push_back(v),
                }
            }
        }
    }

    /// True once the server has closed the connection (reads EOF within `timeout`).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }

    /// Every message of `room` in history, oldest first, paging with `after`.
    pub fn full_history(&mut self, room: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0u64;
        loop {
            let page = self
                .request(json!({"type": "history", "room": room, "after": after, "limit": 1000}))
                .expect("history");
            assert_eq!(page["type"], "history", "{page}");
            let msgs = page["messages"].as_array().cloned().unwrap_or_default();
            if msgs.is_empty() {
                return all;
            }
            after = msgs.last().unwrap()["index"].as_u64().unwrap();
            all.extend(msgs);
        }
    }
}

/// Resident memory of process `pid` in bytes (Linux).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// True when the tests run as root (mounts, iptables, setpriv).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A tmpfs of `size` (e.g. "64m") mounted on a directory; unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes free on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}
