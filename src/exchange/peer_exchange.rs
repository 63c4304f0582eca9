//! Peer exchange: a connected peer is asked for the signed records it holds of topics we share, and answers
//! the same question (`PeerExchangeRequest` in wire.proto). Asked once when a session begins, again every
//! [`PEER_EXCHANGE_INTERVAL`], and as soon as we join a topic. Records learnt this way are verified and stored;
//! peers behind NATs are reached by punching (`reach.rs`), the others are dialed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::record::{self, upsert_from_record};
use super::router::Protocol;
use super::session::SessionHandle;
use super::{Inner, now_ms};
use crate::api::names::NodeId;
use crate::store::{AddressSource, PeerQuery, UpsertOutcome};
use crate::wire::{self, pb};

/// How often connected peers are asked again for records of the topics we share: peers join and leave, and
/// records change (a NAT verdict tells us a peer needs a punch or a relay).
const PEER_EXCHANGE_INTERVAL: Duration = Duration::from_secs(60);
/// Topics asked about in one peer exchange with one peer.
const PEER_EXCHANGE_TOPICS: usize = 4;
/// Sessions asked per round.
const PEER_EXCHANGE_SESSIONS_PER_ROUND: usize = 8;

/// Answers `PeerExchangeRequest`: up to the asked number of stored records of a topic.
pub(super) struct PeerExchange;

impl Protocol for PeerExchange {
    type Request = pb::PeerExchangeRequest;

    super::router::accepts_variant!(PeerExchangeRequest);

    async fn answer(&self, node: &Arc<Inner>, _peer: NodeId, request: Self::Request) -> pb::envelope::Kind {
        let max = request.max_records.min(wire::MAX_PEER_EXCHANGE_RECORDS as u32);
        pb::envelope::Kind::PeerExchangeResponse(node.peer_exchange(&request.topic, max).await)
    }
}

impl Inner {
    /// The topics of `theirs` we have joined too, as many as one peer exchange asks about.
    pub(super) fn shared_topics(&self, theirs: &[String]) -> Vec<String> {
        let ours = self.publisher.topics();
        if ours.is_empty() {
            return Vec::new();
        }
        theirs.iter().filter(|t| ours.contains(t)).take(PEER_EXCHANGE_TOPICS).cloned().collect()
    }

    /// Asks a connected peer for records of `topics` (ones we share), verifies and stores each, and dials the
    /// new ones.
    pub(super) async fn exchange_peers(self: &Arc<Self>, session: SessionHandle, topics: Vec<String>) {
        for topic in topics {
            let request = pb::envelope::Kind::PeerExchangeRequest(pb::PeerExchangeRequest {
                topic: topic.clone(),
                max_records: self.options.peer_exchange_records,
            });
            let Ok((pb::envelope::Kind::PeerExchangeResponse(response), _)) =
                session.request(request, self.options.request_timeout).await
            else {
                continue;
            };
            let mut candidates = Vec::new();
            for signed in response.records.into_iter().take(wire::MAX_PEER_EXCHANGE_RECORDS) {
                let verified = match wire::verify_record(&signed, None, &self.policy()) {
                    Ok(verified) => verified,
                    Err(e) => {
                        tracing::debug!(peer = %session.peer(), error = %e, "dropping a record from peer exchange");
                        continue;
                    }
                };
                if verified.node_id == self.local || self.sessions.get(&verified.node_id).is_some() {
                    continue;
                }
                // A node behind a NAT lets in only what it expects: a punch (or relay) instead of a dial.
                if !self.reach_if_private(&verified) {
                    candidates.extend(record::dialable_addresses(&verified));
                    self.punch_if_dial_fails(&verified);
                }
                // A stale record (lower seq than stored) is simply not newer: nothing to do.
                let upsert = upsert_from_record(&verified, None, now_ms());
                if let Ok(UpsertOutcome::Added | UpsertOutcome::Updated) =
                    self.store.upsert_peer(upsert).await
                {
                    self.counters.records_from_peer_exchange.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.dialer.candidates(candidates, AddressSource::PeerExchange);
        }
    }

    /// Up to `max` stored records of peers in `topic`, most recently seen first, as received (signed).
    async fn peer_exchange(&self, topic: &str, max: u32) -> pb::PeerExchangeResponse {
        if crate::api::names::validate_topic(topic).is_err() || max == 0 {
            return pb::PeerExchangeResponse::default();
        }
        let query = PeerQuery { topic: Some(topic.to_owned()), limit: max, ..Default::default() };
        let Ok(page) = self.store.list_peers(query).await else { return pb::PeerExchangeResponse::default() };
        let mut records = Vec::new();
        for peer in page.peers {
            if let Ok(Some(detail)) = self.store.get_peer(peer.node_id).await
                && let Ok(signed) = <pb::SignedRecord as prost::Message>::decode(detail.record.as_slice())
            {
                records.push(signed);
            }
        }
        pb::PeerExchangeResponse { records }
    }
}

/// Peer exchange beyond the first one of each session: every [`PEER_EXCHANGE_INTERVAL`], and as soon as our
/// topics change (a new topic is worth asking about at once): our record changes with them, so the round waits
/// on the record rather than looking at the topics now and then.
pub(super) async fn peer_exchange_rounds(inner: std::sync::Weak<Inner>, shutdown: CancellationToken) {
    let Some(mut records) = inner.upgrade().map(|inner| inner.publisher.subscribe()) else { return };
    let mut asked_for = Vec::new();
    let mut next_round = Instant::now() + PEER_EXCHANGE_INTERVAL;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = records.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(next_round.into()) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let topics = inner.publisher.topics();
        if topics == asked_for && Instant::now() < next_round {
            continue;
        }
        asked_for = topics;
        next_round = Instant::now() + PEER_EXCHANGE_INTERVAL;
        for (_, session) in inner.sessions.all().into_iter().take(PEER_EXCHANGE_SESSIONS_PER_ROUND) {
            let asking = inner.clone();
            inner.tasks.spawn(async move {
                // The peer's record may have changed since the session began: its stored topics are current.
                let Ok(Some(theirs)) = asking.store.get_peer(session.peer()).await else { return };
                let shared = asking.shared_topics(&theirs.summary.topics);
                asking.exchange_peers(session, shared).await;
            });
        }
    }
}
