//! Protocols over a session, and the router that hands each request to the one that answers it.
//!
//! A [`Protocol`] is one kind of request (or a few that belong together): it says which envelope kinds it
//! takes, and answers them. Each lives in a file of its own with its request, its response and its handler;
//! [`Router::standard`] is the one list of them, so a new protocol is a new file and a line there. The node's
//! shared parts (sessions, store, record) reach a handler as the [`Inner`] it is given, never as a field a
//! protocol has to add.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Inner;
use crate::api::names::NodeId;
use crate::wire::pb::envelope::Kind;

/// The `accepts` of a protocol whose request is one envelope variant, `Kind::$variant(request)`.
macro_rules! accepts_variant {
    ($variant:ident) => {
        fn accepts(
            kind: $crate::wire::pb::envelope::Kind,
        ) -> Result<Self::Request, $crate::wire::pb::envelope::Kind> {
            match kind {
                $crate::wire::pb::envelope::Kind::$variant(request) => Ok(request),
                other => Err(other),
            }
        }
    };
}
pub(super) use accepts_variant;

/// One kind of request a session answers.
pub(super) trait Protocol: Send + Sync + Sized + 'static {
    /// What a handler gets out of the envelope.
    type Request: Send + 'static;

    /// Takes the request this protocol answers out of `kind`, or gives `kind` back.
    fn accepts(kind: Kind) -> Result<Self::Request, Kind>;

    /// The answer to `request` from `peer` (an authenticated node with a live session).
    fn answer(
        &self,
        node: &Arc<Inner>,
        peer: NodeId,
        request: Self::Request,
    ) -> impl Future<Output = Kind> + Send;
}

type Answer = Pin<Box<dyn Future<Output = Kind> + Send>>;

/// A protocol with its type erased, as the router holds it.
trait Route: Send + Sync {
    fn route(&self, node: Arc<Inner>, peer: NodeId, kind: Kind) -> Result<Answer, Kind>;
}

impl<P: Protocol> Route for Arc<P> {
    fn route(&self, node: Arc<Inner>, peer: NodeId, kind: Kind) -> Result<Answer, Kind> {
        let request = P::accepts(kind)?;
        let protocol = self.clone();
        Ok(Box::pin(async move { protocol.answer(&node, peer, request).await }))
    }
}

/// The protocols a node answers, tried in order.
pub(super) struct Router {
    routes: Vec<Box<dyn Route>>,
}

impl Router {
    fn new() -> Self {
        Self { routes: Vec::new() }
    }

    fn with<P: Protocol>(mut self, protocol: P) -> Self {
        self.routes.push(Box::new(Arc::new(protocol)));
        self
    }

    /// Every protocol of this version of the node.
    pub fn standard() -> Self {
        Self::new()
            .with(super::record_sync::GetRecord)
            .with(super::record_sync::AcceptUpdate)
            .with(super::ping::Ping)
            .with(super::peer_exchange::PeerExchange)
            .with(super::dial_back::DialBacks::default())
            .with(super::punch::ForwardPunch)
            .with(super::punch::AcceptIntroduction)
            .with(super::relay::Reservations)
            .with(super::relay::Circuits)
    }

    /// The answer of the protocol that takes `kind`; `None` when none does.
    pub async fn answer(&self, node: Arc<Inner>, peer: NodeId, mut kind: Kind) -> Option<Kind> {
        for route in &self.routes {
            match route.route(node.clone(), peer, kind) {
                Ok(answer) => return Some(answer.await),
                Err(unanswered) => kind = unanswered,
            }
        }
        None
    }
}
