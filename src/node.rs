//! Wires the node's parts together and owns the order in which they start and stop.
//!
//! Start: data dir (locked) → identity → store → QUIC endpoint → our signed record → exchange (accepting and
//! dialing) → DHT (announcing our QUIC port for each joined topic, its discoveries feeding the dialer) → control
//! listeners → control servers → `READY=1`.
//! Stop: `STOPPING=1` → cancel (control stops taking requests and ends streams, the DHT and dialer stop) →
//! servers drain → connections close → the store writer commits what it was given and stops → the control
//! socket is removed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::control::ListenAddresses;
use crate::api::names::NodeId;
use crate::config::Config;
use crate::config::DhtMode;
use crate::control::{ControlListeners, ControlServer, NodeContext, TransportError};
use crate::dht::{self, Dht, DhtError, DhtOptions};
use crate::exchange::record::RecordPublisher;
use crate::exchange::{Exchange, ExchangeOptions};
use crate::identity::{self, Identity, IdentityError};
use crate::lifecycle::{self, ExclusiveLock, LockError};
use crate::quic::{QuicEndpoint, QuicError, QuicLimits};
use crate::store::{AddressSource, Store, StoreError, StoreHealth, StoreOptions};

/// File name of the peer database inside the data dir.
pub const DATABASE_FILE: &str = "peers.db";
/// How often the store's health is checked and reported to systemd and health checkers.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir: {0}")]
    DataDir(#[from] LockError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("control API: {0}")]
    Control(#[from] TransportError),
    #[error("QUIC endpoint: {0}")]
    Quic(#[from] QuicError),
    #[error("DHT: {0}")]
    Dht(#[from] DhtError),
}

/// A running node.
pub struct Node {
    ctx: Arc<NodeContext>,
    control: ControlServer,
    background: Vec<JoinHandle<()>>,
    _data_dir_lock: ExclusiveLock,
}

impl Node {
    /// Starts every part; returns once the control API is serving.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let started_at = SystemTime::now();
        let started = Instant::now();
        identity::ensure_private_dir(&config.data_dir)?;
        let data_dir_lock = ExclusiveLock::acquire(
            &config.data_dir.join("lock"),
            &format!("data dir {}", config.data_dir.display()),
        )?;
        let (identity, created) = Identity::load_or_create(&config.data_dir)?;
        let node_id = identity.node_id();
        if created {
            tracing::info!(%node_id, "created a new node identity");
        }

        let mut options = StoreOptions::new(config.data_dir.join(DATABASE_FILE));
        options.retention = config.store.retention;
        options.max_peers = config.store.max_peers;
        options.max_joined_topics = config.store.max_joined_topics;
        let store = Store::open(options)?;

        let shutdown = CancellationToken::new();
        let parts = match start_network(config, &identity, &store, &shutdown).await {
            Ok(parts) => parts,
            Err(e) => {
                shutdown.cancel();
                let _ = store.close().await;
                return Err(e);
            }
        };
        let (exchange, dht) = parts;

        let listeners = match ControlListeners::bind(&config.control).await {
            Ok(listeners) => listeners,
            Err(e) => {
                shutdown.cancel();
                exchange.shutdown().await;
                let _ = store.close().await;
                return Err(e.into());
            }
        };
        let listen = ListenAddresses {
            control_socket: listeners.socket_path().display().to_string(),
            control_tcp: listeners.tcp_addr().map(|a| a.to_string()).unwrap_or_default(),
            quic: exchange.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            dht: dht.local_addr().to_string(),
            ..Default::default()
        };
        let ctx = Arc::new(NodeContext {
            node_id,
            started_at,
            started,
            data_dir: config.data_dir.clone(),
            listen,
            store: store.clone(),
            exchange: exchange.clone(),
            dht: dht.clone(),
            shutdown: shutdown.clone(),
        });
        let control = match ControlServer::start(listeners, ctx.clone()).await {
            Ok(control) => control,
            Err(e) => {
                shutdown.cancel();
                exchange.shutdown().await;
                let _ = store.close().await;
                return Err(e.into());
            }
        };

        tracing::info!(
            %node_id,
            control_socket = %ctx.listen.control_socket,
            control_tcp = %ctx.listen.control_tcp,
            quic = %ctx.listen.quic,
            dht = %ctx.listen.dht,
            data_dir = %config.data_dir.display(),
            "node started"
        );
        lifecycle::notify_ready(&status_line(&ctx).await);
        let mut background = Vec::new();
        background.extend(lifecycle::spawn_watchdog(shutdown.clone()));
        Ok(Self { ctx, control, background, _data_dir_lock: data_dir_lock })
    }

    pub fn node_id(&self) -> NodeId {
        self.ctx.node_id
    }

    pub fn data_dir(&self) -> &PathBuf {
        &self.ctx.data_dir
    }

    /// Runs until `stop` resolves, keeping health and the systemd status line current.
    pub async fn run_until(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(HEALTH_INTERVAL);
        let mut was_healthy = true;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {}
            }
            let health = self.ctx.store.health();
            let healthy = health == StoreHealth::Ok;
            if healthy != was_healthy {
                match &health {
                    StoreHealth::Ok => tracing::info!("store healthy again"),
                    StoreHealth::Degraded(why) => tracing::error!(reason = %why, "store degraded"),
                }
                self.control.set_healthy(healthy).await;
                was_healthy = healthy;
            }
            lifecycle::notify_status(&status_line(&self.ctx).await);
        }
    }

    /// Stops every part in order. Writes already acknowledged are on disk when this returns.
    pub async fn stop(self) -> Result<(), StoreError> {
        lifecycle::notify_stopping("stopping: draining control API, flushing the store");
        self.ctx.shutdown.cancel();
        self.control.wait().await;
        self.ctx.exchange.shutdown().await;
        for task in self.background {
            let _ = task.await;
        }
        let result = self.ctx.store.close().await;
        tracing::info!(node_id = %self.ctx.node_id, "node stopped");
        result
    }
}

/// Starts the peer-to-peer side: the QUIC endpoint, our record, the exchange and the DHT, whose discoveries
/// feed the exchange's dialer.
async fn start_network(
    config: &Config,
    identity: &Identity,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<(Exchange, Dht), StartError> {
    let limits = QuicLimits {
        max_connections: usize::try_from(config.quic_max_connections).unwrap_or(usize::MAX),
        ..QuicLimits::default()
    };
    let endpoint = QuicEndpoint::bind(config.quic_listen, identity.signing_key(), limits)?;
    let quic_addr = endpoint.local_addr()?;
    let topics: Vec<String> = store.joined_topics().await?.into_iter().map(|t| t.name).collect();
    let publisher =
        RecordPublisher::start(identity.signing_key().clone(), store.clone(), quic_addr, topics.clone())
            .await?;
    let exchange =
        Exchange::start(endpoint, store.clone(), publisher, ExchangeOptions::default(), shutdown.clone());

    let (discoveries, mut found) = tokio::sync::mpsc::channel::<dht::Discovery>(256);
    let options = DhtOptions {
        listen: config.dht.listen,
        bootstrap: config.dht.bootstrap.clone(),
        mode: match config.dht.mode {
            DhtMode::Auto => dht::DhtMode::Auto,
            DhtMode::Server => dht::DhtMode::Server,
            DhtMode::Client => dht::DhtMode::Client,
        },
        announce_port: Some(quic_addr.port()),
        announce_interval: config.dht.announce_interval,
        lookup_interval: config.dht.lookup_interval,
    };
    let dht = Dht::start(options, discoveries, shutdown.clone())?;
    for topic in &topics {
        dht.join(topic);
    }
    let dialer = exchange.clone();
    tokio::spawn(async move {
        while let Some(discovery) = found.recv().await {
            dialer.dial_candidates(discovery.peers, AddressSource::Dht);
        }
    });
    Ok((exchange, dht))
}

/// The one-line status shown by `systemctl status`.
async fn status_line(ctx: &NodeContext) -> String {
    let health = match ctx.store.health() {
        StoreHealth::Ok => "ok".to_owned(),
        StoreHealth::Degraded(why) => format!("DEGRADED: {why}"),
    };
    match ctx.store.stats().await {
        Ok(stats) => format!(
            "serving on {}; {} connected, {} peers stored, {} topics; store {health}",
            ctx.listen.control_socket,
            ctx.exchange.connected_peers(),
            stats.peers,
            stats.joined_topics
        ),
        Err(e) => format!("serving on {}; store {health} ({e})", ctx.listen.control_socket),
    }
}
