//! The table of live, authenticated sessions: at most one per peer.
//!
//! When two nodes dial each other at the same moment each ends up with two connections. Both must keep the same
//! one without talking about it, so the rule depends only on facts both sides know: keep the connection dialed
//! by the node with the smaller node id; but a direct connection always wins over one through a relay. A session
//! whose connection already closed is always replaced.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::api::names::NodeId;

/// Which side dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// What the table needs to know about a session to arbitrate.
pub trait Arbitrable {
    fn direction(&self) -> Direction;
    /// A session whose connection is gone never wins.
    fn is_closed(&self) -> bool;
    /// Unique per session, to remove exactly the session that ended.
    fn session_id(&self) -> u64;
    /// Whether the connection runs through a relay (any direct one is better).
    fn is_relayed(&self) -> bool {
        false
    }
}

/// The outcome of offering a new session to the table.
#[derive(Debug)]
pub enum Admission<S> {
    /// The new session is in; the previous one (if any) must be closed by the caller.
    Admitted { replaced: Option<S> },
    /// The existing session wins; the caller closes the new one.
    Rejected,
}

/// Live sessions by peer.
pub struct SessionTable<S> {
    local: NodeId,
    sessions: Mutex<HashMap<NodeId, S>>,
    /// Woken on every admission, for those waiting for a session to appear (a punch waits for either side's
    /// dial to win).
    admitted: tokio::sync::Notify,
}

impl<S: Arbitrable + Clone> SessionTable<S> {
    pub fn new(local: NodeId) -> Self {
        Self { local, sessions: Mutex::new(HashMap::new()), admitted: tokio::sync::Notify::new() }
    }

    /// Resolves at the next admission after it was enabled (`Notified::enable`) or first polled: enable it,
    /// then look in the table, then await it, and no admission in between is missed.
    pub fn next_admission(&self) -> tokio::sync::futures::Notified<'_> {
        self.admitted.notified()
    }

    /// Offers a new authenticated session with `peer`.
    pub fn admit(&self, peer: NodeId, session: S) -> Admission<S> {
        let admission = {
            let mut sessions = self.lock();
            match sessions.get(&peer) {
                Some(existing) if !existing.is_closed() && !self.new_one_wins(peer, existing, &session) => {
                    Admission::Rejected
                }
                _ => Admission::Admitted { replaced: sessions.insert(peer, session) },
            }
        };
        if matches!(admission, Admission::Admitted { .. }) {
            self.admitted.notify_waiters();
        }
        admission
    }

    /// Whether `candidate` should replace the live `existing` session with `peer`.
    fn new_one_wins(&self, peer: NodeId, existing: &S, candidate: &S) -> bool {
        if existing.is_relayed() != candidate.is_relayed() {
            // A direct connection replaces a relayed one (the upgrade after a later punch), never the reverse;
            // both sides see the same two paths, so they agree.
            return existing.is_relayed();
        }
        if existing.direction() == candidate.direction() {
            // A redial in the same direction means the peer (or we) believe the old one is dead.
            return true;
        }
        // Two directions at once: keep the one dialed by the smaller node id.
        let dialer_of = |direction| if direction == Direction::Outbound { self.local } else { peer };
        dialer_of(candidate.direction()) < dialer_of(existing.direction())
    }

    /// Removes the session with `peer` if it is still `session_id` (a newer one may have replaced it).
    pub fn remove(&self, peer: &NodeId, session_id: u64) -> Option<S> {
        let mut sessions = self.lock();
        match sessions.get(peer) {
            Some(current) if current.session_id() == session_id => sessions.remove(peer),
            _ => None,
        }
    }

    pub fn get(&self, peer: &NodeId) -> Option<S> {
        self.lock().get(peer).filter(|s| !s.is_closed()).cloned()
    }

    pub fn all(&self) -> Vec<(NodeId, S)> {
        self.lock().iter().filter(|(_, s)| !s.is_closed()).map(|(id, s)| (*id, s.clone())).collect()
    }

    /// Whether any live session satisfies `predicate` (checked under the lock, nothing cloned).
    pub fn any(&self, predicate: impl Fn(&S) -> bool) -> bool {
        self.lock().values().any(|s| !s.is_closed() && predicate(s))
    }

    pub fn len(&self) -> usize {
        self.lock().values().filter(|s| !s.is_closed()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, S>> {
        // The map stays consistent even if a holder panicked: every operation is a single insert or remove.
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Fake {
        direction: Direction,
        closed: bool,
        id: u64,
        relayed: bool,
    }

    impl Arbitrable for Fake {
        fn direction(&self) -> Direction {
            self.direction
        }
        fn is_closed(&self) -> bool {
            self.closed
        }
        fn session_id(&self) -> u64 {
            self.id
        }
        fn is_relayed(&self) -> bool {
            self.relayed
        }
    }

    fn fake(direction: Direction, id: u64) -> Fake {
        Fake { direction, closed: false, id, relayed: false }
    }

    #[tokio::test]
    async fn waiters_wake_on_admission_not_on_rejection() {
        let table = SessionTable::new(NodeId([1; 32]));
        let peer = NodeId([2; 32]);
        let waiting = table.next_admission();
        tokio::pin!(waiting);
        waiting.as_mut().enable();
        table.admit(peer, fake(Direction::Outbound, 1));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the admission");
        // Their inbound loses against our outbound (we have the smaller id): rejected, nobody is woken.
        let rejected = table.next_admission();
        tokio::pin!(rejected);
        rejected.as_mut().enable();
        assert!(matches!(table.admit(peer, fake(Direction::Inbound, 2)), Admission::Rejected));
        let woken = tokio::time::timeout(std::time::Duration::from_millis(50), rejected).await;
        assert!(woken.is_err(), "a rejected session woke a waiter");
    }

    #[test]
    fn a_direct_connection_replaces_a_relayed_one_and_never_the_reverse() {
        let table = SessionTable::new(NodeId([1; 32]));
        let peer = NodeId([2; 32]);
        table.admit(peer, Fake { relayed: true, ..fake(Direction::Outbound, 1) });
        // Inbound from the larger id would lose against our outbound, but it is direct.
        assert!(matches!(
            table.admit(peer, fake(Direction::Inbound, 2)),
            Admission::Admitted { replaced: Some(_) }
        ));
        let relayed_again = Fake { relayed: true, ..fake(Direction::Outbound, 3) };
        assert!(matches!(table.admit(peer, relayed_again), Admission::Rejected));
        assert_eq!(table.get(&peer).map(|s| s.id), Some(2));
    }

    #[test]
    fn simultaneous_dials_keep_the_same_connection_on_both_sides() {
        let small = NodeId([1; 32]);
        let large = NodeId([2; 32]);
        // Connection X is dialed by `small`, connection Y by `large`; each side sees both, in either order.
        for small_sees_x_first in [true, false] {
            for large_sees_x_first in [true, false] {
                let on_small = SessionTable::new(small);
                let x = fake(Direction::Outbound, 1);
                let y = fake(Direction::Inbound, 2);
                let (a, b) = if small_sees_x_first { (x, y) } else { (y, x) };
                on_small.admit(large, a);
                on_small.admit(large, b);

                let on_large = SessionTable::new(large);
                let x = fake(Direction::Inbound, 1);
                let y = fake(Direction::Outbound, 2);
                let (a, b) = if large_sees_x_first { (x, y) } else { (y, x) };
                on_large.admit(small, a);
                on_large.admit(small, b);

                assert_eq!(on_small.get(&large).map(|s| s.id), Some(1));
                assert_eq!(
                    on_large.get(&small).map(|s| s.id),
                    Some(1),
                    "both keep X, dialed by the smaller id"
                );
            }
        }
    }

    #[test]
    fn a_closed_session_is_replaced_and_removal_is_exact() {
        let table = SessionTable::new(NodeId([1; 32]));
        let peer = NodeId([2; 32]);
        assert!(matches!(
            table.admit(peer, fake(Direction::Inbound, 1)),
            Admission::Admitted { replaced: None }
        ));
        // Inbound from the larger id loses against our outbound, unless ours is closed.
        let mut dead = fake(Direction::Inbound, 1);
        dead.closed = true;
        table.admit(peer, dead);
        assert!(table.get(&peer).is_none(), "closed sessions are not handed out");
        assert!(matches!(table.admit(peer, fake(Direction::Inbound, 3)), Admission::Admitted { .. }));
        assert!(table.remove(&peer, 1).is_none(), "an old session's end does not remove its successor");
        assert_eq!(table.remove(&peer, 3).map(|s| s.id), Some(3));
        assert!(table.is_empty());
    }

    #[test]
    fn the_larger_ids_inbound_loses_against_our_live_outbound() {
        let table = SessionTable::new(NodeId([1; 32]));
        let peer = NodeId([2; 32]);
        table.admit(peer, fake(Direction::Outbound, 1));
        assert!(matches!(table.admit(peer, fake(Direction::Inbound, 2)), Admission::Rejected));
        assert_eq!(table.len(), 1);
    }
}
