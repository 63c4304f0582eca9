//! NAT classification: from what peers and helpers observed about our QUIC socket, decide how the NAT (or
//! firewall) in front of it behaves and so how other nodes can reach us. Pure logic: no IO, no clock; the caller
//! collects [`Observations`] and calls [`classify`] again whenever they change.
//!
//! # Model
//!
//! The terms are those of RFC 4787 (NAT behavioral requirements for unicast UDP):
//!
//! - *Mapping* (§4.1). When our socket sends to a remote endpoint, the NAT gives the flow an external address.
//!   Endpoint-independent mapping reuses one external address for every destination. Address-dependent and
//!   address-and-port-dependent mapping give each destination IP (or IP and port) its own; both are reported as
//!   [`Mapping::EndpointDependent`], since both stop a peer from reaching us at an address another peer saw.
//!   For those the port assignment (§4.2) decides whether the next external port can be predicted.
//! - *Filtering* (§5): which inbound packets a mapping lets through. Endpoint-independent filtering admits any
//!   source; address-dependent filtering only IPs we sent to; address-and-port-dependent filtering only the
//!   exact endpoints we sent to.
//! - *Hairpinning* (§6): whether a packet we send to our own external address comes back to us.
//!
//! The tests are those of RFC 5780 (§4.3 mapping, §4.4 filtering), run with peers instead of a STUN server.
//!
//! # Sources of truth
//!
//! - **Mapping**: peers report the source address they see for us ([`MappingObservation`]). Any peer can lie,
//!   so each distinct destination IP is one witness, the way [`crate::nat::observed::ObservedAddresses`]
//!   confirms an address only by distinct reporters. At least [`MIN_DESTINATION_IPS`] witnesses are needed:
//!   several ports of one IP cannot tell endpoint-independent from address-dependent mapping. An address named
//!   by a strict majority of the witnesses (and at least two) is our endpoint-independent external address;
//!   the others are outvoted as lying or stale. Witnesses that all saw different addresses show an
//!   endpoint-dependent mapping. That includes a single witness whose ports saw us at different addresses
//!   (the node pings a public peer's DHT port from its QUIC socket, within minutes of the peer's report on the
//!   connection): a network with one public node has no second witness. A lying witness can make us look
//!   endpoint-dependent, which costs a birthday punch where a plain one would do, or a relay where a birthday
//!   punch with another random-port NAT would have worked; it cannot make us look reachable. Anything else is
//!   a conflict and stays unknown.
//! - **Filtering**: a helper sends to our external address ([`DialBack`]). What a dial-back proves depends on
//!   where it came from, judged against every endpoint our socket has sent to ([`Observations::contacted`]),
//!   never on what the helper says it did. One from an endpoint we already talk to passes every filter and
//!   proves nothing (libp2p's AutoNAT once called firewalled nodes public that way). One from another port of
//!   an IP we talk to that arrives rules out address-and-port-dependent filtering; one from an IP we never sent
//!   to that arrives proves endpoint-independent filtering. A dial-back that did not arrive counts only when the
//!   same helper's control probe (from the helper's own endpoint) arrived, so a broken helper or path cannot
//!   make us look more restricted than we are. An arrival wins over a loss, as in RFC 5780 §4.4: a datagram
//!   can be dropped on the way, but one from a fresh source cannot arrive by accident.
//! - **Hairpinning**: a probe we sent to our own external address ([`HairpinProbe`]). A probe that did not come
//!   back counts only when it went to an address the mapping verdict trusts, so a failed probe to an address a
//!   lying peer made up does not read as "not supported".
//! - **UDP blocked**: public peers we tried over UDP and none answered, with no other sign of life.
//!
//! # Rules
//!
//! - Every verdict has an `Unknown` state, used whenever the evidence is insufficient or conflicting; nothing is
//!   guessed. Verdicts get firmer as [`classify`] is re-run on more observations.
//! - Reports from private destination addresses (LAN peers, and peers behind the same carrier-grade NAT) are
//!   ignored: they reach us without crossing the outer NAT. So is a private observed address: a public peer
//!   cannot have seen one.
//! - Several NATs in a row look like the outermost one: inner NATs only change what the outer one sees as our
//!   source. Endpoint-independent over endpoint-independent is endpoint-independent; any endpoint-dependent
//!   layer makes the whole endpoint-dependent.
//! - A NAT that keeps the source port for every destination (Linux masquerading, for one) is endpoint-dependent
//!   by design but cannot be told apart from endpoint-independent mapping, and behaves like it for us.
//! - No address translation ([`Mapping::NoTranslation`]) is concluded only when the agreed address is one of
//!   our public interface addresses with our local port. A public address that is not on an interface is a NAT.
//! - Public reachability needs proof that an unsolicited packet gets in: a dial-back from a fresh IP that
//!   arrived. Without it, even a host with no translation may sit behind a stateful firewall.
//! - One verdict covers one address family, the family of [`Observations::local`]; reports in the other are
//!   ignored. IPv4-mapped IPv6 addresses are read as IPv4.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound::Excluded;

use crate::nat::observed::is_private;

/// Distinct destination IPs (witnesses) that must report before the mapping is classified.
pub const MIN_DESTINATION_IPS: usize = 2;
/// Distinct endpoint-dependent mappings needed to judge port allocation: two steps to compare.
pub const MIN_MAPPINGS_FOR_ALLOCATION: usize = 3;
/// Peers tried over UDP, none answering, before UDP is called blocked.
pub const MIN_SILENT_PEERS_FOR_BLOCKED: u32 = 3;

/// Items shown before `explain` abbreviates a list ("and 3 more").
pub(super) const LISTED: usize = 4;

// ---------------------------------------------------------------------------------------------------------------
// Inputs

/// One peer's report of the source address it sees for our socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MappingObservation {
    /// Position of `destination` in the order our socket first sent to each new remote endpoint, counting every
    /// endpoint, answered or not. Port allocation is measured per step of this counter: an endpoint that never
    /// reported counts as a step (it may have taken a port), one that reported a mapping created earlier does not.
    pub seq: u64,
    /// The peer's endpoint: where our socket sent to.
    pub destination: SocketAddr,
    /// The source address the peer saw for us.
    pub observed: SocketAddr,
}

/// The result of asking a helper to send to our external address (RFC 5780 §4.4). What it proves is derived from
/// `from` and [`Observations::contacted`], never from what the helper says it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialBack {
    /// The helper we asked: an endpoint our socket talks to. Its control probe comes from an endpoint we already
    /// sent to (normally `helper` itself) and shows that this helper can reach us at all.
    pub helper: SocketAddr,
    /// Where the probe came from. For one that arrived: the source address of the datagram we received. For one
    /// that did not: the source the helper said it would use.
    pub from: SocketAddr,
    /// Whether it arrived before its deadline.
    pub arrived: bool,
}

/// A probe our socket sent to our own external address (RFC 4787 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HairpinProbe {
    /// The external address it was sent to.
    pub target: SocketAddr,
    /// Whether it came back to our socket before its deadline.
    pub arrived: bool,
}

/// Everything known about our one QUIC socket. Time is the caller's business: pass only evidence that still
/// describes the network as it is (mappings still alive, tests run since the last change of network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observations {
    /// The socket's bound address; its IP may be unspecified (wildcard bind). Its family selects which reports
    /// count.
    pub local: SocketAddr,
    /// Addresses of our network interfaces.
    pub interfaces: Vec<IpAddr>,
    /// Peers' reports of our source address.
    pub mappings: Vec<MappingObservation>,
    /// Every remote endpoint the socket has sent to within the NAT's filter lifetime; a superset (everything
    /// since the socket opened) is safe. Destinations of `mappings` and helpers of `dial_backs` are added
    /// automatically.
    pub contacted: Vec<SocketAddr>,
    /// Dial-back results, any number of helpers.
    pub dial_backs: Vec<DialBack>,
    /// Hairpin probes.
    pub hairpin: Vec<HairpinProbe>,
    /// Distinct peers at public addresses we sent to over this socket.
    pub peers_tried: u32,
    /// Of those, the ones that answered at all.
    pub peers_answered: u32,
}

impl Observations {
    /// No observations yet for the socket bound at `local`.
    pub fn new(local: SocketAddr) -> Self {
        Self {
            local,
            interfaces: Vec::new(),
            mappings: Vec::new(),
            contacted: Vec::new(),
            dial_backs: Vec::new(),
            hairpin: Vec::new(),
            peers_tried: 0,
            peers_answered: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Verdicts

/// Whether UDP gets through at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Udp {
    /// No peer tried yet, or too few to call it blocked.
    Unknown,
    /// Something answered.
    Works,
    /// At least [`MIN_SILENT_PEERS_FOR_BLOCKED`] peers tried and nothing ever answered.
    Blocked,
}

/// How the outermost NAT maps our socket to external addresses (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Too few witnesses, or conflicting reports.
    Unknown,
    /// Peers see our own public interface address and local port: no address translation.
    NoTranslation,
    /// One external address for every destination.
    EndpointIndependent,
    /// A different external address per destination (address-dependent or address-and-port-dependent).
    EndpointDependent(PortAllocation),
}

/// How an endpoint-dependent NAT picks the external port of each new mapping (RFC 4787 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAllocation {
    /// Fewer than [`MIN_MAPPINGS_FOR_ALLOCATION`] mappings, or their creation order is unclear.
    Unknown,
    /// Each new mapping's port is the previous one plus `delta` per new destination (negative: counting down).
    Sequential { delta: i32 },
    /// No constant step, or the external IP changes between mappings: the next port cannot be predicted.
    Unpredictable,
}

/// Which unsolicited packets reach us through a mapping (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Not tested, or the tests so far cannot tell (see [`Evidence::fresh_ip`] and [`Evidence::other_port`]).
    Unknown,
    /// A dial-back from an IP we never sent to arrived.
    EndpointIndependent,
    /// Another port of an IP we sent to gets through; an IP we never sent to does not.
    AddressDependent,
    /// Only the exact endpoints we sent to get through.
    AddressAndPortDependent,
}

/// Whether the NAT loops a packet sent to our own external address back to us (RFC 4787 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hairpin {
    /// Not tested, or tested against an address not known to be ours.
    Unknown,
    Supported,
    NotSupported,
}

/// How other nodes can reach us, the verdict the node acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Not enough evidence yet.
    Unknown,
    /// Dialable directly at [`NatVerdict::external_address`]: no translation or endpoint-independent mapping,
    /// and a dial-back from a fresh IP arrived.
    Public,
    /// Reachable by hole punching: endpoint-independent mapping (or none) behind restricted filtering, or
    /// endpoint-dependent mapping with sequential ports.
    PrivatePunchable,
    /// Needs a relay: endpoint-dependent mapping with unpredictable ports, or UDP blocked.
    PrivateHard,
}

/// The results of one kind of dial-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeResults {
    /// Source of one that arrived.
    pub arrived_from: Option<SocketAddr>,
    /// Source of one that did not arrive although the same helper's control probe did.
    pub blocked_from: Option<SocketAddr>,
}

/// What the verdicts rest on; [`NatVerdict::explain`] words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// Our socket's address (IPv4-mapped addresses read as IPv4).
    pub local: SocketAddr,
    /// Reports that counted, in creation order.
    pub mappings: Vec<MappingObservation>,
    /// Reports left out: port 0, the other address family, or a private address on either side.
    pub ignored_mappings: usize,
    /// Distinct destination IPs among the counted reports: the witnesses.
    pub destination_ips: usize,
    /// Witnesses that saw only the most-reported address.
    pub agreeing_ips: usize,
    /// Dial-backs from an IP our socket never sent to.
    pub fresh_ip: ProbeResults,
    /// Dial-backs from another port of an IP our socket sent to.
    pub other_port: ProbeResults,
    /// Dial-backs from an endpoint we already sent to that arrived: they show a helper reaches us, nothing more.
    pub existing_tuple_arrivals: usize,
    /// Dial-backs that say nothing: failures without a working control, failed controls, private sources,
    /// the other address family.
    pub discarded_dial_backs: usize,
    /// The hairpin probe the verdict rests on, or the first one when none could be used.
    pub hairpin_probe: Option<HairpinProbe>,
    /// [`Observations::peers_tried`].
    pub peers_tried: u32,
    /// [`Observations::peers_answered`].
    pub peers_answered: u32,
}

/// The classification of our socket's NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatVerdict {
    pub udp: Udp,
    pub mapping: Mapping,
    /// The address every peer sees us at: set exactly when the mapping is endpoint-independent or absent.
    pub external_address: Option<SocketAddr>,
    /// Whether the NAT kept our local port: for endpoint-dependent mapping, in every mapping. `None` while the
    /// mapping is unknown or our local port is (port 0).
    pub port_preservation: Option<bool>,
    pub filtering: Filtering,
    pub hairpin: Hairpin,
    pub reachability: Reachability,
    pub evidence: Evidence,
}

// ---------------------------------------------------------------------------------------------------------------
// Classification

/// Classifies the NAT in front of our socket from everything observed about it. Total: any input gives a verdict,
/// with `Unknown` wherever the evidence does not decide.
pub fn classify(observations: &Observations) -> NatVerdict {
    let local = canonical(observations.local);
    let in_family = |ip: IpAddr| ip.is_ipv4() == local.ip().is_ipv4();

    let (counted, ignored_mappings) = usable_mappings(&observations.mappings, in_family);

    let interfaces: Vec<IpAddr> = observations.interfaces.iter().map(|ip| ip.to_canonical()).collect();
    let mapped = classify_mapping(&counted, local, &interfaces);

    let mut contacted: BTreeSet<SocketAddr> = observations.contacted.iter().copied().map(canonical).collect();
    contacted.extend(observations.mappings.iter().map(|m| canonical(m.destination)));
    contacted.extend(observations.dial_backs.iter().map(|d| canonical(d.helper)));
    let filtered = classify_filtering(&observations.dial_backs, &contacted, in_family);

    let (hairpin, hairpin_probe) =
        classify_hairpin(&observations.hairpin, mapped.mapping, mapped.external, &counted, in_family);

    // Only answers from public addresses count: a LAN peer answering says nothing about the way out.
    let answered = observations.peers_answered > 0
        || !counted.is_empty()
        || filtered.existing_tuple_arrivals > 0
        || filtered.fresh_ip.arrived_from.is_some()
        || filtered.other_port.arrived_from.is_some();
    let udp = if answered {
        Udp::Works
    } else if observations.peers_tried >= MIN_SILENT_PEERS_FOR_BLOCKED {
        Udp::Blocked
    } else {
        Udp::Unknown
    };

    let port_preservation = match mapped.mapping {
        _ if local.port() == 0 => None,
        Mapping::Unknown => None,
        Mapping::NoTranslation => Some(true),
        Mapping::EndpointIndependent => mapped.external.map(|a| a.port() == local.port()),
        Mapping::EndpointDependent(_) => Some(counted.iter().all(|m| m.observed.port() == local.port())),
    };

    let fresh_ip_blocked = filtered.fresh_ip.blocked_from.is_some();
    let reachability = decide_reachability(udp, mapped.mapping, filtered.filtering, fresh_ip_blocked);

    NatVerdict {
        udp,
        mapping: mapped.mapping,
        external_address: mapped.external,
        port_preservation,
        filtering: filtered.filtering,
        hairpin,
        reachability,
        evidence: Evidence {
            local,
            mappings: counted,
            ignored_mappings,
            destination_ips: mapped.destination_ips,
            agreeing_ips: mapped.agreeing_ips,
            fresh_ip: filtered.fresh_ip,
            other_port: filtered.other_port,
            existing_tuple_arrivals: filtered.existing_tuple_arrivals,
            discarded_dial_backs: filtered.discarded,
            hairpin_probe,
            peers_tried: observations.peers_tried,
            peers_answered: observations.peers_answered,
        },
    }
}

/// The reports that count (canonical, deduplicated, in order), and how many were set aside.
fn usable_mappings(
    reports: &[MappingObservation],
    in_family: impl Fn(IpAddr) -> bool,
) -> (Vec<MappingObservation>, usize) {
    let mut counted: Vec<MappingObservation> = Vec::new();
    let mut ignored = 0;
    for report in reports {
        let report = MappingObservation {
            seq: report.seq,
            destination: canonical(report.destination),
            observed: canonical(report.observed),
        };
        if is_usable_report(&report, &in_family) {
            counted.push(report);
        } else {
            ignored += 1;
        }
    }
    counted.sort();
    counted.dedup();
    (counted, ignored)
}

/// IPv4-mapped IPv6 addresses as plain IPv4, so one host has one form.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// A report describes the outer NAT only if it came from a public peer in our family and names a public address.
fn is_usable_report(report: &MappingObservation, in_family: impl Fn(IpAddr) -> bool) -> bool {
    let (destination, observed) = (report.destination, report.observed);
    destination.port() != 0
        && observed.port() != 0
        && in_family(destination.ip())
        && in_family(observed.ip())
        && !is_private(destination.ip())
        && !is_private(observed.ip())
        && !destination.ip().is_multicast()
        && !observed.ip().is_multicast()
}

/// Each witness (destination IP) with every address it reported.
pub(super) fn witnesses(counted: &[MappingObservation]) -> BTreeMap<IpAddr, BTreeSet<SocketAddr>> {
    let mut witnesses: BTreeMap<IpAddr, BTreeSet<SocketAddr>> = BTreeMap::new();
    for report in counted {
        witnesses.entry(report.destination.ip()).or_default().insert(report.observed);
    }
    witnesses
}

/// Each distinct external address once, with the order it was created in (the lowest `seq` reporting it) and
/// the first destination that reported it, sorted by creation.
pub(super) fn mappings_by_creation(counted: &[MappingObservation]) -> Vec<(u64, SocketAddr, SocketAddr)> {
    let mut first: BTreeMap<SocketAddr, (u64, SocketAddr)> = BTreeMap::new();
    for report in counted {
        let entry = first.entry(report.observed).or_insert((report.seq, report.destination));
        if report.seq < entry.0 {
            *entry = (report.seq, report.destination);
        }
    }
    let mut created: Vec<(u64, SocketAddr, SocketAddr)> =
        first.into_iter().map(|(observed, (seq, destination))| (seq, observed, destination)).collect();
    created.sort();
    created
}

struct MappingResult {
    mapping: Mapping,
    external: Option<SocketAddr>,
    destination_ips: usize,
    agreeing_ips: usize,
}

fn classify_mapping(
    counted: &[MappingObservation],
    local: SocketAddr,
    interfaces: &[IpAddr],
) -> MappingResult {
    let witnesses = witnesses(counted);
    let destination_ips = witnesses.len();

    // A witness votes for an address only if that is all it saw; one that saw several votes for none.
    let mut votes: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    let mut seen_by: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for seen in witnesses.values() {
        if let (1, Some(only)) = (seen.len(), seen.first()) {
            *votes.entry(*only).or_default() += 1;
        }
        for address in seen {
            *seen_by.entry(*address).or_default() += 1;
        }
    }
    // Most votes; among equals the lowest address, so the result does not depend on input order.
    let leader = votes.iter().fold(None, |best: Option<(SocketAddr, usize)>, (address, count)| match best {
        Some((_, best_count)) if best_count >= *count => best,
        _ => Some((*address, *count)),
    });
    let agreeing_ips = leader.map_or(0, |(_, count)| count);
    let result = |mapping, external| MappingResult { mapping, external, destination_ips, agreeing_ips };

    if destination_ips < MIN_DESTINATION_IPS {
        // A single witness cannot vote for an address, but if two of its ports saw us at two addresses our NAT
        // maps per destination port (address-and-port-dependent, RFC 4787 section 4.1), which a network with
        // one public node can still show.
        if destination_ips == 1 && witnesses.values().all(|seen| seen.len() >= 2) {
            return result(Mapping::EndpointDependent(port_allocation(counted)), None);
        }
        return result(Mapping::Unknown, None);
    }
    if let Some((address, count)) = leader
        && count >= MIN_DESTINATION_IPS
        && count * 2 > destination_ips
    {
        let on_our_interface = local.port() != 0
            && address.port() == local.port()
            && (address.ip() == local.ip() || interfaces.contains(&address.ip()));
        let mapping = if on_our_interface { Mapping::NoTranslation } else { Mapping::EndpointIndependent };
        return result(mapping, Some(address));
    }
    if seen_by.values().all(|&count| count == 1) {
        return result(Mapping::EndpointDependent(port_allocation(counted)), None);
    }
    result(Mapping::Unknown, None)
}

/// Whether the ports of successive endpoint-dependent mappings follow a constant step per new destination.
///
/// Steps are counted in `seq`: a destination that never reported may still have taken a port, so it counts as a
/// step; one that reported an address created earlier (an address-dependent NAT reusing a mapping for another
/// port of the same IP) demonstrably took none, so it does not.
fn port_allocation(counted: &[MappingObservation]) -> PortAllocation {
    let created = mappings_by_creation(counted);
    if created.len() < MIN_MAPPINGS_FOR_ALLOCATION {
        return PortAllocation::Unknown;
    }
    let creation_seqs: BTreeMap<SocketAddr, u64> =
        created.iter().map(|(seq, observed, _)| (*observed, *seq)).collect();
    let reusing_seqs: BTreeSet<u64> = counted
        .iter()
        .filter(|m| creation_seqs.get(&m.observed).is_some_and(|created_at| m.seq > *created_at))
        .map(|m| m.seq)
        .collect();
    // Two mappings created at one step, or one step both creating and reusing: the order is unclear.
    if created.windows(2).any(|pair| matches!(pair, [(a, ..), (b, ..)] if a == b))
        || created.iter().any(|(seq, ..)| reusing_seqs.contains(seq))
    {
        return PortAllocation::Unknown;
    }
    let mut external_ips = created.iter().map(|(_, observed, _)| observed.ip());
    let first_ip = external_ips.next();
    if external_ips.any(|ip| Some(ip) != first_ip) {
        return PortAllocation::Unpredictable;
    }
    let mut step: Option<i64> = None;
    for pair in created.windows(2) {
        let [(seq_a, a, _), (seq_b, b, _)] = pair else { continue };
        let reused_between = reusing_seqs.range((Excluded(*seq_a), Excluded(*seq_b))).count();
        let steps = seq_b
            .checked_sub(*seq_a)
            .and_then(|gap| gap.checked_sub(u64::try_from(reused_between).ok()?))
            .and_then(|steps| i64::try_from(steps).ok());
        let Some(steps @ 1..) = steps else {
            return PortAllocation::Unknown;
        };
        let port_gap = i64::from(b.port()) - i64::from(a.port());
        if port_gap % steps != 0 {
            return PortAllocation::Unpredictable;
        }
        let this_step = port_gap / steps;
        if this_step == 0 || step.is_some_and(|s| s != this_step) {
            return PortAllocation::Unpredictable;
        }
        step = Some(this_step);
    }
    match step.map(i32::try_from) {
        Some(Ok(delta)) => PortAllocation::Sequential { delta },
        _ => PortAllocation::Unknown,
    }
}

/// What a dial-back's source is to the NAT's filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DialBackSource {
    /// An endpoint our socket sent to: passes every filter.
    ExistingTuple,
    /// Another port of an IP our socket sent to: passes address-dependent filtering.
    OtherPort,
    /// An IP our socket never sent to: passes only endpoint-independent filtering.
    FreshIp,
}

struct FilteringResult {
    filtering: Filtering,
    fresh_ip: ProbeResults,
    other_port: ProbeResults,
    existing_tuple_arrivals: usize,
    discarded: usize,
}

fn classify_filtering(
    dial_backs: &[DialBack],
    contacted: &BTreeSet<SocketAddr>,
    in_family: impl Fn(IpAddr) -> bool,
) -> FilteringResult {
    let contacted_ips: BTreeSet<IpAddr> = contacted.iter().map(|a| a.ip()).collect();
    let source_of = |from: SocketAddr| {
        if contacted.contains(&from) {
            DialBackSource::ExistingTuple
        } else if contacted_ips.contains(&from.ip()) {
            DialBackSource::OtherPort
        } else {
            DialBackSource::FreshIp
        }
    };
    let mut discarded = 0;
    let mut usable: Vec<(DialBack, DialBackSource)> = Vec::new();
    for dial_back in dial_backs {
        let (helper, from) = (canonical(dial_back.helper), canonical(dial_back.from));
        // A private source or helper reaches us without crossing the outer NAT.
        if in_family(helper.ip())
            && in_family(from.ip())
            && !is_private(helper.ip())
            && !is_private(from.ip())
        {
            usable.push((DialBack { helper, from, arrived: dial_back.arrived }, source_of(from)));
        } else {
            discarded += 1;
        }
    }
    let working_helpers: BTreeSet<SocketAddr> = usable
        .iter()
        .filter(|(d, source)| d.arrived && *source == DialBackSource::ExistingTuple)
        .map(|(d, _)| d.helper)
        .collect();

    let (mut fresh_ip, mut other_port) = (ProbeResults::default(), ProbeResults::default());
    let mut existing_tuple_arrivals = 0;
    for (dial_back, source) in &usable {
        let results = match source {
            DialBackSource::ExistingTuple => {
                if dial_back.arrived {
                    existing_tuple_arrivals += 1;
                } else {
                    discarded += 1;
                }
                continue;
            }
            DialBackSource::OtherPort => &mut other_port,
            DialBackSource::FreshIp => &mut fresh_ip,
        };
        if dial_back.arrived {
            results.arrived_from.get_or_insert(dial_back.from);
        } else if working_helpers.contains(&dial_back.helper) {
            results.blocked_from.get_or_insert(dial_back.from);
        } else {
            discarded += 1;
        }
    }

    // RFC 5780 §4.4 order: a fresh IP getting through settles it; otherwise the other-port test decides.
    let filtering = if fresh_ip.arrived_from.is_some() {
        Filtering::EndpointIndependent
    } else if other_port.arrived_from.is_some() {
        if fresh_ip.blocked_from.is_some() { Filtering::AddressDependent } else { Filtering::Unknown }
    } else if other_port.blocked_from.is_some() {
        Filtering::AddressAndPortDependent
    } else {
        Filtering::Unknown
    };
    FilteringResult { filtering, fresh_ip, other_port, existing_tuple_arrivals, discarded }
}

fn classify_hairpin(
    probes: &[HairpinProbe],
    mapping: Mapping,
    external: Option<SocketAddr>,
    counted: &[MappingObservation],
    in_family: impl Fn(IpAddr) -> bool,
) -> (Hairpin, Option<HairpinProbe>) {
    let probes: Vec<HairpinProbe> = probes
        .iter()
        .map(|p| HairpinProbe { target: canonical(p.target), arrived: p.arrived })
        .filter(|p| in_family(p.target.ip()))
        .collect();
    if let Some(probe) = probes.iter().find(|p| p.arrived) {
        return (Hairpin::Supported, Some(*probe));
    }
    let is_ours = |target: SocketAddr| {
        Some(target) == external
            || (matches!(mapping, Mapping::EndpointDependent(_))
                && counted.iter().any(|m| m.observed == target))
    };
    match probes.iter().find(|p| is_ours(p.target)) {
        Some(probe) => (Hairpin::NotSupported, Some(*probe)),
        None => (Hairpin::Unknown, probes.first().copied()),
    }
}

fn decide_reachability(
    udp: Udp,
    mapping: Mapping,
    filtering: Filtering,
    fresh_ip_blocked: bool,
) -> Reachability {
    if udp == Udp::Blocked {
        return Reachability::PrivateHard;
    }
    match mapping {
        Mapping::Unknown => Reachability::Unknown,
        Mapping::NoTranslation | Mapping::EndpointIndependent => match filtering {
            Filtering::EndpointIndependent => Reachability::Public,
            Filtering::AddressDependent | Filtering::AddressAndPortDependent => {
                Reachability::PrivatePunchable
            }
            Filtering::Unknown if fresh_ip_blocked => Reachability::PrivatePunchable,
            Filtering::Unknown => Reachability::Unknown,
        },
        Mapping::EndpointDependent(PortAllocation::Sequential { .. }) => Reachability::PrivatePunchable,
        Mapping::EndpointDependent(PortAllocation::Unpredictable) => Reachability::PrivateHard,
        Mapping::EndpointDependent(PortAllocation::Unknown) => Reachability::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::explain::list;

    use Filtering as F;
    use PortAllocation as P;
    use Reachability as R;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip address")
    }

    /// Peers the node talks to: four public IPs, QUIC on port 4433.
    const PEERS: [&str; 4] =
        ["203.0.113.10:4433", "203.0.113.11:4433", "203.0.113.12:4433", "203.0.113.13:4433"];
    /// The helper is the first peer. It can also send from another port, and from a second IP we never sent to.
    const HELPER: &str = "203.0.113.10:4433";
    const HELPER_OTHER_PORT: &str = "203.0.113.10:4434";
    const FRESH_IP: &str = "192.0.2.50:3478";

    /// Our NAT's external address with `port`.
    fn nat(port: u16) -> String {
        format!("198.51.100.1:{port}")
    }

    /// A node behind a home router: socket on 192.168.1.10:5000, all four peers contacted and answering.
    fn behind_nat() -> Observations {
        let mut o = Observations::new(addr("192.168.1.10:5000"));
        o.interfaces = vec![ip("192.168.1.10")];
        o.contacted = PEERS.iter().map(|p| addr(p)).collect();
        o.peers_tried = 4;
        o.peers_answered = 4;
        o
    }

    /// A host with a public interface address, socket on 198.51.100.7:4433.
    fn public_host() -> Observations {
        let mut o = behind_nat();
        o.local = addr("198.51.100.7:4433");
        o.interfaces = vec![ip("198.51.100.7"), ip("127.0.0.1")];
        o
    }

    fn dial(helper: &str, from: &str, arrived: bool) -> DialBack {
        DialBack { helper: addr(helper), from: addr(from), arrived }
    }

    /// The three RFC 5780 §4.4 probes from the helper: control (arrives), another port, a fresh IP.
    fn probes(other_port_arrives: bool, fresh_ip_arrives: bool) -> Vec<DialBack> {
        vec![
            dial(HELPER, HELPER, true),
            dial(HELPER, HELPER_OTHER_PORT, other_port_arrives),
            dial(HELPER, FRESH_IP, fresh_ip_arrives),
        ]
    }
    fn open_filter() -> Vec<DialBack> {
        probes(true, true)
    }
    fn address_filter() -> Vec<DialBack> {
        probes(true, false)
    }
    fn port_filter() -> Vec<DialBack> {
        probes(false, false)
    }

    /// Test-only builders, so each table row reads as one setup.
    trait Setup {
        /// Peer `PEERS[i]`, contacted `i + 1`-th, saw us at the matching address.
        fn saw(self, peers: &[usize], observed: &[&str]) -> Self;
        /// Every listed peer saw us at `observed`.
        fn all_saw(self, peers: &[usize], observed: &str) -> Self;
        fn report(self, seq: u64, destination: &str, observed: &str) -> Self;
        fn dial_backs(self, dial_backs: Vec<DialBack>) -> Self;
        fn hairpin(self, target: &str, arrived: bool) -> Self;
        fn with(self, change: impl FnOnce(&mut Observations)) -> Self;
    }

    impl Setup for Observations {
        fn saw(mut self, peers: &[usize], observed: &[&str]) -> Self {
            for (&i, observed) in peers.iter().zip(observed) {
                self = self.report(i as u64 + 1, PEERS[i], observed);
            }
            self
        }
        fn all_saw(self, peers: &[usize], observed: &str) -> Self {
            self.saw(peers, &vec![observed; peers.len()])
        }
        fn report(mut self, seq: u64, destination: &str, observed: &str) -> Self {
            self.mappings.push(MappingObservation {
                seq,
                destination: addr(destination),
                observed: addr(observed),
            });
            self
        }
        fn dial_backs(mut self, dial_backs: Vec<DialBack>) -> Self {
            self.dial_backs = dial_backs;
            self
        }
        fn hairpin(mut self, target: &str, arrived: bool) -> Self {
            self.hairpin.push(HairpinProbe { target: addr(target), arrived });
            self
        }
        fn with(mut self, change: impl FnOnce(&mut Observations)) -> Self {
            change(&mut self);
            self
        }
    }

    /// The verdict a row expects (everything but the evidence).
    #[derive(Debug, PartialEq)]
    struct Want {
        udp: Udp,
        mapping: Mapping,
        external: Option<SocketAddr>,
        port_preservation: Option<bool>,
        filtering: Filtering,
        hairpin: Hairpin,
        reachability: Reachability,
    }

    impl Want {
        fn of(v: &NatVerdict) -> Self {
            Self {
                udp: v.udp,
                mapping: v.mapping,
                external: v.external_address,
                port_preservation: v.port_preservation,
                filtering: v.filtering,
                hairpin: v.hairpin,
                reachability: v.reachability,
            }
        }
        fn new(
            mapping: Mapping,
            external: Option<&str>,
            filtering: Filtering,
            reachability: Reachability,
        ) -> Self {
            let port_preservation =
                (mapping != Mapping::Unknown).then_some(mapping == Mapping::NoTranslation);
            Self {
                udp: Udp::Works,
                mapping,
                external: external.map(addr),
                port_preservation,
                filtering,
                hairpin: Hairpin::Unknown,
                reachability,
            }
        }
        fn preserved(self) -> Self {
            Self { port_preservation: Some(true), ..self }
        }
        fn hairpin(self, hairpin: Hairpin) -> Self {
            Self { hairpin, ..self }
        }
        fn udp(self, udp: Udp) -> Self {
            Self { udp, ..self }
        }
    }

    fn no_nat(external: &str, filtering: Filtering, reachability: Reachability) -> Want {
        Want::new(Mapping::NoTranslation, Some(external), filtering, reachability)
    }
    fn eim(external: &str, filtering: Filtering, reachability: Reachability) -> Want {
        Want::new(Mapping::EndpointIndependent, Some(external), filtering, reachability)
    }
    fn edm(allocation: PortAllocation, filtering: Filtering, reachability: Reachability) -> Want {
        Want::new(Mapping::EndpointDependent(allocation), None, filtering, reachability)
    }
    fn unknown(filtering: Filtering, reachability: Reachability) -> Want {
        Want::new(Mapping::Unknown, None, filtering, reachability)
    }

    fn cases() -> Vec<(&'static str, Observations, Want)> {
        let me = "198.51.100.7:4433";
        let ext = nat(40000);
        let ext = ext.as_str();
        vec![
            // No NAT.
            (
                "public host",
                public_host().all_saw(&[0, 1], me).dial_backs(open_filter()),
                no_nat(me, F::EndpointIndependent, R::Public),
            ),
            (
                "public host, wildcard bind",
                public_host()
                    .with(|o| o.local = addr("0.0.0.0:4433"))
                    .all_saw(&[0, 1, 2], me)
                    .dial_backs(open_filter())
                    .hairpin(me, true),
                no_nat(me, F::EndpointIndependent, R::Public).hairpin(Hairpin::Supported),
            ),
            (
                "public host behind a stateful firewall",
                public_host().all_saw(&[0, 1], me).dial_backs(port_filter()),
                no_nat(me, F::AddressAndPortDependent, R::PrivatePunchable),
            ),
            (
                "public host without a dial-back is not called public",
                public_host().all_saw(&[0, 1], me),
                no_nat(me, F::Unknown, R::Unknown),
            ),
            (
                "public interface, but peers see another public IP: a NAT",
                public_host().all_saw(&[0, 1], "198.51.100.99:4433").dial_backs(open_filter()),
                eim("198.51.100.99:4433", F::EndpointIndependent, R::Public).preserved(),
            ),
            (
                "public interface IP, port translated",
                public_host().all_saw(&[0, 1], "198.51.100.7:61000").dial_backs(address_filter()),
                eim("198.51.100.7:61000", F::AddressDependent, R::PrivatePunchable),
            ),
            // Cone NATs: endpoint-independent mapping.
            (
                "full cone",
                behind_nat().all_saw(&[0, 1, 2], ext).dial_backs(open_filter()).hairpin(ext, true),
                eim(ext, F::EndpointIndependent, R::Public).hairpin(Hairpin::Supported),
            ),
            (
                "full cone, port preserved",
                behind_nat().all_saw(&[0, 1, 2], &nat(5000)).dial_backs(open_filter()),
                eim(&nat(5000), F::EndpointIndependent, R::Public).preserved(),
            ),
            (
                "restricted cone",
                behind_nat().all_saw(&[0, 1], ext).dial_backs(address_filter()),
                eim(ext, F::AddressDependent, R::PrivatePunchable),
            ),
            (
                "port-restricted cone",
                behind_nat().all_saw(&[0, 1], ext).dial_backs(port_filter()).hairpin(ext, false),
                eim(ext, F::AddressAndPortDependent, R::PrivatePunchable).hairpin(Hairpin::NotSupported),
            ),
            // Symmetric NATs: endpoint-dependent mapping.
            (
                "symmetric, random ports",
                behind_nat()
                    .saw(&[0, 1, 2], &[&nat(40001), &nat(52113), &nat(33321)])
                    .dial_backs(port_filter()),
                edm(P::Unpredictable, F::AddressAndPortDependent, R::PrivateHard),
            ),
            (
                "symmetric, sequential delta 1",
                behind_nat()
                    .saw(&[0, 1, 2], &[&nat(40001), &nat(40002), &nat(40003)])
                    .dial_backs(port_filter()),
                edm(P::Sequential { delta: 1 }, F::AddressAndPortDependent, R::PrivatePunchable),
            ),
            (
                "symmetric, sequential delta 2",
                behind_nat().saw(&[0, 1, 2, 3], &[&nat(40001), &nat(40003), &nat(40005), &nat(40007)]),
                edm(P::Sequential { delta: 2 }, F::Unknown, R::PrivatePunchable),
            ),
            (
                "symmetric, sequential, a silent destination in between (seq gap)",
                behind_nat().saw(&[0, 1, 3], &[&nat(40001), &nat(40002), &nat(40004)]),
                edm(P::Sequential { delta: 1 }, F::Unknown, R::PrivatePunchable),
            ),
            (
                "symmetric, counting down",
                behind_nat().saw(&[0, 1, 2], &[&nat(40005), &nat(40003), &nat(40001)]),
                edm(P::Sequential { delta: -2 }, F::Unknown, R::PrivatePunchable),
            ),
            (
                "symmetric, uneven steps",
                behind_nat().saw(&[0, 1, 2], &[&nat(40001), &nat(40002), &nat(40004)]),
                edm(P::Unpredictable, F::Unknown, R::PrivateHard),
            ),
            (
                "symmetric, external IP changes per destination",
                behind_nat()
                    .saw(&[0, 1, 2], &["198.51.100.1:40001", "198.51.100.2:40002", "198.51.100.3:40003"]),
                edm(P::Unpredictable, F::Unknown, R::PrivateHard),
            ),
            (
                "symmetric, two mappings are too few to judge ports",
                behind_nat().saw(&[0, 1], &[&nat(40001), &nat(40003)]),
                edm(P::Unknown, F::Unknown, R::Unknown),
            ),
            (
                "symmetric, creation order unknown",
                behind_nat().report(7, PEERS[0], &nat(40001)).report(7, PEERS[1], &nat(40002)).report(
                    7,
                    PEERS[2],
                    &nat(40003),
                ),
                edm(P::Unknown, F::Unknown, R::Unknown),
            ),
            (
                "address-dependent mapping, sequential: a reused mapping takes no port",
                behind_nat()
                    .report(1, PEERS[0], &nat(40001))
                    .report(2, "203.0.113.10:9000", &nat(40001))
                    .report(3, PEERS[1], &nat(40002))
                    .report(4, PEERS[2], &nat(40003)),
                edm(P::Sequential { delta: 1 }, F::Unknown, R::PrivatePunchable),
            ),
            (
                "address-and-port-dependent mapping, sequential: another port of one IP takes a port",
                behind_nat()
                    .report(1, PEERS[0], &nat(40001))
                    .report(2, "203.0.113.10:9000", &nat(40002))
                    .report(3, PEERS[1], &nat(40003)),
                edm(P::Sequential { delta: 1 }, F::Unknown, R::PrivatePunchable),
            ),
            // Double NAT: peers see the outermost NAT.
            (
                "double NAT, EIM over EIM",
                behind_nat()
                    .all_saw(&[0, 1, 2], &nat(61000))
                    .dial_backs(port_filter())
                    .hairpin(&nat(61000), false),
                eim(&nat(61000), F::AddressAndPortDependent, R::PrivatePunchable)
                    .hairpin(Hairpin::NotSupported),
            ),
            (
                "double NAT, home EIM inside carrier EDM",
                behind_nat()
                    .saw(&[0, 1, 2], &[&nat(1027), &nat(33001), &nat(8190)])
                    .dial_backs(port_filter()),
                edm(P::Unpredictable, F::AddressAndPortDependent, R::PrivateHard),
            ),
            // UDP and insufficient data.
            (
                "UDP blocked",
                behind_nat().with(|o| (o.peers_tried, o.peers_answered) = (5, 0)),
                unknown(F::Unknown, R::PrivateHard).udp(Udp::Blocked),
            ),
            (
                "two silent peers are not yet UDP blocked",
                behind_nat().with(|o| (o.peers_tried, o.peers_answered) = (2, 0)),
                unknown(F::Unknown, R::Unknown).udp(Udp::Unknown),
            ),
            (
                "nothing observed",
                Observations::new(addr("0.0.0.0:0")),
                unknown(F::Unknown, R::Unknown).udp(Udp::Unknown),
            ),
            (
                "one witness, even with filtering proven",
                behind_nat().all_saw(&[0], ext).dial_backs(open_filter()),
                unknown(F::EndpointIndependent, R::Unknown),
            ),
            (
                "two ports of one IP agree: endpoint-independent or address-dependent?",
                behind_nat().report(1, PEERS[0], ext).report(2, "203.0.113.10:9000", ext),
                unknown(F::Unknown, R::Unknown),
            ),
            (
                "two ports of one IP disagree: mapped per destination port, even with one witness",
                behind_nat().report(1, PEERS[0], &nat(40001)).report(2, "203.0.113.10:9000", &nat(40002)),
                edm(PortAllocation::Unknown, F::Unknown, R::Unknown),
            ),
            (
                "a LAN peer is not a witness",
                behind_nat().all_saw(&[0], ext).report(9, "192.168.1.20:4433", "192.168.1.10:5000"),
                unknown(F::Unknown, R::Unknown),
            ),
            (
                "a peer reached at a private address is not a witness, whatever it reports",
                behind_nat().all_saw(&[0], ext).report(9, "10.0.0.5:4433", ext),
                unknown(F::Unknown, R::Unknown),
            ),
            (
                "a public peer claiming it saw a private address is not believed",
                behind_nat().saw(&[0, 1], &[ext, "10.1.2.3:5000"]),
                unknown(F::Unknown, R::Unknown),
            ),
            // Lying and conflicting peers.
            (
                "a lying peer among three honest ones is outvoted",
                behind_nat()
                    .saw(&[0, 1, 2, 3], &[ext, ext, "192.0.2.66:1234", ext])
                    .dial_backs(open_filter()),
                eim(ext, F::EndpointIndependent, R::Public),
            ),
            (
                "a lying peer among two honest ones; hairpinning to its address proves nothing",
                behind_nat()
                    .saw(&[0, 1, 2], &[ext, "192.0.2.66:1234", ext])
                    .hairpin("192.0.2.66:1234", false),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "two against two: conflict",
                behind_nat().saw(&[0, 1, 2, 3], &[ext, ext, &nat(50000), &nat(50000)]),
                unknown(F::Unknown, R::Unknown),
            ),
            (
                "an address shared without a majority: conflict",
                behind_nat().saw(&[0, 1, 2, 3], &[ext, ext, &nat(50000), &nat(50001)]),
                unknown(F::Unknown, R::Unknown),
            ),
            // Dial-backs that must not fool the classifier.
            (
                "a dial-back over an existing 4-tuple proves nothing (the AutoNAT false positive)",
                behind_nat()
                    .all_saw(&[0, 1], ext)
                    .dial_backs(vec![dial(HELPER, HELPER, true), dial(HELPER, PEERS[1], true)]),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "an \"other IP\" that is a contacted IP on another port only rules out port-dependent filtering",
                behind_nat()
                    .all_saw(&[0, 1], ext)
                    .dial_backs(vec![dial(HELPER, HELPER, true), dial(HELPER, "203.0.113.11:9999", true)]),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "a \"fresh\" IP we had sent to before is not fresh",
                behind_nat()
                    .all_saw(&[0, 1], ext)
                    .dial_backs(open_filter())
                    .with(|o| o.contacted.push(addr(FRESH_IP))),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "a dial-back from a private source did not cross the NAT",
                behind_nat()
                    .all_saw(&[0, 1], ext)
                    .dial_backs(vec![dial(HELPER, HELPER, true), dial(HELPER, "192.168.1.1:3478", true)]),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "failures without a working control are discarded",
                behind_nat().all_saw(&[0, 1], ext).dial_backs(vec![
                    dial(HELPER, HELPER, false),
                    dial(HELPER, HELPER_OTHER_PORT, false),
                    dial(HELPER, FRESH_IP, false),
                ]),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "fresh IP refused, other port untested: restricted, so punchable",
                behind_nat()
                    .all_saw(&[0, 1], ext)
                    .dial_backs(vec![dial(HELPER, HELPER, true), dial(HELPER, FRESH_IP, false)]),
                eim(ext, F::Unknown, R::PrivatePunchable),
            ),
            (
                "fresh IP arrived, other port lost: the arrival wins (RFC 5780 order)",
                behind_nat().all_saw(&[0, 1], ext).dial_backs(probes(false, true)),
                eim(ext, F::EndpointIndependent, R::Public),
            ),
            // Address families.
            (
                "IPv4-mapped addresses read as IPv4",
                behind_nat()
                    .with(|o| o.local = addr("[::ffff:192.168.1.10]:5000"))
                    .report(1, "[::ffff:203.0.113.10]:4433", "[::ffff:198.51.100.1]:40000")
                    .report(2, "[::ffff:203.0.113.11]:4433", "[::ffff:198.51.100.1]:40000"),
                eim(ext, F::Unknown, R::Unknown),
            ),
            (
                "reports in the other family are ignored",
                behind_nat().all_saw(&[0], ext).report(5, "[2001:db8::10]:4433", "[2001:db8::99]:5000"),
                unknown(F::Unknown, R::Unknown),
            ),
        ]
    }

    #[test]
    fn classification_table() {
        let mut failures = Vec::new();
        for (name, observations, want) in cases() {
            let verdict = classify(&observations);
            let got = Want::of(&verdict);
            if got != want {
                failures.push(format!(
                    "{name}\n  want {want:?}\n  got  {got:?}\n  {}",
                    verdict.explain().join("\n  ")
                ));
            }
        }
        assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn the_verdict_does_not_depend_on_input_order() {
        for (name, mut observations, _) in cases() {
            let forward = classify(&observations);
            observations.mappings.reverse();
            observations.dial_backs.reverse();
            observations.contacted.reverse();
            observations.interfaces.reverse();
            assert_eq!(forward, classify(&observations), "{name}");
        }
    }

    #[test]
    fn explanations_name_the_evidence() {
        let ext = nat(40000);
        let lines =
            classify(&behind_nat().saw(&[0, 1, 2], &[&nat(40001), &nat(40003), &nat(40005)])).explain();
        assert_eq!(
            lines[2],
            "endpoint-dependent mapping: peers at 203.0.113.10, 203.0.113.11 and 203.0.113.12 saw ports 40001, \
             40003 and 40005 (sequential, delta 2)"
        );
        assert!(
            lines[0].starts_with("private, punchable: endpoint-dependent mapping with sequential"),
            "{lines:?}"
        );

        let same_ip_two_ports = behind_nat()
            .report(1, PEERS[0], &nat(40001))
            .report(2, "203.0.113.10:9000", &nat(40002))
            .report(3, PEERS[1], &nat(40003));
        assert_eq!(
            classify(&same_ip_two_ports).explain()[2],
            "endpoint-dependent mapping: peers at 203.0.113.10:4433, 203.0.113.10:9000 and 203.0.113.11:4433 saw \
             ports 40001, 40002 and 40003 (sequential, delta 1)"
        );

        let liar = behind_nat().saw(&[0, 1, 2, 3], &[&ext, &ext, "192.0.2.66:1234", &ext]);
        let lines = classify(&liar.dial_backs(address_filter())).explain();
        assert_eq!(
            lines[2],
            "endpoint-independent mapping: peers at 203.0.113.10, 203.0.113.11 and 203.0.113.13 all saw \
             198.51.100.1:40000 (local port 5000 not kept); 1 disagreeing destination IP outvoted"
        );
        assert_eq!(
            lines[3],
            "address-dependent filtering: a dial-back from 203.0.113.10:4434 (another port of an IP we sent to) \
             arrived, one from 192.0.2.50:3478 (an IP we never sent to) did not"
        );

        let fooled = public_host()
            .all_saw(&[0, 1], "198.51.100.7:4433")
            .dial_backs(vec![dial(HELPER, HELPER, true), dial(HELPER, PEERS[1], true)]);
        let lines = classify(&fooled).explain();
        assert!(
            lines[0].starts_with("reachability unknown: no address translation, but no dial-back"),
            "{lines:?}"
        );
        assert!(lines[3].contains("only dial-backs from endpoints we already sent to arrived"), "{lines:?}");

        let lines = classify(&behind_nat().all_saw(&[0], &ext)).explain();
        assert!(lines[2].contains("only peers at 203.0.113.10 reported"), "{lines:?}");

        let lines = classify(&behind_nat().with(|o| (o.peers_tried, o.peers_answered) = (3, 0))).explain();
        assert_eq!(
            lines[0],
            "private, hard: UDP is blocked; only a relay over another transport can reach us"
        );
        assert_eq!(lines[1], "UDP blocked: none of the 3 peers we tried answered");
    }

    #[test]
    fn every_table_case_explains_itself_in_five_lines() {
        for (name, observations, _) in cases() {
            let lines = classify(&observations).explain();
            assert_eq!(lines.len(), 5, "{name}");
            assert!(lines.iter().all(|l| !l.is_empty() && !l.contains('\n')), "{name}: {lines:?}");
        }
    }

    #[test]
    fn long_lists_are_abbreviated() {
        assert_eq!(list::<u16>(&[]), "nobody");
        assert_eq!(list(&[1]), "1");
        assert_eq!(list(&[1, 2]), "1 and 2");
        assert_eq!(list(&[1, 2, 3, 4]), "1, 2, 3 and 4");
        assert_eq!(list(&[1, 2, 3, 4, 5, 6]), "1, 2, 3, 4 and 2 more");
    }

    /// Deterministic xorshift, so the arbitrary-input test needs no dependency and always runs the same inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }

    #[test]
    fn any_input_gives_a_consistent_verdict() {
        let ips: Vec<IpAddr> = [
            "203.0.113.10",
            "203.0.113.11",
            "198.51.100.1",
            "192.0.2.50",
            "192.168.1.10",
            "0.0.0.0",
            "224.0.0.1",
            "2001:db8::1",
            "::ffff:203.0.113.10",
            "::",
        ]
        .iter()
        .map(|s| ip(s))
        .collect();
        let ports = [0, 1, 4433, 4434, 5000, 40000, 40001, 40002, 65535];
        let seqs = [0, 1, 2, 3, 1000, u64::MAX - 1, u64::MAX];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let any = |rng: &mut Rng| SocketAddr::new(rng.pick(&ips), rng.pick(&ports));
            let mut o = Observations::new(any(&mut rng));
            o.interfaces = (0..rng.below(3)).map(|_| rng.pick(&ips)).collect();
            o.mappings = (0..rng.below(7))
                .map(|_| MappingObservation {
                    seq: rng.pick(&seqs),
                    destination: any(&mut rng),
                    observed: any(&mut rng),
                })
                .collect();
            o.contacted = (0..rng.below(4)).map(|_| any(&mut rng)).collect();
            o.dial_backs = (0..rng.below(5))
                .map(|_| DialBack { helper: any(&mut rng), from: any(&mut rng), arrived: rng.below(2) == 0 })
                .collect();
            o.hairpin = (0..rng.below(2))
                .map(|_| HairpinProbe { target: any(&mut rng), arrived: rng.below(2) == 0 })
                .collect();
            o.peers_tried = rng.pick(&[0, 1, 3, u32::MAX]);
            o.peers_answered = rng.pick(&[0, 1, u32::MAX]);

            let v = classify(&o);
            assert_eq!(v.explain().len(), 5);
            assert!(v.explain().iter().all(|line| !line.is_empty()));
            assert_eq!(
                v.external_address.is_some(),
                matches!(v.mapping, Mapping::NoTranslation | Mapping::EndpointIndependent),
                "{o:?}"
            );
            if v.reachability == Reachability::Public {
                assert_eq!(v.filtering, Filtering::EndpointIndependent, "{o:?}");
                let from = v.evidence.fresh_ip.arrived_from.expect("public rests on a fresh dial-back");
                assert!(o.contacted.iter().all(|c| canonical(*c).ip() != from.ip()), "{o:?}");
                assert!(o.mappings.iter().all(|m| canonical(m.destination).ip() != from.ip()), "{o:?}");
                assert!(o.dial_backs.iter().all(|d| canonical(d.helper).ip() != from.ip()), "{o:?}");
            }
            if v.udp == Udp::Blocked {
                assert_eq!(v.reachability, Reachability::PrivateHard);
            }
        }
    }
}
