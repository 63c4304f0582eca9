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

mod daemon;
mod discovery;
mod handshake;
mod store_bench;

use daemon::*;
use discovery::*;
use handshake::*;
use store_bench::*;

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
        figures.extend(store_figures(sizes, work, &daemon).await?);
    }
    if runs(Section::Discovery) {
        figures.extend(discovery_figures(sizes, work, &daemon).await?);
    }
    Ok(figures)
}

/// Section 4: the store's writer and `ListPeers` pages, each against raw rusqlite.
async fn store_figures(sizes: &Sizes, work: &Path, daemon: &Path) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
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
    let list = list_page_ratio(sizes, work, daemon, &db).await.context("ListPeers page")?;
    figures.push(Figure { key: "list_page_ratio", value: list, goal: "<= 2", met: Some(list <= 2.0) });
    Ok(figures)
}

/// Section 5: discovery on a local Mainline network, and a fresh pair of daemons in both orders.
async fn discovery_figures(sizes: &Sizes, work: &Path, daemon: &Path) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    println!("== 5. discovery on a local Mainline network");
    let join = join_to_first_peer(sizes, work, daemon).await.context("discovery")?;
    figures.push(Figure { key: "join_to_first_peer_ms", value: join.first_ms, goal: "-", met: None });
    figures.push(Figure { key: "join_to_all_peers_ms", value: join.all_ms, goal: "-", met: None });
    figures.push(Figure { key: "bare_get_peers_first_batch_ms", value: join.bare_ms, goal: "-", met: None });
    let fresh = fresh_pair_join(sizes, work, daemon).await.context("fresh pair")?;
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
    figures.push(Figure { key: "fresh_join_seed_last_ms", value: fresh.seed_last_ms, goal: "-", met: None });
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
