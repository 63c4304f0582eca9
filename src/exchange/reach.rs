//! Reaching peers behind NATs that peer exchange told us about: a plain dial would be dropped by their NAT's
//! filter, so a punch is tried (a relay circuit beside it, see the connector), and tried again while the pair is
//! apart or only relayed.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::api::names::NodeId;
use crate::wire::{VerifiedRecord, pb};

/// How long a plain dial of a peer of undecided NAT gets before a punch is tried: a reachable peer answers in
/// one round trip, and a dial into a NAT's filter only ends at the dial timeout.
const UNDECIDED_PEER_GRACE: Duration = Duration::from_secs(3);
/// Waits between further attempts to reach a peer behind a NAT after a failed punch and relay.
const REACH_RETRY_DELAYS: [Duration; 4] =
    [Duration::from_secs(5), Duration::from_secs(10), Duration::from_secs(20), Duration::from_secs(40)];

impl Inner {
    /// For a peer learnt by peer exchange whose record says it is behind a NAT, whose filter would drop a plain
    /// dial: starts a punch (a relay if that fails), at most once per interval. Returns whether the record is
    /// such a peer's.
    pub(super) fn reach_if_private(self: &Arc<Self>, record: &VerifiedRecord) -> bool {
        let private = record.body.node_type == pb::NodeType::Private as i32
            || record.body.nat.is_some_and(|n| {
                n.reachability == pb::Reachability::PrivatePunchable as i32
                    || n.reachability == pb::Reachability::PrivateHard as i32
            });
        if !private {
            return false;
        }
        if !self.punch.auto_punch_due(record.node_id) {
            return true;
        }
        let inner = Arc::downgrade(self);
        let peer = record.node_id;
        self.tasks.spawn(reach_behind_nat(inner, peer, Duration::ZERO, self.shutdown.clone()));
        true
    }

    /// For a peer learnt by peer exchange whose record does not say where it stands (its NAT verdict is still
    /// open: too few witnesses, as in a network with one public node): the plain dial goes first, and if no
    /// session exists after [`UNDECIDED_PEER_GRACE`], a punch (a relay if that fails). An open verdict never
    /// blocks a punch; a reachable peer is connected long before the grace ends and costs nothing more.
    pub(super) fn punch_if_dial_fails(self: &Arc<Self>, record: &VerifiedRecord) {
        if record.body.node_type != pb::NodeType::Unknown as i32 {
            return;
        }
        if !self.punch.auto_punch_due(record.node_id) {
            return;
        }
        let inner = Arc::downgrade(self);
        self.tasks.spawn(reach_behind_nat(
            inner,
            record.node_id,
            UNDECIDED_PEER_GRACE,
            self.shutdown.clone(),
        ));
    }
}

/// Waits `grace`, then punches to `peer` (a relay if the punch is not done soon) unless a direct session exists
/// by then, and again after [`REACH_RETRY_DELAYS`] while there is none: a first try often comes before the other
/// side has a rendezvous or a relay reservation, or before either side's NAT verdict is decided (a punch then
/// only dials, where the birthday strategy might have worked), and waiting for the next peer exchange or for
/// the auto-punch interval would leave the pair apart, or relayed, for minutes. Over a relayed session only the
/// punch is tried again: a success replaces the relay.
async fn reach_behind_nat(
    inner: std::sync::Weak<Inner>,
    peer: NodeId,
    grace: Duration,
    shutdown: CancellationToken,
) {
    for wait in std::iter::once(grace).chain(REACH_RETRY_DELAYS) {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.direct_session(&peer).is_some() {
            return;
        }
        let attempt = match inner.sessions.get(&peer) {
            Some(_relayed) => inner.punch_to(peer).await,
            None => inner.punch_or_relay(peer).await,
        };
        match attempt {
            Ok(session) if !session.path().is_relayed() => {
                tracing::info!(%peer, path = ?session.path(), "connected to a peer behind a NAT");
                return;
            }
            Ok(_) => {
                tracing::info!(%peer, "reached a peer behind a NAT through a relay; a punch is tried again later")
            }
            Err(e) => tracing::info!(%peer, error = %e, "could not reach a peer behind a NAT yet"),
        }
    }
}
