//! Warm start: after a restart the peer store is a bootstrap of its own.
//!
//! A node that restarts while its configured bootstrap nodes are gone (a retired seed, a network that only
//! ever had the nodes now restarting) still knows whom it talked to: the store holds each verified peer's last
//! good address and, in the peer's signed record, the port of its DHT socket. So at start:
//! - [`known_contacts`] reads the peers verified most recently. Their DHT addresses join the DHT's bootstrap
//!   list, so the DHT finds its way back even if no configured bootstrap node answers.
//! - [`reconnect`] dials each of them at its last good address at once, and again on a widening schedule
//!   while it is not connected. Two nodes behind NATs that had punched to each other restart and dial each
//!   other's last public address from their one QUIC socket: each dial opens its own NAT towards the other,
//!   which is a hole punch without a rendezvous as long as the two dials overlap. A dial keeps retransmitting
//!   for its whole timeout (15 s), and the schedule keeps dialing through the first minutes, when the other
//!   side is most likely to come back.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Exchange;
use crate::api::names::NodeId;
use crate::store::{AddressSource, PeerQuery, Store};
use crate::wire::pb;

/// Peers read from the store at start: the most recently seen ones we had verified.
pub const MAX_KNOWN_CONTACTS: usize = 32;
/// Addresses of one peer dialed per round, best first.
const ADDRESSES_PER_PEER: usize = 2;
/// Waits between reconnect rounds: the first round runs at start, the last about ten minutes later.
const ROUND_DELAYS: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(40),
    Duration::from_secs(80),
    Duration::from_secs(160),
    Duration::from_secs(300),
];

/// A peer we verified before, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownPeer {
    pub node_id: NodeId,
    /// Where we reached it, the last success first.
    pub addresses: Vec<SocketAddr>,
    /// Its DHT socket: the port its record names on the IP we last reached it at.
    pub dht: Option<SocketAddr>,
}

/// The peers we verified most recently (at most [`MAX_KNOWN_CONTACTS`]), newest first. Store errors only make
/// the list shorter: a warm start is a bonus, never a reason not to start.
pub async fn known_contacts(store: &Store) -> Vec<KnownPeer> {
    let query = PeerQuery { limit: (MAX_KNOWN_CONTACTS * 2) as u32, ..PeerQuery::default() };
    let page = match store.list_peers(query).await {
        Ok(page) => page,
        Err(error) => {
            tracing::warn!(%error, "could not read known peers for the warm start");
            return Vec::new();
        }
    };
    let mut known = Vec::new();
    for summary in page.peers {
        if known.len() >= MAX_KNOWN_CONTACTS {
            break;
        }
        let Ok(Some(detail)) = store.get_peer(summary.node_id).await else { continue };
        // Only addresses that worked once: a record's other addresses (private ones of another network) would
        // only cost dial timeouts.
        let addresses: Vec<SocketAddr> = detail
            .addresses
            .iter()
            .filter(|row| row.last_success_ms.is_some())
            .map(|row| row.address)
            .collect();
        let Some(best) = addresses.first().copied() else { continue };
        let dht_port = pb::SignedRecord::decode(detail.record.as_slice())
            .ok()
            .and_then(|signed| pb::RecordBody::decode(signed.body.as_slice()).ok())
            .and_then(|body| u16::try_from(body.dht_port).ok())
            .filter(|port| *port != 0);
        // A peer behind a NAT runs a read-only DHT node that answers nobody: no bootstrap node.
        let serves_dht = detail.summary.node_type != crate::store::NodeType::Private;
        let dht =
            dht_port.filter(|_| best.is_ipv4() && serves_dht).map(|port| SocketAddr::new(best.ip(), port));
        known.push(KnownPeer { node_id: summary.node_id, addresses, dht });
    }
    known
}

/// Dials every known peer that is not connected, now and then on the schedule of [`ROUND_DELAYS`], until
/// each is connected or the schedule ends.
pub async fn reconnect(exchange: Exchange, peers: Vec<KnownPeer>, shutdown: CancellationToken) {
    if peers.is_empty() {
        return;
    }
    tracing::info!(peers = peers.len(), "warm start: dialing peers known from the store");
    let mut delays = ROUND_DELAYS.iter();
    loop {
        let waiting: Vec<&KnownPeer> =
            peers.iter().filter(|peer| exchange.session_info(&peer.node_id).is_none()).collect();
        if waiting.is_empty() {
            tracing::info!("warm start: every known peer is connected");
            return;
        }
        let mut dials = JoinSet::new();
        for peer in waiting {
            let exchange = exchange.clone();
            let peer = peer.clone();
            dials.spawn(async move {
                for address in peer.addresses.iter().take(ADDRESSES_PER_PEER) {
                    match exchange.connect(*address, AddressSource::Record).await {
                        Ok(verified) if verified.node_id == peer.node_id => return,
                        // Someone else answers there now: the peer moved. Its other addresses may still work.
                        Ok(_) => {}
                        Err(error) => {
                            tracing::debug!(peer = %peer.node_id, %address, %error, "warm start dial failed")
                        }
                    }
                }
            });
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = async { while dials.join_next().await.is_some() {} } => {}
        }
        let Some(delay) = delays.next() else {
            tracing::info!("warm start: reconnect schedule over; discovery takes it from here");
            return;
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(*delay) => {}
        }
    }
}
