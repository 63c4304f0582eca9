//! Tests of the QUIC transport over real UDP on 127.0.0.1: mutual raw-public-key authentication, refusal of peers
//! that are not remote-network nodes (hand-built rustls configs play those), 0.5-RTT timing through a delaying
//! UDP forwarder, the connection limit, timeouts and shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey as TlsSigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::*;

/// Upper bound for any single step, so that a broken test fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// A P-256 private key in PKCS#8 DER, generated for these tests with
/// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` (then `openssl pkcs8 -topk8 -nocrypt`).
/// It plays a peer whose key is not ed25519.
const P256_PKCS8: &[u8] = &[
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02, 0x01, 0x01,
    0x04, 0x20, 0x82, 0x5d, 0x61, 0x2d, 0x49, 0x09, 0x60, 0xd6, 0xa1, 0xf8, 0x1b, 0x2d, 0x43, 0x82, 0x7c,
    0x69, 0x6b, 0xe6, 0x93, 0x19, 0x5d, 0x57, 0xa6, 0x3e, 0x3f, 0x31, 0xc6, 0x26, 0x60, 0x54, 0x41, 0x37,
    0xa1, 0x44, 0x03, 0x42, 0x00, 0x04, 0x62, 0xca, 0x1d, 0xdc, 0x49, 0xef, 0x81, 0x1f, 0xfe, 0x28, 0x8a,
    0xc5, 0x3d, 0xf8, 0x35, 0xff, 0x77, 0x08, 0x11, 0x51, 0x4e, 0x8d, 0x37, 0xeb, 0x49, 0xc5, 0xf9, 0xda,
    0xeb, 0x60, 0xdb, 0x0e, 0x4d, 0x22, 0xd9, 0xe7, 0xff, 0x4c, 0x6f, 0x66, 0x52, 0xca, 0xd4, 0x2f, 0x7a,
    0xa1, 0x0c, 0x21, 0xe8, 0xf6, 0x16, 0x97, 0xd8, 0x59, 0xca, 0x35, 0x32, 0xb3, 0xc5, 0xef, 0x86, 0x24,
    0x03, 0x44,
];

/// DER prefix of an ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

fn new_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("the OS provides randomness");
    SigningKey::from_bytes(&seed)
}

fn id_of(key: &SigningKey) -> NodeId {
    NodeId(key.verifying_key().to_bytes())
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn bind(key: &SigningKey, limits: QuicLimits) -> (QuicEndpoint, SocketAddr) {
    let endpoint = QuicEndpoint::bind(loopback(), key, limits).expect("bind on loopback");
    let addr = endpoint.local_addr().expect("bound address");
    (endpoint, addr)
}

async fn accept_one(endpoint: &QuicEndpoint) -> Result<Inbound, QuicError> {
    within("accept", endpoint.accept()).await.expect("the endpoint is open")
}

// ---- Pieces for peers that are not (honest) remote-network nodes ----

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ed25519_spki(key: &SigningKey) -> CertificateDer<'static> {
    CertificateDer::from(key.verifying_key().to_public_key_der().expect("encode SPKI").as_bytes().to_vec())
}

fn ed25519_signer(key: &SigningKey) -> Arc<dyn TlsSigningKey> {
    let der = key.to_pkcs8_der().expect("encode PKCS#8");
    rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(der.as_bytes()))
        .expect("ed25519 signer")
}

fn p256_signer() -> Arc<dyn TlsSigningKey> {
    rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(P256_PKCS8)))
        .expect("P-256 signer")
}

fn p256_spki() -> CertificateDer<'static> {
    let signer = p256_signer();
    CertificateDer::from(signer.public_key().expect("P-256 public key").as_ref().to_vec())
}

/// Presents the key of `presented` but signs the handshake with `signer`: an attempt to pass as another node.
fn impostor(presented: &SigningKey, signer: &SigningKey) -> Arc<CertifiedKey> {
    Arc::new(CertifiedKey::new(vec![ed25519_spki(presented)], ed25519_signer(signer)))
}

/// A P-256 key that claims ed25519 signatures, so that rustls sends it (an honest P-256 key finds no common
/// signature scheme and sends no key at all) and our verifier gets to judge the key itself.
#[derive(Debug)]
struct MislabelledKey(Arc<dyn TlsSigningKey>);

#[derive(Debug)]
struct MislabelledSigner(Box<dyn Signer>);

impl TlsSigningKey for MislabelledKey {
    fn choose_scheme(&self, _offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let inner = self.0.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])?;
        Some(Box::new(MislabelledSigner(inner)))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

impl Signer for MislabelledSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0.sign(message)
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// A verifier that accepts any ed25519 raw key, for rogue peers that need to complete their half.
fn any_key_verifier() -> Arc<tls::PeerVerifier> {
    TlsIdentity::new(&new_key()).expect("TLS identity").verifier(None, tls::new_slot())
}

/// A client config built by hand: `client_key` None means no client authentication at all.
fn rogue_client(alpn: &[u8], client_key: Option<Arc<CertifiedKey>>) -> quinn::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(any_key_verifier());
    let mut config = match client_key {
        Some(key) => builder
            .with_client_cert_resolver(Arc::new(rustls::client::AlwaysResolvesClientRawPublicKeys::new(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(config).expect("QUIC client config")))
}

/// Dials with a hand-built config from a fresh socket. The endpoint is returned to keep it alive.
async fn rogue_dial(
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> (quinn::Endpoint, Result<quinn::Connection, quinn::ConnectionError>) {
    let endpoint = quinn::Endpoint::client(loopback()).expect("client socket");
    let connecting = endpoint.connect_with(config, addr, tls::SERVER_NAME).expect("start dial");
    let result = within("rogue dial", connecting).await;
    (endpoint, result)
}

/// A listener built by hand that presents `presented` and offers `alpn`; it accepts whatever arrives.
fn rogue_server(presented: Arc<CertifiedKey>, alpn: &[u8]) -> (quinn::Endpoint, SocketAddr) {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(any_key_verifier())
        .with_cert_resolver(Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(presented)));
    config.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicServerConfig::try_from(config).expect("QUIC server config");
    let endpoint = quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), loopback())
        .expect("rogue listener");
    let addr = endpoint.local_addr().expect("bound address");
    let acceptor = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            if let Ok(connecting) = incoming.accept() {
                tokio::spawn(async move {
                    if let Ok(connection) = connecting.await {
                        connection.closed().await;
                    }
                });
            }
        }
    });
    (endpoint, addr)
}

/// Asserts that a hand-built client was turned away: either its dial failed, or (when the client considered its
/// half done before the server judged its key) the connection is closed soon after.
async fn assert_client_turned_away(result: Result<quinn::Connection, quinn::ConnectionError>) {
    if let Ok(connection) = result {
        let reason = within("server closing the rogue connection", connection.closed()).await;
        assert!(!matches!(reason, quinn::ConnectionError::LocallyClosed), "{reason:?}");
    }
}

/// A UDP forwarder between one client and one server: every datagram is delayed by `delay` (order kept), and
/// only the first `client_budget` datagrams from the client are forwarded. Returns the address to dial.
async fn spawn_forwarder(server: SocketAddr, delay: Duration, client_budget: usize) -> SocketAddr {
    let socket = Arc::new(UdpSocket::bind(loopback()).await.expect("forwarder socket"));
    let addr = socket.local_addr().expect("forwarder address");
    let (queue, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>, SocketAddr)>();
    let sender = socket.clone();
    tokio::spawn(async move {
        // One sender in arrival order, each datagram held until its time: the delay never reorders.
        while let Some((at, datagram, to)) = due.recv().await {
            tokio::time::sleep_until(at.into()).await;
            let _ = sender.send_to(&datagram, to).await;
        }
    });
    tokio::spawn(async move {
        let mut client = None;
        let mut forwarded = 0;
        let mut buf = vec![0u8; 65536];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let to = if from == server {
                match client {
                    Some(client) => client,
                    None => continue,
                }
            } else {
                client = Some(from);
                if forwarded >= client_budget {
                    continue;
                }
                forwarded += 1;
                server
            };
            if queue.send((Instant::now() + delay, buf[..len].to_vec(), to)).is_err() {
                return;
            }
        }
    });
    addr
}

// ---- Tests ----

#[tokio::test(flavor = "multi_thread")]
async fn handshake_both_ways_identifies_both_nodes() {
    let (a_key, b_key) = (new_key(), new_key());
    let (a, a_addr) = bind(&a_key, QuicLimits::default());
    let (b, b_addr) = bind(&b_key, QuicLimits::default());
    assert_eq!(a.node_id(), id_of(&a_key));

    for (dialer, dialer_key, listener, listener_key, listener_addr) in
        [(&a, &a_key, &b, &b_key, b_addr), (&b, &b_key, &a, &a_key, a_addr)]
    {
        let listener_side = {
            let listener = listener.clone();
            tokio::spawn(async move {
                let mut inbound = accept_one(&listener).await.expect("inbound connection");
                let peer = inbound.authenticated().await.expect("dialer authenticated");
                let (mut send, mut recv) =
                    within("accept_bi", inbound.connection.accept_bi()).await.expect("stream");
                let request = recv.read_to_end(64).await.expect("request");
                send.write_all(&request).await.expect("echo");
                send.finish().expect("finish");
                // Keep the connection until the dialer has read the echo.
                let _ = within("dialer closing", inbound.connection.closed()).await;
                peer
            })
        };
        // Once with the expected id and once without: both must identify the listener.
        let expected = (listener_addr == b_addr).then(|| id_of(listener_key));
        let outbound = within("connect", dialer.connect(listener_addr, expected)).await.expect("outbound");
        assert_eq!(outbound.node_id, id_of(listener_key));
        assert_eq!(node_id_of(&outbound.connection).expect("node id"), id_of(listener_key));
        assert!(outbound.handshake_rtt > Duration::ZERO && outbound.handshake_rtt < STEP);

        let (mut send, mut recv) = outbound.connection.open_bi().await.expect("open stream");
        send.write_all(b"ping").await.expect("write");
        send.finish().expect("finish");
        assert_eq!(within("echo", recv.read_to_end(64)).await.expect("echo"), b"ping");
        outbound.connection.close(VarInt::from_u32(0), b"done");

        assert_eq!(listener_side.await.expect("listener task"), id_of(dialer_key));
    }
}

/// The default windows are smaller than the largest frame on purpose (they bound what a peer can make us buffer);
/// a largest frame must still cross, both ways, on the protocol's one stream opened by the listener.
#[tokio::test(flavor = "multi_thread")]
async fn a_largest_frame_crosses_both_ways_with_default_limits() {
    let frame_bytes = crate::wire::MAX_FRAME_BYTES + 4;
    let frame: Vec<u8> = (0..frame_bytes).map(|i| (i % 251) as u8).collect();
    let (a_key, b_key) = (new_key(), new_key());
    let (listener, listener_addr) = bind(&a_key, QuicLimits::default());
    let (dialer, _) = bind(&b_key, QuicLimits::default());

    let listener_side = {
        let frame = frame.clone();
        tokio::spawn(async move {
            let mut inbound = accept_one(&listener).await.expect("inbound connection");
            inbound.authenticated().await.expect("dialer authenticated");
            let (mut send, mut recv) = inbound.connection.open_bi().await.expect("open stream");
            within("send a largest frame", send.write_all(&frame)).await.expect("write");
            let mut echo = vec![0u8; frame.len()];
            within("read the echo", recv.read_exact(&mut echo)).await.expect("echo");
            assert!(echo == frame, "the echo differs from the frame sent");
            send.finish().expect("finish");
            let _ = within("dialer closing", inbound.connection.closed()).await;
        })
    };
    let outbound = within("connect", dialer.connect(listener_addr, None)).await.expect("outbound");
    let (mut send, mut recv) =
        within("accept_bi", outbound.connection.accept_bi()).await.expect("the listener's stream");
    let mut received = vec![0u8; frame_bytes];
    within("read a largest frame", recv.read_exact(&mut received)).await.expect("frame");
    within("echo it", send.write_all(&received)).await.expect("echo");
    send.finish().expect("finish");
    assert_eq!(within("listener done", recv.read_to_end(0)).await.expect("end of stream"), b"");
    outbound.connection.close(VarInt::from_u32(0), b"done");
    listener_side.await.expect("listener task");
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_peer_mismatch_fails_with_wrong_peer() {
    let (a_key, b_key, other) = (new_key(), new_key(), new_key());
    let (a, _) = bind(&a_key, QuicLimits::default());
    let (b, b_addr) = bind(&b_key, QuicLimits::default());
    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&b).await.expect("inbound attempt");
        inbound.authenticated().await
    });

    let result = within("connect", a.connect(b_addr, Some(id_of(&other)))).await;
    match result {
        Err(QuicError::WrongPeer { expected, got }) => {
            assert_eq!(expected, id_of(&other));
            assert_eq!(got, id_of(&b_key));
        }
        other => panic!("expected WrongPeer, got {other:?}"),
    }
    // The dialer aborted before sending its own key: the listener never learns who dialed.
    let listener_result = within("listener", listener_side).await.expect("listener task");
    assert!(listener_result.is_err(), "{listener_result:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_without_key_is_refused() {
    let (server, addr) = bind(&new_key(), QuicLimits::default());
    let listener_side = tokio::spawn(async move { accept_one(&server).await.map(|inbound| inbound.remote) });

    let (_endpoint, result) = rogue_dial(rogue_client(ALPN, None), addr).await;
    assert!(result.is_err(), "a client offering no raw public key must fail the handshake");
    // Raw keys for the client are mandatory, so its ClientHello is refused at once.
    let accepted = within("listener", listener_side).await.expect("listener task");
    assert!(matches!(accepted, Err(QuicError::Handshake(_))), "{accepted:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_with_unusable_key_sends_none_and_is_refused() {
    let (server, addr) = bind(&new_key(), QuicLimits::default());
    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&server).await.expect("inbound attempt");
        inbound.authenticated().await
    });

    // An honest P-256 key cannot sign with ed25519, the only scheme we ask for, so rustls sends an empty key.
    let key = Arc::new(CertifiedKey::new(vec![p256_spki()], p256_signer()));
    let (_endpoint, result) = rogue_dial(rogue_client(ALPN, Some(key)), addr).await;
    let authenticated = within("listener", listener_side).await.expect("listener task");
    assert!(matches!(authenticated, Err(QuicError::Handshake(_))), "{authenticated:?}");
    assert_client_turned_away(result).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_with_non_ed25519_key_is_refused() {
    let (server, addr) = bind(&new_key(), QuicLimits::default());
    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&server).await.expect("inbound attempt");
        inbound.authenticated().await
    });

    let key = Arc::new(CertifiedKey::new(vec![p256_spki()], Arc::new(MislabelledKey(p256_signer()))));
    let (_endpoint, result) = rogue_dial(rogue_client(ALPN, Some(key)), addr).await;
    let authenticated = within("listener", listener_side).await.expect("listener task");
    assert!(matches!(authenticated, Err(QuicError::NotEd25519)), "{authenticated:?}");
    assert_client_turned_away(result).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_presenting_another_nodes_key_is_refused() {
    let (victim, attacker) = (new_key(), new_key());
    let (server, addr) = bind(&new_key(), QuicLimits::default());
    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&server).await.expect("inbound attempt");
        inbound.authenticated().await
    });

    let (_endpoint, result) = rogue_dial(rogue_client(ALPN, Some(impostor(&victim, &attacker))), addr).await;
    let authenticated = within("listener", listener_side).await.expect("listener task");
    assert!(matches!(authenticated, Err(QuicError::Handshake(_))), "{authenticated:?}");
    assert_client_turned_away(result).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_presenting_another_nodes_key_is_refused() {
    let (victim, attacker) = (new_key(), new_key());
    let (_rogue, rogue_addr) = rogue_server(impostor(&victim, &attacker), ALPN);
    let (client, _) = bind(&new_key(), QuicLimits::default());

    for expected in [Some(id_of(&victim)), None] {
        let result = within("connect", client.connect(rogue_addr, expected)).await;
        assert!(matches!(result, Err(QuicError::Handshake(_))), "{result:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn alpn_mismatch_is_refused_both_ways() {
    // A dialer offering another protocol.
    let (server, addr) = bind(&new_key(), QuicLimits::default());
    let listener_side = tokio::spawn(async move { accept_one(&server).await.map(|inbound| inbound.remote) });
    let client_key = new_key();
    let key = Arc::new(CertifiedKey::new(vec![ed25519_spki(&client_key)], ed25519_signer(&client_key)));
    let (_endpoint, result) = rogue_dial(rogue_client(b"other/1", Some(key)), addr).await;
    assert!(result.is_err(), "a dialer without our ALPN must fail the handshake");
    let accepted = within("listener", listener_side).await.expect("listener task");
    assert!(matches!(accepted, Err(QuicError::Handshake(_))), "{accepted:?}");

    // A listener offering another protocol, though it presents a valid ed25519 key.
    let listener_key = new_key();
    let presented =
        Arc::new(CertifiedKey::new(vec![ed25519_spki(&listener_key)], ed25519_signer(&listener_key)));
    let (_rogue, rogue_addr) = rogue_server(presented, b"other/1");
    let (client, _) = bind(&new_key(), QuicLimits::default());
    let result = within("connect", client.connect(rogue_addr, Some(id_of(&listener_key)))).await;
    assert!(matches!(result, Err(QuicError::Handshake(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_writes_at_half_rtt_before_dialer_is_authenticated() {
    // One-way delay of the forwarder. Timeline from the dial: the ClientHello reaches the listener at D; the
    // listener's handshake flight and then its 0.5-RTT stream reach the dialer at 2D. Had the listener waited
    // for the dialer's Finished (arriving at 3D) before writing, the data would reach the dialer at 4D.
    const D: Duration = Duration::from_millis(100);
    let (client_key, server_key) = (new_key(), new_key());
    let (server, server_addr) = bind(&server_key, QuicLimits::default());
    let (client, _) = bind(&client_key, QuicLimits::default());
    let via = spawn_forwarder(server_addr, D, usize::MAX).await;

    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&server).await.expect("inbound connection");
        let (mut send, _recv) =
            inbound.connection.open_bi().await.expect("open stream before authentication");
        send.write_all(b"hello at 0.5-RTT").await.expect("write before authentication");
        send.finish().expect("finish");
        let written = Instant::now();
        let peer = inbound.authenticated().await.expect("dialer authenticated");
        (peer, written, Instant::now(), inbound)
    });

    let started = Instant::now();
    let outbound = within("connect", client.connect(via, Some(id_of(&server_key)))).await.expect("outbound");
    let (_send, mut recv) =
        within("accept_bi", outbound.connection.accept_bi()).await.expect("listener's stream");
    let data = within("read", recv.read_to_end(64)).await.expect("read");
    let read_after = started.elapsed();
    assert_eq!(data, b"hello at 0.5-RTT");

    let (peer, written, authenticated, _inbound) = listener_side.await.expect("listener task");
    assert_eq!(peer, id_of(&client_key));
    assert!(written < authenticated, "the listener wrote before the dialer was authenticated");
    assert!(outbound.handshake_rtt >= 2 * D, "the forwarder delays: {:?}", outbound.handshake_rtt);
    assert!(
        read_after < 3 * D,
        "the 0.5-RTT data should arrive with the handshake (about {:?}), took {read_after:?}",
        2 * D
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_socket_dials_and_accepts() {
    let (a_key, b_key, c_key) = (new_key(), new_key(), new_key());
    let (a, a_addr) = bind(&a_key, QuicLimits::default());
    let (b, b_addr) = bind(&b_key, QuicLimits::default());
    let (c, _) = bind(&c_key, QuicLimits::default());

    // A dials B: B sees the connection come from A's one bound address.
    let b_side = tokio::spawn(async move {
        let mut inbound = accept_one(&b).await.expect("inbound at B");
        let peer = inbound.authenticated().await.expect("A authenticated");
        (peer, inbound.remote, inbound, b)
    });
    let to_b = within("A dials B", a.connect(b_addr, Some(id_of(&b_key)))).await.expect("A to B");
    let (peer, remote, _inbound_at_b, _b) = b_side.await.expect("B task");
    assert_eq!(peer, id_of(&a_key));
    assert_eq!(remote, a_addr, "A dials from the address it listens on");

    // C dials A on that same address while A's outbound connection stays up.
    let a_side = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut inbound = accept_one(&a).await.expect("inbound at A");
            let peer = inbound.authenticated().await.expect("C authenticated");
            (peer, inbound)
        })
    };
    let to_a = within("C dials A", c.connect(a_addr, Some(id_of(&a_key)))).await.expect("C to A");
    let (peer, _inbound_at_a) = a_side.await.expect("A task");
    assert_eq!(peer, id_of(&c_key));
    assert_eq!(to_a.node_id, id_of(&a_key));
    assert!(to_b.connection.close_reason().is_none(), "the outbound connection is still open");
    assert_eq!(a.connection_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_refuses_excess_inbound() {
    let limits = QuicLimits { max_connections: 1, ..QuicLimits::default() };
    let (server, addr) = bind(&new_key(), limits);
    let (first, _) = bind(&new_key(), QuicLimits::default());
    let (second, _) = bind(&new_key(), QuicLimits::default());

    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&server).await.expect("first inbound");
        inbound.authenticated().await.expect("first dialer authenticated");
        let refused = accept_one(&server).await;
        (refused, inbound, server)
    });
    let kept = within("first dial", first.connect(addr, None)).await.expect("first connection");
    let result = within("second dial", second.connect(addr, None)).await;
    assert!(matches!(result, Err(QuicError::Refused(_))), "{result:?}");
    let (refused, _inbound, server) = listener_side.await.expect("listener task");
    assert!(matches!(refused, Err(QuicError::Refused(_))), "{refused:?}");
    assert_eq!(server.connection_count(), 1);
    assert!(kept.connection.close_reason().is_none(), "the first connection is unaffected");
}

#[tokio::test(flavor = "multi_thread")]
async fn close_ends_connections_and_accept() {
    let (a_key, b_key) = (new_key(), new_key());
    let (a, a_addr) = bind(&a_key, QuicLimits::default());
    let (b, b_addr) = bind(&b_key, QuicLimits::default());

    let b_side = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut inbound = accept_one(&b).await.expect("inbound");
            inbound.authenticated().await.expect("authenticated");
            inbound
        })
    };
    let outbound = within("connect", a.connect(b_addr, None)).await.expect("outbound");
    let _inbound = b_side.await.expect("listener task");

    within("close", b.close()).await;
    match within("peer sees the close", outbound.connection.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(close.error_code, CLOSE_SHUTDOWN),
        other => panic!("expected an application close, got {other:?}"),
    }
    assert!(within("accept after close", b.accept()).await.is_none());
    assert!(matches!(b.connect(a_addr, None).await, Err(QuicError::Closed)));
    assert_eq!(b.connection_count(), 0, "close waited for the connection to drain");
    // Nothing listens any more: a new dial fails instead of connecting.
    let limits = QuicLimits { handshake_timeout: Duration::from_secs(1), ..QuicLimits::default() };
    let (late, _) = bind(&new_key(), limits);
    assert!(within("dial a closed node", late.connect(b_addr, None)).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn dial_to_silent_address_times_out() {
    let silent = std::net::UdpSocket::bind(loopback()).expect("silent socket");
    let limits = QuicLimits { handshake_timeout: Duration::from_millis(300), ..QuicLimits::default() };
    let (client, _) = bind(&new_key(), limits);
    let started = Instant::now();
    let result = within("connect", client.connect(silent.local_addr().expect("address"), None)).await;
    assert!(matches!(result, Err(QuicError::TimedOut)), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_handshake_times_out_when_dialer_goes_silent() {
    let limits =
        QuicLimits { inbound_handshake_timeout: Duration::from_millis(500), ..QuicLimits::default() };
    let (server, server_addr) = bind(&new_key(), limits);
    let (client, _) = bind(&new_key(), QuicLimits::default());
    // Only the ClientHello gets through; the dialer's Finished never arrives.
    let via = spawn_forwarder(server_addr, Duration::ZERO, 1).await;

    let listener_side = tokio::spawn(async move {
        let mut inbound = accept_one(&server).await.expect("inbound attempt");
        let started = Instant::now();
        (inbound.authenticated().await, started.elapsed(), inbound)
    });
    // The dialer's own half completes (it has the listener's whole flight); the result does not matter here.
    let _dial =
        tokio::spawn(async move { client.connect(via, None).await.map(|outbound| outbound.connection) });

    let (authenticated, waited, inbound) = within("listener", listener_side).await.expect("listener task");
    assert!(matches!(authenticated, Err(QuicError::TimedOut)), "{authenticated:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(inbound.connection.close_reason().is_some(), "the half-open connection was closed");
}

#[test]
fn bind_outside_a_runtime_is_an_error() {
    let result = QuicEndpoint::bind(loopback(), &new_key(), QuicLimits::default());
    assert!(matches!(result, Err(QuicError::NoRuntime)), "{result:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_validated() {
    let cases = [
        QuicLimits { keep_alive: Duration::from_secs(30), ..QuicLimits::default() },
        QuicLimits { idle_timeout: Duration::ZERO, ..QuicLimits::default() },
        QuicLimits { handshake_timeout: Duration::ZERO, ..QuicLimits::default() },
        QuicLimits { inbound_handshake_timeout: Duration::ZERO, ..QuicLimits::default() },
        QuicLimits { retry_threshold: 0, ..QuicLimits::default() },
        QuicLimits { max_bi_streams: 0, ..QuicLimits::default() },
        QuicLimits { receive_window: 0, ..QuicLimits::default() },
    ];
    for limits in cases {
        let result = QuicEndpoint::bind(loopback(), &new_key(), limits.clone());
        assert!(matches!(result, Err(QuicError::InvalidLimits(_))), "{limits:?}: {result:?}");
    }
    let no_keep_alive = QuicLimits { keep_alive: Duration::ZERO, ..QuicLimits::default() };
    assert!(QuicEndpoint::bind(loopback(), &new_key(), no_keep_alive).is_ok());
}

#[test]
fn only_well_formed_ed25519_keys_make_node_ids() {
    let key = new_key();
    assert_eq!(tls::node_id_from_spki(ed25519_spki(&key).as_ref()), Some(id_of(&key)));
    assert_eq!(tls::node_id_from_spki(p256_spki().as_ref()), None);

    let mut trailing = ed25519_spki(&key).as_ref().to_vec();
    trailing.push(0);
    assert_eq!(tls::node_id_from_spki(&trailing), None);

    // The identity point (y = 1) is of small order.
    let mut weak = ED25519_SPKI_PREFIX.to_vec();
    weak.push(1);
    weak.extend_from_slice(&[0; 31]);
    assert_eq!(tls::node_id_from_spki(&weak), None);

    assert_eq!(tls::node_id_from_spki(&ED25519_SPKI_PREFIX), None);
    assert_eq!(tls::node_id_from_spki(b"not a key"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_can_dial_itself_as_a_hairpin_probe_does() {
    let key = new_key();
    let (endpoint, addr) = bind(&key, QuicLimits::default());
    let acceptor = endpoint.clone();
    let accepting = tokio::spawn(async move {
        let mut inbound = accept_one(&acceptor).await.expect("inbound");
        inbound.authenticated().await
    });
    let outbound = within("self dial", endpoint.connect(addr, Some(id_of(&key)))).await.expect("self dial");
    assert_eq!(outbound.node_id, id_of(&key));
    assert_eq!(within("accept", accepting).await.expect("task").expect("authenticated"), id_of(&key));
}
