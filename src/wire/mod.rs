//! The peer-to-peer wire format: the messages nodes exchange over QUIC (`proto/wire.proto`), how they are
//! framed on the stream, and how signed metadata records are made and checked.
//!
//! Everything here is pure code over bytes and values: no IO, no clock (callers pass the time in), and no
//! panic on any input, since all of it runs on data received from the network. The connection code owns the
//! stream and feeds it through a [`FrameDecoder`]; every record that arrives, directly or by peer exchange,
//! goes through [`verify_record`] before anything in it is used or stored.
//!
//! - Framing ([`encode_frame`], [`FrameDecoder`]): length-prefixed frames of [`pb::Envelope`] with a hard
//!   size limit, and the rules every envelope follows (request ids, required fields).
//! - Records ([`sign_record`], [`verify_record`], [`check_not_replayed`]): signing and verification of
//!   [`pb::SignedRecord`], and the replay rule.
//! - Punch offers ([`sign_punch_offer`], [`verify_punch_offer`]): what a node asks a rendezvous to pass on
//!   when it wants to hole-punch to a peer.
//! - Datagrams outside QUIC ([`reflect_request`], [`birthday_probe`]): address reflection and birthday probes
//!   for punching through endpoint-dependent NATs.
//! - Conversation helpers ([`negotiate_version`], [`build_peer_exchange_response`]).
//! - [`fuzz_decode_and_verify`], [`fuzz_datagram`]: a peer stream's receive path and the datagrams outside
//!   QUIC, each in one call over arbitrary bytes, for the fuzz targets and tests.

mod datagram;
mod frame;
mod fuzz;
mod krpc;
mod message;
mod punch;
mod record;
#[cfg(test)]
mod test_support;

pub use datagram::{
    BIRTHDAY_PROBE_BYTES, REFLECT_NONCE_BYTES, REFLECT_REQUEST_BYTES, birthday_probe, is_control_datagram,
    parse_birthday_probe, parse_reflect_reply, parse_reflect_request, reflect_reply, reflect_request,
};
pub use frame::{FrameDecoder, FrameError, encode_frame};
pub use fuzz::{fuzz_datagram, fuzz_decode_and_verify};
pub use krpc::{
    KrpcRefusal, KrpcReply, KrpcResponse, MAX_KRPC_REPLY_BYTES, announce_query, get_peers_query,
    is_own_query_id, own_query_id, parse_krpc_reply, ping_query,
};
pub use message::{build_peer_exchange_response, negotiate_version};
pub use punch::{
    MAX_PUNCH_CANDIDATES, MAX_PUNCH_OFFER_AGE, PUNCH_DOMAIN, PunchOfferError, VerifiedPunchOffer,
    punch_offer_parties, sign_punch_offer, verify_punch_offer,
};
pub use record::{
    DEFAULT_MAX_CLOCK_SKEW, RecordAddress, RecordError, VerifiedRecord, VerifyPolicy, check_not_replayed,
    parse_address, sign_record, verify_record,
};

/// Messages generated from `proto/wire.proto` (package `remote_network.wire.v1`).
#[allow(clippy::all, clippy::pedantic, clippy::nursery, missing_docs)]
pub mod pb {
    tonic::include_proto!("remote_network.wire.v1");
}

/// The wire protocol version this code speaks, sent in `Hello.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Every protocol version this code speaks, sent in `Hello.supported_versions` and the record's
/// `protocol_versions`.
pub const SUPPORTED_PROTOCOL_VERSIONS: &[u32] = &[PROTOCOL_VERSION];
/// Largest encoded [`pb::Envelope`] in one frame (the 4-byte length prefix not included).
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Largest encoded [`pb::RecordBody`] (`SignedRecord.body`) accepted or worth signing.
pub const MAX_RECORD_BYTES: usize = 8 * 1024;
/// Most topics one record may list.
pub const MAX_TOPICS_PER_RECORD: usize = 64;
/// Most addresses one record may list.
pub const MAX_ADDRESSES_PER_RECORD: usize = 32;
/// Most records in one `PeerExchangeResponse`.
pub const MAX_PEER_EXCHANGE_RECORDS: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Prefix of the bytes a record signature covers (`RECORD_DOMAIN || body`): the signature of a record can
/// then never be valid for another message signed with the same key, in this protocol or another.
pub const RECORD_DOMAIN: &[u8] = b"remote-network/metadata-record/v1\0";

/// The bytes a signature covers: `domain || body`. Each signed message type has its own domain, so that no
/// signature made for one can ever pass for another.
fn domain_separated(domain: &[u8], body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(domain.len() + body.len());
    message.extend_from_slice(domain);
    message.extend_from_slice(body);
    message
}
