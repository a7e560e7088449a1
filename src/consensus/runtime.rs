//! The runtime raft's tasks run on, apart from the client connections' runtime.

/// The runtime raft's tasks run on (its core, replication to each peer, the state machine,
/// the raft port, the leader watch), apart from the client connections'. On one runtime a
/// message to a 1,000-member room woke as many connection tasks, and each step of the next
/// commit (the answer to a write, the next request) queued behind them: a write took 21–24 ms
/// from its line to its ack instead of 2 (BENCHMARKS.md, the 1,000-member room).
pub struct ConsensusRuntime {
    handle: tokio::runtime::Handle,
    /// Taken only on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl ConsensusRuntime {
    pub fn new() -> std::io::Result<ConsensusRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("raft")
            .enable_all()
            .build()?;
        Ok(ConsensusRuntime {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for ConsensusRuntime {
    fn drop(&mut self) {
        // Dropped from the main runtime: waiting for its tasks here would block it.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
