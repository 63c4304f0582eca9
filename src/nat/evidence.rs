//! What sessions tell us about our NAT, kept where the NAT prober reads it.
//!
//! Observations flow one way: the exchange calls [`NatEvidence::contacted`] when our socket sends to an
//! endpoint (and hears back), and [`NatEvidence::reported`] when a peer tells us where our packets come from;
//! the prober reads the evidence and is woken by [`NatEvidence::changes`] when a new mapping sample arrives or
//! the evidence is forgotten (a change of network). Nothing here knows about sessions or QUIC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::observed::{self, Observation, ObservedAddresses};
use crate::api::names::NodeId;
use crate::clock::now_ms;
use crate::quic::paths::is_relayed;

/// Endpoints remembered (the least recently contacted are forgotten first).
const MAX_CONTACTS: usize = 4096;
/// Destinations remembered; the oldest sample goes first.
const MAX_MAPPING_SAMPLES: usize = 64;

/// When our socket last sent to an endpoint, and whether it ever answered.
#[derive(Debug, Clone, Copy)]
pub struct Contact {
    pub last_sent_ms: i64,
    pub answered: bool,
}

/// One peer's report of where our packets come from, with where we sent them: the raw evidence of how our
/// NAT maps (see `nat::classify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingSample {
    /// Order in which the samples were taken (the NAT created the mappings in about this order).
    pub seq: u64,
    pub reporter: NodeId,
    /// Our local address on that connection.
    pub local: SocketAddr,
    /// The peer's address: where our packets went.
    pub destination: SocketAddr,
    /// Where the peer saw them come from.
    pub observed: SocketAddr,
    pub at_ms: i64,
}

/// Which evidence the prober has seen: a new sample or a reset changes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvidenceVersion {
    /// Bumped when the evidence is forgotten (another network).
    pub epoch: u64,
    /// Mapping samples taken in this epoch.
    pub samples: u64,
}

/// Every remote endpoint our socket sent to recently, and whether it answered: a "fresh" dial-back source must
/// not be one of them (our NAT would let it in for having talked to it), and many silent endpoints with none
/// answering means UDP is blocked.
#[derive(Debug, Default)]
struct ContactLog {
    endpoints: HashMap<SocketAddr, Contact>,
}

impl ContactLog {
    fn sent(&mut self, endpoint: SocketAddr, answered: bool) {
        if !self.endpoints.contains_key(&endpoint) && self.endpoints.len() >= MAX_CONTACTS {
            let oldest = self.endpoints.iter().min_by_key(|(_, c)| c.last_sent_ms).map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.endpoints.remove(&oldest);
            }
        }
        let contact = self.endpoints.entry(endpoint).or_insert(Contact { last_sent_ms: 0, answered: false });
        contact.last_sent_ms = now_ms();
        contact.answered |= answered;
    }
}

/// The most recent mapping samples, one per destination (a newer report replaces an older one).
#[derive(Debug, Default)]
struct MappingLog {
    next_seq: u64,
    samples: Vec<MappingSample>,
}

impl MappingLog {
    fn record(&mut self, reporter: NodeId, local: SocketAddr, destination: SocketAddr, observed: SocketAddr) {
        self.samples.retain(|s| s.destination != destination);
        if self.samples.len() >= MAX_MAPPING_SAMPLES {
            self.samples.remove(0);
        }
        self.next_seq += 1;
        let sample =
            MappingSample { seq: self.next_seq, reporter, local, destination, observed, at_ms: now_ms() };
        self.samples.push(sample);
    }
}

/// The NAT evidence of one node: endpoints contacted, mapping samples, observed addresses.
pub struct NatEvidence {
    contacts: Mutex<ContactLog>,
    mappings: Mutex<MappingLog>,
    observed: Mutex<ObservedAddresses>,
    /// Distinct peers that must report the same observed address before we advertise it.
    min_confirmations: usize,
    version: watch::Sender<EvidenceVersion>,
}

impl NatEvidence {
    pub fn new(min_confirmations: usize) -> Self {
        Self {
            contacts: Mutex::default(),
            mappings: Mutex::default(),
            observed: Mutex::default(),
            min_confirmations,
            version: watch::Sender::new(EvidenceVersion::default()),
        }
    }

    /// Notes that our socket sent to `endpoint` (and whether it answered). Relay circuits' synthetic
    /// addresses are not endpoints our NAT ever saw.
    pub fn contacted(&self, endpoint: SocketAddr, answered: bool) {
        if is_relayed(&endpoint) {
            return;
        }
        lock(&self.contacts).sent(endpoint, answered);
    }

    /// `reporter` saw our packets, sent from `local` to `destination`, come from `observed`. Returns the
    /// address when this report confirmed a public address for the first time (it belongs in our record).
    pub fn reported(
        &self,
        reporter: NodeId,
        local: SocketAddr,
        destination: SocketAddr,
        observed: SocketAddr,
    ) -> Option<SocketAddr> {
        if is_relayed(&destination) {
            // Packets through a relay never crossed our NAT from that peer: no evidence about it.
            return None;
        }
        self.sample(reporter, local, destination, observed);
        let newly_confirmed =
            lock(&self.observed).report(reporter, observed, now_ms(), self.min_confirmations);
        (newly_confirmed && !observed::is_private(observed.ip())).then_some(observed)
    }

    /// A mapping sample without an address report: what a second socket of a peer saw of us.
    pub fn sample(&self, reporter: NodeId, local: SocketAddr, destination: SocketAddr, observed: SocketAddr) {
        lock(&self.mappings).record(reporter, local, destination, observed);
        self.version.send_modify(|version| version.samples += 1);
    }

    /// Whether a sample towards `destination` is at most `max_age_ms` old.
    pub fn fresh_sample_towards(&self, destination: SocketAddr, max_age_ms: i64) -> bool {
        let now = now_ms();
        lock(&self.mappings)
            .samples
            .iter()
            .any(|s| s.destination == destination && now - s.at_ms <= max_age_ms)
    }

    /// The latest mapping sample per destination, oldest first.
    pub fn mapping_samples(&self) -> Vec<MappingSample> {
        lock(&self.mappings).samples.clone()
    }

    /// Endpoints our socket sent to since `since_ms`, with whether each answered.
    pub fn contacted_since(&self, since_ms: i64) -> Vec<(SocketAddr, Contact)> {
        let log = lock(&self.contacts);
        log.endpoints.iter().filter(|(_, c)| c.last_sent_ms >= since_ms).map(|(a, c)| (*a, *c)).collect()
    }

    pub fn observations(&self) -> Vec<Observation> {
        lock(&self.observed).observations()
    }

    /// Public addresses confirmed by enough peers.
    pub fn confirmed_public(&self) -> Vec<SocketAddr> {
        let confirmed = lock(&self.observed).confirmed(self.min_confirmations);
        confirmed.into_iter().filter(|a| !observed::is_private(a.ip())).collect()
    }

    /// Forgets everything: after a change of network it describes a NAT we are no longer behind.
    pub fn forget(&self) {
        *lock(&self.mappings) = MappingLog::default();
        *lock(&self.observed) = ObservedAddresses::default();
        *lock(&self.contacts) = ContactLog::default();
        self.version
            .send_modify(|version| *version = EvidenceVersion { epoch: version.epoch + 1, samples: 0 });
    }

    /// Changes to the evidence, for a prober to wait on instead of polling.
    pub fn changes(&self) -> watch::Receiver<EvidenceVersion> {
        self.version.subscribe()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_public_address_is_confirmed_once_by_enough_reporters_and_samples_wake_the_prober() {
        let evidence = NatEvidence::new(2);
        let changes = evidence.changes();
        let local = addr("10.0.0.2:4000");
        let observed = addr("203.0.113.7:5000");
        assert_eq!(evidence.reported(NodeId([1; 32]), local, addr("198.51.100.1:1"), observed), None);
        assert!(changes.has_changed().expect("sender alive"), "a sample is news for the prober");
        assert_eq!(
            evidence.reported(NodeId([2; 32]), local, addr("198.51.100.2:1"), observed),
            Some(observed)
        );
        assert_eq!(evidence.reported(NodeId([3; 32]), local, addr("198.51.100.3:1"), observed), None);
        assert_eq!(evidence.confirmed_public(), vec![observed]);
        assert_eq!(evidence.mapping_samples().len(), 3);
    }

    #[test]
    fn forgetting_starts_a_new_epoch_with_no_evidence() {
        let evidence = NatEvidence::new(1);
        evidence.contacted(addr("198.51.100.1:1"), true);
        evidence.sample(
            NodeId([1; 32]),
            addr("10.0.0.2:4000"),
            addr("198.51.100.1:1"),
            addr("203.0.113.7:1"),
        );
        evidence.forget();
        assert!(evidence.mapping_samples().is_empty());
        assert!(evidence.contacted_since(0).is_empty());
        assert_eq!(*evidence.changes().borrow(), EvidenceVersion { epoch: 1, samples: 0 });
    }
}
