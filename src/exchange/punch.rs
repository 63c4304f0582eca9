//! Hole punching through a rendezvous: how two nodes behind NATs get a direct QUIC connection with the help of a
//! peer both are connected to (the protocol is described in `proto/wire.proto`, "Hole punching through a
//! rendezvous").
//!
//! Three roles, all in this module because each needs the live session table and the endpoint:
//! - the **initiator** ([`Inner::punch_to`]) signs an offer with its candidate addresses and asks rendezvous
//!   peers, those the target's record names first, to pass it on;
//! - the **rendezvous** ([`Inner::forward_punch`]) checks the offer comes from the session that sent it, passes
//!   it to the target with the address it sees the initiator at, and returns the target's answer;
//! - the **target** ([`Inner::accept_introduction`]) checks the offer (signature, addressed to us, fresh, nonce
//!   unused), answers with its own, and starts dialing when the answer should have reached the initiator.
//!
//! Both sides then dial every candidate of the other from the one endpoint socket at once: the first packets
//! each side sends open its own NAT for the other side's packets, so whichever arrives after the other side's
//! NAT opened (a retransmitted Initial at worst) gets through. Connections that both succeed are resolved by
//! the session table like any simultaneous dial. A session admitted while a punch with its peer is running is
//! recorded as punched.
//!
//! Behind endpoint-dependent NATs the other side's port is one nobody has seen yet: [`super::traversal`]
//! predicts it (sequential ports) or finds it by the birthday strategy (random ports), as both offers' NAT
//! information decides.
//!
//! Everything is bounded: punches running at once, introductions a rendezvous forwards per requester, offers
//! remembered against replay, candidates dialed per punch, birthday punches at once (one).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::task::JoinSet;

use super::connector::{Dial, Route};
use super::router::Protocol;
use super::session::SessionHandle;
use super::traversal::{self, BirthdayReport, Strategy};
use super::{ExchangeError, Inner, IntroductionFailure, PunchError, now_ms};
use crate::api::names::NodeId;
use crate::store::{AddressSource, PunchOutcome};
use crate::sync::lock;
use crate::wire::{self, VerifiedPunchOffer, pb};

/// How long both sides keep dialing each other before a punch counts as failed: several of quinn's
/// Initial retransmissions.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(8);
/// How long after a punch a session with its peer still counts as punched (the other side's connection of
/// the same punch may complete a little later).
const PUNCH_AFTERGLOW: Duration = Duration::from_secs(10);
/// Punches (either role) running at once; more are refused as busy.
const MAX_CONCURRENT_PUNCHES: usize = 8;
/// Candidate addresses dialed per punch.
const MAX_DIALED_CANDIDATES: usize = 6;
/// Rendezvous peers asked, in turn, per punch.
const MAX_RENDEZVOUS_ASKED: usize = 4;
/// Introductions a rendezvous forwards for one requester per [`FORWARD_WINDOW`].
const MAX_FORWARDS_PER_WINDOW: u32 = 10;
const FORWARD_WINDOW: Duration = Duration::from_secs(60);
/// Requesters whose forward counts are remembered (oldest window forgotten first).
const MAX_FORWARD_REQUESTERS: usize = 1024;
/// Offers remembered against replay; an offer older than [`wire::MAX_PUNCH_OFFER_AGE`] is refused anyway.
const MAX_REMEMBERED_OFFERS: usize = 4096;
/// Automatic punches to the same peer (after discovering it) at most this often.
pub const AUTO_PUNCH_INTERVAL: Duration = Duration::from_secs(120);
/// Peers whose last automatic punch time is remembered.
const MAX_AUTO_PUNCH_PEERS: usize = 1024;

/// (our NAT type, their NAT type), as `wire.proto` `NatType` values; each as the records state them when the
/// attempt ended, so a success knows the peer's from its fresh record.
pub type NatPair = (i32, i32);

/// How long after the other side the easy side of a birthday punch starts spraying: the hard side's mappings
/// must be open first.
const BIRTHDAY_START_MARGIN: Duration = Duration::from_millis(50);
/// How long the hard side waits for another birthday punch to release the sockets (it does once a probe has
/// arrived, usually within a few hundred milliseconds). The easy side's spray lasts longer than this, so a
/// punch that waited still gets most of its probes.
const BIRTHDAY_SOCKETS_WAIT: Duration = Duration::from_secs(1);
/// Easy sides of birthday punches spraying at once (each is paced on its own).
const MAX_BIRTHDAY_SPRAYS: usize = 2;

/// What both sides of a punch agreed to do beyond dialing, from the NATs their offers state.
struct TraversalPlan {
    strategy: Strategy,
    nonce: u64,
    /// The address the rendezvous sees the other side at: its NAT mapping.
    their_observed: Option<SocketAddr>,
}

/// A punch's result, with what its strategy did (kept with the punch statistics).
struct PunchAttempt {
    outcome: Result<(SessionHandle, Duration), ExchangeError>,
    note: Option<String>,
}

/// The exchange's hole-punching state.
pub(super) struct PunchState {
    running: Arc<tokio::sync::Semaphore>,
    /// The hard side of a birthday punch holds hundreds of sockets until a probe arrives: one at a time.
    birthday_sockets: Arc<tokio::sync::Semaphore>,
    /// Easy sides spraying probes at once.
    birthday_sprays: Arc<tokio::sync::Semaphore>,
    /// Peers with a punch in progress (how many punches target each) or that ended recently (when).
    active: std::sync::Mutex<HashMap<NodeId, (usize, Instant)>>,
    /// (sender, nonce, when) of offers accepted, oldest first.
    seen: std::sync::Mutex<VecDeque<(NodeId, u64, i64)>>,
    /// Per requester: start of its current window and introductions forwarded in it.
    forwards: std::sync::Mutex<HashMap<NodeId, (Instant, u32)>>,
    auto: std::sync::Mutex<HashMap<NodeId, Instant>>,
    pub(super) attempts: AtomicU64,
    pub(super) successes: AtomicU64,
}

impl Default for PunchState {
    fn default() -> Self {
        Self {
            running: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PUNCHES)),
            birthday_sockets: Arc::new(tokio::sync::Semaphore::new(1)),
            birthday_sprays: Arc::new(tokio::sync::Semaphore::new(MAX_BIRTHDAY_SPRAYS)),
            active: std::sync::Mutex::default(),
            seen: std::sync::Mutex::default(),
            forwards: std::sync::Mutex::default(),
            auto: std::sync::Mutex::default(),
            attempts: AtomicU64::new(0),
            successes: AtomicU64::new(0),
        }
    }
}

impl PunchState {
    /// Whether a punch with `peer` is running or just ended: a session admitted now was punched. Both sides
    /// often connect, and the one the session table keeps may complete after the punch that caused it ended.
    pub(super) fn is_active(&self, peer: &NodeId) -> bool {
        lock(&self.active)
            .get(peer)
            .is_some_and(|(running, ended)| *running > 0 || ended.elapsed() < PUNCH_AFTERGLOW)
    }

    /// Accepts `(from, nonce)` once.
    fn first_use(&self, offer: &VerifiedPunchOffer, now: i64) -> bool {
        let mut seen = lock(&self.seen);
        let max_age = wire::MAX_PUNCH_OFFER_AGE.as_millis() as i64;
        // Anything older than twice the age limit would be refused as stale anyway.
        while seen.front().is_some_and(|(_, _, at)| now.saturating_sub(*at) > 2 * max_age) {
            seen.pop_front();
        }
        if seen.iter().any(|(from, nonce, _)| *from == offer.from && *nonce == offer.nonce) {
            return false;
        }
        if seen.len() >= MAX_REMEMBERED_OFFERS {
            seen.pop_front();
        }
        seen.push_back((offer.from, offer.nonce, now));
        true
    }

    /// Counts one forward for `requester`; false when it used up its window.
    fn allow_forward(&self, requester: NodeId) -> bool {
        let mut forwards = lock(&self.forwards);
        let now = Instant::now();
        if !forwards.contains_key(&requester) && forwards.len() >= MAX_FORWARD_REQUESTERS {
            forwards.retain(|_, (start, _)| now.duration_since(*start) < FORWARD_WINDOW);
            if forwards.len() >= MAX_FORWARD_REQUESTERS {
                return false;
            }
        }
        let (start, count) = forwards.entry(requester).or_insert((now, 0));
        if now.duration_since(*start) >= FORWARD_WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= MAX_FORWARDS_PER_WINDOW
    }

    /// Whether an automatic punch to `peer` may start now (and notes that it does).
    pub(super) fn auto_punch_due(&self, peer: NodeId) -> bool {
        let mut auto = lock(&self.auto);
        let now = Instant::now();
        if auto.get(&peer).is_some_and(|at| now.duration_since(*at) < AUTO_PUNCH_INTERVAL) {
            return false;
        }
        if auto.len() >= MAX_AUTO_PUNCH_PEERS {
            auto.retain(|_, at| now.duration_since(*at) < AUTO_PUNCH_INTERVAL);
            if auto.len() >= MAX_AUTO_PUNCH_PEERS {
                return false;
            }
        }
        auto.insert(peer, now);
        true
    }

    /// Counts an attempt and describes it for the store, with what its strategy did (`note`).
    fn record(
        &self,
        (our_nat, their_nat): NatPair,
        outcome: &Result<Duration, String>,
        note: Option<&str>,
    ) -> PunchOutcome {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let (mut detail, time_to_connected_ms) = match outcome {
            Ok(elapsed) => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                (
                    format!("connected directly in {} ms", elapsed.as_millis()),
                    Some(elapsed.as_millis() as u64),
                )
            }
            Err(reason) => (reason.clone(), None),
        };
        if let Some(note) = note {
            detail = format!("{detail} ({note})");
        }
        PunchOutcome { our_nat, their_nat, detail, at_ms: now_ms(), time_to_connected_ms }
    }
}

/// Marks a peer as being punched for as long as it lives.
struct ActivePunch<'a> {
    state: &'a PunchState,
    peer: NodeId,
}

impl<'a> ActivePunch<'a> {
    fn new(state: &'a PunchState, peer: NodeId) -> Self {
        let mut active = lock(&state.active);
        // Forget punches long over; running ones stay (their count is bounded by the punch semaphore).
        active.retain(|_, (running, ended)| *running > 0 || ended.elapsed() < PUNCH_AFTERGLOW);
        active.entry(peer).or_insert((0, Instant::now())).0 += 1;
        Self { state, peer }
    }
}

impl Drop for ActivePunch<'_> {
    fn drop(&mut self) {
        if let Some((running, ended)) = lock(&self.state.active).get_mut(&self.peer) {
            *running = running.saturating_sub(1);
            *ended = Instant::now();
        }
    }
}

pub(super) fn random_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    // A weak nonce only weakens replay protection of a message that is also time-bound and useless to replay
    // to anyone but its target; the time is a fine fallback.
    if getrandom::fill(&mut bytes).is_err() {
        return now_ms() as u64;
    }
    u64::from_le_bytes(bytes)
}

fn error_kind(message: String) -> pb::envelope::Kind {
    pb::envelope::Kind::Error(pb::ErrorResponse { code: pb::ErrorCode::Unspecified as u32, message })
}

/// Candidates in the order to try: the address a rendezvous saw (the NAT mapping the other side's packets use)
/// first, then the other side's own list (bounded), then every address it predicted; same IP family as our
/// socket only, no duplicates.
fn dial_order(observed: Option<SocketAddr>, offer: &VerifiedPunchOffer, ours: SocketAddr) -> Vec<SocketAddr> {
    let mut order: Vec<SocketAddr> = Vec::new();
    let add = |candidate: &SocketAddr, order: &mut Vec<SocketAddr>| {
        if candidate.is_ipv4() == ours.is_ipv4() && !order.contains(candidate) {
            order.push(*candidate);
        }
    };
    for candidate in observed.iter().chain(&offer.candidates) {
        add(candidate, &mut order);
    }
    order.truncate(MAX_DIALED_CANDIDATES);
    for candidate in offer.predicted.iter().take(wire::MAX_PUNCH_CANDIDATES) {
        add(candidate, &mut order);
    }
    order
}

impl Inner {
    /// The live session with `peer`, unless it goes through a relay.
    pub(super) fn direct_session(&self, peer: &NodeId) -> Option<SessionHandle> {
        self.sessions.get(peer).filter(|s| !s.path().is_relayed())
    }

    /// The addresses we offer: every address our record states except rendezvous ones.
    fn own_candidates(&self) -> Vec<SocketAddr> {
        let current = self.publisher.current();
        let Ok(body) = pb::RecordBody::decode(current.body.as_slice()) else { return Vec::new() };
        let addresses = crate::wire::RecordAddress::all_of(&body);
        addresses.into_iter().filter(|a| !a.rendezvous).map(|a| a.address).collect()
    }

    /// Our NAT as our record states it.
    fn own_nat(&self) -> pb::NatInfo {
        pb::RecordBody::decode(self.publisher.current().body.as_slice())
            .ok()
            .and_then(|b| b.nat)
            .unwrap_or_default()
    }

    /// Behind a NAT with sequential ports: where its next flows will most likely be mapped, from a port sampled
    /// now through `reflector` (a public peer's session). Empty otherwise, or when no sample came back.
    async fn predict_own_mappings(&self, reflector: &SessionHandle) -> Vec<SocketAddr> {
        let nat = self.own_nat();
        if nat.mapping != pb::NatType::EndpointDependent as i32 || nat.port_delta == 0 {
            return Vec::new();
        }
        let address = reflector.connection().remote_address();
        let public = self
            .stored_record_body(reflector.peer())
            .await
            .is_some_and(|body| body.node_type == pb::NodeType::Public as i32);
        if !public || super::is_relayed(&address) {
            return Vec::new();
        }
        match traversal::sample_new_mapping(address).await {
            Some(sampled) => {
                let predicted = traversal::predicted_addresses(sampled, nat.port_delta);
                tracing::debug!(%sampled, delta = nat.port_delta, ?predicted, "predicted our next mappings");
                predicted
            }
            None => {
                tracing::debug!(reflector = %address, "no address reflection; punching without a prediction");
                Vec::new()
            }
        }
    }

    /// Counts a punch (metrics) and keeps its outcome in the store, by NAT pair.
    async fn note_punch(&self, pair: NatPair, attempt: &PunchAttempt) {
        let result = attempt.outcome.as_ref().map(|(_, elapsed)| *elapsed).map_err(ToString::to_string);
        let outcome = self.punch.record(pair, &result, attempt.note.as_deref());
        if let Err(e) = self.store.record_punch(outcome).await {
            tracing::warn!(error = %e, "could not store a punch outcome");
        }
    }

    /// Our NAT type as our record states it, and `peer`'s as its stored record does.
    async fn nat_pair(&self, peer: NodeId) -> NatPair {
        let ours = pb::RecordBody::decode(self.publisher.current().body.as_slice())
            .ok()
            .and_then(|b| b.nat)
            .map_or(0, |n| n.mapping);
        let theirs = self.stored_record_body(peer).await.and_then(|b| b.nat).map_or(0, |n| n.mapping);
        (ours, theirs)
    }

    pub(super) async fn stored_record_body(&self, peer: NodeId) -> Option<pb::RecordBody> {
        let detail = self.store.get_peer(peer).await.ok()??;
        let signed = pb::SignedRecord::decode(detail.record.as_slice()).ok()?;
        pb::RecordBody::decode(signed.body.as_slice()).ok()
    }

    /// Sessions to ask for an introduction to `peer`: the rendezvous its record names (dialed if needed),
    /// then other connected peers, public ones first.
    pub(super) async fn rendezvous_for(self: &Arc<Self>, peer: NodeId) -> Vec<SessionHandle> {
        let mut chosen: Vec<SessionHandle> = Vec::new();
        let named: Vec<SocketAddr> = self
            .stored_record_body(peer)
            .await
            .map(|body| super::record::rendezvous_addresses(&body))
            .unwrap_or_default();
        // A rendezvous must reach both sides directly: relayed sessions cannot introduce anyone.
        let connected: Vec<(NodeId, SessionHandle)> =
            self.sessions.all().into_iter().filter(|(_, s)| !s.path().is_relayed()).collect();
        for address in named {
            let session = match connected.iter().find(|(_, s)| s.connection().remote_address() == address) {
                Some((_, session)) => Some(session.clone()),
                None => match self.dialer.dial_now(address, AddressSource::Record).await {
                    super::dialer::DialOutcome::Verified(verified) => self.sessions.get(&verified.node_id),
                    super::dialer::DialOutcome::Failed(e) => {
                        tracing::debug!(%peer, %address, error = %e, "rendezvous named in the record is unreachable");
                        None
                    }
                },
            };
            if let Some(session) = session
                && session.peer() != peer
                && !chosen.iter().any(|c| c.peer() == session.peer())
            {
                chosen.push(session);
            }
        }
        let mut public = Vec::new();
        let mut others = Vec::new();
        for (id, session) in connected {
            // Enough public ones found: the rest of a large session table need not be read from the store.
            if chosen.len() + public.len() >= MAX_RENDEZVOUS_ASKED {
                break;
            }
            if id == peer || chosen.iter().any(|c| c.peer() == id) {
                continue;
            }
            let is_public = self
                .stored_record_body(id)
                .await
                .is_some_and(|body| body.node_type == pb::NodeType::Public as i32);
            if is_public { public.push(session) } else { others.push(session) }
        }
        chosen.extend(public);
        chosen.extend(others);
        chosen.truncate(MAX_RENDEZVOUS_ASKED);
        chosen
    }

    /// The initiator: gets a direct connection to `peer` by hole punching through a common rendezvous.
    #[tracing::instrument(name = "nat.punch", skip_all, fields(peer = %peer))]
    pub(super) async fn punch_to(self: &Arc<Self>, peer: NodeId) -> Result<SessionHandle, ExchangeError> {
        // A relayed session is no reason not to punch: a punched one replaces it (the upgrade to direct).
        if let Some(session) = self.direct_session(&peer) {
            return Ok(session);
        }
        let _permit = self.punch.running.clone().try_acquire_owned().map_err(|_| ExchangeError::Busy)?;
        let rendezvous = self.rendezvous_for(peer).await;
        if rendezvous.is_empty() {
            return Err(PunchError::NoRendezvous.into());
        }
        let local = self.endpoint.local_addr()?;
        let mut last_error = None;
        let our_nat = self.own_nat();
        for via in rendezvous {
            let nonce = random_nonce();
            let predicted = self.predict_own_mappings(&via).await;
            let offer = wire::sign_punch_offer(
                self.publisher.signing_key(),
                peer,
                nonce,
                now_ms(),
                &self.own_candidates(),
                our_nat,
                &predicted,
            );
            let request = pb::envelope::Kind::PunchRequest(pb::PunchRequest { offer: Some(offer) });
            // The rendezvous waits for the target's answer before answering us.
            let answer = via.request(request, self.options.request_timeout * 2).await;
            let response = match answer {
                Ok((pb::envelope::Kind::PunchResponse(response), _)) => response,
                Ok(_) => {
                    last_error = Some((via.peer(), IntroductionFailure::UnexpectedAnswer));
                    continue;
                }
                Err(e) => {
                    tracing::debug!(rendezvous = %via.peer(), error = %e, "rendezvous could not introduce us");
                    last_error = Some((via.peer(), IntroductionFailure::Request(Box::new(e))));
                    continue;
                }
            };
            let Some(offer) = response.offer.as_ref() else { continue };
            let theirs = match wire::verify_punch_offer(offer, peer, self.local, now_ms()) {
                Ok(theirs) if theirs.nonce == nonce => theirs,
                Ok(_) => {
                    last_error = Some((via.peer(), IntroductionFailure::WrongNonce));
                    continue;
                }
                Err(e) => {
                    last_error = Some((via.peer(), IntroductionFailure::BadOffer(e)));
                    continue;
                }
            };
            let observed = response.observed_address.parse().ok();
            let candidates = dial_order(observed, &theirs, local);
            let plan = TraversalPlan {
                strategy: traversal::strategy(&our_nat, &theirs.nat),
                nonce,
                their_observed: observed,
            };
            tracing::info!(rendezvous = %via.peer(), ?candidates, strategy = ?plan.strategy, "punching");
            let attempt = self.dial_simultaneously(peer, candidates, Duration::ZERO, plan).await;
            // After the attempt: a success has just stored the peer's record, with its NAT type.
            let pair = self.nat_pair(peer).await;
            self.note_punch(pair, &attempt).await;
            return attempt.outcome.map(|(session, _)| session);
        }
        Err(match last_error {
            Some((rendezvous, failure)) => PunchError::Introduction { rendezvous, failure }.into(),
            // Every answer lacked an offer.
            None => PunchError::NoRendezvous.into(),
        })
    }

    /// The rendezvous: passes `requester`'s offer to its target and returns the target's answer.
    pub(super) async fn forward_punch(
        &self,
        requester: NodeId,
        request: pb::PunchRequest,
    ) -> pb::envelope::Kind {
        let Some(offer) = request.offer else { return error_kind("PunchRequest without an offer".into()) };
        let target = match wire::punch_offer_parties(&offer) {
            Ok((_, target)) => target,
            Err(e) => return error_kind(format!("offer refused: {e}")),
        };
        if let Err(e) = wire::verify_punch_offer(&offer, requester, target, now_ms()) {
            return error_kind(format!("offer refused: {e}"));
        }
        if !self.punch.allow_forward(requester) {
            return pb::envelope::Kind::Error(pb::ErrorResponse {
                code: pb::ErrorCode::RateLimited as u32,
                message: "too many introductions asked; retry in a minute".into(),
            });
        }
        let (Some(from_session), Some(to_session)) =
            (self.sessions.get(&requester), self.sessions.get(&target))
        else {
            return error_kind(format!("not connected to {target}"));
        };
        let introduction = pb::envelope::Kind::PunchIntroduction(pb::PunchIntroduction {
            offer: Some(offer),
            observed_address: from_session.connection().remote_address().to_string(),
            rtt_to_sender_us: from_session.connection().rtt().as_micros() as u64,
        });
        match to_session.request(introduction, self.options.request_timeout).await {
            Ok((pb::envelope::Kind::PunchResponse(mut response), _)) => {
                let valid = response
                    .offer
                    .as_ref()
                    .is_some_and(|o| wire::verify_punch_offer(o, target, requester, now_ms()).is_ok());
                if !valid {
                    return error_kind(format!("{target} answered with an invalid offer"));
                }
                response.observed_address = to_session.connection().remote_address().to_string();
                response.rtt_to_peer_us = to_session.connection().rtt().as_micros() as u64;
                pb::envelope::Kind::PunchResponse(response)
            }
            Ok(_) => error_kind(format!("{target} answered with another message")),
            Err(e) => error_kind(format!("{target} did not answer: {e}")),
        }
    }

    /// The target: checks an introduction passed on by `rendezvous`, answers it, and starts dialing.
    pub(super) async fn accept_introduction(
        self: &Arc<Self>,
        rendezvous: NodeId,
        introduction: pb::PunchIntroduction,
    ) -> pb::envelope::Kind {
        let Some(offer) = introduction.offer else {
            return error_kind("introduction without an offer".into());
        };
        let from = match wire::punch_offer_parties(&offer) {
            Ok((from, _)) => from,
            Err(e) => return error_kind(format!("offer refused: {e}")),
        };
        let now = now_ms();
        let theirs = match wire::verify_punch_offer(&offer, from, self.local, now) {
            Ok(theirs) => theirs,
            Err(e) => {
                tracing::warn!(%rendezvous, error = %e, "punch introduction refused");
                return error_kind(format!("offer refused: {e}"));
            }
        };
        if from == self.local || from == rendezvous {
            return error_kind("an introduction to oneself or to the rendezvous itself".into());
        }
        if !self.punch.first_use(&theirs, now) {
            return error_kind("offer already used (replay)".into());
        }
        let Ok(permit) = self.punch.running.clone().try_acquire_owned() else {
            return pb::envelope::Kind::Error(pb::ErrorResponse {
                code: pb::ErrorCode::RateLimited as u32,
                message: "too many punches running".into(),
            });
        };
        let Ok(local) = self.endpoint.local_addr() else { return error_kind("endpoint closed".into()) };
        let predicted = match self.sessions.get(&rendezvous) {
            Some(session) => self.predict_own_mappings(&session).await,
            None => Vec::new(),
        };
        let our_nat = self.own_nat();
        let answer = wire::sign_punch_offer(
            self.publisher.signing_key(),
            from,
            theirs.nonce,
            now_ms(),
            &self.own_candidates(),
            our_nat,
            &predicted,
        );
        let observed = introduction.observed_address.parse().ok();
        let candidates = dial_order(observed, &theirs, local);
        let plan = TraversalPlan {
            strategy: traversal::strategy(&our_nat, &theirs.nat),
            nonce: theirs.nonce,
            their_observed: observed,
        };
        // Our answer reaches the initiator in about half of each leg's round trip; it starts dialing then.
        let rtt_to_rendezvous =
            self.sessions.get(&rendezvous).map_or(Duration::ZERO, |s| s.connection().rtt());
        let delay =
            (rtt_to_rendezvous + Duration::from_micros(introduction.rtt_to_sender_us.min(2_000_000))) / 2;
        let inner = self.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            tracing::info!(peer = %from, %rendezvous, ?candidates, ?delay, strategy = ?plan.strategy, "punching on introduction");
            let attempt = inner.dial_simultaneously(from, candidates, delay, plan).await;
            let pair = inner.nat_pair(from).await;
            inner.note_punch(pair, &attempt).await;
        });
        pb::envelope::Kind::PunchResponse(pb::PunchResponse {
            offer: Some(answer),
            observed_address: String::new(),
            rtt_to_peer_us: 0,
        })
    }

    /// Both sides of a punch: after `delay`, dials every candidate at once (and runs the birthday strategy when
    /// the plan says so), and returns the session with `peer` as soon as one exists (ours or the one `peer`
    /// dialed to us), or fails after [`PUNCH_WINDOW`].
    async fn dial_simultaneously(
        self: &Arc<Self>,
        peer: NodeId,
        candidates: Vec<SocketAddr>,
        delay: Duration,
        plan: TraversalPlan,
    ) -> PunchAttempt {
        let _active = ActivePunch::new(&self.punch, peer);
        if candidates.is_empty() && plan.strategy == Strategy::Dial {
            let outcome = Err(PunchError::NoDialableAddress.into());
            return PunchAttempt { outcome, note: None };
        }
        let started = Instant::now();
        // Started before the delay: the hard side's mappings must be open before the easy side's probes come.
        let report = Arc::new(std::sync::Mutex::new(None));
        let birthday = self.start_birthday(peer, &plan, delay, started, report.clone());
        tokio::time::sleep(delay).await;
        let mut dials = JoinSet::new();
        for address in candidates {
            let inner = self.clone();
            dials.spawn(async move {
                inner.dial(Dial { started, ..Dial::to(address, Some(peer), AddressSource::Record) }).await
            });
        }
        let deadline = tokio::time::Instant::now() + PUNCH_WINDOW;
        let mut last_error = None;
        let mut session = None;
        loop {
            // Enabled before the table is looked at, so a session admitted in between still wakes us.
            let admitted = self.sessions.next_admission();
            tokio::pin!(admitted);
            admitted.as_mut().enable();
            if let Some(found) = self.direct_session(&peer) {
                session = Some(found);
                break;
            }
            tokio::select! {
                finished = dials.join_next(), if !dials.is_empty() => {
                    if let Some(Ok(Err(e))) = finished {
                        last_error = Some(e);
                    }
                }
                () = &mut admitted => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Dials still running are abandoned: the session exists, or the window is over.
        dials.abort_all();
        if let Some(mut birthday) = birthday {
            // The easy side stops spraying on its own once connected; give it a moment to say how far it got,
            // then stop whatever is left (a hard side still holding its sockets).
            let _ = tokio::time::timeout(Duration::from_millis(100), &mut birthday).await;
            birthday.abort();
        }
        let note = lock(&report).as_ref().map(ToString::to_string);
        let outcome = match session.or_else(|| self.direct_session(&peer)) {
            Some(session) => Ok((session, started.elapsed())),
            None => Err(ExchangeError::Punch(match last_error {
                Some(e) => {
                    PunchError::LastDialFailed { window_secs: PUNCH_WINDOW.as_secs(), last_dial: Box::new(e) }
                }
                None => PunchError::NoConnection { window_secs: PUNCH_WINDOW.as_secs() },
            })),
        };
        PunchAttempt { outcome, note }
    }

    /// Starts our side of a birthday punch, if the plan has one; what it does goes into `report`. The task
    /// ends by itself: the easy side once connected or out of probes, the hard side once a probe came and it
    /// dialed, or when the punch window is over.
    fn start_birthday(
        self: &Arc<Self>,
        peer: NodeId,
        plan: &TraversalPlan,
        delay: Duration,
        started: Instant,
        report: Arc<std::sync::Mutex<Option<BirthdayReport>>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if plan.strategy == Strategy::Dial {
            return None;
        }
        let Some(their_observed) = plan.their_observed else {
            *lock(&report) =
                Some(BirthdayReport::Skipped("the rendezvous did not say where the peer is".into()));
            return None;
        };
        let inner = self.clone();
        let (strategy, nonce) = (plan.strategy, plan.nonce);
        if strategy == Strategy::BirthdayEasy {
            let Ok(permit) = self.punch.birthday_sprays.clone().try_acquire_owned() else {
                *lock(&report) = Some(BirthdayReport::Skipped("other birthday punches are spraying".into()));
                return None;
            };
            return Some(self.tasks.spawn(async move {
                let _permit = permit;
                tokio::time::sleep(delay + BIRTHDAY_START_MARGIN).await;
                let connected = || inner.direct_session(&peer).is_some();
                let progress = |probes_sent| *lock(&report) = Some(BirthdayReport::Easy { probes_sent });
                traversal::spray_probes(&inner.endpoint, their_observed.ip(), nonce, connected, progress)
                    .await;
            }));
        }
        Some(self.tasks.spawn(async move {
            let sockets = inner.punch.birthday_sockets.clone();
            let Ok(Ok(permit)) = tokio::time::timeout(BIRTHDAY_SOCKETS_WAIT, sockets.acquire_owned()).await
            else {
                *lock(&report) =
                    Some(BirthdayReport::Skipped("another birthday punch held the sockets".into()));
                return;
            };
            let window = delay + BIRTHDAY_START_MARGIN + PUNCH_WINDOW;
            let sockets = match traversal::open_mappings(their_observed, nonce).await {
                Ok(sockets) => sockets,
                Err(e) => {
                    *lock(&report) =
                        Some(BirthdayReport::Skipped(format!("could not open its sockets: {e}")));
                    return;
                }
            };
            let opened = sockets.len();
            *lock(&report) = Some(BirthdayReport::Hard { sockets: opened, hit: false });
            let probe =
                tokio::time::timeout(window, traversal::await_probe(sockets, their_observed.ip(), nonce));
            let Ok(Some((socket, easy))) = probe.await else { return };
            // The other sockets are closed: the next birthday punch may have them.
            drop(permit);
            *lock(&report) = Some(BirthdayReport::Hard { sockets: opened, hit: true });
            let dial = async {
                let socket = socket.into_std().map_err(PunchError::Socket)?;
                let route = Route::Socket { socket, to: easy };
                let dial =
                    Dial { route, peer: Some(peer), source: AddressSource::Record, started, deadline: None };
                inner.dial(dial).await
            };
            if let Err(e) = dial.await {
                tracing::debug!(%peer, %easy, error = %e, "dial from the birthday socket failed");
            }
        }))
    }
}

/// Serves `PunchRequest` as a rendezvous: forwards the requester's offer to the target it names.
pub(super) struct ForwardPunch;

impl Protocol for ForwardPunch {
    type Request = pb::PunchRequest;

    super::router::accepts_variant!(PunchRequest);

    async fn answer(&self, node: &Arc<Inner>, peer: NodeId, request: Self::Request) -> pb::envelope::Kind {
        node.forward_punch(peer, request).await
    }
}

/// Takes a `PunchIntroduction` from a rendezvous: answers with our offer and dials the requester at once.
pub(super) struct AcceptIntroduction;

impl Protocol for AcceptIntroduction {
    type Request = pb::PunchIntroduction;

    super::router::accepts_variant!(PunchIntroduction);

    async fn answer(
        &self,
        node: &Arc<Inner>,
        peer: NodeId,
        introduction: Self::Request,
    ) -> pb::envelope::Kind {
        node.accept_introduction(peer, introduction).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    #[test]
    fn dial_order_puts_the_observed_mapping_first_and_keeps_one_family() {
        let ours: SocketAddr = "0.0.0.0:30906".parse().unwrap();
        let observed: SocketAddr = "203.0.113.101:30906".parse().unwrap();
        let offered: Vec<SocketAddr> =
            vec!["192.168.1.2:30906".parse().unwrap(), observed, "[2001:db8::1]:30906".parse().unwrap()];
        let offer = |candidates: Vec<SocketAddr>, predicted: Vec<SocketAddr>| VerifiedPunchOffer {
            from: peer(1),
            to: peer(2),
            nonce: 1,
            timestamp_ms: 0,
            candidates,
            nat: pb::NatInfo::default(),
            predicted,
        };
        assert_eq!(
            dial_order(Some(observed), &offer(offered.clone(), vec![]), ours),
            vec![observed, offered[0]]
        );
        let many: Vec<SocketAddr> = (1..40).map(|p| SocketAddr::from(([198, 51, 100, 1], p))).collect();
        assert_eq!(dial_order(None, &offer(many.clone(), vec![]), ours).len(), MAX_DIALED_CANDIDATES);
        // Predicted addresses are all dialed, after the candidates.
        let predicted: Vec<SocketAddr> =
            (1..=16).map(|p| SocketAddr::from(([203, 0, 113, 9], 20000 + p))).collect();
        let order = dial_order(Some(observed), &offer(offered.clone(), predicted.clone()), ours);
        assert_eq!(order.len(), 2 + predicted.len());
        assert_eq!(order[2..], predicted[..]);
    }

    #[test]
    fn an_offer_is_accepted_once() {
        let state = PunchState::default();
        let offer = VerifiedPunchOffer {
            from: peer(1),
            to: peer(2),
            nonce: 7,
            timestamp_ms: 0,
            candidates: vec![],
            nat: pb::NatInfo::default(),
            predicted: vec![],
        };
        assert!(state.first_use(&offer, 1_000));
        assert!(!state.first_use(&offer, 2_000), "the same (sender, nonce) is a replay");
        let other = VerifiedPunchOffer { nonce: 8, ..offer.clone() };
        assert!(state.first_use(&other, 2_000));
    }

    #[test]
    fn forwards_are_limited_per_requester_and_window() {
        let state = PunchState::default();
        for _ in 0..MAX_FORWARDS_PER_WINDOW {
            assert!(state.allow_forward(peer(1)));
        }
        assert!(!state.allow_forward(peer(1)), "the requester used up its window");
        assert!(state.allow_forward(peer(2)), "others are not affected");
    }

    #[test]
    fn outcomes_are_counted_and_described_for_the_store() {
        let state = PunchState::default();
        let ok = state.record((2, 2), &Ok(Duration::from_millis(120)), None);
        let birthday = BirthdayReport::Easy { probes_sent: 312 }.to_string();
        let failed = state.record((2, 3), &Err("no connection within 8 s".into()), Some(&birthday));
        assert_eq!((ok.our_nat, ok.their_nat, ok.time_to_connected_ms), (2, 2, Some(120)));
        assert_eq!(failed.time_to_connected_ms, None);
        assert!(failed.detail.contains("no connection"));
        assert!(failed.detail.contains("312 of 2048 probes"), "the budget used is kept: {}", failed.detail);
        assert_eq!(state.attempts.load(Ordering::Relaxed), 2);
        assert_eq!(state.successes.load(Ordering::Relaxed), 1);
        assert!(state.auto_punch_due(peer(3)));
        assert!(!state.auto_punch_due(peer(3)), "not again within the interval");
    }
}
