//! The network work of the DHT actor, one task per operation: a `get_peers` lookup of a topic, an
//! `announce_peer` of a topic, the status query and the bootstrap log.
//!
//! mainline runs each query on its own thread and streams answers to us; these tasks turn them into
//! discoveries, counters and logs, and report to the actor when they end.

use std::collections::HashSet;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mainline::async_dht::AsyncDht;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tracing::Instrument;

use super::{DhtStatus, Discovery, Shared};

/// How long a lookup may wait for room in the dialer's queue before the batch is dropped: long enough to ride
/// out a burst, short enough that a stuck dialer cannot hold a lookup (and its mainline query) forever.
const DISCOVERY_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A lookup normally ends within seconds (when its last request times out); this bounds a lookup whose
/// stream never ends, so the topic is looked up again rather than never.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(120);

/// An announce normally ends once the nodes it stored at have answered or timed out; mainline can leave
/// one waiting forever (a PUT that found nobody to send to never reports), which would stop the topic from
/// ever being announced again.
const ANNOUNCE_DEADLINE: Duration = Duration::from_secs(120);

/// What every task needs: the mainline node, the shared counters, and the way back to the actor.
pub(super) struct TaskContext {
    pub(super) dht: AsyncDht,
    pub(super) shared: Arc<Shared>,
    pub(super) events: mpsc::UnboundedSender<TaskEvent>,
}

/// End-of-task reports to the actor.
pub(super) enum TaskEvent {
    LookupFinished { topic: String, generation: u64, delivered_peers: usize },
    AnnounceFinished { topic: String, generation: u64, succeeded: bool },
}

pub(super) struct LookupJob {
    pub(super) topic: String,
    pub(super) infohash: mainline::Id,
    pub(super) generation: u64,
    /// The port we announce, to recognise (and skip) our own announce among the peers found.
    pub(super) announce_port: Option<u16>,
}

pub(super) struct AnnounceJob {
    pub(super) topic: String,
    pub(super) infohash: mainline::Id,
    pub(super) generation: u64,
    pub(super) port: u16,
}

/// Walks the DHT towards the topic's infohash and hands each new batch of peers to the dialer as it arrives.
pub(super) async fn run_lookup(context: TaskContext, job: LookupJob, discoveries: mpsc::Sender<Discovery>) {
    let span = tracing::info_span!("dht.get_peers", topic = %job.topic, infohash = %job.infohash);
    let delivered_peers = async {
        context.shared.counters.lookups_started.fetch_add(1, Ordering::Relaxed);
        let own_addresses = own_announce_addresses(&context, job.announce_port).await;
        let delivery = Delivery { shared: &context.shared, discoveries: &discoveries, topic: &job.topic };
        let mut delivered = HashSet::new();
        let mut batches = context.dht.get_peers(job.infohash);
        let walk = async {
            while let Some(batch) = batches.next().await {
                let fresh: Vec<SocketAddrV4> = batch
                    .into_iter()
                    .filter(|peer| !own_addresses.contains(peer) && !delivered.contains(peer))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                if fresh.is_empty() {
                    continue;
                }
                match delivery.send(&fresh).await {
                    Delivered::Yes => delivered.extend(fresh),
                    // Not marked delivered: the next batch that carries them gets another chance.
                    Delivered::Dropped => {}
                    Delivered::DialerGone => break,
                }
            }
        };
        if tokio::time::timeout(LOOKUP_DEADLINE, walk).await.is_err() {
            tracing::warn!(deadline = ?LOOKUP_DEADLINE, "DHT lookup did not end in time; abandoned");
        }
        context.shared.counters.lookups_finished.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peers = delivered.len(), "DHT lookup finished");
        delivered.len()
    }
    .instrument(span)
    .await;
    let _ = context.events.send(TaskEvent::LookupFinished {
        topic: job.topic,
        generation: job.generation,
        delivered_peers,
    });
}

struct Delivery<'a> {
    shared: &'a Shared,
    discoveries: &'a mpsc::Sender<Discovery>,
    topic: &'a str,
}

enum Delivered {
    Yes,
    Dropped,
    DialerGone,
}

impl Delivery<'_> {
    async fn send(&self, peers: &[SocketAddrV4]) -> Delivered {
        let discovery = Discovery {
            topic: self.topic.to_owned(),
            peers: peers.iter().copied().map(SocketAddr::V4).collect(),
        };
        // Counted before sending, so that whoever receives the batch already sees it counted.
        let counters = &self.shared.counters;
        counters.peer_batches.fetch_add(1, Ordering::Relaxed);
        counters.peers_found.fetch_add(peers.len() as u64, Ordering::Relaxed);
        let result = self.discoveries.send_timeout(discovery, DISCOVERY_SEND_TIMEOUT).await;
        if result.is_err() {
            counters.peer_batches.fetch_sub(1, Ordering::Relaxed);
            counters.peers_found.fetch_sub(peers.len() as u64, Ordering::Relaxed);
        }
        match result {
            Ok(()) => {
                tracing::debug!(peers = ?peers, "DHT peers found");
                Delivered::Yes
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                counters.discoveries_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peers = peers.len(), "dialer queue full; DHT peer batch dropped");
                Delivered::Dropped
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                tracing::debug!("discoveries receiver closed; ending DHT lookup");
                Delivered::DialerGone
            }
        }
    }
}

/// Addresses under which DHT nodes would list our own announce: our public IP (as other nodes report it)
/// and our bound IP, each with the announced port. Unknown port or IP means nothing to skip.
async fn own_announce_addresses(context: &TaskContext, announce_port: Option<u16>) -> HashSet<SocketAddrV4> {
    let Some(port) = announce_port else { return HashSet::new() };
    let info = context.dht.info().await;
    let mut own = HashSet::new();
    if let Some(public) = info.public_address() {
        own.insert(SocketAddrV4::new(*public.ip(), port));
    }
    if let SocketAddr::V4(local) = context.shared.local_addr
        && !local.ip().is_unspecified()
    {
        own.insert(SocketAddrV4::new(*local.ip(), port));
    }
    own
}

/// Announces our port under the topic's infohash to the nodes closest to it.
pub(super) async fn run_announce(context: TaskContext, job: AnnounceJob) {
    let span =
        tracing::info_span!("dht.announce", topic = %job.topic, infohash = %job.infohash, port = job.port);
    let succeeded = async {
        context.shared.counters.count_announce(&job.topic);
        // announce_peer needs a token from each target node, so mainline first walks towards the infohash.
        // Left alone it walks with `get_value`, and a `get_peers` lookup of the same infohash started meanwhile
        // would join that walk and never see a peer (mainline merges queries per target). Opening a
        // `get_peers` walk first makes the announce reuse it instead; its answers are the lookup's business.
        let walk = context.dht.get_peers(job.infohash);
        let announce = context.dht.announce_peer(job.infohash, Some(job.port));
        let result = tokio::time::timeout(ANNOUNCE_DEADLINE, announce).await;
        drop(walk);
        match result {
            Ok(Ok(_)) => {
                tracing::debug!("DHT announce stored");
                true
            }
            Ok(Err(error)) => {
                context.shared.counters.announces_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "DHT announce failed");
                false
            }
            Err(_) => {
                context.shared.counters.announces_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(deadline = ?ANNOUNCE_DEADLINE, "DHT announce did not end in time; abandoned");
                false
            }
        }
    }
    .instrument(span)
    .await;
    let _ = context.events.send(TaskEvent::AnnounceFinished {
        topic: job.topic,
        generation: job.generation,
        succeeded,
    });
}

/// Answers a status request from mainline's own view of itself.
pub(super) async fn report_status(dht: AsyncDht, local_addr: SocketAddr, reply: oneshot::Sender<DhtStatus>) {
    let info = dht.info().await;
    let routing_table_size = dht.to_bootstrap().await.len();
    let _ = reply.send(DhtStatus {
        bootstrapped: routing_table_size > 0,
        routing_table_size,
        public_address: info.public_address().map(SocketAddr::V4),
        firewalled: info.firewalled(),
        server_mode: info.server_mode(),
        local_addr,
    });
}

/// Logs whether the first walk towards our own id (mainline's bootstrap) found anyone. mainline starts that
/// walk itself; asking for it here joins it rather than adding traffic.
pub(super) async fn log_bootstrap(dht: AsyncDht, has_bootstrap: bool) {
    let span = tracing::info_span!("dht.bootstrap");
    async {
        if dht.bootstrapped().await {
            let routing_table_size = dht.to_bootstrap().await.len();
            tracing::info!(routing_table_size, "DHT bootstrapped");
        } else if has_bootstrap {
            tracing::warn!(
                "DHT bootstrap found no nodes; lookups and announces fail until some are reachable"
            );
        } else {
            tracing::info!(
                "DHT started without bootstrap nodes: it is empty until other nodes bootstrap from it"
            );
        }
    }
    .instrument(span)
    .await;
}
