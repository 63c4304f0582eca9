//! `PeerService`: listing, showing, watching and forgetting stored peers; connecting to a peer and querying
//! its metadata live over QUIC.

use std::collections::HashSet;
use std::pin::Pin;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Context;
use super::convert::{self, node_id_arg, quoted, store_status, topic_arg};
use crate::api::control::peer_service_server::PeerService;
use crate::api::control::{
    ConnectPeerRequest, ConnectPeerResponse, ForgetPeerRequest, ForgetPeerResponse, GetPeerRequest,
    GetPeerResponse, ListPeersRequest, ListPeersResponse, PeerEvent, PeerEventKind, PeerOrder,
    QueryPeerMetadataRequest, QueryPeerMetadataResponse, WatchPeersRequest,
};
use crate::api::names::NodeId;
use crate::exchange::ExchangeError;
use crate::exchange::session::CloseCode;
use crate::quic::QuicError;
use crate::store::{self, PeerQuery};

/// Page size when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page served; bigger requests are capped to it.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Events buffered per watcher before its stream applies back-pressure.
const WATCH_BUFFER: usize = 256;
/// Longest `address` looked at: a DNS name is at most 253 bytes, plus brackets, a colon and a port. Anything
/// longer is refused before a resolver sees it.
const MAX_ADDRESS_LEN: usize = 263;

pub struct Peers(pub Context);

type EventStream = Pin<Box<dyn Stream<Item = Result<PeerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl PeerService for Peers {
    async fn list_peers(
        &self,
        request: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let req = request.into_inner();
        let topic = (!req.topic.is_empty()).then_some(req.topic);
        if let Some(topic) = &topic {
            topic_arg("topic", topic)?;
        }
        let order = match PeerOrder::try_from(req.order) {
            Ok(PeerOrder::Unspecified | PeerOrder::LastSeen) => store::PeerOrder::LastSeen,
            Ok(PeerOrder::Score) => store::PeerOrder::Score,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "order: {} is not a PeerOrder; use PEER_ORDER_LAST_SEEN or PEER_ORDER_SCORE",
                    req.order
                )));
            }
        };
        let mut query = PeerQuery {
            topic,
            node_type: convert::node_type_filter(req.node_type)?,
            seen_since_ms: req.seen_since.as_ref().map(convert::millis),
            order,
            limit: match req.page_size {
                0 => DEFAULT_PAGE_SIZE,
                n => n.min(MAX_PAGE_SIZE),
            },
            after: None,
        };
        if !req.page_token.is_empty() {
            query.after = Some(page_token::decode(&req.page_token, &query)?);
        }
        let page = self.0.store.list_peers(query.clone()).await.map_err(store_status)?;
        Ok(Response::new(ListPeersResponse {
            peers: page.peers.into_iter().map(convert::into_peer_summary).collect(),
            next_page_token: page.next.map(|cursor| page_token::encode(&cursor, &query)).unwrap_or_default(),
            total: page.total,
        }))
    }

    async fn get_peer(&self, request: Request<GetPeerRequest>) -> Result<Response<GetPeerResponse>, Status> {
        let node_id = node_id_arg("node_id", &request.get_ref().node_id)?;
        match self.0.store.get_peer(node_id).await.map_err(store_status)? {
            Some(detail) => {
                let mut peer = convert::peer_detail(&detail);
                peer.connection = Some(convert::connection(self.0.exchange.session_info(&node_id).as_ref()));
                Ok(Response::new(GetPeerResponse { peer: Some(peer) }))
            }
            None => Err(Status::not_found(format!("no peer {node_id} in the store"))),
        }
    }

    type WatchPeersStream = EventStream;

    async fn watch_peers(
        &self,
        request: Request<WatchPeersRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        let topic = (!req.topic.is_empty()).then_some(req.topic);
        if let Some(topic) = &topic {
            topic_arg("topic", topic)?;
        }
        // Subscribe before taking the snapshot so that no change falls between the two; a change may then
        // appear both in the snapshot and as an event, which is harmless for a client applying events in order.
        let live = self.0.store.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher { ctx: self.0.clone(), topic, tx, visible: HashSet::new() };
        tokio::spawn(watcher.run(req.include_snapshot, live));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn forget_peer(
        &self,
        request: Request<ForgetPeerRequest>,
    ) -> Result<Response<ForgetPeerResponse>, Status> {
        let node_id = node_id_arg("node_id", &request.get_ref().node_id)?;
        let forgotten = self.0.store.forget_peer(node_id).await.map_err(store_status)?;
        self.0.exchange.disconnect(&node_id, CloseCode::Forgotten, "forgotten by the operator");
        tracing::info!(peer = %node_id, forgotten, "forget peer");
        Ok(Response::new(ForgetPeerResponse { forgotten }))
    }

    async fn connect_peer(
        &self,
        request: Request<ConnectPeerRequest>,
    ) -> Result<Response<ConnectPeerResponse>, Status> {
        let request = request.into_inner();
        if !request.node_id.is_empty() {
            if !request.address.is_empty() {
                return Err(Status::invalid_argument("give either address or node_id, not both"));
            }
            return self.connect_known(node_id_arg("node_id", &request.node_id)?).await;
        }
        let text = request.address;
        let address = resolve_address(&text).await?;
        let verified = self
            .0
            .exchange
            .connect(address, crate::store::AddressSource::Manual)
            .await
            .map_err(|e| exchange_status(&format!("connecting to {address}"), e))?;
        let detail = self.0.store.get_peer(verified.node_id).await.map_err(store_status)?;
        let mut peer = detail.as_ref().map(convert::peer_detail).unwrap_or_default();
        peer.connection = Some(convert::connection(self.0.exchange.session_info(&verified.node_id).as_ref()));
        Ok(Response::new(ConnectPeerResponse {
            peer: Some(peer),
            rtt: Some(convert::duration(verified.elapsed)),
        }))
    }

    async fn query_peer_metadata(
        &self,
        request: Request<QueryPeerMetadataRequest>,
    ) -> Result<Response<QueryPeerMetadataResponse>, Status> {
        let node_id = node_id_arg("node_id", &request.get_ref().node_id)?;
        if node_id == self.0.node_id {
            return Err(Status::invalid_argument("node_id: that is this node itself; see GetNodeInfo"));
        }
        let (record, rtt) = match self.0.exchange.query_record(node_id).await {
            Ok(answer) => answer,
            Err(e) => return Err(self.reach_failed(node_id, &format!("querying {node_id}"), e).await),
        };
        Ok(Response::new(QueryPeerMetadataResponse {
            peer: Some(convert::peer_from_record(&record)),
            rtt: Some(convert::duration(rtt)),
            record: prost::Message::encode_to_vec(&record.signed),
        }))
    }
}

impl Peers {
    /// `ConnectPeer` by node id: stored addresses, then hole punching.
    async fn connect_known(&self, node_id: NodeId) -> Result<Response<ConnectPeerResponse>, Status> {
        if node_id == self.0.node_id {
            return Err(Status::invalid_argument("node_id: that is this node itself"));
        }
        let started = std::time::Instant::now();
        if let Err(e) = self.0.exchange.connect_known(node_id).await {
            return Err(self.reach_failed(node_id, &format!("connecting to {node_id}"), e).await);
        }
        let detail = self.0.store.get_peer(node_id).await.map_err(store_status)?;
        let mut peer = detail.as_ref().map(convert::peer_detail).unwrap_or_default();
        peer.connection = Some(convert::connection(self.0.exchange.session_info(&node_id).as_ref()));
        Ok(Response::new(ConnectPeerResponse {
            peer: Some(peer),
            rtt: Some(convert::duration(started.elapsed())),
        }))
    }

    /// The status for failing to reach `node_id` by its id. A peer that is not connected and not in the store
    /// is one this node does not know: NOT_FOUND in one line, like `GetPeer`, rather than the chain of punch
    /// and relay errors from the last resorts the exchange tried (a connected peer may know it, so they are
    /// tried first; their failure says nothing the caller can act on). The exchange's error alone cannot tell
    /// this apart: an unknown peer and a known one behind a NAT fail the same punch.
    async fn reach_failed(&self, node_id: NodeId, action: &str, error: ExchangeError) -> Status {
        let ours = matches!(error, ExchangeError::Stopping | ExchangeError::Store(_));
        if !ours
            && self.0.exchange.session_info(&node_id).is_none()
            && matches!(self.0.store.get_peer(node_id).await, Ok(None))
        {
            tracing::debug!(peer = %node_id, error = %error, "unknown peer could not be reached");
            return Status::not_found(format!(
                "no peer {node_id} is known: it is not connected, not in the store, and no connected peer \
                 could reach it"
            ));
        }
        exchange_status(action, error)
    }
}

/// Parses `host:port`, resolving a host name; the field is named in the error.
async fn resolve_address(text: &str) -> Result<std::net::SocketAddr, Status> {
    let invalid = |why: String| {
        Status::invalid_argument(format!("address: {why}; expected HOST:PORT such as 203.0.113.7:30906"))
    };
    if text.len() > MAX_ADDRESS_LEN {
        return Err(invalid(format!(
            "{} is too long for HOST:PORT (at most {MAX_ADDRESS_LEN} bytes)",
            quoted(text)
        )));
    }
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    if text.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
        return Err(invalid(format!("{} is not HOST:PORT", quoted(text))));
    }
    match tokio::net::lookup_host(text).await {
        Ok(mut addresses) => {
            addresses.next().ok_or_else(|| invalid(format!("{} resolved to no address", quoted(text))))
        }
        Err(e) => Err(invalid(format!("cannot resolve {} ({e})", quoted(text)))),
    }
}

/// The gRPC status for a failed dial or query, saying what was attempted: the one mapping from the exchange's
/// errors to status codes (and through them to `rnctl`'s exit codes).
fn exchange_status(action: &str, error: ExchangeError) -> Status {
    let message = format!("{action}: {error}");
    match error {
        ExchangeError::SelfConnection => Status::invalid_argument(format!("address: {error}")),
        // The peer is not who it claims to be, or replays an old record: retrying will not help.
        ExchangeError::Record(_) | ExchangeError::Replay { .. } => Status::permission_denied(message),
        // A handshake that timed out is a timeout like any other, whichever layer noticed it.
        ExchangeError::TimedOut(_) | ExchangeError::Quic(QuicError::TimedOut) => {
            Status::deadline_exceeded(message)
        }
        ExchangeError::Unreachable(_) => Status::not_found(message),
        // This node's own limits: try again later.
        ExchangeError::Busy => Status::resource_exhausted(message),
        ExchangeError::Store(e) => store_status(e),
        // The peer refused, broke the protocol or could not be reached (its NAT, its relays): the peer's
        // side, maybe transient.
        ExchangeError::Quic(_)
        | ExchangeError::Frame(_)
        | ExchangeError::Stream(_)
        | ExchangeError::Protocol(_)
        | ExchangeError::Remote(_)
        | ExchangeError::SessionClosed
        | ExchangeError::NotReached { .. }
        | ExchangeError::Punch(_)
        | ExchangeError::Relay(_)
        | ExchangeError::DialBack
        | ExchangeError::Stopping => Status::unavailable(message),
    }
}

/// One `WatchPeers` stream: sends the snapshot, then store events, until the client goes away or the node stops.
struct Watcher {
    ctx: Context,
    topic: Option<String>,
    tx: mpsc::Sender<Result<PeerEvent, Status>>,
    /// With a topic filter: the peers this client currently sees, so that it is told when one leaves its view
    /// (removed from the store, or no longer in the topic) and never about peers it was not shown.
    visible: HashSet<NodeId>,
}

impl Watcher {
    async fn run(
        mut self,
        include_snapshot: bool,
        mut live: tokio::sync::broadcast::Receiver<store::PeerEvent>,
    ) {
        if include_snapshot && self.send_snapshot().await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = self.tx.closed() => return,
                event = live.recv() => event,
            };
            let sent = match event {
                Ok(event) => self.send_live(event).await,
                Err(RecvError::Lagged(missed)) => {
                    let status = Status::aborted(format!(
                        "this watcher fell {missed} events behind and was stopped; watch again with \
                         include_snapshot to resynchronise"
                    ));
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
                Err(RecvError::Closed) => return,
            };
            if sent.is_err() {
                return;
            }
        }
    }

    async fn send_snapshot(&mut self) -> Result<(), ()> {
        let mut query = PeerQuery {
            topic: self.topic.clone(),
            limit: MAX_PAGE_SIZE,
            order: store::PeerOrder::LastSeen,
            ..Default::default()
        };
        loop {
            let page = match self.ctx.store.list_peers(query.clone()).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = self.tx.send(Err(store_status(e))).await;
                    return Err(());
                }
            };
            for peer in &page.peers {
                self.note_visible(peer);
                self.send(PeerEventKind::Snapshot, Some(convert::peer_summary(peer))).await?;
            }
            match page.next {
                Some(cursor) => query.after = Some(cursor),
                None => break,
            }
        }
        self.send(PeerEventKind::SnapshotDone, None).await
    }

    async fn send_live(&mut self, event: store::PeerEvent) -> Result<(), ()> {
        match event {
            store::PeerEvent::Added(peer) | store::PeerEvent::Updated(peer) if !self.in_topic(&peer) => {
                if self.visible.remove(&peer.node_id) {
                    return self.send_removed(peer.node_id).await;
                }
                Ok(())
            }
            store::PeerEvent::Added(peer) => {
                self.note_visible(&peer);
                self.send(PeerEventKind::Added, Some(convert::peer_summary(&peer))).await
            }
            store::PeerEvent::Updated(peer) => {
                // A peer entering a filtered view is new to this client.
                let kind = if self.topic.is_some() && !self.visible.contains(&peer.node_id) {
                    PeerEventKind::Added
                } else {
                    PeerEventKind::Updated
                };
                self.note_visible(&peer);
                self.send(kind, Some(convert::peer_summary(&peer))).await
            }
            store::PeerEvent::Removed(node_id) => {
                if self.topic.is_some() && !self.visible.remove(&node_id) {
                    return Ok(());
                }
                self.send_removed(node_id).await
            }
        }
    }

    fn in_topic(&self, peer: &store::PeerSummary) -> bool {
        self.topic.as_ref().is_none_or(|topic| peer.topics.iter().any(|t| t == topic))
    }

    fn note_visible(&mut self, peer: &store::PeerSummary) {
        if self.topic.is_some() {
            self.visible.insert(peer.node_id);
        }
    }

    async fn send_removed(&self, node_id: NodeId) -> Result<(), ()> {
        let peer = crate::api::control::Peer { node_id: node_id.to_string(), ..Default::default() };
        self.send(PeerEventKind::Removed, Some(peer)).await
    }

    async fn send(&self, kind: PeerEventKind, peer: Option<crate::api::control::Peer>) -> Result<(), ()> {
        let event = PeerEvent { kind: kind as i32, peer, at: Some(convert::timestamp(convert::now_ms())) };
        self.tx.send(Ok(event)).await.map_err(|_| ())
    }
}

/// Page tokens: the sort key of the last row served plus a fingerprint of the filters, so that a token used
/// with other filters or another order is refused instead of silently skipping rows. Opaque to clients.
mod page_token {
    use tonic::Status;

    use crate::api::names::NodeId;
    use crate::store::{PeerCursor, PeerQuery};

    pub fn encode(cursor: &PeerCursor, query: &PeerQuery) -> String {
        let fp = fingerprint(query);
        match cursor {
            PeerCursor::LastSeen { last_seen_ms, node_id } => format!("1.l.{last_seen_ms}.{node_id}.{fp}"),
            // Kind "r" (score, then the store's id) replaced "s" (score, then node id) with the store's schema
            // v3; an "s" token is refused like any unknown one.
            PeerCursor::Score { score, stored } => format!("1.r.{:016x}.{stored}.{fp}", score.to_bits()),
        }
    }

    pub fn decode(token: &str, query: &PeerQuery) -> Result<PeerCursor, Status> {
        let bad = || {
            Status::invalid_argument(
                "page_token: not a token this server issued; pass next_page_token from the previous response \
                 unchanged",
            )
        };
        let parts: Vec<&str> = token.split('.').collect();
        let [version, kind, key, tiebreak, fp] = parts[..] else { return Err(bad()) };
        if version != "1" {
            return Err(bad());
        }
        if fp != fingerprint(query) {
            return Err(Status::invalid_argument(
                "page_token: was issued for other filters or another order; repeat the same topic, node_type, \
                 seen_since and order as the first request",
            ));
        }
        match kind {
            "l" => Ok(PeerCursor::LastSeen {
                last_seen_ms: key.parse().map_err(|_| bad())?,
                node_id: NodeId::parse(tiebreak).map_err(|_| bad())?,
            }),
            "r" => {
                let bits = u64::from_str_radix(key, 16).map_err(|_| bad())?;
                let stored = tiebreak.parse().map_err(|_| bad())?;
                Ok(PeerCursor::Score { score: f64::from_bits(bits), stored })
            }
            _ => Err(bad()),
        }
    }

    /// First 8 bytes of SHA1 over the filters and order, in hex.
    fn fingerprint(query: &PeerQuery) -> String {
        let text =
            format!("{:?}|{:?}|{:?}|{:?}", query.topic, query.node_type, query.seen_since_ms, query.order);
        let digest = sha1_smol::Sha1::from(text.as_bytes()).digest().bytes();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::store::PeerOrder;

        #[test]
        fn tokens_round_trip_and_are_bound_to_their_query() {
            let query = PeerQuery { topic: Some("t".into()), limit: 10, ..Default::default() };
            let cursor = PeerCursor::LastSeen { last_seen_ms: 1_700_000_000_000, node_id: NodeId([7; 32]) };
            let token = encode(&cursor, &query);
            assert_eq!(decode(&token, &query).expect("decode"), cursor);
            let other = PeerQuery { topic: Some("u".into()), ..query.clone() };
            assert!(decode(&token, &other).is_err());

            let scored = PeerQuery { order: PeerOrder::Score, ..query };
            let cursor = PeerCursor::Score { score: 0.123_456_789, stored: 4321 };
            assert_eq!(decode(&encode(&cursor, &scored), &scored).expect("decode"), cursor);
            // A score token of the builds that broke ties by node id.
            let old = format!("1.s.{:016x}.{}.{}", 0.5f64.to_bits(), NodeId([9; 32]), fingerprint(&scored));
            assert!(decode(&old, &scored).is_err());
            assert!(decode("garbage", &scored).is_err());
            assert!(decode("1.x.1.00.00", &scored).is_err());
        }
    }
}
