//! Discovery and exchange end to end: real daemons on loopback find each other through a local Mainline DHT
//! (one of them serving it, nothing else contacted), verify each other's signed records over QUIC and store
//! them; `topics list` says how each topic's discovery goes and why it finds nobody; leaving a topic stops its
//! announces; a restart keeps the record seq increasing; `remote-network devnet` brings a whole network up in one
//! command.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{NodeDir, TestNode, json, stderr, stdout};
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::{DhtStatus, GetNodeInfoRequest, NodeInfo};

/// Generous bound for discovery on a loaded machine; tests assert on what happens, not how fast.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(90);

async fn node_info(dir: &NodeDir) -> NodeInfo {
    NodeServiceClient::new(dir.channel().await)
        .get_node_info(GetNodeInfoRequest {})
        .await
        .expect("GetNodeInfo")
        .into_inner()
        .node
        .expect("node")
}

fn dht_of(info: &NodeInfo) -> DhtStatus {
    info.dht.clone().expect("dht status")
}

/// Node ids of the peers `dir` lists for `topic` with a verified record, via `rnctl -o json`.
fn verified_peers(dir: &NodeDir, topic: &str) -> BTreeSet<String> {
    let out = dir.rnctl(&["-o", "json", "peers", "list", "--topic", topic, "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    json(&out)["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| p["seq"].as_str().is_some_and(|s| s != "0"))
        .map(|p| p["nodeId"].as_str().expect("id").to_owned())
        .collect()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DISCOVERY_TIMEOUT;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A DHT-serving first node and `others` bootstrapping from it.
async fn network(others: usize) -> (Vec<NodeDir>, Vec<TestNode>) {
    let first = NodeDir::new().dht_server();
    let mut nodes = vec![first.start()];
    let bootstrap = node_info(&first).await.listen.expect("listen").dht;
    let mut dirs = vec![first];
    for _ in 0..others {
        let dir = NodeDir::new().dht_server().with_bootstrap(&bootstrap);
        nodes.push(dir.start());
        dirs.push(dir);
    }
    (dirs, nodes)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_find_and_verify_each_other_through_a_local_dht() {
    let (dirs, _nodes) = network(2).await;
    let mut ids = Vec::new();
    for dir in &dirs {
        let out = dir.rnctl(&["topics", "join", "lab"]);
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(node_info(dir).await.node_id);
    }
    for (i, dir) in dirs.iter().enumerate() {
        let others: BTreeSet<String> =
            ids.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, id)| id.clone()).collect();
        wait_until(&format!("node {i} verified both others"), async || verified_peers(dir, "lab") == others)
            .await;
    }
    // Each holds the others' signed records and their metadata, learned over QUIC.
    for dir in &dirs {
        for other in ids.iter().filter(|id| **id != node_info_id(dir)) {
            let out = dir.rnctl(&["-o", "json", "peers", "show", other]);
            assert!(out.status.success(), "{}", stderr(&out));
            let peer = &json(&out)["peer"];
            assert!(!peer["record"].as_str().unwrap_or_default().is_empty(), "signed record stored: {peer}");
            assert_eq!(peer["topics"], serde_json::json!(["lab"]));
            assert_eq!(peer["capabilities"]["softwareVersion"], env!("CARGO_PKG_VERSION"));
            assert!(!peer["addresses"].as_array().expect("addresses").is_empty());
        }
        let info = node_info(dir).await;
        assert_eq!(info.connected_peers, 2, "one connection per peer");
        assert!(!info.listen.expect("listen").quic.is_empty());
        let dht = dht_of(&node_info(dir).await);
        assert!(dht.announces_sent > 0 && dht.lookups_started > 0, "{dht:?}");
    }
}

fn node_info_id(dir: &NodeDir) -> String {
    json(&dir.rnctl(&["-o", "json", "node", "info"]))["node"]["nodeId"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn leaving_a_topic_stops_its_announces() {
    let dir = NodeDir::new().dht_server();
    let _node = dir.start_with(|cmd| {
        cmd.env("RN_DHT_ANNOUNCE_INTERVAL", "1s").env("RN_DHT_LOOKUP_INTERVAL", "1s");
    });
    dir.rnctl(&["topics", "join", "fleeting"]);
    let mut before = 0;
    wait_until("the topic is announced repeatedly", async || {
        before = dht_of(&node_info(&dir).await).announces_sent;
        before >= 3
    })
    .await;
    let out = dir.rnctl(&["topics", "leave", "fleeting"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let at_leave = dht_of(&node_info(&dir).await).announces_sent;
    // Several announce intervals later, nothing more was announced.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(dht_of(&node_info(&dir).await).announces_sent, at_leave);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_seq_increasing_and_the_peer_is_verified_again() {
    let a = NodeDir::new();
    let b = NodeDir::new();
    let node_a = a.start();
    let _node_b = b.start();
    let a_id = node_info(&a).await.node_id;
    let a_quic = node_info(&a).await.listen.expect("listen").quic;
    let out = b.rnctl(&["-o", "json", "connect", &a_quic]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["peer"]["nodeId"], a_id.as_str());
    let seq_before: u64 = json(&b.rnctl(&["-o", "json", "peers", "show", &a_id]))["peer"]["seq"]
        .as_str()
        .expect("seq")
        .parse()
        .expect("number");

    let (status, log) = node_a.terminate();
    assert!(status.success(), "{log}");
    let _node_a = a.start();
    let a_quic = node_info(&a).await.listen.expect("listen").quic;
    let out = b.rnctl(&["connect", &a_quic]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&a_id), "{}", stdout(&out));
    let seq_after: u64 = json(&b.rnctl(&["-o", "json", "peers", "show", &a_id]))["peer"]["seq"]
        .as_str()
        .expect("seq")
        .parse()
        .expect("number");
    assert!(seq_after > seq_before, "seq went from {seq_before} to {seq_after}");

    // A live query reaches the restarted peer and returns its current record.
    let out = b.rnctl(&["-o", "json", "peers", "query", &a_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["peer"]["seq"], seq_after.to_string());
    assert!(json(&out)["rtt"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn join_wait_shows_progress_until_peers_are_verified() {
    let (dirs, _nodes) = network(2).await;
    for dir in &dirs[1..] {
        dir.rnctl(&["topics", "join", "waiting"]);
    }
    let out = dirs[0].rnctl(&["--timeout", "90", "topics", "join", "waiting", "--wait", "--peers", "2"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("verified 1/2") && text.contains("verified 2/2"), "{text}");
    // How discovery goes is shown on stderr while waiting.
    assert!(stderr(&out).contains("discovery: "), "{}", stderr(&out));
}

/// The `discovery` of `topic` in `rnctl -o json topics list` on `dir`; JSON null while it is absent.
fn discovery_of(dir: &NodeDir, topic: &str) -> serde_json::Value {
    let out = dir.rnctl(&["-o", "json", "topics", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    json(&out)["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .find(|t| t["name"] == topic)
        .map(|t| t["discovery"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_list_says_why_a_lone_node_finds_nobody_and_what_lookups_find_once_another_joins() {
    let first = NodeDir::new().dht_server();
    let _first_node = first.start();
    let out = first.rnctl(&["topics", "join", "seen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut discovery = serde_json::Value::Null;
    // The first announce must have ended for what it stored to show.
    wait_until("the lone node explains that no DHT node knows it, its first announce done", async || {
        discovery = discovery_of(&first, "seen");
        discovery["explanation"].as_str().is_some_and(|e| e.contains("0 contacts"))
            && discovery["announceRunning"] == false
    })
    .await;
    assert_eq!(discovery["dhtContacts"], 0, "{discovery}");
    assert_eq!(discovery["hasBootstrap"], false, "{discovery}");
    // Serving the DHT, it keeps its own announce, so a node that bootstraps from it can find it.
    assert_eq!(discovery["announceStoredHere"], true, "{discovery}");
    let text = stdout(&first.rnctl(&["topics", "list"]));
    assert!(text.contains("seen: no DHT node knows us yet: 0 contacts"), "{text}");

    // Waiting says why nothing comes, on stderr; stdout keeps only what it always printed. Nobody else is in the
    // topic yet, so this wait can only end at its deadline.
    let out = first.rnctl(&["--timeout", "5", "topics", "join", "seen", "--wait"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("discovery: no DHT node knows us yet: 0 contacts"), "{}", stderr(&out));
    assert!(stderr(&out).contains("0 of 1 peers of seen verified"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "already in seen; waiting for 1 verified peer(s)\n");

    let bootstrap = node_info(&first).await.listen.expect("listen").dht;
    let second = NodeDir::new().dht_server().with_bootstrap(&bootstrap);
    let _second_node = second.start();
    let out = second.rnctl(&["topics", "join", "seen"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, dir) in [("first", &first), ("second", &second)] {
        wait_until(&format!("the {name} node lists a finished lookup that found a peer"), async || {
            discovery = discovery_of(dir, "seen");
            discovery["lastLookupAt"].is_string()
                && discovery["lastLookupPeers"].as_u64().is_some_and(|n| n >= 1)
        })
        .await;
        assert!(discovery["dhtContacts"].as_u64().is_some_and(|n| n >= 1), "{name}: {discovery}");
        let explanation = discovery["explanation"].as_str().unwrap_or_default();
        assert!(explanation.contains("the last lookup found"), "{name}: {discovery}");
        let text = stdout(&dir.rnctl(&["topics", "list"]));
        assert!(text.contains("seen: the last lookup found"), "{name}: {text}");
    }
}

#[test]
fn devnet_brings_five_nodes_up_that_verify_each_other() {
    let out = common::clean_command(&common::daemon_bin())
        .args(["devnet", "--nodes", "5", "--topic", "t", "--until-verified", "--duration", "120"])
        .output()
        .expect("devnet");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("all 5 nodes verified each other"), "{text}");
    assert!(text.contains("rnctl --socket"), "{text}");
    let dir = text.lines().next().and_then(|l| l.rsplit("files in ").next()).expect("devnet dir").trim();
    assert!(!std::path::Path::new(dir).exists(), "the devnet removed {dir}");
}
