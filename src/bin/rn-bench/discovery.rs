//! Discovery on a local Mainline network: join to first peer, and a fresh pair of daemons in both orders.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// 5. Discovery

pub(super) fn mainline_node(bootstrap: &[SocketAddr]) -> anyhow::Result<mainline::Dht> {
    Ok(mainline::Dht::builder()
        .server_mode()
        .bind_address(Ipv4Addr::LOCALHOST)
        .port(0)
        .bootstrap(bootstrap)
        .build()?)
}

pub(super) async fn peers_in_topic(daemon: &Daemon, topic: &str) -> anyhow::Result<u64> {
    let request = ListPeersRequest { topic: topic.to_owned(), page_size: 1, ..Default::default() };
    Ok(PeerServiceClient::new(daemon.channel.clone()).list_peers(request).await?.into_inner().total)
}

/// Milliseconds of one discovery run.
pub(super) struct Discovery {
    /// From JoinTopic until the new daemon stores its first verified peer.
    pub(super) first_ms: f64,
    /// Until it stores every full node.
    pub(super) all_ms: f64,
    /// A plain Mainline node's `get_peers` of the same topic, until its first batch of peers.
    pub(super) bare_ms: f64,
}

/// A local Mainline network of `sizes.dht_nodes` plain DHT nodes in this process, all bootstrapped, and the
/// address of the first (everyone's bootstrap node).
async fn local_mainline(sizes: &Sizes) -> anyhow::Result<(Vec<mainline::Dht>, SocketAddr)> {
    let first = mainline_node(&[])?;
    let bootstrap = SocketAddr::V4(first.clone().as_async().info().await.local_addr());
    let mut plain = vec![first];
    for _ in 1..sizes.dht_nodes {
        plain.push(mainline_node(&[bootstrap])?);
    }
    for node in &plain[1..] {
        anyhow::ensure!(node.clone().as_async().bootstrapped().await, "a DHT node did not bootstrap");
    }
    Ok((plain, bootstrap))
}

/// `sizes.full_nodes` real daemons that join `topic`, returned once each of them stores a peer of it.
async fn full_nodes_on_topic(
    sizes: &Sizes,
    work: &Path,
    binary: &Path,
    bootstrap: &str,
    topic: &str,
) -> anyhow::Result<Vec<Daemon>> {
    let mut full = Vec::new();
    for i in 0..sizes.full_nodes {
        let daemon = start_daemon(binary, &work.join(format!("full-{i}")), Some(bootstrap)).await?;
        TopicServiceClient::new(daemon.channel.clone())
            .join_topic(JoinTopicRequest { topic: topic.to_owned() })
            .await?;
        full.push(daemon);
    }
    // The full nodes have announced once they find each other.
    let deadline = Instant::now() + Duration::from_secs(120);
    for daemon in &full {
        while peers_in_topic(daemon, topic).await? == 0 {
            anyhow::ensure!(Instant::now() < deadline, "the full nodes did not find each other in time");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(full)
}

/// Waits until the daemon's DHT routing table holds a node.
async fn wait_dht_bootstrapped(daemon: &Daemon) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while node_info(daemon).await?.dht.unwrap_or_default().routing_table_size == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the new daemon's DHT did not bootstrap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Milliseconds from `JoinTopic` on `newcomer` until it stores its first verified peer of `topic`, and until it
/// stores `expected` of them.
async fn join_and_wait(newcomer: &Daemon, topic: &str, expected: u64) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    TopicServiceClient::new(newcomer.channel.clone())
        .join_topic(JoinTopicRequest { topic: topic.to_owned() })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first_ms = None;
    loop {
        let found = peers_in_topic(newcomer, topic).await?;
        if found > 0 && first_ms.is_none() {
            first_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        if found >= expected {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new daemon found {found} of the {expected} full nodes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok((first_ms.unwrap_or(all_ms), all_ms))
}

/// The baseline: a plain Mainline node, new to the same network, looks the topic's infohash up; the time to the
/// first batch of peers (and its size) is the least any discovery built on the DHT can take here.
async fn bare_get_peers(bootstrap: SocketAddr, topic: &str) -> anyhow::Result<(f64, usize)> {
    let bare = mainline_node(&[bootstrap])?.as_async();
    anyhow::ensure!(bare.bootstrapped().await, "the baseline DHT node did not bootstrap");
    // Idle first, as the daemon was when it joined: mainline's thread blocks on its socket for up to 50 ms
    // (its READ_TIMEOUT) before it picks up a new query, and a node still busy bootstrapping never waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut batches = bare.get_peers(remote_network::dht::topic_infohash(topic));
    let first_batch = tokio::time::timeout(Duration::from_secs(30), first_batch_size(&mut batches))
        .await
        .context("the bare get_peers found nobody in 30 s")?;
    Ok((started.elapsed().as_secs_f64() * 1000.0, first_batch))
}

/// A local Mainline network of plain DHT nodes (in this process) and real full daemons on one topic; a new
/// daemon, bootstrapped, joins the topic (see [`Discovery`]).
pub(super) async fn join_to_first_peer(
    sizes: &Sizes,
    work: &Path,
    binary: &Path,
) -> anyhow::Result<Discovery> {
    let topic = "rn-bench";
    let (plain, bootstrap_addr) = local_mainline(sizes).await?;
    let bootstrap = bootstrap_addr.to_string();
    let full = full_nodes_on_topic(sizes, work, binary, &bootstrap, topic).await?;
    println!("  {} DHT nodes and {} full nodes up, all full nodes see a peer", plain.len(), full.len());
    let newcomer = start_daemon(binary, &work.join("newcomer"), Some(&bootstrap)).await?;
    wait_dht_bootstrapped(&newcomer).await?;
    let (first_ms, all_ms) = join_and_wait(&newcomer, topic, full.len() as u64).await?;
    drop(newcomer);
    let (bare_ms, first_batch) = bare_get_peers(bootstrap_addr, topic).await?;
    println!(
        "  join -> first verified peer {first_ms:.0} ms, -> all {} peers {all_ms:.0} ms; \
         bare mainline get_peers -> first batch ({first_batch} peers) {bare_ms:.0} ms",
        full.len()
    );
    drop(full);
    drop(plain);
    Ok(Discovery { first_ms, all_ms, bare_ms })
}

/// Medians over rounds of the user's first case: two fresh daemons, started as the README shows (one serving a
/// DHT of its own, the other bootstrapping from it), then `JoinTopic` on one and, once that returned, on the
/// other; the time from the second join until the second daemon stores the first as a verified peer.
pub(super) struct FreshPair {
    /// The seed joins first, the node that bootstrapped from it second.
    pub(super) seed_first_ms: f64,
    /// The other way round.
    pub(super) seed_last_ms: f64,
}

pub(super) async fn fresh_pair_join(sizes: &Sizes, work: &Path, binary: &Path) -> anyhow::Result<FreshPair> {
    let topic = "rn-bench-fresh";
    let mut seed_first = Vec::new();
    let mut seed_last = Vec::new();
    for round in 0..sizes.fresh_pair_rounds {
        // Alternating, so that a machine getting busier or quieter shifts both orders alike.
        for seed_joins_first in [round % 2 == 0, round % 2 != 0] {
            let dir = work.join(format!("fresh-{round}-{seed_joins_first}"));
            let seed = start_daemon(binary, &dir.join("seed"), None).await?;
            let node = start_daemon(binary, &dir.join("node"), Some(&seed.dht)).await?;
            // Both DHTs settled (the node's first walk went through the seed), as after a user's two commands.
            let deadline = Instant::now() + Duration::from_secs(30);
            while node_info(&node).await?.dht.unwrap_or_default().routing_table_size == 0 {
                anyhow::ensure!(Instant::now() < deadline, "the node's DHT did not bootstrap from the seed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (first, second) = if seed_joins_first { (&seed, &node) } else { (&node, &seed) };
            let join = |daemon: &Daemon| {
                let mut client = TopicServiceClient::new(daemon.channel.clone());
                async move { client.join_topic(JoinTopicRequest { topic: topic.to_owned() }).await }
            };
            join(first).await?;
            let started = Instant::now();
            join(second).await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while peers_in_topic(second, topic).await? == 0 {
                anyhow::ensure!(Instant::now() < deadline, "the second daemon found no peer within 60 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if seed_joins_first { seed_first.push(ms) } else { seed_last.push(ms) }
        }
    }
    let spread = |values: &[f64]| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}-{max:.0}")
    };
    println!(
        "  fresh pair, join -> first verified peer: seed joins first {} ms, seed joins last {} ms ({} rounds each)",
        spread(&seed_first),
        spread(&seed_last),
        seed_first.len()
    );
    Ok(FreshPair { seed_first_ms: median(&mut seed_first), seed_last_ms: median(&mut seed_last) })
}

/// The size of the first non-empty batch a `get_peers` stream yields (0 if it ends without one).
pub(super) async fn first_batch_size(
    batches: &mut (impl tokio_stream::Stream<Item = Vec<std::net::SocketAddrV4>> + Unpin),
) -> usize {
    use tokio_stream::StreamExt;
    while let Some(batch) = batches.next().await {
        if !batch.is_empty() {
            return batch.len();
        }
    }
    0
}
