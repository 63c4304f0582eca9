//! What the node does when its disk fails it: a full file system degrades the store (writes refused with a
//! clear error, reads still served, health NOT_SERVING, no crash), and a read-only data dir stops the daemon at
//! start with an error naming the problem. Each daemon runs in a private mount namespace holding the tmpfs or
//! read-only mount, so nothing is mounted on the host. Needs root; skipped loudly without it.

mod common;

use std::time::{Duration, Instant};

use common::{NodeDir, in_mount_namespace, skip_without_root};
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::topic_service_client::TopicServiceClient;
use remote_network::api::control::{GetNodeInfoRequest, JoinTopicRequest, ListTopicsRequest, StoreHealth};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const WHY: &str = "it mounts file systems in a private mount namespace";

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_degrades_the_store_without_crashing_the_node() {
    if skip_without_root("a_full_disk_degrades_the_store_without_crashing_the_node", WHY) {
        return;
    }
    let dir = NodeDir::new();
    std::fs::create_dir_all(dir.data_dir()).expect("data dir");
    let mut cmd = dir.start_command();
    cmd.env("RN_STORE_MAX_JOINED_TOPICS", "1000000");
    let setup = format!("mount -t tmpfs -o size=512k,mode=0700 tmpfs '{}'", dir.data_dir().display());
    let node = dir.spawn_ready(in_mount_namespace(&cmd, &setup));
    let channel = dir.channel().await;
    let mut topics = TopicServiceClient::new(channel.clone());

    // Long topic names fill half a megabyte quickly.
    let mut joined = 0;
    let failure = loop {
        let topic = format!("{joined:06}-{}", "f".repeat(240));
        match topics.join_topic(JoinTopicRequest { topic }).await {
            Ok(_) => joined += 1,
            Err(status) => break status,
        }
        assert!(joined < 100_000, "the 512 KiB file system never filled");
    };
    assert_eq!(failure.code(), tonic::Code::Unavailable, "{failure:?}");
    assert!(failure.message().contains("full"), "the error says the disk is full: {}", failure.message());

    // Reads still work and the node says it is degraded.
    let listed = topics.list_topics(ListTopicsRequest {}).await.expect("reads still served").into_inner();
    assert_eq!(listed.topics.len(), joined);
    let info = NodeServiceClient::new(channel.clone())
        .get_node_info(GetNodeInfoRequest {})
        .await
        .expect("GetNodeInfo")
        .into_inner();
    let store = info.node.expect("node").store.expect("store");
    assert_eq!(store.health(), StoreHealth::Degraded);
    assert!(!store.health_detail.is_empty());

    // Health checkers see it within the node's health interval.
    let mut health = HealthClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = health
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health check")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            break;
        }
        assert!(Instant::now() < deadline, "health still {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (status, log) = node.terminate();
    assert!(status.code().is_some(), "the daemon exited by itself after SIGTERM: {status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_read_only_data_dir_stops_the_daemon_at_start_with_a_clear_error() {
    if skip_without_root("a_read_only_data_dir_stops_the_daemon_at_start_with_a_clear_error", WHY) {
        return;
    }
    let dir = NodeDir::new();
    let (status, log) = dir.start().terminate();
    assert!(status.success(), "{log}");

    let data = dir.data_dir().display().to_string();
    let setup = format!("mount --bind '{data}' '{data}'; mount -o remount,bind,ro '{data}'");
    let (status, log) = dir.run_expecting_failure(in_mount_namespace(&dir.start_command(), &setup));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("Read-only file system") || log.contains("read-only"), "{log}");
    assert!(log.contains(&data), "the error names the place: {log}");
    assert!(!log.contains("panicked"), "{log}");
}
