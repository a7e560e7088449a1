//! Chat: the replicated state, the message history, the dialects and the fan-out of applied
//! events to this node's connections.

pub mod accounts;
pub mod backfill;
pub mod batching;
pub mod command;
pub mod conn;
pub mod delivery;
pub mod fanout;
pub mod history;
pub mod history_writer;
pub mod irc;
pub mod json;
pub mod lines;
pub mod names;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
