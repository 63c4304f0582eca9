//! The metadata protocol over authenticated QUIC connections.
//!
//! [`Exchange`] accepts inbound connections and dials candidates (through [`dialer`]). Every connection, in
//! either direction and on every path (direct, punched, relayed), becomes a session in one place, the
//! connector (`connector.rs`): both sides send a `Hello` carrying their signed record and the address they
//! observe for the other side; each record is verified (signature, node id == the key TLS authenticated, clock
//! skew, size) and stored, a replay (lower seq than stored) is refused and its connection closed, and the
//! session goes into the [`table::SessionTable`] (one per peer). A session then serves correlated requests,
//! each kind a protocol of its own file behind the router (`router.rs`): records (`record_sync.rs`), ping,
//! peer exchange, dial-backs, punch coordination and relay circuits.
//!
//! Ways of reaching a peer are strategies the connector is given a route by: stored addresses, a hole punch
//! ([`punch`], [`traversal`]) and a relay circuit ([`relay`]). What sessions tell us about our NAT goes one
//! way, into `nat::evidence`; the NAT prober drives its probes through this module's `nat::probes::NatProbes`
//! implementation (`nat_probes.rs`).

mod connector;
pub mod dial_back;
pub mod dialer;
mod error;
mod nat_probes;
mod peer_exchange;
mod ping;
pub mod punch;
mod reach;
pub mod record;
mod record_sync;
pub mod relay;
mod router;
pub mod session;
pub mod table;
pub mod traversal;
pub mod warm_start;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::dialer::{DialOutcome, Dialer};
pub use self::error::{
    ExchangeError, IntroductionFailure, PeerRefusal, ProtocolViolation, PunchError, RelayError, StreamError,
};
use self::record::RecordPublisher;
use self::session::{CloseCode, RequestHandler, SessionHandle};
use self::table::{Direction, SessionTable};
use crate::api::names::NodeId;
use crate::nat::evidence::NatEvidence;
use crate::quic::paths::is_relayed;
use crate::quic::{QuicEndpoint, QuicError};
use crate::store::{AddressSource, Store};
use crate::wire::{self, VerifiedRecord, VerifyPolicy, pb};

/// Tunables of the exchange.
#[derive(Debug, Clone)]
pub struct ExchangeOptions {
    /// Longest a peer may take to complete the `Hello` exchange after the QUIC handshake started.
    pub hello_timeout: Duration,
    /// Longest a request on an established session may wait for its answer.
    pub request_timeout: Duration,
    /// Records from the future beyond this are refused.
    pub max_clock_skew: Duration,
    /// Distinct peers that must report the same observed address before we advertise it.
    pub min_observed_confirmations: usize,
    /// Records asked for per topic in a peer exchange.
    pub peer_exchange_records: u32,
    pub dialer: dialer::DialerOptions,
    pub relay: relay::RelayOptions,
}

impl Default for ExchangeOptions {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_clock_skew: Duration::from_secs(600),
            min_observed_confirmations: 2,
            peer_exchange_records: 16,
            dialer: dialer::DialerOptions::default(),
            relay: relay::RelayOptions::default(),
        }
    }
}

/// A peer verified on a new connection.
#[derive(Debug, Clone)]
pub struct Verified {
    pub node_id: NodeId,
    pub seq: u64,
    /// From dial start (outbound) or accept (inbound) until the peer's record was verified.
    pub elapsed: Duration,
    pub remote: SocketAddr,
}

/// Counters of the exchange since start.
#[derive(Debug, Default)]
pub struct ExchangeCounters {
    pub exchanges_ok: AtomicU64,
    pub exchanges_failed: AtomicU64,
    pub replays_rejected: AtomicU64,
    pub impersonations_rejected: AtomicU64,
    pub records_from_peer_exchange: AtomicU64,
}

/// How a connection reached its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionPath {
    /// One side dialed the other's address and got in.
    Direct,
    /// Both sides dialed each other at once after an introduction by a rendezvous (hole punching).
    Punched,
    /// Through a relay circuit: end-to-end QUIC between the two peers, carried by the node `via`.
    Relayed { via: NodeId },
}

impl ConnectionPath {
    pub fn is_relayed(&self) -> bool {
        matches!(self, Self::Relayed { .. })
    }

    /// The node carrying a relayed connection.
    pub fn relay(&self) -> Option<NodeId> {
        match self {
            Self::Relayed { via } => Some(*via),
            Self::Direct | Self::Punched => None,
        }
    }
}

/// What `GetPeer` shows about a live connection.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub direction: Direction,
    /// For a relayed connection, `remote` is the relay's address.
    pub path: ConnectionPath,
    pub remote: SocketAddr,
    pub since_ms: i64,
    pub rtt: Duration,
}

/// Cheap handle to the exchange.
#[derive(Clone)]
pub struct Exchange {
    inner: Arc<Inner>,
}

struct Inner {
    local: NodeId,
    endpoint: QuicEndpoint,
    store: Store,
    publisher: RecordPublisher,
    sessions: SessionTable<SessionHandle>,
    /// What sessions tell about our NAT; the prober reads it.
    evidence: Arc<NatEvidence>,
    dialer: Dialer,
    options: ExchangeOptions,
    shutdown: CancellationToken,
    next_session: AtomicU64,
    counters: ExchangeCounters,
    dial_backs_expected: dial_back::Expected,
    /// The protocols sessions answer.
    router: Arc<router::Router>,
    punch: punch::PunchState,
    relay: relay::RelayState,
    /// Every task the exchange starts; shutdown waits for them.
    tasks: TaskTracker,
}

/// How long shutdown waits for the exchange's tasks after closing every connection.
const TASKS_STOP_WAIT: Duration = Duration::from_secs(5);

impl Exchange {
    /// Starts accepting connections and the dialer. Returns once running.
    pub fn start(
        endpoint: QuicEndpoint,
        store: Store,
        publisher: RecordPublisher,
        options: ExchangeOptions,
        shutdown: CancellationToken,
    ) -> Self {
        let local = endpoint.node_id();
        let relay_state = relay::RelayState::new(options.relay.clone());
        let tasks = TaskTracker::new();
        let exchange = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let dialer = Dialer::start(options.dialer.clone(), weak.clone(), shutdown.clone(), &tasks);
            Inner {
                local,
                endpoint,
                store,
                publisher,
                sessions: SessionTable::new(local),
                evidence: Arc::new(NatEvidence::new(options.min_observed_confirmations)),
                dialer,
                options,
                shutdown,
                next_session: AtomicU64::new(1),
                counters: ExchangeCounters::default(),
                dial_backs_expected: dial_back::Expected::default(),
                router: Arc::new(router::Router::standard()),
                punch: punch::PunchState::default(),
                relay: relay_state,
                tasks,
            }
        });
        let tasks = &exchange.tasks;
        tasks.spawn(accept_loop(Arc::downgrade(&exchange), exchange.shutdown.clone()));
        tasks
            .spawn(peer_exchange::peer_exchange_rounds(Arc::downgrade(&exchange), exchange.shutdown.clone()));
        tasks.spawn(record_sync::push_record_updates(Arc::downgrade(&exchange), exchange.shutdown.clone()));
        tasks.spawn(relay::upgrade_relayed(Arc::downgrade(&exchange), exchange.shutdown.clone()));
        Self { inner: exchange }
    }

    /// What sessions told us about our NAT, for the prober.
    pub fn evidence(&self) -> Arc<NatEvidence> {
        self.inner.evidence.clone()
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.local
    }

    /// The QUIC endpoint's bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, crate::quic::QuicError> {
        self.inner.endpoint.local_addr()
    }

    pub fn publisher(&self) -> &RecordPublisher {
        &self.inner.publisher
    }

    /// Queues addresses found by discovery for dialing (deduplicated, rate-limited, backed off).
    pub fn dial_candidates(&self, addresses: Vec<SocketAddr>, source: AddressSource) {
        self.inner.dialer.candidates(addresses, source);
    }

    /// Dials `address` now (no backoff) and waits for the exchange.
    pub async fn connect(
        &self,
        address: SocketAddr,
        source: AddressSource,
    ) -> Result<Verified, ExchangeError> {
        match self.inner.dialer.dial_now(address, source).await {
            DialOutcome::Verified(verified) => Ok(verified),
            DialOutcome::Failed(e) => Err(e),
        }
    }

    /// Fetches a fresh record from `peer` over its session, dialing its stored addresses if needed.
    pub async fn query_record(&self, peer: NodeId) -> Result<(VerifiedRecord, Duration), ExchangeError> {
        let session = match self.inner.sessions.get(&peer) {
            Some(session) => session,
            None => self.inner.reach_known(peer).await?,
        };
        let request = pb::envelope::Kind::GetRecordRequest(pb::GetRecordRequest {});
        let (answer, rtt) = session.request(request, self.inner.options.request_timeout).await?;
        let pb::envelope::Kind::GetRecordResponse(response) = answer else {
            return Err(ProtocolViolation::UnexpectedAnswer { request: "GetRecord" }.into());
        };
        let signed = response
            .record
            .ok_or(ProtocolViolation::MissingField { message: "GetRecordResponse", field: "record" })?;
        let verified = wire::verify_record(&signed, Some(peer), &self.inner.policy())?;
        self.inner.store_verified(&verified, None, None).await?;
        Ok((verified, rtt))
    }

    /// Connects to a known peer: its stored addresses first, then hole punching.
    pub async fn connect_known(&self, peer: NodeId) -> Result<(), ExchangeError> {
        match self.inner.sessions.get(&peer) {
            Some(_) => Ok(()),
            None => self.inner.reach_known(peer).await.map(|_| ()),
        }
    }

    /// Relays we hold a reservation with.
    pub fn relays_reserved(&self) -> Vec<NodeId> {
        self.inner.relay.reserved_at()
    }

    /// Circuits carried for others, refused, and bytes relayed, since start.
    pub fn relay_totals(&self) -> (u64, u64, u64) {
        let relay = &self.inner.relay;
        (
            relay.circuits_carried.load(Ordering::Relaxed),
            relay.circuits_refused.load(Ordering::Relaxed),
            relay.bytes_relayed.load(Ordering::Relaxed),
        )
    }

    /// Punch attempts and outcomes by (our NAT type, their NAT type), kept in the store across restarts.
    pub async fn punch_stats(&self) -> Result<Vec<crate::store::PunchStats>, ExchangeError> {
        Ok(self.inner.store.punch_stats().await?)
    }

    /// Applies reloaded relay limits (see [`relay::RelayState::set_options`]).
    pub fn set_relay_options(&self, options: relay::RelayOptions) {
        self.inner.relay.set_options(options);
    }

    /// Applies reloaded QUIC connection and admission limits (see [`QuicEndpoint::set_limits`]).
    pub fn set_quic_limits(&self, limits: &crate::quic::QuicLimits) -> Result<(), QuicError> {
        self.inner.endpoint.set_limits(limits)
    }

    /// What the QUIC endpoint's inbound admission did so far (Retries, refusals, handshakes in progress).
    pub fn quic_admission(&self) -> crate::quic::AdmissionStats {
        self.inner.endpoint.admission_stats()
    }

    /// Punch attempts and successes since start (either role).
    pub fn punch_totals(&self) -> (u64, u64) {
        (
            self.inner.punch.attempts.load(Ordering::Relaxed),
            self.inner.punch.successes.load(Ordering::Relaxed),
        )
    }

    pub fn session_info(&self, peer: &NodeId) -> Option<SessionInfo> {
        self.inner.sessions.get(peer).map(|s| {
            let mut remote = s.connection().remote_address();
            // A circuit's synthetic address means nothing outside this process: show the relay's.
            if let Some(relay_session) = s.path().relay().and_then(|r| self.inner.sessions.get(&r)) {
                remote = relay_session.connection().remote_address();
            }
            SessionInfo {
                direction: s.direction(),
                path: s.path(),
                remote,
                since_ms: s.since_ms(),
                rtt: s.connection().rtt(),
            }
        })
    }

    /// Closes the session with `peer`, if any.
    pub fn disconnect(&self, peer: &NodeId, code: CloseCode, reason: &str) {
        if let Some(session) = self.inner.sessions.get(peer) {
            session.close(code, reason);
        }
    }

    pub fn connected_peers(&self) -> usize {
        self.inner.sessions.len()
    }

    pub fn connected(&self) -> Vec<NodeId> {
        self.inner.sessions.all().into_iter().map(|(id, _)| id).collect()
    }

    /// Peers with a live connection that does not go through a relay: only these tell us anything about
    /// our NAT, and only these can introduce or relay for us.
    pub fn directly_connected(&self) -> Vec<NodeId> {
        let sessions = self.inner.sessions.all();
        sessions.into_iter().filter(|(_, s)| !s.path().is_relayed()).map(|(id, _)| id).collect()
    }

    pub fn counters(&self) -> &ExchangeCounters {
        &self.inner.counters
    }

    /// Closes every connection and the endpoint, then waits for the exchange's tasks to end (each ends on
    /// the shutdown token or when its connection closes), at most [`TASKS_STOP_WAIT`].
    pub async fn shutdown(&self) {
        for (_, session) in self.inner.sessions.all() {
            session.close(CloseCode::Shutdown, "node stopping");
        }
        self.inner.endpoint.close().await;
        let tasks = &self.inner.tasks;
        tasks.close();
        if tokio::time::timeout(TASKS_STOP_WAIT, tasks.wait()).await.is_err() {
            tracing::warn!(running = tasks.len(), "exchange tasks still running at shutdown");
        }
    }
}

impl Inner {
    fn policy(&self) -> VerifyPolicy {
        VerifyPolicy { now_ms: now_ms(), max_clock_skew: self.options.max_clock_skew, max_age: None }
    }
}

/// Hands the requests a peer sends on its session to the node's protocols.
struct Handler(std::sync::Weak<Inner>);

impl RequestHandler for Handler {
    async fn handle(&self, peer: NodeId, request: pb::envelope::Kind) -> Option<pb::envelope::Kind> {
        let inner = self.0.upgrade()?;
        let router = inner.router.clone();
        router.answer(inner, peer, request).await
    }
}

/// Accepts connections until shutdown; each is established by the connector in a task of its own.
async fn accept_loop(inner: std::sync::Weak<Inner>, shutdown: CancellationToken) {
    loop {
        let Some(exchange) = inner.upgrade() else { return };
        let incoming = tokio::select! {
            () = shutdown.cancelled() => return,
            incoming = exchange.endpoint.accept() => incoming,
        };
        match incoming {
            None => return,
            // A Retry is not a refusal: the dialer comes back with a validated address.
            Some(Err(QuicError::RetrySent)) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "inbound connection refused"),
            Some(Ok(inbound)) => {
                let establishing = exchange.clone();
                exchange.tasks.spawn(async move { establishing.accept(inbound).await });
            }
        }
    }
}

pub(crate) use crate::clock::now_ms;
