//! Dial-backs: a peer opens a new QUIC connection to us from a fresh 4-tuple, so we learn how our NAT filters
//! unsolicited packets and whether we are reachable at all.
//!
//! Serving one: the helper dials only the address it observes for the requester on the existing session (never
//! an address named in the request, so dial-backs cannot be aimed at third parties), from a new socket on the
//! same IP (another port) or on another of its IPs. At most [`MAX_CONCURRENT`] run at once.
//!
//! Receiving one: the requester registers the helper's node id before asking; when an inbound handshake from
//! that node completes on another 4-tuple than its session, the dial-back has arrived. The connection is then
//! closed: it has served its purpose, and it must not replace the session.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

use super::Inner;
use super::router::Protocol;
use crate::api::names::NodeId;
use crate::quic::{QuicEndpoint, QuicLimits};
use crate::wire::pb;

/// Dial-backs served at once; more are declined (the requester tries another helper).
const MAX_CONCURRENT: usize = 2;
/// How long a served dial-back may take to complete its handshake.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Dial-backs we asked for and are waiting to receive, by helper.
#[derive(Default)]
pub struct Expected {
    waiting: Mutex<HashMap<NodeId, oneshot::Sender<SocketAddr>>>,
}

impl Expected {
    /// Registers a wait for `helper`; `None` if one is already pending for it.
    pub fn expect(&self, helper: NodeId) -> Option<oneshot::Receiver<SocketAddr>> {
        let mut waiting = self.lock();
        if waiting.get(&helper).is_some_and(|pending| !pending.is_closed()) {
            return None;
        }
        let (arrived, wait) = oneshot::channel();
        waiting.insert(helper, arrived);
        Some(wait)
    }

    /// Reports an authenticated inbound connection; true if it was an expected dial-back (now consumed).
    pub fn arrived(&self, helper: NodeId, from: SocketAddr) -> bool {
        match self.lock().remove(&helper) {
            Some(waiter) => waiter.send(from).is_ok(),
            None => false,
        }
    }

    pub fn forget(&self, helper: &NodeId) {
        self.lock().remove(helper);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, oneshot::Sender<SocketAddr>>> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The helper side.
pub struct Server {
    slots: Semaphore,
}

impl Default for Server {
    fn default() -> Self {
        Self { slots: Semaphore::new(MAX_CONCURRENT) }
    }
}

impl Server {
    /// Dials `target` (the requester as observed on its session) from a fresh socket and reports the attempt.
    /// `session_local` is our address on that session, to choose "the same IP" or "another IP".
    pub async fn serve(
        &self,
        tasks: &tokio_util::task::TaskTracker,
        key: &ed25519_dalek::SigningKey,
        requester: NodeId,
        target: SocketAddr,
        session_local: Option<IpAddr>,
        kind: pb::DialBackKind,
    ) -> pb::DialBackResponse {
        let declined = |detail: &str| pb::DialBackResponse {
            attempted: false,
            detail: detail.to_owned(),
            ..Default::default()
        };
        let Ok(_slot) = self.slots.try_acquire() else {
            return pb::DialBackResponse { busy: true, ..declined("busy: too many dial-backs in progress") };
        };
        let bind_ip = match kind {
            pb::DialBackKind::OtherPort => match session_local {
                Some(ip) => ip,
                None => unspecified_like(target),
            },
            pb::DialBackKind::OtherIp => match other_local_ip(session_local, target) {
                Some(ip) => ip,
                None => return declined("this node has no second address of that family"),
            },
            pb::DialBackKind::Unspecified => return declined("unknown dial-back kind"),
        };
        let limits =
            QuicLimits { max_connections: 1, handshake_timeout: DIAL_TIMEOUT, ..QuicLimits::default() };
        let endpoint = match QuicEndpoint::bind(SocketAddr::new(bind_ip, 0), key, limits) {
            Ok(endpoint) => endpoint,
            Err(e) => return declined(&format!("cannot open a socket on {bind_ip}: {e}")),
        };
        let from = endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::debug!(%requester, %target, %from, ?kind, "dial-back: dialing");
        let detail = match tokio::time::timeout(DIAL_TIMEOUT, endpoint.connect(target, Some(requester))).await
        {
            Ok(Ok(outbound)) => {
                // The requester closes it once it has seen the handshake; don't hold it open meanwhile.
                let _ = tokio::time::timeout(Duration::from_secs(1), outbound.connection.closed()).await;
                "handshake completed".to_owned()
            }
            Ok(Err(e)) => format!("no handshake: {e}"),
            Err(_) => "no handshake within the deadline".to_owned(),
        };
        tracing::debug!(%requester, %target, %from, %detail, "dial-back: done");
        // Answer now; telling a silent requester that the endpoint closes can take a while and changes nothing.
        tasks.spawn(async move { endpoint.close().await });
        pb::DialBackResponse { attempted: true, from_address: from, detail, busy: false }
    }
}

/// Serves `DialBackRequest`s: dials the requester back at the address its session comes from.
#[derive(Default)]
pub(super) struct DialBacks {
    server: Server,
}

impl Protocol for DialBacks {
    type Request = pb::DialBackRequest;

    super::router::accepts_variant!(DialBackRequest);

    async fn answer(&self, node: &Arc<Inner>, peer: NodeId, request: Self::Request) -> pb::envelope::Kind {
        let declined = |detail: &str| {
            pb::envelope::Kind::DialBackResponse(pb::DialBackResponse {
                attempted: false,
                detail: detail.to_owned(),
                ..Default::default()
            })
        };
        let Some(session) = node.sessions.get(&peer) else {
            return declined("no session with the requester");
        };
        if session.path().is_relayed() {
            return declined("we are connected through a relay: a dial-back would measure nothing");
        }
        let target = session.connection().remote_address();
        let local = session.connection().local_ip();
        let key = node.publisher.signing_key().clone();
        let response = self.server.serve(&node.tasks, &key, peer, target, local, request.kind()).await;
        pb::envelope::Kind::DialBackResponse(response)
    }
}

fn unspecified_like(target: SocketAddr) -> IpAddr {
    if target.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) }
}

/// Another address of ours, of the target's family, that is not the one the session uses. Loopback counts only
/// for loopback targets (a local test setup); link-local never.
fn other_local_ip(session_local: Option<IpAddr>, target: SocketAddr) -> Option<IpAddr> {
    let interfaces = if_addrs::get_if_addrs().ok()?;
    let candidates = interfaces.iter().map(|i| i.ip()).filter(|ip| {
        ip.is_ipv4() == target.is_ipv4()
            && Some(*ip) != session_local
            && ip.is_loopback() == target.ip().is_loopback()
            && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
    });
    let mut candidates: Vec<IpAddr> = candidates.collect();
    candidates.sort();
    candidates.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expected_dial_back_is_consumed_once() {
        let expected = Expected::default();
        let helper = NodeId([1; 32]);
        let mut wait = expected.expect(helper).expect("first wait");
        assert!(expected.expect(helper).is_none(), "one pending wait per helper");
        let from: SocketAddr = "203.0.113.9:4000".parse().expect("addr");
        assert!(!expected.arrived(NodeId([2; 32]), from), "another node's connection is not it");
        assert!(expected.arrived(helper, from));
        assert_eq!(wait.try_recv().expect("arrived"), from);
        assert!(!expected.arrived(helper, from), "consumed");
    }
}
