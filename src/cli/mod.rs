//! The `raftchat` command line: `node`, `cluster`, `status`, `chat`, `admin`, `bench`.

mod admin;
mod bench;
mod chat;
mod cluster;
mod failover_bench;
mod idle_bench;
mod room_bench;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError, FlagOverrides};

#[derive(Parser)]
#[command(
    name = "raftchat",
    version,
    about = "A fault-tolerant chat cluster replicated with Raft"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one cluster node (chat, raft and metrics ports).
    Node {
        /// TOML config file (default: $RAFTCHAT_CONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
        /// This node's id, one of the `[[nodes]]` in the config.
        #[arg(long)]
        id: u64,
        /// Override `data_dir` (`{id}` is replaced by the node id).
        #[arg(long)]
        data_dir: Option<String>,
        /// Join a running cluster (wait for `raftchat admin add-node`) instead of forming one.
        #[arg(long)]
        join: bool,
    },
    /// Run a whole cluster on this machine as child `node` processes, until Ctrl-C.
    Cluster(cluster::ClusterArgs),
    /// Show every node's role, term, leader, indexes, peer health and clients.
    Status(status::StatusArgs),
    /// Chat from the terminal (or a pipeline); reconnects by itself.
    Chat(chat::ChatArgs),
    /// Add or remove nodes (through the raft/admin port, with the cluster secret).
    Admin(admin::AdminArgs),
    /// Load-test a cluster (or a local one it starts) and time leader failovers.
    Bench(bench::BenchArgs),
}

/// Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Node {
            config,
            id,
            data_dir,
            join,
        } => {
            let flags = FlagOverrides { data_dir };
            let config = match config::load(config.as_deref(), &flags)
                .and_then(|c| c.node(id).map(|_| c.clone()))
            {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            run_async(crate::node::run(config, id, join))
        }
        Command::Cluster(args) => cluster::run(args),
        Command::Status(args) => run_async(status::run(args)),
        Command::Bench(args) => run_async(bench::run(args)),
        Command::Chat(args) => chat::run(args),
        Command::Admin(args) => run_async(admin::run(args)),
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("raftchat: {e}");
    ExitCode::from(2)
}

fn run_async(
    fut: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftchat: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // On a worker, not the main thread: every wake-up of the main task would otherwise be a
    // hand-off between threads.
    let outcome = runtime.block_on(async {
        tokio::spawn(fut)
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the main task failed: {e}")))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                return config_error(ce);
            }
            eprintln!("raftchat: {e:#}");
            ExitCode::from(1)
        }
    }
}
