//! How a NAT verdict reads: the plain-language explanation `rnctl nat status` and `GetNatStatus` show, naming
//! the evidence each part of the verdict rests on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::classify::*;

impl NatVerdict {
    /// One line per verdict, for people (`rnctl nat status`): reachability, UDP, mapping, filtering, hairpinning.
    pub fn explain(&self) -> Vec<String> {
        vec![
            self.explain_reachability(),
            self.explain_udp(),
            self.explain_mapping(),
            self.explain_filtering(),
            self.explain_hairpin(),
        ]
    }

    fn explain_reachability(&self) -> String {
        let behind = match self.mapping {
            Mapping::NoTranslation => "no address translation",
            _ => "endpoint-independent mapping",
        };
        match (self.reachability, self.mapping) {
            (Reachability::Public, _) => format!(
                "public: {behind} and a dial-back from an IP we never sent to arrived, so peers can dial {} directly",
                shown(self.external_address)
            ),
            (Reachability::PrivateHard, _) if self.udp == Udp::Blocked => {
                "private, hard: UDP is blocked; only a relay over another transport can reach us".to_string()
            }
            (Reachability::PrivateHard, _) => {
                "private, hard: endpoint-dependent mapping with unpredictable ports; peers need a relay"
                    .to_string()
            }
            (
                Reachability::PrivatePunchable,
                Mapping::EndpointDependent(PortAllocation::Sequential { delta }),
            ) => {
                format!(
                    "private, punchable: endpoint-dependent mapping with sequential ports (delta {delta}); hole \
                     punching must predict the next port"
                )
            }
            (Reachability::PrivatePunchable, _) => format!(
                "private, punchable: {behind} behind filtering that drops unsolicited packets; peers can hole \
                 punch to {}",
                shown(self.external_address)
            ),
            (Reachability::Unknown, _) if self.udp == Udp::Unknown && self.evidence.mappings.is_empty() => {
                "reachability unknown: no peer has answered yet".to_string()
            }
            (Reachability::Unknown, Mapping::Unknown) => {
                "reachability unknown: the mapping behaviour is not known yet".to_string()
            }
            (Reachability::Unknown, Mapping::EndpointDependent(_)) => format!(
                "reachability unknown: endpoint-dependent mapping; {MIN_MAPPINGS_FOR_ALLOCATION} mappings in a \
                 known order are needed to tell whether its ports can be predicted"
            ),
            (Reachability::Unknown, _) => format!(
                "reachability unknown: {behind}, but no dial-back from a fresh IP has arrived or been refused, so a \
                 filter may still drop unsolicited packets"
            ),
        }
    }

    fn explain_udp(&self) -> String {
        let e = &self.evidence;
        match self.udp {
            Udp::Works if e.peers_answered > 0 => {
                format!("UDP works: {} answered", count(e.peers_answered, "peer"))
            }
            Udp::Works => "UDP works: peers answered".to_string(),
            Udp::Blocked => {
                format!("UDP blocked: none of the {} we tried answered", count(e.peers_tried, "peer"))
            }
            Udp::Unknown => format!(
                "UDP unknown: {} tried without an answer so far; blocked is concluded after \
                 {MIN_SILENT_PEERS_FOR_BLOCKED}",
                count(e.peers_tried, "peer")
            ),
        }
    }

    fn explain_mapping(&self) -> String {
        let e = &self.evidence;
        let witnesses = witnesses(&e.mappings);
        let mut line = match (self.mapping, self.external_address) {
            (Mapping::NoTranslation, Some(address)) => format!(
                "no address translation: peers at {} saw our interface address {address} unchanged",
                list(&agreeing(&witnesses, address))
            ),
            (Mapping::EndpointIndependent, Some(address)) => {
                let port = if self.port_preservation == Some(true) { "kept" } else { "not kept" };
                format!(
                    "endpoint-independent mapping: peers at {} all saw {address} (local port {} {port})",
                    list(&agreeing(&witnesses, address)),
                    e.local.port()
                )
            }
            (Mapping::EndpointDependent(allocation), _) => {
                explain_endpoint_dependent(&e.mappings, allocation)
            }
            _ if e.mappings.is_empty() => {
                "mapping unknown: no peer has reported the address it sees us at".into()
            }
            _ if e.destination_ips < MIN_DESTINATION_IPS => format!(
                "mapping unknown: only peers at {} reported; {MIN_DESTINATION_IPS} distinct destination IPs are \
                 needed, since ports of one IP cannot tell endpoint-independent from address-dependent mapping",
                list(&witnesses.keys().collect::<Vec<_>>())
            ),
            _ => format!(
                "mapping unknown: reports from {} destination IPs conflict; at most {} agree on one address, a \
                 majority of at least {MIN_DESTINATION_IPS} is needed",
                e.destination_ips, e.agreeing_ips
            ),
        };
        if self.external_address.is_some() && e.agreeing_ips < e.destination_ips {
            let outvoted = e.destination_ips - e.agreeing_ips;
            line.push_str(&format!("; {} outvoted", count(outvoted, "disagreeing destination IP")));
        }
        if e.ignored_mappings > 0 {
            line.push_str(&format!(
                "; {} ignored (private, other address family or port 0)",
                count(e.ignored_mappings, "report")
            ));
        }
        line
    }

    fn explain_filtering(&self) -> String {
        let e = &self.evidence;
        let (fresh, other) = (e.fresh_ip, e.other_port);
        let mut line = match self.filtering {
            Filtering::EndpointIndependent => format!(
                "endpoint-independent filtering: a dial-back from {}, an IP we never sent to, arrived",
                shown(fresh.arrived_from)
            ),
            Filtering::AddressDependent => format!(
                "address-dependent filtering: a dial-back from {} (another port of an IP we sent to) arrived, one \
                 from {} (an IP we never sent to) did not",
                shown(other.arrived_from),
                shown(fresh.blocked_from)
            ),
            Filtering::AddressAndPortDependent => format!(
                "address-and-port-dependent filtering: a dial-back from {} (another port of an IP we sent to) did \
                 not arrive although its helper's control probe did",
                shown(other.blocked_from)
            ),
            Filtering::Unknown => match (other.arrived_from, fresh.blocked_from) {
                (Some(from), _) => format!(
                    "filtering unknown: a dial-back from {from} (another port of an IP we sent to) arrived, but no \
                     dial-back from an IP we never sent to has been tried"
                ),
                (None, Some(from)) => format!(
                    "filtering unknown: a dial-back from {from} (an IP we never sent to) did not arrive, so \
                     filtering is restricted, but none from another port of an IP we sent to has been tried"
                ),
                (None, None) if e.existing_tuple_arrivals > 0 => {
                    "filtering unknown: only dial-backs from endpoints we already sent to arrived, and those pass \
                     any filter"
                        .to_string()
                }
                (None, None) => "filtering unknown: no dial-back test has given a usable result".to_string(),
            },
        };
        if e.discarded_dial_backs > 0 {
            line.push_str(&format!(
                "; {} discarded (no working control, private source or other address family)",
                count(e.discarded_dial_backs, "dial-back")
            ));
        }
        line
    }

    fn explain_hairpin(&self) -> String {
        match (self.hairpin, self.evidence.hairpin_probe) {
            (Hairpin::Supported, Some(p)) => {
                format!("hairpinning supported: a packet we sent to our own address {} came back", p.target)
            }
            (Hairpin::NotSupported, Some(p)) => {
                format!(
                    "hairpinning not supported: a packet we sent to our own address {} did not come back",
                    p.target
                )
            }
            (_, Some(p)) => format!(
                "hairpinning unknown: the probe went to {}, which is not an address the NAT is known to give us",
                p.target
            ),
            (_, None) => "hairpinning unknown: not tested".to_string(),
        }
    }
}

/// The endpoint-dependent line: which peer saw which mapping, in creation order, and the port pattern.
fn explain_endpoint_dependent(counted: &[MappingObservation], allocation: PortAllocation) -> String {
    let created = mappings_by_creation(counted);
    // Peers by IP, or by endpoint where one IP reported several mappings (address-and-port-dependent).
    let ips: BTreeSet<IpAddr> = created.iter().map(|(_, _, destination)| destination.ip()).collect();
    let by_endpoint = ips.len() < created.len();
    let peers: Vec<String> = created
        .iter()
        .map(|(_, _, d)| if by_endpoint { d.to_string() } else { d.ip().to_string() })
        .collect();
    let one_external_ip =
        created.windows(2).all(|pair| matches!(pair, [(_, a, _), (_, b, _)] if a.ip() == b.ip()));
    let seen = if one_external_ip {
        let ports: Vec<u16> = created.iter().map(|(_, observed, _)| observed.port()).collect();
        format!("ports {}", list(&ports))
    } else {
        list(&created.iter().map(|(_, observed, _)| *observed).collect::<Vec<_>>())
    };
    let pattern = match allocation {
        PortAllocation::Sequential { delta } => format!("sequential, delta {delta}"),
        PortAllocation::Unpredictable if one_external_ip => "no constant step: unpredictable".to_string(),
        PortAllocation::Unpredictable => "external IP changes: unpredictable".to_string(),
        PortAllocation::Unknown => {
            format!("{MIN_MAPPINGS_FOR_ALLOCATION} mappings in a known order are needed to judge the ports")
        }
    };
    format!("endpoint-dependent mapping: peers at {} saw {seen} ({pattern})", list(&peers))
}

/// Witnesses that saw only `address`.
fn agreeing(witnesses: &BTreeMap<IpAddr, BTreeSet<SocketAddr>>, address: SocketAddr) -> Vec<IpAddr> {
    witnesses
        .iter()
        .filter(|(_, seen)| seen.len() == 1 && seen.contains(&address))
        .map(|(ip, _)| *ip)
        .collect()
}

/// "a", "a and b", "a, b and c", "a, b, c, d and 2 more".
pub(super) fn list<T: fmt::Display>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(LISTED).map(ToString::to_string).collect();
    let rest = items.len().saturating_sub(LISTED);
    match (shown.as_slice(), rest) {
        ([], _) => "nobody".to_string(),
        ([only], 0) => only.clone(),
        ([init @ .., last], 0) => format!("{} and {last}", init.join(", ")),
        (all, rest) => format!("{} and {rest} more", all.join(", ")),
    }
}

fn count<T: fmt::Display + PartialEq + From<u8>>(n: T, noun: &str) -> String {
    if n == T::from(1) { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

fn shown(address: Option<SocketAddr>) -> String {
    address.map_or_else(|| "an unknown address".to_string(), |a| a.to_string())
}
