//! The raft port, server side: raft RPCs from peers and writes forwarded by followers.
//! Every request must carry the cluster secret (401 otherwise, and nothing is applied) and be
//! meant for this node's id.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use openraft::error::RaftError;
use openraft::raft::{SnapshotResponse, TransferLeaderResponse};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::append_stream;
use super::rpc_client::{MAX_RPC_BODY, SECRET_HEADER, TARGET_HEADER, VOTE_HEADER};
use super::snapshot_store::{SnapshotBlob, read_meta};
use super::state_machine::Snapshot;
use super::types::TypeConfig;
use super::{Consensus, ForwardAnswer, ForwardRequest, ItemResult, LocalWrite};
use crate::http::{self, HttpResponse};

/// A snapshot holds the live chat state only; anything larger is not one of ours.
const MAX_SNAPSHOT_BODY: u64 = 4 * 1024 * 1024 * 1024;
/// One page of history sent to a peer that fills its gap.
const HISTORY_PAGE_MESSAGES: usize = 1000;
const HISTORY_PAGE_BYTES: usize = 2 * 1024 * 1024;

pub async fn serve_raft_port(
    listener: TcpListener,
    consensus: Arc<Consensus>,
    shutdown: CancellationToken,
    tls: Option<Arc<crate::tls::Tls>>,
) {
    let streams = Arc::new(tokio::sync::Semaphore::new(MAX_REPLICATION_CONNECTIONS));
    let handler = move |req: Request<Incoming>| {
        let consensus = consensus.clone();
        let streams = streams.clone();
        async move { handle(&consensus, &streams, req).await }
    };
    let mtls = tls.filter(|t| t.raft_acceptor().is_some());
    http::serve(listener, handler, MAX_RAFT_CONNECTIONS, shutdown, mtls).await;
}

/// Peers' pooled connections, their long polls and operators' admin calls.
const MAX_RAFT_CONNECTIONS: usize = 1024;
/// Upgraded replication connections (two per leader: its replication and its heartbeats).
const MAX_REPLICATION_CONNECTIONS: usize = 64;

fn authorized(consensus: &Consensus, req: &Request<Incoming>) -> bool {
    req.headers().get(SECRET_HEADER).is_some_and(|v| {
        constant_time_eq::constant_time_eq(v.as_bytes(), consensus.secret.as_bytes())
    })
}

async fn handle(
    consensus: &Arc<Consensus>,
    streams: &Arc<tokio::sync::Semaphore>,
    req: Request<Incoming>,
) -> HttpResponse {
    if !authorized(consensus, &req) {
        return http::text(
            StatusCode::UNAUTHORIZED,
            "missing or wrong cluster secret\n",
        );
    }
    let target = req
        .headers()
        .get(TARGET_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Admin requests come from operators, who address a node, not an id.
    let admin = req.uri().path().starts_with("/admin/");
    if !admin && target != Some(consensus.id) {
        return http::text(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this is node {}, not {target:?}\n", consensus.id),
        );
    }
    if req.method() != Method::POST {
        return http::text(StatusCode::METHOD_NOT_ALLOWED, "only POST is allowed\n");
    }
    let path = req.uri().path().to_string();
    if path == "/raft/snapshot" {
        return receive_snapshot(consensus, req).await;
    }
    if path == append_stream::PATH {
        return accept_replication(consensus, streams, req);
    }
    let body = match Limited::new(req.into_body(), MAX_RPC_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return http::text(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
    };
    let raft = &consensus.raft;
    match path.as_str() {
        "/raft/append" => match decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&body) {
            Ok(req) => {
                let leader = req.vote.leader_id.node_id;
                let res = raft.append_entries(req).await;
                if res.as_ref().is_ok_and(|r| r.is_success()) {
                    consensus.note_contact(leader);
                }
                http::json(StatusCode::OK, &res)
            }
            Err(reason) => bad_request(reason),
        },
        "/raft/vote" => match decode(&body) {
            Ok(req) => http::json(StatusCode::OK, &raft.vote(req).await),
            Err(reason) => bad_request(reason),
        },
        "/raft/pre-vote" => match decode(&body) {
            Ok(req) => http::json(StatusCode::OK, &raft.pre_vote(req).await),
            Err(reason) => bad_request(reason),
        },
        "/raft/watch" => http::json(StatusCode::OK, &super::leader_watch::hold(consensus).await),
        "/raft/history" => match decode::<HistoryRequest>(&body) {
            Ok(req) => http::json(StatusCode::OK, &history_page(consensus, req).await),
            Err(reason) => bad_request(reason),
        },
        "/raft/transfer-leader" => match decode(&body) {
            Ok(req) => {
                consensus.note_transfer();
                let res: Result<TransferLeaderResponse<TypeConfig>, RaftError<TypeConfig>> = raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(RaftError::Fatal);
                http::json(StatusCode::OK, &res)
            }
            Err(reason) => bad_request(reason),
        },
        "/api/write" => match decode::<ForwardRequest>(&body) {
            Ok(req) => {
                let timeout = Duration::from_millis(req.timeout_ms.clamp(1, 60_000));
                let count = req.commands.len();
                // Continue each message's trace from the follower that received it.
                let spans: Vec<tracing::Span> = req
                    .traceparents
                    .iter()
                    .flatten()
                    .map(|tp| {
                        let span = tracing::info_span!(
                            "chat.send",
                            otel.kind = "server",
                            node = consensus.id,
                            forwarded = true
                        );
                        crate::telemetry::set_remote_parent(&span, tp);
                        span
                    })
                    .collect();
                let answer = if consensus.status().leader != Some(consensus.id) {
                    ForwardAnswer::NotLeader
                } else {
                    match consensus.write_local(req.commands, timeout).await {
                        Ok(items) => ForwardAnswer::Results(items),
                        Err(LocalWrite::NotLeader | LocalWrite::Retry(_)) => {
                            ForwardAnswer::NotLeader
                        }
                        Err(LocalWrite::Failed(e)) => ForwardAnswer::Results(
                            (0..count).map(|_| ItemResult::Failed(e.clone())).collect(),
                        ),
                    }
                };
                drop(spans);
                http::json(StatusCode::OK, &answer)
            }
            Err(reason) => bad_request(reason),
        },
        "/admin/history-digest" => match decode::<HistoryRequest>(&body) {
            Ok(req) => http::json(StatusCode::OK, &history_digest(consensus, req).await),
            Err(reason) => bad_request(reason),
        },
        "/admin/account" => match decode::<super::AccountRequest>(&body) {
            // The request carries a password: never logged.
            Ok(req) => {
                let user = req.user.clone();
                let outcome = consensus.set_account(req).await;
                tracing::info!(user, ok = outcome.is_ok(), "account change");
                http::json(StatusCode::OK, &outcome)
            }
            Err(reason) => bad_request(reason),
        },
        "/admin/state-digest" => {
            let state = consensus.chat.state();
            let answer = StateDigest {
                applied: consensus.chat.applied(),
                fingerprint: state.fingerprint(),
            };
            drop(state);
            http::json(StatusCode::OK, &answer)
        }
        "/admin/membership" => match decode::<super::AdminRequest>(&body) {
            Ok(req) => {
                tracing::info!(?req, "membership change requested");
                http::json(StatusCode::OK, &consensus.change_members(req).await)
            }
            Err(reason) => bad_request(reason),
        },
        _ => http::text(StatusCode::NOT_FOUND, format!("no such path: {path}\n")),
    }
}

/// Upgrades a leader's request to a replication connection (`append_stream`).
fn accept_replication(
    consensus: &Arc<Consensus>,
    streams: &Arc<tokio::sync::Semaphore>,
    mut req: Request<Incoming>,
) -> HttpResponse {
    let asks = req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v.as_bytes() == append_stream::PROTOCOL.as_bytes());
    if !asks {
        return http::text(
            StatusCode::BAD_REQUEST,
            format!(
                "{} needs `upgrade: {}`\n",
                append_stream::PATH,
                append_stream::PROTOCOL
            ),
        );
    }
    let Ok(slot) = streams.clone().try_acquire_owned() else {
        return http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many replication connections\n",
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let consensus = consensus.clone();
    tokio::spawn(async move {
        let _slot = slot;
        match upgrade.await {
            Ok(io) => append_stream::serve(consensus, io).await,
            Err(e) => tracing::debug!(error = %e, "a replication connection failed to upgrade"),
        }
    });
    let mut response = http::text(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = response.headers_mut();
    headers.remove(hyper::header::CONTENT_TYPE);
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(append_stream::PROTOCOL),
    );
    response
}

fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad body: {e}\n"))
}

fn bad_request(reason: String) -> HttpResponse {
    http::text(StatusCode::BAD_REQUEST, reason)
}

/// A node's applied index and a fingerprint of its chat state there.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StateDigest {
    pub applied: u64,
    pub fingerprint: u64,
}

/// A peer asks for a page of history in (`after`, `upto`] to fill its gap.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct HistoryRequest {
    pub after: u64,
    pub upto: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub enum HistoryAnswer {
    Page(crate::chat::history::RangePage),
    /// This node cannot serve that range (not applied yet, or it lacks it itself).
    Unavailable(String),
}

async fn history_page(consensus: &Consensus, req: HistoryRequest) -> HistoryAnswer {
    let chat = consensus.chat.clone();
    if chat.applied() < req.upto {
        return HistoryAnswer::Unavailable(format!(
            "node {} has applied {} < {}",
            consensus.id,
            chat.applied(),
            req.upto
        ));
    }
    if let Some(gap) = chat.gap()
        && gap.after < req.upto
        && req.after < gap.upto
    {
        return HistoryAnswer::Unavailable(format!(
            "node {} is still copying ({}, {}] itself",
            consensus.id, gap.after, gap.upto
        ));
    }
    if let Err(e) = chat.history_ready(req.upto).await {
        return HistoryAnswer::Unavailable(e.to_string());
    }
    let read = tokio::task::spawn_blocking(move || {
        chat.history().range(
            req.after,
            req.upto,
            HISTORY_PAGE_MESSAGES,
            HISTORY_PAGE_BYTES,
        )
    })
    .await;
    match read {
        Ok(Ok(page)) => HistoryAnswer::Page(page),
        Ok(Err(e)) => HistoryAnswer::Unavailable(e.to_string()),
        Err(e) => HistoryAnswer::Unavailable(e.to_string()),
    }
}

/// A fingerprint of this node's history in (`after`, `upto`] (for tests and operators
/// comparing nodes; narrowing the range finds where two nodes differ).
async fn history_digest(
    consensus: &Consensus,
    req: HistoryRequest,
) -> Result<crate::chat::history::Digest, String> {
    let HistoryRequest { after, upto } = req;
    let chat = consensus.chat.clone();
    if chat.applied() < upto {
        return Err(format!("applied {} < {upto}", chat.applied()));
    }
    if let Some(gap) = chat.gap() {
        return Err(format!(
            "still copying history ({}..{})",
            gap.after, gap.upto
        ));
    }
    chat.history_ready(upto).await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || chat.history().digest(after, upto))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Streams a snapshot from the leader into a file in the data directory, then installs it.
/// The body is never held in memory; a body over `MAX_SNAPSHOT_BODY` is refused.
async fn receive_snapshot(consensus: &Consensus, req: Request<Incoming>) -> HttpResponse {
    use tokio::io::AsyncWriteExt;
    let vote = match req
        .headers()
        .get(VOTE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(serde_json::from_str::<super::types::Vote>)
    {
        Some(Ok(vote)) => vote,
        _ => return bad_request(format!("missing or bad {VOTE_HEADER} header\n")),
    };
    let path = consensus.snapshots.incoming_path();
    let received = async {
        // Read back (the meta, then the state) after it is written.
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Some(chunk) = frame.data_ref() {
                total += chunk.len() as u64;
                if total > MAX_SNAPSHOT_BODY {
                    return Err(std::io::Error::other("snapshot larger than 4 GiB"));
                }
                file.write_all(chunk).await?;
            }
        }
        file.flush().await?;
        let file = file.into_std().await;
        let check_path = path.clone();
        tokio::task::spawn_blocking(move || {
            let meta = read_meta(&file, &check_path)?;
            Ok::<_, std::io::Error>((meta, file))
        })
        .await
        .map_err(std::io::Error::other)?
    };
    let (meta, file) = match received.await {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            return bad_request(format!("snapshot not received: {e}\n"));
        }
    };
    let snapshot = Snapshot {
        meta,
        snapshot: SnapshotBlob {
            file,
            incoming: Some(path.clone()),
        },
    };
    let res: Result<SnapshotResponse<TypeConfig>, RaftError<TypeConfig>> = consensus
        .raft
        .install_full_snapshot(vote, snapshot)
        .await
        .map_err(RaftError::Fatal);
    // Installed snapshots were moved into place; anything left is a refused or older one.
    let _ = tokio::fs::remove_file(&path).await;
    http::json(StatusCode::OK, &res)
}
