//! Tests of the DHT adapter on real DHT networks built on 127.0.0.1: plain mainline nodes, our adapters, and
//! (in [`libtorrent_interop`]) a libtorrent node. Nothing here sends a packet beyond the loopback address:
//! every node gets an explicit bootstrap list (mainline's default is the public routers).
//!
//! Waits are bounded by generous timeouts only to turn a hang into a failure; assertions are about what was
//! discovered and counted, never about how long it took.

mod libtorrent_interop;
mod local_network;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Dht, DhtMode, DhtOptions, Discovery};

/// Upper bound for any single wait in these tests.
const PATIENCE: Duration = Duration::from_secs(60);

/// A small DHT of plain mainline nodes on 127.0.0.1: one bootstrap node that knows nobody, and nodes that
/// bootstrapped from it. Dropping it shuts every node down.
struct LocalNetwork {
    bootstrap_node: mainline::Dht,
    /// Only held: a mainline node runs as long as a handle to it exists.
    _plain_nodes: Vec<mainline::Dht>,
}

impl LocalNetwork {
    async fn start(plain_nodes: usize) -> LocalNetwork {
        let bootstrap_node = loopback_node(&[]);
        let bootstrap = [local_addr_of(&bootstrap_node).await];
        let nodes: Vec<mainline::Dht> = (0..plain_nodes).map(|_| loopback_node(&bootstrap)).collect();
        // Each node's first walk fills its routing table and the bootstrap node's; waiting for all of them
        // gives the adapters a network that already knows itself.
        for node in &nodes {
            assert!(node.clone().as_async().bootstrapped().await, "a plain DHT node failed to bootstrap");
        }
        LocalNetwork { bootstrap_node, _plain_nodes: nodes }
    }

    async fn bootstrap(&self) -> Vec<String> {
        vec![local_addr_of(&self.bootstrap_node).await.to_string()]
    }
}

/// A server-mode mainline node on 127.0.0.1 with an OS-chosen port (mainline would try 6881 first).
fn loopback_node(bootstrap: &[SocketAddr]) -> mainline::Dht {
    mainline::Dht::builder()
        .server_mode()
        .bind_address(Ipv4Addr::LOCALHOST)
        .port(0)
        .bootstrap(bootstrap)
        .build()
        .expect("start a loopback DHT node")
}

async fn local_addr_of(node: &mainline::Dht) -> SocketAddr {
    SocketAddr::V4(node.clone().as_async().info().await.local_addr())
}

/// One of our adapters under test, with the receiving end of its discoveries.
struct Adapter {
    dht: Dht,
    discoveries: mpsc::Receiver<Discovery>,
    shutdown: CancellationToken,
    /// Everything received so far, for assertions and failure messages.
    received: Vec<Discovery>,
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options for a test adapter: server mode on 127.0.0.1, quick lookups, the given bootstrap list only.
fn adapter_options(bootstrap: Vec<String>, announce_port: u16) -> DhtOptions {
    DhtOptions {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        bootstrap,
        mode: DhtMode::Server,
        announce_interval: Duration::from_secs(30),
        lookup_interval: Duration::from_secs(2),
        announce_port: Some(announce_port),
    }
}

impl Adapter {
    fn start(options: DhtOptions) -> Adapter {
        let (sender, discoveries) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let dht = Dht::start(options, sender, shutdown.clone()).expect("start the DHT adapter");
        Adapter { dht, discoveries, shutdown, received: Vec::new() }
    }

    /// Ports discovered so far under `topic`.
    fn ports_found(&self, topic: &str) -> BTreeSet<u16> {
        self.received
            .iter()
            .filter(|discovery| discovery.topic == topic)
            .flat_map(|discovery| discovery.peers.iter().map(SocketAddr::port))
            .collect()
    }

    /// Receives discoveries until `topic` has shown every port of `ports`; fails after [`PATIENCE`].
    async fn wait_for_ports(&mut self, topic: &str, ports: &[u16]) {
        let wanted: BTreeSet<u16> = ports.iter().copied().collect();
        let waiting = async {
            while !self.ports_found(topic).is_superset(&wanted) {
                match self.discoveries.recv().await {
                    Some(discovery) => self.received.push(discovery),
                    None => panic!("the adapter's discovery channel closed"),
                }
            }
        };
        if tokio::time::timeout(PATIENCE, waiting).await.is_err() {
            panic!(
                "adapter {} did not discover ports {wanted:?} under {topic:?}; received {:?}, counters {:?}",
                self.dht.local_addr(),
                self.received,
                self.dht.counters()
            );
        }
    }
}

/// Polls `condition` until it holds; fails with `what` after [`PATIENCE`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let polling = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(PATIENCE, polling).await.is_err() {
        panic!("timed out waiting for: {what}");
    }
}
