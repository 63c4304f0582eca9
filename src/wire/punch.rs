//! Signed hole-punch offers: what a node tells a peer it wants to reach through a rendezvous, and the rules a
//! received [`pb::SignedPunchOffer`] must pass (see "Hole punching through a rendezvous" in `proto/wire.proto`).
//!
//! Like records, an offer is checked on the exact bytes received and signed over a domain prefix of its own
//! ([`PUNCH_DOMAIN`]), so no record or handshake signature can pass for an offer and no offer for anything else.
//! Remembering which nonces were already used is the caller's job: this module has no state.

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;

use super::{SIGNATURE_BYTES, parse_address, pb};
use crate::api::names::{NODE_ID_LEN, NodeId};

/// Prefix of the bytes a punch offer signature covers (`PUNCH_DOMAIN || body`).
pub const PUNCH_DOMAIN: &[u8] = b"remote-network/punch-offer/v1\0";
/// Largest encoded [`pb::PunchOfferBody`] accepted.
pub const MAX_PUNCH_OFFER_BYTES: usize = 2 * 1024;
/// Most candidate addresses in one offer.
pub const MAX_PUNCH_CANDIDATES: usize = 16;
/// How far an offer's timestamp may be from the receiver's clock, either way: an offer is used within a
/// second of being signed, so anything older is a replay or a broken clock.
pub const MAX_PUNCH_OFFER_AGE: Duration = Duration::from_secs(30);

/// A punch offer that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPunchOffer {
    pub from: NodeId,
    pub to: NodeId,
    pub nonce: u64,
    pub timestamp_ms: i64,
    /// The signer's candidates that parse, in the signer's order (unusable ones are dropped, not fatal: a
    /// newer node may name address forms this one does not know).
    pub candidates: Vec<SocketAddr>,
    /// The signer's NAT as it states it (all zero when it did not say).
    pub nat: pb::NatInfo,
    /// Where the signer's sequential NAT will probably map its flow to us; parsed like `candidates`.
    pub predicted: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PunchOfferError {
    #[error("punch offer body is {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("punch offer signature is {len} bytes, not 64")]
    SignatureLength { len: usize },
    #[error("punch offer does not decode: {0}")]
    Decode(String),
    #[error("punch offer names a node id of {len} bytes, not 32")]
    NodeIdLength { len: usize },
    #[error("punch offer comes from {claimed}, but {expected} was expected to send it")]
    WrongSender { claimed: NodeId, expected: NodeId },
    #[error("punch offer is meant for {to}, not for {expected}")]
    WrongTarget { to: NodeId, expected: NodeId },
    #[error("punch offer signer key is not a valid ed25519 key")]
    InvalidKey,
    #[error("punch offer signature does not verify")]
    BadSignature,
    #[error("punch offer has {count} candidates (or predicted addresses), more than the {max} allowed")]
    TooManyCandidates { count: usize, max: usize },
    #[error("punch offer was signed at {timestamp_ms} ms, more than 30 s from our clock ({now_ms} ms)")]
    Stale { timestamp_ms: i64, now_ms: i64 },
}

/// Signs an offer from `key`'s node to `to`.
#[must_use]
pub fn sign_punch_offer(
    key: &SigningKey,
    to: NodeId,
    nonce: u64,
    timestamp_ms: i64,
    candidates: &[SocketAddr],
    nat: pb::NatInfo,
    predicted: &[SocketAddr],
) -> pb::SignedPunchOffer {
    let body = pb::PunchOfferBody {
        from: key.verifying_key().to_bytes().to_vec(),
        to: to.as_bytes().to_vec(),
        nonce,
        timestamp_ms,
        candidates: candidates.iter().take(MAX_PUNCH_CANDIDATES).map(ToString::to_string).collect(),
        nat: Some(nat),
        predicted: predicted.iter().take(MAX_PUNCH_CANDIDATES).map(ToString::to_string).collect(),
    }
    .encode_to_vec();
    let signature = key.sign(&signed_message(&body));
    pb::SignedPunchOffer { body, signature: signature.to_bytes().to_vec() }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    super::domain_separated(PUNCH_DOMAIN, body)
}

fn node_id(bytes: &[u8]) -> Result<NodeId, PunchOfferError> {
    let bytes: [u8; NODE_ID_LEN] =
        bytes.try_into().map_err(|_| PunchOfferError::NodeIdLength { len: bytes.len() })?;
    Ok(NodeId(bytes))
}

/// Who an offer claims to be from and for, read without checking anything else: a rendezvous needs the target
/// and a target the sender before they can verify the offer against them.
pub fn punch_offer_parties(signed: &pb::SignedPunchOffer) -> Result<(NodeId, NodeId), PunchOfferError> {
    if signed.body.len() > MAX_PUNCH_OFFER_BYTES {
        return Err(PunchOfferError::TooLarge { len: signed.body.len(), max: MAX_PUNCH_OFFER_BYTES });
    }
    let body = pb::PunchOfferBody::decode(signed.body.as_slice())
        .map_err(|e| PunchOfferError::Decode(e.to_string()))?;
    Ok((node_id(&body.from)?, node_id(&body.to)?))
}

/// Checks an offer that `expected_from` must have signed for `expected_to`, at `now_ms`.
pub fn verify_punch_offer(
    signed: &pb::SignedPunchOffer,
    expected_from: NodeId,
    expected_to: NodeId,
    now_ms: i64,
) -> Result<VerifiedPunchOffer, PunchOfferError> {
    if signed.body.len() > MAX_PUNCH_OFFER_BYTES {
        return Err(PunchOfferError::TooLarge { len: signed.body.len(), max: MAX_PUNCH_OFFER_BYTES });
    }
    let signature: [u8; SIGNATURE_BYTES] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| PunchOfferError::SignatureLength { len: signed.signature.len() })?;
    let body = pb::PunchOfferBody::decode(signed.body.as_slice())
        .map_err(|e| PunchOfferError::Decode(e.to_string()))?;
    let from = node_id(&body.from)?;
    let to = node_id(&body.to)?;
    if from != expected_from {
        return Err(PunchOfferError::WrongSender { claimed: from, expected: expected_from });
    }
    if to != expected_to {
        return Err(PunchOfferError::WrongTarget { to, expected: expected_to });
    }
    let key = VerifyingKey::from_bytes(from.as_bytes())
        .ok()
        .filter(|key| !key.is_weak())
        .ok_or(PunchOfferError::InvalidKey)?;
    key.verify_strict(&signed_message(&signed.body), &Signature::from_bytes(&signature))
        .map_err(|_| PunchOfferError::BadSignature)?;
    let count = body.candidates.len().max(body.predicted.len());
    if count > MAX_PUNCH_CANDIDATES {
        return Err(PunchOfferError::TooManyCandidates { count, max: MAX_PUNCH_CANDIDATES });
    }
    let max_age = i64::try_from(MAX_PUNCH_OFFER_AGE.as_millis()).unwrap_or(i64::MAX);
    if now_ms.saturating_sub(body.timestamp_ms).saturating_abs() > max_age {
        return Err(PunchOfferError::Stale { timestamp_ms: body.timestamp_ms, now_ms });
    }
    Ok(VerifiedPunchOffer {
        from,
        to,
        nonce: body.nonce,
        timestamp_ms: body.timestamp_ms,
        candidates: body.candidates.iter().filter_map(|c| parse_address(c).ok()).collect(),
        nat: body.nat.unwrap_or_default(),
        predicted: body.predicted.iter().filter_map(|c| parse_address(c).ok()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn id(key: &SigningKey) -> NodeId {
        NodeId(key.verifying_key().to_bytes())
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_signed_offer_verifies_with_its_candidates() {
        let (a, b) = (key(1), key(2));
        let candidates: Vec<SocketAddr> =
            vec!["203.0.113.7:30906".parse().unwrap(), "[2001:db8::1]:9".parse().unwrap()];
        let nat = pb::NatInfo { mapping: 3, reachability: 2, port_delta: 1 };
        let predicted: Vec<SocketAddr> = vec!["203.0.113.7:20001".parse().unwrap()];
        let offer = sign_punch_offer(&a, id(&b), 42, NOW, &candidates, nat, &predicted);
        let verified = verify_punch_offer(&offer, id(&a), id(&b), NOW + 1000).unwrap();
        assert_eq!(verified.candidates, candidates);
        assert_eq!((verified.nat, verified.predicted), (nat, predicted));
        assert_eq!((verified.from, verified.to, verified.nonce), (id(&a), id(&b), 42));
    }

    #[test]
    fn a_forged_retargeted_or_stale_offer_is_refused() {
        let (a, b, mallory) = (key(1), key(2), key(3));
        let offer = sign_punch_offer(&a, id(&b), 1, NOW, &[], pb::NatInfo::default(), &[]);
        // Someone else's offer presented as A's (a rendezvous lying about the sender).
        let forged = sign_punch_offer(&mallory, id(&b), 1, NOW, &[], pb::NatInfo::default(), &[]);
        assert!(matches!(
            verify_punch_offer(&forged, id(&a), id(&b), NOW),
            Err(PunchOfferError::WrongSender { .. })
        ));
        // A's offer for B replayed to Mallory.
        assert!(matches!(
            verify_punch_offer(&offer, id(&a), id(&mallory), NOW),
            Err(PunchOfferError::WrongTarget { .. })
        ));
        // Tampered body: the candidates changed on the way.
        let mut tampered = offer.clone();
        let mut body = pb::PunchOfferBody::decode(tampered.body.as_slice()).unwrap();
        body.candidates.push("198.51.100.66:1".into());
        tampered.body = body.encode_to_vec();
        assert_eq!(verify_punch_offer(&tampered, id(&a), id(&b), NOW), Err(PunchOfferError::BadSignature));
        // Too old and too far in the future.
        assert!(matches!(
            verify_punch_offer(&offer, id(&a), id(&b), NOW + 31_000),
            Err(PunchOfferError::Stale { .. })
        ));
        assert!(matches!(
            verify_punch_offer(&offer, id(&a), id(&b), NOW - 31_000),
            Err(PunchOfferError::Stale { .. })
        ));
        // A record-domain signature over the same bytes is not an offer signature.
        let mut cross = offer.clone();
        let mut message = crate::wire::RECORD_DOMAIN.to_vec();
        message.extend_from_slice(&offer.body);
        cross.signature = a.sign(&message).to_bytes().to_vec();
        assert_eq!(verify_punch_offer(&cross, id(&a), id(&b), NOW), Err(PunchOfferError::BadSignature));
    }

    #[test]
    fn malformed_offers_are_refused_without_panicking() {
        let (a, b) = (key(1), key(2));
        let mut offer = sign_punch_offer(&a, id(&b), 1, NOW, &[], pb::NatInfo::default(), &[]);
        offer.signature.pop();
        assert_eq!(
            verify_punch_offer(&offer, id(&a), id(&b), NOW),
            Err(PunchOfferError::SignatureLength { len: 63 })
        );
        let huge = pb::SignedPunchOffer { body: vec![0; MAX_PUNCH_OFFER_BYTES + 1], signature: vec![0; 64] };
        assert!(matches!(
            verify_punch_offer(&huge, id(&a), id(&b), NOW),
            Err(PunchOfferError::TooLarge { .. })
        ));
        let garbage = pb::SignedPunchOffer { body: vec![0xff; 40], signature: vec![0; 64] };
        assert!(verify_punch_offer(&garbage, id(&a), id(&b), NOW).is_err());
        let many: Vec<SocketAddr> = (1..=20).map(|p| SocketAddr::from(([198, 51, 100, 1], p))).collect();
        let offer = sign_punch_offer(&a, id(&b), 1, NOW, &many, pb::NatInfo::default(), &[]);
        assert_eq!(
            verify_punch_offer(&offer, id(&a), id(&b), NOW).unwrap().candidates.len(),
            MAX_PUNCH_CANDIDATES
        );
    }
}
