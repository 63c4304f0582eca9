//! Errors of the QUIC transport, with messages that say what happened and what the operator or caller can do.
//!
//! Errors are `Clone` so that the outcome of an inbound handshake can be kept and returned again by repeated
//! calls to `Inbound::authenticated`; I/O errors are shared behind an `Arc` for that reason.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::api::names::NodeId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum QuicError {
    #[error(
        "cannot bind the QUIC UDP socket to {addr}: {source}; choose another address or port, or stop the \
         program holding it"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },

    #[error(
        "the QUIC endpoint must be created inside a tokio runtime; call QuicEndpoint::bind from async code"
    )]
    NoRuntime,

    #[error("invalid QUIC limits: {0}")]
    InvalidLimits(String),

    #[error("cannot use the node's ed25519 key for TLS: {0}; check or regenerate the node's identity file")]
    Key(String),

    #[error("cannot read the QUIC socket's local address: {0}")]
    Socket(#[source] Arc<io::Error>),

    #[error(
        "cannot start a QUIC connection: {0}; check the peer address (a reachable unicast address of the same \
         IP family as the local bind address)"
    )]
    Connect(#[source] quinn::ConnectError),

    #[error(
        "QUIC handshake failed: {0}; the peer may not be a remote-network node, may run an incompatible \
         version (ALPN remote-network/1), or may have dropped the connection"
    )]
    Handshake(#[source] quinn::ConnectionError),

    #[error(
        "the peer at this address is node {got}, not the expected {expected}; the address now belongs to \
         another node: look the expected node up again"
    )]
    WrongPeer { expected: NodeId, got: NodeId },

    #[error(
        "the peer's key is not a valid ed25519 public key; only remote-network nodes, which present their \
         ed25519 node key as a raw public key, can connect"
    )]
    NotEd25519,

    #[error("connection refused: {0}")]
    Refused(String),

    /// Not a failure: the attempt was asked to prove its address (QUIC Retry) and may come back validated.
    #[error("the connection attempt was sent a QUIC Retry to validate its address")]
    RetrySent,

    #[error(
        "the QUIC handshake did not complete in time; the peer may be offline, unreachable or behind a NAT \
         that drops unsolicited packets: try another address or retry later"
    )]
    TimedOut,

    #[error("the QUIC endpoint is closed because the node is shutting down")]
    Closed,

    #[error(
        "the connection has no verified peer key yet; wait for the handshake to complete \
         (Inbound::authenticated) before asking for the peer's node id"
    )]
    NotAuthenticated,
}
