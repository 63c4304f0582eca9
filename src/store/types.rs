//! Plain data going in and out of the store. Times are Unix milliseconds (UTC); node ids are [`NodeId`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::names::NodeId;
use crate::config::declared;

/// How the store is opened and bounded.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The SQLite database file; its directory must exist.
    pub path: PathBuf,
    /// Connections in the read pool.
    pub read_pool_size: u32,
    /// Peers not seen for this long are pruned.
    pub retention: Duration,
    /// Hard bound on stored peers: beyond it the least recently seen are pruned.
    pub max_peers: u64,
    /// Hard bound on joined topics: a join beyond it fails with [`super::StoreError::TooManyTopics`].
    pub max_joined_topics: u64,
    /// How often the writer prunes by itself.
    pub prune_interval: Duration,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
}

impl StoreOptions {
    /// Defaults for everything but the path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_pool_size: 4,
            retention: declared::duration("store.retention"),
            max_peers: u64::try_from(declared::count("store.max_peers")).unwrap_or(u64::MAX),
            max_joined_topics: u64::try_from(declared::count("store.max_joined_topics")).unwrap_or(u64::MAX),
            prune_interval: Duration::from_secs(600),
            max_batch: 1024,
        }
    }
}

/// Whether the node was found to be publicly reachable (mirrors the control API's NodeType numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeType {
    #[default]
    Unknown = 0,
    Public = 1,
    Private = 2,
}

/// The NAT a peer reported for itself (mirrors the control API's NatType numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NatType {
    #[default]
    Unknown = 0,
    None = 1,
    EndpointIndependent = 2,
    EndpointDependent = 3,
    UdpBlocked = 4,
}

/// Where an address was learned (mirrors the control API's AddressSource numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressSource {
    #[default]
    Unknown = 0,
    Dht = 1,
    Inbound = 2,
    PeerExchange = 3,
    Manual = 4,
    Record = 5,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub os: String,
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub software_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    pub name: String,
    pub version: String,
    /// Sorted by key.
    pub attributes: Vec<(String, String)>,
}

/// A verified metadata record (or what is known of a peer before one) to merge into the store.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerUpsert {
    pub node_id: NodeId,
    /// Sequence number of `record`. A record with a lower seq than the stored one is refused
    /// ([`UpsertOutcome::Stale`]); an equal seq refreshes `last_seen` and addresses only.
    pub seq: u64,
    /// The signed record bytes as received; empty when no record is known yet.
    pub record: Vec<u8>,
    pub seen_at_ms: i64,
    pub node_type: NodeType,
    pub nat_type: NatType,
    /// Replaces the stored topic set when the record is newer.
    pub topics: Vec<String>,
    /// Merged into the stored addresses (never removes one).
    pub addresses: Vec<(SocketAddr, AddressSource)>,
    pub capabilities: Option<Capabilities>,
    /// Replaces the stored services when the record is newer.
    pub services: Vec<ServiceEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    Added,
    Updated,
    /// Refused: the stored record has a higher seq. Nothing was changed.
    Stale {
        stored_seq: u64,
    },
}

/// One connection attempt's result, folded into the peer's quality row.
#[derive(Debug, Clone, PartialEq)]
pub struct QualitySample {
    pub at_ms: i64,
    pub address: Option<SocketAddr>,
    pub outcome: Result<Option<Duration>, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeerOrder {
    #[default]
    LastSeen,
    Score,
}

/// Where a page starts: the sort key of the last row of the previous page.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerCursor {
    /// Peers seen at the same millisecond are ordered by node id.
    LastSeen { last_seen_ms: i64, node_id: NodeId },
    /// Peers with the same score (every peer never reached scores 0) are ordered by `stored`, the number the
    /// store gave the peer when it first stored it: the peer stored first comes first.
    Score { score: f64, stored: i64 },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerQuery {
    pub topic: Option<String>,
    pub node_type: Option<NodeType>,
    pub seen_since_ms: Option<i64>,
    pub order: PeerOrder,
    pub limit: u32,
    pub after: Option<PeerCursor>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerPage {
    pub peers: Vec<PeerSummary>,
    /// Set when more rows follow.
    pub next: Option<PeerCursor>,
    /// Rows matching the filters, all pages.
    pub total: u64,
}

/// What a list row shows.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSummary {
    pub node_id: NodeId,
    pub seq: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub node_type: NodeType,
    pub nat_type: NatType,
    /// Sorted.
    pub topics: Vec<String>,
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AddressRow {
    pub address: SocketAddr,
    pub source: AddressSource,
    pub first_seen_ms: i64,
    pub last_success_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub consecutive_failures: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Quality {
    pub rtt_ewma: Option<Duration>,
    pub rtt_samples: u64,
    pub successes: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    pub last_success_ms: Option<i64>,
}

/// Everything the store holds about one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerDetail {
    pub summary: PeerSummary,
    pub record: Vec<u8>,
    pub addresses: Vec<AddressRow>,
    pub quality: Quality,
    pub capabilities: Option<Capabilities>,
    pub services: Vec<ServiceEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedTopic {
    pub name: String,
    pub joined_at_ms: i64,
    /// Stored peers sharing the topic.
    pub peers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub peers: u64,
    pub peer_addresses: u64,
    pub joined_topics: u64,
    pub size_bytes: u64,
    pub schema_version: u32,
    pub writes_committed: u64,
    pub write_batches: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Writes are failing; reads may still work. The text says why.
    Degraded(String),
}

/// A change committed to the peers table, broadcast after its transaction commits.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    Added(PeerSummary),
    Updated(PeerSummary),
    Removed(NodeId),
}

/// One hole-punch attempt, as counted in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchOutcome {
    /// Our NAT type and the peer's, as `wire.proto` `NatType` values.
    pub our_nat: i32,
    pub their_nat: i32,
    /// What happened, for people.
    pub detail: String,
    pub at_ms: i64,
    /// Set when the punch connected: from its start to the verified session.
    pub time_to_connected_ms: Option<u64>,
}

/// Punch attempts and outcomes for one pair of NAT types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchStats {
    pub our_nat: i32,
    pub their_nat: i32,
    pub attempts: u64,
    pub successes: u64,
    pub last_outcome: String,
    pub last_at_ms: i64,
    /// Time to connected of the last successful attempt.
    pub last_success_ms: Option<u64>,
}
