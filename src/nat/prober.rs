//! The NAT prober: gathers evidence about the NAT in front of our QUIC socket, classifies it with
//! [`super::classify`], and acts on the verdict.
//!
//! Evidence comes from sessions, through [`super::evidence::NatEvidence`]: every peer's report of where our
//! packets come from (mapping samples), and dial-backs that connected peers make to us from a fresh 4-tuple
//! (another port of their IP, another of their IPs), asked for through [`NatProbes`]. The verdict goes into our signed record (node type and NAT info, so peers know how to reach us), into
//! `GetNodeInfo` / `GetNatStatus`, and — once the mapping is known to be endpoint-independent — the external
//! port becomes the port the DHT announces.
//!
//! Probing runs once peers report our address (the prober waits on the evidence, it does not poll it), again
//! every [`REPROBE_INTERVAL`], and on demand (`ProbeNat`). What is known goes out through a `watch` channel
//! ([`NatProber::subscribe`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::classify::{self, NatVerdict, Observations};
use super::evidence::NatEvidence;
use super::probes::{DialBackOutcome, NatProbes};
use crate::api::names::NodeId;
use crate::clock::now_ms;
use crate::dht::Dht;
use crate::store::{NodeType, Store};
use crate::wire::pb;

/// How often the NAT is probed again (NATs and networks change under a long-running node).
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(600);
/// How often the published rendezvous peers are checked against live sessions and the peers' current records
/// (a peer's record says it is public only once its own verdict is in), and our interface addresses are read
/// again (a change of network).
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);
/// How long new evidence settles before a probe: the session of the peer that reported it is registered
/// just after its report, and it is the helper the probe asks for dial-backs.
const EVIDENCE_SETTLE: Duration = Duration::from_secs(1);
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
pub struct NatProber<P> {
    inner: Arc<ProberInner<P>>,
}

impl<P> Clone for NatProber<P> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct ProberInner<P> {
    probes: P,
    evidence: Arc<NatEvidence>,
    dht: Dht,
    store: Store,
    knowledge: watch::Sender<NatKnowledge>,
    /// One probe at a time: a second caller waits for the running one and reads its result.
    probing: tokio::sync::Mutex<()>,
}

impl<P: NatProbes> NatProber<P> {
    /// Starts the background schedule (a task of `tasks`); probes run until `shutdown`.
    pub fn start(
        probes: P,
        evidence: Arc<NatEvidence>,
        dht: Dht,
        store: Store,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let prober = Self {
            inner: Arc::new(ProberInner {
                probes,
                evidence,
                dht,
                store,
                knowledge: watch::Sender::new(NatKnowledge::default()),
                probing: tokio::sync::Mutex::new(()),
            }),
        };
        let background = prober.clone();
        tasks.spawn(async move { background.schedule(shutdown).await });
        prober
    }

    pub fn knowledge(&self) -> NatKnowledge {
        self.inner.knowledge.borrow().clone()
    }

    /// What is known, now and whenever it changes.
    pub fn subscribe(&self) -> watch::Receiver<NatKnowledge> {
        self.inner.knowledge.subscribe()
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
                    match self.inner.probes.request_dial_back(helper, kind).await {
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
            self.inner.probes.probe_mapping_via_dht(helper).await;
        }
        let mut observations = self.observations(&outcomes);
        let mut verdict = classify::classify(&observations);
        // Hairpinning can only be tested once we know the address to send to: our stable external one. Only
        // an arrival is evidence: a NAT may hairpin between neighbours yet drop a loop back to the sending
        // host itself (Linux does: the packet would leave with its own address as destination and source),
        // so a probe that did not come back leaves the verdict unknown rather than "not supported".
        if let (Some(external), true) = (verdict.external_address, announces_external_port(&verdict)) {
            let arrived = self.inner.probes.probe_hairpin(external).await;
            tracing::debug!(%external, arrived, "hairpin probe");
            if arrived {
                observations.hairpin.push(classify::HairpinProbe { target: external, arrived });
                verdict = classify::classify(&observations);
            }
        }
        let now = now_ms();
        let mut previous = None;
        self.inner.knowledge.send_modify(|knowledge| {
            for outcome in outcomes {
                if knowledge.dial_backs.len() >= DIAL_BACK_HISTORY {
                    knowledge.dial_backs.pop_front();
                }
                knowledge.dial_backs.push_back(DialBackRecord { outcome, at_ms: now });
            }
            knowledge.last_probe_ms = Some(now);
            previous = knowledge.verdict.replace(verdict.clone());
        });
        self.act_on(&verdict).await;
        // A punch planned with what we knew before may have chosen a strategy that could not work (a plain dial
        // where the birthday strategy was needed): peers reached only through a relay are worth another try.
        if previous.as_ref().map(record_nat_info) != Some(record_nat_info(&verdict)) {
            self.inner.probes.punch_relayed_peers();
        }
        self.knowledge()
    }

    async fn schedule(&self, shutdown: CancellationToken) {
        let mut evidence = self.inner.evidence.changes();
        let mut probed_with = *evidence.borrow_and_update();
        let mut maintenance = tokio::time::interval(MAINTENANCE_INTERVAL);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let reprobe = match self.knowledge().last_probe_ms {
                Some(at) => Duration::from_millis(
                    u64::try_from(at + REPROBE_INTERVAL.as_millis() as i64 - now_ms()).unwrap_or(0),
                ),
                None => Duration::MAX,
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = evidence.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(EVIDENCE_SETTLE).await;
                }
                () = sleep_for(reprobe) => {}
                _ = maintenance.tick() => {
                    // A new network (other interface addresses) invalidates what we measured of the old one's NAT.
                    if self.inner.probes.refresh_interfaces().await {
                        self.inner.evidence.forget();
                        self.inner.knowledge.send_modify(|knowledge| knowledge.last_probe_ms = None);
                    }
                    // Sessions come and go between probes: keep the published rendezvous peers live ones.
                    self.maintain_rendezvous().await;
                    continue;
                }
            }
            let now = *evidence.borrow_and_update();
            let due = match self.knowledge().last_probe_ms {
                None => now.samples > 0,
                Some(at) => {
                    now_ms().saturating_sub(at) >= REPROBE_INTERVAL.as_millis() as i64
                        // New witnesses can settle an undecided verdict: probe again soon after they report.
                        || (now != probed_with && self.undecided())
                }
            };
            if due {
                probed_with = now;
                self.probe().await;
            }
        }
    }

    fn undecided(&self) -> bool {
        self.inner
            .knowledge
            .borrow()
            .verdict
            .as_ref()
            .is_none_or(|v| v.reachability == classify::Reachability::Unknown)
    }

    /// Connected peers to ask for dial-backs, those that say they are public first.
    async fn pick_helpers(&self) -> Vec<NodeId> {
        let mut public = Vec::new();
        let mut others = Vec::new();
        for peer in self.inner.probes.witnesses().into_iter().map(|w| w.peer) {
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
        let evidence = &self.inner.evidence;
        let local = self.inner.probes.local_addr().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut observations = Observations::new(local);
        observations.interfaces =
            if_addrs::get_if_addrs().map(|list| list.iter().map(|i| i.ip()).collect()).unwrap_or_default();
        observations.mappings = evidence
            .mapping_samples()
            .iter()
            .map(|s| classify::MappingObservation {
                seq: s.seq,
                destination: s.destination,
                observed: s.observed,
            })
            .collect();
        let sessions: Vec<(NodeId, SocketAddr)> =
            self.inner.probes.witnesses().into_iter().map(|w| (w.peer, w.remote)).collect();
        let contacted = evidence.contacted_since(now_ms() - CONTACT_WINDOW.as_millis() as i64);
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
        if let Err(e) = self.inner.probes.publish_nat(node_type, nat).await {
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
            // In node id order, so the choice only changes when sessions do (each change re-signs the record
            // and pushes it to every peer), and no further than needed through a large session table.
            let mut witnesses = self.inner.probes.witnesses();
            witnesses.sort_by_key(|w| w.peer);
            for session in witnesses {
                if rendezvous.len() >= RENDEZVOUS_PEERS {
                    break;
                }
                let peer = session.peer;
                let Ok(Some(detail)) = self.inner.store.get_peer(peer).await else { continue };
                // A peer that says it is public, or one whose own verdict is still open but whose packets come
                // from an address its record names as one of its interfaces': nothing translates its address,
                // which from behind our NAT is what a public peer looks like (whoever dialed whom).
                let public = detail.summary.node_type == NodeType::Public
                    || (detail.summary.node_type == NodeType::Unknown
                        && !session.punched
                        && own_interface_address(&detail.record, session.remote));
                if public {
                    // A punch may not get through the NATs on both sides: the rendezvous also relays.
                    match self.inner.probes.reserve_relay(peer).await {
                        Ok(true) => {}
                        Ok(false) => tracing::debug!(%peer, "public peer does not relay for us"),
                        Err(e) => tracing::debug!(%peer, error = %e, "relay reservation failed"),
                    }
                    rendezvous.push(session.remote);
                }
            }
        }
        self.inner.probes.publish_rendezvous(rendezvous).await;
    }

    /// Whether others need a rendezvous to reach us: the verdict says so, or, while it is still open (too few
    /// witnesses, as in a network with a single public node), a peer saw our packets come from an address that
    /// is none of our interfaces'. An open verdict must not keep a node behind a NAT unreachable.
    fn behind_nat(&self) -> bool {
        let reachability = self.inner.knowledge.borrow().verdict.as_ref().map(|v| v.reachability);
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
                    .evidence
                    .mapping_samples()
                    .iter()
                    .any(|s| !interfaces.contains(&canonical(s.observed.ip())))
            }
        }
    }
}

/// A sleep that a `Duration::MAX` turns into "never".
async fn sleep_for(wait: Duration) {
    match tokio::time::Instant::now().checked_add(wait) {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
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
