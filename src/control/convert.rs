//! Mapping between store rows and control API messages, and from internal errors to gRPC statuses with
//! messages a caller can act on.

use std::time::Duration;

use prost_types::Timestamp;
use tonic::Status;

use crate::api::control as pb;
use crate::api::names::{NameError, NodeId};
use crate::store::{self, StoreError};

/// A Unix-milliseconds time as a protobuf Timestamp.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn optional_timestamp(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(timestamp)
}

/// A protobuf Timestamp as Unix milliseconds; out-of-range values saturate instead of wrapping.
pub fn millis(ts: &Timestamp) -> i64 {
    ts.seconds.saturating_mul(1000).saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999)) / 1_000_000)
}

pub use crate::clock::{now_ms, unix_ms};

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// Parses a node id field, naming the field in the error.
pub fn node_id_arg(field: &str, text: &str) -> Result<NodeId, Status> {
    NodeId::parse(text).map_err(|e| invalid(field, &e))
}

/// Checks a topic field, naming the field in the error.
pub fn topic_arg(field: &str, topic: &str) -> Result<(), Status> {
    crate::api::names::validate_topic(topic).map_err(|e| invalid(field, &e))
}

fn invalid(field: &str, error: &NameError) -> Status {
    Status::invalid_argument(format!("{field}: {error}"))
}

/// Most characters of a client-supplied value that an error message quotes.
pub const QUOTED_CHARS: usize = 64;

/// A client-supplied value as an error message quotes it: in backticks, with control characters escaped so the
/// message stays one line, and cut after [`QUOTED_CHARS`] characters with an ellipsis and its length in bytes.
/// A status echoing a whole megabyte-long value would be bigger than any client accepts as a header (and tells
/// the caller nothing the first characters do not).
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        None => format!("`{}`", value.escape_debug()),
        Some((cut, _)) => format!("`{}`\u{2026} ({} bytes)", value[..cut].escape_debug(), value.len()),
    }
}

/// `text` cut to at most `max_bytes` bytes (at a character boundary), with an ellipsis and its full length
/// when it was longer.
pub fn truncated(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let cut = (0..=max_bytes).rev().find(|&at| text.is_char_boundary(at)).unwrap_or(0);
    format!("{}\u{2026} ({} bytes in all)", &text[..cut], text.len())
}

/// The gRPC status for a store failure: callers can retry on UNAVAILABLE, fix their request on
/// RESOURCE_EXHAUSTED, and report INTERNAL.
pub fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::TooManyTopics { .. } => Status::resource_exhausted(error.to_string()),
        StoreError::InvalidTopic(_) => Status::invalid_argument(format!("topic: {error}")),
        StoreError::CursorOrderMismatch => Status::invalid_argument(format!("page_token: {error}")),
        StoreError::Closed | StoreError::WriteFailed(_) => Status::unavailable(error.to_string()),
        other => {
            tracing::error!(error = %other, "store request failed");
            Status::internal(format!("store: {other}"))
        }
    }
}

pub fn node_type(t: store::NodeType) -> pb::NodeType {
    match t {
        store::NodeType::Unknown => pb::NodeType::Unknown,
        store::NodeType::Public => pb::NodeType::Public,
        store::NodeType::Private => pb::NodeType::Private,
    }
}

/// The store filter for a requested node type; `None` means "all".
pub fn node_type_filter(value: i32) -> Result<Option<store::NodeType>, Status> {
    match pb::NodeType::try_from(value) {
        Ok(pb::NodeType::Unknown) => Ok(None),
        Ok(pb::NodeType::Public) => Ok(Some(store::NodeType::Public)),
        Ok(pb::NodeType::Private) => Ok(Some(store::NodeType::Private)),
        Err(_) => Err(Status::invalid_argument(format!(
            "node_type: {value} is not a NodeType; use NODE_TYPE_PUBLIC, NODE_TYPE_PRIVATE or \
             NODE_TYPE_UNKNOWN (all)"
        ))),
    }
}

pub fn nat_type(t: store::NatType) -> pb::NatType {
    match t {
        store::NatType::Unknown => pb::NatType::Unknown,
        store::NatType::None => pb::NatType::None,
        store::NatType::EndpointIndependent => pb::NatType::EndpointIndependent,
        store::NatType::EndpointDependent => pb::NatType::EndpointDependent,
        store::NatType::UdpBlocked => pb::NatType::UdpBlocked,
    }
}

fn address_source(s: store::AddressSource) -> pb::AddressSource {
    match s {
        store::AddressSource::Unknown => pb::AddressSource::Unknown,
        store::AddressSource::Dht => pb::AddressSource::Dht,
        store::AddressSource::Inbound => pb::AddressSource::Inbound,
        store::AddressSource::PeerExchange => pb::AddressSource::PeerExchange,
        store::AddressSource::Manual => pb::AddressSource::Manual,
        store::AddressSource::Record => pb::AddressSource::Record,
    }
}

/// A node id in the API's text form, lowercase hex: the same text as its `Display`, without a formatter call
/// per byte (a page of peers formats a thousand ids, and that was a visible share of serving it).
pub fn node_id_text(id: &NodeId) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * id.0.len());
    for byte in id.0 {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    text
}

/// A list row: everything but addresses, quality, capabilities, services and the record.
pub fn peer_summary(s: &store::PeerSummary) -> pb::Peer {
    summary_with_topics(s, s.topics.clone())
}

/// [`peer_summary`] taking the row, so its topics move instead of being copied.
pub fn into_peer_summary(mut s: store::PeerSummary) -> pb::Peer {
    let topics = std::mem::take(&mut s.topics);
    summary_with_topics(&s, topics)
}

fn summary_with_topics(s: &store::PeerSummary, topics: Vec<String>) -> pb::Peer {
    pb::Peer {
        node_id: node_id_text(&s.node_id),
        seq: s.seq,
        first_seen: Some(timestamp(s.first_seen_ms)),
        last_seen: Some(timestamp(s.last_seen_ms)),
        node_type: node_type(s.node_type) as i32,
        nat_type: nat_type(s.nat_type) as i32,
        topics,
        score: s.score,
        ..Default::default()
    }
}

pub fn peer_detail(d: &store::PeerDetail) -> pb::Peer {
    let q = &d.quality;
    pb::Peer {
        addresses: d
            .addresses
            .iter()
            .map(|a| pb::PeerAddress {
                address: a.address.to_string(),
                source: address_source(a.source) as i32,
                first_seen: Some(timestamp(a.first_seen_ms)),
                last_success: optional_timestamp(a.last_success_ms),
                last_failure: optional_timestamp(a.last_failure_ms),
                consecutive_failures: a.consecutive_failures,
            })
            .collect(),
        quality: Some(pb::ConnectionQuality {
            rtt: q.rtt_ewma.map(duration),
            rtt_samples: q.rtt_samples,
            successes: q.successes,
            failures: q.failures,
            last_error: q.last_error.clone().unwrap_or_default(),
            last_error_at: optional_timestamp(q.last_error_ms),
            last_success_at: optional_timestamp(q.last_success_ms),
        }),
        capabilities: d.capabilities.as_ref().map(|c| pb::Capabilities {
            os: c.os.clone(),
            arch: c.arch.clone(),
            cpu_cores: c.cpu_cores,
            memory_bytes: c.memory_bytes,
            software_version: c.software_version.clone(),
        }),
        services: d
            .services
            .iter()
            .map(|s| pb::Service {
                name: s.name.clone(),
                version: s.version.clone(),
                attributes: s.attributes.iter().cloned().collect(),
            })
            .collect(),
        record: d.record.clone(),
        ..peer_summary(&d.summary)
    }
}

pub fn topic(t: &store::JoinedTopic) -> pb::Topic {
    pb::Topic {
        name: t.name.clone(),
        joined_at: Some(timestamp(t.joined_at_ms)),
        peers: t.peers,
        infohash: topic_infohash(&t.name),
        discovery: None,
    }
}

/// Where a topic's discovery stands, as the DHT actor reports it.
pub fn topic_discovery(s: &crate::dht::DhtTopicStatus) -> pb::TopicDiscovery {
    // Counts are bounded far below u32::MAX in practice (routing tables, lookup answers); saturate anyway rather
    // than wrap.
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::TopicDiscovery {
        dht_contacts: s.contacts.map(count),
        has_bootstrap: s.has_bootstrap,
        lookup_running: s.lookup_running,
        last_lookup_at: optional_timestamp(s.last_lookup_ms),
        last_lookup_peers: s.last_lookup_peers.map(count),
        nodes_with_our_announce: s.nodes_with_our_announce.map(count),
        next_lookup_in: s.next_lookup_in.map(duration),
        announce_port: s.announce_port.map(u32::from),
        announce_running: s.announce_running,
        last_announce_at: optional_timestamp(s.last_announce_ms),
        announce_stored_remotely: s.announce_stored_remotely,
        announce_stored_here: s.announce_stored_here,
        announce_error: s.announce_error.clone().unwrap_or_default(),
        explanation: s.explanation(),
    }
}

/// Lowercase hex of SHA1(topic): the BEP 5 infohash under which the topic's peers announce themselves.
pub fn topic_infohash(topic: &str) -> String {
    sha1_smol::Sha1::from(topic.as_bytes()).digest().to_string()
}

/// What a live session looks like in the API; `None` means not connected.
pub fn connection(info: Option<&crate::exchange::SessionInfo>) -> pb::PeerConnection {
    use crate::exchange::table::Direction;
    match info {
        None => pb::PeerConnection::default(),
        Some(info) => pb::PeerConnection {
            connected: true,
            direction: match info.direction {
                Direction::Inbound => pb::ConnectionDirection::Inbound,
                Direction::Outbound => pb::ConnectionDirection::Outbound,
            } as i32,
            remote_address: info.remote.to_string(),
            since: Some(timestamp(info.since_ms)),
            path: match info.path {
                crate::exchange::ConnectionPath::Direct => pb::ConnectionPath::Direct,
                crate::exchange::ConnectionPath::Punched => pb::ConnectionPath::Punched,
                crate::exchange::ConnectionPath::Relayed { .. } => pb::ConnectionPath::Relayed,
            } as i32,
            rtt: Some(duration(info.rtt)),
            relay: info.path.relay().map(|r| r.to_string()).unwrap_or_default(),
        },
    }
}

/// A peer as a fresh record describes it (no store facts: quality, first seen).
pub fn peer_from_record(record: &crate::wire::VerifiedRecord) -> pb::Peer {
    let upsert = crate::exchange::record::upsert_from_record(record, None, record.timestamp_ms);
    pb::Peer {
        node_id: record.node_id.to_string(),
        seq: record.seq,
        last_seen: Some(timestamp(record.timestamp_ms)),
        node_type: node_type(upsert.node_type) as i32,
        nat_type: nat_type(upsert.nat_type) as i32,
        topics: upsert.topics,
        addresses: upsert
            .addresses
            .into_iter()
            .map(|(address, source)| pb::PeerAddress {
                address: address.to_string(),
                source: address_source(source) as i32,
                ..Default::default()
            })
            .collect(),
        capabilities: upsert.capabilities.map(|c| pb::Capabilities {
            os: c.os,
            arch: c.arch,
            cpu_cores: c.cpu_cores,
            memory_bytes: c.memory_bytes,
            software_version: c.software_version,
        }),
        services: upsert
            .services
            .into_iter()
            .map(|s| pb::Service {
                name: s.name,
                version: s.version,
                attributes: s.attributes.into_iter().collect(),
            })
            .collect(),
        record: prost::Message::encode_to_vec(&record.signed),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            assert_eq!(millis(&timestamp(ms)), ms);
            assert!((0..1_000_000_000).contains(&timestamp(ms).nanos));
        }
    }

    #[test]
    fn node_id_text_is_the_display_form() {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0x0f);
        }
        for id in [NodeId([0; 32]), NodeId([0xff; 32]), NodeId(bytes)] {
            assert_eq!(node_id_text(&id), id.to_string());
        }
    }

    #[test]
    fn quoted_values_are_short_and_one_line() {
        assert_eq!(quoted("host:1"), "`host:1`");
        assert_eq!(quoted("a\nb"), "`a\\nb`");
        let long = "é".repeat(1000);
        let shown = quoted(&long);
        assert_eq!(shown, format!("`{}`\u{2026} (2000 bytes)", "é".repeat(QUOTED_CHARS)));
        assert_eq!(quoted(&"x".repeat(QUOTED_CHARS)), format!("`{}`", "x".repeat(QUOTED_CHARS)));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("short", 10), "short");
        assert_eq!(truncated("ééé", 3), "é\u{2026} (6 bytes in all)");
    }

    #[test]
    fn infohash_is_sha1_of_the_topic_name() {
        // SHA1("abc") from FIPS 180-1, appendix A.
        assert_eq!(topic_infohash("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
    }
}
