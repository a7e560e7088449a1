//! raftchat: a fault-tolerant chat cluster.
//!
//! One node's data flow:
//!
//! ```text
//!  chat port ─┐
//!  chat_tls ──┴► chat::server ─ (tls) ─ sniff ─► chat::json | chat::irc ──► chat::service
//!                                  (a connection's sends in batches: chat::batching) │ commands
//!                                                                        ▼
//!  raft port ◄──► consensus (openraft: log store, state machine, snapshots, transport,
//!  (mTLS: tls)               forwarding, history pages for peers, leader watch)
//!  /raft/stream ◄─► consensus::append_stream (a leader's pipelined AppendEntries: one
//!                   upgraded connection per peer; HTTP one request at a time without it)
//!                  [on a runtime of its own, so connections' bursts never queue ahead of it]
//!                                                                        │ applied entries, in order
//!                                                                        ▼
//!                  chat::store (ChatState + History on disk) ──► chat::fanout ──► connections
//!                  (the history written after the acks;  (each event only to its room's members,
//!                   its readers wait until it has it all)  a DM's parties; one queue entry
//!                                                          per connection per applied batch)
//!                        ▲ skipped history, in pages ── chat::backfill ◄── peers' raft ports
//!  metrics port ◄── http (/healthz /readyz /status /metrics) ◄── node state, health prober
//!                                                       (peers: the raft membership)
//!  leadership: raft metrics + probes ──► leader change / lost / recovered / failover events
//!  telemetry: one metrics registry; logs to stderr; spans over OTLP (counted exporter)
//!  tls: PEM certificates for chat_tls and the raft port, reread on SIGHUP
//! ```
//!
//! `consensus` is the only module that names openraft types. A Raft snapshot holds the chat
//! state only; the history lives in its own store and moves between nodes in bounded pages,
//! so no structure in a node grows with the history.

pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod consensus;
pub mod disk;
pub mod health;
pub mod http;
pub mod leadership;
pub mod node;
pub mod telemetry;
pub mod tls;
