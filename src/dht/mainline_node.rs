//! Builds the mainline node, and builds it again, on the same socket address, when its routing table stayed
//! empty while DHT nodes kept querying us.
//!
//! mainline adds a node to its routing table only when that node answers one of our queries, with one
//! exception: a node started without bootstrap nodes adds whoever sends it `find_node`. A node whose bootstrap
//! nodes never answer (a dead seed address, a typo) therefore keeps an empty table for good, even though the
//! nodes that bootstrapped from it query it all the time; and mainline has no call to add a node at run time.
//! What it does have is the request filter, which sees the source of every query. [`Requesters`] remembers the
//! most recent ones, and the actor rebuilds the node with them as bootstrap nodes once the table has been empty
//! for a while (`super::actor`). The rebuilt node has a new DHT id and an empty store of announces; it is only
//! ever done to a node that had no contacts, whose announces reached nobody anyway.

use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DhtError, DhtMode, bind_error};

/// Query sources remembered: enough to find a way back into a small network, few enough to try all at once.
const MAX_REQUESTERS: usize = 16;
/// How long a rebuild waits for the old node's thread to let go of the socket (the thread notices the dropped
/// handle within its 50 ms socket read timeout).
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The sources of the queries our node received most recently, newest last, with how many each sent. UDP
/// sources can be forged; a source counts only once it sent [`MIN_QUERIES`], and a rebuild at most every few
/// minutes (`super::actor`) bounds what forged sources could make us do.
#[derive(Debug, Clone, Default)]
pub(super) struct Requesters(Arc<Mutex<VecDeque<(SocketAddrV4, u32)>>>);

/// Queries a source must have sent to count as a DHT node.
const MIN_QUERIES: u32 = 2;

impl Requesters {
    fn note(&self, from: SocketAddrV4) {
        let mut seen = crate::sync::lock(&self.0);
        let count = match seen.iter().position(|(address, _)| *address == from) {
            Some(index) => seen.remove(index).map_or(0, |(_, count)| count),
            None => 0,
        };
        if seen.len() >= MAX_REQUESTERS {
            seen.pop_front();
        }
        seen.push_back((from, count.saturating_add(1)));
    }

    pub(super) fn recent(&self) -> Vec<SocketAddrV4> {
        crate::sync::lock(&self.0)
            .iter()
            .filter(|(_, count)| *count >= MIN_QUERIES)
            .map(|(address, _)| *address)
            .collect()
    }
}

/// The request filter: notes every query's source; answers it unless the node is a DHT client. mainline has no
/// "never serve" switch (its adaptive mode turns into a server after ~15 minutes if reachable), so a client
/// drops every incoming query instead.
#[derive(Debug, Clone)]
struct NoteRequesters {
    requesters: Requesters,
    answer: bool,
}

impl mainline::RequestFilter for NoteRequesters {
    fn allow_request(&self, request: &mainline::RequestSpecific, from: SocketAddrV4) -> bool {
        // Our own queries (from `own_node`'s sockets) and other nodes' mapping probes come from sockets that
        // are no DHT nodes.
        if !crate::wire::is_own_query_id(request.requester_id.as_bytes()) {
            self.requesters.note(from);
        }
        self.answer
    }
}

/// Everything needed to build the mainline node again.
#[derive(Debug, Clone)]
pub(super) struct NodeBuilder {
    pub(super) listen: SocketAddrV4,
    pub(super) mode: DhtMode,
    /// The configured bootstrap nodes, resolved.
    pub(super) bootstrap: Vec<SocketAddrV4>,
    pub(super) requesters: Requesters,
}

impl NodeBuilder {
    /// Builds a node on `self.listen` that bootstraps from the configured nodes and `extra`.
    pub(super) fn build(&self, extra: &[SocketAddrV4]) -> Result<mainline::Dht, DhtError> {
        let listen_error = |source| bind_error(SocketAddr::V4(self.listen), source);
        let mut bootstrap = self.bootstrap.clone();
        bootstrap.extend(extra.iter().filter(|address| **address != self.listen));
        bootstrap.dedup();
        let mut builder = mainline::Dht::builder();
        builder.bind_address(*self.listen.ip()).port(self.listen.port()).bootstrap(&bootstrap);
        if self.mode == DhtMode::Server {
            builder.server_mode();
        }
        builder.server_settings(mainline::ServerSettings {
            filter: Box::new(NoteRequesters {
                requesters: self.requesters.clone(),
                answer: self.mode != DhtMode::Client,
            }),
            ..Default::default()
        });
        // mainline reports a failed bind from its own thread, and when that thread fails before our first
        // message reaches it, `build` panics instead of returning the error: find bind problems here first.
        if self.listen.port() != 0 {
            UdpSocket::bind(self.listen).map_err(listen_error)?;
        }
        std::panic::catch_unwind(AssertUnwindSafe(|| builder.build()))
            .map_err(|_| DhtError::NodeStart(SocketAddr::V4(self.listen)))?
            .map_err(listen_error)
    }

    /// Waits until the socket address is free again (the old node's thread has exited), then builds.
    ///
    /// This is the one wait in the daemon that polls, deliberately: mainline's `Dht` owns its thread without a
    /// join handle and says nothing when it lets the socket go, and the port must stay the same (peers know it).
    /// A rebuild is rare (an empty routing table, at most once per back-off period) and the poll is bounded by
    /// [`RELEASE_WAIT`].
    pub(super) async fn rebuild(&self, extra: &[SocketAddrV4]) -> Result<mainline::Dht, DhtError> {
        let deadline = Instant::now() + RELEASE_WAIT;
        while UdpSocket::bind(self.listen).is_err() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.build(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requesters_are_bounded_deduplicated_and_newest_last() {
        let requesters = Requesters::default();
        for port in 1..=20u16 {
            requesters.note(SocketAddrV4::new([127, 0, 0, 1].into(), port));
            requesters.note(SocketAddrV4::new([127, 0, 0, 1].into(), port));
        }
        requesters.note(SocketAddrV4::new([127, 0, 0, 1].into(), 10));
        requesters.note(SocketAddrV4::new([127, 0, 0, 1].into(), 30));
        let recent = requesters.recent();
        assert_eq!(recent.len(), MAX_REQUESTERS - 1, "all but the source of a single query: {recent:?}");
        assert_eq!(recent.last().map(SocketAddrV4::port), Some(10), "newest last");
        assert_eq!(recent.iter().filter(|a| a.port() == 10).count(), 1);
        assert!(!recent.iter().any(|a| a.port() <= 5), "the oldest are forgotten: {recent:?}");
        assert!(!recent.iter().any(|a| a.port() == 30), "a single query does not count: {recent:?}");
    }
}
