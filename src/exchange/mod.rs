//! The metadata protocol over authenticated QUIC connections.
//!
//! [`Exchange`] accepts inbound connections and dials candidates (through [`dialer`]); on every new connection,
//! either direction, both sides send a `Hello` carrying their signed record and the address they observe for
//! the other side. Each record is verified (signature, node id == the key TLS authenticated, clock skew, size)
//! and stored; a replayed record (lower seq than stored) is refused and its connection closed. Verified sessions
//! go into a [`table::SessionTable`] (one per peer) and then serve correlated requests: fresh record, ping, and
//! peer exchange.

pub mod dial_back;
pub mod dialer;
mod error;
pub mod punch;
pub mod record;
pub mod relay;
pub mod session;
pub mod table;
pub mod traversal;
pub mod warm_start;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use self::dialer::{DialOutcome, Dialer};
pub use self::error::{
    ExchangeError, IntroductionFailure, PeerRefusal, ProtocolViolation, PunchError, RelayError, StreamError,
};
use self::record::{RecordPublisher, upsert_from_record};
use self::session::{CloseCode, EnvelopeReader, RequestHandler, SessionHandle, write_envelope};
use self::table::{Admission, Direction, SessionTable};
use crate::api::names::NodeId;
use crate::nat::observed::{Observation, ObservedAddresses};
use crate::quic::paths::is_relayed;
use crate::quic::{Inbound, Outbound, QuicEndpoint, QuicError};
use crate::store::{AddressSource, PeerQuery, QualitySample, Store, UpsertOutcome};
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
    /// Through a relay circuit: end-to-end QUIC between the two peers, carried by a third node.
    Relayed,
}

/// What `GetPeer` shows about a live connection.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub direction: Direction,
    pub path: ConnectionPath,
    /// The relay carrying a relayed connection; `remote` is then the relay's address.
    pub relay: Option<NodeId>,
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
    observed: std::sync::Mutex<ObservedAddresses>,
    dialer: Dialer,
    options: ExchangeOptions,
    shutdown: CancellationToken,
    next_session: AtomicU64,
    counters: ExchangeCounters,
    dial_backs_expected: dial_back::Expected,
    dial_back_server: dial_back::Server,
    mappings: std::sync::Mutex<MappingLog>,
    contacted: std::sync::Mutex<ContactLog>,
    punch: punch::PunchState,
    relay: relay::RelayState,
}

/// Every remote endpoint our socket sent to recently, and whether it answered: a "fresh" dial-back source must
/// not be one of them (our NAT would let it in for having talked to it), and many silent endpoints with none
/// answering means UDP is blocked.
#[derive(Debug, Default)]
struct ContactLog {
    endpoints: std::collections::HashMap<SocketAddr, Contact>,
}

#[derive(Debug, Clone, Copy)]
pub struct Contact {
    pub last_sent_ms: i64,
    pub answered: bool,
}

/// Endpoints remembered (the least recently contacted are forgotten first).
const MAX_CONTACTS: usize = 4096;

impl ContactLog {
    fn sent(&mut self, endpoint: SocketAddr, answered: bool) {
        if !self.endpoints.contains_key(&endpoint) && self.endpoints.len() >= MAX_CONTACTS {
            let oldest = self.endpoints.iter().min_by_key(|(_, c)| c.last_sent_ms).map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.endpoints.remove(&oldest);
            }
        }
        let contact = self.endpoints.entry(endpoint).or_insert(Contact { last_sent_ms: 0, answered: false });
        contact.last_sent_ms = now_ms();
        contact.answered |= answered;
    }
}

/// One peer's report of where our packets come from, with where we sent them: the raw evidence of how our
/// NAT maps (see `nat::classify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingSample {
    /// Order in which the samples were taken (the NAT created the mappings in about this order).
    pub seq: u64,
    pub reporter: NodeId,
    /// Our local address on that connection.
    pub local: SocketAddr,
    /// The peer's address: where our packets went.
    pub destination: SocketAddr,
    /// Where the peer saw them come from.
    pub observed: SocketAddr,
    pub at_ms: i64,
}

/// The most recent mapping samples, one per destination (a newer report replaces an older one).
#[derive(Debug, Default)]
struct MappingLog {
    next_seq: u64,
    samples: Vec<MappingSample>,
}

/// How long a hairpin probe waits for its connection to come back: a loop through our own NAT takes
/// microseconds, so this only allows for a lost packet and its retransmission.
const HAIRPIN_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a punch has before a relay circuit is tried beside it: punches through endpoint-independent NATs
/// finish within a few round trips, and one that needs longer is unlikely to succeed at all.
const RELAY_AFTER: Duration = Duration::from_secs(2);
/// How long a plain dial of a peer of undecided NAT gets before a punch is tried: a reachable peer answers in
/// one round trip, and a dial into a NAT's filter only ends at the dial timeout.
const UNDECIDED_PEER_GRACE: Duration = Duration::from_secs(3);
/// Waits between further attempts to reach a peer behind a NAT after a failed punch and relay.
const REACH_RETRY_DELAYS: [Duration; 4] =
    [Duration::from_secs(5), Duration::from_secs(10), Duration::from_secs(20), Duration::from_secs(40)];

/// How old the peer's report on our connection may be for a mapping probe to its DHT socket to be compared
/// with it.
const MAPPING_PROBE_FRESHNESS_MS: i64 = 5 * 60 * 1000;

/// Destinations remembered; the oldest sample goes first.
const MAX_MAPPING_SAMPLES: usize = 64;

impl MappingLog {
    fn record(&mut self, reporter: NodeId, local: SocketAddr, destination: SocketAddr, observed: SocketAddr) {
        self.samples.retain(|s| s.destination != destination);
        if self.samples.len() >= MAX_MAPPING_SAMPLES {
            self.samples.remove(0);
        }
        self.next_seq += 1;
        let sample =
            MappingSample { seq: self.next_seq, reporter, local, destination, observed, at_ms: now_ms() };
        self.samples.push(sample);
    }
}

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
        let exchange = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let dialer = Dialer::start(options.dialer.clone(), weak.clone(), shutdown.clone());
            Inner {
                local,
                endpoint,
                store,
                publisher,
                sessions: SessionTable::new(local),
                observed: std::sync::Mutex::new(ObservedAddresses::default()),
                dialer,
                options,
                shutdown,
                next_session: AtomicU64::new(1),
                counters: ExchangeCounters::default(),
                dial_backs_expected: dial_back::Expected::default(),
                dial_back_server: dial_back::Server::default(),
                mappings: std::sync::Mutex::new(MappingLog::default()),
                contacted: std::sync::Mutex::new(ContactLog::default()),
                punch: punch::PunchState::default(),
                relay: relay_state,
            }
        });
        tokio::spawn(accept_loop(exchange.clone()));
        tokio::spawn(peer_exchange_rounds(Arc::downgrade(&exchange), exchange.shutdown.clone()));
        tokio::spawn(push_record_updates(Arc::downgrade(&exchange), exchange.publisher.subscribe()));
        tokio::spawn(relay::upgrade_relayed(Arc::downgrade(&exchange), exchange.shutdown.clone()));
        Self { inner: exchange }
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
            None => self.inner.dial_known(peer).await?,
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

    /// Dials our own external address from a second socket of this host: true when the connection reaches
    /// our endpoint (the NAT hairpins, RFC 4787 §6: a node behind the same NAT can reach us at our public
    /// address), false when nothing came back in time. A second socket, because that is the case that matters
    /// (a neighbour), and because Linux drops a packet hairpinned back to the very socket that sent it.
    pub async fn probe_hairpin(&self, external: SocketAddr) -> bool {
        let limits = crate::quic::QuicLimits {
            max_connections: 1,
            handshake_timeout: HAIRPIN_TIMEOUT,
            inbound_handshake_timeout: HAIRPIN_TIMEOUT,
            ..crate::quic::QuicLimits::default()
        };
        let bind = SocketAddr::new(
            if external.is_ipv4() {
                std::net::IpAddr::from([0u8; 4])
            } else {
                std::net::IpAddr::from([0u16; 8])
            },
            0,
        );
        let Ok(prober) = QuicEndpoint::bind(bind, self.inner.publisher.signing_key(), limits) else {
            return false;
        };
        let arrived = match prober.connect(external, Some(self.inner.local)).await {
            Ok(outbound) => {
                CloseCode::SelfConnection.close(&outbound.connection, "hairpin probe");
                true
            }
            Err(_) => false,
        };
        tokio::spawn(async move { prober.close().await });
        arrived
    }

    /// Asks `helper` (a connected peer) to dial us back from a fresh 4-tuple and reports whether it arrived.
    pub async fn request_dial_back(
        &self,
        helper: NodeId,
        kind: pb::DialBackKind,
    ) -> Result<dial_back::DialBackOutcome, ExchangeError> {
        let session = self.inner.sessions.get(&helper).ok_or(ExchangeError::Unreachable(helper))?;
        let arrival = self.inner.dial_backs_expected.expect(helper).ok_or(ExchangeError::Busy)?;
        let request = pb::envelope::Kind::DialBackRequest(pb::DialBackRequest { kind: kind as i32 });
        // The helper answers after its attempt, so the request may take as long as its dial.
        let answer =
            session.request(request, self.inner.options.request_timeout + dial_back::DIAL_TIMEOUT).await;
        let response = match answer {
            Ok((pb::envelope::Kind::DialBackResponse(response), _)) => response,
            Ok(_) => {
                self.inner.dial_backs_expected.forget(&helper);
                return Err(ProtocolViolation::UnexpectedAnswer { request: "DialBackRequest" }.into());
            }
            Err(e) => {
                self.inner.dial_backs_expected.forget(&helper);
                return Err(e);
            }
        };
        // The handshake completes at our end before the helper hears about it; allow a moment for ordering.
        let arrived_from = if response.attempted {
            tokio::time::timeout(Duration::from_secs(2), arrival).await.ok().and_then(Result::ok)
        } else {
            None
        };
        self.inner.dial_backs_expected.forget(&helper);
        Ok(dial_back::DialBackOutcome {
            helper,
            kind,
            attempted: response.attempted,
            declared_from: response.from_address.parse().ok(),
            arrived_from,
            detail: response.detail,
            busy: response.busy,
        })
    }

    /// Connects to a known peer: its stored addresses first, then hole punching.
    pub async fn connect_known(&self, peer: NodeId) -> Result<(), ExchangeError> {
        match self.inner.sessions.get(&peer) {
            Some(_) => Ok(()),
            None => self.inner.dial_known(peer).await.map(|_| ()),
        }
    }

    /// Tries a punch to every peer reached only through a relay, one after the other (a punch that succeeds
    /// replaces the relayed session). For when what we know of our NAT changed.
    pub fn punch_relayed_peers(&self) {
        let relayed: Vec<NodeId> = self
            .inner
            .sessions
            .all()
            .into_iter()
            .filter(|(_, session)| session.path() == ConnectionPath::Relayed)
            .map(|(peer, _)| peer)
            .collect();
        if relayed.is_empty() {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            for peer in relayed {
                let Some(inner) = inner.upgrade() else { return };
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => return,
                    attempt = inner.punch_to(peer) => attempt,
                };
                match attempt {
                    Ok(session) => tracing::info!(%peer, path = ?session.path(), "relayed peer punched"),
                    Err(e) => tracing::debug!(%peer, error = %e, "relayed peer still not punchable"),
                }
            }
        });
    }

    /// Measures our NAT's mapping towards a second port of a directly connected peer: its DHT socket (the port
    /// its record names, on the IP we reach it at), pinged from our QUIC socket. The address that socket saw is
    /// kept as a mapping sample beside the one the peer reports on our connection: with a single public peer,
    /// two ports that saw us at two addresses show that our NAT maps per destination. `None` if the peer names
    /// no DHT port or did not answer.
    pub async fn probe_mapping_via_dht(&self, peer: NodeId) -> Option<SocketAddr> {
        let inner = &self.inner;
        let session = inner.direct_session(&peer)?;
        let connection = session.connection();
        let remote = connection.remote_address();
        if is_relayed(&remote) {
            return None;
        }
        // The two samples are compared: the peer's report on our connection must be recent, or a NAT that
        // rebound the flow since (or a lost mapping) would look like one that maps per destination port.
        let connection_sample_fresh = inner
            .mappings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .samples
            .iter()
            .any(|s| s.destination == remote && now_ms() - s.at_ms <= MAPPING_PROBE_FRESHNESS_MS);
        if !connection_sample_fresh {
            return None;
        }
        let body = inner.stored_record_body(peer).await?;
        let port = u16::try_from(body.dht_port).ok().filter(|port| *port != 0)?;
        let dht = SocketAddr::new(remote.ip(), port);
        if dht == remote {
            return None;
        }
        inner.contacted(dht, false);
        let observed = SocketAddr::V4(inner.endpoint.mapping_towards(dht).await?);
        inner.contacted(dht, true);
        let local = inner.endpoint.local_addr().ok()?;
        let local = connection.local_ip().map_or(local, |ip| SocketAddr::new(ip, local.port()));
        inner
            .mappings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(peer, local, dht, observed);
        tracing::debug!(%peer, %dht, %observed, "mapping towards the peer's DHT socket");
        Some(observed)
    }

    /// Asks `relay` (a directly connected peer) to relay circuits to us; true once it accepted.
    pub async fn reserve_relay(&self, relay: NodeId) -> Result<bool, ExchangeError> {
        self.inner.reserve_relay(relay).await
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
            let relay = self.inner.relay.relay_of(&remote);
            if let Some(relay_session) = relay.and_then(|r| self.inner.sessions.get(&r)) {
                remote = relay_session.connection().remote_address();
            }
            SessionInfo {
                direction: s.direction(),
                path: s.path(),
                relay,
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
        sessions.into_iter().filter(|(_, s)| s.path() != ConnectionPath::Relayed).map(|(id, _)| id).collect()
    }

    /// Endpoints our socket sent to since `since_ms`, with whether each answered.
    pub fn contacted_since(&self, since_ms: i64) -> Vec<(SocketAddr, Contact)> {
        let log = self.inner.contacted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.endpoints.iter().filter(|(_, c)| c.last_sent_ms >= since_ms).map(|(a, c)| (*a, *c)).collect()
    }

    /// Forgets what peers told us about our NAT (mapping samples, observed addresses, endpoints contacted):
    /// after a change of network it describes a NAT we are no longer behind.
    pub fn forget_network_evidence(&self) {
        *self.inner.mappings.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            MappingLog::default();
        *self.inner.observed() = ObservedAddresses::default();
        *self.inner.contacted.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            ContactLog::default();
    }

    /// The latest mapping sample per destination, oldest first.
    pub fn mapping_samples(&self) -> Vec<MappingSample> {
        self.inner.mappings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).samples.clone()
    }

    pub fn observed_addresses(&self) -> Vec<Observation> {
        self.inner.observed().observations()
    }

    /// Public addresses confirmed by enough peers.
    pub fn confirmed_public_addresses(&self) -> Vec<SocketAddr> {
        let min = self.inner.options.min_observed_confirmations;
        self.inner
            .observed()
            .confirmed(min)
            .into_iter()
            .filter(|a| !crate::nat::observed::is_private(a.ip()))
            .collect()
    }

    pub fn counters(&self) -> &ExchangeCounters {
        &self.inner.counters
    }

    /// Closes every connection and the endpoint.
    pub async fn shutdown(&self) {
        for (_, session) in self.inner.sessions.all() {
            session.close(CloseCode::Shutdown, "node stopping");
        }
        self.inner.endpoint.close().await;
    }
}

impl Inner {
    fn policy(&self) -> VerifyPolicy {
        VerifyPolicy { now_ms: now_ms(), max_clock_skew: self.options.max_clock_skew, max_age: None }
    }

    /// Notes that our socket sent to `endpoint` (and whether it answered).
    fn contacted(&self, endpoint: SocketAddr, answered: bool) {
        if is_relayed(&endpoint) {
            return;
        }
        self.contacted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).sent(endpoint, answered);
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, ObservedAddresses> {
        self.observed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The listener side: our `Hello` goes out before the client is authenticated (0.5-RTT), theirs is read
    /// only after.
    #[tracing::instrument(name = "exchange.inbound", skip_all, fields(remote = %inbound.remote, peer))]
    async fn run_inbound(self: &Arc<Self>, mut inbound: Inbound) -> Result<Verified, ExchangeError> {
        let started = Instant::now();
        let connection = inbound.connection.clone();
        let remote = inbound.remote;
        let (mut send, recv) = connection.open_bi().await.map_err(StreamError::Open)?;
        write_envelope(&mut send, &self.hello(remote)).await?;
        let peer = inbound.authenticated().await?;
        tracing::Span::current().record("peer", tracing::field::display(peer));
        if self.dial_backs_expected.arrived(peer, remote) {
            CloseCode::DialBackReceived.close(&connection, "dial-back received");
            return Err(ExchangeError::DialBack);
        }
        // From here on we talk to the remote, so our NAT lets it in: it is no longer a fresh source. (A dial-back
        // above is not recorded: it arrived before we ever sent to its source, which is what it measures.)
        self.contacted(remote, true);
        if peer == self.local {
            CloseCode::SelfConnection.close(&connection, "self");
            return Err(ExchangeError::SelfConnection);
        }
        let mut reader = EnvelopeReader::new(recv);
        let (verified, observed) = self.read_hello(&mut reader, peer, &connection).await?;
        self.store_verified(&verified, Some((remote, AddressSource::Inbound)), None).await.inspect_err(
            |e| {
                self.reject(&connection, e);
            },
        )?;
        self.note_observed(peer, &connection, observed);
        let outcome = Verified { node_id: peer, seq: verified.seq, elapsed: started.elapsed(), remote };
        self.admit(peer, Direction::Inbound, connection, send, reader, &verified.body.topics);
        Ok(outcome)
    }

    /// The dialer side: the listener's `Hello` arrives with the handshake's last flight.
    #[tracing::instrument(name = "exchange.outbound", skip_all, fields(peer = %outbound.node_id, ?source))]
    async fn run_outbound(
        self: &Arc<Self>,
        outbound: Outbound,
        started: Instant,
        source: AddressSource,
    ) -> Result<Verified, ExchangeError> {
        let connection = outbound.connection.clone();
        let peer = outbound.node_id;
        let remote = connection.remote_address();
        // A connection from a socket of its own (a birthday punch) tells nothing about the node socket's NAT.
        let on_node_socket = outbound.on_node_socket;
        if on_node_socket {
            self.contacted(remote, true);
        }
        if peer == self.local {
            CloseCode::SelfConnection.close(&connection, "self");
            return Err(ExchangeError::SelfConnection);
        }
        let (mut send, recv) = connection.accept_bi().await.map_err(StreamError::Accept)?;
        let mut reader = EnvelopeReader::new(recv);
        let (verified, observed) = self.read_hello(&mut reader, peer, &connection).await?;
        let elapsed = started.elapsed();
        write_envelope(&mut send, &self.hello(remote)).await?;
        self.store_verified(&verified, Some((remote, source)), Some(elapsed)).await.inspect_err(|e| {
            self.reject(&connection, e);
        })?;
        if on_node_socket {
            self.note_observed(peer, &connection, observed);
        }
        let outcome = Verified { node_id: peer, seq: verified.seq, elapsed, remote };
        self.admit(peer, Direction::Outbound, connection, send, reader, &verified.body.topics);
        Ok(outcome)
    }

    fn hello(&self, observed: SocketAddr) -> pb::Envelope {
        let hello = pb::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            supported_versions: vec![wire::PROTOCOL_VERSION],
            record: Some((*self.publisher.current()).clone()),
            // Through a relay we see a synthetic address, which tells the peer nothing about its NAT.
            observed_address: if is_relayed(&observed) { String::new() } else { observed.to_string() },
        };
        pb::Envelope { request_id: 0, kind: Some(pb::envelope::Kind::Hello(hello)) }
    }

    /// Reads and verifies the peer's `Hello`; closes the connection on any failure.
    async fn read_hello(
        &self,
        reader: &mut EnvelopeReader,
        peer: NodeId,
        connection: &quinn::Connection,
    ) -> Result<(VerifiedRecord, Option<SocketAddr>), ExchangeError> {
        let result = async {
            let envelope = reader.next().await?.ok_or(ExchangeError::SessionClosed)?;
            let Some(pb::envelope::Kind::Hello(hello)) = envelope.kind else {
                return Err(ProtocolViolation::NoHello.into());
            };
            let signed =
                hello.record.ok_or(ProtocolViolation::MissingField { message: "Hello", field: "record" })?;
            let verified = wire::verify_record(&signed, Some(peer), &self.policy())?;
            Ok((verified, hello.observed_address.parse().ok()))
        };
        match tokio::time::timeout(self.options.hello_timeout, result).await {
            Ok(Ok(hello)) => Ok(hello),
            Ok(Err(e)) => {
                self.reject(connection, &e);
                Err(e)
            }
            Err(_) => {
                CloseCode::Timeout.close(connection, "no Hello in time");
                Err(ExchangeError::TimedOut("no Hello from the peer"))
            }
        }
    }

    /// Closes a connection whose exchange failed, with a code that tells the peer why.
    fn reject(&self, connection: &quinn::Connection, error: &ExchangeError) {
        let code = match error {
            ExchangeError::Record(wire::RecordError::NodeIdMismatch { .. }) => {
                self.counters.impersonations_rejected.fetch_add(1, Ordering::Relaxed);
                CloseCode::Verification
            }
            ExchangeError::Replay { .. } => {
                self.counters.replays_rejected.fetch_add(1, Ordering::Relaxed);
                CloseCode::Verification
            }
            ExchangeError::Record(_) => CloseCode::Verification,
            _ => CloseCode::Protocol,
        };
        tracing::warn!(remote = %connection.remote_address(), error = %error, "exchange rejected");
        code.close(connection, error.reason());
    }

    /// Stores a verified record, refusing replays. `contact` is the address we reached the peer on.
    async fn store_verified(
        &self,
        verified: &VerifiedRecord,
        contact: Option<(SocketAddr, AddressSource)>,
        rtt: Option<Duration>,
    ) -> Result<(), ExchangeError> {
        let now = now_ms();
        // A relay circuit's synthetic address means nothing outside this process: never stored.
        let contact = contact.filter(|(address, _)| !is_relayed(address));
        let upsert = upsert_from_record(verified, contact.map(|(a, s)| (a.to_string(), s)), now);
        // The connection that brought the record is a successful attempt at its address; the store counts it
        // in the same write, and only if the record was not a replay.
        let quality = contact.map(|(address, _)| QualitySample {
            at_ms: now,
            address: Some(address.to_string()),
            outcome: Ok(rtt),
        });
        match self.store.upsert_verified(upsert, quality).await? {
            UpsertOutcome::Stale { stored_seq } => {
                Err(ExchangeError::Replay { seq: verified.seq, stored: stored_seq })
            }
            UpsertOutcome::Added | UpsertOutcome::Updated => Ok(()),
        }
    }

    fn note_observed(&self, reporter: NodeId, connection: &quinn::Connection, observed: Option<SocketAddr>) {
        let Some(address) = observed else { return };
        if is_relayed(&connection.remote_address()) {
            // Packets through a relay never crossed our NAT from that peer: no evidence about it.
            return;
        }
        if let Ok(local) = self.endpoint.local_addr() {
            // The socket may be bound to a wildcard; the path's own local IP is what the NAT saw.
            let local = connection.local_ip().map_or(local, |ip| SocketAddr::new(ip, local.port()));
            self.mappings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(
                reporter,
                local,
                connection.remote_address(),
                address,
            );
        }
        let newly_confirmed =
            self.observed().report(reporter, address, now_ms(), self.options.min_observed_confirmations);
        if newly_confirmed && !crate::nat::observed::is_private(address.ip()) {
            tracing::info!(%address, "public address confirmed by peers");
            let publisher = self.publisher.clone();
            tokio::spawn(async move { publisher.add_observed(address).await });
        }
    }

    /// Puts a verified session in the table (closing whichever connection loses) and starts serving it;
    /// `their_topics` (from the record just verified) says whether a peer exchange is worth starting.
    fn admit(
        self: &Arc<Self>,
        peer: NodeId,
        direction: Direction,
        connection: quinn::Connection,
        send: quinn::SendStream,
        reader: EnvelopeReader,
        their_topics: &[String],
    ) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        let path = if is_relayed(&connection.remote_address()) {
            ConnectionPath::Relayed
        } else if self.punch.is_active(&peer) {
            ConnectionPath::Punched
        } else {
            ConnectionPath::Direct
        };
        let session = SessionHandle::start(
            session::SessionParts { id, peer, direction, path, connection, send, reader, since_ms: now_ms() },
            Arc::new(Handler(weak.clone())),
            move |session, _| {
                if let Some(inner) = weak.upgrade()
                    && inner.sessions.remove(&session.peer(), session.id()).is_some()
                {
                    inner.relay.session_ended(&session.peer());
                }
            },
        );
        match self.sessions.admit(peer, session.clone()) {
            Admission::Admitted { replaced } => {
                if let Some(old) = replaced {
                    old.close(CloseCode::Duplicate, "replaced by a newer connection");
                }
                self.counters.exchanges_ok.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(self.clone().serve_streams(session.clone()));
                // Most sessions share no topic with us (a node in no topic, a dial-back helper's peers): no task.
                let shared = self.shared_topics(their_topics);
                if !shared.is_empty() {
                    let inner = self.clone();
                    tokio::spawn(async move { inner.exchange_peers(session, shared).await });
                }
            }
            Admission::Rejected => session.close(CloseCode::Duplicate, "a connection already exists"),
        }
    }

    /// The topics of `theirs` we have joined too, as many as one peer exchange asks about.
    fn shared_topics(&self, theirs: &[String]) -> Vec<String> {
        let ours = self.publisher.topics();
        if ours.is_empty() {
            return Vec::new();
        }
        theirs.iter().filter(|t| ours.contains(t)).take(PEER_EXCHANGE_TOPICS).cloned().collect()
    }

    /// Asks a connected peer for records of `topics` (ones we share), verifies and stores each, and dials the
    /// new ones.
    async fn exchange_peers(self: &Arc<Self>, session: SessionHandle, topics: Vec<String>) {
        for topic in topics {
            let request = pb::envelope::Kind::PeerExchangeRequest(pb::PeerExchangeRequest {
                topic: topic.clone(),
                max_records: self.options.peer_exchange_records,
            });
            let Ok((pb::envelope::Kind::PeerExchangeResponse(response), _)) =
                session.request(request, self.options.request_timeout).await
            else {
                continue;
            };
            let mut candidates = Vec::new();
            for signed in response.records.into_iter().take(wire::MAX_PEER_EXCHANGE_RECORDS) {
                let verified = match wire::verify_record(&signed, None, &self.policy()) {
                    Ok(verified) => verified,
                    Err(e) => {
                        tracing::debug!(peer = %session.peer(), error = %e, "dropping a record from peer exchange");
                        continue;
                    }
                };
                if verified.node_id == self.local || self.sessions.get(&verified.node_id).is_some() {
                    continue;
                }
                // A node behind a NAT lets in only what it expects: a punch (or relay) instead of a dial.
                if !self.reach_if_private(&verified) {
                    candidates.extend(record::dialable_addresses(&verified));
                    self.punch_if_dial_fails(&verified);
                }
                // A stale record (lower seq than stored) is simply not newer: nothing to do.
                let upsert = upsert_from_record(&verified, None, now_ms());
                if let Ok(UpsertOutcome::Added | UpsertOutcome::Updated) =
                    self.store.upsert_peer(upsert).await
                {
                    self.counters.records_from_peer_exchange.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.dialer.candidates(candidates, AddressSource::PeerExchange);
        }
    }

    /// For a peer learnt by peer exchange whose record says it is behind a NAT, whose filter would drop a plain
    /// dial: starts a punch (a relay if that fails), at most once per interval. Returns whether the record is
    /// such a peer's.
    fn reach_if_private(self: &Arc<Self>, record: &VerifiedRecord) -> bool {
        let private = record.body.node_type == pb::NodeType::Private as i32
            || record.body.nat.is_some_and(|n| {
                n.reachability == pb::Reachability::PrivatePunchable as i32
                    || n.reachability == pb::Reachability::PrivateHard as i32
            });
        if !private {
            return false;
        }
        if !self.punch.auto_punch_due(record.node_id) {
            return true;
        }
        let inner = Arc::downgrade(self);
        let peer = record.node_id;
        tokio::spawn(reach_behind_nat(inner, peer, Duration::ZERO, self.shutdown.clone()));
        true
    }

    /// For a peer learnt by peer exchange whose record does not say where it stands (its NAT verdict is still
    /// open: too few witnesses, as in a network with one public node): the plain dial goes first, and if no
    /// session exists after [`UNDECIDED_PEER_GRACE`], a punch (a relay if that fails). An open verdict never
    /// blocks a punch; a reachable peer is connected long before the grace ends and costs nothing more.
    fn punch_if_dial_fails(self: &Arc<Self>, record: &VerifiedRecord) {
        if record.body.node_type != pb::NodeType::Unknown as i32 {
            return;
        }
        if !self.punch.auto_punch_due(record.node_id) {
            return;
        }
        let inner = Arc::downgrade(self);
        tokio::spawn(reach_behind_nat(inner, record.node_id, UNDECIDED_PEER_GRACE, self.shutdown.clone()));
    }

    /// Dials a known peer on its stored addresses, best first, pinning its node id.
    async fn dial_known(self: &Arc<Self>, peer: NodeId) -> Result<SessionHandle, ExchangeError> {
        // An unknown peer may still be reachable by punching through a connected peer that knows it.
        let addresses = self.store.get_peer(peer).await?.map(|detail| detail.addresses).unwrap_or_default();
        for address in addresses.iter().filter_map(|a| a.address.parse::<SocketAddr>().ok()).take(4) {
            let started = Instant::now();
            self.contacted(address, false);
            let attempt = match self.endpoint.connect(address, Some(peer)).await {
                Ok(outbound) => self.run_outbound(outbound, started, AddressSource::Record).await,
                Err(e) => Err(e.into()),
            };
            match attempt {
                Ok(_) => {
                    if let Some(session) = self.sessions.get(&peer) {
                        return Ok(session);
                    }
                }
                Err(e) => self.note_failure(peer, address, &e).await,
            }
        }
        // No stored address let us in: the peer may be behind a NAT that a punch gets through.
        self.punch_or_relay(peer).await.map_err(|e| match e {
            ExchangeError::NotReached { punch, relay, .. } => {
                ExchangeError::NotReached { addresses: addresses.len(), punch, relay }
            }
            other => other,
        })
    }

    /// Reaches a peer behind a NAT: a punch, and a relay circuit if the punch is not done soon.
    async fn punch_or_relay(self: &Arc<Self>, peer: NodeId) -> Result<SessionHandle, ExchangeError> {
        // The punch runs in its own task: if it is slow, a relay circuit serves meanwhile, and a punch that
        // succeeds later replaces the relayed session (the session table prefers direct paths).
        let inner = self.clone();
        let mut punch = tokio::spawn(async move { inner.punch_to(peer).await });
        let mut punch_error = None;
        match tokio::time::timeout(RELAY_AFTER, &mut punch).await {
            Ok(Ok(Ok(session))) => return Ok(session),
            Ok(Ok(Err(e))) => punch_error = Some(e),
            Ok(Err(e)) => punch_error = Some(PunchError::Task(e).into()),
            Err(_still_punching) => {}
        }
        // Last resort: a relay that holds the peer's reservation.
        let relay_error = match self.relay_to(peer).await {
            Ok(session) => return Ok(session),
            Err(e) => e,
        };
        let punch_error = match punch_error {
            Some(e) => e,
            None => match punch.await {
                Ok(Ok(session)) => return Ok(session),
                Ok(Err(e)) => e,
                Err(e) => PunchError::Task(e).into(),
            },
        };
        Err(ExchangeError::NotReached {
            addresses: 0,
            punch: Box::new(punch_error),
            relay: Box::new(relay_error),
        })
    }

    /// Records a failed contact with a known peer.
    async fn note_failure(&self, peer: NodeId, address: SocketAddr, error: &ExchangeError) {
        let sample = QualitySample {
            at_ms: now_ms(),
            address: Some(address.to_string()),
            outcome: Err(error.to_string()),
        };
        let _ = self.store.record_quality(peer, sample).await;
    }
}

/// Waits `grace`, then punches to `peer` (a relay if the punch is not done soon) unless a direct session exists
/// by then, and again after [`REACH_RETRY_DELAYS`] while there is none: a first try often comes before the other
/// side has a rendezvous or a relay reservation, or before either side's NAT verdict is decided (a punch then
/// only dials, where the birthday strategy might have worked), and waiting for the next peer exchange or for
/// the auto-punch interval would leave the pair apart, or relayed, for minutes. Over a relayed session only the
/// punch is tried again: a success replaces the relay.
async fn reach_behind_nat(
    inner: std::sync::Weak<Inner>,
    peer: NodeId,
    grace: Duration,
    shutdown: CancellationToken,
) {
    for wait in std::iter::once(grace).chain(REACH_RETRY_DELAYS) {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.direct_session(&peer).is_some() {
            return;
        }
        let attempt = match inner.sessions.get(&peer) {
            Some(_relayed) => inner.punch_to(peer).await,
            None => inner.punch_or_relay(peer).await,
        };
        match attempt {
            Ok(session) if session.path() != ConnectionPath::Relayed => {
                tracing::info!(%peer, path = ?session.path(), "connected to a peer behind a NAT");
                return;
            }
            Ok(_) => {
                tracing::info!(%peer, "reached a peer behind a NAT through a relay; a punch is tried again later")
            }
            Err(e) => tracing::info!(%peer, error = %e, "could not reach a peer behind a NAT yet"),
        }
    }
}

/// Answers the requests a peer sends on its session.
struct Handler(std::sync::Weak<Inner>);

impl RequestHandler for Handler {
    async fn handle(&self, peer: NodeId, request: pb::envelope::Kind) -> Option<pb::envelope::Kind> {
        use pb::envelope::Kind;
        let inner = self.0.upgrade()?;
        match request {
            Kind::DialBackRequest(request) => {
                let session = inner.sessions.get(&peer)?;
                let target = session.connection().remote_address();
                if is_relayed(&target) {
                    return Some(Kind::DialBackResponse(pb::DialBackResponse {
                        attempted: false,
                        from_address: String::new(),
                        detail: "we are connected through a relay: a dial-back would measure nothing".into(),
                        busy: false,
                    }));
                }
                let local = session.connection().local_ip();
                let kind = request.kind();
                let key = inner.publisher.signing_key().clone();
                let response = inner.dial_back_server.serve(&key, peer, target, local, kind).await;
                Some(Kind::DialBackResponse(response))
            }
            Kind::PunchRequest(request) => Some(inner.forward_punch(peer, request).await),
            Kind::RelayReservationRequest(_) => Some(inner.answer_reservation(peer)),
            Kind::CircuitRequest(request) => Some(inner.carry_circuit(peer, request).await),
            Kind::RecordUpdate(update) => Some(inner.accept_record_update(peer, update).await),
            Kind::PunchIntroduction(introduction) => {
                Some(inner.accept_introduction(peer, introduction).await)
            }
            Kind::GetRecordRequest(_) => Some(Kind::GetRecordResponse(pb::GetRecordResponse {
                record: Some((*inner.publisher.current()).clone()),
            })),
            Kind::Ping(ping) => Some(Kind::Pong(pb::Pong { nonce: ping.nonce })),
            Kind::PeerExchangeRequest(request) => {
                let max = request.max_records.min(wire::MAX_PEER_EXCHANGE_RECORDS as u32);
                Some(Kind::PeerExchangeResponse(inner.peer_exchange(&request.topic, max).await))
            }
            _ => None,
        }
    }
}

impl Inner {
    /// A connected peer's new record: verified as its own, stored unless it is a replay.
    async fn accept_record_update(&self, peer: NodeId, update: pb::RecordUpdate) -> pb::envelope::Kind {
        let refuse = |message: String| {
            pb::envelope::Kind::Error(pb::ErrorResponse { code: pb::ErrorCode::Malformed as u32, message })
        };
        let Some(signed) = update.record else { return refuse("RecordUpdate without a record".into()) };
        let verified = match wire::verify_record(&signed, Some(peer), &self.policy()) {
            Ok(verified) => verified,
            Err(e) => {
                if matches!(e, wire::RecordError::NodeIdMismatch { .. }) {
                    self.counters.impersonations_rejected.fetch_add(1, Ordering::Relaxed);
                }
                return refuse(format!("record refused: {e}"));
            }
        };
        match self.store_verified(&verified, None, None).await {
            Ok(()) => pb::envelope::Kind::RecordUpdateAck(pb::RecordUpdateAck {}),
            Err(e) => {
                if matches!(e, ExchangeError::Replay { .. }) {
                    self.counters.replays_rejected.fetch_add(1, Ordering::Relaxed);
                }
                refuse(format!("record refused: {e}"))
            }
        }
    }

    /// Up to `max` stored records of peers in `topic`, most recently seen first, as received (signed).
    async fn peer_exchange(&self, topic: &str, max: u32) -> pb::PeerExchangeResponse {
        if crate::api::names::validate_topic(topic).is_err() || max == 0 {
            return pb::PeerExchangeResponse::default();
        }
        let query = PeerQuery { topic: Some(topic.to_owned()), limit: max, ..Default::default() };
        let Ok(page) = self.store.list_peers(query).await else { return pb::PeerExchangeResponse::default() };
        let mut records = Vec::new();
        for peer in page.peers {
            if let Ok(Some(detail)) = self.store.get_peer(peer.node_id).await
                && let Ok(signed) = <pb::SignedRecord as prost::Message>::decode(detail.record.as_slice())
            {
                records.push(signed);
            }
        }
        pb::PeerExchangeResponse { records }
    }
}

/// How often connected peers are asked again for records of the topics we share: peers join and leave, and
/// records change (a NAT verdict tells us a peer needs a punch or a relay).
const PEER_EXCHANGE_INTERVAL: Duration = Duration::from_secs(60);
/// Topics asked about in one peer exchange with one peer.
const PEER_EXCHANGE_TOPICS: usize = 4;
/// Sessions asked per round.
const PEER_EXCHANGE_SESSIONS_PER_ROUND: usize = 8;
/// How often the round checks whether our topics changed (a new topic is worth asking about at once).
const PEER_EXCHANGE_CHECK: Duration = Duration::from_secs(2);

/// Peer exchange beyond the first one of each session: every [`PEER_EXCHANGE_INTERVAL`], and soon after we
/// join a topic.
async fn peer_exchange_rounds(inner: std::sync::Weak<Inner>, shutdown: CancellationToken) {
    let mut asked_for = Vec::new();
    let mut last_round = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PEER_EXCHANGE_CHECK) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let topics = inner.publisher.topics();
        if topics == asked_for && last_round.elapsed() < PEER_EXCHANGE_INTERVAL {
            continue;
        }
        asked_for = topics;
        last_round = Instant::now();
        for (_, session) in inner.sessions.all().into_iter().take(PEER_EXCHANGE_SESSIONS_PER_ROUND) {
            let inner = inner.clone();
            tokio::spawn(async move {
                // The peer's record may have changed since the session began: its stored topics are current.
                let Ok(Some(theirs)) = inner.store.get_peer(session.peer()).await else { return };
                let shared = inner.shared_topics(&theirs.summary.topics);
                inner.exchange_peers(session, shared).await;
            });
        }
    }
}

/// Tells every connected peer when our record changes (see `RecordUpdate` in wire.proto).
async fn push_record_updates(
    inner: std::sync::Weak<Inner>,
    mut records: tokio::sync::watch::Receiver<Arc<pb::SignedRecord>>,
) {
    while records.changed().await.is_ok() {
        let record = (**records.borrow_and_update()).clone();
        let Some(inner) = inner.upgrade() else { return };
        for (peer, session) in inner.sessions.all() {
            let update = pb::envelope::Kind::RecordUpdate(pb::RecordUpdate { record: Some(record.clone()) });
            let timeout = inner.options.request_timeout;
            tokio::spawn(async move {
                if let Err(e) = session.request(update, timeout).await {
                    tracing::debug!(%peer, error = %e, "peer did not take our record update");
                }
            });
        }
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            incoming = inner.endpoint.accept() => incoming,
        };
        match incoming {
            None => return,
            // A Retry is not a refusal: the dialer comes back with a validated address.
            Some(Err(QuicError::RetrySent)) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "inbound connection refused"),
            Some(Ok(inbound)) => {
                let inner = inner.clone();
                let remote = inbound.remote;
                tokio::spawn(async move {
                    match inner.run_inbound(inbound).await {
                        Ok(verified) => {
                            tracing::info!(peer = %verified.node_id, %remote, seq = verified.seq, "inbound peer verified")
                        }
                        Err(ExchangeError::DialBack) => tracing::debug!(%remote, "dial-back received"),
                        // Our own hairpin probe coming back, or a peer that gave out our address as its own.
                        Err(ExchangeError::SelfConnection) => {
                            tracing::debug!(%remote, "connection from ourselves")
                        }
                        Err(e) => {
                            inner.counters.exchanges_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%remote, error = %e, "inbound exchange failed");
                        }
                    }
                });
            }
        }
    }
}

pub(crate) use crate::clock::now_ms;
