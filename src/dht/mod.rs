//! Peer discovery on the BitTorrent Mainline DHT (BEP 5), one infohash per topic.
//!
//! Every joined topic maps to the infohash SHA1(topic name bytes) ([`topic_infohash`]). The node announces its
//! QUIC port under that infohash (`announce_peer`) and looks the infohash up (`get_peers`), handing each batch
//! of addresses to the dialer the moment a DHT node answers: a whole lookup only ends once its slowest request
//! times out, and nobody should wait for that to start dialing.
//!
//! [`Dht`] is a cheap handle to an actor task ([`actor`]) that owns the joined topics and their timers; the
//! network work itself runs in short-lived tasks ([`tasks`]) on top of the `mainline` crate, which runs its own
//! OS thread and UDP socket (IPv4 only).

mod actor;
mod mainline_node;
mod own_node;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use actor::Command;

use crate::config::declared;

/// Whether this node answers other nodes' DHT queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhtMode {
    /// mainline's adaptive mode: a client until it has run for ~15 minutes and found itself reachable.
    Auto,
    /// Serve the DHT from the start: for reachable nodes, and the only way a network made only of our nodes
    /// works on its own.
    Server,
    /// Never answer queries: for nodes behind NATs or firewalls that would only make others time out.
    Client,
}

impl fmt::Display for DhtMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DhtMode::Auto => "auto",
            DhtMode::Server => "server",
            DhtMode::Client => "client",
        })
    }
}

/// A DHT mode name that is not one of `auto`, `server` or `client`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown DHT mode {0:?}: expected auto, server or client")]
pub struct ParseDhtModeError(String);

impl FromStr for DhtMode {
    type Err = ParseDhtModeError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DhtMode::Auto),
            "server" => Ok(DhtMode::Server),
            "client" => Ok(DhtMode::Client),
            _ => Err(ParseDhtModeError(name.to_owned())),
        }
    }
}

/// Everything [`Dht::start`] needs.
#[derive(Debug, Clone)]
pub struct DhtOptions {
    /// UDP address of the DHT socket. IPv4 only (mainline has no IPv6); port 0 picks a free port.
    pub listen: SocketAddr,
    /// `host:port` entries. The default is the public routers; tests pass loopback nodes only. An empty list
    /// starts a new network (this node is then its first member).
    pub bootstrap: Vec<String>,
    pub mode: DhtMode,
    /// Time between announces of a topic (±20% jitter).
    pub announce_interval: Duration,
    /// Time between lookups of a topic that has shown peers (±20% jitter); topics without peers yet are looked
    /// up sooner, from 1 s doubling up to this interval.
    pub lookup_interval: Duration,
    /// The QUIC port to announce; `None` until known, and nothing is announced until then.
    pub announce_port: Option<u16>,
}

impl Default for DhtOptions {
    fn default() -> Self {
        DhtOptions {
            listen: declared::address("dht.listen"),
            bootstrap: declared::list("dht.bootstrap"),
            mode: DhtMode::Auto,
            announce_interval: declared::duration("dht.announce_interval"),
            lookup_interval: declared::duration("dht.lookup_interval"),
            announce_port: None,
        }
    }
}

/// One batch of peers from one DHT node's `get_peers` answer, without addresses this lookup already delivered
/// and without our own announce address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub topic: String,
    pub peers: Vec<SocketAddr>,
}

/// What the DHT node knows about itself, for the control API and logs.
#[derive(Debug, Clone)]
pub struct DhtStatus {
    /// The routing table holds at least one node, so lookups can go beyond the bootstrap list.
    pub bootstrapped: bool,
    pub routing_table_size: usize,
    /// Our address as other DHT nodes report seeing it (`None` until they have voted).
    pub public_address: Option<SocketAddr>,
    /// mainline has not yet confirmed that `public_address` reaches us.
    pub firewalled: bool,
    /// Whether we currently answer other nodes' queries.
    pub server_mode: bool,
    pub local_addr: SocketAddr,
}

/// Where the discovery of one joined topic stands, for operators (`ListTopics`, `rnctl topics list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtTopicStatus {
    pub topic: String,
    /// Nodes in mainline's routing table (for the whole DHT node, not only this topic); `None` before the first
    /// check, a second or two after start.
    pub contacts: Option<usize>,
    pub has_bootstrap: bool,
    pub lookup_running: bool,
    /// When the last lookup ended (ms since the Unix epoch) and what it found.
    pub last_lookup_ms: Option<i64>,
    /// Peer addresses the last lookup handed to the dialer.
    pub last_lookup_peers: Option<usize>,
    /// DHT nodes whose answers in the last lookup held our own announce (our own node included).
    pub nodes_with_our_announce: Option<usize>,
    pub next_lookup_in: Option<Duration>,
    /// The QUIC port announced; `None` until known (nothing is announced before).
    pub announce_port: Option<u16>,
    pub announce_running: bool,
    pub last_announce_ms: Option<i64>,
    /// The last announce was stored by at least one other DHT node.
    pub announce_stored_remotely: bool,
    /// The last announce was stored at our own node (only while it serves the DHT).
    pub announce_stored_here: bool,
    /// Why the last announce failed at other nodes, in mainline's words.
    pub announce_error: Option<String>,
}

impl DhtTopicStatus {
    /// One sentence on why the topic finds peers or not, for people.
    pub fn explanation(&self) -> String {
        let contacts = self.contacts.unwrap_or(0);
        if self.announce_port.is_none() {
            return "not announced yet: our QUIC port is not known".to_owned();
        }
        if self.last_lookup_ms.is_none() && self.last_announce_ms.is_none() && self.contacts != Some(0) {
            return "first lookup and announce running".to_owned();
        }
        let found = self.last_lookup_peers.unwrap_or(0);
        let findable = match (self.announce_stored_remotely, self.announce_stored_here) {
            (true, _) => match self.nodes_with_our_announce {
                Some(nodes) if nodes > 0 => format!("our announce is stored on {nodes} DHT node(s)"),
                _ => "our announce is stored".to_owned(),
            },
            (false, true) => "our announce is stored only at our own DHT node".to_owned(),
            (false, false) if self.last_announce_ms.is_none() => "our first announce is running".to_owned(),
            (false, false) => format!(
                "our announce is stored nowhere ({})",
                self.announce_error.as_deref().unwrap_or("no node answered")
            ),
        };
        if contacts == 0 {
            let why = if self.has_bootstrap {
                "no DHT node knows us yet: 0 contacts (the bootstrap nodes do not answer)"
            } else {
                "no DHT node knows us yet: 0 contacts (started without bootstrap nodes: waiting for others to bootstrap from us)"
            };
            return format!("{why}; {findable}");
        }
        if found == 0 {
            return format!(
                "the last lookup found nobody: no peer has announced this topic to the {contacts} DHT node(s) we know; {findable}"
            );
        }
        format!(
            "the last lookup found {found} peer address(es) through {contacts} DHT contact(s); {findable}"
        )
    }
}

/// A snapshot of the DHT adapter's counters since start.
#[derive(Debug, Clone, Default)]
pub struct DhtCounters {
    pub announces_sent: u64,
    pub announces_failed: u64,
    pub lookups_started: u64,
    /// Lookups that ran to their end (ones replaced, or dropped by `leave`, are not counted).
    pub lookups_finished: u64,
    /// Batches handed to the dialer.
    pub peer_batches: u64,
    /// Addresses handed to the dialer (deduplicated within each lookup).
    pub peers_found: u64,
    /// Batches not handed over because the dialer's queue stayed full.
    pub discoveries_dropped: u64,
    /// Announces started per topic, including topics left since.
    pub announces_by_topic: HashMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    #[error("the DHT listen address {0} is IPv6, but the Mainline DHT implementation only supports IPv4")]
    Ipv6Listen(SocketAddr),
    #[error("the DHT listen address {0} is already in use (another node or program has this UDP port)")]
    PortInUse(SocketAddr),
    #[error("cannot bind the DHT socket to {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("DHT bootstrap node {entry:?} is not of the form host:port")]
    MalformedBootstrap { entry: String },
    #[error("DHT bootstrap host {entry:?} does not resolve to an IPv4 address{}", reason(.source))]
    UnresolvableBootstrap { entry: String, source: Option<std::io::Error> },
    #[error("the mainline DHT node on {0} failed to start (its thread stopped; see the panic message above)")]
    NodeStart(SocketAddr),
    #[error("the DHT must be started inside a Tokio runtime")]
    NoRuntime,
}

fn bind_error(addr: SocketAddr, source: std::io::Error) -> DhtError {
    match source.kind() {
        std::io::ErrorKind::AddrInUse => DhtError::PortInUse(addr),
        _ => DhtError::Bind { addr, source },
    }
}

fn reason(source: &Option<std::io::Error>) -> String {
    source.as_ref().map(|error| format!(": {error}")).unwrap_or_default()
}

/// The BEP 5 infohash of a topic: SHA1 of the topic name's UTF-8 bytes, so any implementation (libtorrent
/// included) finds the same peers from the name alone.
pub fn topic_infohash(topic: &str) -> mainline::Id {
    mainline::Id::from(sha1_smol::Sha1::from(topic.as_bytes()).digest().bytes())
}

/// Counters shared by the actor, its tasks and every handle.
#[derive(Debug, Default)]
struct Counters {
    announces_sent: AtomicU64,
    announces_failed: AtomicU64,
    lookups_started: AtomicU64,
    lookups_finished: AtomicU64,
    peer_batches: AtomicU64,
    peers_found: AtomicU64,
    discoveries_dropped: AtomicU64,
    announces_by_topic: Mutex<HashMap<String, u64>>,
}

impl Counters {
    fn count_announce(&self, topic: &str) {
        self.announces_sent.fetch_add(1, Ordering::Relaxed);
        // A poisoned map only means another thread panicked mid-increment; the counts are still usable.
        let mut by_topic = self.announces_by_topic.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *by_topic.entry(topic.to_owned()).or_default() += 1;
    }

    fn announces_for(&self, topic: &str) -> u64 {
        let by_topic = self.announces_by_topic.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        by_topic.get(topic).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> DhtCounters {
        DhtCounters {
            announces_sent: self.announces_sent.load(Ordering::Relaxed),
            announces_failed: self.announces_failed.load(Ordering::Relaxed),
            lookups_started: self.lookups_started.load(Ordering::Relaxed),
            lookups_finished: self.lookups_finished.load(Ordering::Relaxed),
            peer_batches: self.peer_batches.load(Ordering::Relaxed),
            peers_found: self.peers_found.load(Ordering::Relaxed),
            discoveries_dropped: self.discoveries_dropped.load(Ordering::Relaxed),
            announces_by_topic: self
                .announces_by_topic
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }
}

/// State every handle can read without asking the actor.
#[derive(Debug)]
struct Shared {
    counters: Counters,
    local_addr: SocketAddr,
    /// Cancelled once the actor has stopped and let go of the mainline node.
    stopped: CancellationToken,
}

/// Handle to the DHT actor. Cloning is cheap; commands are queued and never block.
#[derive(Clone)]
pub struct Dht {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Dht {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dht").field("local_addr", &self.shared.local_addr).finish_non_exhaustive()
    }
}

impl Dht {
    /// Binds the DHT socket, starts the mainline node and the actor. Each batch of found peers goes to
    /// `discoveries`; cancelling `shutdown` stops everything.
    ///
    /// Blocks briefly (name resolution of the bootstrap hosts, and one round trip to the mainline thread to
    /// learn the bound port): call it at startup, not on a hot path.
    pub fn start(
        options: DhtOptions,
        discoveries: mpsc::Sender<Discovery>,
        shutdown: CancellationToken,
    ) -> Result<Dht, DhtError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| DhtError::NoRuntime)?;
        let listen = match options.listen {
            SocketAddr::V4(listen) => listen,
            SocketAddr::V6(_) => return Err(DhtError::Ipv6Listen(options.listen)),
        };
        let bootstrap = resolve_bootstrap(&options.bootstrap)?;
        let mut builder = mainline_node::NodeBuilder {
            listen,
            mode: options.mode,
            bootstrap,
            requesters: mainline_node::Requesters::default(),
        };
        let node = builder.build(&[])?;
        // The only synchronous call on the node: port 0 means only the mainline thread knows the real port.
        #[allow(deprecated)]
        let local_addr = SocketAddr::V4(node.info().local_addr());
        // A rebuild must come back on the same port: peers know us there.
        if let SocketAddr::V4(bound) = local_addr {
            builder.listen = bound;
        }
        let bootstrap = &builder.bootstrap;
        tracing::info!(%local_addr, mode = %options.mode, bootstrap_nodes = bootstrap.len(), "DHT node started");

        let shared =
            Arc::new(Shared { counters: Counters::default(), local_addr, stopped: CancellationToken::new() });
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let actor = actor::Actor::new(node.as_async(), builder, &options, discoveries, Arc::clone(&shared));
        runtime.spawn(actor.run(command_receiver, shutdown));
        Ok(Dht { commands, shared })
    }

    /// Starts announcing the topic (once the announce port is known) and looking it up, both at once.
    /// Joining a joined topic does nothing.
    pub fn join(&self, topic: &str) {
        self.send(Command::Join(topic.to_owned()));
    }

    /// Stops announcing and looking up the topic; its in-flight lookup is dropped, so no more discoveries for
    /// it are sent (batches already queued to the dialer stay queued).
    pub fn leave(&self, topic: &str) {
        self.send(Command::Leave(topic.to_owned()));
    }

    /// Sets the QUIC port announced from now on and re-announces every joined topic if it changed.
    pub fn set_announce_port(&self, port: u16) {
        self.send(Command::SetAnnouncePort(port));
    }

    /// Replaces the configured bootstrap nodes (a configuration reload) and builds the DHT node again with
    /// them, on the same socket. The host names are resolved first, off the runtime's threads.
    pub async fn set_bootstrap(&self, entries: Vec<String>) -> Result<(), DhtError> {
        let resolving = entries.clone();
        let resolved = tokio::task::spawn_blocking(move || resolve_bootstrap(&resolving))
            .await
            .map_err(|_| DhtError::NoRuntime)??;
        self.send(Command::SetBootstrap { configured: entries, resolved });
        Ok(())
    }

    /// Looks a joined topic up at once, replacing a lookup in flight for it.
    pub fn lookup_now(&self, topic: &str) {
        self.send(Command::LookupNow(topic.to_owned()));
    }

    /// The node's view of itself. Queued behind earlier commands, so it also tells that they were handled.
    pub async fn status(&self) -> DhtStatus {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status(reply));
        answer.await.unwrap_or(DhtStatus {
            bootstrapped: false,
            routing_table_size: 0,
            public_address: None,
            firewalled: true,
            server_mode: false,
            local_addr: self.shared.local_addr,
        })
    }

    pub fn counters(&self) -> DhtCounters {
        self.shared.counters.snapshot()
    }

    /// Where the discovery of each joined topic stands, sorted by topic. Answered from the actor's state: no
    /// DHT round trip.
    pub async fn topics(&self) -> Vec<DhtTopicStatus> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Topics(reply));
        answer.await.unwrap_or_default()
    }

    /// Announces started for `topic` since start, including after it was left.
    pub fn announces_for(&self, topic: &str) -> u64 {
        self.shared.counters.announces_for(topic)
    }

    /// The bound UDP address of the DHT socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Resolves once the actor has stopped (after `shutdown`, or when every handle is dropped) and released
    /// the mainline node, whose thread then closes the socket within its 50 ms poll.
    pub async fn stopped(&self) {
        self.shared.stopped.cancelled().await;
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            tracing::debug!("DHT command ignored: the DHT has shut down");
        }
    }
}

/// Resolves `host:port` entries to IPv4 addresses. A malformed entry is an error. A host that resolves to no
/// IPv4 address is an error only when nothing usable remains (such a list can never work). A host that does not
/// resolve at all is only a warning, even when it is the last one: DNS may not be up yet at boot, or the
/// machine may have no internet; the node then starts with an empty DHT (others can still bootstrap from it)
/// rather than not at all.
fn resolve_bootstrap(entries: &[String]) -> Result<Vec<SocketAddrV4>, DhtError> {
    let mut resolved = Vec::new();
    let mut first_failure = None;
    for entry in entries {
        let (host, port) =
            entry.rsplit_once(':').ok_or_else(|| DhtError::MalformedBootstrap { entry: entry.clone() })?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(DhtError::MalformedBootstrap { entry: entry.clone() });
        }
        let addresses = match entry.to_socket_addrs() {
            Ok(addresses) => addresses
                .filter_map(|address| match address {
                    SocketAddr::V4(address) => Some(address),
                    SocketAddr::V6(_) => None,
                })
                .collect::<Vec<_>>(),
            Err(error) => {
                tracing::warn!(entry = %entry, %error, "DHT bootstrap host does not resolve");
                first_failure.get_or_insert(DhtError::UnresolvableBootstrap {
                    entry: entry.clone(),
                    source: Some(error),
                });
                continue;
            }
        };
        if addresses.is_empty() {
            tracing::warn!(entry = %entry, "DHT bootstrap host has no IPv4 address");
            first_failure
                .get_or_insert(DhtError::UnresolvableBootstrap { entry: entry.clone(), source: None });
        }
        resolved.extend(addresses);
    }
    match first_failure {
        Some(DhtError::UnresolvableBootstrap { source: Some(_), entry }) if resolved.is_empty() => {
            tracing::warn!(
                %entry,
                "no DHT bootstrap host resolves (no DNS or no network?): starting without bootstrap nodes; the \
                 DHT stays empty until a node bootstraps from this one or this node restarts with a working resolver"
            );
            Ok(resolved)
        }
        Some(error) if resolved.is_empty() => Err(error),
        _ => Ok(resolved),
    }
}
