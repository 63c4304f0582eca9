//! Wires the node's parts together and owns the order in which they start and stop.
//!
//! Start: data dir (locked) → identity → store → QUIC endpoint → our signed record → exchange (accepting and
//! dialing) → DHT (announcing our QUIC port for each joined topic, its discoveries feeding the dialer) → control
//! listeners → monitoring HTTP → control servers → `READY=1`.
//! Stop: `STOPPING=1` → cancel (control stops taking requests and ends streams, the DHT and dialer stop) →
//! servers drain → connections close → the store writer commits what it was given and stops → the control
//! socket is removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::control::ListenAddresses;
use crate::config::DhtMode;
use crate::config::{Config, reloadable};
use crate::control::{ControlListeners, ControlServer, NodeContext, TransportError};
use crate::dht::{self, Dht, DhtError, DhtOptions};
use crate::exchange::record::RecordPublisher;
use crate::exchange::relay::RelayOptions;
use crate::exchange::warm_start;
use crate::exchange::{Exchange, ExchangeOptions};
use crate::identity::{self, Identity, IdentityError};
use crate::lifecycle::{self, ExclusiveLock, LockError};
use crate::limits::ServerLimits;
use crate::quic::{QuicEndpoint, QuicError};
use crate::store::{AddressSource, Store, StoreError, StoreHealth, StoreOptions};
use crate::telemetry::{self, MetricKind, Monitoring, MonitoringError, Readiness, Registry};

/// File name of the peer database inside the data dir.
pub const DATABASE_FILE: &str = "peers.db";
/// How long stop waits for the node's own tasks once the exchange is closed (a warm-start dial in flight
/// fails as soon as the endpoint is gone).
const NODE_TASKS_STOP_WAIT: Duration = Duration::from_secs(5);
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
    #[error("monitoring: {0}")]
    Monitoring(#[from] MonitoringError),
}

impl StartError {
    /// Whether the operator's configuration is at fault (a value the node cannot use), not the system.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Self::Control(TransportError::Token(_)))
    }
}

/// A running node.
pub struct Node {
    ctx: Arc<NodeContext>,
    control: ControlServer,
    background: Vec<JoinHandle<()>>,
    /// The node's own tasks (the NAT prober, the warm start, the discovery feed); stop waits for them.
    tasks: TaskTracker,
    monitoring: Monitoring,
    /// The monitoring port's connection limits in force, changed in place on reload.
    monitoring_limits: Arc<ServerLimits>,
    /// What `/readyz` reports besides store health: false until the control API serves, and again from the
    /// moment `stop` begins, so a load balancer or supervisor stops routing to a draining node.
    serving: Arc<AtomicBool>,
    _data_dir_lock: ExclusiveLock,
}

impl Node {
    /// Starts every part; returns once the control API is serving.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let started_at = SystemTime::now();
        let started = Instant::now();
        let (data_dir_lock, identity, store) = open_local_state(config)?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (exchange, dht) = match start_network(config, &identity, &store, &tasks, &shutdown).await {
            Ok(parts) => parts,
            Err(e) => {
                shutdown.cancel();
                let _ = store.close().await;
                return Err(e);
            }
        };
        let nat = crate::nat::prober::NatProber::start(
            exchange.clone(),
            exchange.evidence(),
            dht.clone(),
            store.clone(),
            &tasks,
            shutdown.clone(),
        );
        let ctx = NodeContext {
            node_id: identity.node_id(),
            started_at,
            started,
            data_dir: config.data_dir.clone(),
            listen: ListenAddresses::default(),
            store: store.clone(),
            exchange: exchange.clone(),
            dht,
            nat,
            shutdown: shutdown.clone(),
        };
        let serving = Arc::new(AtomicBool::new(false));
        let servers = match serve(config, ctx, &serving).await {
            Ok(servers) => servers,
            Err(e) => {
                abandon_start(&shutdown, &exchange, &store).await;
                return Err(e);
            }
        };
        let Servers { ctx, control, monitoring, monitoring_limits } = servers;
        tracing::info!(
            node_id = %ctx.node_id,
            control_socket = %ctx.listen.control_socket,
            control_tcp = %ctx.listen.control_tcp,
            quic = %ctx.listen.quic,
            dht = %ctx.listen.dht,
            monitoring = %ctx.listen.monitoring,
            data_dir = %config.data_dir.display(),
            "node started"
        );
        serving.store(true, Ordering::Relaxed);
        lifecycle::notify_ready(&status_line(&ctx).await);
        let mut background = Vec::new();
        background.extend(lifecycle::spawn_watchdog(shutdown.clone()));
        Ok(Self {
            ctx,
            control,
            background,
            tasks,
            monitoring,
            monitoring_limits,
            serving,
            _data_dir_lock: data_dir_lock,
        })
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
        self.serving.store(false, Ordering::Relaxed);
        self.ctx.shutdown.cancel();
        lifecycle::stop_stage("draining the control API");
        self.control.wait().await;
        lifecycle::stop_stage("stopping the monitoring server");
        self.monitoring.wait().await;
        lifecycle::stop_stage("closing peer connections");
        self.ctx.exchange.shutdown().await;
        lifecycle::stop_stage("waiting for background tasks");
        for task in self.background {
            let _ = task.await;
        }
        self.tasks.close();
        if tokio::time::timeout(NODE_TASKS_STOP_WAIT, self.tasks.wait()).await.is_err() {
            tracing::warn!(running = self.tasks.len(), "node tasks still running at shutdown");
        }
        lifecycle::stop_stage("closing the store");
        let result = self.ctx.store.close().await;
        tracing::info!(node_id = %self.ctx.node_id, "node stopped");
        result
    }
}

/// What a configuration reload did with each changed setting.
#[derive(Debug, Default)]
pub struct Reconfigured {
    /// Settings now in force.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but take effect only after a restart.
    pub need_restart: Vec<&'static str>,
    /// Settings that could not be applied, with why; their old values stay in force.
    pub failed: Vec<(&'static str, String)>,
}

impl Node {
    /// Applies a reloaded configuration: the settings in `changes` that a running node can take (declared
    /// `reload` in the config's settings; `log_level` is applied by the binary, which owns the log subscriber)
    /// are put in force from `new`; the others are reported as needing a restart.
    pub async fn reconfigure(&self, changes: &[crate::config::Change], new: &Config) -> Reconfigured {
        let mut report = Reconfigured::default();
        let changed = |prefix: &str| changes.iter().any(|change| change.key.starts_with(prefix));
        let keys =
            |prefix: &'static str| changes.iter().map(|c| c.key).filter(move |key| key.starts_with(prefix));
        for change in changes {
            if !reloadable(change.key) {
                report.need_restart.push(change.key);
            } else if change.key == "log_level" {
                report.applied.push(change.key);
            }
        }
        if changed("dht.bootstrap") {
            match self.ctx.dht.set_bootstrap(new.dht.bootstrap.clone()).await {
                Ok(()) => report.applied.push("dht.bootstrap"),
                Err(e) => report.failed.push(("dht.bootstrap", e.to_string())),
            }
        }
        if changed("relay.") {
            let as_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
            self.ctx.exchange.set_relay_options(RelayOptions {
                enabled: new.relay.enabled,
                max_reservations: as_usize(new.relay.max_reservations),
                max_circuits: as_usize(new.relay.max_circuits),
                max_bytes_per_second: new.relay.max_bytes_per_second,
                max_bytes_per_circuit: new.relay.max_bytes_per_circuit,
            });
            report.applied.extend(keys("relay."));
        }
        if changed("store.") {
            let limits = &new.store;
            match self
                .ctx
                .store
                .set_limits(limits.retention, limits.max_peers, limits.max_joined_topics)
                .await
            {
                Ok(pruned) => {
                    tracing::info!(pruned, "store limits changed; pruned at once");
                    report.applied.extend(keys("store."));
                }
                Err(e) => report.failed.extend(keys("store.").map(|key| (key, e.to_string()))),
            }
        }
        let control_keys: Vec<_> = keys("control.").filter(|key| reloadable(key)).collect();
        if !control_keys.is_empty() {
            self.control.set_limits(new.control.limits);
            report.applied.extend(control_keys);
        }
        if changed("monitoring.") {
            self.monitoring_limits.set(new.monitoring_limits);
            report.applied.extend(keys("monitoring.").filter(|key| reloadable(key)));
        }
        self.reload_control_token(changes, new, &mut report);
        let quic_keys: Vec<_> = keys("quic.").filter(|key| reloadable(key)).collect();
        if !quic_keys.is_empty() {
            match self.ctx.exchange.set_quic_limits(&new.quic_limits) {
                Ok(()) => report.applied.extend(quic_keys),
                Err(e) => report.failed.extend(quic_keys.into_iter().map(|key| (key, e.to_string()))),
            }
        }
        report
    }
}

impl Node {
    /// Reads the control token again from the source now configured (a token file may have been rewritten while
    /// its path stayed the same) and puts it in force on the TCP listener. A token that cannot be read leaves
    /// the old one in force; a listener started without a token needs a restart to require one.
    fn reload_control_token(
        &self,
        changes: &[crate::config::Change],
        new: &Config,
        report: &mut Reconfigured,
    ) {
        const KEYS: [&str; 2] = ["control.token", "control.token_file"];
        let changed: Vec<&'static str> =
            changes.iter().map(|c| c.key).filter(|key| KEYS.contains(key)).collect();
        let key = match new.control.token {
            Some(crate::config::TokenSource::File(_)) => "control.token_file",
            _ => "control.token",
        };
        match self.control.reload_token(new.control.token.as_ref()) {
            // No token check to update: a changed source keeps its "needs a restart".
            Ok(None) => {}
            Ok(Some(replaced)) => {
                if replaced {
                    tracing::info!("control token replaced: clients of the TCP listener need the new one");
                }
                report.need_restart.retain(|key| !changed.contains(key));
                if changed.is_empty() && replaced {
                    report.applied.push(key);
                }
                report.applied.extend(&changed);
            }
            Err(e) => {
                report.need_restart.retain(|key| !changed.contains(key));
                report.failed.push((key, e.to_string()));
            }
        }
    }
}

/// The data dir (made private and locked against a second daemon), the node's identity, and its store.
fn open_local_state(config: &Config) -> Result<(ExclusiveLock, Identity, Store), StartError> {
    identity::ensure_private_dir(&config.data_dir)?;
    let data_dir_lock = ExclusiveLock::acquire(
        &config.data_dir.join("lock"),
        &format!("data dir {}", config.data_dir.display()),
    )?;
    let (identity, created) = Identity::load_or_create(&config.data_dir)?;
    let node_id = identity.node_id();
    // Spans exported from here on carry the node id (the trace resource is fixed before it is known).
    crate::telemetry::otel::set_node_id(node_id.to_string());
    if created {
        tracing::info!(%node_id, "created a new node identity");
    }
    let mut options = StoreOptions::new(config.data_dir.join(DATABASE_FILE));
    options.retention = config.store.retention;
    options.max_peers = config.store.max_peers;
    options.max_joined_topics = config.store.max_joined_topics;
    Ok((data_dir_lock, identity, Store::open(options)?))
}

/// The local servers of a started node, and the context they serve.
struct Servers {
    ctx: Arc<NodeContext>,
    control: ControlServer,
    monitoring: Monitoring,
    monitoring_limits: Arc<ServerLimits>,
}

/// Binds the control listeners and the monitoring port, then serves the control API on `ctx` (its listen
/// addresses filled in from what was bound).
async fn serve(
    config: &Config,
    mut ctx: NodeContext,
    serving: &Arc<AtomicBool>,
) -> Result<Servers, StartError> {
    let listeners = ControlListeners::bind(&config.control).await?;
    let registry = node_metrics(&ctx.store, &ctx.exchange, &ctx.dht);
    let readiness = node_readiness(&ctx.store, serving);
    // Only the built-in default may give way to another port: an address the operator chose is kept or the
    // node does not start.
    let monitoring_listen = if config.monitoring_listen_source.is_default() {
        telemetry::MonitoringListen::Default(config.monitoring_listen)
    } else {
        telemetry::MonitoringListen::Configured(config.monitoring_listen)
    };
    let monitoring_limits = ServerLimits::new(config.monitoring_limits);
    let monitoring = telemetry::serve(
        monitoring_listen,
        registry,
        readiness,
        monitoring_limits.clone(),
        ctx.shutdown.clone(),
    )
    .await?;
    ctx.listen = ListenAddresses {
        control_socket: listeners.socket_path().display().to_string(),
        control_tcp: listeners.tcp_addr().map(|a| a.to_string()).unwrap_or_default(),
        quic: ctx.exchange.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        dht: ctx.dht.local_addr().to_string(),
        monitoring: monitoring.local_addr.to_string(),
    };
    let ctx = Arc::new(ctx);
    let control = ControlServer::start(listeners, ctx.clone()).await?;
    Ok(Servers { ctx, control, monitoring, monitoring_limits })
}

/// Undoes a start that failed after the network parts were running: stops them and closes the store, so that
/// nothing acknowledged is lost and no task outlives the error.
async fn abandon_start(shutdown: &CancellationToken, exchange: &Exchange, store: &Store) {
    shutdown.cancel();
    exchange.shutdown().await;
    if let Err(e) = store.close().await {
        tracing::warn!(error = %e, "store did not close cleanly after a failed start");
    }
}

/// Starts the peer-to-peer side: the QUIC endpoint, our record, the exchange and the DHT, whose discoveries
/// feed the exchange's dialer.
async fn start_network(
    config: &Config,
    identity: &Identity,
    store: &Store,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(Exchange, Dht), StartError> {
    let endpoint =
        QuicEndpoint::bind(config.quic_listen, identity.signing_key(), config.quic_limits.clone())?;
    let quic_addr = endpoint.local_addr()?;
    let topics: Vec<String> = store.joined_topics().await?.into_iter().map(|t| t.name).collect();
    // The store is a bootstrap of its own: peers verified before are dialed again, and their DHT sockets join
    // the configured bootstrap nodes (which may be gone after a restart).
    let known_peers = warm_start::known_contacts(store).await;

    let (discoveries, mut found) = tokio::sync::mpsc::channel::<dht::Discovery>(256);
    let mut bootstrap = config.dht.bootstrap.clone();
    for dht_address in known_peers.iter().filter_map(|peer| peer.dht) {
        let entry = dht_address.to_string();
        if dht_address != config.dht.listen && !bootstrap.contains(&entry) {
            bootstrap.push(entry);
        }
    }
    let options = DhtOptions {
        listen: config.dht.listen,
        bootstrap,
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

    let publisher = RecordPublisher::start(
        identity.signing_key().clone(),
        store.clone(),
        quic_addr,
        topics.clone(),
        dht.local_addr().port(),
    )
    .await?;
    let as_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let options = ExchangeOptions {
        relay: RelayOptions {
            enabled: config.relay.enabled,
            max_reservations: as_usize(config.relay.max_reservations),
            max_circuits: as_usize(config.relay.max_circuits),
            max_bytes_per_second: config.relay.max_bytes_per_second,
            max_bytes_per_circuit: config.relay.max_bytes_per_circuit,
        },
        ..ExchangeOptions::default()
    };
    let exchange = Exchange::start(endpoint, store.clone(), publisher, options, shutdown.clone());
    for topic in &topics {
        dht.join(topic);
    }
    let dialer = exchange.clone();
    let stopping = shutdown.clone();
    tasks.spawn(async move {
        loop {
            let discovery = tokio::select! {
                () = stopping.cancelled() => return,
                discovery = found.recv() => discovery,
            };
            let Some(discovery) = discovery else { return };
            dialer.dial_candidates(discovery.peers, AddressSource::Dht);
        }
    });
    tasks.spawn(warm_start::reconnect(exchange.clone(), known_peers, shutdown.clone()));
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

/// What `/readyz` answers: ready while the control API serves and the store accepts writes.
fn node_readiness(store: &Store, serving: &Arc<AtomicBool>) -> Readiness {
    let (store, serving) = (store.clone(), serving.clone());
    Arc::new(move || {
        if !serving.load(Ordering::Relaxed) {
            return Err("starting or stopping: the control API is not serving".to_owned());
        }
        match store.health() {
            StoreHealth::Ok => Ok(()),
            StoreHealth::Degraded(why) => Err(format!("store degraded: {why}")),
        }
    })
}

/// The node's metric families: the exchange's and DHT's counters and the store's statistics, read where they
/// live at scrape time, plus process and allocator metrics.
fn node_metrics(store: &Store, exchange: &Exchange, dht: &Dht) -> Arc<Registry> {
    let registry = Arc::new(Registry::new());
    telemetry::register_process_metrics(&registry);
    telemetry::register_allocator_metrics(&registry);
    registry.register(
        "rn_trace_spans_total",
        "Spans handed to the OTLP exporter, by outcome (dropped: the bounded queue was full).",
        MetricKind::Counter,
        Box::new(|w| {
            use crate::telemetry::otel;
            w.sample(&[("outcome", "exported")], otel::exported_spans());
            w.sample(&[("outcome", "dropped")], otel::dropped_spans());
            w.sample(&[("outcome", "failed")], otel::failed_spans());
        }),
    );
    // The version as a label on a constant 1, the usual `*_build_info` shape: it joins onto any series in PromQL.
    registry.register(
        "rn_build_info",
        "Version of the running node; always 1.",
        MetricKind::Gauge,
        Box::new(|w| w.sample(&[("version", env!("CARGO_PKG_VERSION"))], 1u8)),
    );

    register_exchange_metrics(&registry, exchange);
    register_dht_metrics(&registry, dht);
    register_store_metrics(&registry, store);
    registry
}

/// The exchange's families: exchanges, rejected records, QUIC admission, then those of traversal.
fn register_exchange_metrics(registry: &Registry, exchange: &Exchange) {
    let ex = exchange.clone();
    registry.register(
        "rn_exchanges_total",
        "Metadata exchanges with peers, by result.",
        MetricKind::Counter,
        Box::new(move |w| {
            let c = ex.counters();
            w.sample(&[("result", "ok")], c.exchanges_ok.load(Ordering::Relaxed));
            w.sample(&[("result", "failed")], c.exchanges_failed.load(Ordering::Relaxed));
        }),
    );
    let ex = exchange.clone();
    registry.register(
        "rn_exchange_records_rejected_total",
        "Peer records rejected, by reason.",
        MetricKind::Counter,
        Box::new(move |w| {
            let c = ex.counters();
            w.sample(&[("reason", "replay")], c.replays_rejected.load(Ordering::Relaxed));
            w.sample(&[("reason", "impersonation")], c.impersonations_rejected.load(Ordering::Relaxed));
        }),
    );
    let ex = exchange.clone();
    registry.register_value(
        "rn_exchange_records_from_peer_exchange_total",
        "Peer records learnt from other peers (peer exchange) rather than from the peers themselves.",
        MetricKind::Counter,
        move || ex.counters().records_from_peer_exchange.load(Ordering::Relaxed),
    );
    let ex = exchange.clone();
    registry.register(
        "rn_quic_inbound_attempts_total",
        "Inbound QUIC connection attempts not simply accepted, by outcome: sent a Retry to prove their address, \
         refused at the connection or pending-handshake limit, or a handshake that timed out.",
        MetricKind::Counter,
        Box::new(move |w| {
            let a = ex.quic_admission();
            w.sample(&[("outcome", "retry")], a.retries_sent);
            w.sample(&[("outcome", "refused_connection_limit")], a.refused_connection_limit);
            w.sample(&[("outcome", "refused_pending_limit")], a.refused_pending_limit);
            w.sample(&[("outcome", "handshake_timeout")], a.handshakes_timed_out);
        }),
    );
    let ex = exchange.clone();
    registry.register_value(
        "rn_quic_pending_handshakes",
        "Inbound QUIC handshakes in progress.",
        MetricKind::Gauge,
        move || ex.quic_admission().pending_handshakes,
    );
    register_traversal_metrics(registry, exchange);
}

/// Hole punching and relaying, and the peers connected by any path.
fn register_traversal_metrics(registry: &Registry, exchange: &Exchange) {
    let ex = exchange.clone();
    registry.register(
        "rn_nat_punches_total",
        "Hole-punch attempts (as initiator or target), by result.",
        MetricKind::Counter,
        Box::new(move |w| {
            let (attempts, successes) = ex.punch_totals();
            w.sample(&[("result", "connected")], successes);
            w.sample(&[("result", "failed")], attempts.saturating_sub(successes));
        }),
    );
    let ex = exchange.clone();
    registry.register(
        "rn_relay_circuits_total",
        "Relay circuits asked of this node by peers, by result.",
        MetricKind::Counter,
        Box::new(move |w| {
            let (carried, refused, _) = ex.relay_totals();
            w.sample(&[("result", "carried")], carried);
            w.sample(&[("result", "refused")], refused);
        }),
    );
    let ex = exchange.clone();
    registry.register_value(
        "rn_relay_bytes_total",
        "Bytes this node relayed for others (both directions).",
        MetricKind::Counter,
        move || ex.relay_totals().2,
    );
    let ex = exchange.clone();
    registry.register_value(
        "rn_connected_peers",
        "Peers with an open QUIC connection.",
        MetricKind::Gauge,
        move || ex.connected_peers(),
    );
}

/// The DHT's families: counters and the routing table's state, each read once per scrape.
fn register_dht_metrics(registry: &Registry, dht: &Dht) {
    use std::convert::Infallible;
    // One counters snapshot per scrape instead of one per family.
    let d = dht.clone();
    let counters = registry.snapshot("DHT counters", move || {
        let c = d.counters();
        async move { Ok::<_, Infallible>(c) }
    });
    for (name, help, field) in [
        (
            "rn_dht_announces_sent_total",
            "Announces sent to the DHT.",
            (|c| c.announces_sent) as fn(&dht::DhtCounters) -> u64,
        ),
        ("rn_dht_announces_failed_total", "Announces that failed.", |c| c.announces_failed),
        ("rn_dht_lookups_started_total", "Topic lookups started.", |c| c.lookups_started),
        ("rn_dht_lookups_finished_total", "Topic lookups that ran to their end.", |c| c.lookups_finished),
        ("rn_dht_peers_found_total", "Peer addresses found and handed to the dialer.", |c| c.peers_found),
        (
            "rn_dht_discoveries_dropped_total",
            "Discovery batches dropped because the dialer's queue stayed full.",
            |c| c.discoveries_dropped,
        ),
    ] {
        registry.register_from(name, help, MetricKind::Counter, &counters, field);
    }
    let d = dht.clone();
    let status = registry.snapshot("DHT status", move || {
        let d = d.clone();
        async move { Ok::<_, Infallible>(d.status().await) }
    });
    registry.register_from(
        "rn_dht_routing_table_nodes",
        "Nodes in the DHT routing table.",
        MetricKind::Gauge,
        &status,
        |s| s.routing_table_size,
    );
    registry.register_from(
        "rn_dht_firewalled",
        "1 while the DHT has not confirmed that our public address is reachable.",
        MetricKind::Gauge,
        &status,
        |s| s.firewalled,
    );
}

/// The store's families: statistics read at scrape time, and the writer's batch histograms.
fn register_store_metrics(registry: &Registry, store: &Store) {
    let st = store.clone();
    let stats = registry.snapshot("store stats", move || {
        let st = st.clone();
        async move { st.stats().await }
    });
    registry.register_from("rn_store_peers", "Peers in the store.", MetricKind::Gauge, &stats, |s| s.peers);
    registry.register_from(
        "rn_store_peer_addresses",
        "Peer addresses in the store.",
        MetricKind::Gauge,
        &stats,
        |s| s.peer_addresses,
    );
    registry.register_from("rn_store_joined_topics", "Topics joined.", MetricKind::Gauge, &stats, |s| {
        s.joined_topics
    });
    registry.register_from(
        "rn_store_size_bytes",
        "Size of the peer database files.",
        MetricKind::Gauge,
        &stats,
        |s| s.size_bytes,
    );
    registry.register_from(
        "rn_store_writes_committed_total",
        "Writes committed to the peer database.",
        MetricKind::Counter,
        &stats,
        |s| s.writes_committed,
    );
    registry.register_from(
        "rn_store_write_batches_total",
        "Write transactions (batches of writes) committed.",
        MetricKind::Counter,
        &stats,
        |s| s.write_batches,
    );
    let st = store.clone();
    registry.register_value(
        "rn_store_healthy",
        "1 while the store accepts writes; 0 when degraded (see /readyz for the reason).",
        MetricKind::Gauge,
        move || st.health() == StoreHealth::Ok,
    );
    // The writer fills these histograms itself (a few atomic adds per batch); a scrape only copies them.
    let st = store.clone();
    registry.register(
        "rn_store_write_batch_size",
        "Writes per committed write transaction (batch).",
        MetricKind::Histogram,
        Box::new(move |w| w.histogram(&[], &st.write_batch_sizes())),
    );
    let st = store.clone();
    registry.register(
        "rn_store_write_batch_seconds",
        "Time from BEGIN to the end of COMMIT of each committed write batch; writes wait at least this long.",
        MetricKind::Histogram,
        Box::new(move |w| w.histogram(&[], &st.write_batch_seconds())),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::names::NodeId;
    use crate::store::PeerUpsert;

    /// The value of the unlabelled sample `name` in a rendered scrape.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn store_write_batches_are_exported_as_histograms() {
        let dir = tempfile::TempDir::new().expect("test: temporary directory");
        let store =
            Store::open(StoreOptions::new(dir.path().join("peers.db"))).expect("test: open the store");
        let registry = Registry::new();
        register_store_metrics(&registry, &store);
        let before = registry.scrape().await;

        let now = crate::clock::now_ms();
        let upsert = |i: u8| {
            store.upsert_peer(PeerUpsert {
                node_id: NodeId([i; 32]),
                seq: 1,
                record: vec![i],
                seen_at_ms: now,
                ..PeerUpsert::default()
            })
        };
        let (a, b, c) = tokio::join!(upsert(1), upsert(2), upsert(3));
        for result in [a, b, c] {
            result.expect("test: upsert");
        }
        let text = registry.scrape().await;

        for family in ["rn_store_write_batch_size", "rn_store_write_batch_seconds"] {
            assert!(text.contains(&format!("# TYPE {family} histogram")), "{text}");
            let count = |text: &str| sample(text, &format!("{family}_count"));
            // At least one batch more than before the writes (the store's first prune is a batch too).
            assert!(count(&text) > count(&before), "{family}: {text}");
            assert!(sample(&text, &format!("{family}_sum")) > 0.0, "{family}: {text}");
        }
        // Three writes committed in one or more batches: the sizes add up to at least three.
        let sizes =
            sample(&text, "rn_store_write_batch_size_sum") - sample(&before, "rn_store_write_batch_size_sum");
        assert!(sizes >= 3.0, "{text}");
        store.close().await.expect("test: close");
    }
}
