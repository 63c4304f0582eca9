//! Networks form on their own, on loopback: each daemon gets only what a user gives it (a bootstrap address,
//! `--dht-server`, a topic) and the test waits for the outcome. No `rnctl connect`, no helper nodes.
//! - A first node whose own bootstrap address is dead still joins the network the others build through it.
//! - Nodes restarted after the node they bootstrapped from is gone find each other again from their stores:
//!   the last good address of each peer, and the peers' DHT sockets as bootstrap nodes.
//! - A node whose bootstrap node is down at start says so (`rnctl topics list`: 0 contacts), keeps running,
//!   and joins the network without a restart once the bootstrap node comes up.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{NodeDir, TestNode, json, stderr};

/// Bounds a hang only; the figures live in `rn-bench --only discovery`.
const PATIENCE: Duration = Duration::from_secs(120);
const TOPIC: &str = "self-forming";

/// A UDP port on 127.0.0.1 that was free a moment ago, for nodes that must keep their address across
/// restarts (as a deployed node does with its configured ports).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

fn node_id(dir: &NodeDir) -> String {
    let out = dir.rnctl(&["-o", "json", "node", "info"]);
    assert!(out.status.success(), "{}", stderr(&out));
    json(&out)["node"]["nodeId"].as_str().expect("node id").to_owned()
}

fn dht_address(dir: &NodeDir) -> String {
    let out = dir.rnctl(&["-o", "json", "node", "info"]);
    json(&out)["node"]["listen"]["dht"].as_str().expect("dht address").to_owned()
}

fn join(dir: &NodeDir) {
    let out = dir.rnctl(&["topics", "join", TOPIC]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Whether `dir` holds an open, verified connection to `peer` (`rnctl -o json peers show`).
fn connected_to(dir: &NodeDir, peer: &str) -> bool {
    let out = dir.rnctl(&["-o", "json", "peers", "show", peer]);
    out.status.success() && json(&out)["peer"]["connection"].is_object()
}

/// Waits until every node is connected to every other one; the failure names who is missing whom.
fn wait_all_connected(dirs: &[&NodeDir], nodes: &[&TestNode]) {
    let ids: Vec<String> = dirs.iter().map(|dir| node_id(dir)).collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let missing: Vec<String> = dirs
            .iter()
            .enumerate()
            .flat_map(|(i, dir)| {
                ids.iter()
                    .enumerate()
                    .filter(|(j, id)| *j != i && !connected_to(dir, id))
                    .map(|(j, _)| format!("node {i} has no connection to node {j}"))
                    .collect::<Vec<_>>()
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|node| node.stderr()).collect();
            panic!("{}\nlogs:\n{}", missing.join("\n"), logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The first node's bootstrap address answers nothing, the other two bootstrap from the first. mainline adds
/// nodes that query it to its routing table only while it has no bootstrap nodes at all, so the first node's
/// routing table stays empty; what it stores at its own DHT node (its announce, and the others' announces)
/// is what lets every pair form.
#[test]
fn a_first_node_with_a_dead_bootstrap_joins_the_network_built_through_it() {
    let dead = UdpSocket::bind("127.0.0.1:0").expect("bind a socket that never answers");
    let first = NodeDir::new().dht_server().with_bootstrap(&dead.local_addr().expect("address").to_string());
    let first_node = first.start();
    let bootstrap = dht_address(&first);
    let others: Vec<NodeDir> =
        (0..2).map(|_| NodeDir::new().dht_server().with_bootstrap(&bootstrap)).collect();
    let other_nodes: Vec<TestNode> = others.iter().map(NodeDir::start).collect();
    for dir in std::iter::once(&first).chain(&others) {
        join(dir);
    }
    let dirs: Vec<&NodeDir> = std::iter::once(&first).chain(&others).collect();
    let nodes: Vec<&TestNode> = std::iter::once(&first_node).chain(&other_nodes).collect();
    wait_all_connected(&dirs, &nodes);
    // The first node's DHT gets contacts too: it is rebuilt with the nodes that query it as bootstrap nodes.
    wait_for_dht_contacts(&first, &first_node);
}

/// Waits until the node's DHT routing table holds a node.
fn wait_for_dht_contacts(dir: &NodeDir, node: &TestNode) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = dir.rnctl(&["-o", "json", "node", "info"]);
        let size = json(&out)["node"]["dht"]["routingTableSize"].as_u64().unwrap_or(0);
        if size > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the DHT never got a contact:\n{}", node.stderr());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Three nodes meet; all stop; two restart with the first (their bootstrap) gone and a bootstrap address that
/// does not answer. They reconnect from what their stores know, and their DHTs bootstrap from each other's
/// DHT sockets named in the signed records they stored.
#[test]
fn restarted_nodes_find_each_other_from_their_stores() {
    let dirs: Vec<NodeDir> = (0..3)
        .map(|_| {
            NodeDir::new()
                .dht_server()
                .with_quic_listen(&format!("127.0.0.1:{}", free_udp_port()))
                .with_dht_listen(&format!("127.0.0.1:{}", free_udp_port()))
        })
        .collect();
    let first_node = dirs[0].start();
    let bootstrap = dht_address(&dirs[0]);
    let restartable: Vec<NodeDir> = dirs
        .into_iter()
        .enumerate()
        .map(|(i, dir)| if i == 0 { dir } else { dir.with_bootstrap(&bootstrap) })
        .collect();
    let nodes: Vec<TestNode> = restartable[1..].iter().map(NodeDir::start).collect();
    for dir in &restartable {
        join(dir);
    }
    let all: Vec<&NodeDir> = restartable.iter().collect();
    let running: Vec<&TestNode> = std::iter::once(&first_node).chain(&nodes).collect();
    wait_all_connected(&all, &running);

    let (status, log) = first_node.terminate();
    assert!(status.success(), "{log}");
    for node in nodes {
        let (status, log) = node.terminate();
        assert!(status.success(), "{log}");
    }
    // The first node is gone for good; the bootstrap the other two are given now answers nothing.
    let dead = UdpSocket::bind("127.0.0.1:0").expect("bind a socket that never answers");
    let dead = dead.local_addr().expect("address").to_string();
    let second_lives: Vec<NodeDir> =
        restartable.into_iter().skip(1).map(|dir| dir.with_bootstrap(&dead)).collect();
    let restarted: Vec<TestNode> = second_lives.iter().map(NodeDir::start).collect();
    let pair: Vec<&NodeDir> = second_lives.iter().collect();
    let running: Vec<&TestNode> = restarted.iter().collect();
    wait_all_connected(&pair, &running);

    // The DHT found its way back too: each knows the other's DHT socket from the record it stored.
    for (dir, node) in second_lives.iter().zip(&restarted) {
        wait_for_dht_contacts(dir, node);
    }
}

/// A node started while its bootstrap node is down keeps running and says why it finds nobody; once the
/// bootstrap node comes up, the two meet without a restart.
#[test]
fn a_node_whose_bootstrap_is_down_reports_it_and_recovers_when_it_comes_up() {
    let seed_dht = format!("127.0.0.1:{}", free_udp_port());
    let waiting = NodeDir::new().dht_server().with_bootstrap(&seed_dht);
    let mut waiting_node = waiting.start();
    join(&waiting);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = waiting.rnctl(&["-o", "json", "topics", "list"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let listing = json(&out);
        let explanation =
            listing["topics"][0]["discovery"]["explanation"].as_str().unwrap_or_default().to_owned();
        if explanation.contains("0 contacts") {
            break;
        }
        assert!(Instant::now() < deadline, "no explanation of the missing contacts: {listing}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(waiting_node.is_running(), "a dead bootstrap stopped the daemon: {}", waiting_node.stderr());

    let seed = NodeDir::new().dht_server().with_dht_listen(&seed_dht);
    let seed_node = seed.start();
    join(&seed);
    wait_all_connected(&[&waiting, &seed], &[&waiting_node, &seed_node]);
}
