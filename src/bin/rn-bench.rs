//! `rn-bench`: the performance harness (issue 6). Every figure is a count of round trips or a ratio against a
//! baseline measured in the same run, so that shared, noisy machines still give comparable numbers.
//!
//! ```sh
//! cargo run --release --bin rn-bench -- --quick --json bench.json
//! ```
//!
//! The memory, ListPeers and discovery figures run the real daemon binary (`remote-network`, next to this
//! program; under `cargo run` it is built first with the same profile).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::peer_service_client::PeerServiceClient;
use remote_network::api::control::topic_service_client::TopicServiceClient;
use remote_network::api::control::{GetNodeInfoRequest, JoinTopicRequest, ListPeersRequest};
use remote_network::exchange::record::{RecordPublisher, upsert_from_record};
use remote_network::exchange::session::{EnvelopeReader, write_envelope};
use remote_network::exchange::{Exchange, ExchangeOptions};
use remote_network::quic::{QuicEndpoint, QuicLimits};
use remote_network::store::{AddressSource, PeerEvent, PeerUpsert, Store, StoreOptions};
use remote_network::wire::{self, VerifyPolicy, pb};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const USAGE: &str =
    "usage: rn-bench [--quick] [--json FILE] [--only contact|handshake|memory|store|discovery]";

/// One part of the benchmark; `--only` runs just that one while iterating on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Contact,
    Handshake,
    Memory,
    Store,
    Discovery,
}

impl Section {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "contact" => Self::Contact,
            "handshake" => Self::Handshake,
            "memory" => Self::Memory,
            "store" => Self::Store,
            "discovery" => Self::Discovery,
            other => bail!("unknown section {other:?}; {USAGE}"),
        })
    }
}

/// Sizes of one run.
struct Sizes {
    contact_trials: usize,
    contact_delay: Duration,
    handshakes: usize,
    handshake_rounds: usize,
    concurrency: usize,
    idle_peers: [usize; 2],
    store_peers: usize,
    list_repeats: usize,
    dht_nodes: usize,
    full_nodes: usize,
    /// Fresh pairs of daemons per join order.
    fresh_pair_rounds: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                contact_trials: 5,
                contact_delay: Duration::from_millis(50),
                handshakes: 300,
                handshake_rounds: 2,
                concurrency: 16,
                idle_peers: [100, 400],
                store_peers: 20_000,
                list_repeats: 15,
                dht_nodes: 20,
                full_nodes: 5,
                fresh_pair_rounds: 3,
            }
        } else {
            Self {
                contact_trials: 15,
                contact_delay: Duration::from_millis(50),
                handshakes: 1000,
                handshake_rounds: 3,
                concurrency: 16,
                idle_peers: [100, 1000],
                store_peers: 100_000,
                list_repeats: 30,
                dht_nodes: 50,
                full_nodes: 10,
                fresh_pair_rounds: 7,
            }
        }
    }
}

/// One reported figure.
struct Figure {
    key: &'static str,
    value: f64,
    goal: &'static str,
    met: Option<bool>,
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut json: Option<PathBuf> = None;
    let mut only: Option<Section> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = Some(args.next().context("--json needs a file name")?.into()),
            "--only" => {
                let name = args.next().context("--only needs a section name")?;
                only = Some(Section::parse(&name)?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let figures = runtime.block_on(run(Sizes::new(quick), only))?;
    runtime.shutdown_timeout(Duration::from_secs(2));

    println!();
    println!("{:<28} {:>14}  {:<12} met?", "figure", "value", "goal");
    for f in &figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("{:<28} {:>14.3}  {:<12} {met}", f.key, f.value, f.goal);
    }
    if let Some(path) = json {
        let body: Vec<String> =
            figures.iter().map(|f| format!("  \"{}\": {}", f.key, json_number(f.value))).collect();
        std::fs::write(&path, format!("{{\n{}\n}}\n", body.join(",\n")))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn json_number(value: f64) -> String {
    if value.is_finite() { format!("{value:.4}") } else { "-1".to_owned() }
}

async fn run(sizes: Sizes, only: Option<Section>) -> anyhow::Result<Vec<Figure>> {
    let work = std::env::temp_dir().join(format!("rn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&sizes, &work, only).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_in(sizes: &Sizes, work: &Path, only: Option<Section>) -> anyhow::Result<Vec<Figure>> {
    let runs = |section| only.is_none_or(|only| only == section);
    let mut figures = Vec::new();
    if runs(Section::Contact) {
        println!("== 1. first contact through a {:?}-each-way UDP delay", sizes.contact_delay);
        let (dialer, listener) = first_contact(sizes, work).await.context("first contact")?;
        figures.push(Figure {
            key: "first_contact_rtt_dialer",
            value: dialer,
            goal: "<= 1.1",
            met: Some(dialer <= 1.1),
        });
        figures.push(Figure { key: "first_contact_rtt_listener", value: listener, goal: "-", met: None });
    }

    if runs(Section::Handshake) {
        println!("== 2. handshake throughput: exchange vs bare QUIC handshake");
        let ratio = handshake_ratio(sizes, work).await.context("handshake throughput")?;
        figures.push(Figure {
            key: "handshake_ratio",
            value: ratio,
            goal: ">= 0.85",
            met: Some(ratio >= 0.85),
        });
    }

    let daemon = daemon_binary()?;

    if runs(Section::Memory) {
        println!("== 3. memory per idle connected peer");
        let kib = memory_per_peer(sizes, work, &daemon).await.context("memory")?;
        figures.push(Figure { key: "kib_per_peer", value: kib, goal: "<= 16", met: Some(kib <= 16.0) });
    }

    if runs(Section::Store) {
        println!("== 4. store");
        let (upsert_ratio, upserts_per_s, db) = store_upserts(sizes, work).await.context("store upserts")?;
        figures.push(Figure {
            key: "store_upsert_ratio",
            value: upsert_ratio,
            goal: ">= 0.7",
            met: Some(upsert_ratio >= 0.7),
        });
        figures.push(Figure {
            key: "store_upserts_per_s",
            value: upserts_per_s,
            goal: ">= 100000",
            met: Some(upserts_per_s >= 100_000.0),
        });
        let list = list_page_ratio(sizes, work, &daemon, &db).await.context("ListPeers page")?;
        figures.push(Figure { key: "list_page_ratio", value: list, goal: "<= 2", met: Some(list <= 2.0) });
    }

    if runs(Section::Discovery) {
        println!("== 5. discovery on a local Mainline network");
        let join = join_to_first_peer(sizes, work, &daemon).await.context("discovery")?;
        figures.push(Figure { key: "join_to_first_peer_ms", value: join.first_ms, goal: "-", met: None });
        figures.push(Figure { key: "join_to_all_peers_ms", value: join.all_ms, goal: "-", met: None });
        figures.push(Figure {
            key: "bare_get_peers_first_batch_ms",
            value: join.bare_ms,
            goal: "-",
            met: None,
        });
        let fresh = fresh_pair_join(sizes, work, &daemon).await.context("fresh pair")?;
        let slower = fresh.seed_first_ms.max(fresh.seed_last_ms);
        figures.push(Figure {
            key: "fresh_join_first_peer_ms",
            value: slower,
            goal: "<= 1000",
            met: Some(slower <= 1000.0),
        });
        figures.push(Figure {
            key: "fresh_join_seed_first_ms",
            value: fresh.seed_first_ms,
            goal: "-",
            met: None,
        });
        figures.push(Figure {
            key: "fresh_join_seed_last_ms",
            value: fresh.seed_last_ms,
            goal: "-",
            met: None,
        });
    }
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_key() -> SigningKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    SigningKey::from_bytes(&bytes)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() { f64::NAN } else { values[values.len() / 2] }
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A signed record of a lightweight client (one topic, one address), as a real node would send it.
fn client_record(key: &SigningKey, topic: &str, address: &str) -> pb::SignedRecord {
    let body = pb::RecordBody {
        node_id: key.verifying_key().to_bytes().to_vec(),
        seq: 1,
        timestamp_ms: now_ms(),
        topics: vec![topic.to_owned()],
        addresses: vec![pb::Address { address: address.to_owned(), ..Default::default() }],
        protocol_versions: vec![wire::PROTOCOL_VERSION],
        ..Default::default()
    };
    wire::sign_record(&body, key)
}

/// A lightweight client: its own QUIC endpoint and signed record.
struct Client {
    endpoint: QuicEndpoint,
    record: pb::SignedRecord,
}

fn client_limits() -> QuicLimits {
    QuicLimits {
        keep_alive: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(120),
        ..QuicLimits::default()
    }
}

fn new_client() -> anyhow::Result<Client> {
    let key = new_key();
    let endpoint = QuicEndpoint::bind(loopback(), &key, client_limits())?;
    let address = endpoint.local_addr()?.to_string();
    Ok(Client { endpoint, record: client_record(&key, "bench", &address) })
}

/// What a client keeps of an exchanged connection so that it stays open.
struct Held {
    connection: quinn::Connection,
    _send: quinn::SendStream,
    _reader: EnvelopeReader,
}

/// The dialer's side of the exchange protocol, as `Exchange::run_outbound` does it: handshake, accept the
/// listener's stream, read and verify its `Hello` (sent at 0.5-RTT), answer with our own `Hello`.
async fn client_exchange(client: &Client, address: SocketAddr) -> anyhow::Result<Held> {
    let outbound = client.endpoint.connect(address, None).await?;
    let connection = outbound.connection;
    let (mut send, recv) = connection.accept_bi().await?;
    let mut reader = EnvelopeReader::new(recv);
    let envelope = reader.next().await?.context("the listener finished the stream")?;
    let Some(pb::envelope::Kind::Hello(hello)) = envelope.kind else {
        bail!("the first message was not a Hello");
    };
    let signed = hello.record.context("Hello without a record")?;
    wire::verify_record(&signed, Some(outbound.node_id), &VerifyPolicy::at(now_ms()))?;
    let ours = pb::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        supported_versions: vec![wire::PROTOCOL_VERSION],
        record: Some(client.record.clone()),
        observed_address: address.to_string(),
    };
    let envelope = pb::Envelope { request_id: 0, kind: Some(pb::envelope::Kind::Hello(ours)) };
    write_envelope(&mut send, &envelope).await?;
    Ok(Held { connection, _send: send, _reader: reader })
}

/// A full node in this process: store, record publisher and exchange on its own QUIC endpoint.
struct LocalNode {
    exchange: Exchange,
    store: Store,
    shutdown: CancellationToken,
}

impl LocalNode {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let store = Store::open(StoreOptions::new(dir.join("peers.db")))?;
        let key = new_key();
        let endpoint = QuicEndpoint::bind(loopback(), &key, QuicLimits::default())?;
        let publisher =
            RecordPublisher::start(key, store.clone(), endpoint.local_addr()?, Vec::new(), 0).await?;
        let shutdown = CancellationToken::new();
        let exchange =
            Exchange::start(endpoint, store.clone(), publisher, ExchangeOptions::default(), shutdown.clone());
        Ok(Self { exchange, store, shutdown })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.exchange.shutdown().await;
        let _ = self.store.close().await;
    }
}

/// A user-space UDP forwarder: every datagram is held for `delay` in each direction, in order (one FIFO queue
/// per direction, so that equal delays never reorder datagrams). Serves one client.
async fn delay_forwarder(target: SocketAddr, delay: Duration) -> anyhow::Result<SocketAddr> {
    type Queue = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>, Option<SocketAddr>)>;
    fn sender(socket: Arc<UdpSocket>) -> Queue {
        let (queue, mut due) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>, Option<SocketAddr>)>();
        tokio::spawn(async move {
            while let Some((at, datagram, to)) = due.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = match to {
                    Some(to) => socket.send_to(&datagram, to).await,
                    None => socket.send(&datagram).await,
                };
            }
        });
        queue
    }
    let front = Arc::new(UdpSocket::bind(loopback()).await?);
    let back = Arc::new(UdpSocket::bind(loopback()).await?);
    back.connect(target).await?;
    let address = front.local_addr()?;
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let to_target = sender(back.clone());
    let to_client = sender(front.clone());
    {
        let (front, client) = (front.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((len, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(from);
                let _ = to_target.send((tokio::time::Instant::now() + delay, buf[..len].to_vec(), None));
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(len) = back.recv(&mut buf).await {
            let Some(to) = *client.lock().unwrap_or_else(std::sync::PoisonError::into_inner) else {
                continue;
            };
            let _ = to_client.send((tokio::time::Instant::now() + delay, buf[..len].to_vec(), Some(to)));
        }
    });
    Ok(address)
}

/// Waits for the store event that adds `peer`; returns when it came.
async fn wait_added(
    mut events: tokio::sync::broadcast::Receiver<PeerEvent>,
    peer: remote_network::api::names::NodeId,
) -> anyhow::Result<Instant> {
    loop {
        match events.recv().await {
            Ok(PeerEvent::Added(s) | PeerEvent::Updated(s)) if s.node_id == peer => return Ok(Instant::now()),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => bail!("store events ended: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// 1. First contact

/// Two real in-process nodes (the library's `Exchange`, store included), the listener behind the delay
/// forwarder. Both sides are timed from the dialer's dial start until the record is committed to that side's
/// store (a store event), i.e. until the node holds the verified record. In RTTs of 2 × delay.
async fn first_contact(sizes: &Sizes, work: &Path) -> anyhow::Result<(f64, f64)> {
    let rtt = 2.0 * sizes.contact_delay.as_secs_f64();
    let (mut dialer_rtts, mut listener_rtts, mut verified_rtts) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..sizes.contact_trials {
        let a = LocalNode::start(&work.join(format!("contact-{trial}-a"))).await?;
        let b = LocalNode::start(&work.join(format!("contact-{trial}-b"))).await?;
        let forwarder = delay_forwarder(b.exchange.local_addr()?, sizes.contact_delay).await?;
        let a_holds = tokio::spawn(wait_added(a.store.subscribe(), b.exchange.node_id()));
        let b_holds = tokio::spawn(wait_added(b.store.subscribe(), a.exchange.node_id()));
        let started = Instant::now();
        let verified = a.exchange.connect(forwarder, AddressSource::Manual).await?;
        let timeout = Duration::from_secs(10);
        let a_at = tokio::time::timeout(timeout, a_holds).await???;
        let b_at = tokio::time::timeout(timeout, b_holds).await???;
        let d = (a_at - started).as_secs_f64() / rtt;
        let l = (b_at - started).as_secs_f64() / rtt;
        let v = verified.elapsed.as_secs_f64() / rtt;
        println!(
            "  trial {trial}: dialer verified {v:.3} RTT, stored {d:.3} RTT; listener stored {l:.3} RTT"
        );
        dialer_rtts.push(d);
        listener_rtts.push(l);
        verified_rtts.push(v);
        a.stop().await;
        b.stop().await;
    }
    println!(
        "  median: dialer verified {:.3} RTT, dialer stored {:.3} RTT, listener stored {:.3} RTT (RTT = {:.0} ms)",
        median(&mut verified_rtts),
        median(&mut dialer_rtts),
        median(&mut listener_rtts),
        rtt * 1000.0
    );
    Ok((median(&mut dialer_rtts), median(&mut listener_rtts)))
}

// ---------------------------------------------------------------------------------------------------------
// 2. Handshake throughput

/// Dials `clients` to `address` with `concurrency` dials in flight, with `dial` per client; returns the
/// connections to keep them open.
async fn dial_all<T, F, Fut>(
    clients: &Arc<Vec<Client>>,
    concurrency: usize,
    dial: F,
) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Arc<Vec<Client>>, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (clients, next, dial) = (clients.clone(), next.clone(), dial.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= clients.len() {
                    return Ok::<_, anyhow::Error>(held);
                }
                held.push(dial(clients.clone(), i).await?);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok(all)
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Exchanges per second (a real `Exchange` listener: verification and store included) over bare
/// authenticated QUIC handshakes per second (a `QuicEndpoint` listener with the same TLS config that only
/// awaits authentication), the same pre-built clients dialing both, counted until the listener side has
/// completed all of them. Best round of each.
async fn handshake_ratio(sizes: &Sizes, work: &Path) -> anyhow::Result<f64> {
    let n = sizes.handshakes;
    let clients = Arc::new((0..n).map(|_| new_client()).collect::<anyhow::Result<Vec<_>>>()?);
    let (mut best_bare, mut best_ours) = (0.0f64, 0.0f64);
    for round in 0..sizes.handshake_rounds {
        // Alternate which loop runs first, so that neither always gets the warmer (or cooler) machine.
        let (bare, ours) = if round % 2 == 0 {
            let bare = bare_round(sizes, &clients).await?;
            (bare, exchange_round(sizes, &clients, work, round).await?)
        } else {
            let ours = exchange_round(sizes, &clients, work, round).await?;
            (bare_round(sizes, &clients).await?, ours)
        };
        println!("  round {round}: bare {bare:.0}/s, exchange {ours:.0}/s, ratio {:.3}", ours / bare);
        best_bare = best_bare.max(bare);
        best_ours = best_ours.max(ours);
    }
    for client in clients.iter() {
        client.endpoint.close().await;
    }
    println!("  best: bare {best_bare:.0}/s, exchange {best_ours:.0}/s");
    Ok(best_ours / best_bare)
}

/// Says when the listener answered dials with a QUIC Retry: each costs the dialer a round trip, so the
/// figures are only comparable when neither loop (or both alike) crossed the admission thresholds.
fn report_retries(listener: &str, retries: u64) {
    if retries > 0 {
        println!(
            "  ({listener} listener sent {retries} QUIC Retries: its admission thresholds were crossed)"
        );
    }
}

/// Bare: the listener only completes the authenticated handshake (same endpoint code, same TLS config).
async fn bare_round(sizes: &Sizes, clients: &Arc<Vec<Client>>) -> anyhow::Result<f64> {
    let n = clients.len();
    let key = new_key();
    let server = QuicEndpoint::bind(loopback(), &key, QuicLimits::default())?;
    let address = server.local_addr()?;
    let authenticated = Arc::new(AtomicU64::new(0));
    {
        let (server, authenticated) = (server.clone(), authenticated.clone());
        tokio::spawn(async move {
            while let Some(inbound) = server.accept().await {
                let Ok(mut inbound) = inbound else { continue };
                let authenticated = authenticated.clone();
                tokio::spawn(async move {
                    if inbound.authenticated().await.is_ok() {
                        authenticated.fetch_add(1, Ordering::Relaxed);
                    }
                    // Keep the connection until the endpoint closes.
                    let _ = inbound.connection.closed().await;
                });
            }
        });
    }
    let started = Instant::now();
    let held = dial_all(clients, sizes.concurrency, move |clients, i| async move {
        Ok(clients[i].endpoint.connect(address, None).await?.connection)
    })
    .await?;
    let count = authenticated.clone();
    tokio::time::timeout(Duration::from_secs(60), wait_until(|| count.load(Ordering::Relaxed) >= n as u64))
        .await
        .context("bare listener did not authenticate every dial")?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    report_retries("bare", server.admission_stats().retries_sent);
    for c in &held {
        c.close(0u32.into(), b"done");
    }
    server.close().await;
    Ok(rate)
}

/// Ours: a real exchange listener (`Exchange` with its store); each dial is a full exchange of `Hello`s.
async fn exchange_round(
    sizes: &Sizes,
    clients: &Arc<Vec<Client>>,
    work: &Path,
    round: usize,
) -> anyhow::Result<f64> {
    let n = clients.len();
    let node = LocalNode::start(&work.join(format!("handshake-{round}"))).await?;
    let address = node.exchange.local_addr()?;
    let started = Instant::now();
    let held = dial_all(clients, sizes.concurrency, move |clients, i| async move {
        client_exchange(&clients[i], address).await
    })
    .await?;
    let exchange = node.exchange.clone();
    tokio::time::timeout(Duration::from_secs(60), wait_until(|| exchange.connected_peers() >= n))
        .await
        .context("the exchange listener did not verify every dial")?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    report_retries("exchange", exchange.quic_admission().retries_sent);
    for h in &held {
        h.connection.close(0u32.into(), b"done");
    }
    drop(held);
    node.stop().await;
    Ok(rate)
}

// ---------------------------------------------------------------------------------------------------------
// Daemons

fn daemon_binary() -> anyhow::Result<PathBuf> {
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

struct Daemon {
    child: Child,
    channel: Channel,
    quic: SocketAddr,
    dht: String,
    /// The monitoring endpoint (`/metrics`, `/debug/pprof/heap`).
    monitoring: String,
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

async fn start_daemon(binary: &Path, dir: &Path, bootstrap: Option<&str>) -> anyhow::Result<Daemon> {
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

async fn node_info(daemon: &Daemon) -> anyhow::Result<remote_network::api::control::NodeInfo> {
    let info = NodeServiceClient::new(daemon.channel.clone()).get_node_info(GetNodeInfoRequest {}).await?;
    info.into_inner().node.context("GetNodeInfo without a node")
}

/// Threads of a process: each costs a stack and jemalloc thread cache, which count in RSS.
fn threads(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("Threads:")).context("no Threads")?;
    Ok(line.split_whitespace().nth(1).context("Threads value")?.parse()?)
}

/// One field of `/proc/<pid>/status` in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
        .with_context(|| format!("no {field}"))?;
    let kib: f64 = line.split_whitespace().nth(1).with_context(|| format!("{field} value"))?.parse()?;
    Ok(kib)
}

fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    status_kib(pid, "VmRSS")
}

/// One plain HTTP/1.0 GET on the daemon's monitoring endpoint (loopback, no TLS): the body.
async fn http_get(address: &str, path: &str) -> anyhow::Result<Vec<u8>> {
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
struct Heap {
    /// Bytes the program holds (`stats.allocated`).
    allocated: f64,
    /// Pages holding them (`stats.active`): allocated plus fragmentation inside pages.
    active: f64,
    /// Resident pages jemalloc maps, dirty (freed but not yet returned) ones included.
    resident: f64,
    metadata: f64,
}

async fn heap_kib(daemon: &Daemon) -> anyhow::Result<Heap> {
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
struct Memory {
    rss: f64,
    heap: Heap,
    threads: u32,
    /// Resident pages of files (the binary's code, mostly): paged in once, when code first runs.
    file: f64,
}

/// Median of a few RSS readings a little apart (the daemon's background work makes single readings jumpy),
/// after waiting long enough for jemalloc to return the pages freed by the handshakes just done: its dirty
/// pages decay over `dirty_decay_ms` (10 s by default), and until then they count in RSS although nothing
/// uses them.
async fn settled(daemon: &Daemon) -> anyhow::Result<Memory> {
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
async fn save_heap_profile(daemon: &Daemon, peers: usize) -> anyhow::Result<()> {
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
async fn connect_clients(
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
async fn wait_connected(daemon: &Daemon, wanted: usize, at_most: bool) -> anyhow::Result<()> {
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
async fn memory_per_peer(sizes: &Sizes, work: &Path, binary: &Path) -> anyhow::Result<f64> {
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

// ---------------------------------------------------------------------------------------------------------
// 4. Store

/// Upserts built from verified records (signed by distinct keys, verified as the exchange does; signing and
/// verification happen before the timing), one topic and two addresses each.
fn verified_upserts(count: usize) -> anyhow::Result<Vec<PeerUpsert>> {
    let now = now_ms();
    let policy = VerifyPolicy::at(now);
    (0..count)
        .map(|i| {
            let key = new_key();
            let octets = format!("{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            let signed = client_record(&key, "bench", &format!("10.{octets}:30906"));
            let verified = wire::verify_record(&signed, None, &policy)?;
            let contact = (format!("100.{octets}:40000"), AddressSource::Inbound);
            Ok(upsert_from_record(&verified, Some(contact), now - i as i64))
        })
        .collect()
}

/// Upserts per second through the store's writer (all submitted concurrently so that it batches) over raw
/// batched rusqlite inserts of the same rows into the same schema (transactions of the writer's batch size).
/// Returns the ratio, the store's rate, and the filled database (used by the ListPeers figure).
async fn store_upserts(sizes: &Sizes, work: &Path) -> anyhow::Result<(f64, f64, PathBuf)> {
    let n = sizes.store_peers;
    let upserts = verified_upserts(n)?;
    let dir = work.join("store-data");
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("peers.db");

    // Raw: same schema (created by opening a store), the write connection's pragmas (durability, cache and
    // automatic checkpoint threshold), plain INSERTs.
    let raw_db = work.join("raw.db");
    Store::open(StoreOptions::new(&raw_db))?.close().await?;
    let raw_rows = upserts.clone();
    let raw_rate = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut conn = rusqlite::Connection::open(&raw_db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "cache_size", -32 * 1024)?;
        conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
        let started = Instant::now();
        for chunk in raw_rows.chunks(StoreOptions::new("x").max_batch) {
            let tx = conn.transaction()?;
            {
                let mut peer = tx.prepare_cached(
                    "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type)
                     VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)",
                )?;
                let mut address = tx.prepare_cached(
                    "INSERT INTO peer_addresses (peer, address, source, first_seen) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut topic = tx.prepare_cached("INSERT INTO peer_topics (peer, topic) VALUES (?1, ?2)")?;
                for u in chunk {
                    peer.execute(rusqlite::params![
                        &u.node_id.0[..],
                        u.seq as i64,
                        u.record,
                        u.seen_at_ms,
                        u.node_type as i64,
                        u.nat_type as i64
                    ])?;
                    // What the peer's rows are keyed by, as the store does.
                    let id = tx.last_insert_rowid();
                    for (a, source) in &u.addresses {
                        address.execute(rusqlite::params![id, a, *source as i64, u.seen_at_ms])?;
                    }
                    for t in &u.topics {
                        topic.execute(rusqlite::params![id, t])?;
                    }
                }
            }
            tx.commit()?;
        }
        Ok(raw_rows.len() as f64 / started.elapsed().as_secs_f64())
    })
    .await??;

    let store = Store::open(StoreOptions::new(&db))?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for upsert in upserts {
        let store = store.clone();
        tasks.spawn(async move { store.upsert_peer(upsert).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let elapsed = started.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    let stats = store.stats().await?;
    // Where the store's time went: inside the writer's transactions, or queueing and answering around them.
    println!(
        "  writer busy in transactions {:.0} ms of {:.0} ms",
        store.write_batch_seconds().sum * 1e3,
        elapsed.as_secs_f64() * 1e3
    );
    store.close().await?;
    println!(
        "  {n} upserts: store {rate:.0}/s ({} batches), raw rusqlite {raw_rate:.0}/s, ratio {:.3}",
        stats.write_batches,
        rate / raw_rate
    );
    Ok((rate / raw_rate, rate, db))
}

/// One row of the raw list query, every column read as the store reads it.
type ListRow = (Vec<u8>, i64, i64, i64, i64, i64, f64, Option<String>);

/// A ListPeers page of 1000 over gRPC (the real daemon on the filled store, over its Unix control socket) over
/// the same page's SQL query run directly on the same file. Medians of repeated runs.
async fn list_page_ratio(sizes: &Sizes, work: &Path, binary: &Path, db: &Path) -> anyhow::Result<f64> {
    let dir = work.join("list");
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::rename(db, dir.join("data").join("peers.db"))?;
    let daemon = start_daemon(binary, &dir, None).await?;
    let mut peers = PeerServiceClient::new(daemon.channel.clone());
    let request = ListPeersRequest { page_size: 1000, ..Default::default() };
    let first = peers.list_peers(request.clone()).await?.into_inner();
    println!("  daemon store: {} peers, page of {}", first.total, first.peers.len());
    let mut grpc = Vec::new();
    for _ in 0..sizes.list_repeats {
        let started = Instant::now();
        let page = peers.list_peers(request.clone()).await?.into_inner();
        grpc.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(page.peers.len() == 1000, "a page of {}", page.peers.len());
    }
    let path = dir.join("data").join("peers.db");
    let repeats = sizes.list_repeats;
    let mut raw = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let sql = "SELECT p.node_id, p.seq, p.first_seen, p.last_seen, p.node_type, p.nat_type, p.score,
                   (SELECT group_concat(t.topic, char(31)) FROM peer_topics t WHERE t.peer = p.id)
                   FROM peers p ORDER BY p.last_seen DESC, p.node_id LIMIT 1000";
        let mut times = Vec::new();
        for _ in 0..repeats {
            let started = Instant::now();
            let mut statement = conn.prepare_cached(sql)?;
            let rows: Vec<ListRow> = statement
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            times.push(started.elapsed().as_secs_f64());
            anyhow::ensure!(rows.len() == 1000, "raw page of {}", rows.len());
        }
        let started = Instant::now();
        for _ in 0..repeats {
            let _: i64 = conn.prepare_cached("SELECT COUNT(*) FROM peers p")?.query_row([], |r| r.get(0))?;
        }
        println!(
            "  (the store also counts the matching rows for `total`: {:.2} ms per COUNT(*) on the raw connection)",
            started.elapsed().as_secs_f64() * 1e3 / repeats as f64
        );
        Ok(times)
    })
    .await??;
    let (g, r) = (median(&mut grpc), median(&mut raw));
    println!("  page of 1000: gRPC {:.2} ms, raw SQL {:.2} ms, ratio {:.3}", g * 1e3, r * 1e3, g / r);
    drop(daemon);
    Ok(g / r)
}

// ---------------------------------------------------------------------------------------------------------
// 5. Discovery

fn mainline_node(bootstrap: &[SocketAddr]) -> anyhow::Result<mainline::Dht> {
    Ok(mainline::Dht::builder()
        .server_mode()
        .bind_address(Ipv4Addr::LOCALHOST)
        .port(0)
        .bootstrap(bootstrap)
        .build()?)
}

async fn peers_in_topic(daemon: &Daemon, topic: &str) -> anyhow::Result<u64> {
    let request = ListPeersRequest { topic: topic.to_owned(), page_size: 1, ..Default::default() };
    Ok(PeerServiceClient::new(daemon.channel.clone()).list_peers(request).await?.into_inner().total)
}

/// Milliseconds of one discovery run.
struct Discovery {
    /// From JoinTopic until the new daemon stores its first verified peer.
    first_ms: f64,
    /// Until it stores every full node.
    all_ms: f64,
    /// A plain Mainline node's `get_peers` of the same topic, until its first batch of peers.
    bare_ms: f64,
}

/// A local Mainline network of plain DHT nodes (in this process) and real full daemons on one topic; a new
/// daemon, bootstrapped, joins the topic (see [`Discovery`]).
async fn join_to_first_peer(sizes: &Sizes, work: &Path, binary: &Path) -> anyhow::Result<Discovery> {
    let topic = "rn-bench";
    let first = mainline_node(&[])?;
    let bootstrap = SocketAddr::V4(first.clone().as_async().info().await.local_addr());
    let mut plain = vec![first];
    for _ in 1..sizes.dht_nodes {
        plain.push(mainline_node(&[bootstrap])?);
    }
    for node in &plain[1..] {
        anyhow::ensure!(node.clone().as_async().bootstrapped().await, "a DHT node did not bootstrap");
    }
    let bootstrap = bootstrap.to_string();
    let mut full = Vec::new();
    for i in 0..sizes.full_nodes {
        let daemon = start_daemon(binary, &work.join(format!("full-{i}")), Some(&bootstrap)).await?;
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
    println!("  {} DHT nodes and {} full nodes up, all full nodes see a peer", plain.len(), full.len());
    let newcomer = start_daemon(binary, &work.join("newcomer"), Some(&bootstrap)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dht = node_info(&newcomer).await?.dht.unwrap_or_default();
        if dht.routing_table_size > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the new daemon's DHT did not bootstrap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    TopicServiceClient::new(newcomer.channel.clone())
        .join_topic(JoinTopicRequest { topic: topic.to_owned() })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first_ms = None;
    loop {
        let found = peers_in_topic(&newcomer, topic).await?;
        if found > 0 && first_ms.is_none() {
            first_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        if found >= full.len() as u64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new daemon found {found} of the {} full nodes",
            full.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_ms = started.elapsed().as_secs_f64() * 1000.0;
    let first_ms = first_ms.unwrap_or(all_ms);
    drop(newcomer);

    // The baseline: a plain Mainline node, new to the same network, looks the topic's infohash up; the time to
    // the first batch of peers is the least any discovery built on the DHT can take here.
    let bare = mainline_node(&[bootstrap.parse()?])?.as_async();
    anyhow::ensure!(bare.bootstrapped().await, "the baseline DHT node did not bootstrap");
    // Idle first, as the daemon was when it joined: mainline's thread blocks on its socket for up to 50 ms
    // (its READ_TIMEOUT) before it picks up a new query, and a node still busy bootstrapping never waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut batches = bare.get_peers(remote_network::dht::topic_infohash(topic));
    let first_batch = tokio::time::timeout(Duration::from_secs(30), first_batch_size(&mut batches))
        .await
        .context("the bare get_peers found nobody in 30 s")?;
    let bare_ms = started.elapsed().as_secs_f64() * 1000.0;
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
struct FreshPair {
    /// The seed joins first, the node that bootstrapped from it second.
    seed_first_ms: f64,
    /// The other way round.
    seed_last_ms: f64,
}

async fn fresh_pair_join(sizes: &Sizes, work: &Path, binary: &Path) -> anyhow::Result<FreshPair> {
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
async fn first_batch_size(
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
