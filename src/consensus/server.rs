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

use super::network::{SECRET_HEADER, SnapshotRequest, TARGET_HEADER};
use super::state_machine::Snapshot;
use super::types::TypeConfig;
use super::{Consensus, ForwardAnswer, ForwardRequest, ItemResult, LocalWrite};
use crate::http::{self, HttpResponse};

const MAX_RPC_BODY: usize = 64 * 1024 * 1024;
const MAX_SNAPSHOT_BODY: usize = 1024 * 1024 * 1024;

pub async fn serve_raft_port(
    listener: TcpListener,
    consensus: Arc<Consensus>,
    shutdown: CancellationToken,
) {
    let handler = move |req: Request<Incoming>| {
        let consensus = consensus.clone();
        async move { handle(&consensus, req).await }
    };
    http::serve(listener, handler, shutdown).await;
}

fn authorized(consensus: &Consensus, req: &Request<Incoming>) -> bool {
    req.headers().get(SECRET_HEADER).is_some_and(|v| {
        constant_time_eq::constant_time_eq(v.as_bytes(), consensus.secret.as_bytes())
    })
}

async fn handle(consensus: &Consensus, req: Request<Incoming>) -> HttpResponse {
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
    let limit = if path == "/raft/snapshot" {
        MAX_SNAPSHOT_BODY
    } else {
        MAX_RPC_BODY
    };
    let body = match Limited::new(req.into_body(), limit).collect().await {
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
        "/raft/snapshot" => match decode::<SnapshotRequest>(&body) {
            Ok(req) => {
                let snapshot = Snapshot {
                    meta: req.meta,
                    snapshot: req.payload,
                };
                let res: Result<SnapshotResponse<TypeConfig>, RaftError<TypeConfig>> = raft
                    .install_full_snapshot(req.vote, snapshot)
                    .await
                    .map_err(RaftError::Fatal);
                http::json(StatusCode::OK, &res)
            }
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
                        let span =
                            tracing::info_span!("chat.send", node = consensus.id, forwarded = true);
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

fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad body: {e}\n"))
}

fn bad_request(reason: String) -> HttpResponse {
    http::text(StatusCode::BAD_REQUEST, reason)
}
