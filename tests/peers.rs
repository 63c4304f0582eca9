//! End-to-end tests of the peer API on a populated store: the test writes peers into a real database file
//! through the library's store, then starts the real daemon on it and pages, shows, watches and forgets them
//! with `rnctl` and a tonic client.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{NodeDir, exit, json, stderr, stdout};
use remote_network::api::control::peer_service_client::PeerServiceClient;
use remote_network::api::control::{
    GetPeerRequest, ListPeersRequest, NodeType, PeerEventKind, PeerOrder, WatchPeersRequest,
};
use remote_network::api::names::NodeId;
use remote_network::store::{
    AddressSource, Capabilities, PeerUpsert, QualitySample, Store, StoreOptions, UpsertOutcome,
};

const PEERS: u32 = 1100;

/// Peers are dated within the last day so that the store's retention (30 days by default) keeps them all.
fn base_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(now.as_millis()).expect("millis fit i64") - 86_400_000
}

fn peer_id(i: u32) -> NodeId {
    let mut id = [0u8; 32];
    id[..4].copy_from_slice(&i.to_be_bytes());
    id[31] = 0x5a;
    NodeId(id)
}

/// Writes PEERS peers: peer i was last seen at BASE_MS + i seconds (BASE_MS: a day ago), even ones are public and in topic "even",
/// every one is in topic "all"; peer 7 has quality samples and capabilities. Returns BASE_MS.
async fn populate(dir: &NodeDir) -> i64 {
    let base_ms = base_ms();
    std::fs::create_dir_all(dir.data_dir()).expect("data dir");
    let store = Store::open(StoreOptions::new(dir.database())).expect("open store");
    for i in 0..PEERS {
        let even = i % 2 == 0;
        let outcome = store
            .upsert_peer(PeerUpsert {
                node_id: peer_id(i),
                seq: 1,
                record: vec![1, 2, 3],
                seen_at_ms: base_ms + i64::from(i) * 1000,
                node_type: if even {
                    remote_network::store::NodeType::Public
                } else {
                    remote_network::store::NodeType::Private
                },
                topics: if even { vec!["all".into(), "even".into()] } else { vec!["all".into()] },
                addresses: vec![(
                    format!("198.51.100.{}:30906", i % 250).parse().expect("address"),
                    AddressSource::Dht,
                )],
                capabilities: (i == 7).then(|| Capabilities {
                    os: "linux".into(),
                    arch: "x86_64".into(),
                    cpu_cores: 2,
                    memory_bytes: 24 << 30,
                    software_version: "0.1.0".into(),
                }),
                ..Default::default()
            })
            .await
            .expect("upsert");
        assert_eq!(outcome, UpsertOutcome::Added);
    }
    let sample = QualitySample {
        at_ms: base_ms,
        address: Some("198.51.100.7:30906".parse().expect("address")),
        outcome: Ok(Some(Duration::from_millis(40))),
    };
    store.record_quality(peer_id(7), sample).await.expect("quality");
    store.close().await.expect("close");
    base_ms
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_walk_every_peer_once_in_order_with_filters() {
    let dir = NodeDir::new();
    let base_ms = populate(&dir).await;
    let _node = dir.start();
    let mut client = PeerServiceClient::new(dir.channel().await);

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_peers(ListPeersRequest { page_size: 300, page_token: token.clone(), ..Default::default() })
            .await
            .expect("ListPeers")
            .into_inner();
        assert_eq!(page.total, u64::from(PEERS));
        assert!(page.peers.len() <= 300);
        seen.extend(page.peers.into_iter().map(|p| p.node_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 4);
    let expected: Vec<String> = (0..PEERS).rev().map(|i| peer_id(i).to_string()).collect();
    assert_eq!(seen, expected, "newest first, each exactly once");

    // Oversized pages are capped, not refused.
    let page = client
        .list_peers(ListPeersRequest { page_size: 5000, ..Default::default() })
        .await
        .expect("ListPeers")
        .into_inner();
    assert_eq!(page.peers.len(), 1000);
    assert!(!page.next_page_token.is_empty());

    // A token only continues the query it came from.
    let status = client
        .list_peers(ListPeersRequest {
            page_token: page.next_page_token,
            topic: "even".into(),
            ..Default::default()
        })
        .await
        .expect_err("token from another query");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let even = client
        .list_peers(ListPeersRequest { topic: "even".into(), page_size: 1000, ..Default::default() })
        .await
        .expect("ListPeers")
        .into_inner();
    assert_eq!(even.total, u64::from(PEERS / 2));
    assert!(even.peers.iter().all(|p| p.topics.contains(&"even".to_string())));
    let private = client
        .list_peers(ListPeersRequest { node_type: NodeType::Private as i32, ..Default::default() })
        .await
        .expect("ListPeers")
        .into_inner();
    assert_eq!(private.total, u64::from(PEERS / 2));
    let recent = client
        .list_peers(ListPeersRequest {
            seen_since: Some(prost_types::Timestamp {
                seconds: (base_ms / 1000) + i64::from(PEERS) - 10,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("ListPeers")
        .into_inner();
    assert_eq!(recent.total, 10);
    let by_score = client
        .list_peers(ListPeersRequest { order: PeerOrder::Score as i32, page_size: 1, ..Default::default() })
        .await
        .expect("ListPeers")
        .into_inner();
    assert_eq!(
        by_score.peers[0].node_id,
        peer_id(7).to_string(),
        "the only peer with a success scores highest"
    );

    // rnctl --all follows the tokens to the end.
    let out = dir.rnctl(&["-o", "json", "peers", "list", "--all", "--topic", "all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: HashSet<String> = json(&out)["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["nodeId"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(listed.len(), PEERS as usize);
    let out = dir.rnctl(&["peers", "list", "--page-size", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&peer_id(PEERS - 1).to_string()), "{text}");
    assert!(text.contains(&format!("of {PEERS}")), "the table says more exist: {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn show_returns_addresses_quality_and_capabilities() {
    let dir = NodeDir::new();
    populate(&dir).await;
    let _node = dir.start();
    let id = peer_id(7).to_string();
    let peer = PeerServiceClient::new(dir.channel().await)
        .get_peer(GetPeerRequest { node_id: id.clone() })
        .await
        .expect("GetPeer")
        .into_inner()
        .peer
        .expect("peer");
    assert_eq!(peer.addresses.len(), 1);
    assert_eq!(peer.addresses[0].address, "198.51.100.7:30906");
    assert!(peer.addresses[0].last_success.is_some());
    let quality = peer.quality.expect("quality");
    assert_eq!(quality.successes, 1);
    assert_eq!(quality.rtt.expect("rtt").nanos, 40_000_000);
    assert_eq!(peer.capabilities.expect("capabilities").cpu_cores, 2);
    assert_eq!(peer.record, vec![1, 2, 3]);

    let out = dir.rnctl(&["-o", "json", "peers", "show", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let value = json(&out);
    assert_eq!(value["peer"]["addresses"][0]["source"], "ADDRESS_SOURCE_DHT");
    assert_eq!(value["peer"]["capabilities"]["os"], "linux");
    let out = dir.rnctl(&["peers", "show", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("198.51.100.7:30906") && text.contains("linux"), "{text}");

    let unknown = NodeId([0xee; 32]).to_string();
    let out = dir.rnctl(&["peers", "show", &unknown]);
    assert_eq!(out.status.code(), Some(exit::NOT_FOUND), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_a_snapshot_then_live_removals() {
    let dir = NodeDir::new();
    populate(&dir).await;
    let _node = dir.start();
    let mut client = PeerServiceClient::new(dir.channel().await);
    let mut stream = client
        .watch_peers(WatchPeersRequest { include_snapshot: true, topic: "even".into() })
        .await
        .expect("WatchPeers")
        .into_inner();
    let mut snapshot = HashSet::new();
    loop {
        let event = stream.message().await.expect("event").expect("stream open");
        match event.kind() {
            PeerEventKind::Snapshot => {
                snapshot.insert(event.peer.expect("peer").node_id);
            }
            PeerEventKind::SnapshotDone => break,
            other => panic!("unexpected {other:?} during the snapshot"),
        }
    }
    assert_eq!(snapshot.len(), (PEERS / 2) as usize);

    // rnctl watches too, as NDJSON.
    let mut watcher = common::clean_command(&common::rnctl_bin())
        .arg("--socket")
        .arg(dir.socket())
        .args(["-o", "json", "peers", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("rnctl peers watch");
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    // Give the watcher time to subscribe before the change it must see.
    std::thread::sleep(Duration::from_millis(500));

    // Forgetting an odd peer is outside the "even" view; forgetting an even one is a removal in it.
    for i in [3, 4] {
        let out = dir.rnctl(&["peers", "forget", &peer_id(i).to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("event in time")
        .expect("event")
        .expect("stream open");
    assert_eq!(event.kind(), PeerEventKind::Removed);
    assert_eq!(event.peer.expect("peer").node_id, peer_id(4).to_string());

    let mut removed = Vec::new();
    while removed.len() < 2 {
        let line = lines.next().expect("a line per event").expect("read line");
        let value: serde_json::Value = serde_json::from_str(&line).expect("NDJSON line");
        assert_eq!(value["kind"], "PEER_EVENT_KIND_REMOVED", "{line}");
        removed.push(value["peer"]["nodeId"].as_str().expect("id").to_owned());
    }
    assert_eq!(removed, [peer_id(3).to_string(), peer_id(4).to_string()]);
    let _ = watcher.kill();
    let _ = watcher.wait();

    let out = dir.rnctl(&["peers", "forget", &peer_id(4).to_string()]);
    assert_eq!(out.status.code(), Some(exit::NOT_FOUND), "{}", stderr(&out));
    let out = dir.rnctl(&["-o", "json", "peers", "list"]);
    assert_eq!(json(&out)["total"], serde_json::json!((PEERS - 2).to_string()));
}
