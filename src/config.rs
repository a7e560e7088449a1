//! Configuration: built-in defaults < TOML file < `RAFTCHAT_*` environment < flags.
//!
//! Every struct denies unknown keys, so a typo in a config file is an error that names the
//! key instead of a silently ignored setting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A configuration problem: always reported in one line and turned into exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("environment: {reason}")]
    Env { reason: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shared cluster secret, required on the raft/admin port.
    pub secret: String,
    /// A file holding the secret (its first line), instead of `secret`: keeps it out of the
    /// config file, the environment and `ps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// Data directory; `{id}` is replaced by the node id.
    pub data_dir: String,
    /// Listen on this host (e.g. `0.0.0.0`) with the ports of this node's addresses, while
    /// peers and clients use the addresses as written (names in containers and Kubernetes).
    pub bind_host: Option<String>,
    pub nodes: Vec<NodeConfig>,
    pub raft: RaftConfig,
    pub health: HealthConfig,
    pub chat: ChatConfig,
    pub telemetry: TelemetryConfig,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    pub chat: String,
    pub raft: String,
    pub metrics: String,
    /// The chat address given to clients in `welcome.nodes` (default: `chat`), for clients
    /// outside the cluster's own network (a load balancer, a NodePort, a published port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_chat: Option<String>,
    /// A second chat listener speaking TLS (both dialects), with `[tls] cert` and `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_tls: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// A follower refuses votes while its leader lease (`election_timeout_max_ms`) runs, so a
    /// leader kill is noticed after roughly max + a random timeout in [min, max).
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept behind a snapshot for lagging followers; also the margin that keeps a purge
    /// from overtaking a queued apply (openraft #2116).
    pub keep_entries_after_snapshot: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub failures_before_down: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    pub max_line_bytes: usize,
    pub history_on_join: usize,
    pub max_clients: usize,
    /// Sustained commands per second one connection may send.
    pub rate_limit_per_sec: u32,
    /// Commands one connection may send in a burst above the sustained rate.
    pub rate_limit_burst: u32,
    /// How long a connection may stay over its rate limit before it is closed.
    pub rate_limit_grace_ms: u64,
    /// How long a write waits for a leader before it is answered `unavailable`.
    pub write_timeout_ms: u64,
    /// A session with no connection expires after this many seconds without activity.
    pub session_idle_timeout_secs: u64,
    /// A connection that has not said `hello` within this time is closed.
    pub hello_timeout_ms: u64,
    /// Events a client may fall behind by before it is disconnected (it can resume).
    pub client_queue_events: usize,
    /// Bytes queued for one connection's socket before it is disconnected as `slow`.
    pub max_output_bytes: usize,
    /// IRC: ping a client that has been quiet this long...
    pub irc_ping_interval_ms: u64,
    /// ...and drop it when it has not answered this long after the ping.
    pub irc_ping_timeout_ms: u64,
    /// IRC: the message of the day (none: 422).
    pub motd: Option<String>,
    /// `open`: anyone may take a free name (a registered one needs its password);
    /// `required`: every login needs an account and its password.
    pub auth: AuthMode,
    /// Longest message text accepted, in bytes.
    pub max_text_bytes: usize,
    /// Rooms one session may be in at once.
    pub max_rooms_per_session: usize,
    /// Connections from one IP address at once (0: unlimited).
    pub max_clients_per_ip: usize,
    /// New connections one IP address may open per second, sustained (bursts of ten times
    /// as many; 0: unlimited). Past it a connection is refused with `limit` at once.
    pub max_new_sessions_per_ip_per_sec: u32,
    /// A logged-in connection that sends nothing (not even `ping`) for this long is closed
    /// (0: never).
    pub idle_timeout_secs: u64,
    /// Newest messages kept per room (0: unlimited).
    pub history_max_messages_per_room: u64,
    /// Messages older than this are dropped (humantime, e.g. "90d"; empty: unlimited).
    pub history_max_age: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Open,
    Required,
}

impl ChatConfig {
    /// `history_max_age` in milliseconds (0: unlimited); validated at load.
    pub fn history_max_age_ms(&self) -> i64 {
        parse_age(&self.history_max_age).unwrap_or(0)
    }
}

fn parse_age(text: &str) -> Result<i64, String> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    humantime::parse_duration(text.trim())
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .map_err(|e| e.to_string())
}

/// `[tls]`: PEM files, reread on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// This node's certificate chain (for `chat_tls`, and for the raft port with `raft`).
    pub cert: Option<String>,
    pub key: Option<String>,
    /// The CA that signs every node's (and operator's) certificate; needed with `raft`.
    pub ca: Option<String>,
    /// Mutual TLS on the raft port: peers and operators must present a certificate from `ca`.
    pub raft: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            secret: "change-me".into(),
            secret_file: None,
            data_dir: "data/node-{id}".into(),
            bind_host: None,
            nodes: Vec::new(),
            raft: RaftConfig::default(),
            health: HealthConfig::default(),
            chat: ChatConfig::default(),
            telemetry: TelemetryConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 250,
            snapshot_every_entries: 20_000,
            keep_entries_after_snapshot: 5_000,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval_ms: 1000,
            probe_timeout_ms: 500,
            failures_before_down: 2,
        }
    }
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            max_line_bytes: 16 * 1024,
            history_on_join: 50,
            max_clients: 10_000,
            rate_limit_per_sec: 2_000,
            rate_limit_burst: 4_000,
            rate_limit_grace_ms: 5_000,
            write_timeout_ms: 5_000,
            session_idle_timeout_secs: 24 * 3600,
            hello_timeout_ms: 30_000,
            client_queue_events: 8_192,
            max_output_bytes: 8 * 1024 * 1024,
            irc_ping_interval_ms: 60_000,
            irc_ping_timeout_ms: 120_000,
            motd: Some("Welcome to raftchat: every message is replicated by Raft.".into()),
            history_max_messages_per_room: 0,
            history_max_age: String::new(),
            auth: AuthMode::Open,
            max_text_bytes: 8 * 1024,
            max_rooms_per_session: 100,
            max_clients_per_ip: 1_000,
            max_new_sessions_per_ip_per_sec: 20,
            idle_timeout_secs: 300,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            log_format: LogFormat::Text,
        }
    }
}

/// `host:port` with a non-empty host and a port number (IP addresses and names alike).
fn is_host_port(addr: &str) -> bool {
    if addr.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }
        None => false,
    }
}

/// Values given on the command line; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

/// The one config loader: defaults, then `file` (or `RAFTCHAT_CONFIG`), then the environment,
/// then flags. The result is validated.
pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config, ConfigError> {
    let config = load_settings(file, flags)?;
    config.validate()?;
    Ok(config)
}

/// `load` without the final validation, for commands that replace the node list and the data
/// directory themselves (`cluster`, `bench`): a file of settings alone is enough for them.
/// They validate what they built.
pub fn load_settings(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RAFTCHAT_CONFIG").map(PathBuf::from));
    if let Some(path) = &file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        figment = figment.merge(Toml::string(&text));
    }
    figment = figment
        .merge(environment())
        .merge(Serialized::defaults(flags));
    let config: Config = figment.extract().map_err(|e| {
        let from_env = e.clone().into_iter().any(|err| {
            err.metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"))
        });
        let reason = describe_figment_error(&e);
        match &file {
            _ if from_env => ConfigError::Env { reason },
            Some(path) => ConfigError::File {
                path: path.clone(),
                reason,
            },
            None => ConfigError::Invalid(reason),
        }
    })?;
    let mut config = config;
    if let Some(path) = config.secret_file.clone() {
        config.secret = read_secret_file(Path::new(&path))?;
    }
    Ok(config)
}

/// The secret in `path`: its first line, without surrounding whitespace.
pub fn read_secret_file(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Invalid(format!(
            "key `secret_file`: cannot read {}: {e}",
            path.display()
        ))
    })?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Secrets from examples and defaults: fine on one machine, never on a network.
const EXAMPLE_SECRETS: [&str; 3] = ["change-me", "change-me-in-production", "test-secret"];
/// The shortest secret accepted when any listen address is not loopback.
const MIN_SECRET_BYTES: usize = 16;

fn is_loopback_addr(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Top-level keys a `RAFTCHAT_*` variable may set (`RAFTCHAT_CHAT__MAX_CLIENTS` sets
/// `chat.max_clients`).
const TOP_LEVEL_KEYS: [&str; 10] = [
    "secret",
    "secret_file",
    "data_dir",
    "bind_host",
    "nodes",
    "raft",
    "health",
    "chat",
    "telemetry",
    "tls",
];

/// The `RAFTCHAT_*` environment layer. Kubernetes gives every pod variables for each Service
/// in its namespace (`RAFTCHAT_PORT=tcp://…`, `RAFTCHAT_CHAT_SERVICE_HOST`, …): variables of
/// that shape which name no config key are not ours and are ignored. Any other unknown
/// `RAFTCHAT_*` variable is an error naming it (a typo must not be silently ignored).
fn environment() -> Env {
    Env::prefixed("RAFTCHAT_")
        .split("__")
        .ignore(&["config"])
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            // `split` has turned `__` into `.` by now.
            let top = key.split('.').next().unwrap_or_default();
            TOP_LEVEL_KEYS.contains(&top) || !is_service_link(&key)
        })
}

/// Whether `key` (after `RAFTCHAT_`, lowercased) is shaped like a Kubernetes service-link
/// variable: `<service>_port`, `<service>_port_<port>_<proto>[_addr|_port|_proto]`,
/// `<service>_service_host`, `<service>_service_port[_<name>]`; or the bare `port`,
/// `service_host`, `service_port…` of the Service named `raftchat`.
fn is_service_link(key: &str) -> bool {
    let key = format!("_{key}");
    key.ends_with("_port")
        || key.contains("_port_")
        || key.ends_with("_service_host")
        || key.contains("_service_port")
}

/// Figment's own message, with the offending key path and source in one line.
fn describe_figment_error(e: &figment::Error) -> String {
    let mut parts = Vec::new();
    for err in e.clone() {
        let key = err.path.join(".");
        let source = err
            .metadata
            .as_ref()
            .filter(|m| !m.name.contains("TOML source string"))
            .map(|m| {
                if m.name.contains("environment") && !err.path.is_empty() {
                    format!(" (from RAFTCHAT_{})", err.path.join("__").to_uppercase())
                } else {
                    format!(" (from {})", m.name)
                }
            })
            .unwrap_or_default();
        if key.is_empty() {
            parts.push(format!("{}{source}", err.kind));
        } else {
            parts.push(format!("key `{key}`: {}{source}", err.kind));
        }
    }
    parts.join("; ")
}

impl Config {
    /// Checks what serde cannot: cross-field rules, unique ids and ports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.secret.trim().is_empty() {
            return bad("key `secret` must not be empty".into());
        }
        let weak =
            self.secret.len() < MIN_SECRET_BYTES || EXAMPLE_SECRETS.contains(&self.secret.as_str());
        let exposed = self.nodes.iter().find_map(|n| {
            [&n.chat, &n.raft, &n.metrics]
                .into_iter()
                .map(|a| self.listen_addr(a))
                .find(|a| !is_loopback_addr(a))
        });
        if weak && let Some(addr) = exposed {
            return bad(format!(
                "key `secret`: shorter than {MIN_SECRET_BYTES} bytes or an example value, while {addr} is not a loopback address; generate one with `openssl rand -hex 32` (or use `secret_file`)"
            ));
        }
        if self.nodes.is_empty() {
            return bad("key `nodes` must list at least one node".into());
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for node in &self.nodes {
            if node.id == 0 {
                return bad("key `nodes.id`: node ids start at 1".into());
            }
            if !ids.insert(node.id) {
                return bad(format!("key `nodes.id`: duplicate node id {}", node.id));
            }
            for (key, addr) in [
                ("chat", &node.chat),
                ("raft", &node.raft),
                ("metrics", &node.metrics),
            ] {
                if !is_host_port(addr) {
                    return bad(format!(
                        "key `nodes.{key}` of node {}: `{addr}` is not a host:port address",
                        node.id
                    ));
                }
                if !addrs.insert(addr.clone()) {
                    return bad(format!(
                        "key `nodes.{key}` of node {}: address {addr} is used twice",
                        node.id
                    ));
                }
            }
            if let Some(addr) = &node.advertise_chat
                && !is_host_port(addr)
            {
                return bad(format!(
                    "key `nodes.advertise_chat` of node {}: `{addr}` is not a host:port address",
                    node.id
                ));
            }
            if let Some(addr) = &node.chat_tls {
                if !is_host_port(addr) {
                    return bad(format!(
                        "key `nodes.chat_tls` of node {}: `{addr}` is not a host:port address",
                        node.id
                    ));
                }
                if !addrs.insert(addr.clone()) {
                    return bad(format!(
                        "key `nodes.chat_tls` of node {}: address {addr} is used twice",
                        node.id
                    ));
                }
                if self.tls.cert.is_none() || self.tls.key.is_none() {
                    return bad(format!(
                        "key `nodes.chat_tls` of node {}: needs `tls.cert` and `tls.key`",
                        node.id
                    ));
                }
            }
        }
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return bad("key `tls.cert` and `tls.key` go together".into());
        }
        if tls.raft && (tls.cert.is_none() || tls.ca.is_none()) {
            return bad(
                "key `tls.raft`: needs `tls.cert`, `tls.key` and `tls.ca` (the CA that signs every node's certificate)".into(),
            );
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return bad("key `raft.heartbeat_ms` must be positive".into());
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            return bad(
                "key `raft.election_timeout_min_ms` must be greater than `raft.heartbeat_ms`"
                    .into(),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad(
                "key `raft.election_timeout_max_ms` must be greater than `raft.election_timeout_min_ms`".into(),
            );
        }
        if r.snapshot_every_entries < 10 {
            return bad("key `raft.snapshot_every_entries` must be at least 10".into());
        }
        if r.keep_entries_after_snapshot >= r.snapshot_every_entries {
            // Otherwise every snapshot is followed by a purge that removes nothing, and the
            // log grows without bound.
            return bad(format!(
                "key `raft.keep_entries_after_snapshot` ({}) must be less than `raft.snapshot_every_entries` ({})",
                r.keep_entries_after_snapshot, r.snapshot_every_entries
            ));
        }
        let h = &self.health;
        if h.probe_interval_ms == 0 || h.probe_timeout_ms == 0 {
            return bad(
                "keys `health.probe_interval_ms` and `health.probe_timeout_ms` must be positive"
                    .into(),
            );
        }
        if h.failures_before_down == 0 {
            return bad("key `health.failures_before_down` must be at least 1".into());
        }
        let c = &self.chat;
        if c.max_line_bytes < 512 {
            return bad("key `chat.max_line_bytes` must be at least 512".into());
        }
        if c.max_clients == 0 {
            return bad("key `chat.max_clients` must be positive".into());
        }
        if c.rate_limit_per_sec == 0 || c.rate_limit_burst == 0 {
            return bad(
                "keys `chat.rate_limit_per_sec` and `chat.rate_limit_burst` must be positive"
                    .into(),
            );
        }
        if c.max_output_bytes < 64 * 1024 {
            return bad("key `chat.max_output_bytes` must be at least 65536".into());
        }
        if c.write_timeout_ms == 0 {
            return bad("key `chat.write_timeout_ms` must be positive".into());
        }
        if let Err(e) = parse_age(&c.history_max_age) {
            return bad(format!(
                "key `chat.history_max_age`: `{}` is not a duration like \"90d\": {e}",
                c.history_max_age
            ));
        }
        if c.client_queue_events < 1024 {
            // One applied batch is published at once and may hold hundreds of events.
            return bad("key `chat.client_queue_events` must be at least 1024".into());
        }
        Ok(())
    }

    /// The entry of node `id`, or an error naming the missing id.
    pub fn node(&self, id: u64) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            let known: Vec<String> = self.nodes.iter().map(|n| n.id.to_string()).collect();
            ConfigError::Invalid(format!(
                "flag `--id`: node {id} is not in `nodes` (known ids: {})",
                known.join(", ")
            ))
        })
    }

    /// Where node `id` listens for `addr` (one of its addresses): `bind_host` with the
    /// address's port when set, else the address itself.
    pub fn listen_addr(&self, addr: &str) -> String {
        match (&self.bind_host, addr.rsplit_once(':')) {
            (Some(host), Some((_, port))) => format!("{host}:{port}"),
            _ => addr.to_string(),
        }
    }

    /// The data directory of node `id`, with `{id}` substituted.
    pub fn data_dir_for(&self, id: u64) -> PathBuf {
        PathBuf::from(self.data_dir.replace("{id}", &id.to_string()))
    }

    /// A localhost cluster of `count` nodes with the port scheme of `raftchat cluster`.
    pub fn localhost_cluster(count: u64, base_port: u16) -> Config {
        let nodes = (1..=count)
            .map(|i| {
                let port = |offset: u64| base_port as u64 + offset + i;
                NodeConfig {
                    id: i,
                    chat: format!("127.0.0.1:{}", port(0)),
                    raft: format!("127.0.0.1:{}", port(100)),
                    metrics: format!("127.0.0.1:{}", port(200)),
                    advertise_chat: None,
                    chat_tls: None,
                }
            })
            .collect();
        Config {
            nodes,
            ..Config::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const THREE: &str = r#"
secret = "s"
[[nodes]]
id = 1
chat = "127.0.0.1:1"
raft = "127.0.0.1:2"
metrics = "127.0.0.1:3"
"#;

    #[test]
    fn a_file_of_settings_alone_is_enough_for_commands_that_bring_their_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[health]\nprobe_interval_ms = 20\n");
        let err = load(Some(&path), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nodes"), "{err}");
        let settings = load_settings(Some(&path), &FlagOverrides::default()).unwrap();
        assert_eq!(settings.health.probe_interval_ms, 20);
        // Still checked key by key.
        let bad = write(dir.path(), "[health]\nprobe_every = 20\n");
        let err = load_settings(Some(&bad), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("probe_every"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &format!("{THREE}\n[raft]\nheartbeat = 5\n"));
        let err = load(Some(&path), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat"), "{err}");
    }

    #[test]
    fn tls_settings_name_what_they_miss() {
        let mut cfg = Config::localhost_cluster(1, 7000);
        cfg.nodes[0].chat_tls = Some("127.0.0.1:6697".into());
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("nodes.chat_tls") && err.contains("tls.cert"),
            "{err}"
        );
        cfg.tls.cert = Some("node.pem".into());
        cfg.tls.key = Some("node.key".into());
        assert!(cfg.validate().is_ok());
        cfg.nodes[0].chat_tls = Some(cfg.nodes[0].chat.clone());
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
        cfg.nodes[0].chat_tls = None;
        cfg.tls.raft = true;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("tls.raft") && err.contains("tls.ca"), "{err}");
    }

    #[test]
    fn duplicate_id_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{THREE}\n[[nodes]]\nid = 1\nchat = \"127.0.0.1:4\"\nraft = \"127.0.0.1:5\"\nmetrics = \"127.0.0.1:6\"\n"
        );
        let err = load(Some(&write(dir.path(), &text)), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate node id 1"), "{err}");
    }

    #[test]
    fn duplicate_port_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{THREE}\n[[nodes]]\nid = 2\nchat = \"127.0.0.1:1\"\nraft = \"127.0.0.1:5\"\nmetrics = \"127.0.0.1:6\"\n"
        );
        let err = load(Some(&write(dir.path(), &text)), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
    }

    #[test]
    fn flags_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &format!("data_dir = \"from-file\"\n{THREE}"));
        let flags = FlagOverrides {
            data_dir: Some("from-flag".into()),
        };
        assert_eq!(load(Some(&path), &flags).unwrap().data_dir, "from-flag");
        assert_eq!(
            load(Some(&path), &FlagOverrides::default())
                .unwrap()
                .data_dir,
            "from-file"
        );
    }

    #[test]
    fn names_are_addresses_too() {
        assert!(is_host_port("raftchat-0.raftchat:7001"));
        assert!(is_host_port("127.0.0.1:7001"));
        assert!(is_host_port("[::1]:7001"));
        assert!(!is_host_port("raftchat-0"));
        assert!(!is_host_port(":7001"));
        assert!(!is_host_port("host:99999"));
        let mut cfg = Config::localhost_cluster(1, 7000);
        cfg.bind_host = Some("0.0.0.0".into());
        assert_eq!(cfg.listen_addr("node1:7001"), "0.0.0.0:7001");
    }

    #[test]
    fn snapshot_keep_must_be_below_the_interval() {
        let mut cfg = Config::localhost_cluster(1, 7000);
        cfg.raft.snapshot_every_entries = 100;
        cfg.raft.keep_entries_after_snapshot = 100;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("keep_entries_after_snapshot"), "{err}");
        cfg.raft.keep_entries_after_snapshot = 99;
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn history_age_is_a_duration() {
        let mut cfg = Config::localhost_cluster(1, 7000);
        cfg.chat.history_max_age = "90d".into();
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.chat.history_max_age_ms(), 90 * 24 * 3600 * 1000);
        cfg.chat.history_max_age = "soon".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("chat.history_max_age"), "{err}");
    }

    #[test]
    fn unknown_id_is_named() {
        let cfg = Config::localhost_cluster(3, 7000);
        assert!(cfg.node(4).unwrap_err().to_string().contains("--id"));
        assert_eq!(cfg.node(2).unwrap().chat, "127.0.0.1:7002");
        assert_eq!(cfg.node(2).unwrap().metrics, "127.0.0.1:7202");
    }
}
