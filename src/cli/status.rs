//! `raftchat status`: one table of every node's view, read from the metrics ports.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Metrics addresses (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// Print the raw `/status` answers as a JSON array.
    #[arg(long)]
    json: bool,
}

/// GETs `path` from a metrics address as text.
pub async fn fetch_text(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .context("bad address")?;
    let response = tokio::time::timeout(timeout, client.get(uri))
        .await
        .with_context(|| format!("no answer within {timeout:?}"))??;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// GETs `/status` from a metrics address.
pub async fn fetch_status(addr: &str, timeout: Duration) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(
        &fetch_text(addr, "/status", timeout).await?,
    )?)
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let answers = futures_util::future::join_all(
        args.servers
            .iter()
            .map(|s| fetch_status(s, Duration::from_secs(2))),
    )
    .await;
    if args.json {
        let all: Vec<Value> = answers
            .iter()
            .zip(&args.servers)
            .map(|(a, s)| match a {
                Ok(v) => v.clone(),
                Err(e) => serde_json::json!({"server": s, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!(
        "{:<22} {:<5} {:<10} {:<6} {:<7} {:<8} {:<8} {:<18} {:<7}",
        "server", "node", "role", "term", "leader", "commit", "applied", "peers up", "clients"
    );
    let mut failures = 0;
    for (server, answer) in args.servers.iter().zip(answers) {
        match answer {
            Ok(v) => {
                let peers = v["peers"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| {
                                format!(
                                    "{}:{}",
                                    p["id"],
                                    if p["up"] == true { "up" } else { "down" }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                // JSON values ignore width specifiers: print them as strings.
                let text = |key: &str| match &v[key] {
                    Value::Null => "-".to_string(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let leader = text("leader");
                println!(
                    "{:<22} {:<5} {:<10} {:<6} {:<7} {:<8} {:<8} {:<18} {:<7}",
                    server,
                    text("id"),
                    text("role"),
                    text("term"),
                    leader,
                    text("commit_index"),
                    text("applied_index"),
                    peers,
                    text("clients")
                );
            }
            Err(e) => {
                failures += 1;
                println!("{server:<22} unreachable: {e:#}");
            }
        }
    }
    if failures == args.servers.len() {
        anyhow::bail!("no server answered");
    }
    Ok(())
}
