//! The raft port's client: JSON over HTTP/1.1 keep-alive connections (hyper), every request
//! carrying the cluster secret and the id of the node it is meant for.
//!
//! Each request runs as its own task. The caller waits until its timeout; the task may run a
//! little longer, so a reply that was merely slow (a retransmitted segment on a lossy link)
//! still arrives and its connection goes back to the pool. Abandoning the request instead
//! closes the connection, and the next request first waits for a new handshake, whose lost
//! SYN costs a second. Requests that may arrive twice can also be hedged (see `hedge`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::hedge::{HedgeSlot, Hedging};

/// Header carrying the cluster secret.
pub const SECRET_HEADER: &str = "x-raftchat-secret";
/// Header carrying the leader's vote with a streamed snapshot.
pub const VOTE_HEADER: &str = "x-raftchat-vote";
/// Header naming the node a request is meant for; a node refuses requests for another id, so a
/// misconfigured address cannot make a leader replicate to itself.
pub const TARGET_HEADER: &str = "x-raftchat-target";
/// The largest raft-port request body (a snapshot streams apart), and the largest answer.
pub const MAX_RPC_BODY: usize = 64 * 1024 * 1024;

/// How long a request may go on after its caller stopped waiting (at least).
const LINGER: Duration = Duration::from_secs(2);
/// Requests running past their caller are aborted instead once this many requests run (a dead
/// peer must not collect a task per heartbeat).
const MAX_RUNNING: usize = 64;
/// Larger requests are never hedged: their time is the transfer and the peer's disk rather
/// than one lost segment (with many segments in flight TCP repairs a loss by fast
/// retransmit), and a copy would double a busy peer's work.
const MAX_HEDGED_BYTES: usize = 64 * 1024;
/// Copies of one hedged request, the first included.
const MAX_COPIES: usize = 3;

/// Sees each RPC: its name, the peer, how long it took and whether it succeeded.
pub type RpcObserver = Arc<dyn Fn(&'static str, u64, Duration, bool) + Send + Sync>;
/// Sees each second copy of an unanswered RPC: its name and the peer.
pub type HedgeObserver = Arc<dyn Fn(&'static str, u64) + Send + Sync>;

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

/// Whether a request may go out more than once (see `hedge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hedge {
    Never,
    /// It may arrive twice: copy it when unanswered for longer than usual.
    IfSlow,
}

/// What the callers of one node's client have to say about its requests.
#[derive(Clone)]
pub struct RpcObservers {
    pub answered: RpcObserver,
    pub hedged: HedgeObserver,
}

impl Default for RpcObservers {
    fn default() -> Self {
        RpcObservers {
            answered: Arc::new(|_, _, _, _| {}),
            hedged: Arc::new(|_, _| {}),
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
    observers: RpcObservers,
    reachability: Arc<super::reachability::Reachability>,
    hedging: Arc<Hedging>,
    running: Arc<AtomicUsize>,
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

/// One request as it goes out, shared by its copies.
struct Outgoing {
    rpc: &'static str,
    target: u64,
    addr: String,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

/// The tasks carrying one request's copies. Dropped while the caller still waits (it gave
/// up), they are aborted unless the client can afford to let them finish.
struct Copies {
    tasks: Vec<tokio::task::AbortHandle>,
    running: Arc<AtomicUsize>,
}

impl Drop for Copies {
    fn drop(&mut self) {
        if self.running.load(Ordering::Acquire) > MAX_RUNNING {
            for task in &self.tasks {
                task.abort();
            }
        }
    }
}

/// A copy's outcome, once it has one.
type Answer<Resp> = Pin<Box<dyn Future<Output = Result<Resp, RpcError>> + Send>>;

/// The first copy of a request, run in the caller's own task: a request answered in time
/// costs no hand-off to a task of its own and back. If the caller stops waiting first, the
/// copy moves to a task and lingers like the others (its connection stays pooled).
struct InlineCopy<Resp: Send + 'static> {
    answer: Option<Answer<Resp>>,
    running: Arc<AtomicUsize>,
}

impl<Resp: Send + 'static> InlineCopy<Resp> {
    /// Resolves with the copy's answer (never, once it was taken).
    async fn next(&mut self) -> Result<Resp, RpcError> {
        match self.answer.as_mut() {
            Some(answer) => answer.await,
            None => std::future::pending().await,
        }
    }
}

impl<Resp: Send + 'static> Drop for InlineCopy<Resp> {
    fn drop(&mut self) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        if self.running.load(Ordering::Acquire) > MAX_RUNNING {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let running = Running::new(&self.running);
            runtime.spawn(async move {
                let _running = running;
                let _ = answer.await;
            });
        }
    }
}

/// Counts a running copy for as long as it lives.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn new(count: &Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::AcqRel);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RpcClient {
    pub fn new(secret: &str, observers: RpcObservers, tls: ClientTls) -> RpcClient {
        let (generation, config) = tls.current().unzip();
        RpcClient {
            http: Arc::new(std::sync::RwLock::new((
                generation.unwrap_or(0),
                build_http(config),
            ))),
            tls,
            secret: secret.into(),
            observers,
            reachability: Arc::default(),
            hedging: Arc::default(),
            running: Arc::default(),
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
    pub async fn post<Req: Serialize, Resp: DeserializeOwned + Send + 'static>(
        &self,
        rpc: &'static str,
        target: u64,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
        headers: &[(&'static str, String)],
    ) -> Result<Resp, RpcError> {
        self.post_with(
            rpc,
            target,
            addr,
            path,
            body,
            timeout,
            headers,
            Hedge::Never,
        )
        .await
    }

    /// `post`, hedged when the request may safely arrive twice (a raft AppendEntries; a
    /// forward of messages, deduplicated when applied): when no answer came in the usual
    /// time, another copy goes out on another connection and the first answer wins.
    #[allow(clippy::too_many_arguments)]
    pub async fn post_with<Req: Serialize, Resp: DeserializeOwned + Send + 'static>(
        &self,
        rpc: &'static str,
        target: u64,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
        headers: &[(&'static str, String)],
        hedge: Hedge,
    ) -> Result<Resp, RpcError> {
        let started = Instant::now();
        let body = serde_json::to_vec(body).map_err(|e| RpcError::Network {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        let hedge = hedge == Hedge::IfSlow && body.len() <= MAX_HEDGED_BYTES;
        let outgoing = Arc::new(Outgoing {
            rpc,
            target,
            addr: addr.to_string(),
            path: path.to_string(),
            headers: headers.to_vec(),
            body: Bytes::from(body),
        });
        let result = self.copies(outgoing, started, timeout, hedge).await;
        self.observe(rpc, target, started.elapsed(), &result);
        result
    }

    /// Sends the first copy, a second one if hedging and the first is slow, and returns the
    /// first answer (or the last error).
    async fn copies<Resp: DeserializeOwned + Send + 'static>(
        &self,
        outgoing: Arc<Outgoing>,
        started: Instant,
        timeout: Duration,
        hedge: bool,
    ) -> Result<Resp, RpcError> {
        // Room for every copy's answer, so a copy never waits to deliver it.
        let (answers, mut answered) = tokio::sync::mpsc::channel::<Result<Resp, RpcError>>(2);
        let bound = timeout.max(LINGER);
        let attempt = {
            let client = self.clone();
            let outgoing = outgoing.clone();
            move || {
                let (client, outgoing) = (client.clone(), outgoing.clone());
                async move {
                    let sent = Instant::now();
                    let answer = match tokio::time::timeout(bound, client.exchange(&outgoing)).await
                    {
                        Ok(answer) => answer,
                        Err(_) => Err(RpcError::Network {
                            addr: outgoing.addr.clone(),
                            reason: format!("no answer within {} ms", bound.as_millis()),
                        }),
                    };
                    if answer.is_ok() {
                        client
                            .hedging
                            .answered(outgoing.rpc, outgoing.target, sent.elapsed());
                    }
                    answer
                }
            }
        };
        let spawn = |slot: HedgeSlot| {
            let answers = answers.clone();
            let running = Running::new(&self.running);
            let answer = attempt();
            tokio::spawn(async move {
                let _running = running;
                let answer = answer.await;
                drop(slot);
                let _ = answers.try_send(answer);
            })
            .abort_handle()
        };
        let mut first = InlineCopy {
            answer: Some(Box::pin(attempt()) as Answer<Resp>),
            running: self.running.clone(),
        };
        let mut copies = Copies {
            tasks: Vec::new(),
            running: self.running.clone(),
        };
        let mut outstanding = 1usize;
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let delay = self.hedging.delay(outgoing.rpc, outgoing.target);
        let mut hedge_at = hedge.then(|| tokio::time::Instant::from_std(started + delay));
        loop {
            let answer = tokio::select! {
                answer = first.next(), if first.answer.is_some() => {
                    first.answer = None;
                    answer
                }
                answer = answered.recv(), if !copies.tasks.is_empty() => {
                    answer.ok_or_else(|| RpcError::Network {
                        addr: outgoing.addr.clone(),
                        reason: "every copy of the request was lost".into(),
                    })?
                }
                _ = tokio::time::sleep_until(hedge_at.unwrap_or(deadline)), if hedge_at.is_some() => {
                    hedge_at = (copies.tasks.len() + 1 < MAX_COPIES - 1)
                        .then(|| tokio::time::Instant::from_std(Instant::now() + delay));
                    if let Some(slot) = self.hedging.slot() {
                        (self.observers.hedged)(outgoing.rpc, outgoing.target);
                        copies.tasks.push(spawn(slot));
                        outstanding += 1;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(RpcError::Network {
                        addr: outgoing.addr.clone(),
                        reason: format!("no answer within {} ms", timeout.as_millis()),
                    });
                }
            };
            outstanding -= 1;
            // An error while another copy is out: that one may yet answer.
            if answer.is_ok() || outstanding == 0 {
                // The others finish on their own (their connections stay pooled).
                copies.tasks.clear();
                return answer;
            }
        }
    }

    /// POSTs a stream of bytes (a snapshot file) and decodes the JSON answer; not retried,
    /// not lingering: the stream cannot be replayed.
    #[allow(clippy::too_many_arguments)]
    pub async fn post_file<Resp: DeserializeOwned>(
        &self,
        rpc: &'static str,
        target: u64,
        addr: &str,
        path: &str,
        file: std::fs::File,
        timeout: Duration,
        headers: &[(&'static str, String)],
    ) -> Result<Resp, RpcError> {
        let started = Instant::now();
        let file = tokio::fs::File::from_std(file);
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map_ok(Frame::data);
        let outgoing = Outgoing {
            rpc,
            target,
            addr: addr.to_string(),
            path: path.to_string(),
            headers: headers.to_vec(),
            body: Bytes::new(),
        };
        let body = BodyExt::boxed(StreamBody::new(stream));
        let result = match tokio::time::timeout(timeout, self.exchange_body(&outgoing, body)).await
        {
            Ok(r) => r,
            Err(_) => Err(RpcError::Network {
                addr: addr.to_string(),
                reason: format!("no answer within {} ms", timeout.as_millis()),
            }),
        };
        self.observe(rpc, target, started.elapsed(), &result);
        result
    }

    /// Opens a connection to `addr` and upgrades it to `protocol` (see `append_stream`).
    pub async fn upgrade(
        &self,
        target: u64,
        addr: &str,
        path: &str,
        protocol: &'static str,
        timeout: Duration,
    ) -> Result<hyper::upgrade::Upgraded, RpcError> {
        let network = |reason: String| RpcError::Network {
            addr: addr.to_string(),
            reason,
        };
        let (http, scheme) = self.http();
        let request = Request::post(format!("{scheme}://{addr}{path}"))
            .header(SECRET_HEADER, self.secret.as_ref())
            .header(TARGET_HEADER, target.to_string())
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, protocol)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| network(e.to_string()))?;
        let open = async {
            let mut response = http
                .request(request)
                .await
                .map_err(|e| request_error(addr, e))?;
            let status = response.status();
            if status != StatusCode::SWITCHING_PROTOCOLS {
                let body = read_body(addr, response.into_body())
                    .await
                    .unwrap_or_default();
                return Err(status_error(addr, status, &body));
            }
            hyper::upgrade::on(&mut response)
                .await
                .map_err(|e| network(e.to_string()))
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(opened) => opened,
            Err(_) => Err(network(format!(
                "no upgrade within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Records one answer (or failure) that came on a replication connection.
    pub fn observe_answer(
        &self,
        rpc: &'static str,
        target: u64,
        took: Duration,
        result: &Result<(), RpcError>,
    ) {
        self.observe(rpc, target, took, result);
    }

    fn observe<Resp>(
        &self,
        rpc: &'static str,
        target: u64,
        took: Duration,
        result: &Result<Resp, RpcError>,
    ) {
        (self.observers.answered)(rpc, target, took, result.is_ok());
        self.reachability.record(rpc, target, result);
    }

    async fn exchange<Resp: DeserializeOwned>(
        &self,
        outgoing: &Outgoing,
    ) -> Result<Resp, RpcError> {
        let body = Full::new(outgoing.body.clone())
            .map_err(|never| match never {})
            .boxed();
        self.exchange_body(outgoing, body).await
    }

    async fn exchange_body<Resp: DeserializeOwned>(
        &self,
        outgoing: &Outgoing,
        body: Body,
    ) -> Result<Resp, RpcError> {
        let addr = &outgoing.addr;
        let network = |reason: String| RpcError::Network {
            addr: addr.clone(),
            reason,
        };
        let (http, scheme) = self.http();
        let mut builder = Request::post(format!("{scheme}://{addr}{}", outgoing.path))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(SECRET_HEADER, self.secret.as_ref())
            .header(TARGET_HEADER, outgoing.target.to_string());
        for (name, value) in &outgoing.headers {
            builder = builder.header(*name, value);
        }
        let request = builder.body(body).map_err(|e| network(e.to_string()))?;
        let response = http
            .request(request)
            .await
            .map_err(|e| request_error(addr, e))?;
        let status = response.status();
        let body = read_body(addr, response.into_body()).await?;
        if status != StatusCode::OK {
            return Err(status_error(addr, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| network(format!("bad answer: {e}")))
    }
}

/// An answer's body, at most as large as the raft port's largest request.
async fn read_body(addr: &str, body: hyper::body::Incoming) -> Result<Bytes, RpcError> {
    use hyper::body::Body as _;
    let announced = body.size_hint().lower();
    if announced > MAX_RPC_BODY as u64 {
        return Err(RpcError::Network {
            addr: addr.to_string(),
            reason: format!(
                "reading the answer: {announced} bytes announced, {MAX_RPC_BODY} at most"
            ),
        });
    }
    Limited::new(body, MAX_RPC_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| RpcError::Network {
            addr: addr.to_string(),
            reason: format!("reading the answer: {e}"),
        })
}

fn status_error(addr: &str, status: StatusCode, body: &[u8]) -> RpcError {
    RpcError::Status {
        addr: addr.to_string(),
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    }
}

/// A request that got no answer: unreachable when the connection could not be made.
fn request_error(addr: &str, e: hyper_util::client::legacy::Error) -> RpcError {
    if e.is_connect() {
        RpcError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        }
    } else {
        RpcError::Network {
            addr: addr.to_string(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// A peer answering `{}` to every request, the `n`-th (from 0) after `stall(n)`; counts
    /// the connections it accepted and the requests it read.
    struct Peer {
        addr: String,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
    }

    async fn peer(stall: fn(usize) -> Duration) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (accepted, read) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let read = read.clone();
                tokio::spawn(async move {
                    let mut socket = BufReader::new(socket);
                    loop {
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap_or(0);
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        if socket.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let n = read.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(stall(n)).await;
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                        if socket.get_mut().write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Peer {
            addr,
            connections,
            requests,
        }
    }

    fn client() -> (RpcClient, Arc<AtomicUsize>) {
        let hedges = Arc::new(AtomicUsize::new(0));
        let counted = hedges.clone();
        let observers = RpcObservers {
            hedged: Arc::new(move |_, _| {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
            ..RpcObservers::default()
        };
        (
            RpcClient::new("secret", observers, ClientTls::Plain),
            hedges,
        )
    }

    type Empty = std::collections::BTreeMap<String, String>;

    #[tokio::test]
    async fn an_unanswered_hedged_request_is_answered_by_its_second_copy() {
        // The first request stalls for good; any other is answered at once.
        let peer = peer(|n| Duration::from_secs(if n == 0 { 3600 } else { 0 })).await;
        let (client, hedges) = client();
        let started = Instant::now();
        let answer: Result<Empty, _> = client
            .post_with(
                "append",
                2,
                &peer.addr,
                "/x",
                &(),
                Duration::from_secs(5),
                &[],
                Hedge::IfSlow,
            )
            .await;
        assert!(answer.is_ok(), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(hedges.load(Ordering::SeqCst), 1);
        assert_eq!(peer.requests.load(Ordering::SeqCst), 2);
        // Without hedging the same stall is a timeout.
        let peer = self::peer(|n| Duration::from_secs(if n == 0 { 3600 } else { 0 })).await;
        let answer: Result<Empty, _> = client
            .post(
                "append",
                2,
                &peer.addr,
                "/x",
                &(),
                Duration::from_millis(500),
                &[],
            )
            .await;
        assert!(answer.is_err());
        assert_eq!(peer.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_prompt_answer_sends_no_second_copy() {
        let peer = peer(|_| Duration::ZERO).await;
        let (client, hedges) = client();
        for _ in 0..20 {
            let answer: Result<Empty, _> = client
                .post_with(
                    "append",
                    2,
                    &peer.addr,
                    "/x",
                    &(),
                    Duration::from_secs(5),
                    &[],
                    Hedge::IfSlow,
                )
                .await;
            assert!(answer.is_ok(), "{answer:?}");
        }
        // A loaded test machine may stall one past the delay, not most.
        let hedged = hedges.load(Ordering::SeqCst);
        assert!(hedged < 5, "{hedged} second copies");
        assert_eq!(peer.requests.load(Ordering::SeqCst), 20 + hedged);
        assert!(peer.connections.load(Ordering::SeqCst) <= 1 + hedged);
    }

    #[tokio::test]
    async fn a_request_its_caller_gave_up_on_keeps_its_connection() {
        // The first answer comes after the caller's timeout, but within the linger.
        let peer = peer(|n| Duration::from_millis(if n == 0 { 400 } else { 0 })).await;
        let (client, _) = client();
        let answer: Result<Empty, _> = client
            .post(
                "append",
                2,
                &peer.addr,
                "/x",
                &(),
                Duration::from_millis(100),
                &[],
            )
            .await;
        assert!(answer.is_err());
        let deadline = Instant::now() + Duration::from_secs(5);
        while client.running.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "the first request never finished"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answer: Result<Empty, _> = client
            .post(
                "append",
                2,
                &peer.addr,
                "/x",
                &(),
                Duration::from_secs(5),
                &[],
            )
            .await;
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(peer.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_larger_than_any_request_is_refused() {
        // A peer that claims a 1 GiB answer and sends a first MiB of it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n";
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&vec![b' '; 1 << 20]).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let (client, _) = client();
        let started = Instant::now();
        let answer: Result<Empty, _> = client
            .post("history", 2, &addr, "/x", &(), Duration::from_secs(60), &[])
            .await;
        let Err(e) = answer else {
            panic!("a 1 GiB answer was taken");
        };
        assert!(e.to_string().contains("reading the answer"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
