//! Wires the node's parts together and owns the order in which they start and stop.
//!
//! Start: data dir (locked) → identity → store → control listeners → control servers → `READY=1`.
//! Stop: `STOPPING=1` → cancel (control stops taking requests and ends streams) → servers drain → the store
//! writer commits what it was given and stops → the control socket is removed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::control::ListenAddresses;
use crate::api::names::NodeId;
use crate::config::Config;
use crate::control::{ControlListeners, ControlServer, NodeContext, TransportError};
use crate::identity::{self, Identity, IdentityError};
use crate::lifecycle::{self, ExclusiveLock, LockError};
use crate::store::{Store, StoreError, StoreHealth, StoreOptions};

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

        let listeners = match ControlListeners::bind(&config.control).await {
            Ok(listeners) => listeners,
            Err(e) => {
                let _ = store.close().await;
                return Err(e.into());
            }
        };
        let listen = ListenAddresses {
            control_socket: listeners.socket_path().display().to_string(),
            control_tcp: listeners.tcp_addr().map(|a| a.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let ctx = Arc::new(NodeContext {
            node_id,
            started_at,
            started,
            data_dir: config.data_dir.clone(),
            listen,
            store: store.clone(),
            shutdown: shutdown.clone(),
        });
        let control = match ControlServer::start(listeners, ctx.clone()).await {
            Ok(control) => control,
            Err(e) => {
                let _ = store.close().await;
                return Err(e.into());
            }
        };

        tracing::info!(
            %node_id,
            control_socket = %ctx.listen.control_socket,
            control_tcp = %ctx.listen.control_tcp,
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
        for task in self.background {
            let _ = task.await;
        }
        let result = self.ctx.store.close().await;
        tracing::info!(node_id = %self.ctx.node_id, "node stopped");
        result
    }
}

/// The one-line status shown by `systemctl status`.
async fn status_line(ctx: &NodeContext) -> String {
    let health = match ctx.store.health() {
        StoreHealth::Ok => "ok".to_owned(),
        StoreHealth::Degraded(why) => format!("DEGRADED: {why}"),
    };
    match ctx.store.stats().await {
        Ok(stats) => format!(
            "serving on {}; {} peers, {} topics; store {health}",
            ctx.listen.control_socket, stats.peers, stats.joined_topics
        ),
        Err(e) => format!("serving on {}; store {health} ({e})", ctx.listen.control_socket),
    }
}
