//! The NAT prober: gathers evidence about the NAT in front of our QUIC socket, classifies it with
//! [`super::classify`], and acts on the verdict.
//!
//! Evidence comes from the exchange: every peer's report of where our packets come from (mapping samples), and
//! dial-backs that connected peers make to us from a fresh 4-tuple (another port of their IP, another of their
//! IPs). The verdict goes into our signed record (node type and NAT info, so peers know how to reach us), into
//! `GetNodeInfo` / `GetNatStatus`, and — once the mapping is known to be endpoint-independent — the external
//! port becomes the port the DHT announces.
//!
//! Probing runs once peers are connected, again every [`REPROBE_INTERVAL`], and on demand (`ProbeNat`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::classify::{self, NatVerdict, Observations};
use crate::api::names::NodeId;
use crate::dht::Dht;
use crate::exchange::dial_back::DialBackOutcome;
use crate::exchange::{Exchange, now_ms};
use crate::store::{NodeType, Store};
use crate::wire::pb;

/// How often the NAT is probed again (NATs and networks change under a long-running node).
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(600);
/// How often the prober checks whether a first probe is possible.
const WAKE_INTERVAL: Duration = Duration::from_secs(5);
/// Helpers asked per probe.
const HELPERS_PER_PROBE: usize = 2;
/// Public peers named as rendezvous (and asked for a relay reservation) while we are behind a NAT.
const RENDEZVOUS_PEERS: usize = 3;
/// Times a busy helper is asked again, waiting a little longer each time.
const BUSY_RETRIES: u32 = 6;
const BUSY_BACKOFF: Duration = Duration::from_millis(500);
/// Dial-back results kept for `GetNatStatus`.
const DIAL_BACK_HISTORY: usize = 16;
/// How far back an endpoint we sent to still counts as "contacted": longer than common UDP NAT filter
/// lifetimes (Linux conntrack keeps an answered UDP flow 180 s), so a fresh-IP dial-back is really fresh.
const CONTACT_WINDOW: Duration = Duration::from_secs(600);

/// A dial-back result with when it happened.
#[derive(Debug, Clone)]
pub struct DialBackRecord {
    pub outcome: DialBackOutcome,
    pub at_ms: i64,
}

/// What the prober knows.
#[derive(Debug, Clone, Default)]
pub struct NatKnowledge {
    pub verdict: Option<NatVerdict>,
    pub last_probe_ms: Option<i64>,
    pub dial_backs: VecDeque<DialBackRecord>,
}

/// Handle to the prober.
#[derive(Clone)]
pub struct NatProber {
    inner: Arc<ProberInner>,
}

struct ProberInner {
    exchange: Exchange,
    dht: Dht,
    store: Store,
    knowledge: Mutex<NatKnowledge>,
    /// One probe at a time: a second caller waits for the running one and reads its result.
    probing: tokio::sync::Mutex<()>,
}

impl NatProber {
    /// Starts the background schedule; probes run until `shutdown`.
    pub fn start(exchange: Exchange, dht: Dht, store: Store, shutdown: CancellationToken) -> Self {
        let prober = Self {
            inner: Arc::new(ProberInner {
                exchange,
                dht,
                store,
                knowledge: Mutex::new(NatKnowledge::default()),
                probing: tokio::sync::Mutex::new(()),
            }),
        };
        let background = prober.clone();
        tokio::spawn(async move { background.schedule(shutdown).await });
        prober
    }

    pub fn knowledge(&self) -> NatKnowledge {
        self.lock().clone()
    }

    /// Runs a probe now and returns what is known afterwards.
    pub async fn probe(&self) -> NatKnowledge {
        let _running = self.inner.probing.lock().await;
        let helpers = self.pick_helpers().await;
        let mut outcomes = Vec::new();
        for helper in helpers {
            for kind in [pb::DialBackKind::OtherPort, pb::DialBackKind::OtherIp] {
                // A helper serves a couple of dial-backs at once; when many nodes probe through it together
                // (a network starting up), it says so and we ask again shortly.
                let mut busy_retries = 0;
                loop {
                    match self.inner.exchange.request_dial_back(helper, kind).await {
                        Ok(outcome) if outcome.busy && busy_retries < BUSY_RETRIES => {
                            busy_retries += 1;
                            tokio::time::sleep(BUSY_BACKOFF * busy_retries).await;
                        }
                        Ok(outcome) => {
                            outcomes.push(outcome);
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%helper, ?kind, error = %e, "dial-back request failed");
                            break;
                        }
                    }
                }
            }
        }
        // A second port of each helper (its DHT socket): with a single public peer, the one witness there is.
        for helper in self.pick_helpers().await {
            self.inner.exchange.probe_mapping_via_dht(helper).await;
        }
        let mut observations = self.observations(&outcomes);
        let mut verdict = classify::classify(&observations);
        // Hairpinning can only be tested once we know the address to send to: our stable external one. Only
        // an arrival is evidence: a NAT may hairpin between neighbours yet drop a loop back to the sending
        // host itself (Linux does: the packet would leave with its own address as destination and source),
        // so a probe that did not come back leaves the verdict unknown rather than "not supported".
        if let (Some(external), true) = (verdict.external_address, announces_external_port(&verdict)) {
            let arrived = self.inner.exchange.probe_hairpin(external).await;
            tracing::debug!(%external, arrived, "hairpin probe");
            if arrived {
                observations.hairpin.push(classify::HairpinProbe { target: external, arrived });
                verdict = classify::classify(&observations);
            }
        }
        let now = now_ms();
        let previous = {
            let mut knowledge = self.lock();
            for outcome in outcomes {
                if knowledge.dial_backs.len() >= DIAL_BACK_HISTORY {
                    knowledge.dial_backs.pop_front();
                }
                knowledge.dial_backs.push_back(DialBackRecord { outcome, at_ms: now });
            }
            knowledge.last_probe_ms = Some(now);
            knowledge.verdict.replace(verdict.clone())
        };
        self.act_on(&verdict).await;
        // A punch planned with what we knew before may have chosen a strategy that could not work (a plain dial
        // where the birthday strategy was needed): peers reached only through a relay are worth another try.
        if previous.as_ref().map(record_nat_info) != Some(record_nat_info(&verdict)) {
            self.inner.exchange.punch_relayed_peers();
        }
        self.knowledge()
    }

    async fn schedule(&self, shutdown: CancellationToken) {
        let mut last_samples = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(WAKE_INTERVAL) => {}
            }
            // A new network (other interface addresses) invalidates what we measured of the old one's NAT.
            if self.inner.exchange.publisher().refresh_interfaces().await {
                self.inner.exchange.forget_network_evidence();
                self.lock().last_probe_ms = None;
                last_samples = 0;
            }
            let samples = self.inner.exchange.mapping_samples().len();
            // Read under the lock, then release it: `undecided` below takes the same lock.
            let last_probe_ms = self.lock().last_probe_ms;
            let due = match last_probe_ms {
                None => samples > 0,
                Some(at) => {
                    now_ms().saturating_sub(at) >= REPROBE_INTERVAL.as_millis() as i64
                        // New witnesses can settle an undecided verdict: probe again soon after they report.
                        || (samples != last_samples && self.undecided())
                }
            };
            if due {
                last_samples = samples;
                self.probe().await;
            } else {
                // Sessions come and go between probes: keep the published rendezvous peers live ones.
                self.maintain_rendezvous().await;
            }
        }
    }

    fn undecided(&self) -> bool {
        self.lock().verdict.as_ref().is_none_or(|v| v.reachability == classify::Reachability::Unknown)
    }

    /// Connected peers to ask for dial-backs, those that say they are public first.
    async fn pick_helpers(&self) -> Vec<NodeId> {
        let mut public = Vec::new();
        let mut others = Vec::new();
        for peer in self.inner.exchange.directly_connected() {
            let is_public = matches!(
                self.inner.store.get_peer(peer).await,
                Ok(Some(detail)) if detail.summary.node_type == NodeType::Public
            );
            if is_public { public.push(peer) } else { others.push(peer) }
        }
        public.into_iter().chain(others).take(HELPERS_PER_PROBE).collect()
    }

    /// The classifier's input: mapping samples, the endpoints we talk to, and the dial-backs (each helper's
    /// live session is its control probe: it shows that helper reaches us at all).
    fn observations(&self, outcomes: &[DialBackOutcome]) -> Observations {
        let exchange = &self.inner.exchange;
        let local = exchange.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut observations = Observations::new(local);
        observations.interfaces =
            if_addrs::get_if_addrs().map(|list| list.iter().map(|i| i.ip()).collect()).unwrap_or_default();
        observations.mappings = exchange
            .mapping_samples()
            .iter()
            .map(|s| classify::MappingObservation {
                seq: s.seq,
                destination: s.destination,
                observed: s.observed,
            })
            .collect();
        let sessions: Vec<(NodeId, SocketAddr)> = exchange
            .directly_connected()
            .into_iter()
            .filter_map(|id| exchange.session_info(&id).map(|s| (id, s.remote)))
            .collect();
        let contacted = exchange.contacted_since(now_ms() - CONTACT_WINDOW.as_millis() as i64);
        observations.contacted = contacted.iter().map(|(endpoint, _)| *endpoint).collect();
        observations.contacted.extend(sessions.iter().map(|(_, remote)| *remote));
        for outcome in outcomes.iter().filter(|o| o.attempted) {
            let Some(helper) =
                sessions.iter().find(|(id, _)| *id == outcome.helper).map(|(_, remote)| *remote)
            else {
                continue;
            };
            observations.dial_backs.push(classify::DialBack { helper, from: helper, arrived: true });
            let declared = outcome.declared_from.unwrap_or(helper);
            let from = outcome.arrived_from.unwrap_or(declared);
            observations.dial_backs.push(classify::DialBack {
                helper,
                from,
                arrived: outcome.arrived_from.is_some(),
            });
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        observations.peers_tried = count(contacted.len().max(sessions.len()));
        observations.peers_answered =
            count(contacted.iter().filter(|(_, c)| c.answered).count().max(sessions.len()));
        observations
    }

    /// Publishes the verdict: in our record (peers learn how to reach us) and, with endpoint-independent
    /// mapping, as the port the DHT announces (the port the world sees).
    async fn act_on(&self, verdict: &NatVerdict) {
        let (node_type, nat) = record_nat_info(verdict);
        if let Err(e) = self.inner.exchange.publisher().set_nat(node_type, nat).await {
            tracing::warn!(error = %e, "could not re-sign the record with the NAT verdict");
        }
        self.maintain_rendezvous().await;
        if let (Some(external), true) = (verdict.external_address, announces_external_port(verdict)) {
            self.inner.dht.set_announce_port(external.port());
        }
        tracing::info!(
            mapping = ?verdict.mapping, filtering = ?verdict.filtering, reachability = ?verdict.reachability,
            "NAT classified"
        );
    }

    /// While we are not reachable directly, names in our record the public peers we hold a session with, so
    /// that others know whom to ask for an introduction (hole punching) or a relay circuit, and reserves a
    /// relay slot with each; names none once we are reachable.
    async fn maintain_rendezvous(&self) {
        let mut rendezvous = Vec::new();
        if self.behind_nat() {
            let exchange = &self.inner.exchange;
            // In node id order, so the choice only changes when sessions do (each change re-signs the record
            // and pushes it to every peer), and no further than needed through a large session table.
            let mut peers = exchange.directly_connected();
            peers.sort();
            for peer in peers {
                if rendezvous.len() >= RENDEZVOUS_PEERS {
                    break;
                }
                let Some(session) = exchange.session_info(&peer) else { continue };
                let Ok(Some(detail)) = self.inner.store.get_peer(peer).await else { continue };
                // A peer that says it is public, or one whose own verdict is still open but whose packets come
                // from an address its record names as one of its interfaces': nothing translates its address,
                // which from behind our NAT is what a public peer looks like (whoever dialed whom).
                let public = detail.summary.node_type == NodeType::Public
                    || (detail.summary.node_type == NodeType::Unknown
                        && session.path == crate::exchange::ConnectionPath::Direct
                        && own_interface_address(&detail.record, session.remote));
                if public {
                    // A punch may not get through the NATs on both sides: the rendezvous also relays.
                    match exchange.reserve_relay(peer).await {
                        Ok(true) => {}
                        Ok(false) => tracing::debug!(%peer, "public peer does not relay for us"),
                        Err(e) => tracing::debug!(%peer, error = %e, "relay reservation failed"),
                    }
                    rendezvous.push(session.remote);
                }
            }
        }
        self.inner.exchange.publisher().set_rendezvous(rendezvous).await;
    }

    /// Whether others need a rendezvous to reach us: the verdict says so, or, while it is still open (too few
    /// witnesses, as in a network with a single public node), a peer saw our packets come from an address that
    /// is none of our interfaces'. An open verdict must not keep a node behind a NAT unreachable.
    fn behind_nat(&self) -> bool {
        let reachability = self.lock().verdict.as_ref().map(|v| v.reachability);
        match reachability {
            Some(classify::Reachability::PrivatePunchable | classify::Reachability::PrivateHard) => true,
            Some(classify::Reachability::Public) => false,
            Some(classify::Reachability::Unknown) | None => {
                // Compared in canonical form: a dual-stack socket sees IPv4 peers as IPv4-mapped IPv6.
                let canonical = |ip: std::net::IpAddr| ip.to_canonical();
                let interfaces: Vec<std::net::IpAddr> = if_addrs::get_if_addrs()
                    .map(|list| list.iter().map(|i| canonical(i.ip())).collect())
                    .unwrap_or_default();
                self.inner
                    .exchange
                    .mapping_samples()
                    .iter()
                    .any(|s| !interfaces.contains(&canonical(s.observed.ip())))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NatKnowledge> {
        self.inner.knowledge.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether `remote` is an address the signed `record` lists as one of its node's public interface addresses.
fn own_interface_address(record: &[u8], remote: SocketAddr) -> bool {
    use prost::Message;
    let Ok(signed) = pb::SignedRecord::decode(record) else { return false };
    let Ok(body) = pb::RecordBody::decode(signed.body.as_slice()) else { return false };
    body.addresses.iter().any(|address| {
        address.kind == pb::AddressKind::InterfacePublic as i32 && address.address.parse() == Ok(remote)
    })
}

/// Whether the external port is stable enough to announce: it is the same for every peer.
fn announces_external_port(verdict: &NatVerdict) -> bool {
    matches!(verdict.mapping, classify::Mapping::NoTranslation | classify::Mapping::EndpointIndependent)
}

/// The node type and NAT info our record states for a verdict.
pub fn record_nat_info(verdict: &NatVerdict) -> (pb::NodeType, pb::NatInfo) {
    let reachability = match verdict.reachability {
        classify::Reachability::Unknown => pb::Reachability::Unknown,
        classify::Reachability::Public => pb::Reachability::Public,
        classify::Reachability::PrivatePunchable => pb::Reachability::PrivatePunchable,
        classify::Reachability::PrivateHard => pb::Reachability::PrivateHard,
    };
    let node_type = match verdict.reachability {
        classify::Reachability::Unknown => pb::NodeType::Unknown,
        classify::Reachability::Public => pb::NodeType::Public,
        _ => pb::NodeType::Private,
    };
    let mapping = match (verdict.udp, verdict.mapping) {
        (classify::Udp::Blocked, _) => pb::NatType::UdpBlocked,
        (_, classify::Mapping::NoTranslation) => pb::NatType::None,
        (_, classify::Mapping::EndpointIndependent) => pb::NatType::EndpointIndependent,
        (_, classify::Mapping::EndpointDependent(_)) => pb::NatType::EndpointDependent,
        (_, classify::Mapping::Unknown) => pb::NatType::Unknown,
    };
    let port_delta = match verdict.mapping {
        classify::Mapping::EndpointDependent(classify::PortAllocation::Sequential { delta }) => delta,
        _ => 0,
    };
    (node_type, pb::NatInfo { mapping: mapping as i32, reachability: reachability as i32, port_delta })
}
