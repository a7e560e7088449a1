//! raftchat: a fault-tolerant chat cluster.
//!
//! One node's data flow:
//!
//! ```text
//!  chat port ──► chat::server ─ sniff ─► chat::json (IRC: later) ──► chat::service
//!                                                                        │ commands
//!                                                                        ▼
//!  raft port ◄──► consensus (openraft: log store, state machine, transport, forwarding)
//!                                                                        │ applied entries, in order
//!                                                                        ▼
//!                  chat::store (ChatState + History on disk) ──► events ──► connections
//!  metrics port ◄── http (/healthz /readyz /status /metrics) ◄── node state, health prober
//! ```
//!
//! `consensus` is the only module that names openraft types.

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
