//! Ping: a liveness and round-trip check on a session; the answer carries the request's nonce back.

use std::sync::Arc;

use super::Inner;
use super::router::Protocol;
use crate::api::names::NodeId;
use crate::wire::pb;

/// Answers `Ping` with `Pong`.
pub(super) struct Ping;

impl Protocol for Ping {
    type Request = pb::Ping;

    super::router::accepts_variant!(Ping);

    async fn answer(&self, _node: &Arc<Inner>, _peer: NodeId, ping: Self::Request) -> pb::envelope::Kind {
        pb::envelope::Kind::Pong(pb::Pong { nonce: ping.nonce })
    }
}
