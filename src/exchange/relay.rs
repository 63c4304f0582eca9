//! Relay circuits: the last resort when no punch gets through (the protocol is described in `proto/wire.proto`,
//! "Relay circuits").
//!
//! Three roles, like punching:
//! - a node that cannot be reached reserves a slot at its public peers ([`Inner::reserve_relay`]);
//! - the **relay** opens a stream on each of its two sessions (the only side that opens circuit streams, so
//!   nodes allow extra streams only on connections to relays they use) and copies bytes between them within
//!   its limits ([`Inner::carry_circuit`]): it never parses what it carries, which is QUIC ciphertext;
//! - each **end** ([`Inner::relay_to`] for the dialer, [`Inner::accept_circuit`] for the target) registers the
//!   circuit with the endpoint socket (see [`crate::quic::paths`]) and runs an ordinary QUIC connection
//!   over it, so the peer's identity is proven by TLS exactly as on a direct path.
//!
//! Relayed sessions are replaced by a direct one when a later punch succeeds (see the session table's rule).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};

use super::connector::{Dial, Route};
use super::router::Protocol;
use super::session::{SessionHandle, write_envelope};
use super::{ExchangeError, Inner, ProtocolViolation, RelayError, StreamError};
use crate::api::names::NodeId;
use crate::config::declared;
use crate::quic::paths::RelayPaths;
use crate::store::AddressSource;
use crate::sync::lock;
use crate::wire::pb;

/// What a node allows when it relays for others.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Whether this node relays at all (only useful on publicly reachable nodes).
    pub enabled: bool,
    /// Peers that may hold a reservation at once.
    pub max_reservations: usize,
    /// Circuits carried at once.
    pub max_circuits: usize,
    /// Bytes per second each way per circuit.
    pub max_bytes_per_second: u64,
    /// Bytes per circuit, both ways together; the circuit is closed beyond.
    pub max_bytes_per_circuit: u64,
}

/// The declared defaults of the `relay.*` settings (see [`crate::config`]).
impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            enabled: declared::flag("relay.enabled"),
            max_reservations: declared::count("relay.max_reservations"),
            max_circuits: declared::count("relay.max_circuits"),
            max_bytes_per_second: declared::bytes("relay.max_bytes_per_second"),
            max_bytes_per_circuit: declared::bytes("relay.max_bytes_per_circuit"),
        }
    }
}

/// Largest first frame on a circuit stream (a request or response is a few dozen bytes).
const MAX_CIRCUIT_FRAME: usize = 4 * 1024;
/// Packets queued towards one circuit before QUIC's packets are dropped (as a full network queue would).
const CIRCUIT_QUEUE: usize = 256;
/// Circuits ending at this node at once.
const MAX_INCOMING_CIRCUITS: usize = 32;
/// Circuit streams a relay may have open on one connection to us at once (besides the session stream).
const CIRCUIT_STREAMS: u32 = 16;
/// Circuits being set up by this node at once.
const MAX_PENDING_CIRCUITS: usize = 64;
/// Longest wait for the other side of a circuit setup.
const CIRCUIT_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Hands the relay's end of a requested circuit to the task that asked for it.
type CircuitWaiter = oneshot::Sender<(SendStream, RecvStream)>;

/// The exchange's relay state, in both roles.
pub(super) struct RelayState {
    /// Changed by a configuration reload: each decision reads the options in force when it is made.
    options: std::sync::RwLock<RelayOptions>,
    /// Peers holding a reservation with us (we relay for them).
    reservations: std::sync::Mutex<HashSet<NodeId>>,
    /// Relays we hold a reservation with.
    reserved_at: std::sync::Mutex<HashSet<NodeId>>,
    /// Peers that refused us a reservation: not asked again while their session lasts.
    refused_by: std::sync::Mutex<HashSet<NodeId>>,
    /// Circuits we carry now (as a relay), against `options.max_circuits`.
    circuits: Arc<AtomicUsize>,
    incoming: Arc<tokio::sync::Semaphore>,
    /// Circuits we asked for, waiting for the relay to open our end: by (relay, circuit number).
    pending: std::sync::Mutex<HashMap<(NodeId, u64), CircuitWaiter>>,
    /// The relay behind each live circuit's synthetic address (ours, as an end).
    via: Arc<std::sync::Mutex<HashMap<SocketAddr, NodeId>>>,
    pub(super) circuits_carried: AtomicU64,
    pub(super) circuits_refused: AtomicU64,
    pub(super) bytes_relayed: Arc<AtomicU64>,
}

/// A circuit slot we carry; given back when dropped.
struct CircuitSlot(Arc<AtomicUsize>);

impl Drop for CircuitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RelayState {
    /// The options in force now.
    pub(super) fn options(&self) -> RelayOptions {
        self.options.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the options (a configuration reload). Reservations and circuits beyond new, lower limits are
    /// kept until they end; new ones are measured against the new limits.
    pub(super) fn set_options(&self, options: RelayOptions) {
        *self.options.write().unwrap_or_else(std::sync::PoisonError::into_inner) = options;
    }

    /// Takes a slot for a circuit we carry, if fewer than `max_circuits` are carried now.
    fn take_circuit_slot(&self, max_circuits: usize) -> Option<CircuitSlot> {
        let taken = self.circuits.fetch_add(1, Ordering::AcqRel);
        let slot = CircuitSlot(self.circuits.clone());
        (taken < max_circuits).then_some(slot)
    }

    pub(super) fn new(options: RelayOptions) -> Self {
        Self {
            circuits: Arc::default(),
            incoming: Arc::new(tokio::sync::Semaphore::new(MAX_INCOMING_CIRCUITS)),
            options: std::sync::RwLock::new(options),
            reservations: std::sync::Mutex::default(),
            reserved_at: std::sync::Mutex::default(),
            refused_by: std::sync::Mutex::default(),
            via: Arc::default(),
            pending: std::sync::Mutex::default(),
            circuits_carried: AtomicU64::new(0),
            circuits_refused: AtomicU64::new(0),
            bytes_relayed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Forgets a peer's reservation (its session ended).
    pub(super) fn session_ended(&self, peer: &NodeId) {
        lock(&self.reservations).remove(peer);
        lock(&self.reserved_at).remove(peer);
        lock(&self.refused_by).remove(peer);
    }

    /// Relays we hold a reservation with.
    pub(super) fn reserved_at(&self) -> Vec<NodeId> {
        lock(&self.reserved_at).iter().copied().collect()
    }

    /// The relay carrying the circuit at a synthetic `address`.
    pub(super) fn relay_of(&self, address: &SocketAddr) -> Option<NodeId> {
        lock(&self.via).get(address).copied()
    }
}

/// Reads exactly one frame (4-byte length, then an Envelope) without reading past it: what follows on a circuit
/// stream is relayed bytes, not frames.
async fn read_first_frame<R: AsyncRead + Unpin>(recv: &mut R) -> Result<pb::Envelope, ExchangeError> {
    let read = async {
        let mut length = [0u8; 4];
        recv.read_exact(&mut length).await.map_err(StreamError::Read)?;
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_CIRCUIT_FRAME {
            return Err(
                ProtocolViolation::CircuitFrameTooLarge { len: length, max: MAX_CIRCUIT_FRAME }.into()
            );
        }
        let mut body = vec![0u8; length];
        recv.read_exact(&mut body).await.map_err(StreamError::Read)?;
        pb::Envelope::decode(body.as_slice()).map_err(|e| ProtocolViolation::CircuitFrame(e).into())
    };
    tokio::time::timeout(CIRCUIT_SETUP_TIMEOUT, read)
        .await
        .map_err(|_| ExchangeError::TimedOut("no circuit setup frame in time"))?
}

/// Reads the next relayed packet (2-byte length, then the packet) from a circuit stream; `None` when the
/// stream ends or breaks, which ends the circuit.
async fn read_circuit_packet<R: AsyncRead + Unpin>(recv: &mut R) -> Option<Vec<u8>> {
    let mut length = [0u8; 2];
    recv.read_exact(&mut length).await.ok()?;
    // At most 64 KiB, the most two bytes can announce: no larger allocation is possible.
    let mut packet = vec![0u8; usize::from(u16::from_be_bytes(length))];
    recv.read_exact(&mut packet).await.ok()?;
    Some(packet)
}

/// Reads `stream` as the far end of a circuit reads what a relay sends it: the setup frame, then relayed packets
/// until the bytes end. For the fuzz target (`tests/fuzz`) and the randomised tests.
///
/// # Panics
///
/// Only if the reader takes more bytes than `stream` holds or yields a packet larger than two length bytes can
/// announce, which would be a bug.
pub fn fuzz_circuit_stream(stream: &[u8]) {
    crate::sync::block_on_local(async {
        let mut rest = stream;
        if read_first_frame(&mut rest).await.is_err() {
            return;
        }
        let mut taken = stream.len() - rest.len();
        while let Some(packet) = read_circuit_packet(&mut rest).await {
            assert!(packet.len() <= usize::from(u16::MAX), "a packet longer than its length field allows");
            taken += 2 + packet.len();
            assert_eq!(taken, stream.len() - rest.len(), "the reader skipped or re-read bytes");
        }
    });
}

fn envelope(kind: pb::envelope::Kind) -> pb::Envelope {
    pb::Envelope { request_id: 1, kind: Some(kind) }
}

fn circuit_response(accepted: bool, detail: impl Into<String>) -> pb::Envelope {
    envelope(pb::envelope::Kind::CircuitResponse(pb::CircuitResponse { accepted, detail: detail.into() }))
}

async fn read_circuit_response(recv: &mut RecvStream) -> Result<(), ExchangeError> {
    match read_first_frame(recv).await?.kind {
        Some(pb::envelope::Kind::CircuitResponse(response)) if response.accepted => Ok(()),
        Some(pb::envelope::Kind::CircuitResponse(response)) => Err(ExchangeError::refused(response.detail)),
        _ => Err(ProtocolViolation::UnexpectedAnswer { request: "a circuit setup" }.into()),
    }
}

/// Connects a circuit's streams to the endpoint socket: returns the synthetic address QUIC reaches the other
/// end at. The circuit ends (and the address is forgotten) when either stream ends.
fn attach_circuit(
    paths: &Arc<RelayPaths>,
    via: (&RelayState, NodeId),
    mut send: SendStream,
    mut recv: RecvStream,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    tasks: &tokio_util::task::TaskTracker,
) -> SocketAddr {
    let (outgoing, mut queue) = mpsc::channel::<Vec<u8>>(CIRCUIT_QUEUE);
    let address = paths.register(outgoing);
    let paths = paths.clone();
    let (state, relay) = via;
    lock(&state.via).insert(address, relay);
    let via = state.via.clone();
    tasks.spawn(async move {
        // Counts the circuit against its limit for as long as it lives.
        let _permit = permit;
        let writing = async {
            while let Some(packet) = queue.recv().await {
                let Ok(length) = u16::try_from(packet.len()) else { continue };
                if send.write_all(&length.to_be_bytes()).await.is_err()
                    || send.write_all(&packet).await.is_err()
                {
                    return;
                }
            }
        };
        let reading = async {
            while let Some(packet) = read_circuit_packet(&mut recv).await {
                paths.deliver(address, packet);
            }
        };
        tokio::select! {
            () = writing => {}
            () = reading => {}
        }
        paths.unregister(&address);
        lock(&via).remove(&address);
        tracing::debug!(%address, "relay circuit ended");
    });
    address
}

/// Why one direction of a relay circuit stopped copying.
#[derive(Debug, PartialEq, thiserror::Error)]
enum CircuitEnd {
    #[error("read: {0}")]
    Read(quinn::ReadError),
    #[error("the circuit used up its byte budget")]
    BudgetSpent,
    #[error("write: {0}")]
    Write(quinn::WriteError),
}

/// Copies `from` into `to` within the circuit's limits: `rate` bytes per second, and the shared `budget`.
async fn copy_limited(
    mut from: RecvStream,
    mut to: SendStream,
    rate: u64,
    budget: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
) -> Result<(), CircuitEnd> {
    let mut window_start = Instant::now();
    let mut in_window = 0u64;
    loop {
        let chunk = match from.read_chunk(16 * 1024, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => {
                let _ = to.finish();
                return Ok(());
            }
            Err(e) => return Err(CircuitEnd::Read(e)),
        };
        let len = chunk.len() as u64;
        if budget.fetch_sub(len.min(budget.load(Ordering::Relaxed)), Ordering::Relaxed) < len {
            return Err(CircuitEnd::BudgetSpent);
        }
        total.fetch_add(len, Ordering::Relaxed);
        in_window += len;
        if in_window > rate {
            // Over the rate: wait out the rest of the second (QUIC flow control pushes back on the sender).
            let elapsed = window_start.elapsed();
            if elapsed < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_secs(1) - elapsed).await;
            }
            window_start = Instant::now();
            in_window = 0;
        }
        to.write_chunk(chunk).await.map_err(CircuitEnd::Write)?;
    }
}

impl Inner {
    /// The target side of a reservation request (we may relay for `peer`).
    pub(super) fn answer_reservation(&self, peer: NodeId) -> pb::envelope::Kind {
        let options = self.relay.options();
        let refuse = |detail: &str| {
            pb::envelope::Kind::RelayReservationResponse(pb::RelayReservationResponse {
                accepted: false,
                detail: detail.to_owned(),
                ..Default::default()
            })
        };
        if !options.enabled {
            return refuse("this node does not relay (relay.enabled = false)");
        }
        if self.direct_session(&peer).is_none() {
            return refuse("reservations are only taken over a direct connection");
        }
        {
            let mut reservations = lock(&self.relay.reservations);
            if !reservations.contains(&peer) && reservations.len() >= options.max_reservations {
                return refuse("too many reservations");
            }
            reservations.insert(peer);
        }
        tracing::info!(%peer, "relay reservation taken");
        pb::envelope::Kind::RelayReservationResponse(pb::RelayReservationResponse {
            accepted: true,
            detail: String::new(),
            max_bytes_per_second: options.max_bytes_per_second,
            max_bytes_per_circuit: options.max_bytes_per_circuit,
        })
    }

    /// Asks `relay` (a directly connected peer) to keep a slot for circuits to us. True once it accepted.
    pub(super) async fn reserve_relay(&self, relay: NodeId) -> Result<bool, ExchangeError> {
        if lock(&self.relay.reserved_at).contains(&relay) {
            return Ok(true);
        }
        if lock(&self.relay.refused_by).contains(&relay) {
            return Ok(false);
        }
        let session = self.direct_session(&relay).ok_or(ExchangeError::Unreachable(relay))?;
        let request = pb::envelope::Kind::RelayReservationRequest(pb::RelayReservationRequest {});
        match session.request(request, self.options.request_timeout).await? {
            (pb::envelope::Kind::RelayReservationResponse(response), _) if response.accepted => {
                // Circuits to us arrive as streams the relay opens.
                allow_circuit_streams(session.connection());
                lock(&self.relay.reserved_at).insert(relay);
                tracing::info!(%relay, "relay reservation held");
                Ok(true)
            }
            (pb::envelope::Kind::RelayReservationResponse(response), _) => {
                tracing::debug!(%relay, detail = %response.detail, "relay reservation refused");
                lock(&self.relay.refused_by).insert(relay);
                Ok(false)
            }
            _ => Err(ProtocolViolation::UnexpectedAnswer { request: "RelayReservationRequest" }.into()),
        }
    }

    /// Serves the streams a relay opens on our connection to it: circuits to us (we reserved) and the ends of
    /// circuits we asked for.
    pub(super) async fn serve_streams(self: Arc<Self>, session: SessionHandle) {
        loop {
            let (send, mut recv) = match session.connection().accept_bi().await {
                Ok(streams) => streams,
                Err(_) => return,
            };
            let inner = self.clone();
            let relay = session.peer();
            self.tasks.spawn(async move {
                let result = match read_first_frame(&mut recv).await {
                    Ok(pb::Envelope {
                        kind: Some(pb::envelope::Kind::CircuitIncoming(incoming)), ..
                    }) => {
                        let waiter = lock(&inner.relay.pending).remove(&(relay, incoming.circuit));
                        match waiter {
                            // The relay's end of a circuit we asked for.
                            Some(waiter) => {
                                let _ = waiter.send((send, recv));
                                Ok(())
                            }
                            None => inner.accept_circuit(relay, incoming, send, recv).await,
                        }
                    }
                    Ok(_) => Err(ProtocolViolation::UnexpectedStream.into()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::debug!(%relay, error = %e, "circuit stream ended with an error");
                }
            });
        }
    }

    /// The relay: `requester` asks (on its session) for a circuit to the target of `request`. Opens a stream
    /// to the target, then one to the requester, and copies between them.
    pub(super) async fn carry_circuit(
        &self,
        requester: NodeId,
        request: pb::CircuitRequest,
    ) -> pb::envelope::Kind {
        let refuse = |detail: String| {
            self.relay.circuits_refused.fetch_add(1, Ordering::Relaxed);
            pb::envelope::Kind::CircuitResponse(pb::CircuitResponse { accepted: false, detail })
        };
        let Ok(target) = <[u8; 32]>::try_from(request.target.as_slice()).map(NodeId) else {
            return refuse("the target is not a node id".into());
        };
        let options = self.relay.options();
        if !options.enabled {
            return refuse("this node does not relay (relay.enabled = false)".into());
        }
        let reserved = lock(&self.relay.reservations).contains(&target);
        let (Some(target_session), Some(requester_session)) =
            (self.direct_session(&target).filter(|_| reserved), self.direct_session(&requester))
        else {
            return refuse(format!("{target} holds no reservation here"));
        };
        let Some(permit) = self.relay.take_circuit_slot(options.max_circuits) else {
            return refuse("too many circuits".into());
        };
        let circuit = request.circuit;
        let open = |session: SessionHandle, from: NodeId| async move {
            // Each side allowed the stream before it could be needed (reservation, request); a peer that
            // did not would leave this waiting for stream credit, hence the timeout.
            let (mut send, recv) =
                tokio::time::timeout(CIRCUIT_SETUP_TIMEOUT, session.connection().open_bi())
                    .await
                    .map_err(|_| ExchangeError::TimedOut("no stream credit for a circuit"))?
                    .map_err(StreamError::Open)?;
            let incoming = pb::CircuitIncoming { from: from.as_bytes().to_vec(), circuit };
            write_envelope(&mut send, &envelope(pb::envelope::Kind::CircuitIncoming(incoming))).await?;
            Ok::<_, ExchangeError>((send, recv))
        };
        let (b_send, mut b_recv) = match open(target_session, requester).await {
            Ok(streams) => streams,
            Err(e) => return refuse(format!("{target} could not be reached: {e}")),
        };
        if let Err(e) = read_circuit_response(&mut b_recv).await {
            return refuse(format!("{target} refused the circuit: {e}"));
        }
        let (a_send, a_recv) = match open(requester_session, target).await {
            Ok(streams) => streams,
            Err(e) => return refuse(format!("the circuit back to you failed: {e}")),
        };
        self.relay.circuits_carried.fetch_add(1, Ordering::Relaxed);
        tracing::info!(from = %requester, to = %target, "relaying a circuit");
        let budget = Arc::new(AtomicU64::new(options.max_bytes_per_circuit));
        let total = self.relay.bytes_relayed.clone();
        let rate = options.max_bytes_per_second;
        self.tasks.spawn(async move {
            let _permit = permit;
            // Whichever direction ends (or breaks a limit) ends the circuit; dropping the other direction's
            // streams resets them.
            let outcome = tokio::select! {
                r = copy_limited(a_recv, b_send, rate, budget.clone(), total.clone()) => r,
                r = copy_limited(b_recv, a_send, rate, budget, total) => r,
            };
            tracing::info!(from = %requester, to = %target, ?outcome, "relay circuit closed");
        });
        pb::envelope::Kind::CircuitResponse(pb::CircuitResponse { accepted: true, detail: String::new() })
    }

    /// The target end: `relay` brings a circuit from another node.
    async fn accept_circuit(
        &self,
        relay: NodeId,
        incoming: pb::CircuitIncoming,
        mut send: SendStream,
        recv: RecvStream,
    ) -> Result<(), ExchangeError> {
        let from = <[u8; 32]>::try_from(incoming.from.as_slice()).map(NodeId).ok();
        if !lock(&self.relay.reserved_at).contains(&relay) || from.is_none_or(|f| f == self.local) {
            write_envelope(&mut send, &circuit_response(false, "no reservation with you, or a bad sender"))
                .await?;
            return Ok(());
        }
        let Ok(permit) = self.relay.incoming.clone().try_acquire_owned() else {
            write_envelope(&mut send, &circuit_response(false, "too many circuits")).await?;
            return Ok(());
        };
        write_envelope(&mut send, &circuit_response(true, "")).await?;
        // The peer's QUIC handshake arrives over the circuit like any inbound connection, and TLS tells who it
        // really is: `from` is only what the relay says.
        let address = attach_circuit(
            self.endpoint.relay_paths(),
            (&self.relay, relay),
            send,
            recv,
            Some(permit),
            &self.tasks,
        );
        tracing::info!(%relay, from = ?from, %address, "accepted a relay circuit");
        Ok(())
    }

    /// The dialing end: a QUIC connection to `peer` through a relay that holds its reservation.
    #[tracing::instrument(name = "nat.relay", skip_all, fields(peer = %peer))]
    pub(super) async fn relay_to(self: &Arc<Self>, peer: NodeId) -> Result<SessionHandle, ExchangeError> {
        if let Some(session) = self.sessions.get(&peer) {
            return Ok(session);
        }
        let mut last_error = RelayError::NoRelay;
        for via in self.rendezvous_for(peer).await {
            let started = Instant::now();
            let circuit = super::punch::random_nonce();
            let key = (via.peer(), circuit);
            let (waiter, arrival) = oneshot::channel();
            {
                let mut pending = lock(&self.relay.pending);
                if pending.len() >= MAX_PENDING_CIRCUITS {
                    return Err(ExchangeError::Busy);
                }
                pending.insert(key, waiter);
            }
            let attempt = async {
                // The relay opens our end of the circuit: allow it the stream.
                allow_circuit_streams(via.connection());
                let request = pb::CircuitRequest { target: peer.as_bytes().to_vec(), circuit };
                let answer = via
                    .request(pb::envelope::Kind::CircuitRequest(request), self.options.request_timeout * 2)
                    .await?;
                match answer {
                    (pb::envelope::Kind::CircuitResponse(r), _) if r.accepted => {}
                    (pb::envelope::Kind::CircuitResponse(r), _) => {
                        return Err(ExchangeError::refused(r.detail));
                    }
                    _ => {
                        return Err(ProtocolViolation::UnexpectedAnswer { request: "CircuitRequest" }.into());
                    }
                }
                let (send, recv) = tokio::time::timeout(CIRCUIT_SETUP_TIMEOUT, arrival)
                    .await
                    .map_err(|_| ExchangeError::TimedOut("the relay accepted but opened no circuit stream"))?
                    .map_err(|_| ExchangeError::SessionClosed)?;
                let address = attach_circuit(
                    self.endpoint.relay_paths(),
                    (&self.relay, via.peer()),
                    send,
                    recv,
                    None,
                    &self.tasks,
                );
                let route = Route::Circuit(address);
                let dial =
                    Dial { route, peer: Some(peer), source: AddressSource::Record, started, deadline: None };
                self.dial(dial).await
            };
            let result = attempt.await;
            lock(&self.relay.pending).remove(&key);
            match result {
                Ok(_) => {
                    if let Some(session) = self.sessions.get(&peer) {
                        tracing::info!(relay = %via.peer(), "connected through a relay");
                        return Ok(session);
                    }
                }
                Err(e) => {
                    tracing::debug!(relay = %via.peer(), error = %e, "no circuit through this relay");
                    last_error = RelayError::Circuit { relay: via.peer(), failure: Box::new(e) };
                }
            }
        }
        Err(last_error.into())
    }
}

/// Serves `RelayReservationRequest`: a peer behind a NAT asks us to carry circuits to it.
pub(super) struct Reservations;

impl Protocol for Reservations {
    type Request = pb::RelayReservationRequest;

    super::router::accepts_variant!(RelayReservationRequest);

    async fn answer(&self, node: &Arc<Inner>, peer: NodeId, _request: Self::Request) -> pb::envelope::Kind {
        node.answer_reservation(peer)
    }
}

/// Serves `CircuitRequest`: opens a circuit from the requester to a peer that holds a reservation with us.
pub(super) struct Circuits;

impl Protocol for Circuits {
    type Request = pb::CircuitRequest;

    super::router::accepts_variant!(CircuitRequest);

    async fn answer(&self, node: &Arc<Inner>, peer: NodeId, request: Self::Request) -> pb::envelope::Kind {
        node.carry_circuit(peer, request).await
    }
}

/// Lets a relay open circuit streams on our connection to it (the session stream plus this many circuits).
fn allow_circuit_streams(connection: &quinn::Connection) {
    connection.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(1 + CIRCUIT_STREAMS));
}

/// How often relayed sessions are checked for an upgrade to a direct path.
const UPGRADE_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Tries, now and then, to punch a direct path to each peer we reach through a relay; the session table
/// swaps a punched session in for the relayed one. Each peer is tried at most once per
/// [`super::punch::AUTO_PUNCH_INTERVAL`].
pub(super) async fn upgrade_relayed(
    inner: std::sync::Weak<Inner>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(UPGRADE_CHECK_INTERVAL) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        for (peer, session) in inner.sessions.all() {
            if !session.path().is_relayed() || !inner.punch.auto_punch_due(peer) {
                continue;
            }
            let punching = inner.clone();
            inner.tasks.spawn(async move {
                match punching.punch_to(peer).await {
                    Ok(_) => tracing::info!(%peer, "relayed session upgraded to a direct one"),
                    Err(e) => tracing::debug!(%peer, error = %e, "still no direct path"),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::{QuicEndpoint, QuicLimits};

    #[tokio::test]
    async fn a_circuit_stream_is_read_as_a_setup_frame_then_packets() {
        let setup = crate::wire::encode_frame(&circuit_response(true, "ok")).expect("frame");
        let mut stream = setup.clone();
        for packet in [&b"first"[..], &[], &[7; 1200]] {
            stream.extend_from_slice(&u16::try_from(packet.len()).expect("short").to_be_bytes());
            stream.extend_from_slice(packet);
        }
        let mut reader = &stream[..];
        assert!(read_first_frame(&mut reader).await.is_ok());
        let mut packets = Vec::new();
        while let Some(packet) = read_circuit_packet(&mut reader).await {
            packets.push(packet.len());
        }
        assert_eq!(packets, [5, 0, 1200]);
        let mut oversized = u32::try_from(MAX_CIRCUIT_FRAME + 1).expect("small").to_be_bytes().to_vec();
        oversized.extend(vec![0; MAX_CIRCUIT_FRAME + 1]);
        assert!(matches!(
            read_first_frame(&mut &oversized[..]).await,
            Err(ExchangeError::Protocol(ProtocolViolation::CircuitFrameTooLarge { .. }))
        ));
    }

    #[test]
    fn a_circuit_stream_cut_anywhere_ends_the_reader_quietly() {
        let mut stream = crate::wire::encode_frame(&circuit_response(false, "no")).expect("frame");
        stream.extend_from_slice(&[0, 3, 1, 2, 3, 0xff, 0xff, 9]);
        for cut in 0..=stream.len() {
            fuzz_circuit_stream(&stream[..cut]);
        }
    }

    /// The echo task's outcome, with the connection it echoed on: dropping that would close it before the
    /// last echoed bytes are delivered.
    type Echo = tokio::task::JoinHandle<(Result<(), String>, Option<quinn::Connection>)>;

    /// A QUIC connection on loopback whose peer echoes one stream back through [`copy_limited`]; returns the
    /// dialer's ends of that stream and the echo task.
    async fn echo_through_limiter(
        rate: u64,
        budget: u64,
    ) -> (SendStream, RecvStream, Echo, Vec<QuicEndpoint>) {
        let bind = |seed| {
            let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
            QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), &key, QuicLimits::default()).expect("bind")
        };
        let (relay, user) = (bind(21), bind(22));
        let address = relay.local_addr().expect("addr");
        let accepting = relay.clone();
        let echo = tokio::spawn(async move {
            let inbound = accepting.accept().await.expect("open").expect("inbound");
            let (send, recv) = match inbound.connection.accept_bi().await {
                Ok(streams) => streams,
                Err(e) => return (Err(e.to_string()), None),
            };
            let total = Arc::new(AtomicU64::new(0));
            let outcome = copy_limited(recv, send, rate, Arc::new(AtomicU64::new(budget)), total)
                .await
                .map_err(|e| e.to_string());
            (outcome, Some(inbound.connection))
        });
        let outbound = user.connect(address, Some(relay.node_id())).await.expect("connect");
        let (send, recv) = outbound.connection.open_bi().await.expect("stream");
        (send, recv, echo, vec![relay, user])
    }

    #[tokio::test]
    async fn a_circuit_ends_when_its_byte_budget_is_spent() {
        let (mut send, mut recv, echo, endpoints) = echo_through_limiter(u64::MAX, 10 * 1024).await;
        let written = tokio::spawn(async move {
            // Far more than the budget; the relay resets the stream once the budget is gone.
            for _ in 0..16 {
                if send.write_all(&[7u8; 4096]).await.is_err() {
                    return send;
                }
            }
            let _ = send.finish();
            send
        });
        let mut echoed = 0usize;
        let mut buf = [0u8; 4096];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            echoed += n;
        }
        let (outcome, _connection) = echo.await.expect("task");
        assert_eq!(outcome, Err(CircuitEnd::BudgetSpent.to_string()));
        assert!(echoed <= 10 * 1024, "{echoed} bytes passed a budget of 10 KiB");
        drop(written.await);
        for endpoint in endpoints {
            endpoint.close().await;
        }
    }

    #[tokio::test]
    async fn a_circuit_is_held_to_its_rate() {
        // 40 KiB at 8 KiB/s: once a second's bytes pass 8 KiB the relay waits out the second, and a second
        // carries at most 8 KiB plus one 16 KiB read, so at least two seconds end in such a wait.
        let (mut send, mut recv, echo, endpoints) = echo_through_limiter(8 * 1024, u64::MAX).await;
        let started = Instant::now();
        send.write_all(&[1u8; 40 * 1024]).await.expect("write");
        send.finish().expect("finish");
        let mut echoed = 0usize;
        let mut buf = [0u8; 4096];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            echoed += n;
        }
        assert_eq!(echo.await.expect("task").0, Ok(()));
        assert_eq!(echoed, 40 * 1024, "everything arrives, just not at once");
        // A lower bound only: a slow machine makes this longer, never shorter.
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{:?} for five seconds' worth",
            started.elapsed()
        );
        for endpoint in endpoints {
            endpoint.close().await;
        }
    }
}
