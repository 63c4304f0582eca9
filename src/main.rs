//! The `remote-network` daemon: arguments → configuration → `Node::start` → wait for SIGTERM/SIGINT → graceful
//! stop.
//!
//! Exit codes: 0 after a graceful stop, 1 when the node fails to start or to stop in time, 2 for usage errors,
//! 78 (EX_CONFIG) for configuration errors, so a unit can use `RestartPreventExitStatus=78` to avoid restart
//! loops on a bad config.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use remote_network::config::{self, Env, FlagValues, Loaded};
use remote_network::lifecycle;
use remote_network::node::{Node, StartError};

mod devnet;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Heap profiling is on from the start (one sample per 512 KiB allocated on average; see the monitoring README
/// for the measured cost), so `/debug/pprof/heap` works without a restart. tikv-jemallocator prefixes
/// jemalloc's symbols with `_rjem_` on Linux, so the plain `malloc_conf` name would be silently ignored.
/// `_RJEM_MALLOC_CONF=prof:false` in the environment overrides this.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "remote-network",
    version,
    about = "Peer-to-peer node: Mainline DHT discovery, QUIC metadata \
    exchange, SQLite peer store, gRPC control API (driven by rnctl)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node in the foreground (under systemd: Type=notify).
    Start(StartArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Start a local network of N nodes on loopback, offline, and show who has verified whom (Ctrl-C stops it).
    Devnet {
        /// Number of nodes.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Topic every node joins.
        #[arg(long, default_value = "devnet")]
        topic: String,
        /// Stop by itself after this many seconds (for scripts); by default runs until Ctrl-C.
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
        /// Stop as soon as every node has verified every other (exit 1 if --duration passes first).
        #[arg(long)]
        until_verified: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration as TOML, with the source of each value.
    Show {
        #[command(flatten)]
        args: StartArgs,
        /// Also print what each key means, its environment variable and flag.
        #[arg(long)]
        docs: bool,
    },
}

/// Flags override `RN_*` environment variables, which override the config file.
#[derive(Args, Clone)]
struct StartArgs {
    /// Config file (default: $XDG_CONFIG_HOME/remote-network/config.toml, then /etc/remote-network/config.toml).
    #[arg(long, value_name = "FILE", env = "RN_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the node key and peer database.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Unix socket of the control API.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<String>,
    /// Also serve the control API on TCP (a non-loopback address requires a token).
    #[arg(long, value_name = "ADDR:PORT")]
    control_tcp: Option<String>,
    /// File holding the bearer token required on the TCP listener.
    #[arg(long, value_name = "FILE")]
    control_token_file: Option<String>,
    /// UDP address of the QUIC endpoint.
    #[arg(long, value_name = "ADDR:PORT")]
    quic_listen: Option<String>,
    /// UDP address of the DHT node.
    #[arg(long, value_name = "ADDR:PORT")]
    dht_listen: Option<String>,
    /// DHT bootstrap node; repeat for several. Replaces the public default routers.
    #[arg(long, value_name = "HOST:PORT")]
    bootstrap: Vec<String>,
    /// Start a DHT of its own: contact no bootstrap node (others bootstrap from this one).
    #[arg(long, conflicts_with = "bootstrap")]
    no_bootstrap: bool,
    /// Answer DHT queries from the start (dht.mode = server), so other nodes can bootstrap from this one.
    #[arg(long)]
    dht_server: bool,
    /// HTTP address of the metrics and profiling endpoints.
    #[arg(long, value_name = "ADDR:PORT")]
    monitoring_listen: Option<String>,
    /// Log filter, such as info or remote_network=debug (RUST_LOG is used when this is absent).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log lines as readable text or as one JSON object each.
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
}

impl StartArgs {
    fn flag_values(&self) -> FlagValues {
        let mut flags = FlagValues::default();
        flags.set("data_dir", self.data_dir.clone());
        flags.set("control.socket", self.control_socket.clone());
        flags.set("control.tcp", self.control_tcp.clone());
        flags.set("control.token_file", self.control_token_file.clone());
        flags.set("quic.listen", self.quic_listen.clone());
        flags.set("dht.listen", self.dht_listen.clone());
        flags.set_list("dht.bootstrap", self.bootstrap.clone());
        if self.no_bootstrap {
            flags.set_empty_list("dht.bootstrap");
        }
        flags.set("dht.mode", self.dht_server.then(|| "server".to_owned()));
        flags.set("monitoring.listen", self.monitoring_listen.clone());
        flags.set("log_level", self.log_level.clone());
        flags.set("log_format", self.log_format.clone());
        flags
    }

    fn load(&self) -> Result<Loaded, config::ConfigError> {
        let env = Env::capture();
        let file = config::find_file(self.config.as_deref(), &env);
        config::load(file.as_deref(), &env, &self.flag_values())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCommand::Show { args, docs }) => match args.load() {
            Ok(loaded) => {
                print!("{}", loaded.render(docs));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("remote-network: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Devnet { nodes, topic, duration, until_verified } => {
            match devnet::run(nodes, &topic, duration.map(std::time::Duration::from_secs), until_verified) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("remote-network devnet: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Start(args) => {
            let loaded = match args.load() {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("remote-network: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let (mut otel, log_filter) = init_logging(&loaded.config.log_level, loaded.config.log_format);
            let code = match run(loaded, || args.load(), &log_filter) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let message = error_chain(&e);
                    tracing::error!("{message}");
                    lifecycle::notify_status(&format!("failed: {message}"));
                    // A setting the node cannot use (such as a token file others may read) is the operator's
                    // to fix, like a bad config file: the same exit code, so systemd does not restart in vain.
                    let config_fault =
                        e.downcast_ref::<StartError>().is_some_and(StartError::is_configuration);
                    ExitCode::from(if config_fault { EXIT_CONFIG } else { EXIT_FAILURE })
                }
            };
            // After the node's runtime is gone: flush the last spans (bounded in time).
            if let Some(guard) = otel.as_mut() {
                guard.shutdown();
            }
            code
        }
    }
}

/// An error and its causes as one line, each cause once: our error types quote their cause in their own
/// message, so a cause already in the text so far is not repeated (`{:#}` would print `X: X`).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// Changes the log filter of the running subscriber (a reload of `log_level`).
type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Runs the node until SIGTERM or SIGINT; on SIGHUP, `reload` loads the configuration again and the node
/// applies what changed (see [`reload`]).
fn run(
    loaded: Loaded,
    reload: impl Fn() -> Result<Loaded, config::ConfigError>,
    log_filter: &LogFilter,
) -> anyhow::Result<()> {
    let config = loaded.config.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("remote-network")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        if let Some(file) = &loaded.file {
            tracing::info!(file = %file.display(), "configuration loaded");
        }
        let signal = lifecycle::shutdown_signals().context("cannot install the SIGTERM/SIGINT handlers")?;
        lifecycle::arm_stop_deadline(config.shutdown_timeout + STOP_DEADLINE_SLACK, i32::from(EXIT_FAILURE))
            .context("cannot start the stop deadline")?;
        // Before readiness, like the stop signals: SIGHUP's default action would end the process.
        let mut hangups = lifecycle::hangup_signals().context("cannot install the SIGHUP handler")?;
        let node = Node::start(&config).await?;
        {
            let running = node.run_until(async {
                let name = signal.await;
                tracing::info!(signal = name, "stopping");
                lifecycle::stop_stage("stopping the node");
            });
            tokio::pin!(running);
            let mut current = loaded;
            loop {
                tokio::select! {
                    () = &mut running => break,
                    Some(()) = hangups.recv() => {
                        if let Some(newer) = apply_reload(&node, &current, &reload, log_filter).await {
                            current = newer;
                        }
                    }
                }
            }
        }
        tokio::time::timeout(config.shutdown_timeout, node.stop())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "graceful stop took longer than shutdown_timeout ({}); exiting anyway",
                    config::format_duration(config.shutdown_timeout)
                )
            })?
            .context("store did not close cleanly")
    });
    // Dropping a runtime waits for every blocking task without limit (a store read queued behind a busy pool
    // waits up to the pool's timeout); the node has stopped or given up by now, so the process exits promptly.
    lifecycle::stop_stage("waiting for the runtime's last tasks");
    runtime.shutdown_timeout(RUNTIME_EXIT_GRACE);
    lifecycle::stop_stage("flushing traces");
    result
}

/// A SIGHUP: loads the configuration again and applies what changed. A file that does not load is refused
/// with the same message as at start and the running settings stay; returns the new configuration otherwise.
async fn apply_reload(
    node: &Node,
    current: &Loaded,
    reload: &impl Fn() -> Result<Loaded, config::ConfigError>,
    log_filter: &LogFilter,
) -> Option<Loaded> {
    let newer = match reload() {
        Ok(newer) => newer,
        Err(e) => {
            tracing::error!("configuration not reloaded, the running settings stay: {e}");
            return None;
        }
    };
    let changes = current.changes(&newer);
    if changes.iter().any(|change| change.key == "log_level") {
        let filter = tracing_subscriber::EnvFilter::try_new(&newer.config.log_level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        if let Err(e) = log_filter.reload(filter) {
            tracing::warn!(error = %e, "could not change the log level");
        }
    }
    // Called even when the file is unchanged: the control token file it names is read again.
    let report = node.reconfigure(&changes, &newer.config).await;
    let unchanged = |key: &str| !changes.iter().any(|change| change.key == key);
    for key in report.applied.iter().filter(|key| unchanged(key)) {
        tracing::info!(setting = key, "setting reloaded from the file it names");
    }
    for (key, why) in report.failed.iter().filter(|(key, _)| unchanged(key)) {
        tracing::error!(setting = key, error = %why, "setting could not be reloaded; the old value stays");
    }
    if changes.is_empty() && report.applied.is_empty() && report.failed.is_empty() {
        tracing::info!("configuration reloaded: nothing changed");
        return Some(newer);
    }
    for change in &changes {
        let (key, old, new) = (change.key, &change.old, &change.new);
        if report.applied.contains(&key) {
            tracing::info!(setting = key, %old, %new, "setting changed");
        } else if let Some((_, why)) = report.failed.iter().find(|(failed, _)| *failed == key) {
            tracing::error!(setting = key, %old, %new, error = %why, "setting could not be changed; the old value stays");
        } else {
            tracing::warn!(setting = key, %old, %new, "setting changed in the configuration; it takes effect after a restart");
        }
    }
    tracing::info!(
        applied = report.applied.len(),
        need_restart = report.need_restart.len(),
        failed = report.failed.len(),
        "configuration reloaded"
    );
    lifecycle::notify_status(&format!(
        "configuration reloaded: {} applied, {} need a restart",
        report.applied.len(),
        report.need_restart.len()
    ));
    Some(newer)
}

/// Beyond `shutdown_timeout`, how long the process may take to exit before the stop deadline ends it: the
/// runtime's exit grace, the trace flush, and a margin.
const STOP_DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_secs(8);

/// How long blocking tasks still running after the node stopped may hold the process's exit.
const RUNTIME_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Logs go to stderr. Under systemd (JOURNAL_STREAM is set) journald adds its own timestamps and shows no
/// colours, so neither is written; JSON lines carry their own timestamp for shippers that read them raw.
/// Spans also go to an OTLP collector when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set; the
/// returned guard flushes them at exit.
fn init_logging(
    filter: &str,
    format: config::LogFormat,
) -> (Option<remote_network::telemetry::otel::OtelGuard>, LogFilter) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        config::LogFormat::Json => fmt.json().with_current_span(true).boxed(),
        config::LogFormat::Text if under_journald => fmt.with_ansi(false).without_time().boxed(),
        config::LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    let (otel, guard, otel_error) = match remote_network::telemetry::otel::layer_from_env() {
        Ok(Some((layer, guard))) => (Some(layer), Some(guard), None),
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e)),
    };
    // mainline logs "Could not bootstrap the routing table" at ERROR each time its bootstrap nodes fail to
    // answer, every 2 s while its routing table is empty (its only ERROR event). The DHT adapter reports that
    // state itself, with backoff and with what to do (`remote_network::dht::actor`), so the repetition is dropped.
    let repeated_bootstrap_error = tracing_subscriber::filter::filter_fn(|metadata| {
        !(metadata.target() == "mainline::rpc" && *metadata.level() == tracing::Level::ERROR)
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter).with_filter(repeated_bootstrap_error))
        .with(otel)
        .init();
    if let Some(e) = otel_error {
        tracing::warn!("{e}; traces are not exported");
    }
    if let Some(guard) = &guard {
        let config = guard.config();
        tracing::info!(endpoint = %config.endpoint, protocol = ?config.protocol, "exporting traces over OTLP");
    }
    (guard, filter_handle)
}
