//! Keys, records and envelopes shared by the wire tests. Keys come from fixed seeds so every run tests the
//! same bytes.

use ed25519_dalek::SigningKey;

use super::pb::{
    self, Address, AddressKind, Capabilities, NatInfo, NatType, NodeType, Reachability, envelope::Kind,
};
use super::{PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, sign_record};
use crate::api::names::NodeId;

/// The verifier's clock in tests; records are timestamped close to it.
pub(crate) const NOW_MS: i64 = 1_760_000_000_000;

pub(crate) fn test_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub(crate) fn node_id_of(key: &SigningKey) -> NodeId {
    NodeId(key.verifying_key().to_bytes())
}

/// A record body with every field set, valid for `key`.
pub(crate) fn sample_body(key: &SigningKey, seq: u64, timestamp_ms: i64) -> pb::RecordBody {
    pb::RecordBody {
        node_id: key.verifying_key().to_bytes().to_vec(),
        seq,
        timestamp_ms,
        topics: vec!["chat".into(), "ünïcødé".into()],
        addresses: vec![
            Address { address: "192.0.2.7:4433".into(), kind: AddressKind::ObservedPublic as i32 },
            Address { address: "[2001:db8::1]:4433".into(), kind: AddressKind::InterfacePublic as i32 },
        ],
        node_type: NodeType::Private as i32,
        nat: Some(NatInfo {
            mapping: NatType::EndpointIndependent as i32,
            reachability: Reachability::PrivatePunchable as i32,
            port_delta: 0,
        }),
        capabilities: Some(Capabilities {
            os: "linux".into(),
            arch: "x86_64".into(),
            cpu_cores: 2,
            memory_bytes: 24 << 30,
            software_version: "0.1.0".into(),
        }),
        services: vec![],
        protocol_versions: vec![PROTOCOL_VERSION],
        dht_port: 30609,
    }
}

/// A valid signed record of the node with key seed `seed`.
pub(crate) fn sample_record(seed: u8) -> pb::SignedRecord {
    let key = test_key(seed);
    sign_record(&sample_body(&key, u64::from(seed), NOW_MS - i64::from(seed)), &key)
}

pub(crate) fn envelope(request_id: u64, kind: Kind) -> pb::Envelope {
    pb::Envelope { request_id, kind: Some(kind) }
}

/// One envelope of every kind that carries something, valid for the frame rules.
pub(crate) fn sample_conversation() -> Vec<pb::Envelope> {
    vec![
        envelope(
            0,
            Kind::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                supported_versions: SUPPORTED_PROTOCOL_VERSIONS.to_vec(),
                record: Some(sample_record(1)),
                observed_address: "198.51.100.4:50000".into(),
            }),
        ),
        envelope(1, Kind::GetRecordRequest(pb::GetRecordRequest {})),
        envelope(1, Kind::GetRecordResponse(pb::GetRecordResponse { record: Some(sample_record(1)) })),
        envelope(2, Kind::Ping(pb::Ping { nonce: u64::MAX })),
        envelope(2, Kind::Pong(pb::Pong { nonce: u64::MAX })),
        envelope(
            3,
            Kind::PeerExchangeRequest(pb::PeerExchangeRequest { topic: "chat".into(), max_records: 8 }),
        ),
        envelope(
            3,
            Kind::PeerExchangeResponse(pb::PeerExchangeResponse {
                records: vec![sample_record(2), sample_record(3)],
            }),
        ),
        envelope(
            4,
            Kind::Error(pb::ErrorResponse {
                code: pb::ErrorCode::RateLimited as u32,
                message: "slow".into(),
            }),
        ),
    ]
}
