//! What the NAT prober asks of the node: the active probes that gather evidence (dial-backs, a second port of
//! a peer, a hairpin), the peers that witness our NAT, and where a verdict is published. The exchange
//! implements [`NatProbes`]; `nat` defines it, so `nat` depends on no part of the exchange.

use std::future::Future;
use std::net::SocketAddr;

use crate::api::names::NodeId;
use crate::wire::pb;

/// A peer with a live connection that does not go through a relay: only these tell us anything about our
/// NAT, and only these can introduce or relay for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witness {
    pub peer: NodeId,
    /// Where its packets come from.
    pub remote: SocketAddr,
    /// The connection came from a punch (not a plain dial in either direction).
    pub punched: bool,
}

/// What the requester learned from one dial-back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialBackOutcome {
    pub helper: NodeId,
    pub kind: pb::DialBackKind,
    /// Whether the helper made the attempt (it may have no second address, or be busy).
    pub attempted: bool,
    /// The address the helper said it dialed from.
    pub declared_from: Option<SocketAddr>,
    /// The address the dial-back arrived from, if it arrived.
    pub arrived_from: Option<SocketAddr>,
    pub detail: String,
    /// Not attempted because the helper was busy with other dial-backs.
    pub busy: bool,
}

/// The node as the prober sees it.
pub trait NatProbes: Send + Sync + 'static {
    /// Why a probe or a reservation failed (logged, never acted on).
    type Error: std::fmt::Display + Send;

    /// The QUIC socket's bound address.
    fn local_addr(&self) -> Option<SocketAddr>;

    /// Directly connected peers.
    fn witnesses(&self) -> Vec<Witness>;

    /// Asks `helper` to dial us back from a fresh 4-tuple and reports whether it arrived.
    fn request_dial_back(
        &self,
        helper: NodeId,
        kind: pb::DialBackKind,
    ) -> impl Future<Output = Result<DialBackOutcome, Self::Error>> + Send;

    /// Pings a second port of `peer` (its DHT socket) and keeps what it saw of us as a mapping sample.
    fn probe_mapping_via_dht(&self, peer: NodeId) -> impl Future<Output = Option<SocketAddr>> + Send;

    /// Whether a connection to our own `external` address comes back (the NAT hairpins).
    fn probe_hairpin(&self, external: SocketAddr) -> impl Future<Output = bool> + Send;

    /// Asks `relay` to relay circuits to us; true once it accepted.
    fn reserve_relay(&self, relay: NodeId) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Re-reads our interface addresses; true when they changed (another network).
    fn refresh_interfaces(&self) -> impl Future<Output = bool> + Send;

    /// Puts a verdict in our signed record.
    fn publish_nat(
        &self,
        node_type: pb::NodeType,
        nat: pb::NatInfo,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Names in our record the peers to ask for an introduction or a circuit (none once we are reachable).
    fn publish_rendezvous(&self, rendezvous: Vec<SocketAddr>) -> impl Future<Output = ()> + Send;

    /// Tries a punch again to every peer reached only through a relay: what we know of our NAT changed.
    fn punch_relayed_peers(&self);
}
