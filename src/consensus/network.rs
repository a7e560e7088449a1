//! The raft transport, client side: JSON over HTTP/1.1 keep-alive connections (hyper), every
//! request carrying the cluster secret and the id of the node it is meant for.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openraft::RaftNetworkFactory;
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::snapshot_store::SnapshotBlob;
use super::state_machine::Snapshot;
use super::types::{NodeAddr, TypeConfig, Vote};

/// Header carrying the cluster secret.
pub const SECRET_HEADER: &str = "x-raftchat-secret";
/// Header carrying the leader's vote with a streamed snapshot.
pub const VOTE_HEADER: &str = "x-raftchat-vote";
/// Header naming the node a request is meant for; a node refuses requests for another id, so a
/// misconfigured address cannot make a leader replicate to itself.
pub const TARGET_HEADER: &str = "x-raftchat-target";

/// How long an AppendEntries that carries entries may take (see `append_entries`).
const REPLICATION_RPC_TIMEOUT: Duration = Duration::from_secs(1);

/// Observes each RPC: (rpc name, target node, duration).
/// Sees each RPC: its name, the peer, how long it took and whether it succeeded.
pub type RpcObserver = Arc<dyn Fn(&'static str, u64, Duration, bool) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("{addr}: {reason}")]
    Network { addr: String, reason: String },
    #[error("{addr} answered {status}: {body}")]
    Status {
        addr: String,
        status: StatusCode,
        body: String,
    },
}

/// A pooled HTTP client for the raft port of peers.
type Body = BoxBody<Bytes, std::io::Error>;
type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Where the raft client's TLS settings come from.
#[derive(Clone, Default)]
pub enum ClientTls {
    #[default]
    Plain,
    /// A node's own certificate (`[tls] raft = true`), reread on SIGHUP.
    Node(Arc<crate::tls::Tls>),
    /// An operator's, fixed for the process (`raftchat admin --tls-*`).
    Fixed(Arc<rustls::ClientConfig>),
}

impl ClientTls {
    /// The configuration in force and its generation; `None` for plain HTTP.
    fn current(&self) -> Option<(u64, Arc<rustls::ClientConfig>)> {
        match self {
            ClientTls::Plain => None,
            ClientTls::Node(tls) => tls.raft_client().map(|c| (tls.generation(), c)),
            ClientTls::Fixed(config) => Some((0, config.clone())),
        }
    }
}

#[derive(Clone)]
pub struct RpcClient {
    /// The pool and the TLS generation it was built for: a reload builds a new pool, so new
    /// connections present the new certificate.
    http: Arc<std::sync::RwLock<(u64, HttpClient)>>,
    tls: ClientTls,
    secret: Arc<str>,
    observer: RpcObserver,
    reachability: Arc<super::reachability::Reachability>,
}

fn build_http(tls: Option<Arc<rustls::ClientConfig>>) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(500)));
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = match tls {
        Some(config) => builder
            .with_tls_config((*config).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(http),
        None => builder
            .with_tls_config(crate::tls::plain_client())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(16)
        .build(connector)
}

impl RpcClient {
    pub fn new(secret: &str, observer: RpcObserver, tls: ClientTls) -> RpcClient {
        let (generation, config) = tls.current().unzip();
        RpcClient {
            http: Arc::new(std::sync::RwLock::new((
                generation.unwrap_or(0),
                build_http(config),
            ))),
            tls,
            secret: secret.into(),
            observer,
            reachability: Arc::default(),
        }
    }

    /// The pool for the TLS configuration in force.
    fn http(&self) -> (HttpClient, &'static str) {
        let Some((generation, config)) = self.tls.current() else {
            let current = self.http.read().unwrap_or_else(|p| p.into_inner());
            return (current.1.clone(), "http");
        };
        {
            let current = self.http.read().unwrap_or_else(|p| p.into_inner());
            if current.0 == generation {
                return (current.1.clone(), "https");
            }
        }
        let mut current = self.http.write().unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            *current = (generation, build_http(Some(config)));
        }
        (current.1.clone(), "https")
    }

    /// POSTs `body` as JSON to `{addr}{path}` and decodes the JSON answer.
    #[allow(clippy::too_many_arguments)]
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: &'static str,
        target: u64,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
        headers: &[(&str, String)],
    ) -> Result<Resp, RpcError> {
        let bytes = serde_json::to_vec(body).map_err(|e| RpcError::Network {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        let body = Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed();
        self.exchange(rpc, target, addr, path, body, timeout, headers)
            .await
    }

    /// POSTs a stream of bytes (a snapshot file) and decodes the JSON answer.
    #[allow(clippy::too_many_arguments)]
    pub async fn post_file<Resp: DeserializeOwned>(
        &self,
        rpc: &'static str,
        target: u64,
        addr: &str,
        path: &str,
        file: std::fs::File,
        timeout: Duration,
        headers: &[(&str, String)],
    ) -> Result<Resp, RpcError> {
        let file = tokio::fs::File::from_std(file);
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map_ok(Frame::data);
        let body = BodyExt::boxed(StreamBody::new(stream));
        self.exchange(rpc, target, addr, path, body, timeout, headers)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange<Resp: DeserializeOwned>(
        &self,
        rpc: &'static str,
        target: u64,
        addr: &str,
        path: &str,
        body: Body,
        timeout: Duration,
        headers: &[(&str, String)],
    ) -> Result<Resp, RpcError> {
        let started = Instant::now();
        let network = |reason: String| RpcError::Network {
            addr: addr.to_string(),
            reason,
        };
        let (http, scheme) = self.http();
        let mut builder = Request::post(format!("{scheme}://{addr}{path}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(SECRET_HEADER, self.secret.as_ref())
            .header(TARGET_HEADER, target.to_string());
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let request = builder.body(body).map_err(|e| network(e.to_string()))?;
        let exchange = async {
            let response = http.request(request).await.map_err(|e| {
                if e.is_connect() {
                    RpcError::Unreachable {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    }
                } else {
                    network(e.to_string())
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| network(e.to_string()))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(RpcError::Status {
                    addr: addr.to_string(),
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            serde_json::from_slice(&body).map_err(|e| network(format!("bad answer: {e}")))
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(network(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        };
        (self.observer)(rpc, target, started.elapsed(), result.is_ok());
        self.reachability.record(rpc, target, &result);
        result
    }
}

/// Creates one client per peer for openraft's replication and election tasks.
pub struct Network {
    pub rpc: RpcClient,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> PeerClient {
        PeerClient {
            target,
            addr: node.raft.clone(),
            rpc: self.rpc.clone(),
        }
    }
}

pub struct PeerClient {
    target: u64,
    addr: String,
    rpc: RpcClient,
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: &'static str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let answer: Result<Resp, RaftError<TypeConfig>> = self
            .rpc
            .post(rpc, self.target, &self.addr, path, req, timeout, &[])
            .await
            .map_err(|e| match e {
                // Unreachable makes openraft back off instead of hammering a dead peer.
                RpcError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        answer.map_err(|e| RPCError::Network(NetworkError::from_string(format!("remote: {e}"))))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotBlob;

    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft gives every AppendEntries the heartbeat interval. A request abandoned that
        // early also closes its connection, and on a lossy link the next one first waits for
        // a new handshake (a lost SYN costs a second): a seconds-long stall where TCP would
        // have retransmitted in 200 ms. Entries get longer; heartbeats keep openraft's limit.
        let timeout = if req.entries.is_empty() {
            option.soft_ttl()
        } else {
            option.hard_ttl().max(REPLICATION_RPC_TIMEOUT)
        };
        self.call("append", "/raft/append", &req, timeout).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", "/raft/vote", &req, option.soft_ttl())
            .await
    }

    async fn pre_vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", "/raft/pre-vote", &req, option.soft_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let to_network = |e: String| RPCError::Network(NetworkError::from_string(e));
        let vote_json = serde_json::to_string(&vote).map_err(|e| to_network(e.to_string()))?;
        // The file holds its own meta; the receiver reads it from there.
        let send = async {
            let answer: Result<SnapshotResponse<TypeConfig>, RaftError<TypeConfig>> = self
                .rpc
                .post_file(
                    "snapshot",
                    self.target,
                    &self.addr,
                    "/raft/snapshot",
                    snapshot.snapshot.file,
                    option.hard_ttl(),
                    &[(VOTE_HEADER, vote_json)],
                )
                .await
                .map_err(|e| {
                    tracing::warn!(target = self.target, error = %e, "sending a snapshot failed");
                    match e {
                        RpcError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                        _ => RPCError::Network(NetworkError::new(&e)),
                    }
                })?;
            answer.map_err(|e| to_network(format!("remote: {e}")))
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = send => Ok(res?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer", "/raft/transfer-leader", &req, option.soft_ttl())
            .await
    }

    fn backoff(&self) -> Option<Backoff> {
        // Retry a dead peer soon enough that it catches up quickly once it is back.
        let steps = [25u64, 50, 100, 200, 300];
        Some(Backoff::new(
            steps
                .into_iter()
                .chain(std::iter::repeat(300))
                .map(Duration::from_millis),
        ))
    }
}
