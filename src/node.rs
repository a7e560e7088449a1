//! One node: opens its data directory, starts consensus, and serves the chat, raft and
//! metrics ports plus the health prober until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::chat::history::History;
use crate::chat::service::ChatService;
use crate::chat::store::ChatStore;
use crate::config::Config;
use crate::consensus::{self, Consensus, Observers, Role, RpcObservers};
use crate::health::{self, HealthTable, ProbeEvent};
use crate::leadership::LeaderLiveness;
use crate::telemetry::{self, metrics::Metrics};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// redb's page cache for the history (its default is 1 GiB).
const HISTORY_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// The message history's file in the data directory.
const HISTORY_FILE: &str = "chat-history.redb";
/// How long a node whose raft stopped fatally keeps reporting why before it exits.
const FATAL_EXIT_DELAY: Duration = Duration::from_secs(3);

/// What the metrics port reads.
pub struct NodeState {
    pub id: u64,
    pub consensus: Arc<Consensus>,
    pub chat: Arc<ChatService>,
    pub health: Arc<HealthTable>,
    pub metrics: Arc<Metrics>,
    pub liveness: LeaderLiveness,
}

#[derive(Serialize)]
pub struct PeerReport {
    pub id: u64,
    pub up: bool,
    pub last_probe_seconds: Option<f64>,
}

#[derive(Serialize)]
pub struct StatusReport {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub peers: Vec<PeerReport>,
    pub clients: usize,
    pub version: &'static str,
}

impl NodeState {
    /// Ready: a leader is known (a leader must also hold its lease) and everything known
    /// committed is applied.
    pub fn readiness(&self) -> Result<(), String> {
        let s = self.consensus.status();
        if let Some(fatal) = s.fatal {
            return Err(format!("raft stopped: {fatal}"));
        }
        if let Some(gap) = self.chat.store.gap() {
            return Err(format!(
                "copying history ({}..{}) from peers after a snapshot",
                gap.after, gap.upto
            ));
        }
        if self.liveness.leader(&s).is_none() {
            return Err(match s.leader {
                None => "no leader known".into(),
                Some(l) if l == self.id => {
                    "this leader has not heard from a majority within its lease".into()
                }
                Some(l) => format!("leader {l} has not been heard from recently"),
            });
        }
        if s.applied_index < s.commit_index {
            return Err(format!(
                "applied index {} is behind commit index {}",
                s.applied_index, s.commit_index
            ));
        }
        Ok(())
    }

    pub fn status_report(&self) -> StatusReport {
        let s = self.consensus.status();
        let peers = self
            .health
            .snapshot()
            .into_iter()
            .map(|(id, p)| PeerReport {
                id,
                up: p.up,
                last_probe_seconds: p.last_probe.map(|t| t.elapsed().as_secs_f64()),
            })
            .collect();
        StatusReport {
            id: self.id,
            role: s.role,
            term: s.term,
            leader: s.leader,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            last_log_index: s.last_log_index,
            snapshot_index: s.snapshot_index,
            purged_index: s.purged_index,
            peers,
            clients: self.chat.live_connections(),
            version: VERSION,
        }
    }
}

/// A peer leader counts as alive while the prober sees it up and it was heard from within
/// two election timeouts (it heartbeats every `raft.heartbeat_ms`).
fn liveness(
    consensus: &Arc<Consensus>,
    health: &Arc<HealthTable>,
    config: &Config,
) -> LeaderLiveness {
    LeaderLiveness {
        consensus: consensus.clone(),
        health: health.clone(),
        stale_after: Duration::from_millis(config.raft.election_timeout_max_ms * 2),
    }
}

/// Consensus internals reporting into the registry.
fn observers(metrics: &Arc<Metrics>) -> Observers {
    let sync = metrics.storage_sync_duration.clone();
    let rpc = metrics.raft_rpc_duration.clone();
    let failures = metrics.raft_rpc_failures.clone();
    let snapshots = metrics.snapshot_duration.clone();
    let hedged = metrics.raft_rpc_hedged.clone();
    let connections = metrics.raft_replication_connections.clone();
    Observers {
        replication_connections: Arc::new(move |delta: i64| connections.add(delta)),
        snapshot_built: Arc::new(move |d: Duration| snapshots.observe(d.as_secs_f64())),
        storage_sync: Arc::new(move |d: Duration| sync.observe(d.as_secs_f64())),
        rpc: RpcObservers {
            hedged: Arc::new(move |name: &'static str, peer: u64| {
                hedged.with_label_values(&[name, &peer.to_string()]).inc()
            }),
            answered: Arc::new(
                move |name: &'static str, peer: u64, d: Duration, ok: bool| {
                    if !matches!(name, "append" | "vote" | "snapshot" | "forward") {
                        return;
                    }
                    let peer = peer.to_string();
                    // A timeout is a failure, not a latency sample.
                    if ok {
                        rpc.with_label_values(&[name, &peer])
                            .observe(d.as_secs_f64());
                    } else {
                        failures.with_label_values(&[name, &peer]).inc();
                    }
                },
            ),
        },
    }
}

/// A file's size, or the total of the files in a directory.
async fn bytes_on_disk(path: &std::path::Path) -> u64 {
    let Ok(meta) = tokio::fs::metadata(path).await else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    let mut total = 0;
    if let Ok(mut dir) = tokio::fs::read_dir(path).await {
        while let Ok(Some(item)) = dir.next_entry().await {
            total += item.metadata().await.map_or(0, |m| m.len());
        }
    }
    total
}

/// How often the stores' sizes on disk are measured.
const STORAGE_EVERY: Duration = Duration::from_secs(5);

/// Keeps `raftchat_storage_bytes` and `raftchat_snapshot_bytes` current (a `stat` per store).
async fn measure_storage(data_dir: PathBuf, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let files = [
        ("log", data_dir.join(consensus::LOG_DIR)),
        ("history", data_dir.join(HISTORY_FILE)),
        ("state", data_dir.join(consensus::SNAPSHOT_FILE)),
    ];
    loop {
        for (store, path) in &files {
            let bytes = bytes_on_disk(path).await;
            metrics
                .storage_bytes
                .with_label_values(&[store])
                .set(bytes as i64);
            if *store == "state" {
                metrics.snapshot_bytes.set(bytes as i64);
            }
        }
        let dir = data_dir.clone();
        let fs = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&dir)).await;
        if let Ok(Ok(fs)) = fs {
            let block = fs.fragment_size() as i64;
            metrics
                .storage_available_bytes
                .set(fs.blocks_available() as i64 * block);
            metrics
                .storage_capacity_bytes
                .set(fs.blocks() as i64 * block);
        }
        tokio::select! {
            _ = tokio::time::sleep(STORAGE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn record_probe(metrics: &Metrics, event: &ProbeEvent) {
    let o = match event {
        ProbeEvent::Added(peer) => return metrics.add_peer(*peer),
        ProbeEvent::Removed(peer) => return metrics.remove_peer(*peer),
        ProbeEvent::Probed(o) => o,
    };
    let peer = o.peer.to_string();
    let peer = peer.as_str();
    let result = if o.success { "success" } else { "failure" };
    metrics.probes.with_label_values(&[peer, result]).inc();
    metrics
        .probe_duration
        .with_label_values(&[peer])
        .observe(o.duration.as_secs_f64());
    // Set on every probe: the series exists from the first one on.
    let up = match o.transition {
        Some(up) => up,
        None => o.success || metrics.peer_up.with_label_values(&[peer]).get() == 1,
    };
    metrics
        .peer_up
        .with_label_values(&[peer])
        .set(i64::from(up));
    if let Some(up) = o.transition {
        metrics
            .peer_transitions
            .with_label_values(&[peer, if up { "up" } else { "down" }])
            .inc();
    }
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on the {what} address {addr}"))
}

/// Runs node `id` of `config` until SIGINT or SIGTERM.
/// With `join`, a new node waits to be added to a running cluster instead of forming one.
pub async fn run(config: Config, id: u64, join: bool) -> anyhow::Result<()> {
    let telemetry = telemetry::init_node(&config.telemetry, id)?;
    raise_file_limit();
    let result = serve(config, id, join, telemetry.counters.clone()).await;
    telemetry.shutdown().await;
    result
}

async fn serve(
    config: Config,
    id: u64,
    join: bool,
    exports: telemetry::ExportCounters,
) -> anyhow::Result<()> {
    let me = config.node(id)?.clone();
    let data_dir = config.data_dir_for(id);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;

    let chat_listener = bind(&config.listen_addr(&me.chat), "chat").await?;
    let raft_listener = bind(&config.listen_addr(&me.raft), "raft").await?;
    let metrics_listener = bind(&config.listen_addr(&me.metrics), "metrics").await?;
    // Certificate files are part of the configuration: a bad one exits 2 naming its key.
    let tls = crate::tls::Tls::load(&config.tls)
        .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?;
    let mut chat_listeners = vec![crate::chat::server::ChatListener {
        listener: chat_listener,
        tls: None,
    }];
    if let (Some(addr), Some(tls)) = (&me.chat_tls, &tls) {
        chat_listeners.push(crate::chat::server::ChatListener {
            listener: bind(&config.listen_addr(addr), "chat_tls").await?,
            tls: Some(tls.clone()),
        });
    }

    let history_path = data_dir.join(HISTORY_FILE);
    let history = History::open(&history_path, HISTORY_CACHE_BYTES)
        .and_then(|h| ChatStore::new(h, config.chat.client_queue_events))
        .with_context(|| format!("cannot open the message history {}", history_path.display()))?;
    let store = Arc::new(history);
    let peers: Vec<(u64, String)> = config
        .nodes
        .iter()
        .filter(|n| n.id != id)
        .map(|n| (n.id, n.chat.clone()))
        .collect();
    let peer_ids: Vec<u64> = peers.iter().map(|(p, _)| *p).collect();
    let metrics = Arc::new(Metrics::new(id, &peer_ids).context("cannot register metrics")?);
    metrics
        .register_exports(&exports)
        .context("cannot register metrics")?;
    let raft_runtime = consensus::ConsensusRuntime::new().context("cannot start raft's runtime")?;
    let raft_handle = raft_runtime.handle();
    // Started on its runtime, raft spawns all its tasks there.
    let consensus = {
        let (config, data_dir, store) = (config.clone(), data_dir.clone(), store.clone());
        let (observers, tls) = (observers(&metrics), tls.clone());
        raft_handle
            .spawn(async move {
                Consensus::start(&config, id, &data_dir, store, observers, join, tls).await
            })
            .await
            .context("raft's runtime stopped while starting")??
    };

    let health = Arc::new(HealthTable::new(peers.iter().map(|(p, _)| *p)));
    let chat = Arc::new(ChatService::new(
        id,
        consensus.clone(),
        store,
        health.clone(),
        config.chat.clone(),
        metrics.clone(),
    ));
    let state = Arc::new(NodeState {
        id,
        consensus: consensus.clone(),
        chat: chat.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        liveness: liveness(&consensus, &health, &config),
    });

    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Registered again on raft's runtime, so its reactor, not the busy one, wakes the accepts.
    let raft_listener = {
        let _on_raft_runtime = raft_handle.enter();
        raft_listener
            .into_std()
            .and_then(TcpListener::from_std)
            .context("cannot move the raft listener to raft's runtime")?
    };
    tasks.spawn_on(
        consensus::serve_raft_port(
            raft_listener,
            consensus.clone(),
            shutdown.clone(),
            tls.clone(),
        ),
        raft_handle,
    );
    tasks.spawn_on(
        consensus::watch_leader(consensus.clone(), shutdown.clone()),
        raft_handle,
    );
    tasks.spawn(crate::http::serve_metrics_port(
        metrics_listener,
        state,
        shutdown.clone(),
    ));
    tasks.spawn(crate::chat::server::serve_chat_ports(
        chat_listeners,
        chat.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::leadership::run(
        liveness(&consensus, &health, &config),
        metrics.clone(),
        shutdown.clone(),
    ));
    let probe_metrics = metrics.clone();
    let members = consensus.clone();
    tasks.spawn(health::run_prober(
        Arc::new(move || members.peer_chat_addrs()),
        config.health.clone(),
        health,
        Arc::new(move |e: &ProbeEvent| record_probe(&probe_metrics, e)),
        shutdown.clone(),
    ));
    {
        let shutdown = shutdown.clone();
        let chat = chat.clone();
        tasks.spawn(async move { chat.release_previous_connections(shutdown).await });
    }
    {
        let shutdown = shutdown.clone();
        let chat = chat.clone();
        tasks.spawn(async move { chat.replicate_settings(shutdown).await });
    }
    tasks.spawn(crate::chat::backfill::run(
        chat.store.clone(),
        consensus.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(measure_storage(
        data_dir.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reload_on_hangup(tls.clone(), shutdown.clone()));
    tracing::info!(id, chat = %me.chat, raft = %me.raft, metrics = %me.metrics, data_dir = %data_dir.display(), "node started");

    let fatal = tokio::select! {
        signal = wait_for_signal() => { signal?; None }
        why = wait_for_fatal(&consensus, &chat.store, &metrics) => Some(why),
    };
    if let Some(why) = fatal {
        // Clients must move to a healthy node; a supervisor restarts this one.
        tracing::error!(id, %why, "raft stopped fatally; closing every client and exiting");
        shutdown.cancel();
        tokio::time::sleep(FATAL_EXIT_DELAY).await;
        anyhow::bail!("raft stopped: {why}");
    }
    tracing::info!(id, "shutting down");
    // Hand over first, while every port still serves: writes in flight through this node
    // finish or move to the new leader instead of waiting for an election.
    if consensus.hand_over().await {
        tracing::info!(id, "leadership handed over");
    }
    shutdown.cancel();
    consensus.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Returns why openraft stopped, once it has; keeps the history-gap gauge current meanwhile.
async fn wait_for_fatal(consensus: &Consensus, store: &ChatStore, metrics: &Metrics) -> String {
    let mut watch = consensus.watch();
    loop {
        if let Some(why) = consensus.status().fatal {
            metrics.raft_fatal.set(1);
            return why;
        }
        let gap = store.gap().map_or(0, |g| g.upto.saturating_sub(g.after));
        metrics.history_gap_entries.set(gap as i64);
        tokio::select! {
            alive = watch.changed() => if !alive {
                // The metrics channel closed: raft is gone.
                metrics.raft_fatal.set(1);
                return consensus.status().fatal.unwrap_or_else(|| "raft shut down".into());
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Every client is a file descriptor: `chat.max_clients` (10,000 by default) needs more than
/// the usual soft limit of 1,024, so the soft limit is raised to the hard one.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Rereads the certificate files on every SIGHUP; a bad file keeps the old certificates.
/// Without TLS a SIGHUP is logged and ignored (its default action would stop the node).
async fn reload_on_hangup(tls: Option<Arc<crate::tls::Tls>>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: certificates will not be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(tls) = tls.clone() else {
            tracing::info!("SIGHUP: no certificates configured; nothing to reload");
            continue;
        };
        let reloaded = tokio::task::spawn_blocking(move || tls.reload()).await;
        match reloaded {
            Ok(Ok(())) => tracing::info!("SIGHUP: certificates reloaded"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "SIGHUP: certificates not reloaded; keeping the old ones")
            }
            Err(e) => tracing::warn!(error = %e, "SIGHUP: certificate reload failed"),
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
