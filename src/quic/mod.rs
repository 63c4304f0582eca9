//! The QUIC transport between nodes: one UDP socket per node for both dialing and listening, TLS 1.3 with raw
//! ed25519 public keys (RFC 7250) in both directions, and the node id of each connection bound to the key that
//! signed its handshake.
//!
//! Dialing returns only once the peer's key is verified (and, when the caller knows whom it dials, is the
//! expected one). Accepting returns as early as possible so the listener can send its first messages at 0.5-RTT,
//! in the flight that completes the dialer's handshake; the dialer's own identity is only known, and anything it
//! sent only trustworthy, once [`Inbound::authenticated`] returns.

mod admission;
mod error;
pub mod paths;
mod source_limit;

use source_limit::Rate;
mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use quinn::{ConnectionError, TransportErrorCode, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::oneshot;

pub use admission::AdmissionStats;
pub use error::QuicError;

use crate::api::names::NodeId;
use crate::config::declared;
use admission::{Admission, AdmissionLimits, Decision, PendingHandshake};
use tls::{SeenKey, SeenSlot, TlsIdentity};

/// The one application protocol both sides offer; a peer that does not offer it fails the handshake.
pub const ALPN: &[u8] = b"remote-network/1";

/// Application close code: the node is shutting down.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0x1);
/// Application close code: the dialer did not complete the handshake within the handshake timeout.
pub const CLOSE_HANDSHAKE_TIMEOUT: VarInt = VarInt::from_u32(0x2);
/// Application close code: the peer is not the node that was expected.
pub const CLOSE_WRONG_PEER: VarInt = VarInt::from_u32(0x3);

/// QUIC version 1 (RFC 9000). Drafts are not offered: every node runs this code.
const QUIC_V1: u32 = 0x0000_0001;
/// How long [`QuicEndpoint::close`] waits for peers to be told, so that shutdown is never held up by a peer
/// that has gone away.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Bytes buffered for one connection attempt that has not been accepted yet. Clients never send 0-RTT data
/// (resumption is off), so only handshake packets land here.
const INCOMING_BUFFER: u64 = 64 * 1024;
/// Bytes buffered for all not-yet-accepted connection attempts together.
const INCOMING_BUFFER_TOTAL: u64 = 8 * 1024 * 1024;

/// Default flow-control window of a stream and of a connection: a quarter of the largest frame
/// ([`crate::wire::MAX_FRAME_BYTES`]), ample for the few-KiB messages the protocol exchanges.
const STREAM_WINDOW: u32 = 64 * 1024;
/// Default bytes buffered for sending on one connection: one largest frame and its prefix, so that writing
/// one never waits for acknowledgements of the one before.
const SEND_WINDOW: u64 = 256 * 1024 + 1024;

/// Resource limits of the transport. Windows are sized for metadata exchange, not bulk data.
#[derive(Debug, Clone)]
pub struct QuicLimits {
    /// Live connections (inbound and outbound together) beyond which inbound connections are refused, before
    /// any handshake work is done for them.
    pub max_connections: usize,
    /// Concurrent bidirectional streams the peer may open on one connection; each costs state from the start.
    pub max_bi_streams: u32,
    /// Bytes the peer may send on one stream ahead of our reading.
    pub stream_receive_window: u32,
    /// Bytes the peer may send on one connection ahead of our reading, over all streams.
    pub receive_window: u32,
    /// Bytes we buffer for sending on one connection.
    pub send_window: u64,
    /// A connection with no traffic for this long is dropped. Must be more than zero.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets, which keep NAT mappings open; zero disables them. Must be shorter than
    /// `idle_timeout` otherwise.
    pub keep_alive: Duration,
    /// Time allowed for a handshake we dial. Must be more than zero.
    pub handshake_timeout: Duration,
    /// Time an inbound handshake may hold its slot, from the dialer's first packet. Shorter than
    /// `handshake_timeout`: an honest dialer finishes within one round trip of our first flight, and a
    /// stalled attempt should give its slot back soon. Must be more than zero.
    pub inbound_handshake_timeout: Duration,
    /// Inbound handshakes in progress beyond which new attempts are refused (see [`admission`]).
    pub max_pending_handshakes: usize,
    /// Inbound handshakes in progress from which attempts must prove their address with a QUIC Retry first.
    pub retry_threshold: usize,
    /// Unvalidated inbound handshakes one IP may have in progress before its further attempts get a Retry.
    pub max_unvalidated_per_ip: usize,
    /// Address reflections answered per second to one IP, after a burst of `reflection_burst`; beyond that
    /// they are dropped. A node behind a NAT asks once per punch (a few at once when it predicts its mappings),
    /// so this only caps what a flood can make us send, and one flooder cannot use up what other askers get.
    pub reflections_per_ip: usize,
    pub reflection_burst: usize,
    /// Address reflections answered per second to everyone together.
    pub reflections_per_second: usize,
}

/// The setting-backed limits come from their declarations in [`crate::config`]; the rest are the transport's.
impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            max_connections: declared::count("quic.max_connections"),
            // The protocol runs exactly one stream per connection, and quinn keeps state for every stream the
            // peer may open, allocated when the connection starts.
            max_bi_streams: 1,
            // These bound what one peer can make us buffer (times `max_connections`), not what an idle
            // connection holds. A frame larger than a window still passes: reading it hands out more credit.
            stream_receive_window: STREAM_WINDOW,
            receive_window: STREAM_WINDOW,
            send_window: SEND_WINDOW,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            handshake_timeout: declared::duration("quic.handshake_timeout"),
            inbound_handshake_timeout: declared::duration("quic.inbound_handshake_timeout"),
            max_pending_handshakes: declared::count("quic.max_pending_handshakes"),
            // The thresholds are well above what honest bursts reach (rn-bench dials 16 at a time, all from
            // 127.0.0.1), so that they never pay for a Retry, and far below the slots a flood could otherwise
            // take. The per-IP bound has twice the bench's concurrency: the listener still counts a handshake
            // for a moment after the dialer has finished it and started the next (at 16, 3-5 % of the bench's
            // dials got a Retry).
            retry_threshold: declared::count("quic.retry_threshold"),
            max_unvalidated_per_ip: declared::count("quic.max_unvalidated_per_ip"),
            reflections_per_ip: declared::count("quic.reflections_per_ip"),
            reflection_burst: declared::count("quic.reflection_burst"),
            reflections_per_second: declared::count("quic.reflections_per_second"),
        }
    }
}

impl QuicLimits {
    fn validate(&self) -> Result<(), QuicError> {
        let invalid = |what: &str| Err(QuicError::InvalidLimits(what.to_owned()));
        if self.max_bi_streams == 0 {
            return invalid("max_bi_streams must be at least 1 (default 8)");
        }
        if self.stream_receive_window == 0 || self.receive_window == 0 || self.send_window == 0 {
            return invalid(
                "stream_receive_window, receive_window and send_window must be more than zero \
                 (defaults 64 KiB, 64 KiB and 257 KiB)",
            );
        }
        if self.idle_timeout.is_zero() {
            return invalid("idle_timeout must be more than zero (default 30 s)");
        }
        if self.handshake_timeout.is_zero() || self.inbound_handshake_timeout.is_zero() {
            return invalid(
                "handshake_timeout and inbound_handshake_timeout must be more than zero (defaults 10 s and 5 s)",
            );
        }
        if self.max_pending_handshakes == 0 || self.retry_threshold == 0 || self.max_unvalidated_per_ip == 0 {
            return invalid(
                "max_pending_handshakes, retry_threshold and max_unvalidated_per_ip must be at least 1 \
                 (defaults 256, 64 and 32)",
            );
        }
        if !self.keep_alive.is_zero() && self.keep_alive >= self.idle_timeout {
            return invalid(
                "keep_alive must be shorter than idle_timeout, or zero to disable it (defaults 10 s and 30 s)",
            );
        }
        Ok(())
    }

    /// The token buckets of address reflections: per IP, and for everyone together.
    fn reflection_rates(&self) -> (Rate, Rate) {
        let per_second = |n: usize| n as f64;
        let per_ip = Rate {
            per_second: per_second(self.reflections_per_ip),
            burst: per_second(self.reflection_burst),
        };
        let total = per_second(self.reflections_per_second);
        (per_ip, Rate { per_second: total, burst: total })
    }

    fn admission(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_connections: self.max_connections,
            max_pending_handshakes: self.max_pending_handshakes,
            retry_threshold: self.retry_threshold,
            max_unvalidated_per_ip: self.max_unvalidated_per_ip,
        }
    }

    fn transport_config(&self) -> Result<quinn::TransportConfig, QuicError> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| QuicError::InvalidLimits("idle_timeout is too large (default 30 s)".to_owned()))?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_bi_streams))
            // The protocol uses only bidirectional streams; refusing the others bounds per-connection state.
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval((!self.keep_alive.is_zero()).then_some(self.keep_alive))
            // Datagrams are not used; not advertising them keeps peers from filling a buffer nobody reads.
            .datagram_receive_buffer_size(None)
            // Path MTU discovery only pays off for bulk transfers. Each connection keeps a send buffer as large
            // as the largest datagram it ever sent, so staying at the 1200 bytes every QUIC path carries keeps
            // it small, and saves the periodic probes.
            .mtu_discovery_config(None);
        Ok(transport)
    }
}

/// A node's QUIC endpoint: one UDP socket used both to listen and to dial, because NAT mappings and hole
/// punching only work if peers see the same address and port for both. Cloning shares the endpoint.
#[derive(Clone)]
pub struct QuicEndpoint {
    inner: Arc<Inner>,
}

/// A KRPC ping is sent this many times, each waiting this long for the reply.
const KRPC_PING_ATTEMPTS: usize = 2;
const KRPC_PING_TIMEOUT: Duration = Duration::from_millis(500);

struct Inner {
    endpoint: quinn::Endpoint,
    tls: TlsIdentity,
    /// Template for each inbound connection's config; only the TLS part (its verifier) differs per connection.
    server_base: quinn::ServerConfig,
    transport: Arc<quinn::TransportConfig>,
    /// Changed by [`QuicEndpoint::set_limits`]; the transport part (windows, keep-alive) is fixed at bind.
    limits: std::sync::RwLock<QuicLimits>,
    /// Relay circuits the socket routes packets over (see [`paths`]).
    relay_paths: Arc<paths::RelayPaths>,
    /// The UDP socket under the endpoint, for the few datagrams that are not QUIC (see [`Self::send_datagram`]).
    udp: Arc<dyn quinn::AsyncUdpSocket>,
    /// Replies to KRPC pings sent from the socket (see [`Self::mapping_towards`]).
    krpc: Arc<paths::KrpcWaiters>,
    /// The socket wrapper the endpoint runs on, whose reflection budgets follow [`QuicEndpoint::set_limits`].
    socket: Arc<paths::PathSocket>,
    closed: AtomicBool,
    /// Makes "count the connections, then accept" one step, so that concurrent `accept` callers cannot both
    /// take the last free slot.
    admission_lock: Mutex<()>,
    admission: Arc<Admission>,
}

impl fmt::Debug for QuicEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicEndpoint")
            .field("node_id", &self.inner.tls.node_id())
            .field("local_addr", &self.inner.endpoint.local_addr().ok())
            .field("connections", &self.connection_count())
            .finish()
    }
}

/// A connection we dialed, with the peer's verified node id.
#[derive(Debug)]
pub struct Outbound {
    pub connection: quinn::Connection,
    pub node_id: NodeId,
    /// Time from the start of the dial to the completed, verified handshake.
    pub handshake_rtt: Duration,
    /// False for a connection dialed from a socket of its own ([`QuicEndpoint::connect_from`]): what the peer
    /// observes of it says nothing about the node socket's NAT mapping.
    pub on_node_socket: bool,
}

/// A connection a peer dialed, handed out before the peer is authenticated so that we can answer at 0.5-RTT.
/// Nothing read from `connection` may be trusted, nor anything sent that is meant only for an authenticated
/// peer, until [`Inbound::authenticated`] has returned the peer's node id.
#[derive(Debug)]
pub struct Inbound {
    pub connection: quinn::Connection,
    pub remote: SocketAddr,
    handshake: Handshake,
}

/// The outcome of an inbound handshake: awaited from the task that watches it, then kept.
#[derive(Debug)]
enum Handshake {
    Pending(oneshot::Receiver<Result<NodeId, QuicError>>),
    Done(Result<NodeId, QuicError>),
}

impl Inbound {
    /// Waits for the handshake to finish and returns the dialer's verified node id. Fails if the dialer
    /// presented no key or a key that is not ed25519, if its handshake signature is wrong, if it did not finish
    /// within the handshake timeout (the connection is then closed), or if the connection closed first. The
    /// last case is strict on purpose: a dialer that closes its connection right after its handshake may be
    /// reported as a failure, so dialers should wait for their last stream to be read before closing.
    /// Cancel-safe, and repeated calls return the same outcome.
    pub async fn authenticated(&mut self) -> Result<NodeId, QuicError> {
        let outcome = match &mut self.handshake {
            Handshake::Done(outcome) => return outcome.clone(),
            // The watcher only goes away without answering when the runtime shuts down.
            Handshake::Pending(receiver) => receiver.await.unwrap_or(Err(QuicError::Closed)),
        };
        self.handshake = Handshake::Done(outcome.clone());
        outcome
    }
}

impl QuicEndpoint {
    /// Binds the node's one UDP socket on `addr` and starts listening. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, key: &SigningKey, limits: QuicLimits) -> Result<Self, QuicError> {
        // quinn spawns its driver and registers the socket with the current runtime, and would panic without one.
        let _runtime = tokio::runtime::Handle::try_current().map_err(|_| QuicError::NoRuntime)?;
        limits.validate()?;
        let tls = TlsIdentity::new(key)?;
        let transport = Arc::new(limits.transport_config()?);

        let mut server_base = quinn::ServerConfig::with_crypto(Arc::new(tls.server_config(tls::new_slot())?));
        server_base
            .transport_config(transport.clone())
            .migration(true)
            // Attempts beyond this many awaiting `accept` are refused by quinn itself, without handshake work.
            .max_incoming(limits.max_connections.max(1))
            .incoming_buffer_size(INCOMING_BUFFER)
            .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);

        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.supported_versions(vec![QUIC_V1]);

        let bind_error = |e| QuicError::Bind { addr, source: Arc::new(e) };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind_error)?;
        let relay_paths = Arc::new(paths::RelayPaths::default());
        let krpc = Arc::new(paths::KrpcWaiters::default());
        let socket = Arc::new(paths::PathSocket::new(
            udp.clone(),
            relay_paths.clone(),
            krpc.clone(),
            limits.reflection_rates(),
        ));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_base.clone()),
            socket.clone(),
            runtime,
        )
        .map_err(bind_error)?;

        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                tls,
                server_base,
                transport,
                limits: std::sync::RwLock::new(limits),
                relay_paths,
                udp,
                socket,
                krpc,
                closed: AtomicBool::new(false),
                admission_lock: Mutex::new(()),
                admission: Arc::default(),
            }),
        })
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        self.inner.endpoint.local_addr().map_err(|e| QuicError::Socket(Arc::new(e)))
    }

    /// The relay circuits of this endpoint's socket.
    pub fn relay_paths(&self) -> &Arc<paths::RelayPaths> {
        &self.inner.relay_paths
    }

    /// This node's id, as presented to peers.
    pub fn node_id(&self) -> NodeId {
        self.inner.tls.node_id()
    }

    /// Applies new connection, handshake and admission limits (a configuration reload); the windows,
    /// keep-alive and idle timeout stay as bound. Connections beyond a lower `max_connections` are kept; new
    /// ones are measured against it.
    pub fn set_limits(&self, new: &QuicLimits) -> Result<(), QuicError> {
        new.validate()?;
        let mut limits = self.inner.limits.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *limits = QuicLimits {
            max_connections: new.max_connections,
            handshake_timeout: new.handshake_timeout,
            inbound_handshake_timeout: new.inbound_handshake_timeout,
            max_pending_handshakes: new.max_pending_handshakes,
            retry_threshold: new.retry_threshold,
            max_unvalidated_per_ip: new.max_unvalidated_per_ip,
            reflections_per_ip: new.reflections_per_ip,
            reflection_burst: new.reflection_burst,
            reflections_per_second: new.reflections_per_second,
            ..limits.clone()
        };
        self.inner.socket.set_reflection_rates(new.reflection_rates());
        Ok(())
    }

    /// What inbound admission did so far (Retries, refusals, handshakes in progress).
    pub fn admission_stats(&self) -> AdmissionStats {
        self.inner.admission.stats()
    }

    /// Live connections, inbound and outbound, including those still handshaking or being closed.
    pub fn connection_count(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// Dials `addr` from the node's socket. Returns once the handshake is complete and the peer's key verified;
    /// with `expected`, a peer presenting another key fails the handshake with [`QuicError::WrongPeer`] before
    /// we reveal our own key to it.
    pub async fn connect(&self, addr: SocketAddr, expected: Option<NodeId>) -> Result<Outbound, QuicError> {
        self.connect_on(&self.inner.endpoint, addr, expected).await
    }

    /// Dials `addr` from `socket` instead of the node's socket, with the same identity and limits: the birthday
    /// strategy of hole punching dials from whichever of its extra sockets a probe reached. The connection
    /// keeps its own (client-only) endpoint alive for as long as it lives.
    pub async fn connect_from(
        &self,
        socket: std::net::UdpSocket,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Outbound, QuicError> {
        let local = socket.local_addr().ok();
        let bind_error = |e| QuicError::Bind {
            addr: local.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            source: Arc::new(e),
        };
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket).map_err(bind_error)?;
        // The same socket wrapper as the node's: one datagram per send, and stray probes kept from QUIC.
        let rates =
            self.inner.limits.read().unwrap_or_else(std::sync::PoisonError::into_inner).reflection_rates();
        let socket = Arc::new(paths::PathSocket::new(udp, Arc::default(), Arc::default(), rates));
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.supported_versions(vec![QUIC_V1]);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(endpoint_config, None, socket, runtime)
            .map_err(bind_error)?;
        let mut outbound = self.connect_on(&endpoint, addr, expected).await?;
        outbound.on_node_socket = false;
        Ok(outbound)
    }

    /// Sends one plain UDP datagram (not QUIC) from the node's socket; `WouldBlock` when the socket buffer
    /// is full. For the datagrams of `wire::datagram` only.
    pub fn send_datagram(&self, destination: SocketAddr, contents: &[u8]) -> std::io::Result<()> {
        let transmit =
            quinn::udp::Transmit { destination, ecn: None, contents, segment_size: None, src_ip: None };
        self.inner.udp.try_send(&transmit)
    }

    /// Where a DHT node at `dht` sees packets from the node's socket come from: a KRPC `ping` from the QUIC
    /// socket, whose reply states its source (BEP 42). Towards another port of a peer we already talk to, this
    /// tells whether our NAT maps per destination port. `None` if no reply came in time.
    pub async fn mapping_towards(&self, dht: SocketAddr) -> Option<std::net::SocketAddrV4> {
        let mut transaction_id = [0u8; 4];
        // Without randomness it stays zero: a forged reply is then easier, and costs one wrong sample.
        let _ = getrandom::fill(&mut transaction_id);
        // Marked as ours, so that the DHT node does not take our QUIC socket for a DHT node.
        let id = crate::wire::own_query_id(&transaction_id);
        let reply = self.inner.krpc.expect(dht, transaction_id);
        let ping = crate::wire::ping_query(transaction_id, &id);
        let waiting = async {
            tokio::pin!(reply);
            for _ in 0..KRPC_PING_ATTEMPTS {
                self.send_datagram(dht, &ping).ok()?;
                if let Ok(answer) = tokio::time::timeout(KRPC_PING_TIMEOUT, &mut reply).await {
                    return answer.ok();
                }
            }
            None
        };
        let observed = waiting.await;
        self.inner.krpc.forget(transaction_id);
        observed
    }

    async fn connect_on(
        &self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        expected: Option<NodeId>,
    ) -> Result<Outbound, QuicError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(QuicError::Closed);
        }
        let started = Instant::now();
        let seen = tls::new_slot();
        let mut config =
            quinn::ClientConfig::new(Arc::new(self.inner.tls.client_config(expected, seen.clone())?));
        config.transport_config(self.inner.transport.clone());
        let connecting = endpoint.connect_with(config, addr, tls::SERVER_NAME).map_err(|e| match e {
            quinn::ConnectError::EndpointStopping => QuicError::Closed,
            other => QuicError::Connect(other),
        })?;
        // On timeout the `Connecting` is dropped, which abandons the attempt.
        let handshake_timeout = self.inner.limits().handshake_timeout;
        let connection = match tokio::time::timeout(handshake_timeout, connecting).await {
            Err(_elapsed) => return Err(QuicError::TimedOut),
            Ok(Err(e)) => return Err(handshake_failure(e, expected, &seen)),
            Ok(Ok(connection)) => connection,
        };
        // The verifier already enforced this; checking the session's own record of the key guards against a
        // future change that would let a handshake complete without the verifier (such as resumption).
        let node_id = match node_id_of(&connection) {
            Ok(node_id) => node_id,
            Err(e) => {
                connection.close(CLOSE_WRONG_PEER, b"no verified peer key");
                return Err(e);
            }
        };
        if let Some(expected) = expected
            && expected != node_id
        {
            connection.close(CLOSE_WRONG_PEER, b"unexpected node id");
            return Err(QuicError::WrongPeer { expected, got: node_id });
        }
        Ok(Outbound { connection, node_id, handshake_rtt: started.elapsed(), on_node_socket: true })
    }

    /// The next inbound connection, handed out as soon as the dialer's first flight is accepted (before it is
    /// authenticated; see [`Inbound`]). An `Err` concerns one connection attempt only (refused at the connection
    /// limit, or a handshake that failed at once): keep calling. Returns `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<Inbound, QuicError>> {
        let incoming = self.inner.endpoint.accept().await?;
        if self.inner.closed.load(Ordering::Acquire) {
            incoming.refuse();
            return None;
        }
        Some(self.inner.admit(incoming))
    }

    /// Refuses new connections, closes existing ones with [`CLOSE_SHUTDOWN`], and waits briefly (at most a
    /// couple of seconds) for peers to be told.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.endpoint.set_server_config(None);
        self.inner.endpoint.close(CLOSE_SHUTDOWN, b"node shutting down");
        let _ = tokio::time::timeout(CLOSE_GRACE, self.inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    fn limits(&self) -> QuicLimits {
        self.limits.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn admit(&self, incoming: quinn::Incoming) -> Result<Inbound, QuicError> {
        let remote = incoming.remote_address();
        let seen = tls::new_slot();
        let (connecting, slot) = {
            let _admission = self.admission_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let live = self.endpoint.open_connections();
            let validated = incoming.remote_address_validated();
            let limits = self.limits().admission();
            let (decision, slot) = self.admission.admit(remote.ip(), validated, live, &limits);
            match decision {
                Decision::Accept => {}
                Decision::Retry => {
                    // Only an attempt that already answered a Retry cannot get another; those are validated
                    // and never asked to retry, so this drops nothing in practice.
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    return Err(QuicError::RetrySent);
                }
                Decision::RefuseConnectionLimit => {
                    // Refusing sends a CONNECTION_REFUSED close without any TLS work.
                    incoming.refuse();
                    self.admission.log_refusal("the connection limit is reached", limits.max_connections);
                    return Err(QuicError::Refused(format!(
                        "connection from {remote} refused: {live} connections are open and the limit is {}; \
                         raise quic.max_connections if the node should serve more peers",
                        limits.max_connections
                    )));
                }
                Decision::RefusePendingLimit => {
                    incoming.refuse();
                    self.admission
                        .log_refusal("too many handshakes are in progress", limits.max_pending_handshakes);
                    return Err(QuicError::Refused(format!(
                        "connection from {remote} refused: {} handshakes are in progress; raise \
                         quic.max_pending_handshakes if honest peers arrive in larger bursts",
                        limits.max_pending_handshakes
                    )));
                }
            }
            let mut config = self.server_base.clone();
            config.crypto = Arc::new(self.tls.server_config(seen.clone())?);
            let connecting =
                incoming.accept_with(Arc::new(config)).map_err(|e| handshake_failure(e, None, &seen))?;
            (connecting, slot)
        };
        // On the accepting side quinn always allows this; it yields the connection before the handshake has
        // completed, which is what lets the listener write at 0.5-RTT.
        let Ok((connection, handshake_done)) = connecting.into_0rtt() else {
            return Err(QuicError::Refused(format!(
                "connection from {remote} dropped: the QUIC library would not hand out the connection before \
                 its handshake completed (this is a bug, please report it)"
            )));
        };
        let watch = HandshakeWatch {
            seen,
            timeout: self.limits().inbound_handshake_timeout,
            slot,
            admission: self.admission.clone(),
        };
        let receiver = watch_handshake(connection.clone(), handshake_done, watch);
        Ok(Inbound { connection, remote, handshake: Handshake::Pending(receiver) })
    }
}

/// What the task watching an inbound handshake needs besides the connection.
struct HandshakeWatch {
    seen: SeenSlot,
    timeout: Duration,
    /// The handshake's admission slot, given back when the handshake ends either way.
    slot: Option<PendingHandshake>,
    admission: Arc<Admission>,
}

/// Watches an inbound handshake in its own task, so that the handshake timeout holds even if the caller never
/// asks for the outcome, and reports the verified node id (or why there is none).
fn watch_handshake(
    connection: quinn::Connection,
    handshake_done: quinn::ZeroRttAccepted,
    watch: HandshakeWatch,
) -> oneshot::Receiver<Result<NodeId, QuicError>> {
    let (sender, receiver) = oneshot::channel();
    let HandshakeWatch { seen, timeout, slot, admission } = watch;
    tokio::spawn(async move {
        // On the accepting side this future resolves when the handshake completes or the connection ends. Its
        // value only concerns 0-RTT data from the client (never used here), so the connection's state decides.
        let outcome = match tokio::time::timeout(timeout, handshake_done).await {
            Ok(_) => match connection.close_reason() {
                Some(e) => Err(handshake_failure(e, None, &seen)),
                None => node_id_of(&connection),
            },
            Err(_elapsed) => {
                connection.close(CLOSE_HANDSHAKE_TIMEOUT, b"handshake timed out");
                admission.count_timeout();
                Err(QuicError::TimedOut)
            }
        };
        drop(slot);
        // The caller may have dropped the `Inbound`; then nobody needs the outcome.
        let _ = sender.send(outcome);
    });
    receiver
}

/// Turns a failed handshake into the most useful error: what the verifier saw of the peer's key explains TLS
/// alerts that would otherwise be opaque.
fn handshake_failure(error: ConnectionError, expected: Option<NodeId>, seen: &SeenSlot) -> QuicError {
    match tls::read_slot(seen) {
        Some(SeenKey::NotEd25519) => return QuicError::NotEd25519,
        Some(SeenKey::Ed25519(got)) => {
            if let Some(expected) = expected
                && expected != got
            {
                return QuicError::WrongPeer { expected, got };
            }
        }
        None => {}
    }
    match error {
        ConnectionError::TimedOut => QuicError::TimedOut,
        ConnectionError::LocallyClosed => QuicError::Closed,
        ConnectionError::ConnectionClosed(close) if close.error_code == TransportErrorCode::CONNECTION_REFUSED => {
            QuicError::Refused(
                "the peer refused the connection (it is at its connection limit or shutting down); retry later"
                    .to_owned(),
            )
        }
        other => QuicError::Handshake(other),
    }
}

/// The verified node id of a connection's peer, from the key its TLS session verified. Use after the
/// handshake: on an [`Inbound`] connection, call [`Inbound::authenticated`] instead.
pub fn node_id_of(connection: &quinn::Connection) -> Result<NodeId, QuicError> {
    let identity = connection.peer_identity().ok_or(QuicError::NotAuthenticated)?;
    // quinn's rustls session reports the peer's certificates this way; with raw public keys, the only
    // "certificate" is the SubjectPublicKeyInfo.
    let keys =
        identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| QuicError::NotAuthenticated)?;
    match keys.as_slice() {
        [key] => tls::node_id_from_spki(key.as_ref()).ok_or(QuicError::NotEd25519),
        _ => Err(QuicError::NotEd25519),
    }
}
