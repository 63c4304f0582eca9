//! The node's own signed metadata record, and turning verified records of peers into store rows.
//!
//! [`RecordPublisher`] rebuilds and re-signs our record whenever what it states changes (joined topics, the
//! public address peers confirmed). Each new record takes a seq from the store *before* it is published, so
//! seqs only ever increase, across restarts too: peers refuse a lower one as a replay.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use prost::Message;
use tokio::sync::{Mutex, watch};

use crate::api::names::NodeId;
use crate::store::{self, AddressSource, PeerUpsert, ServiceEntry, Store, StoreError};
use crate::wire::{self, RecordAddress, VerifiedRecord, pb};

/// Rendezvous peers named in our record.
const MAX_RENDEZVOUS: usize = 3;

/// What our record states, besides identity and seq.
#[derive(Debug, Clone, Default)]
struct Facts {
    topics: Vec<String>,
    /// Interface addresses of the QUIC socket, private ones included.
    interfaces: Vec<SocketAddr>,
    /// Public addresses confirmed by peers.
    observed: Vec<SocketAddr>,
    /// Peers that can introduce others to us (hole punching), while we are not reachable directly.
    rendezvous: Vec<SocketAddr>,
    /// What the NAT prober concluded (unknown until it has).
    node_type: Option<pb::NodeType>,
    nat: pb::NatInfo,
    /// Port of our DHT socket, 0 if none.
    dht_port: u16,
}

/// Builds, signs and hands out the node's current record.
#[derive(Clone)]
pub struct RecordPublisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    key: SigningKey,
    /// The QUIC socket's bound address, from which the interface addresses are derived.
    quic: SocketAddr,
    node_id: NodeId,
    store: Store,
    facts: Mutex<Facts>,
    current: watch::Sender<Arc<pb::SignedRecord>>,
    topics: std::sync::RwLock<Vec<String>>,
}

impl RecordPublisher {
    /// Signs the first record: `quic` is the bound QUIC address, `topics` the joined topics, `dht_port` the
    /// port of our DHT socket (0 if none).
    pub async fn start(
        key: SigningKey,
        store: Store,
        quic: SocketAddr,
        mut topics: Vec<String>,
        dht_port: u16,
    ) -> Result<Self, StoreError> {
        topics.sort();
        let node_id = NodeId(key.verifying_key().to_bytes());
        let facts = Facts {
            topics: topics.clone(),
            interfaces: interface_addresses(quic),
            observed: Vec::new(),
            rendezvous: Vec::new(),
            node_type: None,
            nat: pb::NatInfo::default(),
            dht_port,
        };
        let first = sign(&key, node_id, next_seq(&store).await?, &facts);
        let (current, _) = watch::channel(Arc::new(first));
        Ok(Self {
            inner: Arc::new(PublisherInner {
                key,
                quic,
                node_id,
                store,
                facts: Mutex::new(facts),
                current,
                topics: std::sync::RwLock::new(topics),
            }),
        })
    }

    /// The node's signing key (dial-backs open connections under the node's identity).
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.inner.key
    }

    /// A receiver that sees every new record (peers are told when it changes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::SignedRecord>> {
        self.inner.current.subscribe()
    }

    /// The record to send now.
    pub fn current(&self) -> Arc<pb::SignedRecord> {
        self.inner.current.borrow().clone()
    }

    /// The topics the current record states.
    pub fn topics(&self) -> Vec<String> {
        self.inner.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Re-signs the record if the joined topics changed.
    pub async fn set_topics(&self, mut topics: Vec<String>) -> Result<(), StoreError> {
        topics.sort();
        let mut facts = self.inner.facts.lock().await;
        if facts.topics == topics {
            return Ok(());
        }
        facts.topics = topics.clone();
        self.publish(&facts).await?;
        *self.inner.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner) = topics;
        Ok(())
    }

    /// Adds a public address peers confirmed, re-signing the record.
    pub async fn add_observed(&self, address: SocketAddr) {
        let mut facts = self.inner.facts.lock().await;
        if facts.observed.contains(&address) {
            return;
        }
        facts.observed.push(address);
        facts.observed.sort();
        if let Err(e) = self.publish(&facts).await {
            tracing::warn!(error = %e, "could not re-sign the record with a new observed address");
        }
    }

    /// Reads the interface addresses again and re-signs the record if they changed (a laptop that moved to
    /// another network, a new address from DHCP). Returns whether they changed.
    pub async fn refresh_interfaces(&self) -> bool {
        let interfaces = interface_addresses(self.inner.quic);
        let mut facts = self.inner.facts.lock().await;
        if facts.interfaces == interfaces {
            return false;
        }
        tracing::info!(before = ?facts.interfaces, now = ?interfaces, "interface addresses changed");
        facts.interfaces = interfaces;
        // Public addresses peers confirmed belong to the network we were on.
        facts.observed.clear();
        if let Err(e) = self.publish(&facts).await {
            tracing::warn!(error = %e, "could not re-sign the record with new interface addresses");
        }
        true
    }

    /// Re-signs the record if the rendezvous peers (addresses of peers that keep a session with us and can
    /// introduce others) changed.
    pub async fn set_rendezvous(&self, mut rendezvous: Vec<SocketAddr>) {
        rendezvous.sort();
        rendezvous.dedup();
        rendezvous.truncate(MAX_RENDEZVOUS);
        let mut facts = self.inner.facts.lock().await;
        if facts.rendezvous == rendezvous {
            return;
        }
        facts.rendezvous = rendezvous;
        if let Err(e) = self.publish(&facts).await {
            tracing::warn!(error = %e, "could not re-sign the record with new rendezvous peers");
        }
    }

    /// Re-signs the record with a new NAT verdict, if it changed.
    pub async fn set_nat(&self, node_type: pb::NodeType, nat: pb::NatInfo) -> Result<(), StoreError> {
        let mut facts = self.inner.facts.lock().await;
        if facts.node_type == Some(node_type) && facts.nat == nat {
            return Ok(());
        }
        facts.node_type = Some(node_type);
        facts.nat = nat;
        self.publish(&facts).await
    }

    async fn publish(&self, facts: &Facts) -> Result<(), StoreError> {
        let seq = next_seq(&self.inner.store).await?;
        let record = sign(&self.inner.key, self.inner.node_id, seq, facts);
        self.inner.current.send_replace(Arc::new(record));
        tracing::debug!(seq, topics = facts.topics.len(), "record re-signed");
        Ok(())
    }
}

/// A seq above every earlier one: the store persists it, and the clock (milliseconds) is the floor so a lost
/// database does not restart seqs from 1.
async fn next_seq(store: &Store) -> Result<u64, StoreError> {
    store.next_record_seq(u64::try_from(super::now_ms()).unwrap_or(0)).await
}

fn sign(key: &SigningKey, node_id: NodeId, seq: u64, facts: &Facts) -> pb::SignedRecord {
    let mut addresses: Vec<pb::Address> = facts
        .interfaces
        .iter()
        .map(|a| pb::Address {
            address: a.to_string(),
            kind: if crate::nat::observed::is_private(a.ip()) {
                pb::AddressKind::InterfacePrivate
            } else {
                pb::AddressKind::InterfacePublic
            } as i32,
        })
        .collect();
    addresses.extend(
        facts
            .observed
            .iter()
            .filter(|a| !facts.interfaces.contains(a))
            .map(|a| pb::Address { address: a.to_string(), kind: pb::AddressKind::ObservedPublic as i32 }),
    );
    addresses.extend(
        facts
            .rendezvous
            .iter()
            .map(|a| pb::Address { address: a.to_string(), kind: pb::AddressKind::Relay as i32 }),
    );
    addresses.truncate(wire::MAX_ADDRESSES_PER_RECORD);
    let body = pb::RecordBody {
        node_id: node_id.as_bytes().to_vec(),
        seq,
        timestamp_ms: super::now_ms(),
        topics: facts.topics.iter().take(wire::MAX_TOPICS_PER_RECORD).cloned().collect(),
        addresses,
        node_type: facts.node_type.unwrap_or(pb::NodeType::Unknown) as i32,
        nat: Some(facts.nat),
        capabilities: Some(capabilities()),
        services: Vec::new(),
        protocol_versions: vec![wire::PROTOCOL_VERSION],
        dht_port: u32::from(facts.dht_port),
    };
    wire::sign_record(&body, key)
}

/// The addresses the QUIC socket can be reached on from this host's interfaces. A socket bound to one address
/// has just that one; a wildcard socket has every interface address of its family (loopback only when nothing
/// else exists, so that a purely local setup still works).
fn interface_addresses(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let Ok(interfaces) = if_addrs::get_if_addrs() else { return Vec::new() };
    let same_family = |ip: &IpAddr| ip.is_ipv4() == bound.is_ipv4();
    let mut addresses: Vec<SocketAddr> = interfaces
        .iter()
        .map(|i| i.ip())
        .filter(|ip| same_family(ip) && !ip.is_loopback() && !is_link_local(ip))
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    if addresses.is_empty() {
        let loopback = if bound.is_ipv4() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        };
        addresses.push(SocketAddr::new(loopback, bound.port()));
    }
    addresses.sort();
    addresses.dedup();
    addresses
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// What this host is, for peers choosing whom to ask for work later.
fn capabilities() -> pb::Capabilities {
    pb::Capabilities {
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        cpu_cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(0),
        memory_bytes: total_memory_bytes().unwrap_or(0),
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Addresses in a verified record that a dialer may try.
/// Rendezvous addresses (`ADDRESS_KIND_RELAY`) are not the node's own: they are where to ask for an
/// introduction.
pub fn dialable_addresses(record: &VerifiedRecord) -> Vec<SocketAddr> {
    record.addresses.iter().filter(|a| !a.rendezvous).map(|a| a.address).collect()
}

/// The peers a record names as able to introduce others to its node.
pub fn rendezvous_addresses(body: &pb::RecordBody) -> Vec<SocketAddr> {
    RecordAddress::all_of(body).into_iter().filter(|a| a.rendezvous).map(|a| a.address).collect()
}

/// The store row for a verified record. `contact` is the address the record came over, if it came over a
/// connection of ours (the most useful address, so it goes first).
pub fn upsert_from_record(
    record: &VerifiedRecord,
    contact: Option<(SocketAddr, AddressSource)>,
    now_ms: i64,
) -> PeerUpsert {
    let body = &record.body;
    let mut addresses: Vec<(SocketAddr, AddressSource)> = contact.into_iter().collect();
    addresses.extend(dialable_addresses(record).into_iter().map(|a| (a, AddressSource::Record)));
    PeerUpsert {
        node_id: record.node_id,
        seq: record.seq,
        record: record.signed.encode_to_vec(),
        seen_at_ms: now_ms,
        node_type: match pb::NodeType::try_from(body.node_type) {
            Ok(pb::NodeType::Public) => store::NodeType::Public,
            Ok(pb::NodeType::Private) => store::NodeType::Private,
            _ => store::NodeType::Unknown,
        },
        nat_type: match body.nat.as_ref().map(|n| pb::NatType::try_from(n.mapping)) {
            Some(Ok(pb::NatType::None)) => store::NatType::None,
            Some(Ok(pb::NatType::EndpointIndependent)) => store::NatType::EndpointIndependent,
            Some(Ok(pb::NatType::EndpointDependent)) => store::NatType::EndpointDependent,
            Some(Ok(pb::NatType::UdpBlocked)) => store::NatType::UdpBlocked,
            _ => store::NatType::Unknown,
        },
        topics: body.topics.clone(),
        addresses,
        capabilities: body.capabilities.as_ref().map(|c| store::Capabilities {
            os: c.os.clone(),
            arch: c.arch.clone(),
            cpu_cores: c.cpu_cores,
            memory_bytes: c.memory_bytes,
            software_version: c.software_version.clone(),
        }),
        services: body
            .services
            .iter()
            .map(|s| {
                let mut attributes: Vec<(String, String)> =
                    s.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                attributes.sort();
                ServiceEntry { name: s.name.clone(), version: s.version.clone(), attributes }
            })
            .collect(),
    }
}
