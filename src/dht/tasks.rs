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

use super::own_node::OwnNode;
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
    pub(super) own: OwnNode,
}

/// End-of-task reports to the actor.
pub(super) enum TaskEvent {
    LookupFinished {
        topic: String,
        generation: u64,
        report: LookupReport,
    },
    AnnounceFinished {
        topic: String,
        generation: u64,
        report: AnnounceReport,
    },
    /// What mainline says of its routing table, read every few seconds.
    Contacts {
        routing_table_size: usize,
    },
}

/// What one lookup found.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LookupReport {
    /// Addresses handed to the dialer (not ours, each once).
    pub(super) delivered_peers: usize,
    /// DHT nodes whose answer held our own announce (our own node included): where we are findable.
    pub(super) nodes_with_our_announce: usize,
}

/// How one announce went.
#[derive(Debug, Clone, Default)]
pub(super) struct AnnounceReport {
    /// mainline stored it on at least one other DHT node.
    pub(super) stored_remotely: bool,
    /// Our own node stores it (only while it serves the DHT).
    pub(super) stored_here: bool,
    /// Why mainline's announce failed, if it did.
    pub(super) error: Option<String>,
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

/// Walks the DHT towards the topic's infohash and hands each new batch of peers to the dialer as it arrives;
/// while our node serves the DHT, also hands over what others announced at our own node, read before the walk
/// (known at once) and again after it (a peer that joined just before us may have announced here meanwhile).
pub(super) async fn run_lookup(context: TaskContext, job: LookupJob, discoveries: mpsc::Sender<Discovery>) {
    let span = tracing::info_span!("dht.get_peers", topic = %job.topic, infohash = %job.infohash);
    let report = async {
        context.shared.counters.lookups_started.fetch_add(1, Ordering::Relaxed);
        // Sent before anything else, so the walk runs while we read our own node.
        let mut batches = context.dht.get_peers(job.infohash);
        let info = context.dht.info().await;
        let mut collector = Collector {
            own_addresses: own_announce_addresses(&context, info.public_address(), job.announce_port),
            delivery: Delivery { shared: &context.shared, discoveries: &discoveries, topic: &job.topic },
            delivered: HashSet::new(),
            report: LookupReport::default(),
            own_node_holds_ours: false,
        };
        let serving = info.server_mode() && context.own.serves();
        let mut go_on = !serving || collector.read_own_node(&context.own, &job.infohash).await;
        let walk = async {
            while go_on && let Some(batch) = batches.next().await {
                go_on = collector.take(batch).await;
            }
        };
        if tokio::time::timeout(LOOKUP_DEADLINE, walk).await.is_err() {
            tracing::warn!(deadline = ?LOOKUP_DEADLINE, "DHT lookup did not end in time; abandoned");
        }
        if go_on && serving {
            collector.read_own_node(&context.own, &job.infohash).await;
        }
        context.shared.counters.lookups_finished.fetch_add(1, Ordering::Relaxed);
        let mut report = collector.report;
        report.delivered_peers = collector.delivered.len();
        report.nodes_with_our_announce += usize::from(collector.own_node_holds_ours);
        tracing::debug!(
            peers = report.delivered_peers,
            nodes_with_our_announce = report.nodes_with_our_announce,
            "DHT lookup finished"
        );
        report
    }
    .instrument(span)
    .await;
    let _ = context.events.send(TaskEvent::LookupFinished {
        topic: job.topic,
        generation: job.generation,
        report,
    });
}

/// What one lookup gathers from its batches.
struct Collector<'a> {
    own_addresses: HashSet<SocketAddrV4>,
    delivery: Delivery<'a>,
    delivered: HashSet<SocketAddrV4>,
    /// Counts remote nodes holding our announce; our own node is [`Collector::own_node_holds_ours`].
    report: LookupReport,
    own_node_holds_ours: bool,
}

impl Collector<'_> {
    /// One DHT node's answer: counts whether it holds our announce, hands the new addresses to the dialer.
    /// False once the dialer is gone (the lookup can stop).
    async fn take(&mut self, batch: Vec<SocketAddrV4>) -> bool {
        if batch.iter().any(|peer| self.own_addresses.contains(peer)) {
            self.report.nodes_with_our_announce += 1;
        }
        self.deliver(batch).await
    }

    async fn read_own_node(&mut self, own: &OwnNode, infohash: &mainline::Id) -> bool {
        match own.stored_peers(infohash).await {
            Ok(stored) => {
                tracing::debug!(peers = stored.len(), "read the announces stored at our own DHT node");
                self.own_node_holds_ours |= stored.iter().any(|peer| self.own_addresses.contains(peer));
                self.deliver(stored).await
            }
            Err(error) => {
                tracing::debug!(%error, "could not read our own DHT node's announces");
                true
            }
        }
    }

    async fn deliver(&mut self, batch: Vec<SocketAddrV4>) -> bool {
        let fresh: Vec<SocketAddrV4> = batch
            .into_iter()
            .filter(|peer| !self.own_addresses.contains(peer) && !self.delivered.contains(peer))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if fresh.is_empty() {
            return true;
        }
        match self.delivery.send(&fresh).await {
            Delivered::Yes => {
                self.delivered.extend(fresh);
                true
            }
            // Not marked delivered: the next batch that carries them gets another chance.
            Delivered::Dropped => true,
            Delivered::DialerGone => false,
        }
    }
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

/// Addresses under which DHT nodes would list our own announce: our public IP (as other nodes report it), our
/// bound IP and the IPs our own node stores our announce under, each with the announced port. Unknown port
/// means nothing to skip.
fn own_announce_addresses(
    context: &TaskContext,
    public_address: Option<SocketAddrV4>,
    announce_port: Option<u16>,
) -> HashSet<SocketAddrV4> {
    let Some(port) = announce_port else { return HashSet::new() };
    let mut own: HashSet<SocketAddrV4> =
        context.own.announce_ips().into_iter().map(|ip| SocketAddrV4::new(ip, port)).collect();
    if let Some(public) = public_address {
        own.insert(SocketAddrV4::new(*public.ip(), port));
    }
    if let SocketAddr::V4(local) = context.shared.local_addr
        && !local.ip().is_unspecified()
    {
        own.insert(SocketAddrV4::new(*local.ip(), port));
    }
    own
}

/// Announces our port under the topic's infohash to the nodes closest to it, and, while our node serves the
/// DHT, at our own node too.
pub(super) async fn run_announce(context: TaskContext, job: AnnounceJob) {
    let span =
        tracing::info_span!("dht.announce", topic = %job.topic, infohash = %job.infohash, port = job.port);
    let report = async {
        context.shared.counters.count_announce(&job.topic);
        // announce_peer needs a token from each target node, so mainline first walks towards the infohash.
        // Left alone it walks with `get_value`, and a `get_peers` lookup of the same infohash started meanwhile
        // would join that walk and never see a peer (mainline merges queries per target). Opening a
        // `get_peers` walk first makes the announce reuse it instead; its answers are the lookup's business.
        let walk = context.dht.get_peers(job.infohash);
        let announce = tokio::time::timeout(ANNOUNCE_DEADLINE, context.dht.announce_peer(job.infohash, Some(job.port)));
        let (result, stored_here) = tokio::join!(announce, announce_here(&context, &job));
        drop(walk);
        let mut report = AnnounceReport { stored_here, ..AnnounceReport::default() };
        match result {
            Ok(Ok(_)) => {
                tracing::debug!(stored_here, "DHT announce stored");
                report.stored_remotely = true;
            }
            Ok(Err(error)) => report.error = Some(error.to_string()),
            Err(_) => report.error = Some(format!("no answer within {ANNOUNCE_DEADLINE:?}")),
        }
        if let Some(error) = &report.error {
            context.shared.counters.announces_failed.fetch_add(1, Ordering::Relaxed);
            if stored_here {
                // A lone seed, or a node whose DHT contacts are all read-only: findable by whoever bootstraps
                // from it, which is what such a network has.
                tracing::info!(%error, "DHT announce stored only at our own DHT node: no other node stores it");
            } else {
                tracing::warn!(%error, "DHT announce failed");
            }
        }
        report
    }
    .instrument(span)
    .await;
    let _ = context.events.send(TaskEvent::AnnounceFinished {
        topic: job.topic,
        generation: job.generation,
        report,
    });
}

/// Stores our announce at our own node under each IP others reach us on; whether any of them took it.
async fn announce_here(context: &TaskContext, job: &AnnounceJob) -> bool {
    if !context.own.serves() || !context.dht.info().await.server_mode() {
        return false;
    }
    let mut stored = false;
    for ip in context.own.announce_ips() {
        match context.own.announce(ip, &job.infohash, job.port).await {
            Ok(()) => stored = true,
            Err(error) => tracing::debug!(%ip, %error, "could not store our announce at our own DHT node"),
        }
    }
    stored
}

/// Reads the size of mainline's routing table for the actor's contact watch.
pub(super) async fn report_contacts(dht: AsyncDht, events: mpsc::UnboundedSender<TaskEvent>) {
    let routing_table_size = dht.to_bootstrap().await.len();
    let _ = events.send(TaskEvent::Contacts { routing_table_size });
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
