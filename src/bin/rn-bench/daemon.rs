//! The real daemon under the bench: starting it, reading its memory, and memory per idle connected peer.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// Daemons

pub(super) fn daemon_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let daemon = exe.with_file_name("remote-network");
    // Under `cargo run` the daemon is (re)built with the same profile, so that it is never older than the tree.
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = exe.parent().and_then(Path::file_name).is_some_and(|n| n == "release");
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--bin", "remote-network"]);
        if release {
            build.arg("--release");
        }
        let status = build.status()?;
        if !status.success() {
            bail!("could not build {}", daemon.display());
        }
    }
    if !daemon.exists() {
        bail!("{} is missing: build it with `cargo build --release --bin remote-network`", daemon.display());
    }
    Ok(daemon)
}

pub(super) struct Daemon {
    pub(super) child: Child,
    pub(super) channel: Channel,
    pub(super) quic: SocketAddr,
    pub(super) dht: String,
    /// The monitoring endpoint (`/metrics`, `/debug/pprof/heap`).
    pub(super) monitoring: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signals the child we started, by its id.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) async fn start_daemon(
    binary: &Path,
    dir: &Path,
    bootstrap: Option<&str>,
) -> anyhow::Result<Daemon> {
    let (mut command, paths) = remote_network::loopback::command(binary, dir, bootstrap)?;
    // Quiet daemons: their logs are not what is measured.
    command.env("RN_LOG_LEVEL", "warn").env_remove("RUST_LOG");
    let mut child = command.spawn().context("cannot start the daemon")?;
    let channel = remote_network::loopback::wait_ready(&mut child, &paths, Duration::from_secs(30)).await?;
    let mut daemon =
        Daemon { child, channel, quic: loopback(), dht: String::new(), monitoring: String::new() };
    let info = node_info(&daemon).await?;
    let listen = info.listen.unwrap_or_default();
    daemon.quic = listen.quic.parse().context("the daemon's QUIC address")?;
    daemon.dht = listen.dht;
    daemon.monitoring = listen.monitoring;
    Ok(daemon)
}

pub(super) async fn node_info(daemon: &Daemon) -> anyhow::Result<remote_network::api::control::NodeInfo> {
    let info = NodeServiceClient::new(daemon.channel.clone()).get_node_info(GetNodeInfoRequest {}).await?;
    info.into_inner().node.context("GetNodeInfo without a node")
}

/// Threads of a process: each costs a stack and jemalloc thread cache, which count in RSS.
pub(super) fn threads(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("Threads:")).context("no Threads")?;
    Ok(line.split_whitespace().nth(1).context("Threads value")?.parse()?)
}

/// One field of `/proc/<pid>/status` in KiB (`VmRSS`, `RssAnon`, `RssFile`).
pub(super) fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
        .with_context(|| format!("no {field}"))?;
    let kib: f64 = line.split_whitespace().nth(1).with_context(|| format!("{field} value"))?.parse()?;
    Ok(kib)
}

pub(super) fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    status_kib(pid, "VmRSS")
}

/// One plain HTTP/1.0 GET on the daemon's monitoring endpoint (loopback, no TLS): the body.
pub(super) async fn http_get(address: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&reply[..split]);
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "GET {path}: {head}"
    );
    Ok(reply[split + 4..].to_vec())
}

/// jemalloc's view of the daemon's heap (from `/metrics`), in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Heap {
    /// Bytes the program holds (`stats.allocated`).
    pub(super) allocated: f64,
    /// Pages holding them (`stats.active`): allocated plus fragmentation inside pages.
    pub(super) active: f64,
    /// Resident pages jemalloc maps, dirty (freed but not yet returned) ones included.
    pub(super) resident: f64,
    pub(super) metadata: f64,
}

pub(super) async fn heap_kib(daemon: &Daemon) -> anyhow::Result<Heap> {
    let body = http_get(&daemon.monitoring, "/metrics").await?;
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .with_context(|| format!("/metrics has no {name}"))?;
        let bytes: f64 = line.split_whitespace().nth(1).context("metric value")?.parse()?;
        Ok(bytes / 1024.0)
    };
    Ok(Heap {
        allocated: value("jemalloc_allocated_bytes")?,
        active: value("jemalloc_active_bytes")?,
        resident: value("jemalloc_resident_bytes")?,
        metadata: value("jemalloc_metadata_bytes")?,
    })
}

/// RSS and heap, once they have settled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Memory {
    pub(super) rss: f64,
    pub(super) heap: Heap,
    pub(super) threads: u32,
    /// Resident pages of files (the binary's code, mostly): paged in once, when code first runs.
    pub(super) file: f64,
}

/// Median of a few RSS readings a little apart (the daemon's background work makes single readings jumpy),
/// after waiting long enough for jemalloc to return the pages freed by the handshakes just done: its dirty
/// pages decay over `dirty_decay_ms` (10 s by default), and until then they count in RSS although nothing
/// uses them.
pub(super) async fn settled(daemon: &Daemon) -> anyhow::Result<Memory> {
    const DIRTY_DECAY: Duration = Duration::from_secs(12);
    let pid = daemon.child.id();
    tokio::time::sleep(DIRTY_DECAY).await;
    let mut readings = Vec::new();
    for _ in 0..5 {
        readings.push(rss_kib(pid)?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Memory {
        rss: median(&mut readings),
        heap: heap_kib(daemon).await?,
        threads: threads(pid)?,
        file: status_kib(pid, "RssFile")?,
    })
}

/// Saves the daemon's heap profile (gzipped pprof) as `<dir>/heap-<peers>.pb.gz` when `RN_BENCH_HEAP_DIR` is
/// set: `monitoring/heap-profiles diff` between two of them shows where the bytes of the added peers went.
pub(super) async fn save_heap_profile(daemon: &Daemon, peers: usize) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("RN_BENCH_HEAP_DIR") else { return Ok(()) };
    let profile = http_get(&daemon.monitoring, "/debug/pprof/heap").await?;
    let path = Path::new(&dir).join(format!("heap-{peers}.pb.gz"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(&path, profile).with_context(|| format!("cannot write {}", path.display()))?;
    println!("  heap profile: {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 3. Memory

/// Connects `clients[from..to]` to the daemon, `concurrency` at a time, and returns their connections.
pub(super) async fn connect_clients(
    clients: &Arc<Vec<Client>>,
    (from, to): (usize, usize),
    concurrency: usize,
    daemon: &Daemon,
) -> anyhow::Result<Vec<Held>> {
    let quic = daemon.quic;
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (clients, next) = (clients.clone(), next.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok::<_, anyhow::Error>(held);
                }
                held.push(client_exchange(&clients[i], quic).await?);
            }
        });
    }
    let mut kept = Vec::new();
    while let Some(result) = tasks.join_next().await {
        kept.extend(result??);
    }
    Ok(kept)
}

/// Waits until the daemon reports `wanted` connected peers (or, with `at_most`, no more than that).
pub(super) async fn wait_connected(daemon: &Daemon, wanted: usize, at_most: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected = node_info(daemon).await?.connected_peers as usize;
        if (at_most && connected <= wanted) || (!at_most && connected >= wanted) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon holds {connected} sessions, waiting for {wanted}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RSS of a real daemon with 0, then `idle_peers[0]`, then `idle_peers[1]` idle connected peers (lightweight
/// clients in this process that do the real exchange and keep their connection). KiB per peer from 0 to the
/// largest count. jemalloc's allocated bytes are shown alongside: RSS minus heap is code, stacks, SQLite's
/// cache and pages the allocator keeps.
///
/// The 0-peer reading is taken after a warm-up round of connections that come and go: the first connections
/// of a process page in the QUIC and TLS code (file-backed RSS), make jemalloc set up arenas and thread caches
/// for the threads that serve them (its metadata), and grow tables that stay grown. Those costs are paid once,
/// whatever the number of peers, and would otherwise be charged to the measured peers (about 30 KiB each when
/// only 100 are measured).
pub(super) async fn memory_per_peer(sizes: &Sizes, work: &Path, binary: &Path) -> anyhow::Result<f64> {
    let daemon = start_daemon(binary, &work.join("memory"), None).await?;
    let warm_up = 2 * sizes.concurrency;
    let total = sizes.idle_peers[1];
    let clients = Arc::new((0..warm_up + total).map(|_| new_client()).collect::<anyhow::Result<Vec<_>>>()?);
    let cold = settled(&daemon).await?;
    let passing = connect_clients(&clients, (0, warm_up), sizes.concurrency, &daemon).await?;
    wait_connected(&daemon, warm_up, false).await?;
    for held in &passing {
        held.connection.close(0u32.into(), b"warm-up done");
    }
    drop(passing);
    wait_connected(&daemon, 0, true).await?;
    let base = settled(&daemon).await?;
    let show = |count: usize, m: &Memory| {
        let per = |now: f64, then: f64| if count == 0 { 0.0 } else { (now - then) / count as f64 };
        println!(
            "  {count} peers: RSS {:.0} KiB ({:.2}/peer), jemalloc allocated {:.0} KiB ({:.2}/peer), \
             active {:.0}, resident {:.0}, metadata {:.0}; {} threads, file-backed RSS {:.0} KiB",
            m.rss,
            per(m.rss, base.rss),
            m.heap.allocated,
            per(m.heap.allocated, base.heap.allocated),
            m.heap.active,
            m.heap.resident,
            m.heap.metadata,
            m.threads,
            m.file,
        );
    };
    println!(
        "  before warm-up: RSS {:.0} KiB, jemalloc allocated {:.0} KiB, metadata {:.0}, file-backed RSS {:.0} KiB",
        cold.rss, cold.heap.allocated, cold.heap.metadata, cold.file
    );
    show(0, &base);
    save_heap_profile(&daemon, 0).await?;
    let mut kept = Vec::new();
    let mut readings = vec![(0usize, base)];
    let mut done = 0;
    for &count in &sizes.idle_peers {
        kept.extend(
            connect_clients(&clients, (warm_up + done, warm_up + count), sizes.concurrency, &daemon).await?,
        );
        done = count;
        wait_connected(&daemon, count, false).await?;
        let memory = settled(&daemon).await?;
        show(count, &memory);
        save_heap_profile(&daemon, count).await?;
        readings.push((count, memory));
    }
    let (small, large) = (readings[1], readings[2]);
    let marginal = |f: fn(&Memory) -> f64| (f(&large.1) - f(&small.1)) / (large.0 - small.0) as f64;
    println!(
        "  marginal from {} to {} peers: RSS {:.2} KiB/peer, jemalloc allocated {:.2} KiB/peer",
        small.0,
        large.0,
        marginal(|m| m.rss),
        marginal(|m| m.heap.allocated),
    );
    println!(
        "  from the cold start (the previous definition of the figure): RSS {:.2} KiB/peer",
        (large.1.rss - cold.rss) / large.0 as f64
    );
    for held in &kept {
        held.connection.close(0u32.into(), b"done");
    }
    drop(kept);
    drop(daemon);
    for client in clients.iter() {
        client.endpoint.close().await;
    }
    Ok((large.1.rss - base.rss) / large.0 as f64)
}
