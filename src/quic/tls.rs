//! TLS 1.3 for the QUIC transport: raw public keys (RFC 7250) in both directions, where each side's "certificate"
//! is the SubjectPublicKeyInfo of its node's ed25519 key, and our own verifiers bind the peer's node id to the key
//! that signed the handshake.
//!
//! There is no certificate authority in a peer-to-peer network: a node id IS the ed25519 public key, so the only
//! things to check are that the peer's key is ed25519, that it signed the handshake, and (when dialing a known
//! node) that it is the key we expected. Session resumption and 0-RTT are disabled so that every connection runs
//! these checks: a resumed session would skip the verifiers, and all dials share one fixed server name.

use std::sync::{Arc, Mutex};

use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature_with_raw_key};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, PeerMisbehaved,
    SignatureScheme,
};

use super::{ALPN, QuicError};
use crate::api::names::NodeId;

/// The name a dialer puts in its handshake. Peers are identified by key, not by name, but rustls still needs a
/// syntactically valid DNS name; a node id (64 hex characters) is longer than a DNS label may be, so every dial
/// uses this fixed name under the reserved `.invalid` top-level domain. SNI is not sent.
pub(super) const SERVER_NAME: &str = "peer.remote-network.invalid";

/// What a verifier learned about the key a peer presented, kept so that a failed handshake can be reported
/// precisely (wrong node, or not an ed25519 key) instead of as an opaque TLS alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SeenKey {
    Ed25519(NodeId),
    NotEd25519,
}

/// Where one connection's verifier leaves what it saw. Each connection gets its own slot (and therefore its own
/// verifier and TLS config), because rustls gives verifiers no connection context.
pub(super) type SeenSlot = Arc<Mutex<Option<SeenKey>>>;

pub(super) fn new_slot() -> SeenSlot {
    Arc::new(Mutex::new(None))
}

/// Reads a slot. A poisoned lock only means another thread panicked while holding it; the value is a plain
/// `Copy` enum, still meaningful, so it is read rather than propagating the panic.
pub(super) fn read_slot(slot: &SeenSlot) -> Option<SeenKey> {
    *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_slot(slot: &SeenSlot, seen: SeenKey) {
    *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(seen);
}

/// Parses a raw public key as sent in the handshake and derives the node id from it. Anything but a well-formed
/// ed25519 SubjectPublicKeyInfo (exact algorithm identifier, no parameters, no trailing bytes, a valid curve
/// point that is not of small order) is refused.
pub(super) fn node_id_from_spki(spki: &[u8]) -> Option<NodeId> {
    let key = VerifyingKey::from_public_key_der(spki).ok()?;
    // A small-order key lets anyone forge signatures that verify under it; no honest node has one.
    if key.is_weak() {
        return None;
    }
    Some(NodeId(key.to_bytes()))
}

/// The node's TLS identity and the crypto provider, built once per endpoint; per-connection configs are cheap
/// assemblies of these shared parts.
pub(super) struct TlsIdentity {
    provider: Arc<CryptoProvider>,
    certified_key: Arc<CertifiedKey>,
    node_id: NodeId,
}

impl TlsIdentity {
    pub(super) fn new(key: &SigningKey) -> Result<Self, QuicError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pkcs8 = key
            .to_pkcs8_der()
            .map_err(|e| QuicError::Key(format!("cannot encode the private key as PKCS#8: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()))
            .map_err(|e| QuicError::Key(format!("the TLS library refused the ed25519 private key: {e}")))?;
        let spki = key.verifying_key().to_public_key_der().map_err(|e| {
            QuicError::Key(format!("cannot encode the public key as SubjectPublicKeyInfo: {e}"))
        })?;
        // rustls cannot check a raw key against its signer itself (`keys_match` expects X.509), so compare the
        // SubjectPublicKeyInfo the signer derives with the one we present: a mismatch would make every handshake
        // fail on the peer's side with an unhelpful signature error.
        match signer.public_key() {
            Some(derived) if derived.as_ref() == spki.as_bytes() => {}
            _ => {
                return Err(QuicError::Key(
                    "the TLS signer's public key does not match the node's public key".to_owned(),
                ));
            }
        }
        let certified_key =
            Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki.as_bytes().to_vec())], signer));
        Ok(Self { provider, certified_key, node_id: NodeId(key.verifying_key().to_bytes()) })
    }

    pub(super) fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub(super) fn verifier(&self, expected: Option<NodeId>, seen: SeenSlot) -> Arc<PeerVerifier> {
        Arc::new(PeerVerifier { algorithms: self.provider.signature_verification_algorithms, expected, seen })
    }

    /// The dialing side of one connection: presents our raw key, accepts only an ed25519 raw key from the
    /// server, and (with `expected`) only that key.
    pub(super) fn client_config(
        &self,
        expected: Option<NodeId>,
        seen: SeenSlot,
    ) -> Result<QuicClientConfig, QuicError> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Key(format!("the TLS library refused TLS 1.3 with ring: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier(expected, seen))
            .with_client_cert_resolver(Arc::new(rustls::client::AlwaysResolvesClientRawPublicKeys::new(
                self.certified_key.clone(),
            )));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_early_data = false;
        config.enable_sni = false;
        QuicClientConfig::try_from(config)
            .map_err(|e| QuicError::Key(format!("the TLS configuration is unusable for QUIC: {e}")))
    }

    /// The accepting side of one connection: presents our raw key and requires an ed25519 raw key from the
    /// client (client authentication is mandatory).
    pub(super) fn server_config(&self, seen: SeenSlot) -> Result<QuicServerConfig, QuicError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Key(format!("the TLS library refused TLS 1.3 with ring: {e}")))?
            .with_client_cert_verifier(self.verifier(None, seen))
            .with_cert_resolver(Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(
                self.certified_key.clone(),
            )));
        config.alpn_protocols = vec![ALPN.to_vec()];
        // No tickets and no session cache: resumption would skip client authentication's verifier, and 0-RTT
        // data from a client would arrive before anyone is authenticated. QUIC requires 0 (or u32::MAX) here.
        config.max_early_data_size = 0;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        QuicServerConfig::try_from(config)
            .map_err(|e| QuicError::Key(format!("the TLS configuration is unusable for QUIC: {e}")))
    }
}

/// Verifies a peer's raw public key and handshake signature, for either role. Only ed25519 is accepted.
#[derive(Debug)]
pub(super) struct PeerVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    /// When dialing a known node: the only key we accept.
    expected: Option<NodeId>,
    seen: SeenSlot,
}

impl PeerVerifier {
    /// Checks the presented key (the "end entity" is a SubjectPublicKeyInfo because raw public keys were
    /// negotiated) and records what it was.
    fn check_key(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), TlsError> {
        // A raw public key is a single key; anything chained to it is meaningless.
        if !intermediates.is_empty() {
            write_slot(&self.seen, SeenKey::NotEd25519);
            return Err(TlsError::InvalidCertificate(CertificateError::BadEncoding));
        }
        let Some(got) = node_id_from_spki(end_entity.as_ref()) else {
            write_slot(&self.seen, SeenKey::NotEd25519);
            return Err(TlsError::InvalidCertificate(CertificateError::BadEncoding));
        };
        write_slot(&self.seen, SeenKey::Ed25519(got));
        match self.expected {
            Some(expected) if expected != got => {
                Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(()),
        }
    }

    fn check_signature(
        &self,
        message: &[u8],
        key: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // We advertise only ed25519; a peer signing with anything else is not following the protocol.
        if dss.scheme != SignatureScheme::ED25519 || node_id_from_spki(key.as_ref()).is_none() {
            return Err(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
        }
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(key.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.check_key(end_entity, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // Only TLS 1.3 is configured, so this is unreachable through rustls; refuse rather than trust.
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.check_key(end_entity, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}
