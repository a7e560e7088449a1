//! `raftchat bench --failovers / --client-failovers / --handoffs`: what a crash or a planned
//! restart of the leader costs the people chatting, timed from outside on a local cluster.
//!
//! - `--failovers K`: SIGKILL the leader; time until the survivors agree on a new one, and
//!   until a client on a surviving node (sending one message at a time) has a message sent
//!   after the kill acknowledged (so committed under the new leader).
//! - `--client-failovers K`: SIGKILL the node a client is connected to (the leader); time until
//!   the client has resumed its session elsewhere.
//! - `--handoffs K`: SIGTERM the leader while clients on the other nodes keep writing; the
//!   longest time with no acknowledgement anywhere among them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::bench::{wait_caught_up, wait_for_leader};
use super::cluster::LocalCluster;
use crate::client::{Client, ClientConfig, Event};

/// Clients that keep writing and record each acknowledgement: (when it arrived, when its
/// message was sent).
struct Canaries {
    acks: Arc<Mutex<Vec<(Instant, Instant)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Canaries {
    /// `count` clients on `servers` (client i starts at server i), each keeping `window`
    /// messages in flight; returns once every one has joined.
    async fn start(
        servers: &[String],
        count: usize,
        window: usize,
        name: &str,
    ) -> anyhow::Result<Canaries> {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let mut joined = Vec::new();
        for i in 0..count {
            let mut order = servers.to_vec();
            order.rotate_left(i % servers.len());
            let mut config = ClientConfig::new(order, &format!("{name}{i}"));
            config.rooms = vec!["#failover".into()];
            let (tx, rx) = tokio::sync::oneshot::channel();
            joined.push(rx);
            tasks.push(tokio::spawn(canary(config, window, acks.clone(), tx)));
        }
        for rx in joined {
            match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(Ok(())) => {}
                _ => bail!("a {name} client did not join within 30 s"),
            }
        }
        Ok(Canaries { acks, tasks })
    }

    fn count(&self) -> usize {
        self.acks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The first acknowledgement of a message sent after `t` (so committed by whoever leads
    /// after it), waiting up to `timeout` for it.
    async fn first_ack_sent_after(&self, t: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .acks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|(_, sent)| *sent > t)
                .map(|(acked, _)| *acked);
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The longest time without an acknowledgement in [`from`, `to`].
    fn longest_pause(&self, from: Instant, to: Instant) -> Duration {
        let mut acks: Vec<Instant> = self
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(acked, _)| *acked)
            .collect();
        acks.sort();
        let mut last = from;
        let mut longest = Duration::ZERO;
        for a in acks.into_iter().filter(|a| *a > from && *a <= to) {
            longest = longest.max(a - last);
            last = a;
        }
        longest.max(to.saturating_duration_since(last))
    }

    async fn wait_for_acks(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let start = self.count();
        while self.count() < start + n {
            if Instant::now() > deadline {
                bail!("the writing clients were not acknowledged within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

impl Drop for Canaries {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn canary(
    config: ClientConfig,
    window: usize,
    acks: Arc<Mutex<Vec<(Instant, Instant)>>>,
    joined: tokio::sync::oneshot::Sender<()>,
) {
    let mut client = Client::start(config);
    let mut joined = Some(joined);
    // Send times, oldest first: one connection acknowledges in order.
    let mut in_flight = std::collections::VecDeque::new();
    loop {
        if joined.is_none() {
            while in_flight.len() < window {
                if client.send("#failover", "still here").is_err() {
                    break;
                }
                in_flight.push_back(Instant::now());
            }
        }
        match client.next_event().await {
            Some(Event::Joined { .. }) => {
                if let Some(tx) = joined.take() {
                    let _ = tx.send(());
                }
            }
            Some(Event::Acked { .. }) => {
                let sent = in_flight.pop_front().unwrap_or_else(Instant::now);
                acks.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), sent));
            }
            Some(Event::Refused { id: Some(_), .. }) => {
                in_flight.pop_front();
            }
            // A lost session does not re-send: those messages are no longer in flight.
            Some(Event::SessionLost { unacked, .. }) => {
                for _ in 0..unacked.len() {
                    in_flight.pop_front();
                }
            }
            Some(Event::Failed(_)) | None => return,
            Some(_) => {}
        }
    }
}

/// The leader, once every node agrees on it and has applied the same entries.
async fn settled_leader(cluster: &LocalCluster) -> anyhow::Result<u64> {
    let leader = wait_for_leader(cluster, &[], Duration::from_secs(30)).await?;
    wait_caught_up(cluster, Duration::from_secs(30)).await?;
    Ok(leader)
}

fn chat_addrs(cluster: &LocalCluster, except: Option<u64>) -> Vec<String> {
    cluster
        .config
        .nodes
        .iter()
        .filter(|n| Some(n.id) != except)
        .map(|n| n.chat.clone())
        .collect()
}

/// Per round: (ms until the survivors agree on a new leader, ms until the next ack).
pub async fn failovers(
    cluster: &mut LocalCluster,
    rounds: usize,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut times = Vec::new();
    for round in 1..=rounds {
        let leader = settled_leader(cluster).await?;
        // One client on a surviving node, one message at a time.
        let survivor = chat_addrs(cluster, Some(leader));
        let writer = Canaries::start(&survivor[..1], 1, 1, &format!("survivor{round}x")).await?;
        writer.wait_for_acks(20, Duration::from_secs(10)).await?;
        let killed_at = Instant::now();
        cluster.kill(leader).await;
        let elected = async {
            let leader = wait_for_leader(cluster, &[leader], Duration::from_secs(30)).await;
            (leader, killed_at.elapsed())
        };
        let ((new_leader, elected_after), acked) = tokio::join!(
            elected,
            writer.first_ack_sent_after(killed_at, Duration::from_secs(30)),
        );
        let new_leader = new_leader?;
        let Some(acked) = acked else {
            bail!("no acknowledgement within 30 s of killing leader {leader}");
        };
        let elected_ms = elected_after.as_secs_f64() * 1000.0;
        let ack_ms = (acked - killed_at).as_secs_f64() * 1000.0;
        eprintln!(
            "bench: failover {round}/{rounds}: leader {leader} killed, {new_leader} leads \
             (agreed after {elected_ms:.0} ms), next ack after {ack_ms:.0} ms"
        );
        times.push((elected_ms, ack_ms));
        drop(writer);
        cluster.start_node(leader)?;
    }
    Ok(times)
}

/// Kills the node a client is connected to (the leader's, the worst case) `rounds` times and
/// times how long the client takes from the kill to a resumed session on another node.
pub async fn client_failovers(
    cluster: &mut LocalCluster,
    rounds: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for round in 1..=rounds {
        let leader = settled_leader(cluster).await?;
        // The leader's node first: the client sits where the kill hurts most.
        let mut servers = vec![cluster.config.node(leader)?.chat.clone()];
        servers.extend(chat_addrs(cluster, Some(leader)));
        let mut config = ClientConfig::new(servers, &format!("downtime{round}"));
        config.rooms = vec!["#downtime".into()];
        let mut client = Client::start(config);
        loop {
            match tokio::time::timeout(Duration::from_secs(30), client.next_event()).await {
                Ok(Some(Event::Joined { .. })) => break,
                Ok(Some(Event::Failed(e))) => bail!("downtime client: {e}"),
                Ok(Some(_)) => {}
                _ => bail!("downtime client did not join in 30 s"),
            }
        }
        let killed_at = Instant::now();
        cluster.kill(leader).await;
        let downtime = loop {
            match tokio::time::timeout(Duration::from_secs(30), client.next_event()).await {
                Ok(Some(Event::Reconnected(r))) => break (r, killed_at.elapsed()),
                Ok(Some(Event::Failed(e))) => bail!("downtime client: {e}"),
                Ok(Some(_)) => {}
                _ => bail!("the client did not reconnect in 30 s"),
            }
        };
        let ms = downtime.1.as_secs_f64() * 1000.0;
        eprintln!(
            "bench: client failover {round}/{rounds}: node {leader} killed, resumed on node {} after {ms:.0} ms",
            downtime.0.to_node
        );
        times.push(ms);
        drop(client);
        cluster.start_node(leader)?;
    }
    Ok(times)
}

/// SIGTERMs the leader `rounds` times while `clients` clients on the other nodes keep 4
/// messages in flight each; per round, the longest pause between acknowledgements.
pub async fn handoffs(
    cluster: &mut LocalCluster,
    rounds: usize,
    clients: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for round in 1..=rounds {
        let leader = settled_leader(cluster).await?;
        let others = chat_addrs(cluster, Some(leader));
        let writers = Canaries::start(&others, clients, 4, &format!("handoff{round}x")).await?;
        writers.wait_for_acks(200, Duration::from_secs(10)).await?;
        let stopped_at = Instant::now();
        cluster.terminate(leader, Duration::from_secs(10)).await;
        let exited_at = Instant::now();
        // The pause counts until writes flow again, not only until the process is gone.
        writers.wait_for_acks(200, Duration::from_secs(10)).await?;
        let until = Instant::now().max(exited_at + Duration::from_millis(500));
        tokio::time::sleep_until(until.into()).await;
        let pause = writers.longest_pause(stopped_at, until);
        let ms = pause.as_secs_f64() * 1000.0;
        eprintln!(
            "bench: handoff {round}/{rounds}: leader {leader} stopped in {:.0} ms, longest pause \
             between acks {ms:.0} ms",
            (exited_at - stopped_at).as_secs_f64() * 1000.0
        );
        times.push(ms);
        drop(writers);
        cluster.start_node(leader)?;
    }
    Ok(times)
}
