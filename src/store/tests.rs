//! Tests of the store through its public API, each on a fresh database in a temporary directory. Timestamps are
//! relative to the real clock because the writer prunes by the real clock when it starts.

use std::collections::BTreeSet;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::broadcast::error::TryRecvError;

use super::writer::{Command, MAX_ADDRESSES_PER_PEER, now_ms};
use super::*;
use crate::api::names::NodeId;

fn options(dir: &TempDir) -> StoreOptions {
    StoreOptions::new(dir.path().join("peers.db"))
}

fn open(dir: &TempDir) -> Store {
    match Store::open(options(dir)) {
        Ok(store) => store,
        Err(error) => panic!("opening the store failed: {error}"),
    }
}

/// Distinct ids whose byte order differs from their index order, so sorting by id is really exercised.
/// A socket address written as a test's literal.
fn sa(text: &str) -> std::net::SocketAddr {
    text.parse().expect("a test address")
}

fn node(index: u8) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[0] = index.wrapping_mul(37);
    bytes[31] = index;
    NodeId(bytes)
}

fn peer(node_id: NodeId, seq: u64, seen_at_ms: i64) -> PeerUpsert {
    PeerUpsert {
        node_id,
        seq,
        record: format!("record {seq}").into_bytes(),
        seen_at_ms,
        ..PeerUpsert::default()
    }
}

fn topics(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn raw_connection(store: &Store) -> rusqlite::Connection {
    rusqlite::Connection::open(store.path()).expect("test: open a second connection")
}

async fn detail(store: &Store, node_id: NodeId) -> PeerDetail {
    store.get_peer(node_id).await.expect("test: get_peer").expect("test: the peer is stored")
}

async fn sql(store: &Store, sql: &str) -> Result<(), StoreError> {
    store.write(|reply| Command::Execute { sql: sql.to_owned(), reply }).await
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_create_version_1_and_reopening_is_idempotent() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.schema_version, 3);
    assert_eq!(stats.peers, 0);
    assert!(stats.size_bytes > 0);

    let tables: BTreeSet<String> = raw_connection(&store)
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for table in [
        "peers",
        "peer_addresses",
        "peer_topics",
        "peer_quality",
        "peer_capabilities",
        "peer_services",
        "joined_topics",
        "node_state",
    ] {
        assert!(tables.contains(table), "missing table {table}");
    }
    store.upsert_peer(peer(node(1), 1, now_ms())).await.unwrap();
    store.close().await.unwrap();

    for _ in 0..2 {
        let store = open(&dir);
        let stats = store.stats().await.unwrap();
        assert_eq!(stats.schema_version, 3);
        assert_eq!(stats.peers, 1);
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_schema_is_refused_untouched() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("peers.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
    }
    match Store::open(StoreOptions::new(&path)) {
        Err(error @ StoreError::NewerSchema { found: 999, supported: 3, .. }) => {
            let message = error.to_string();
            assert!(message.contains("newer than this build supports"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    // Refused before anything was written: still the old journal mode and version.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0)).unwrap();
    assert_eq!(mode, "delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn opening_garbage_or_a_missing_directory_fails_with_advice() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("not-a-db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    match Store::open(StoreOptions::new(&path)) {
        Err(error @ StoreError::Open { .. }) => {
            assert!(error.to_string().contains("not an SQLite database"), "{error}")
        }
        other => panic!("expected Open, got {other:?}"),
    }

    match Store::open(StoreOptions::new(dir.path().join("missing/peers.db"))) {
        Err(error @ StoreError::Open { .. }) => {
            assert!(error.to_string().contains("directory exists"), "{error}")
        }
        other => panic!("expected Open, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_mode_is_active() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let mode = store
        .read(|conn| Ok(conn.pragma_query_value(None, "journal_mode", |row| row.get::<_, String>(0))?))
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let foreign_keys = store
        .read(|conn| Ok(conn.pragma_query_value(None, "foreign_keys", |row| row.get::<_, i64>(0))?))
        .await
        .unwrap();
    assert_eq!(foreign_keys, 1);
    // The pool refuses writes: they belong to the writer.
    let write = store.read(|conn| Ok(conn.execute("DELETE FROM peers", [])?)).await;
    assert!(matches!(write, Err(StoreError::Sqlite(_))), "{write:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upsert_keeps_the_higher_seq() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let id = node(1);

    let mut first = peer(id, 5, now);
    first.topics = topics(&["b", "a"]);
    first.node_type = NodeType::Public;
    first.nat_type = NatType::None;
    first.addresses = vec![(sa("1.2.3.4:5"), AddressSource::Dht)];
    first.capabilities = Some(Capabilities {
        os: "linux".into(),
        arch: "x86_64".into(),
        cpu_cores: 8,
        memory_bytes: u64::MAX,
        software_version: "0.1.0".into(),
    });
    first.services = vec![ServiceEntry {
        name: "shell".into(),
        version: "1".into(),
        attributes: vec![("b".into(), "x=y\nz".into()), ("a".into(), String::new())],
    }];
    assert_eq!(store.upsert_peer(first.clone()).await.unwrap(), UpsertOutcome::Added);
    let stored = detail(&store, id).await;
    assert_eq!(stored.summary.topics, topics(&["a", "b"]));
    assert_eq!(stored.summary.seq, 5);
    assert_eq!(stored.record, first.record);
    assert_eq!(stored.capabilities, first.capabilities);
    assert_eq!(
        stored.services[0].attributes,
        vec![("a".to_owned(), String::new()), ("b".to_owned(), "x=y\nz".to_owned())]
    );

    let mut older = peer(id, 3, now + 1000);
    older.topics = topics(&["c"]);
    older.addresses = vec![(sa("9.9.9.9:9"), AddressSource::Inbound)];
    assert_eq!(store.upsert_peer(older).await.unwrap(), UpsertOutcome::Stale { stored_seq: 5 });
    assert_eq!(detail(&store, id).await, stored, "a stale upsert changed something");

    let mut newer = peer(id, 7, now + 2000);
    newer.topics = topics(&["c"]);
    newer.node_type = NodeType::Private;
    newer.addresses = vec![(sa("5.6.7.8:9"), AddressSource::PeerExchange)];
    assert_eq!(store.upsert_peer(newer.clone()).await.unwrap(), UpsertOutcome::Updated);
    let updated = detail(&store, id).await;
    assert_eq!(updated.summary.seq, 7);
    assert_eq!(updated.summary.topics, topics(&["c"]));
    assert_eq!(updated.summary.node_type, NodeType::Private);
    assert_eq!(updated.summary.nat_type, NatType::Unknown);
    assert_eq!(updated.summary.first_seen_ms, now);
    assert_eq!(updated.summary.last_seen_ms, now + 2000);
    assert_eq!(updated.record, newer.record);
    assert_eq!(updated.capabilities, None);
    assert!(updated.services.is_empty());
    // Addresses are merged, never replaced.
    let addresses: BTreeSet<_> = updated.addresses.iter().map(|a| a.address).collect();
    assert_eq!(addresses, BTreeSet::from([sa("1.2.3.4:5"), sa("5.6.7.8:9")]));
    assert_eq!(store.get_peer(node(2)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_equal_seq_refreshes_last_seen_and_addresses_only() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let id = node(1);
    let mut first = peer(id, 5, now);
    first.topics = topics(&["a"]);
    store.upsert_peer(first.clone()).await.unwrap();

    let mut again = peer(id, 5, now + 500);
    again.record = b"different bytes".to_vec();
    again.topics = topics(&["z"]);
    again.node_type = NodeType::Public;
    again.addresses = vec![(sa("[::1]:4433"), AddressSource::Manual)];
    assert_eq!(store.upsert_peer(again).await.unwrap(), UpsertOutcome::Updated);
    let stored = detail(&store, id).await;
    assert_eq!(stored.summary.last_seen_ms, now + 500);
    assert_eq!(stored.summary.first_seen_ms, now);
    assert_eq!(stored.record, first.record);
    assert_eq!(stored.summary.topics, topics(&["a"]));
    assert_eq!(stored.summary.node_type, NodeType::Unknown);
    assert_eq!(stored.addresses.len(), 1);
    assert_eq!(stored.addresses[0].source, AddressSource::Manual);

    // An older sighting with the same seq never moves last_seen back.
    store.upsert_peer(peer(id, 5, now - 10_000)).await.unwrap();
    assert_eq!(detail(&store, id).await.summary.last_seen_ms, now + 500);
}

#[tokio::test(flavor = "multi_thread")]
async fn addresses_merge_and_stay_bounded() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let id = node(1);
    let mut first = peer(id, 1, now);
    first.addresses = (0..10).map(|i| (sa(&format!("10.0.0.{i}:1")), AddressSource::Dht)).collect();
    store.upsert_peer(first).await.unwrap();

    let sample =
        |address: &str, outcome| QualitySample { at_ms: now + 10, address: Some(sa(address)), outcome };
    store.record_quality(id, sample("10.0.0.3:1", Ok(Some(Duration::from_millis(20))))).await.unwrap();
    store.record_quality(id, sample("10.0.0.5:1", Err("refused".into()))).await.unwrap();
    let stored = detail(&store, id).await;
    // The address that worked sorts first.
    assert_eq!(stored.addresses[0].address, sa("10.0.0.3:1"));
    assert_eq!(stored.addresses[0].last_success_ms, Some(now + 10));
    let failing = stored.addresses.iter().find(|a| a.address == sa("10.0.0.5:1")).unwrap();
    assert_eq!(failing.consecutive_failures, 1);
    assert_eq!(failing.last_failure_ms, Some(now + 10));

    // A flood of new addresses: the bound holds, the working address survives, the failing one goes first.
    let mut flood = peer(id, 1, now + 20);
    flood.addresses = (0..40).map(|i| (sa(&format!("192.0.2.{i}:1")), AddressSource::PeerExchange)).collect();
    store.upsert_peer(flood).await.unwrap();
    let stored = detail(&store, id).await;
    assert_eq!(stored.addresses.len(), MAX_ADDRESSES_PER_PEER as usize);
    assert_eq!(stored.addresses[0].address, sa("10.0.0.3:1"));
    assert!(!stored.addresses.iter().any(|a| a.address == sa("10.0.0.5:1")));
    assert_eq!(store.stats().await.unwrap().peer_addresses, 32);

    // A success resets the failure streak.
    store.record_quality(id, sample("192.0.2.0:1", Err("timeout".into()))).await.unwrap();
    store.record_quality(id, sample("192.0.2.0:1", Ok(None))).await.unwrap();
    let stored = detail(&store, id).await;
    let address = stored.addresses.iter().find(|a| a.address == sa("192.0.2.0:1")).unwrap();
    assert_eq!(address.consecutive_failures, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pruning_by_retention_then_by_max_peers_emits_removed() {
    let dir = TempDir::new().unwrap();
    let mut options = options(&dir);
    options.retention = Duration::from_secs(10);
    options.max_peers = 3;
    let store = Store::open(options).unwrap();
    let now = now_ms();
    let seen = [now - 20_000, now - 4000, now - 3000, now - 2000, now - 1000];
    for (index, seen_at) in seen.iter().enumerate() {
        let mut upsert = peer(node(index as u8), 1, *seen_at);
        upsert.topics = topics(&["t"]);
        upsert.addresses = vec![(sa("10.0.0.1:1"), AddressSource::Dht)];
        store.upsert_peer(upsert).await.unwrap();
    }
    let mut events = store.subscribe();
    assert_eq!(store.prune(now).await.unwrap(), 2);
    assert_eq!(events.recv().await.unwrap(), PeerEvent::Removed(node(0)));
    assert_eq!(events.recv().await.unwrap(), PeerEvent::Removed(node(1)));
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));

    let page = store.list_peers(PeerQuery { limit: 10, ..PeerQuery::default() }).await.unwrap();
    let left: Vec<NodeId> = page.peers.iter().map(|p| p.node_id).collect();
    assert_eq!(left, vec![node(4), node(3), node(2)]);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.peers, 3);
    assert_eq!(stats.peer_addresses, 3);
    // Nothing more to prune.
    assert_eq!(store.prune(now).await.unwrap(), 0);
}

/// A reload lowers the caps: they hold at once (the store prunes when they change), and for later writes.
#[tokio::test(flavor = "multi_thread")]
async fn lowered_limits_prune_at_once_and_hold_afterwards() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    for index in 0..6u8 {
        store.upsert_peer(peer(node(index), 1, now - 1000 * i64::from(6 - index))).await.unwrap();
    }
    assert_eq!(store.set_limits(Duration::from_secs(3600), 2, 1).await.unwrap(), 4);
    assert_eq!(store.stats().await.unwrap().peers, 2);
    store.join_topic("first".into(), now).await.unwrap();
    let refused = store.join_topic("second".into(), now).await.expect_err("one topic at most");
    assert!(matches!(refused, StoreError::TooManyTopics { max: 1 }), "{refused}");
    // A shorter retention drops peers last seen before it.
    assert_eq!(store.set_limits(Duration::from_millis(1500), 2, 1).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn forget_peer_cascades() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let id = node(1);
    let mut upsert = peer(id, 1, now);
    upsert.topics = topics(&["x", "y"]);
    upsert.addresses = vec![(sa("10.0.0.1:1"), AddressSource::Dht)];
    upsert.capabilities = Some(Capabilities::default());
    upsert.services = vec![ServiceEntry::default()];
    store.upsert_peer(upsert).await.unwrap();
    store.upsert_peer(peer(node(2), 1, now)).await.unwrap();
    store.record_quality(id, QualitySample { at_ms: now, address: None, outcome: Ok(None) }).await.unwrap();

    let mut events = store.subscribe();
    assert!(store.forget_peer(id).await.unwrap());
    assert_eq!(events.recv().await.unwrap(), PeerEvent::Removed(id));
    assert_eq!(store.get_peer(id).await.unwrap(), None);
    let conn = raw_connection(&store);
    for table in ["peer_addresses", "peer_topics", "peer_quality", "peer_capabilities", "peer_services"] {
        let rows: i64 =
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| row.get(0)).unwrap();
        assert_eq!(rows, 0, "{table} kept rows of a forgotten peer");
    }
    assert!(!store.forget_peer(id).await.unwrap());
    assert!(store.get_peer(node(2)).await.unwrap().is_some());
}

/// Walks every page of `query` with the given page size, checking `total` on each page.
async fn walk(store: &Store, mut query: PeerQuery, limit: u32, total: u64) -> Vec<NodeId> {
    query.limit = limit;
    query.after = None;
    let mut seen = Vec::new();
    loop {
        let page = store.list_peers(query.clone()).await.unwrap();
        assert_eq!(page.total, total, "total of {query:?}");
        assert!(page.peers.len() <= limit as usize);
        seen.extend(page.peers.iter().map(|p| p.node_id));
        match page.next {
            Some(next) => query.after = Some(next),
            None => return seen,
        }
        assert!(seen.len() <= 1000, "pagination does not end");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_peers_walks_every_row_once_in_both_orders_with_filters() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    for index in 0..30u8 {
        let id = node(index);
        // Ties in last_seen (every third pair) exercise the node id tiebreak, ties in score (most peers score 0)
        // the tiebreak by the order peers were stored in, which `node` makes unlike the node ids' order.
        let mut upsert = peer(id, 1, now - i64::from(index / 3) * 1000);
        upsert.node_type = match index % 3 {
            0 => NodeType::Public,
            1 => NodeType::Private,
            _ => NodeType::Unknown,
        };
        upsert.topics = match index % 4 {
            0 => topics(&["red"]),
            1 => topics(&["red", "blue"]),
            2 => topics(&["blue"]),
            _ => Vec::new(),
        };
        store.upsert_peer(upsert).await.unwrap();
        if index % 5 == 0 {
            for _ in 0..(index % 3 + 1) {
                store
                    .record_quality(
                        id,
                        QualitySample {
                            at_ms: now,
                            address: None,
                            outcome: Ok(Some(Duration::from_millis(50))),
                        },
                    )
                    .await
                    .unwrap();
            }
        }
    }
    let mut all = Vec::new();
    for index in 0..30u8 {
        all.push(detail(&store, node(index)).await.summary);
    }

    let queries = [
        PeerQuery::default(),
        PeerQuery { topic: Some("red".into()), ..PeerQuery::default() },
        PeerQuery { topic: Some("none-has-this".into()), ..PeerQuery::default() },
        PeerQuery { node_type: Some(NodeType::Public), ..PeerQuery::default() },
        PeerQuery { seen_since_ms: Some(now - 4000), ..PeerQuery::default() },
        PeerQuery {
            topic: Some("blue".into()),
            node_type: Some(NodeType::Private),
            seen_since_ms: Some(now - 8000),
            ..PeerQuery::default()
        },
    ];
    for order in [PeerOrder::LastSeen, PeerOrder::Score] {
        for base in &queries {
            let query = PeerQuery { order, ..base.clone() };
            let mut expected: Vec<&PeerSummary> = all
                .iter()
                .filter(|p| query.topic.as_ref().is_none_or(|t| p.topics.contains(t)))
                .filter(|p| query.node_type.is_none_or(|n| p.node_type == n))
                .filter(|p| query.seen_since_ms.is_none_or(|s| p.last_seen_ms >= s))
                .collect();
            // `all` is in the order the peers were stored, and the sort is stable: equal scores keep it.
            expected.sort_by(|a, b| match order {
                PeerOrder::LastSeen => b.last_seen_ms.cmp(&a.last_seen_ms).then(a.node_id.cmp(&b.node_id)),
                PeerOrder::Score => b.score.total_cmp(&a.score),
            });
            let expected: Vec<NodeId> = expected.iter().map(|p| p.node_id).collect();
            for limit in [1, 3, 7, 1000] {
                let walked = walk(&store, query.clone(), limit, expected.len() as u64).await;
                assert_eq!(walked, expected, "{query:?} limit {limit}");
            }
        }
    }

    // A page shows the summary with sorted topics.
    let page = store
        .list_peers(PeerQuery { topic: Some("blue".into()), limit: 1000, ..PeerQuery::default() })
        .await
        .unwrap();
    assert!(page.peers.iter().all(|p| p.topics.windows(2).all(|w| w[0] < w[1])));
    assert!(page.peers.contains(&all[1]));

    // A cursor of the other order is refused rather than misread.
    let wrong = store
        .list_peers(PeerQuery {
            order: PeerOrder::Score,
            limit: 5,
            after: Some(PeerCursor::LastSeen { last_seen_ms: now, node_id: node(0) }),
            ..PeerQuery::default()
        })
        .await;
    assert!(matches!(wrong, Err(StoreError::CursorOrderMismatch)), "{wrong:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn joined_topics_are_bounded_counted_and_persisted() {
    let dir = TempDir::new().unwrap();
    let mut options = options(&dir);
    options.max_joined_topics = 2;
    let store = Store::open(options.clone()).unwrap();
    let now = now_ms();

    let (joined, new) = store.join_topic("red".into(), now).await.unwrap();
    assert!(new);
    assert_eq!(joined, JoinedTopic { name: "red".into(), joined_at_ms: now, peers: 0 });
    let (again, new) = store.join_topic("red".into(), now + 5).await.unwrap();
    assert!(!new);
    assert_eq!(again.joined_at_ms, now);
    store.join_topic("blue".into(), now + 1).await.unwrap();
    let refused = store.join_topic("green".into(), now + 2).await;
    match refused {
        Err(error @ StoreError::TooManyTopics { max: 2 }) => {
            assert!(error.to_string().contains("store.max_joined_topics"))
        }
        other => panic!("expected TooManyTopics, got {other:?}"),
    }
    // Joining one already joined is still fine at the limit.
    assert!(!store.join_topic("blue".into(), now).await.unwrap().1);
    assert!(matches!(store.join_topic("bad\ntopic".into(), now).await, Err(StoreError::InvalidTopic(_))));

    for (index, names) in [&["red"][..], &["red", "blue"], &["green"]].iter().enumerate() {
        let mut upsert = peer(node(index as u8), 1, now);
        upsert.topics = topics(names);
        store.upsert_peer(upsert).await.unwrap();
    }
    let expected = vec![
        JoinedTopic { name: "blue".into(), joined_at_ms: now + 1, peers: 1 },
        JoinedTopic { name: "red".into(), joined_at_ms: now, peers: 2 },
    ];
    assert_eq!(store.joined_topics().await.unwrap(), expected);
    store.close().await.unwrap();

    let store = Store::open(options).unwrap();
    assert_eq!(store.joined_topics().await.unwrap(), expected);
    assert!(store.leave_topic("red".into()).await.unwrap());
    assert!(!store.leave_topic("red".into()).await.unwrap());
    assert!(store.join_topic("green".into(), now).await.unwrap().1);
    assert_eq!(store.stats().await.unwrap().joined_topics, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_command_does_not_fail_its_batch() {
    let dir = TempDir::new().unwrap();
    let mut options = options(&dir);
    options.max_joined_topics = 1;
    let store = Store::open(options).unwrap();
    let now = now_ms();
    // Submitted together, these usually share a batch; the outcome must be the same either way.
    let (a, b, c) = tokio::join!(
        store.join_topic("a".into(), now),
        store.join_topic("b".into(), now),
        store.upsert_peer(peer(node(1), 1, now)),
    );
    let joins = [a.is_ok(), b.is_ok()];
    assert_eq!(joins.iter().filter(|ok| **ok).count(), 1, "{a:?} {b:?}");
    assert_eq!(c.unwrap(), UpsertOutcome::Added);
    assert_eq!(store.joined_topics().await.unwrap().len(), 1);
    assert!(store.get_peer(node(1)).await.unwrap().is_some());
    assert_eq!(store.health(), StoreHealth::Ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_are_served_while_the_writer_commits() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    const PEERS: u64 = 2000;

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for index in 0..PEERS {
                let store = store.clone();
                tasks.spawn(async move {
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&index.to_be_bytes());
                    let mut upsert = peer(NodeId(id), 1, now + index as i64);
                    upsert.topics = topics(&["load"]);
                    upsert.addresses =
                        vec![(sa(&format!("10.0.0.1:{}", index % 60_000 + 1)), AddressSource::Dht)];
                    store.upsert_peer(upsert).await
                });
            }
            while let Some(result) = tasks.join_next().await {
                assert_eq!(result.unwrap().unwrap(), UpsertOutcome::Added);
            }
        })
    };

    let mut reads = 0;
    let mut last_total = 0;
    while !writer.is_finished() || reads < 20 {
        let page = store
            .list_peers(PeerQuery { topic: Some("load".into()), limit: 50, ..PeerQuery::default() })
            .await
            .unwrap();
        // Each read sees a committed snapshot: totals only grow and a page never exceeds them.
        assert!(page.total >= last_total);
        assert!(page.peers.len() as u64 <= page.total);
        last_total = page.total;
        let stats = store.stats().await.unwrap();
        assert!(stats.peers >= last_total);
        reads += 1;
    }
    writer.await.unwrap();

    let stats = store.stats().await.unwrap();
    assert_eq!(stats.peers, PEERS);
    assert_eq!(stats.peer_addresses, PEERS);
    // Concurrent writes were batched: fewer commits than writes (the start-up prune is one batch too).
    assert!(stats.writes_committed > PEERS);
    assert!(stats.write_batches <= stats.writes_committed);
    assert_eq!(
        walk(&store, PeerQuery { topic: Some("load".into()), ..PeerQuery::default() }, 1000, PEERS)
            .await
            .len() as u64,
        PEERS
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_close_and_reopen() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..100u8 {
        let store = store.clone();
        tasks.spawn(async move { store.upsert_peer(peer(node(index), 1, now)).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    store.close().await.unwrap();
    drop(store);

    let store = open(&dir);
    assert_eq!(store.stats().await.unwrap().peers, 100);
    assert_eq!(detail(&store, node(42)).await.summary.last_seen_ms, now);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_after_close_fail_with_closed() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    store.upsert_peer(peer(node(1), 1, now)).await.unwrap();
    let other_handle = store.clone();
    store.close().await.unwrap();
    // Closing twice is harmless.
    other_handle.close().await.unwrap();

    let write = other_handle.upsert_peer(peer(node(2), 1, now)).await;
    assert!(matches!(write, Err(StoreError::Closed)), "{write:?}");
    assert!(matches!(store.join_topic("t".into(), now).await, Err(StoreError::Closed)));
    assert_eq!(StoreError::Closed.to_string(), "the store is shutting down; the write was not made");
    // Reads still work from the pool.
    assert!(store.get_peer(node(1)).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_broadcast_after_commit_in_order() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let id = node(1);
    let mut events = store.subscribe();

    let added = store.upsert_peer(peer(id, 1, now));
    let (outcome, event) = tokio::join!(added, events.recv());
    assert_eq!(outcome.unwrap(), UpsertOutcome::Added);
    match event.unwrap() {
        PeerEvent::Added(summary) => {
            assert_eq!(summary.node_id, id);
            // Committed before it was announced: a reader sees it.
            assert!(store.get_peer(id).await.unwrap().is_some());
        }
        other => panic!("expected Added, got {other:?}"),
    }

    store.upsert_peer(peer(id, 2, now + 1)).await.unwrap();
    match events.recv().await.unwrap() {
        PeerEvent::Updated(summary) => assert_eq!(summary.seq, 2),
        other => panic!("expected Updated, got {other:?}"),
    }
    // A stale upsert changes nothing and announces nothing.
    store.upsert_peer(peer(id, 1, now + 2)).await.unwrap();
    store.forget_peer(id).await.unwrap();
    assert_eq!(events.recv().await.unwrap(), PeerEvent::Removed(id));
    // Quality for an unknown peer is dropped silently.
    store.record_quality(id, QualitySample { at_ms: now, address: None, outcome: Ok(None) }).await.unwrap();
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(store.get_peer(id).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn quality_is_smoothed_and_scored_within_bounds() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    let id = node(1);
    store.upsert_peer(peer(id, 1, now)).await.unwrap();
    assert_eq!(detail(&store, id).await.quality, Quality::default());
    let record = |at_ms, outcome| store.record_quality(id, QualitySample { at_ms, address: None, outcome });

    record(now + 1, Ok(Some(Duration::from_millis(100)))).await.unwrap();
    let quality = detail(&store, id).await.quality;
    assert_eq!(quality.rtt_ewma, Some(Duration::from_millis(100)));
    record(now + 2, Ok(Some(Duration::from_millis(200)))).await.unwrap();
    record(now + 3, Ok(None)).await.unwrap();
    let long_error = "é".repeat(400);
    record(now + 4, Err(long_error)).await.unwrap();

    let stored = detail(&store, id).await;
    let quality = stored.quality;
    assert_eq!(quality.rtt_ewma, Some(Duration::from_micros(112_500)));
    assert_eq!(quality.rtt_samples, 2);
    assert_eq!(quality.successes, 3);
    assert_eq!(quality.failures, 1);
    assert_eq!(quality.last_success_ms, Some(now + 3));
    assert_eq!(quality.last_error_ms, Some(now + 4));
    let error = quality.last_error.unwrap();
    assert_eq!(error.len(), 512);
    assert!(error.chars().all(|c| c == 'é'));

    let expected = 3.0 / 5.0 / (1.0 + 112.5 / 1000.0);
    let score = stored.summary.score;
    assert!((score - expected).abs() < 1e-9, "score {score}, expected {expected}");
    assert!((0.0..=1.0).contains(&score));

    for _ in 0..50 {
        record(now + 5, Err("down".into())).await.unwrap();
    }
    let score = detail(&store, id).await.summary.score;
    assert!((0.0..expected).contains(&score));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_database_degrades_health_until_a_commit_succeeds() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    store.upsert_peer(peer(node(1), 1, now)).await.unwrap();
    let pages: i64 = raw_connection(&store).query_row("PRAGMA page_count", [], |row| row.get(0)).unwrap();
    // Make the writer's database "full" at its current size.
    sql(&store, &format!("PRAGMA max_page_count = {pages}")).await.unwrap();

    let mut big = peer(node(2), 1, now);
    big.record = vec![7; 64 * 1024];
    match store.upsert_peer(big.clone()).await {
        Err(StoreError::WriteFailed(reason)) => {
            assert!(reason.contains("full"), "{reason}");
            assert!(reason.contains("free space"), "{reason}");
        }
        other => panic!("expected WriteFailed, got {other:?}"),
    }
    assert!(matches!(store.health(), StoreHealth::Degraded(_)));
    assert!(store.get_peer(node(1)).await.unwrap().is_some());

    sql(&store, "PRAGMA max_page_count = 1073741823").await.unwrap();
    assert_eq!(store.upsert_peer(big).await.unwrap(), UpsertOutcome::Added);
    assert_eq!(store.health(), StoreHealth::Ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_stored_rows_are_read_without_panicking() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let now = now_ms();
    store.upsert_peer(peer(node(1), 1, now)).await.unwrap();
    {
        let conn = raw_connection(&store);
        // A text id (passes the length check) and enum numbers this build does not know.
        conn.execute(
            "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type, score)
             VALUES (?1, 1, x'', ?2, ?2, 0, 0, 0)",
            rusqlite::params!["x".repeat(32), now],
        )
        .unwrap();
        conn.execute(
            "UPDATE peers SET node_type = 77, nat_type = -3 WHERE node_id = ?1",
            [node(1).as_bytes().as_slice()],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO peer_addresses (peer, address, source, first_seen, consecutive_failures)
             VALUES ((SELECT id FROM peers WHERE node_id = ?1), '10.0.0.1:1', 42, 0, -5)",
            [node(1).as_bytes().as_slice()],
        )
        .unwrap();
    }
    let page = store.list_peers(PeerQuery { limit: 10, ..PeerQuery::default() }).await.unwrap();
    assert_eq!(page.peers.len(), 1);
    assert_eq!(page.total, 2);
    let stored = detail(&store, node(1)).await;
    assert_eq!(stored.summary.node_type, NodeType::Unknown);
    assert_eq!(stored.summary.nat_type, NatType::Unknown);
    assert_eq!(stored.addresses[0].source, AddressSource::Unknown);
    assert_eq!(stored.addresses[0].consecutive_failures, 0);
    // Pruning deletes the malformed row too.
    let mut options = options(&dir);
    options.max_peers = 0;
    store.close().await.unwrap();
    let store = Store::open(options).unwrap();
    assert_eq!(store.prune(now).await.unwrap(), 0);
    assert_eq!(store.stats().await.unwrap().peers, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn record_seq_increases_across_reopen_and_respects_the_floor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peers.db");
    let store = Store::open(StoreOptions::new(&path)).expect("open");
    assert_eq!(store.next_record_seq(0).await.expect("seq"), 1);
    assert_eq!(store.next_record_seq(0).await.expect("seq"), 2);
    assert_eq!(store.next_record_seq(1000).await.expect("seq"), 1000);
    store.close().await.expect("close");
    let store = Store::open(StoreOptions::new(&path)).expect("reopen");
    // A clock that went back does not make the seq go back.
    assert_eq!(store.next_record_seq(10).await.expect("seq"), 1001);
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peers.db");
    // What a node of the first release left behind: the v1 schema, with its data.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        schema::create_old_version(&conn, 1).unwrap();
        conn.execute("INSERT INTO joined_topics (topic, joined_at) VALUES ('kept', 1)", []).unwrap();
    }
    let store = Store::open(StoreOptions::new(&path)).expect("opening migrates");
    assert_eq!(store.stats().await.unwrap().schema_version, 3);
    assert_eq!(store.joined_topics().await.unwrap()[0].name, "kept");
    assert!(store.punch_stats().await.unwrap().is_empty());
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn punch_outcomes_are_counted_per_nat_pair_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peers.db");
    let store = Store::open(StoreOptions::new(&path)).expect("open");
    let outcome = |their_nat, time: Option<u64>, detail: &str, at_ms| PunchOutcome {
        our_nat: 2,
        their_nat,
        detail: detail.to_owned(),
        at_ms,
        time_to_connected_ms: time,
    };
    store.record_punch(outcome(2, Some(40), "connected directly in 40 ms", 1)).await.expect("write");
    store.record_punch(outcome(2, None, "no connection within 8 s", 2)).await.expect("write");
    store.record_punch(outcome(3, None, "no connection within 8 s", 3)).await.expect("write");
    store.close().await.expect("close");
    let store = Store::open(StoreOptions::new(&path)).expect("reopen");
    let stats = store.punch_stats().await.expect("read");
    assert_eq!(stats.len(), 2, "{stats:?}");
    let eim = &stats[0];
    assert_eq!((eim.their_nat, eim.attempts, eim.successes), (2, 2, 1));
    assert_eq!(eim.last_outcome, "no connection within 8 s", "the latest attempt is the one described");
    assert_eq!(eim.last_success_ms, Some(40), "a failure does not erase the last success's time");
    assert_eq!((stats[1].their_nat, stats[1].attempts, stats[1].successes), (3, 1, 0));
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_added_event_shows_what_a_read_shows() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let mut events = store.subscribe();
    let mut upsert = peer(node(1), 7, now_ms());
    // Duplicates and a topic breaking the rules: the event must show what is stored, not what was sent.
    upsert.topics = topics(&["b", "a", "b", "bad\u{1}topic"]);
    upsert.node_type = NodeType::Public;
    upsert.nat_type = NatType::EndpointDependent;
    assert_eq!(store.upsert_peer(upsert).await.unwrap(), UpsertOutcome::Added);

    let PeerEvent::Added(announced) = events.recv().await.unwrap() else { panic!("expected Added") };
    let page = store.list_peers(PeerQuery { limit: 10, ..PeerQuery::default() }).await.unwrap();
    assert_eq!(page.peers, vec![announced]);
    assert_eq!(page.peers[0].topics, topics(&["a", "b"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_batch_answers_and_announces_each_write_once() {
    let dir = TempDir::new().unwrap();
    let mut options = options(&dir);
    options.max_joined_topics = 1;
    let store = Store::open(options).unwrap();
    let mut events = store.subscribe();
    let now = now_ms();
    // Usually one batch: the failing join makes the writer roll back and replay it with savepoints.
    let (first, a, b, second) = tokio::join!(
        store.upsert_peer(peer(node(1), 1, now)),
        store.join_topic("a".into(), now),
        store.join_topic("b".into(), now),
        store.upsert_peer(peer(node(2), 1, now)),
    );
    assert_eq!(first.unwrap(), UpsertOutcome::Added);
    assert_eq!(second.unwrap(), UpsertOutcome::Added);
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1, "{a:?} {b:?}");

    let mut added = BTreeSet::new();
    for _ in 0..2 {
        match events.recv().await.unwrap() {
            PeerEvent::Added(summary) => assert!(added.insert(summary.node_id), "announced twice"),
            other => panic!("expected Added, got {other:?}"),
        }
    }
    assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(store.stats().await.unwrap().peers, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wal_is_checkpointed_beside_the_writer() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    let file_size = || std::fs::metadata(store.path()).map_or(0, |metadata| metadata.len());
    let before = file_size();
    let now = now_ms();
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..1500u32 {
        let store = store.clone();
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        let mut upsert = peer(NodeId(bytes), 1, now);
        upsert.record = vec![1; 200];
        writes.spawn(async move { store.upsert_peer(upsert).await });
    }
    while let Some(result) = writes.join_next().await {
        result.unwrap().unwrap();
    }
    // Without a checkpoint every page stays in the WAL (the writer's own backstop is far above this), so the
    // database file grows only once the checkpoint thread copied them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while file_size() < before + 200 * 1024 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint: {} bytes", file_size());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await.unwrap();
}

/// Copies what the database at `from` (this build's schema) holds into a new database at `to` with the schema
/// of version 2, where every table about a peer was keyed by its node id: what a node of that release would
/// have written for the same peers.
fn write_as_version_2(from: &std::path::Path, to: &std::path::Path) {
    let conn = rusqlite::Connection::open(to).unwrap();
    schema::create_old_version(&conn, 2).unwrap();
    conn.execute("ATTACH DATABASE ?1 AS new", [from.to_str().unwrap()]).unwrap();
    conn.execute_batch(
        "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type, score)
             SELECT node_id, seq, record, first_seen, last_seen, node_type, nat_type, score FROM new.peers;
         INSERT INTO peer_addresses
             (node_id, address, source, first_seen, last_success, last_failure, consecutive_failures)
             SELECT p.node_id, a.address, a.source, a.first_seen, a.last_success, a.last_failure,
                    a.consecutive_failures
             FROM new.peer_addresses a JOIN new.peers p ON p.id = a.peer;
         INSERT INTO peer_topics (node_id, topic)
             SELECT p.node_id, t.topic FROM new.peer_topics t JOIN new.peers p ON p.id = t.peer;
         INSERT INTO peer_quality
             (node_id, rtt_ewma_us, rtt_samples, successes, failures, last_error, last_error_at, last_success_at)
             SELECT p.node_id, q.rtt_ewma_us, q.rtt_samples, q.successes, q.failures, q.last_error,
                    q.last_error_at, q.last_success_at
             FROM new.peer_quality q JOIN new.peers p ON p.id = q.peer;
         INSERT INTO peer_capabilities (node_id, os, arch, cpu_cores, memory_bytes, software_version)
             SELECT p.node_id, c.os, c.arch, c.cpu_cores, c.memory_bytes, c.software_version
             FROM new.peer_capabilities c JOIN new.peers p ON p.id = c.peer;
         INSERT INTO peer_services (node_id, position, name, version, attributes)
             SELECT p.node_id, s.position, s.name, s.version, s.attributes
             FROM new.peer_services s JOIN new.peers p ON p.id = s.peer;
         INSERT INTO punch_stats SELECT * FROM new.punch_stats;
         INSERT INTO joined_topics SELECT * FROM new.joined_topics;
         INSERT INTO node_state SELECT * FROM new.node_state;
         DETACH DATABASE new;",
    )
    .unwrap();
}

/// Everything a client can read back from a store, for comparing two stores. Lists are in last-seen order:
/// the score order breaks ties by the order peers were stored in, which an upgrade does not keep.
async fn everything(
    store: &Store,
    ids: &[NodeId],
) -> (Vec<Option<PeerDetail>>, Vec<PeerPage>, Vec<PunchStats>) {
    let mut details = Vec::new();
    for id in ids {
        details.push(store.get_peer(*id).await.unwrap());
    }
    let mut pages = Vec::new();
    for topic in [None, Some("red".to_owned())] {
        let query = PeerQuery { topic, limit: 1000, ..PeerQuery::default() };
        pages.push(store.list_peers(query).await.unwrap());
    }
    (details, pages, store.punch_stats().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_2_database_is_upgraded_in_place_with_every_peer_intact() {
    let dir = TempDir::new().unwrap();
    let now = now_ms();
    // Peers with everything a peer can have, first seen in an order unlike their node ids' (the upgrade
    // numbers them by first_seen), written through this build's store.
    let ids: Vec<NodeId> = (0..40u8).map(node).collect();
    let store = open(&dir);
    for (index, id) in ids.iter().enumerate() {
        let index = index as i64;
        let mut upsert = peer(*id, 3, now - (index * 7919) % 40_000);
        upsert.topics = match index % 3 {
            0 => topics(&["red"]),
            1 => topics(&["red", "blue"]),
            _ => Vec::new(),
        };
        upsert.node_type = if index % 2 == 0 { NodeType::Public } else { NodeType::Private };
        upsert.nat_type = NatType::EndpointDependent;
        upsert.addresses = (0..index % 4)
            .map(|a| (sa(&format!("10.0.{index}.{a}:1")), AddressSource::PeerExchange))
            .collect();
        if index % 2 == 1 {
            upsert.capabilities = Some(Capabilities {
                os: "linux".into(),
                arch: "aarch64".into(),
                cpu_cores: index as u32,
                memory_bytes: 1 << 33,
                software_version: "0.2.0".into(),
            });
            upsert.services = vec![
                ServiceEntry {
                    name: "b".into(),
                    version: "1".into(),
                    attributes: vec![("k".into(), "v".into())],
                },
                ServiceEntry { name: "a".into(), version: "2".into(), attributes: Vec::new() },
            ];
        }
        store.upsert_peer(upsert).await.unwrap();
        if index % 3 != 2 {
            let outcome =
                if index % 5 == 0 { Err("refused".to_owned()) } else { Ok(Some(Duration::from_millis(30))) };
            let address = (index % 4 > 0).then(|| sa(&format!("10.0.{index}.0:1")));
            store.record_quality(*id, QualitySample { at_ms: now, address, outcome }).await.unwrap();
        }
    }
    store.join_topic("red".into(), now).await.unwrap();
    store.next_record_seq(77).await.unwrap();
    let punch = PunchOutcome {
        our_nat: 2,
        their_nat: 3,
        at_ms: now,
        time_to_connected_ms: Some(120),
        detail: "direct".into(),
    };
    store.record_punch(punch).await.unwrap();
    let expected = everything(&store, &ids).await;
    let expected_topics = store.joined_topics().await.unwrap();
    let current = store.path().to_path_buf();
    store.close().await.unwrap();
    // The fixture covers every table.
    assert!(expected.0.iter().flatten().any(|d| d.capabilities.is_some() && d.services.len() == 2));
    assert!(expected.0.iter().flatten().any(|d| d.quality.failures > 0 && d.addresses.len() == 3));
    assert!(expected.0.iter().flatten().any(|d| d.summary.score > 0.0));

    let old = dir.path().join("v2.db");
    write_as_version_2(&current, &old);
    let store = Store::open(StoreOptions::new(&old)).expect("opening a version 2 database migrates it");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.schema_version, 3);
    assert_eq!(stats.peers, ids.len() as u64);
    assert_eq!(everything(&store, &ids).await, expected);
    // Upgraded peers were numbered by first_seen, so equal scores list the peer first seen first.
    let mut by_score: Vec<&PeerSummary> = expected.0.iter().flatten().map(|d| &d.summary).collect();
    by_score.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.first_seen_ms.cmp(&b.first_seen_ms))
            .then(a.node_id.cmp(&b.node_id))
    });
    let query = PeerQuery { order: PeerOrder::Score, limit: 7, ..PeerQuery::default() };
    let walked = walk(&store, query, 7, ids.len() as u64).await;
    assert_eq!(walked, by_score.iter().map(|p| p.node_id).collect::<Vec<_>>());
    assert_eq!(store.joined_topics().await.unwrap(), expected_topics);
    assert_eq!(store.next_record_seq(0).await.unwrap(), 78);
    {
        let conn = raw_connection(&store);
        // Ids follow first_seen, and the renamed tables' foreign keys name the new peers table.
        let by_id: Vec<i64> = conn
            .prepare("SELECT first_seen FROM peers ORDER BY id")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(by_id.windows(2).all(|w| w[0] <= w[1]), "{by_id:?}");
        let dangling: i64 =
            conn.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |row| row.get(0)).unwrap();
        assert_eq!(dangling, 0);
        let old_tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE '%v3%' OR sql LIKE '%v3%'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(old_tables, 0);
    }

    // Writes work on the upgraded file: forgetting still cascades, a new peer gets a fresh id.
    assert!(store.forget_peer(ids[1]).await.unwrap());
    assert_eq!(store.upsert_peer(peer(node(200), 1, now)).await.unwrap(), UpsertOutcome::Added);
    let conn = raw_connection(&store);
    for table in ["peer_addresses", "peer_topics", "peer_quality", "peer_capabilities", "peer_services"] {
        let orphans: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE peer NOT IN (SELECT id FROM peers)"),
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0, "{table} kept rows of a forgotten peer");
    }
    assert_eq!(store.stats().await.unwrap().peers, ids.len() as u64);
    store.close().await.unwrap();
}

/// Applies `steps` (upsert, then optional quality) through `upsert_verified` on one store and through
/// `upsert_peer` then `record_quality` on another, and checks both end with the same state and events.
#[tokio::test(flavor = "multi_thread")]
async fn upsert_verified_is_an_upsert_then_its_quality_in_one_write() {
    let now = now_ms();
    let id = node(1);
    let mut first = peer(id, 5, now);
    first.topics = topics(&["a"]);
    first.addresses = vec![(sa("10.0.0.1:1"), AddressSource::Inbound)];
    let success = |address: &str, rtt_ms| QualitySample {
        at_ms: now,
        address: Some(sa(address)),
        outcome: Ok(Some(Duration::from_millis(rtt_ms))),
    };
    let mut newer = peer(id, 6, now + 10);
    newer.addresses = vec![(sa("10.0.0.2:1"), AddressSource::Inbound)];
    let mut stale = peer(id, 4, now + 20);
    stale.addresses = vec![(sa("10.0.0.3:1"), AddressSource::Inbound)];
    let steps = vec![
        (first, Some(success("10.0.0.1:1", 40)), UpsertOutcome::Added),
        (peer(id, 5, now + 5), None, UpsertOutcome::Updated),
        (newer, Some(success("10.0.0.2:1", 80)), UpsertOutcome::Updated),
        // A replayed record: neither it nor its connection counts.
        (stale, Some(success("10.0.0.3:1", 1)), UpsertOutcome::Stale { stored_seq: 6 }),
    ];

    let (one_dir, two_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let (one, two) = (open(&one_dir), open(&two_dir));
    let (mut one_events, mut two_events) = (one.subscribe(), two.subscribe());
    let writes_before = one.stats().await.unwrap().writes_committed;
    for (upsert, quality, outcome) in steps.clone() {
        assert_eq!(one.upsert_verified(upsert, quality).await.unwrap(), outcome);
    }
    // One command per call.
    assert_eq!(one.stats().await.unwrap().writes_committed - writes_before, steps.len() as u64);
    for (upsert, quality, outcome) in steps {
        let got = two.upsert_peer(upsert).await.unwrap();
        assert_eq!(got, outcome);
        if let (Some(sample), false) = (quality, matches!(got, UpsertOutcome::Stale { .. })) {
            two.record_quality(id, sample).await.unwrap();
        }
    }

    let stored = detail(&one, id).await;
    assert_eq!(stored, detail(&two, id).await);
    assert_eq!(stored.summary.seq, 6);
    assert_eq!((stored.quality.successes, stored.quality.rtt_samples), (2, 2));
    assert!(stored.summary.score > 0.0);
    let address = |a: &str| stored.addresses.iter().find(|row| row.address == sa(a)).unwrap().clone();
    assert_eq!(address("10.0.0.1:1").last_success_ms, Some(now));
    assert_eq!(stored.addresses.len(), 2, "a stale upsert stored its address");

    let mut events = (Vec::new(), Vec::new());
    while let Ok(event) = one_events.try_recv() {
        events.0.push(event);
    }
    while let Ok(event) = two_events.try_recv() {
        events.1.push(event);
    }
    assert_eq!(events.0, events.1);
    assert!(matches!(events.0[..], [PeerEvent::Added(_), PeerEvent::Updated(_), ..]), "{:?}", events.0);

    // A sample for a peer the upsert just added lands too (nothing stored before the call).
    let id = node(2);
    let outcome = one.upsert_verified(peer(id, 1, now), Some(success("10.9.9.9:1", 10))).await.unwrap();
    assert_eq!(outcome, UpsertOutcome::Added);
    assert_eq!(detail(&one, id).await.quality.successes, 1);
}
