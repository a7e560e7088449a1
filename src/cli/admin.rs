//! `raftchat admin`: membership changes through the raft/admin port (the cluster secret is
//! required). Any node can be asked; a follower points at the leader, which does the change.

use clap::Subcommand;

use crate::consensus::{
    AccountRequest, AdminAnswer, AdminRequest, Operator, account_request, admin_request,
};

#[derive(clap::Args)]
pub struct AdminArgs {
    /// Raft/admin addresses of the cluster's nodes (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// The cluster secret (visible in `ps`: prefer RAFTCHAT_SECRET or --secret-file).
    #[arg(long, env = "RAFTCHAT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// A file whose first line is the cluster secret.
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// With `[tls] raft = true`: the cluster's CA (PEM), to check the node's certificate.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<std::path::PathBuf>,
    /// With `[tls] raft = true`: a client certificate signed by that CA (PEM).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    change: Change,
}

#[derive(Subcommand)]
enum Change {
    /// Add a node that was started with `raftchat node --join` (it catches up, then votes).
    AddNode {
        #[arg(long)]
        id: u64,
        /// Its chat address.
        #[arg(long)]
        chat: String,
        /// Its raft address.
        #[arg(long)]
        raft: String,
        /// Its metrics address.
        #[arg(long)]
        metrics: String,
        /// The chat address its clients are given, when not `--chat`.
        #[arg(long)]
        advertise_chat: Option<String>,
    },
    /// Remove a node from the voters; stop its process afterwards.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Register a user name; its password is read from stdin (first line).
    AddUser { name: String },
    /// Change a user's password (read from stdin).
    Passwd { name: String },
    /// Remove a user's account: the name becomes free to take.
    RemoveUser { name: String },
}

/// The first line of stdin, without its line end.
fn password_from_stdin(name: &str) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("password for {name}: ");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(!password.is_empty(), "no password on stdin");
    Ok(password)
}

async fn change_account(
    servers: &[String],
    operator: &Operator,
    request: AccountRequest,
    what: &str,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for addr in servers {
        match account_request(addr, operator, &request).await {
            Ok(Ok(())) => {
                println!("{what}");
                return Ok(());
            }
            Ok(Err(e)) => anyhow::bail!("{addr}: {e}"),
            Err(e) if e.contains("401") => anyhow::bail!("{addr} refused the cluster secret"),
            Err(e) => problems.push(e),
        }
    }
    anyhow::bail!("no node took the change: {}", problems.join("; "))
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let secret = match (&args.secret_file, &args.secret) {
        (Some(path), _) => crate::config::read_secret_file(path)?,
        (None, Some(secret)) => secret.clone(),
        (None, None) => anyhow::bail!(
            "the cluster secret is needed: set RAFTCHAT_SECRET, or pass --secret-file (or --secret)"
        ),
    };
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(crate::tls::operator_client(ca, cert, key)?),
        _ => None,
    };
    let operator = Operator { secret, tls };
    let (request, what) = match args.change {
        Change::AddNode {
            id,
            chat,
            raft,
            metrics,
            advertise_chat,
        } => (
            AdminRequest::AddNode {
                id,
                chat,
                raft,
                metrics,
                advertise_chat,
            },
            format!("node {id} added"),
        ),
        Change::RemoveNode { id } => (
            AdminRequest::RemoveNode { id },
            format!("node {id} removed"),
        ),
        Change::AddUser { name } | Change::Passwd { name } => {
            let password = password_from_stdin(&name)?;
            let request = AccountRequest {
                user: name.clone(),
                password: Some(password),
            };
            let what = format!("account {name} set");
            return change_account(&args.servers, &operator, request, &what).await;
        }
        Change::RemoveUser { name } => {
            let request = AccountRequest {
                user: name.clone(),
                password: None,
            };
            let what = format!("account {name} removed");
            return change_account(&args.servers, &operator, request, &what).await;
        }
    };
    let mut candidates = args.servers.clone();
    let mut problems = Vec::new();
    // Each server, then whichever leader they name (a few hops at most).
    let mut hops = 0;
    while let Some(addr) = candidates.first().cloned() {
        candidates.remove(0);
        hops += 1;
        if hops > args.servers.len() + 3 {
            break;
        }
        match admin_request(&addr, &operator, &request).await {
            Ok(AdminAnswer::Done { voters }) => {
                let voters: Vec<String> = voters.iter().map(u64::to_string).collect();
                println!("{what}; voters: {}", voters.join(", "));
                return Ok(());
            }
            Ok(AdminAnswer::NotLeader {
                raft: Some(leader), ..
            }) => candidates.insert(0, leader),
            Ok(AdminAnswer::NotLeader { raft: None, .. }) => {
                problems.push(format!("{addr}: no leader known"))
            }
            Ok(AdminAnswer::Failed(e)) => anyhow::bail!("{addr}: {e}"),
            Err(e) if e.contains("401") => anyhow::bail!("{addr} refused the cluster secret"),
            Err(e) => problems.push(e),
        }
    }
    anyhow::bail!("no leader took the change: {}", problems.join("; "))
}
