//! The one way a QUIC connection becomes a session.
//!
//! Every path to a peer ends in [`Inner::establish`]: a dial from the node's socket to an address found by
//! discovery or stored for a known peer, a hole punch's simultaneous dials, a dial from a birthday socket, a
//! dial into a relay circuit, and every accepted connection. It authenticates the peer (the TLS handshake's
//! key is its node id), exchanges `Hello`s, verifies and stores the peer's record, hands what the peer saw of
//! us to the NAT evidence, registers the session in the table, and accounts for the attempt in one place
//! ([`Inner::account`]: counters, quality samples, the log line).
//!
//! How a path is found is a strategy that ends in a [`Route`]: [`Inner::reach_known`] tries a known peer's
//! stored addresses, then a punch (`punch.rs`), then a relay circuit (`relay.rs`) beside it. Probes that must
//! never become sessions (a hairpin probe, a dial-back served to a peer) open endpoints of their own and stop
//! after the handshake: they measure reachability, not peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::session::{self, CloseCode, EnvelopeReader, SessionHandle, write_envelope};
use super::table::{Admission, Direction};
use super::{
    ConnectionPath, ExchangeError, Handler, Inner, ProtocolViolation, PunchError, StreamError, Verified,
    now_ms,
};
use crate::api::names::NodeId;
use crate::quic::paths::is_relayed;
use crate::quic::{Inbound, Outbound};
use crate::store::{AddressSource, QualitySample, UpsertOutcome};
use crate::wire::{self, VerifiedRecord, pb};

/// How long a punch has before a relay circuit is tried beside it: punches through endpoint-independent NATs
/// finish within a few round trips, and one that needs longer is unlikely to succeed at all.
const RELAY_AFTER: Duration = Duration::from_secs(2);
/// Stored addresses of a known peer tried before a punch.
const STORED_ADDRESSES_TRIED: usize = 4;

/// Where a dial goes, and from which socket.
pub(super) enum Route {
    /// From the node's socket to a peer's address.
    Address(SocketAddr),
    /// From a socket of its own (the birthday socket the peer's probe hit) to the peer's mapping.
    Socket { socket: std::net::UdpSocket, to: SocketAddr },
    /// Into a relay circuit, attached to our endpoint at this synthetic address.
    Circuit(SocketAddr),
}

impl Route {
    fn destination(&self) -> SocketAddr {
        match self {
            Self::Address(address) | Self::Circuit(address) | Self::Socket { to: address, .. } => *address,
        }
    }
}

/// One outbound attempt.
pub(super) struct Dial {
    pub route: Route,
    /// The peer meant: the handshake fails if another key answers. `None` for an address found by discovery.
    pub peer: Option<NodeId>,
    pub source: AddressSource,
    /// When the attempt began (a punch's agreed delay counts, so the figure is what the user waited).
    pub started: Instant,
    /// Longest the whole attempt may take; `None` leaves it to the QUIC handshake and `Hello` timeouts.
    pub deadline: Option<Duration>,
}

impl Dial {
    /// A dial of `address` from the node's socket.
    pub fn to(address: SocketAddr, peer: Option<NodeId>, source: AddressSource) -> Self {
        Self { route: Route::Address(address), peer, source, started: Instant::now(), deadline: None }
    }
}

/// A connection whose peer is authenticated, with the session stream open and our side's `Hello` state.
struct Authenticated {
    peer: NodeId,
    connection: quinn::Connection,
    remote: SocketAddr,
    direction: Direction,
    source: AddressSource,
    send: quinn::SendStream,
    reader: EnvelopeReader,
    /// The listener's `Hello` went out before the dialer was authenticated (0.5-RTT); the dialer answers.
    hello_sent: bool,
    /// What the peer observes of this connection tells about the node socket's NAT mapping (a connection from
    /// a birthday socket, or through a relay, tells nothing).
    witnesses_node_socket: bool,
}

impl Inner {
    /// Dials along `dial.route` and establishes the session.
    pub(super) async fn dial(self: &Arc<Self>, dial: Dial) -> Result<Verified, ExchangeError> {
        let Dial { route, peer, source, started, deadline } = dial;
        let destination = route.destination();
        let is_address = matches!(route, Route::Address(_));
        let attempt = async {
            let outbound = match route {
                Route::Address(address) => {
                    self.evidence.contacted(address, false);
                    self.endpoint.connect(address, peer).await?
                }
                Route::Socket { socket, to } => self.endpoint.connect_from(socket, to, peer).await?,
                Route::Circuit(address) => self.endpoint.connect(address, peer).await?,
            };
            self.establish(self.authenticate_outbound(outbound, source).await?, started).await
        };
        let result = match deadline {
            Some(limit) => {
                tokio::time::timeout(limit, attempt).await.unwrap_or(Err(ExchangeError::TimedOut("dial")))
            }
            None => attempt.await,
        };
        let known_address = peer.filter(|_| is_address).map(|peer| (peer, destination));
        self.account(Direction::Outbound, destination, known_address, &result).await;
        result
    }

    /// Establishes the session of an accepted connection.
    pub(super) async fn accept(self: &Arc<Self>, inbound: Inbound) -> Result<Verified, ExchangeError> {
        let started = Instant::now();
        let remote = inbound.remote;
        let result = async { self.establish(self.authenticate_inbound(inbound).await?, started).await }.await;
        self.account(Direction::Inbound, remote, None, &result).await;
        result
    }

    /// The listener side: our `Hello` goes out before the dialer is authenticated (0.5-RTT data: the dialer
    /// holds our verified record one round trip after it started), theirs is read only after.
    #[tracing::instrument(name = "exchange.inbound", skip_all, fields(remote = %inbound.remote, peer))]
    async fn authenticate_inbound(&self, mut inbound: Inbound) -> Result<Authenticated, ExchangeError> {
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
        self.evidence.contacted(remote, true);
        self.refuse_self(peer, &connection)?;
        let reader = EnvelopeReader::new(recv);
        let direction = Direction::Inbound;
        let source = AddressSource::Inbound;
        Ok(Authenticated {
            peer,
            connection,
            remote,
            direction,
            source,
            send,
            reader,
            hello_sent: true,
            witnesses_node_socket: true,
        })
    }

    /// The dialer side: the handshake authenticated the listener; its `Hello` arrives with the last flight.
    #[tracing::instrument(name = "exchange.outbound", skip_all, fields(peer = %outbound.node_id, ?source))]
    async fn authenticate_outbound(
        &self,
        outbound: Outbound,
        source: AddressSource,
    ) -> Result<Authenticated, ExchangeError> {
        let Outbound { connection, node_id: peer, on_node_socket, .. } = outbound;
        let remote = connection.remote_address();
        if on_node_socket {
            self.evidence.contacted(remote, true);
        }
        self.refuse_self(peer, &connection)?;
        let (send, recv) = connection.accept_bi().await.map_err(StreamError::Accept)?;
        Ok(Authenticated {
            peer,
            connection,
            remote,
            direction: Direction::Outbound,
            source,
            send,
            reader: EnvelopeReader::new(recv),
            hello_sent: false,
            witnesses_node_socket: on_node_socket,
        })
    }

    fn refuse_self(&self, peer: NodeId, connection: &quinn::Connection) -> Result<(), ExchangeError> {
        if peer == self.local {
            CloseCode::SelfConnection.close(connection, "self");
            return Err(ExchangeError::SelfConnection);
        }
        Ok(())
    }

    /// Authenticated, then `Hello`, register: the one function every connection's session goes through.
    async fn establish(
        self: &Arc<Self>,
        mut auth: Authenticated,
        started: Instant,
    ) -> Result<Verified, ExchangeError> {
        let peer = auth.peer;
        let (verified, observed) = self.read_hello(&mut auth.reader, peer, &auth.connection).await?;
        let elapsed = started.elapsed();
        if !auth.hello_sent {
            write_envelope(&mut auth.send, &self.hello(auth.remote)).await?;
        }
        // The dialer's figure is a round trip to the peer's address; the listener's includes the dialer's.
        let rtt = (auth.direction == Direction::Outbound).then_some(elapsed);
        let contact = Some((auth.remote, auth.source));
        if let Err(e) = self.store_verified(&verified, contact, rtt).await {
            self.reject(&auth.connection, &e);
            return Err(e);
        }
        if auth.witnesses_node_socket
            && let Some(observed) = observed
        {
            self.note_observed(peer, &auth.connection, observed);
        }
        let outcome = Verified { node_id: peer, seq: verified.seq, elapsed, remote: auth.remote };
        self.admit(auth, &verified.body.topics);
        Ok(outcome)
    }

    /// Counts an attempt and logs its outcome; a failed dial of a known peer's address is a quality sample.
    async fn account(
        &self,
        direction: Direction,
        remote: SocketAddr,
        known_address: Option<(NodeId, SocketAddr)>,
        result: &Result<Verified, ExchangeError>,
    ) {
        match result {
            Ok(verified) => {
                self.counters.exchanges_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    peer = %verified.node_id, %remote, ?direction, seq = verified.seq,
                    elapsed_ms = verified.elapsed.as_millis() as u64, "peer verified"
                );
            }
            Err(ExchangeError::DialBack) => tracing::debug!(%remote, "dial-back received"),
            // Our own hairpin probe coming back, an address of our own found by discovery, or a peer that gave
            // out our address as its own.
            Err(ExchangeError::SelfConnection) => tracing::debug!(%remote, "connection to ourselves"),
            Err(e) => {
                self.counters.exchanges_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, ?direction, error = %e, "exchange failed");
                if let Some((peer, address)) = known_address {
                    let outcome = Err(e.to_string());
                    let sample = QualitySample { at_ms: now_ms(), address: Some(address), outcome };
                    let _ = self.store.record_quality(peer, sample).await;
                }
            }
        }
    }

    pub(super) fn hello(&self, observed: SocketAddr) -> pb::Envelope {
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
    pub(super) async fn store_verified(
        &self,
        verified: &VerifiedRecord,
        contact: Option<(SocketAddr, AddressSource)>,
        rtt: Option<Duration>,
    ) -> Result<(), ExchangeError> {
        let now = now_ms();
        // A relay circuit's synthetic address means nothing outside this process: never stored.
        let contact = contact.filter(|(address, _)| !is_relayed(address));
        let upsert = super::record::upsert_from_record(verified, contact, now);
        // The connection that brought the record is a successful attempt at its address; the store counts it
        // in the same write, and only if the record was not a replay.
        let quality = contact.map(|(address, _)| QualitySample {
            at_ms: now,
            address: Some(address),
            outcome: Ok(rtt),
        });
        match self.store.upsert_verified(upsert, quality).await? {
            UpsertOutcome::Stale { stored_seq } => {
                Err(ExchangeError::Replay { seq: verified.seq, stored: stored_seq })
            }
            UpsertOutcome::Added | UpsertOutcome::Updated => Ok(()),
        }
    }

    /// A peer's report of where our packets come from: evidence for the NAT prober, and once enough peers
    /// agree on a public address, an address for our record.
    fn note_observed(&self, reporter: NodeId, connection: &quinn::Connection, observed: SocketAddr) {
        let destination = connection.remote_address();
        let Ok(bound) = self.endpoint.local_addr() else { return };
        // The socket may be bound to a wildcard; the path's own local IP is what the NAT saw.
        let local = connection.local_ip().map_or(bound, |ip| SocketAddr::new(ip, bound.port()));
        if let Some(address) = self.evidence.reported(reporter, local, destination, observed) {
            tracing::info!(%address, "public address confirmed by peers");
            let publisher = self.publisher.clone();
            self.tasks.spawn(async move { publisher.add_observed(address).await });
        }
    }

    /// Puts a verified session in the table (closing whichever connection loses) and starts serving it;
    /// `their_topics` (from the record just verified) says whether a peer exchange is worth starting.
    fn admit(self: &Arc<Self>, auth: Authenticated, their_topics: &[String]) {
        let Authenticated { peer, direction, connection, send, reader, .. } = auth;
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        // Every circuit is registered with its relay before its handshake starts.
        let path = match self.relay.relay_of(&connection.remote_address()) {
            Some(via) => ConnectionPath::Relayed { via },
            None if self.punch.is_active(&peer) => ConnectionPath::Punched,
            None => ConnectionPath::Direct,
        };
        let session = SessionHandle::start(
            session::SessionParts { id, peer, direction, path, connection, send, reader, since_ms: now_ms() },
            Arc::new(Handler(weak.clone())),
            &self.tasks,
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
                self.tasks.spawn(self.clone().serve_streams(session.clone()));
                // Most sessions share no topic with us (a node in no topic, a dial-back helper's peers): no task.
                let shared = self.shared_topics(their_topics);
                if !shared.is_empty() {
                    let inner = self.clone();
                    self.tasks.spawn(async move { inner.exchange_peers(session, shared).await });
                }
            }
            Admission::Rejected => session.close(CloseCode::Duplicate, "a connection already exists"),
        }
    }

    /// Reaches a known peer: its stored addresses, best first, pinning its node id; then a punch, and a relay
    /// circuit beside it.
    pub(super) async fn reach_known(self: &Arc<Self>, peer: NodeId) -> Result<SessionHandle, ExchangeError> {
        // An unknown peer may still be reachable by punching through a connected peer that knows it.
        let addresses = self.store.get_peer(peer).await?.map(|detail| detail.addresses).unwrap_or_default();
        let stored = addresses.iter().map(|a| a.address);
        for address in stored.take(STORED_ADDRESSES_TRIED) {
            if self.dial(Dial::to(address, Some(peer), AddressSource::Record)).await.is_ok()
                && let Some(session) = self.sessions.get(&peer)
            {
                return Ok(session);
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
    pub(super) async fn punch_or_relay(
        self: &Arc<Self>,
        peer: NodeId,
    ) -> Result<SessionHandle, ExchangeError> {
        // The punch runs in its own task: if it is slow, a relay circuit serves meanwhile, and a punch that
        // succeeds later replaces the relayed session (the session table prefers direct paths).
        let inner = self.clone();
        let mut punch = self.tasks.spawn(async move { inner.punch_to(peer).await });
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
}
