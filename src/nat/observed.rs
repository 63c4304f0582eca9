//! Aggregation of the addresses peers observe for our QUIC socket.
//!
//! One report is a claim by one peer; an address becomes *confirmed* when enough distinct peers report it. All
//! state is bounded: a lying peer can occupy at most one slot per address and the number of addresses tracked
//! is capped, oldest evicted first. Pure logic, no IO.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::api::names::NodeId;

/// Addresses tracked at once.
const MAX_ADDRESSES: usize = 32;
/// Reporters remembered per address (enough to confirm; more adds nothing).
const MAX_REPORTERS: usize = 16;

#[derive(Debug, Clone)]
struct Reports {
    reporters: BTreeSet<NodeId>,
    last_report_ms: i64,
}

/// Addresses peers observed for us, with who reported each.
#[derive(Debug, Default, Clone)]
pub struct ObservedAddresses {
    addresses: HashMap<SocketAddr, Reports>,
}

/// One address with how many distinct peers reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub address: SocketAddr,
    pub confirmations: usize,
    pub last_report_ms: i64,
}

impl ObservedAddresses {
    /// Records that `reporter` saw us at `address`. Returns true when this made the address newly confirmed
    /// (reached `min_confirmations`), which is when our record should be refreshed.
    pub fn report(
        &mut self,
        reporter: NodeId,
        address: SocketAddr,
        now_ms: i64,
        min_confirmations: usize,
    ) -> bool {
        if !self.addresses.contains_key(&address) && self.addresses.len() >= MAX_ADDRESSES {
            let oldest = self.addresses.iter().min_by_key(|(_, r)| r.last_report_ms).map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.addresses.remove(&oldest);
            }
        }
        let reports = self
            .addresses
            .entry(address)
            .or_insert_with(|| Reports { reporters: BTreeSet::new(), last_report_ms: now_ms });
        let before = reports.reporters.len();
        if before < MAX_REPORTERS {
            reports.reporters.insert(reporter);
        }
        reports.last_report_ms = reports.last_report_ms.max(now_ms);
        before < min_confirmations && reports.reporters.len() >= min_confirmations
    }

    /// Every tracked address, most confirmed first.
    pub fn observations(&self) -> Vec<Observation> {
        let mut all: Vec<Observation> = self
            .addresses
            .iter()
            .map(|(address, r)| Observation {
                address: *address,
                confirmations: r.reporters.len(),
                last_report_ms: r.last_report_ms,
            })
            .collect();
        all.sort_by(|a, b| b.confirmations.cmp(&a.confirmations).then(a.address.cmp(&b.address)));
        all
    }

    /// Addresses reported by at least `min_confirmations` distinct peers, most confirmed first.
    pub fn confirmed(&self, min_confirmations: usize) -> Vec<SocketAddr> {
        self.observations()
            .into_iter()
            .filter(|o| o.confirmations >= min_confirmations)
            .map(|o| o.address)
            .collect()
    }
}

/// Whether an address is private to a site or host: RFC 1918, carrier-grade NAT (100.64.0.0/10), loopback,
/// link-local, unspecified, IPv6 unique-local (fc00::/7). Documentation ranges count as public: the NAT lab uses
/// them for its "public" hosts.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn an_address_is_confirmed_by_distinct_peers_only() {
        let mut observed = ObservedAddresses::default();
        let a = addr("203.0.113.5:30906");
        assert!(!observed.report(NodeId([1; 32]), a, 1, 2));
        assert!(!observed.report(NodeId([1; 32]), a, 2, 2), "the same peer twice is one confirmation");
        assert!(observed.confirmed(2).is_empty());
        assert!(observed.report(NodeId([2; 32]), a, 3, 2), "a second peer confirms it");
        assert!(!observed.report(NodeId([3; 32]), a, 4, 2), "already confirmed");
        assert_eq!(observed.confirmed(2), vec![a]);
        assert_eq!(observed.observations()[0].confirmations, 3);
    }

    #[test]
    fn tracking_is_bounded_and_evicts_the_stalest() {
        let mut observed = ObservedAddresses::default();
        for i in 0..(MAX_ADDRESSES as u16 + 10) {
            observed.report(NodeId([9; 32]), addr(&format!("198.51.100.1:{}", 1000 + i)), i64::from(i), 2);
        }
        let all = observed.observations();
        assert_eq!(all.len(), MAX_ADDRESSES);
        assert!(all.iter().all(|o| o.address.port() >= 1010), "the oldest reports were evicted");
    }

    #[test]
    fn private_ranges() {
        for private in [
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
            "::1",
        ] {
            assert!(is_private(private.parse().expect("ip")), "{private}");
        }
        for public in ["203.0.113.5", "198.51.100.7", "8.8.8.8", "100.128.0.1", "2001:db8::1"] {
            assert!(!is_private(public.parse().expect("ip")), "{public}");
        }
    }
}
