//! Why an exchange, a punch or a relay circuit failed, as types a caller can match on: the control API maps
//! them to gRPC status codes in one place (`control::peers`), counters label them with [`ExchangeError::reason`].

use std::fmt;

use crate::api::names::NodeId;
use crate::quic::QuicError;
use crate::wire;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("QUIC: {0}")]
    Quic(#[from] QuicError),
    #[error("frame: {0}")]
    Frame(wire::FrameError),
    #[error("record rejected: {0}")]
    Record(#[from] wire::RecordError),
    #[error("record rejected: seq {seq} is lower than the stored {stored} (a replay)")]
    Replay { seq: u64, stored: u64 },
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    #[error("timed out: {0}")]
    TimedOut(&'static str),
    #[error("the peer broke the protocol: {0}")]
    Protocol(#[from] ProtocolViolation),
    #[error("the peer answered with an error: {0}")]
    Remote(PeerRefusal),
    #[error("the session is closed")]
    SessionClosed,
    #[error("too many requests are waiting on this session")]
    Busy,
    #[error("that address is this node itself")]
    SelfConnection,
    #[error("no connection to {0} and no stored address answered")]
    Unreachable(NodeId),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the node is stopping")]
    Stopping,
    #[error("a dial-back we asked for (not a session)")]
    DialBack,
    #[error("hole punch failed: {0}")]
    Punch(#[from] PunchError),
    #[error("relay failed: {0}")]
    Relay(#[from] RelayError),
    /// Every way to a known peer failed: its stored addresses (if any), then a punch and a relay.
    #[error("{}", traversal(*.addresses, .punch, .relay))]
    NotReached { addresses: usize, punch: Box<ExchangeError>, relay: Box<ExchangeError> },
}

/// How [`ExchangeError::NotReached`] reads: what was tried, in order.
fn traversal(addresses: usize, punch: &ExchangeError, relay: &ExchangeError) -> String {
    match addresses {
        0 => format!("{punch}; {relay}"),
        1 => format!("its stored address did not answer; {punch}; {relay}"),
        n => format!("none of its {n} stored addresses answered; {punch}; {relay}"),
    }
}

impl ExchangeError {
    /// A short, stable label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Quic(_) => "quic",
            Self::Frame(_) | Self::Protocol(_) => "protocol",
            Self::Record(_) => "verification",
            Self::Replay { .. } => "replay",
            Self::Stream(_) | Self::SessionClosed => "stream",
            Self::TimedOut(_) => "timeout",
            Self::Remote(_) => "remote",
            Self::Busy => "busy",
            Self::SelfConnection => "self",
            Self::Unreachable(_) | Self::NotReached { .. } => "unreachable",
            Self::Store(_) => "store",
            Self::Stopping => "stopping",
            Self::DialBack => "dial-back",
            Self::Punch(_) => "punch",
            Self::Relay(_) => "relay",
        }
    }
}

/// A stream of a session that could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("opening a stream: {0}")]
    Open(#[source] quinn::ConnectionError),
    #[error("accepting a stream: {0}")]
    Accept(#[source] quinn::ConnectionError),
    #[error("reading: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing: {0}")]
    Write(#[source] quinn::WriteError),
}

impl StreamError {
    /// A failed read of a QUIC stream (quinn's error says whether the peer reset it or the connection ended).
    pub fn read(error: impl Into<std::io::Error>) -> Self {
        Self::Read(error.into())
    }
}

/// A message that breaks the wire protocol (`proto/wire.proto`).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolViolation {
    #[error("answered {request} with another message")]
    UnexpectedAnswer { request: &'static str },
    #[error("{message} without {field}")]
    MissingField { message: &'static str, field: &'static str },
    #[error("the first message was not a Hello")]
    NoHello,
    #[error("a stream opened with an unexpected message")]
    UnexpectedStream,
    #[error("circuit setup frame of {len} bytes, more than {max}")]
    CircuitFrameTooLarge { len: usize, max: usize },
    #[error("circuit setup frame: {0}")]
    CircuitFrame(#[source] prost::DecodeError),
}

/// What a peer said when it refused a request (an `ErrorResponse`, or a circuit or reservation refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRefusal {
    /// The peer's own words, as sent.
    pub message: String,
}

impl fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl ExchangeError {
    /// The peer refused with `message`.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::Remote(PeerRefusal { message: message.into() })
    }
}

/// Why a hole punch did not connect.
#[derive(Debug, thiserror::Error)]
pub enum PunchError {
    #[error("no connected peer can introduce us (no rendezvous)")]
    NoRendezvous,
    #[error("the peer offered no address we can dial")]
    NoDialableAddress,
    #[error("no connection within {window_secs} s")]
    NoConnection { window_secs: u64 },
    #[error("no connection within {window_secs} s (last dial: {last_dial})")]
    LastDialFailed { window_secs: u64, last_dial: Box<ExchangeError> },
    /// Every rendezvous failed to introduce us; the last one's failure.
    #[error("rendezvous {rendezvous}: {failure}")]
    Introduction { rendezvous: NodeId, failure: IntroductionFailure },
    #[error("the birthday socket could not be used: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the punch task ended: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Why a rendezvous did not introduce us.
#[derive(Debug, thiserror::Error)]
pub enum IntroductionFailure {
    #[error("answered with another message")]
    UnexpectedAnswer,
    #[error("{0}")]
    Request(Box<ExchangeError>),
    #[error("the answer echoed another nonce")]
    WrongNonce,
    #[error("the answer was refused: {0}")]
    BadOffer(#[source] wire::PunchOfferError),
}

/// Why no relay carried a circuit.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no connected peer relays for it")]
    NoRelay,
    /// The last relay tried, and why it did not carry the circuit.
    #[error("relay {relay}: {failure}")]
    Circuit { relay: NodeId, failure: Box<ExchangeError> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_not_reached_says_what_was_tried_in_order() {
        let punch = ExchangeError::from(PunchError::Introduction {
            rendezvous: NodeId([7; 32]),
            failure: IntroductionFailure::WrongNonce,
        });
        let relay = ExchangeError::from(RelayError::NoRelay);
        let error =
            ExchangeError::NotReached { addresses: 2, punch: Box::new(punch), relay: Box::new(relay) };
        assert_eq!(
            error.to_string(),
            format!(
                "none of its 2 stored addresses answered; hole punch failed: rendezvous {}: the answer echoed \
                 another nonce; relay failed: no connected peer relays for it",
                NodeId([7; 32])
            )
        );
        assert_eq!(error.reason(), "unreachable");
        // Callers can tell the causes apart without reading the text.
        let ExchangeError::NotReached { punch, .. } = error else { unreachable!() };
        assert!(matches!(*punch, ExchangeError::Punch(PunchError::Introduction { .. })));
    }

    #[test]
    fn a_refusal_is_the_peers_own_words() {
        let error = ExchangeError::refused("no reservation with you");
        assert_eq!(error.to_string(), "the peer answered with an error: no reservation with you");
        let violation =
            ExchangeError::from(ProtocolViolation::MissingField { message: "Hello", field: "record" });
        assert_eq!(violation.to_string(), "the peer broke the protocol: Hello without record");
    }
}
