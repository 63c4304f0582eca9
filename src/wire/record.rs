//! Signed metadata records: how a node signs its [`pb::RecordBody`], and every rule a received
//! [`pb::SignedRecord`] must pass before anything in it is believed.
//!
//! A record is checked on the exact bytes received (`SignedRecord.body`), which are then decoded; nothing is
//! ever re-encoded to be checked, so the non-canonical protobuf encoding is never a problem. The signature
//! covers `RECORD_DOMAIN || body` (see [`RECORD_DOMAIN`]).

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;

use super::{
    MAX_ADDRESSES_PER_RECORD, MAX_RECORD_BYTES, MAX_TOPICS_PER_RECORD, RECORD_DOMAIN, SIGNATURE_BYTES, pb,
};
use crate::api::names::{NODE_ID_LEN, NameError, NodeId, validate_topic};

/// How far in the future a record's timestamp may be, by default: clocks of well-run machines agree within
/// seconds, but many nodes run on machines whose clocks are not that well run.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(10 * 60);

/// Longest text from a record quoted in an error message: enough to recognise it in a log, without letting a
/// peer write kilobytes into our logs.
const QUOTE_MAX_CHARS: usize = 80;

/// The time-dependent rules of [`verify_record`]. The caller passes the time in, so verification is
/// reproducible and testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// The verifier's current time, in milliseconds since the Unix epoch.
    pub now_ms: i64,
    /// Records timestamped more than this after `now_ms` are refused: a node could otherwise publish a
    /// record that stays "newest" long after it stops being true.
    pub max_clock_skew: Duration,
    /// Records timestamped more than this before `now_ms` are refused; `None` accepts any age (for records
    /// read back from our own store, whose age is judged elsewhere).
    pub max_age: Option<Duration>,
}

impl VerifyPolicy {
    /// The default policy at `now_ms`: [`DEFAULT_MAX_CLOCK_SKEW`] and no age limit.
    #[must_use]
    pub fn at(now_ms: i64) -> Self {
        Self { now_ms, max_clock_skew: DEFAULT_MAX_CLOCK_SKEW, max_age: None }
    }
}

/// A record that passed every rule of [`verify_record`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRecord {
    /// The node the record describes and that signed it.
    pub node_id: NodeId,
    /// `body.seq`, never 0.
    pub seq: u64,
    /// `body.timestamp_ms`, positive and within the policy's window.
    pub timestamp_ms: i64,
    /// The decoded body. Fields unknown to this version are not in it: store and forward `signed`.
    pub body: pb::RecordBody,
    /// The record exactly as received: what to store and to relay in peer exchange.
    pub signed: pb::SignedRecord,
    /// `body.addresses`, parsed (each one was checked by [`parse_address`]).
    pub addresses: Vec<RecordAddress>,
}

/// One address a record states, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAddress {
    pub address: SocketAddr,
    /// `ADDRESS_KIND_RELAY`: not the node's own address but a peer to ask for an introduction to it.
    pub rendezvous: bool,
}

impl RecordAddress {
    fn parse(address: &pb::Address) -> Result<Self, &'static str> {
        Ok(Self {
            address: parse_address(&address.address)?,
            rendezvous: address.kind == pb::AddressKind::Relay as i32,
        })
    }

    /// The addresses of a body that was verified before (a stored record, our own), parsed again; any that
    /// does not parse is left out.
    pub fn all_of(body: &pb::RecordBody) -> Vec<Self> {
        body.addresses.iter().filter_map(|address| Self::parse(address).ok()).collect()
    }
}

/// Why a record was refused: one variant per rule, each naming the rule and the values that broke it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record body is {len} bytes, more than the limit of {max} bytes")]
    BodyTooLarge { len: usize, max: usize },
    #[error("record signature is {len} bytes; an ed25519 signature is exactly {SIGNATURE_BYTES} bytes")]
    SignatureLength { len: usize },
    #[error("record body is not a valid encoded RecordBody: {0}")]
    Decode(prost::DecodeError),
    #[error(
        "record node id is {len} bytes; a node id is an ed25519 public key of exactly {NODE_ID_LEN} bytes"
    )]
    NodeIdLength { len: usize },
    #[error(
        "record node id {node_id} is not a usable ed25519 public key (not a point on the curve, or of small \
         order)"
    )]
    InvalidNodeKey { node_id: NodeId },
    #[error(
        "record is signed for node {claimed} but the TLS handshake authenticated {authenticated}: a node may \
         only present its own record"
    )]
    /// Impersonation: the node at the other end of a connection presenting another node's record as its own.
    NodeIdMismatch { claimed: NodeId, authenticated: NodeId },
    #[error(
        "record signature does not verify against node id {node_id}: the record was altered or not signed \
         by that node"
    )]
    BadSignature { node_id: NodeId },
    #[error("record of node {node_id} has seq 0; a record's seq starts at 1")]
    ZeroSeq { node_id: NodeId },
    #[error(
        "record of node {node_id} has timestamp {timestamp_ms} ms; a record's timestamp must be positive"
    )]
    MissingTimestamp { node_id: NodeId, timestamp_ms: i64 },
    #[error(
        "record of node {node_id} is timestamped {timestamp_ms} ms, more than {max_skew:?} after our clock \
         ({now_ms} ms); check the clocks of both machines"
    )]
    FromTheFuture { node_id: NodeId, timestamp_ms: i64, now_ms: i64, max_skew: Duration },
    #[error(
        "record of node {node_id} is timestamped {timestamp_ms} ms, more than {max_age:?} before our clock \
         ({now_ms} ms)"
    )]
    TooOld { node_id: NodeId, timestamp_ms: i64, now_ms: i64, max_age: Duration },
    #[error("record of node {node_id} lists {count} topics, more than the limit of {max}")]
    TooManyTopics { node_id: NodeId, count: usize, max: usize },
    /// `topic` is quoted from the record, shortened if long.
    #[error("record of node {node_id} has an invalid topic at index {index} ({topic:?}): {rule}")]
    Topic { node_id: NodeId, index: usize, topic: String, rule: NameError },
    #[error("record of node {node_id} lists {count} addresses, more than the limit of {max}")]
    TooManyAddresses { node_id: NodeId, count: usize, max: usize },
    #[error(
        "record of node {node_id} has an invalid address at index {index} ({address:?}): {reason}; an \
         address is host:port with a literal IP host (IPv6 in brackets) and a port from 1 to 65535"
    )]
    /// `address` is quoted from the record, shortened if long; `reason` is the part of the rule it breaks.
    Address { node_id: NodeId, index: usize, address: String, reason: &'static str },
    #[error("record of node {node_id} names DHT port {port}; a port is at most 65535")]
    DhtPort { node_id: NodeId, port: u32 },
    #[error(
        "record seq {seq} is lower than seq {stored} already held for this node: an old record replayed, \
         or a node that lost its persisted seq"
    )]
    Replay { seq: u64, stored: u64 },
}

/// Signs `body` with `key`. The caller sets `body.node_id` to `key`'s public key (otherwise nobody will
/// accept the record) and `body.seq` above every seq it signed before.
#[must_use]
pub fn sign_record(body: &pb::RecordBody, key: &SigningKey) -> pb::SignedRecord {
    let body = body.encode_to_vec();
    let signature = key.sign(&signed_message(&body));
    pb::SignedRecord { body, signature: signature.to_bytes().to_vec() }
}

/// The bytes a record signature covers: the domain prefix, then the encoded body.
fn signed_message(body: &[u8]) -> Vec<u8> {
    super::domain_separated(RECORD_DOMAIN, body)
}

/// Checks every rule a received record must pass, and returns it decoded.
///
/// `expected` is the node id authenticated by the TLS handshake when the record comes from the node itself
/// (Hello, GetRecordResponse): the record must be that node's. It is `None` for records relayed by peer
/// exchange, which are trusted for their signature alone.
///
/// Order of the checks: sizes, decoding and the node key first, since they cost little next to a signature
/// check and everything after needs them; then the impersonation check, then the signature. The content rules (seq, timestamp, topics,
/// addresses) come after the signature on purpose: checking them first would save no work against an
/// attacker, who can always send a forged record with valid content, while checking them after makes every
/// content error the signer's own, so it can be blamed on the signing node rather than on whoever relayed it.
pub fn verify_record(
    signed: &pb::SignedRecord,
    expected: Option<NodeId>,
    policy: &VerifyPolicy,
) -> Result<VerifiedRecord, RecordError> {
    if signed.body.len() > MAX_RECORD_BYTES {
        return Err(RecordError::BodyTooLarge { len: signed.body.len(), max: MAX_RECORD_BYTES });
    }
    let signature: [u8; SIGNATURE_BYTES] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| RecordError::SignatureLength { len: signed.signature.len() })?;

    let body = pb::RecordBody::decode(signed.body.as_slice()).map_err(RecordError::Decode)?;

    let key_bytes: [u8; NODE_ID_LEN] = body
        .node_id
        .as_slice()
        .try_into()
        .map_err(|_| RecordError::NodeIdLength { len: body.node_id.len() })?;
    let node_id = NodeId(key_bytes);
    // Small-order keys are refused here rather than left to `verify_strict`, which refuses them too, so that
    // the error says what is wrong with the key instead of blaming the signature.
    let key = VerifyingKey::from_bytes(&key_bytes)
        .ok()
        .filter(|key| !key.is_weak())
        .ok_or(RecordError::InvalidNodeKey { node_id })?;

    if let Some(authenticated) = expected
        && authenticated != node_id
    {
        return Err(RecordError::NodeIdMismatch { claimed: node_id, authenticated });
    }

    key.verify_strict(&signed_message(&signed.body), &Signature::from_bytes(&signature))
        .map_err(|_| RecordError::BadSignature { node_id })?;

    let addresses = check_content(node_id, &body, policy)?;

    Ok(VerifiedRecord {
        node_id,
        seq: body.seq,
        timestamp_ms: body.timestamp_ms,
        body,
        signed: signed.clone(),
        addresses,
    })
}

/// The rules on what a (correctly signed) record says; returns its addresses, parsed.
fn check_content(
    node_id: NodeId,
    body: &pb::RecordBody,
    policy: &VerifyPolicy,
) -> Result<Vec<RecordAddress>, RecordError> {
    if body.seq == 0 {
        return Err(RecordError::ZeroSeq { node_id });
    }

    let timestamp_ms = body.timestamp_ms;
    if timestamp_ms <= 0 {
        return Err(RecordError::MissingTimestamp { node_id, timestamp_ms });
    }
    // Saturating arithmetic: `now_ms` and the durations come from the caller, but a peer's timestamp may be
    // anything, and neither may overflow.
    let latest_ms = policy.now_ms.saturating_add(duration_ms(policy.max_clock_skew));
    if timestamp_ms > latest_ms {
        return Err(RecordError::FromTheFuture {
            node_id,
            timestamp_ms,
            now_ms: policy.now_ms,
            max_skew: policy.max_clock_skew,
        });
    }
    if let Some(max_age) = policy.max_age
        && policy.now_ms.saturating_sub(timestamp_ms) > duration_ms(max_age)
    {
        return Err(RecordError::TooOld { node_id, timestamp_ms, now_ms: policy.now_ms, max_age });
    }

    if body.topics.len() > MAX_TOPICS_PER_RECORD {
        return Err(RecordError::TooManyTopics {
            node_id,
            count: body.topics.len(),
            max: MAX_TOPICS_PER_RECORD,
        });
    }
    for (index, topic) in body.topics.iter().enumerate() {
        validate_topic(topic).map_err(|rule| RecordError::Topic {
            node_id,
            index,
            topic: quote(topic),
            rule,
        })?;
    }

    if body.addresses.len() > MAX_ADDRESSES_PER_RECORD {
        return Err(RecordError::TooManyAddresses {
            node_id,
            count: body.addresses.len(),
            max: MAX_ADDRESSES_PER_RECORD,
        });
    }
    let addresses = body
        .addresses
        .iter()
        .enumerate()
        .map(|(index, address)| {
            RecordAddress::parse(address).map_err(|reason| RecordError::Address {
                node_id,
                index,
                address: quote(&address.address),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if u16::try_from(body.dht_port).is_err() {
        return Err(RecordError::DhtPort { node_id, port: body.dht_port });
    }
    Ok(addresses)
}

/// Parses an address in its wire form (`Address.address`, `Hello.observed_address`): `host:port` with a
/// literal IP host, IPv6 in brackets. The port 0 and the unspecified IPs (`0.0.0.0`, `::`) are refused since
/// nothing can be reached there. The error is the rule that was broken, for messages.
pub fn parse_address(text: &str) -> Result<SocketAddr, &'static str> {
    let address: SocketAddr = text.parse().map_err(|_| "not an IP address and port")?;
    if address.port() == 0 {
        return Err("port 0");
    }
    if address.ip().is_unspecified() {
        return Err("unspecified IP address");
    }
    Ok(address)
}

/// Checks a newly verified record against the seq of the record already held for the same node: a lower seq
/// is an old record being replayed and is refused; an equal seq is the same record refreshed and is allowed.
pub fn check_not_replayed(seq: u64, stored_seq: Option<u64>) -> Result<(), RecordError> {
    match stored_seq {
        Some(stored) if seq < stored => Err(RecordError::Replay { seq, stored }),
        _ => Ok(()),
    }
}

/// A duration in whole milliseconds, saturating at `i64::MAX`.
fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// At most [`QUOTE_MAX_CHARS`] characters of `text`, marked when shortened.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::pb::Address;
    use super::super::test_support::{NOW_MS, node_id_of, sample_body, test_key};
    use super::*;

    fn verify(signed: &pb::SignedRecord, expected: Option<NodeId>) -> Result<VerifiedRecord, RecordError> {
        verify_record(signed, expected, &VerifyPolicy::at(NOW_MS))
    }

    fn signed_with(edit: impl FnOnce(&mut pb::RecordBody)) -> pb::SignedRecord {
        let key = test_key(1);
        let mut body = sample_body(&key, 1, NOW_MS);
        edit(&mut body);
        sign_record(&body, &key)
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let key = test_key(1);
        let body = sample_body(&key, 7, NOW_MS - 1000);
        let signed = sign_record(&body, &key);
        let verified = verify(&signed, Some(node_id_of(&key))).expect("a fresh record verifies");
        assert_eq!(verified.node_id, node_id_of(&key));
        assert_eq!(verified.seq, 7);
        assert_eq!(verified.timestamp_ms, NOW_MS - 1000);
        assert_eq!(verified.body, body);
        assert_eq!(verified.signed, signed);
        // Relayed records have no expected id.
        assert!(verify(&signed, None).is_ok());
    }

    #[test]
    fn any_one_bit_flip_in_body_or_signature_is_refused() {
        // A small body: every flip that still decodes costs a signature check, slow in unoptimised builds.
        let signed = signed_with(|b| {
            b.topics.truncate(1);
            b.addresses.truncate(1);
            b.capabilities = None;
        });
        for byte in 0..signed.body.len() {
            for bit in 0..8 {
                let mut altered = signed.clone();
                altered.body[byte] ^= 1 << bit;
                assert!(verify(&altered, None).is_err(), "body byte {byte} bit {bit} flipped was accepted");
            }
        }
        for byte in 0..signed.signature.len() {
            for bit in 0..8 {
                let mut altered = signed.clone();
                altered.signature[byte] ^= 1 << bit;
                assert!(
                    verify(&altered, None).is_err(),
                    "signature byte {byte} bit {bit} flipped was accepted"
                );
            }
        }
    }

    #[test]
    fn record_signed_by_one_key_claiming_another_node_is_refused() {
        let signer = test_key(1);
        let victim = test_key(2);
        let mut body = sample_body(&signer, 1, NOW_MS);
        body.node_id = victim.verifying_key().to_bytes().to_vec();
        let forged = sign_record(&body, &signer);
        assert_eq!(verify(&forged, None), Err(RecordError::BadSignature { node_id: node_id_of(&victim) }));
    }

    #[test]
    fn record_of_another_node_than_the_authenticated_one_is_refused() {
        let signed = signed_with(|_| {});
        let authenticated = node_id_of(&test_key(2));
        let err = verify(&signed, Some(authenticated)).unwrap_err();
        assert_eq!(err, RecordError::NodeIdMismatch { claimed: node_id_of(&test_key(1)), authenticated });
        let text = err.to_string();
        assert!(
            text.contains(&node_id_of(&test_key(1)).to_string()) && text.contains(&authenticated.to_string())
        );
    }

    #[test]
    fn signature_without_the_domain_prefix_is_refused() {
        let key = test_key(1);
        let body = sample_body(&key, 1, NOW_MS).encode_to_vec();
        let signature = key.sign(&body).to_bytes().to_vec();
        let undomained = pb::SignedRecord { body, signature };
        assert_eq!(verify(&undomained, None), Err(RecordError::BadSignature { node_id: node_id_of(&key) }));
    }

    #[test]
    fn unknown_fields_are_signed_and_kept_in_the_received_bytes() {
        let key = test_key(1);
        let mut body = sample_body(&key, 1, NOW_MS).encode_to_vec();
        // Field 99, varint 5: what a newer node could add.
        body.extend_from_slice(&[0x98, 0x06, 0x05]);
        let signature = key.sign(&signed_message(&body)).to_bytes().to_vec();
        let signed = pb::SignedRecord { body, signature };
        let verified = verify(&signed, None).expect("unknown fields do not break verification");
        assert_eq!(verified.signed, signed);
    }

    #[test]
    fn replay_is_refused_and_refresh_allowed() {
        assert_eq!(check_not_replayed(4, Some(5)), Err(RecordError::Replay { seq: 4, stored: 5 }));
        assert_eq!(check_not_replayed(5, Some(5)), Ok(()));
        assert_eq!(check_not_replayed(6, Some(5)), Ok(()));
        assert_eq!(check_not_replayed(1, None), Ok(()));
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let skew_ms = duration_ms(DEFAULT_MAX_CLOCK_SKEW);
        assert!(verify(&signed_with(|b| b.timestamp_ms = NOW_MS + skew_ms), None).is_ok());
        assert!(matches!(
            verify(&signed_with(|b| b.timestamp_ms = NOW_MS + skew_ms + 1), None),
            Err(RecordError::FromTheFuture { .. })
        ));
        assert!(matches!(
            verify(&signed_with(|b| b.timestamp_ms = 0), None),
            Err(RecordError::MissingTimestamp { timestamp_ms: 0, .. })
        ));
        assert!(matches!(
            verify(&signed_with(|b| b.timestamp_ms = i64::MIN), None),
            Err(RecordError::MissingTimestamp { .. })
        ));

        let hour = Duration::from_secs(3600);
        let policy = VerifyPolicy { max_age: Some(hour), ..VerifyPolicy::at(NOW_MS) };
        let hour_ms = duration_ms(hour);
        assert!(verify_record(&signed_with(|b| b.timestamp_ms = NOW_MS - hour_ms), None, &policy).is_ok());
        assert!(matches!(
            verify_record(&signed_with(|b| b.timestamp_ms = NOW_MS - hour_ms - 1), None, &policy),
            Err(RecordError::TooOld { .. })
        ));
        // Extreme policies must not overflow.
        let extreme =
            VerifyPolicy { now_ms: i64::MAX, max_clock_skew: Duration::MAX, max_age: Some(Duration::MAX) };
        assert!(verify_record(&signed_with(|_| {}), None, &extreme).is_ok());
        let extreme = VerifyPolicy { now_ms: i64::MIN, ..extreme };
        assert!(matches!(
            verify_record(&signed_with(|_| {}), None, &extreme),
            Err(RecordError::FromTheFuture { .. })
        ));
    }

    #[test]
    fn oversize_body_and_wrong_signature_length_are_refused_before_decoding() {
        // Not even a valid RecordBody: refused on size alone.
        let huge = pb::SignedRecord { body: vec![0xff; MAX_RECORD_BYTES + 1], signature: vec![0; 64] };
        assert_eq!(
            verify(&huge, None),
            Err(RecordError::BodyTooLarge { len: MAX_RECORD_BYTES + 1, max: MAX_RECORD_BYTES })
        );
        let mut short = signed_with(|_| {});
        short.signature.pop();
        assert_eq!(verify(&short, None), Err(RecordError::SignatureLength { len: 63 }));
        let garbage = pb::SignedRecord { body: vec![0xff; 10], signature: vec![0; 64] };
        assert!(matches!(verify(&garbage, None), Err(RecordError::Decode(_))));
    }

    #[test]
    fn node_ids_that_are_not_keys_are_refused() {
        let mut short = signed_with(|b| b.node_id.truncate(31));
        assert_eq!(verify(&short, None), Err(RecordError::NodeIdLength { len: 31 }));
        short = signed_with(|b| b.node_id.clear());
        assert_eq!(verify(&short, None), Err(RecordError::NodeIdLength { len: 0 }));

        // The identity point: a valid encoding, but of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = signed_with(|b| b.node_id = identity.to_vec());
        assert_eq!(verify(&weak, None), Err(RecordError::InvalidNodeKey { node_id: NodeId(identity) }));

        // About half of all 32-byte strings do not decode to a curve point.
        let off_curve = (0..=255u8)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .expect("some repeated byte is not a point");
        let not_a_point = signed_with(|b| b.node_id = off_curve.to_vec());
        assert_eq!(
            verify(&not_a_point, None),
            Err(RecordError::InvalidNodeKey { node_id: NodeId(off_curve) })
        );
    }

    #[test]
    fn content_rules_are_enforced() {
        assert!(matches!(verify(&signed_with(|b| b.seq = 0), None), Err(RecordError::ZeroSeq { .. })));

        let bad_topic = verify(&signed_with(|b| b.topics.push("a\nb".into())), None).unwrap_err();
        assert!(matches!(
            bad_topic,
            RecordError::Topic { index: 2, rule: NameError::TopicControlChar { at: 1, code: 10 }, .. }
        ));
        assert!(bad_topic.to_string().contains("control character"), "{bad_topic}");
        assert!(matches!(
            verify(&signed_with(|b| b.topics.push(String::new())), None),
            Err(RecordError::Topic { rule: NameError::TopicEmpty, .. })
        ));
        assert!(matches!(
            verify(&signed_with(|b| b.topics.push("x".repeat(256))), None),
            Err(RecordError::Topic { rule: NameError::TopicTooLong { len: 256 }, .. })
        ));
        let many_topics = (0..=MAX_TOPICS_PER_RECORD).map(|i| format!("t{i}")).collect();
        assert!(matches!(
            verify(&signed_with(|b| b.topics = many_topics), None),
            Err(RecordError::TooManyTopics { count: 65, max: 64, .. })
        ));
        let max_topics = (0..MAX_TOPICS_PER_RECORD).map(|i| format!("t{i}")).collect();
        assert!(verify(&signed_with(|b| b.topics = max_topics), None).is_ok());

        let many_addresses = (0..=MAX_ADDRESSES_PER_RECORD)
            .map(|i| Address { address: format!("192.0.2.1:{}", 1000 + i), kind: 0 })
            .collect();
        assert!(matches!(
            verify(&signed_with(|b| b.addresses = many_addresses), None),
            Err(RecordError::TooManyAddresses { count: 33, max: 32, .. })
        ));
    }

    #[test]
    fn addresses_must_be_ip_and_port() {
        for bad in
            ["example.com:80", "192.0.2.1", "2001:db8::1:80", "192.0.2.1:0", "0.0.0.0:80", "[::]:80", ""]
        {
            let signed = signed_with(|b| b.addresses[1].address = bad.into());
            let err = verify(&signed, None).unwrap_err();
            assert!(
                matches!(&err, RecordError::Address { index: 1, address, .. } if address == bad),
                "{bad:?}: {err}"
            );
        }
        for good in ["192.0.2.1:1", "[::1]:65535", "[fe80::1]:4433"] {
            assert!(verify(&signed_with(|b| b.addresses[0].address = good.into()), None).is_ok(), "{good}");
        }
        assert!(verify(&signed_with(|b| b.dht_port = 30609), None).is_ok());
        let err = verify(&signed_with(|b| b.dht_port = 65536), None).unwrap_err();
        assert!(matches!(err, RecordError::DhtPort { port: 65536, .. }), "{err}");
        // Unknown enum values (from newer nodes) are kept, not refused.
        let newer = signed_with(|b| b.addresses[0].kind = 1000);
        assert_eq!(verify(&newer, None).map(|v| v.body.addresses[0].kind), Ok(1000));
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = "x".repeat(300) + "\u{1}";
        let err = verify(&signed_with(|b| b.topics.push(long)), None).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }
}
