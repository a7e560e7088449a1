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
            let mut c = config::load(Some(path), &FlagOverrides::default())?;
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

async fn supervise(args: &ClusterArgs, config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let config_path = args.data_dir.join("cluster.toml");
    let text = toml::to_string(&config).context("cannot write the cluster config")?;
    std::fs::write(&config_path, text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the raftchat executable")?;

    let mut children: Vec<(u64, Child)> = Vec::new();
    for node in &config.nodes {
        let child = Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&config_path)
            .arg("--id")
            .arg(node.id.to_string())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {}", node.id))?;
        children.push((node.id, child));
    }

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

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut running = children.len();
    let mut check = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => {
                for (id, child) in children.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait()
                        && status.code() != Some(-999)
                    {
                        eprintln!("raftchat: node {id} exited ({status})");
                        running -= 1;
                        // Keep it from being reported again.
                        *id = 0;
                    }
                }
                children.retain(|(id, _)| *id != 0);
                if running == 0 {
                    anyhow::bail!("every node exited");
                }
            }
        }
    }
    eprintln!("raftchat: stopping {} nodes", children.len());
    for (_, child) in &children {
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for (id, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("raftchat: node {id} did not stop in 10 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
    Ok(())
}
