//! `remote-network devnet`: a whole network on this machine, offline, in one command.
//!
//! It starts N real daemons (this same binary, `start`) on loopback, each with its own temporary data dir and
//! control socket. Node 1 starts a DHT of its own (`--dht-server --no-bootstrap`); the others bootstrap from
//! it, so nothing outside the machine is ever contacted. All join one topic. The screen then shows, live, which
//! node has verified which; Ctrl-C stops every daemon gracefully and removes the directory.
//!
//! This module belongs to the binary (it drives processes and prints), so it reports errors with `anyhow`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use remote_network::api::client::connect_unix;
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::peer_service_client::PeerServiceClient;
use remote_network::api::control::{GetNodeInfoRequest, ListPeersRequest};

/// How long a daemon may take to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the summary is redrawn: a display refresh, as watch(1) does, not a wait for a state change.
const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// One daemon of the devnet.
struct DevNode {
    label: String,
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
    node_id: String,
    dht: String,
}

/// The running devnet; dropping it kills whatever still runs and removes the directory.
struct Devnet {
    dir: PathBuf,
    nodes: Vec<DevNode>,
}

impl Drop for Devnet {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the devnet until Ctrl-C (or `stop_after`, for scripted use), printing its summary. With
/// `until_verified` it stops as soon as every node verified every other, and fails if `stop_after` passes first.
pub fn run(
    nodes: usize,
    topic: &str,
    stop_after: Option<Duration>,
    until_verified: bool,
) -> anyhow::Result<()> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    remote_network::api::names::validate_topic(topic).map_err(|e| anyhow::anyhow!("--topic: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("runtime")?;
    runtime.block_on(async move {
        let signal =
            remote_network::lifecycle::shutdown_signals().context("cannot install the Ctrl-C handler")?;
        let dir = std::env::temp_dir().join(format!("rn-devnet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut devnet = Devnet { dir: dir.clone(), nodes: Vec::new() };
        let started = Instant::now();
        println!("devnet: {nodes} nodes on loopback, topic {topic:?}, files in {}", dir.display());

        for index in 1..=nodes {
            let bootstrap = devnet.nodes.first().map(|first: &DevNode| first.dht.clone());
            let node = start_node(&dir, index, topic, bootstrap.as_deref()).await?;
            println!("  {}  {}  rnctl --socket {}", node.label, node.node_id, node.socket.display());
            devnet.nodes.push(node);
        }
        println!("  logs: {}/n*/daemon.log; Ctrl-C stops everything\n", dir.display());

        let mut last_summary = String::new();
        let mut complete = false;
        tokio::pin!(signal);
        loop {
            let summary = summarize(&devnet, topic).await;
            if summary.text != last_summary {
                print!("[{:>5.1}s]\n{}", started.elapsed().as_secs_f64(), summary.text);
                last_summary = summary.text;
            }
            if summary.all_verified && !complete {
                complete = true;
                println!("all {nodes} nodes verified each other in {:.1}s", started.elapsed().as_secs_f64());
                if until_verified {
                    break;
                }
            }
            for node in &mut devnet.nodes {
                if let Ok(Some(status)) = node.child.try_wait() {
                    bail!("{} exited with {status}; see {}/daemon.log", node.label, node.dir.display());
                }
            }
            if stop_after.is_some_and(|limit| started.elapsed() >= limit) {
                if until_verified {
                    stop(&mut devnet).await;
                    bail!("not every node verified every other within {:?}", stop_after.unwrap_or_default());
                }
                break;
            }
            tokio::select! {
                name = &mut signal => {
                    println!("{name}: stopping the devnet");
                    break;
                }
                _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
            }
        }
        stop(&mut devnet).await;
        Ok(())
    })
}

/// Starts one daemon and waits until its control API answers.
async fn start_node(
    dir: &Path,
    index: usize,
    topic: &str,
    bootstrap: Option<&str>,
) -> anyhow::Result<DevNode> {
    let label = format!("n{index}");
    let node_dir = dir.join(&label);
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let (mut command, paths) = remote_network::loopback::command(&exe, &node_dir, bootstrap)?;
    let mut child = command.spawn().context("cannot start a daemon")?;
    let channel = remote_network::loopback::wait_ready(&mut child, &paths, START_TIMEOUT)
        .await
        .with_context(|| format!("{label} did not start"))?;
    let socket = paths.socket;
    let info = NodeServiceClient::new(channel.clone())
        .get_node_info(GetNodeInfoRequest {})
        .await
        .context("GetNodeInfo")?
        .into_inner()
        .node
        .unwrap_or_default();
    let mut topics = remote_network::api::control::topic_service_client::TopicServiceClient::new(channel);
    topics
        .join_topic(remote_network::api::control::JoinTopicRequest { topic: topic.to_owned() })
        .await
        .context("JoinTopic")?;
    let dht = info.listen.map(|l| l.dht).unwrap_or_default();
    Ok(DevNode { label, dir: node_dir, socket, child, node_id: info.node_id, dht })
}

struct Summary {
    text: String,
    all_verified: bool,
}

/// One line per node: which of the other devnet nodes it holds a verified record of.
async fn summarize(devnet: &Devnet, topic: &str) -> Summary {
    let mut text = String::new();
    let mut all_verified = true;
    for node in &devnet.nodes {
        let verified = verified_peers(&node.socket, topic).await;
        let others: Vec<&str> = devnet
            .nodes
            .iter()
            .filter(|other| other.node_id != node.node_id && verified.contains(&other.node_id))
            .map(|other| other.label.as_str())
            .collect();
        let expected = devnet.nodes.len() - 1;
        all_verified &= others.len() == expected;
        text.push_str(&format!(
            "  {} verified {}/{}: {}\n",
            node.label,
            others.len(),
            expected,
            others.join(" ")
        ));
    }
    Summary { text, all_verified }
}

/// Node ids of the peers of `topic` whose signed record the node holds.
async fn verified_peers(socket: &Path, topic: &str) -> BTreeSet<String> {
    let Ok(channel) = connect_unix(socket).await else { return BTreeSet::new() };
    let request = ListPeersRequest { topic: topic.to_owned(), page_size: 1000, ..Default::default() };
    match PeerServiceClient::new(channel).list_peers(request).await {
        Ok(page) => page.into_inner().peers.into_iter().filter(|p| p.seq > 0).map(|p| p.node_id).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// How long a daemon may take to stop (it flushes its store) before the devnet gives up waiting for it.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// SIGTERM to every daemon, then wait for each (they flush their stores).
async fn stop(devnet: &mut Devnet) {
    for node in &devnet.nodes {
        if let Ok(pid) = i32::try_from(node.child.id()) {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    for node in &mut devnet.nodes {
        match tokio::time::timeout(STOP_TIMEOUT, remote_network::loopback::exited(&mut node.child)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("cannot wait for {}: {e}", node.label),
            Err(_) => eprintln!(
                "{} did not stop within {STOP_TIMEOUT:?}; see {}/daemon.log",
                node.label,
                node.dir.display()
            ),
        }
    }
}
