//! The raft transport's openraft side: one `PeerClient` per peer for replication and
//! elections, on the node's `RpcClient`.

use std::future::Future;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use openraft::RaftNetworkFactory;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetworkV2, stream_append_sequential};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::append_stream::Replication;
use super::rpc_client::{Hedge, RpcClient, RpcError, VOTE_HEADER};
use super::snapshot_store::SnapshotBlob;
use super::state_machine::Snapshot;
use super::types::{NodeAddr, TypeConfig, Vote};

/// How long a replication session goes over HTTP before it tries a connection again.
const HTTP_SESSION: Duration = Duration::from_secs(1);
/// How long an AppendEntries that carries entries may take (see `append_entries`).
const REPLICATION_RPC_TIMEOUT: Duration = Duration::from_secs(1);

type Answers<'s> = BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

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
            replication: Replication::default(),
        }
    }
}

pub struct PeerClient {
    target: u64,
    addr: String,
    rpc: RpcClient,
    /// Its pipelined AppendEntries connection (`append_stream`).
    replication: Replication,
}

impl PeerClient {
    /// One RPC; hedged only if a peer may safely receive it twice.
    async fn call<Req: Serialize, Resp: DeserializeOwned + Send + 'static>(
        &self,
        rpc: &'static str,
        path: &'static str,
        req: &Req,
        timeout: Duration,
        hedge: Hedge,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let answer = self
            .rpc
            .post_with(rpc, self.target, &self.addr, path, req, timeout, &[], hedge)
            .await;
        let answer: Result<Resp, RaftError<TypeConfig>> = answer.map_err(|e| match e {
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
        // Entries also get a second copy when unanswered: a follower skips entries it holds.
        let heartbeat = req.entries.is_empty();
        let timeout = if heartbeat {
            option.soft_ttl()
        } else {
            option.hard_ttl().max(REPLICATION_RPC_TIMEOUT)
        };
        let hedge = if heartbeat {
            Hedge::Never
        } else {
            Hedge::IfSlow
        };
        self.call("append", "/raft/append", &req, timeout, hedge)
            .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<Answers<'s>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            if !self
                .replication
                .ready(&self.rpc, self.target, &self.addr)
                .await
            {
                // One HTTP request at a time (`append_entries`), for a while: the session then
                // ends, and the next one tries a connection again.
                let until = tokio::time::Instant::now() + HTTP_SESSION;
                let input = Box::pin(futures_util::stream::unfold(
                    input,
                    move |mut input| async move {
                        tokio::select! {
                            request = input.next() => request.map(|request| (request, input)),
                            _ = tokio::time::sleep_until(until) => None,
                        }
                    },
                ));
                return stream_append_sequential(self, input, option).await;
            }
            let (rpc, target) = (self.rpc.clone(), self.target);
            Ok(self.replication.session(input, rpc, target))
        })
    }

    async fn vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", "/raft/vote", &req, option.soft_ttl(), Hedge::Never)
            .await
    }

    async fn pre_vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            "vote",
            "/raft/pre-vote",
            &req,
            option.soft_ttl(),
            Hedge::Never,
        )
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
        self.call(
            "transfer",
            "/raft/transfer-leader",
            &req,
            option.soft_ttl(),
            Hedge::Never,
        )
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
