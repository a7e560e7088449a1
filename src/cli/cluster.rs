//! `raftchat cluster`: a whole cluster on this machine, one child `node` process per member.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::config::{self, Config, FlagOverrides};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Node i listens on chat BASE+i, raft BASE+100+i, metrics BASE+200+i.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// Where the nodes keep their data (node-1, node-2, ... inside it).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// A config file whose settings (raft, health, chat, telemetry, secret) every node uses;
    /// its `nodes` and `data_dir` are replaced.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: ClusterArgs) -> ExitCode {
    let config = match cluster_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("raftchat: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftchat: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(supervise(&args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftchat: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn cluster_config(args: &ClusterArgs) -> anyhow::Result<Config> {
    if !(1..=99).contains(&args.nodes) {
        anyhow::bail!("flag `--nodes` must be between 1 and 99");
    }
    if args.base_port as u64 + 300 > u16::MAX as u64 || args.base_port == 0 {
        anyhow::bail!("flag `--base-port` must leave room for BASE+300 below 65536");
    }
    let base = match &args.config {
        Some(path) => {
            // The file's own node list may be anything: only its settings are used.
            let mut c = config::load_settings(Some(path), &FlagOverrides::default())?;
            c.nodes.clear();
            c
        }
        None => Config::default(),
    };
    let generated = Config::localhost_cluster(args.nodes, args.base_port);
    let data_dir = args.data_dir.join("node-{id}");
    let mut config = Config {
        nodes: generated.nodes,
        data_dir: data_dir.display().to_string(),
        ..base
    };
    if args.config.is_none() {
        config.secret = existing_or_new_secret(&args.data_dir.join("cluster.toml"));
    }
    config.validate()?;
    Ok(config)
}

/// A restarted cluster keeps the secret it was created with.
fn existing_or_new_secret(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<Config>(&text).ok())
        .map(|c| c.secret)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Child `node` processes of one generated config, killed when dropped.
pub struct LocalCluster {
    exe: PathBuf,
    config_path: PathBuf,
    /// Where node logs go; `None` leaves them on this process's stderr.
    log_dir: Option<PathBuf>,
    pub config: Config,
    children: Vec<(u64, Child)>,
}

/// tokio's setting of a runtime's worker threads (default: one per core).
const WORKERS_VAR: &str = "TOKIO_WORKER_THREADS";

/// The nodes of a local cluster share this machine's cores: each gets its share (at least
/// one) instead of a worker per core, so the nodes' workers are not more than the cores. On
/// 2 cores and 3 nodes that is 25–35 context switches per message instead of 37–44, and
/// 5–10 % more throughput (BENCHMARKS.md).
fn workers_per_node(nodes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    share_of(cores, nodes)
}

fn share_of(cores: usize, nodes: usize) -> usize {
    (cores / nodes.max(1)).max(1)
}

impl LocalCluster {
    /// Writes `config` to `dir/cluster.toml` and starts every node; with `quiet`, node logs go
    /// to `dir/node-<id>.log`.
    pub fn start(config: Config, dir: &Path, quiet: bool) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config_path = dir.join("cluster.toml");
        let text = toml::to_string(&config).context("cannot write the cluster config")?;
        std::fs::write(&config_path, text)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let exe = std::env::current_exe().context("cannot find the raftchat executable")?;
        let mut cluster = LocalCluster {
            exe,
            config_path,
            log_dir: quiet.then(|| dir.to_path_buf()),
            config,
            children: Vec::new(),
        };
        let ids: Vec<u64> = cluster.config.nodes.iter().map(|n| n.id).collect();
        for id in ids {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let mut command = Command::new(&self.exe);
        if std::env::var_os(WORKERS_VAR).is_none() {
            command.env(
                WORKERS_VAR,
                workers_per_node(self.config.nodes.len()).to_string(),
            );
        }
        if let Some(dir) = &self.log_dir {
            let path = dir.join(format!("node-{id}.log"));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            command.stderr(log);
        }
        let child = command
            .arg("node")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--id")
            .arg(id.to_string())
            // Its own process group: a terminal's Ctrl-C reaches only this supervisor, which
            // then stops the nodes in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        self.children.push((id, child));
        Ok(())
    }

    /// SIGKILLs node `id` and reaps it.
    pub async fn kill(&mut self, id: u64) {
        if let Some(pos) = self.children.iter().position(|(i, _)| *i == id) {
            let (_, mut child) = self.children.remove(pos);
            let _ = child.kill().await;
        }
    }

    /// SIGTERMs node `id` and waits for it to exit (SIGKILL after `grace`).
    pub async fn terminate(&mut self, id: u64, grace: Duration) {
        if let Some(pos) = self.children.iter().position(|(i, _)| *i == id) {
            let (_, mut child) = self.children.remove(pos);
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }

    /// Stops every node: the followers first, then the leader (which then has nobody to hand
    /// leadership to, and does not try). SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        let leader = self.leader().await;
        let (last, first): (Vec<_>, Vec<_>) = std::mem::take(&mut self.children)
            .into_iter()
            .partition(|(id, _)| Some(*id) == leader);
        for group in [first, last] {
            self.children = group;
            self.stop_all().await;
        }
    }

    /// The leader, as the first node that answers says.
    async fn leader(&self) -> Option<u64> {
        for n in &self.config.nodes {
            if let Ok(status) =
                super::status::fetch_status(&n.metrics, Duration::from_millis(500)).await
                && let Some(leader) = status["leader"].as_u64()
            {
                return Some(leader);
            }
        }
        None
    }

    async fn stop_all(&mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for (id, child) in self.children.iter_mut() {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                eprintln!("raftchat: node {id} did not stop in 10 s; killing it");
                let _ = child.kill().await;
            }
        }
        self.children.clear();
    }

    /// Nodes that exited by themselves (forgotten once reported).
    fn reap_exited(&mut self) -> Vec<(u64, std::process::ExitStatus)> {
        let mut exited = Vec::new();
        self.children
            .retain_mut(|(id, child)| match child.try_wait() {
                Ok(Some(status)) => {
                    exited.push((*id, status));
                    false
                }
                _ => true,
            });
        exited
    }
}

async fn supervise(args: &ClusterArgs, config: Config) -> anyhow::Result<()> {
    // Listening before anything starts: a Ctrl-C that comes early (a loaded machine may not
    // run this process for a while) still stops the nodes instead of killing only this one.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut cluster = LocalCluster::start(config.clone(), &args.data_dir, false)?;

    println!(
        "raftchat cluster: {} nodes, data in {}",
        config.nodes.len(),
        args.data_dir.display()
    );
    println!(
        "{:<6} {:<22} {:<22} {:<22}",
        "node", "chat", "raft", "metrics"
    );
    for n in &config.nodes {
        println!(
            "{:<6} {:<22} {:<22} {:<22}",
            n.id, n.chat, n.raft, n.metrics
        );
    }
    let servers: Vec<&str> = config.nodes.iter().map(|n| n.chat.as_str()).collect();
    let metrics: Vec<&str> = config.nodes.iter().map(|n| n.metrics.as_str()).collect();
    if let Some(first) = config.nodes.first() {
        let (host, port) = first.chat.rsplit_once(':').unwrap_or((&first.chat, ""));
        println!(
            "connect:  nc {host} {port}   then type {{\"type\":\"hello\",\"user\":\"alice\"}}"
        );
    }
    println!("status:   raftchat status --servers {}", metrics.join(","));
    println!("servers:  {}", servers.join(","));
    println!("Ctrl-C stops every node.");

    let mut check = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => {
                for (id, status) in cluster.reap_exited() {
                    eprintln!("raftchat: node {id} exited ({status})");
                }
                if cluster.children.is_empty() {
                    anyhow::bail!("every node exited");
                }
            }
        }
    }
    eprintln!("raftchat: stopping {} nodes", cluster.children.len());
    cluster.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_node_gets_its_share_of_the_cores_and_at_least_one() {
        assert_eq!(super::share_of(2, 3), 1);
        assert_eq!(super::share_of(8, 3), 2);
        assert_eq!(super::share_of(16, 5), 3);
        assert_eq!(super::share_of(1, 0), 1);
    }
}
