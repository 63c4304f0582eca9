//! The node's configuration: a TOML file, `RN_*` environment variables and command-line flags, layered with
//! precedence flags > environment > file > defaults.
//!
//! Every setting is declared once in [`SETTINGS`] (its key, environment variable, flag, meaning and kind). That
//! one table drives loading, unknown-key detection, validation messages ("what was wrong and what is accepted")
//! and `remote-network config show`, which prints the effective value of each key with where it came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::limits::ServerLimitSettings;

/// File name looked up in the configuration directories.
const CONFIG_FILE: &str = "config.toml";
/// Directory name used under the XDG and systemd directories.
const APP_DIR: &str = "remote-network";
/// The control socket's file name inside its runtime directory.
const SOCKET_FILE: &str = "control.sock";
/// What `config show` prints for a secret that is set.
const REDACTED: &str = "<redacted>";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// What kind of value a setting holds; decides parsing and the "accepted values" text of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Path,
    Addr,
    OptionalAddr,
    HostPortList,
    Duration,
    Count,
    LogLevel,
    Secret,
    OptionalPath,
    DhtMode,
    LogFormat,
    Bool,
    Bytes,
}

impl Kind {
    fn accepted(self) -> &'static str {
        match self {
            Kind::Path | Kind::OptionalPath => "a file system path",
            Kind::Addr => "IP:PORT, such as 0.0.0.0:30906 or [::1]:30906",
            Kind::OptionalAddr => "IP:PORT such as 127.0.0.1:50051, or an empty string for none",
            Kind::HostPortList => "a list of HOST:PORT, such as [\"router.bittorrent.com:6881\"]",
            Kind::Duration => "a duration such as 90s, 15m, 12h, 30d or 1h30m (a bare number is seconds)",
            Kind::Count => "a whole number of at least 1",
            Kind::LogLevel => {
                "error, warn, info, debug, trace, or a tracing filter such as info,remote_network=debug"
            }
            Kind::Secret => "a string of printable ASCII without spaces",
            Kind::DhtMode => "auto, server or client",
            Kind::LogFormat => "text or json",
            Kind::Bool => "true or false",
            Kind::Bytes => "a number of bytes of at least 1, optionally with a unit: 65536, 64KiB, 32MiB",
        }
    }
}

/// One configuration key.
struct Setting {
    key: &'static str,
    env: &'static str,
    flag: Option<&'static str>,
    kind: Kind,
    doc: &'static str,
}

/// Every configuration key, in the order `config show` prints them.
const SETTINGS: &[Setting] = &[
    Setting {
        key: "data_dir",
        env: "RN_DATA_DIR",
        flag: Some("--data-dir"),
        kind: Kind::Path,
        doc: "Directory holding the node key and the peer database. Default: $STATE_DIRECTORY (systemd), \
              else $XDG_DATA_HOME/remote-network.",
    },
    Setting {
        key: "log_level",
        env: "RN_LOG_LEVEL",
        flag: Some("--log-level"),
        kind: Kind::LogLevel,
        doc: "Log filter. RUST_LOG, when set, is used before RN_LOG_LEVEL.",
    },
    Setting {
        key: "log_format",
        env: "RN_LOG_FORMAT",
        flag: Some("--log-format"),
        kind: Kind::LogFormat,
        doc: "text: one readable line per event (under journald without colours or timestamps); json: one JSON \
              object per line, for log shippers.",
    },
    Setting {
        key: "shutdown_timeout",
        env: "RN_SHUTDOWN_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "How long a graceful stop may take before the process gives up and exits with an error.",
    },
    Setting {
        key: "control.socket",
        env: "RN_CONTROL_SOCKET",
        flag: Some("--control-socket"),
        kind: Kind::Path,
        doc: "Unix socket of the gRPC control API (mode 0660). Default: $RUNTIME_DIRECTORY/control.sock, \
              else $XDG_RUNTIME_DIR/remote-network/control.sock, else /run/remote-network/control.sock for \
              root, else in the data dir.",
    },
    Setting {
        key: "control.tcp",
        env: "RN_CONTROL_TCP",
        flag: Some("--control-tcp"),
        kind: Kind::OptionalAddr,
        doc: "Optional TCP listener for the control API. A non-loopback address requires a token.",
    },
    Setting {
        key: "control.token",
        env: "RN_CONTROL_TOKEN",
        flag: None,
        kind: Kind::Secret,
        doc: "Bearer token required on the TCP listener. Prefer control.token_file.",
    },
    Setting {
        key: "control.token_file",
        env: "RN_CONTROL_TOKEN_FILE",
        flag: Some("--control-token-file"),
        kind: Kind::OptionalPath,
        doc: "File holding the bearer token (must not be readable by others).",
    },
    Setting {
        key: "control.max_connections",
        env: "RN_CONTROL_MAX_CONNECTIONS",
        flag: None,
        kind: Kind::Count,
        doc: "Control connections (socket and TCP, each) served at once; more are closed as they arrive.",
    },
    Setting {
        key: "control.handshake_timeout",
        env: "RN_CONTROL_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "How long a new control connection may take to send the HTTP/2 preface and its first request's \
              headers.",
    },
    Setting {
        key: "control.idle_timeout",
        env: "RN_CONTROL_IDLE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "A control connection with no call in progress for this long is closed (clients reconnect on \
              their next call; a watch in progress keeps its connection).",
    },
    Setting {
        key: "quic.listen",
        env: "RN_QUIC_LISTEN",
        flag: Some("--quic-listen"),
        kind: Kind::Addr,
        doc: "UDP address of the QUIC endpoint (listening and dialing share this one socket).",
    },
    Setting {
        key: "quic.max_connections",
        env: "RN_QUIC_MAX_CONNECTIONS",
        flag: None,
        kind: Kind::Count,
        doc: "Most QUIC connections at once, inbound and outbound; more inbound ones are refused before any \
              TLS work.",
    },
    Setting {
        key: "quic.handshake_timeout",
        env: "RN_QUIC_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "How long a QUIC handshake we dial may take before the dial fails.",
    },
    Setting {
        key: "quic.inbound_handshake_timeout",
        env: "RN_QUIC_INBOUND_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "How long an inbound QUIC handshake may hold its slot; a dialer that stalls longer is dropped.",
    },
    Setting {
        key: "quic.max_pending_handshakes",
        env: "RN_QUIC_MAX_PENDING_HANDSHAKES",
        flag: None,
        kind: Kind::Count,
        doc: "Most inbound QUIC handshakes in progress at once; more attempts are refused until some finish.",
    },
    Setting {
        key: "quic.retry_threshold",
        env: "RN_QUIC_RETRY_THRESHOLD",
        flag: None,
        kind: Kind::Count,
        doc: "Inbound handshakes in progress from which new dialers must first prove their address with a QUIC \
              Retry (one extra round trip; stops floods from spoofed or silent sources).",
    },
    Setting {
        key: "quic.max_unvalidated_per_ip",
        env: "RN_QUIC_MAX_UNVALIDATED_PER_IP",
        flag: None,
        kind: Kind::Count,
        doc: "Inbound handshakes one IP may have in progress before proving its address; its further dialers \
              get a QUIC Retry.",
    },
    Setting {
        key: "dht.listen",
        env: "RN_DHT_LISTEN",
        flag: Some("--dht-listen"),
        kind: Kind::Addr,
        doc: "UDP address of the Mainline DHT node.",
    },
    Setting {
        key: "dht.bootstrap",
        env: "RN_DHT_BOOTSTRAP",
        flag: Some("--bootstrap"),
        kind: Kind::HostPortList,
        doc: "DHT bootstrap nodes (comma-separated in the environment). Giving any replaces the public \
              default routers.",
    },
    Setting {
        key: "dht.mode",
        env: "RN_DHT_MODE",
        flag: Some("--dht-server"),
        kind: Kind::DhtMode,
        doc: "server: answer DHT queries from the start (a reachable node should, so that a network of our \
              nodes works on its own); client: only query; auto: serve once the DHT finds us reachable.",
    },
    Setting {
        key: "dht.announce_interval",
        env: "RN_DHT_ANNOUNCE_INTERVAL",
        flag: None,
        kind: Kind::Duration,
        doc: "How often each joined topic is announced again (BEP 5 peers expire after about 30 minutes).",
    },
    Setting {
        key: "dht.lookup_interval",
        env: "RN_DHT_LOOKUP_INTERVAL",
        flag: None,
        kind: Kind::Duration,
        doc: "How often each joined topic is looked up again (with jitter; sooner while no peer is known).",
    },
    Setting {
        key: "monitoring.listen",
        env: "RN_MONITORING_LISTEN",
        flag: Some("--monitoring-listen"),
        kind: Kind::Addr,
        doc: "HTTP address of the metrics and profiling endpoints. Keep it on loopback unless protected. When \
              the default 127.0.0.1:6060 is taken (a second node on the machine), another loopback port is \
              used with a warning; an address set here that is taken stops the node.",
    },
    Setting {
        key: "monitoring.max_connections",
        env: "RN_MONITORING_MAX_CONNECTIONS",
        flag: None,
        kind: Kind::Count,
        doc: "Monitoring HTTP connections served at once; more are closed as they arrive.",
    },
    Setting {
        key: "monitoring.handshake_timeout",
        env: "RN_MONITORING_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "How long a request's headers may take to arrive on the monitoring port.",
    },
    Setting {
        key: "monitoring.idle_timeout",
        env: "RN_MONITORING_IDLE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        doc: "A monitoring connection on which nothing moves for this long is closed.",
    },
    Setting {
        key: "store.retention",
        env: "RN_STORE_RETENTION",
        flag: None,
        kind: Kind::Duration,
        doc: "Peers not seen for this long are removed from the database.",
    },
    Setting {
        key: "store.max_peers",
        env: "RN_STORE_MAX_PEERS",
        flag: None,
        kind: Kind::Count,
        doc: "Hard bound on stored peers; beyond it the least recently seen are removed.",
    },
    Setting {
        key: "store.max_joined_topics",
        env: "RN_STORE_MAX_JOINED_TOPICS",
        flag: None,
        kind: Kind::Count,
        doc: "Hard bound on topics the node can join at once.",
    },
    Setting {
        key: "relay.enabled",
        env: "RN_RELAY_ENABLED",
        flag: None,
        kind: Kind::Bool,
        doc: "Relay circuits for peers that cannot be reached otherwise (they must reserve a slot first). Only \
              peers behind NATs that hold a direct connection to this node can reserve, so it matters on \
              publicly reachable nodes.",
    },
    Setting {
        key: "relay.max_reservations",
        env: "RN_RELAY_MAX_RESERVATIONS",
        flag: None,
        kind: Kind::Count,
        doc: "Peers that may hold a relay reservation at once.",
    },
    Setting {
        key: "relay.max_circuits",
        env: "RN_RELAY_MAX_CIRCUITS",
        flag: None,
        kind: Kind::Count,
        doc: "Relay circuits carried at once.",
    },
    Setting {
        key: "relay.max_bytes_per_second",
        env: "RN_RELAY_MAX_BYTES_PER_SECOND",
        flag: None,
        kind: Kind::Bytes,
        doc: "Rate limit of each relay circuit, each way.",
    },
    Setting {
        key: "relay.max_bytes_per_circuit",
        env: "RN_RELAY_MAX_BYTES_PER_CIRCUIT",
        flag: None,
        kind: Kind::Bytes,
        doc: "Bytes one relay circuit may carry in total (both ways); it is closed beyond.",
    },
];

/// The public Mainline routers (as listed by the `mainline` crate). Production default only: tests and the
/// devnet always pass their own bootstrap nodes.
const DEFAULT_BOOTSTRAP: &[&str] = &[
    "router.bittorrent.com:6881",
    "dht.transmissionbt.com:6881",
    "dht.libtorrent.org:25401",
    "relay.pkarr.org:6881",
];

/// The node's effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    pub control: ControlConfig,
    pub quic_listen: SocketAddr,
    /// The QUIC transport's limits (connections, handshakes, admission); windows keep their defaults.
    pub quic_limits: crate::quic::QuicLimits,
    pub dht: DhtConfig,
    pub monitoring_listen: SocketAddr,
    /// Where `monitoring_listen` came from: only the built-in default may be replaced by another port when it is
    /// taken (a second node on the machine); an address the operator chose is kept or the node does not start.
    pub monitoring_listen_source: Source,
    /// Connection cap and timeouts of the monitoring port.
    pub monitoring_limits: ServerLimitSettings,
    pub store: StoreConfig,
    pub relay: RelayConfig,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub enabled: bool,
    pub max_reservations: u64,
    pub max_circuits: u64,
    pub max_bytes_per_second: u64,
    pub max_bytes_per_circuit: u64,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    /// Where the token comes from; read when the listener starts so that the secret stays out of this struct's
    /// `Debug` output and of `config show`.
    pub token: Option<TokenSource>,
    /// Connection cap and timeouts of each control listener.
    pub limits: ServerLimitSettings,
}

#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DhtConfig {
    pub listen: SocketAddr,
    pub bootstrap: Vec<String>,
    pub mode: DhtMode,
    pub announce_interval: Duration,
    pub lookup_interval: Duration,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether the node answers DHT queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhtMode {
    Auto,
    Server,
    Client,
}

impl DhtMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Server => "server",
            Self::Client => "client",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub retention: Duration,
    pub max_peers: u64,
    pub max_joined_topics: u64,
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// A default derived from an environment variable (such as `$STATE_DIRECTORY`).
    DefaultFrom(&'static str),
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

impl Source {
    /// The value is a built-in default (possibly derived from the environment), not one the operator gave.
    pub fn is_default(&self) -> bool {
        matches!(self, Self::Default | Self::DefaultFrom(_))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::DefaultFrom(var) => write!(f, "default (from ${var})"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(var) => write!(f, "env {var}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// A value as given, before it is parsed according to its [`Kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Raw {
    Text(String),
    List(Vec<String>),
}

/// Each key's effective value as TOML text, with its source.
type Shown = Vec<(&'static str, String, Source)>;

/// Values given on the command line, by key. Built by the binary from its flags.
#[derive(Debug, Clone, Default)]
pub struct FlagValues {
    values: BTreeMap<&'static str, Raw>,
}

impl FlagValues {
    /// Sets a single-valued key; `None` leaves it unset.
    pub fn set(&mut self, key: &'static str, value: Option<String>) {
        if let Some(value) = value {
            self.values.insert(key, Raw::Text(value));
        }
    }

    /// Sets a list key; an empty list leaves it unset.
    pub fn set_list(&mut self, key: &'static str, values: Vec<String>) {
        if !values.is_empty() {
            self.values.insert(key, Raw::List(values));
        }
    }

    /// Sets a list key to the empty list (as opposed to leaving it unset).
    pub fn set_empty_list(&mut self, key: &'static str) {
        self.values.insert(key, Raw::List(Vec::new()));
    }
}

/// The process environment, captured once so that loading is a pure function of its inputs (and testable).
#[derive(Debug, Clone, Default)]
pub struct Env(HashMap<String, String>);

impl Env {
    pub fn capture() -> Self {
        Self(std::env::vars().collect())
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// Why the configuration could not be loaded. Each message names the key or file and says what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("unknown config key `{key}` in {path}; known keys: {known}")]
    UnknownKey { key: String, path: PathBuf, known: String },
    #[error("config key `{key}` ({origin}): {problem}; expected {accepted}")]
    BadValue { key: &'static str, origin: Source, problem: String, accepted: &'static str },
    #[error("{0}")]
    Invalid(String),
}

/// The effective configuration plus, for each key, the value as text and its source (for `config show`).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub file: Option<PathBuf>,
    shown: Shown,
}

/// A setting whose effective value differs between two loads of the configuration (see [`Loaded::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    /// The values as `config show` prints them; secrets stay redacted.
    pub old: String,
    pub new: String,
}

impl Loaded {
    /// The settings whose values differ in `newer`, in the order `config show` lists them. A secret given
    /// inline (`control.token`) counts as changed when its value differs, though both sides stay redacted.
    pub fn changes(&self, newer: &Loaded) -> Vec<Change> {
        let mut changes: Vec<Change> = self
            .shown
            .iter()
            .zip(&newer.shown)
            .filter(|((_, old, _), (_, new, _))| old != new)
            .map(|((key, old, _), (_, new, _))| Change { key, old: old.clone(), new: new.clone() })
            .collect();
        if self.config.control.token != newer.config.control.token
            && !changes.iter().any(|change| change.key == "control.token")
        {
            changes.push(Change { key: "control.token", old: REDACTED.into(), new: REDACTED.into() });
        }
        changes
    }

    /// The effective configuration as TOML, each key followed by a comment naming where its value came from;
    /// with `with_docs`, each key is preceded by what it means.
    pub fn render(&self, with_docs: bool) -> String {
        // Align the source comments, but let an unusually long line (a bootstrap list) run past the column.
        const MAX_ALIGN: usize = 56;
        let width = self
            .shown
            .iter()
            .map(|(k, v, _)| k.len() + v.len() + 3)
            .filter(|&w| w <= MAX_ALIGN)
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        match &self.file {
            Some(path) => out.push_str(&format!("# config file: {}\n", path.display())),
            None => out.push_str("# config file: none found\n"),
        }
        for (key, value, source) in &self.shown {
            if with_docs && let Some(setting) = setting(key) {
                out.push_str(&format!("\n# {}\n# env {}", setting.doc, setting.env));
                if let Some(flag) = setting.flag {
                    out.push_str(&format!(", flag {flag}"));
                }
                out.push('\n');
            }
            // A secret is never printed, and not as a value either: copied into a file it would become the token.
            let line = if value == REDACTED {
                format!("# {key} = (set, not shown)")
            } else {
                format!("{key} = {value}")
            };
            out.push_str(&format!("{line:<width$}  # {source}\n"));
        }
        out
    }
}

/// Finds the config file: the explicit path if given (it must exist), else the first that exists of
/// `$XDG_CONFIG_HOME/remote-network/config.toml` (default `~/.config`) and `/etc/remote-network/config.toml`.
pub fn find_file(explicit: Option<&Path>, env: &Env) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    let user_dir = env
        .get("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|home| Path::new(home).join(".config")));
    user_dir
        .map(|dir| dir.join(APP_DIR).join(CONFIG_FILE))
        .into_iter()
        .chain([Path::new("/etc").join(APP_DIR).join(CONFIG_FILE)])
        .find(|path| path.is_file())
}

/// Loads the configuration from an optional file, the environment and flags.
pub fn load(file: Option<&Path>, env: &Env, flags: &FlagValues) -> Result<Loaded, ConfigError> {
    let file_values = match file {
        Some(path) => read_file(path)?,
        None => BTreeMap::new(),
    };
    let resolver = Resolver { file, file_values, env, flags, shown: Vec::new() };
    resolver.resolve().map(|(config, shown)| Loaded { config, file: file.map(Path::to_path_buf), shown })
}

/// Reads and flattens a TOML file into dotted keys, refusing keys that no setting declares.
fn read_file(path: &Path) -> Result<BTreeMap<String, Raw>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut flat = BTreeMap::new();
    flatten(path, "", &table, &mut flat)?;
    Ok(flat)
}

fn flatten(
    path: &Path,
    prefix: &str,
    table: &toml::Table,
    out: &mut BTreeMap<String, Raw>,
) -> Result<(), ConfigError> {
    for (name, value) in table {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        let known = setting(&key).is_some();
        let raw = match value {
            toml::Value::Table(inner) if !known => {
                flatten(path, &key, inner, out)?;
                continue;
            }
            toml::Value::String(s) => Raw::Text(s.clone()),
            toml::Value::Integer(i) => Raw::Text(i.to_string()),
            toml::Value::Float(f) => Raw::Text(f.to_string()),
            toml::Value::Boolean(b) => Raw::Text(b.to_string()),
            toml::Value::Array(items) => Raw::List(
                items
                    .iter()
                    .map(|item| match item {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect(),
            ),
            other => Raw::Text(other.to_string()),
        };
        if !known {
            let known = SETTINGS.iter().map(|s| s.key).collect::<Vec<_>>().join(", ");
            return Err(ConfigError::UnknownKey { key, path: path.to_path_buf(), known });
        }
        out.insert(key, raw);
    }
    Ok(())
}

fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Picks each key's value by precedence and parses it, remembering what it showed.
struct Resolver<'a> {
    file: Option<&'a Path>,
    file_values: BTreeMap<String, Raw>,
    env: &'a Env,
    flags: &'a FlagValues,
    shown: Shown,
}

impl Resolver<'_> {
    /// The highest-precedence raw value of a key, if any was given.
    fn given(&self, setting: &'static Setting) -> Option<(Raw, Source)> {
        if let Some(raw) = self.flags.values.get(setting.key) {
            return Some((raw.clone(), Source::Flag(setting.flag.unwrap_or(setting.key))));
        }
        // RUST_LOG is the ecosystem's variable for log filters; honour it before our own.
        if setting.kind == Kind::LogLevel
            && let Some(value) = self.env.get("RUST_LOG")
        {
            return Some((Raw::Text(value.to_owned()), Source::Env("RUST_LOG".into())));
        }
        if let Some(value) = self.env.get(setting.env) {
            let raw = if setting.kind == Kind::HostPortList {
                Raw::List(value.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            } else {
                Raw::Text(value.to_owned())
            };
            return Some((raw, Source::Env(setting.env.into())));
        }
        let path = self.file?;
        self.file_values.get(setting.key).map(|raw| (raw.clone(), Source::File(path.to_path_buf())))
    }

    /// Resolves a key with a parser and a default; records the shown value.
    fn value<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&Raw) -> Result<T, String>,
        default: impl FnOnce() -> Result<(T, Source), ConfigError>,
        show: impl Fn(&T) -> String,
    ) -> Result<T, ConfigError> {
        self.value_and_source(key, parse, default, show).map(|(value, _)| value)
    }

    /// [`Self::value`], also returning where the value came from, for a setting whose behaviour depends on
    /// whether the operator chose it.
    fn value_and_source<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&Raw) -> Result<T, String>,
        default: impl FnOnce() -> Result<(T, Source), ConfigError>,
        show: impl Fn(&T) -> String,
    ) -> Result<(T, Source), ConfigError> {
        let setting = setting(key).ok_or_else(|| ConfigError::Invalid(format!("no setting {key}")))?;
        let (value, source) = match self.given(setting) {
            Some((raw, source)) => match parse(&raw) {
                Ok(value) => (value, source),
                Err(problem) => {
                    return Err(ConfigError::BadValue {
                        key: setting.key,
                        origin: source,
                        problem,
                        accepted: setting.kind.accepted(),
                    });
                }
            },
            None => default()?,
        };
        self.shown.push((key, show(&value), source.clone()));
        Ok((value, source))
    }

    fn resolve(mut self) -> Result<(Config, Shown), ConfigError> {
        let env = self.env;
        let data_dir =
            self.value("data_dir", parse_path, || default_data_dir(env), |p: &PathBuf| show_path(p))?;
        let log_level = self.value(
            "log_level",
            parse_log_level,
            || Ok(("info".to_owned(), Source::Default)),
            |v| quote(v),
        )?;
        let log_format = self.value(
            "log_format",
            |raw| match text(raw)? {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                other => Err(format!("`{other}` is not a log format")),
            },
            || Ok((LogFormat::Text, Source::Default)),
            |f| quote(if *f == LogFormat::Json { "json" } else { "text" }),
        )?;
        let shutdown_timeout = self.value(
            "shutdown_timeout",
            parse_duration_raw,
            || Ok((Duration::from_secs(10), Source::Default)),
            show_duration,
        )?;
        let socket = self.value(
            "control.socket",
            parse_path,
            || default_socket(env, &data_dir),
            |p: &PathBuf| show_path(p),
        )?;
        let tcp = self.value(
            "control.tcp",
            parse_optional_addr,
            || Ok((None, Source::Default)),
            |v| v.map(|a| quote(&a.to_string())).unwrap_or_else(|| "\"\"".into()),
        )?;
        let inline_token = self.value(
            "control.token",
            parse_secret,
            || Ok((None, Source::Default)),
            |v| if v.is_some() { REDACTED.into() } else { "\"\"".into() },
        )?;
        let token_file = self.value(
            "control.token_file",
            parse_optional_path,
            || Ok((None, Source::Default)),
            |v| v.as_deref().map(show_path).unwrap_or_else(|| "\"\"".into()),
        )?;
        let control_limits = self.server_limits(
            ["control.max_connections", "control.handshake_timeout", "control.idle_timeout"],
            ServerLimitSettings::CONTROL,
        )?;
        let quic_listen =
            self.value("quic.listen", parse_addr, || Ok((addr(0, 30906), Source::Default)), show_addr)?;
        let quic_limits = self.quic_limits()?;
        let dht_listen =
            self.value("dht.listen", parse_addr, || Ok((addr(0, 30609), Source::Default)), show_addr)?;
        let bootstrap = self.value(
            "dht.bootstrap",
            parse_host_ports,
            || Ok((DEFAULT_BOOTSTRAP.iter().map(|s| s.to_string()).collect(), Source::Default)),
            |v| format!("[{}]", v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ")),
        )?;
        let dht_mode = self.value(
            "dht.mode",
            parse_dht_mode,
            || Ok((DhtMode::Auto, Source::Default)),
            |m| quote(m.as_str()),
        )?;
        let announce_interval = self.value(
            "dht.announce_interval",
            parse_interval,
            || Ok((Duration::from_secs(600), Source::Default)),
            show_duration,
        )?;
        let lookup_interval = self.value(
            "dht.lookup_interval",
            parse_interval,
            || Ok((Duration::from_secs(60), Source::Default)),
            show_duration,
        )?;
        let (monitoring_listen, monitoring_listen_source) = self.value_and_source(
            "monitoring.listen",
            parse_addr,
            || Ok((SocketAddr::from(([127, 0, 0, 1], 6060)), Source::Default)),
            show_addr,
        )?;
        let monitoring_limits = self.server_limits(
            ["monitoring.max_connections", "monitoring.handshake_timeout", "monitoring.idle_timeout"],
            ServerLimitSettings::MONITORING,
        )?;
        let retention = self.value(
            "store.retention",
            parse_duration_raw,
            || Ok((Duration::from_secs(30 * 24 * 3600), Source::Default)),
            show_duration,
        )?;
        let max_peers =
            self.value("store.max_peers", parse_count, || Ok((100_000, Source::Default)), u64::to_string)?;
        let max_joined_topics = self.value(
            "store.max_joined_topics",
            parse_count,
            || Ok((1024, Source::Default)),
            u64::to_string,
        )?;

        let relay_enabled =
            self.value("relay.enabled", parse_bool, || Ok((true, Source::Default)), bool::to_string)?;
        let relay_max_reservations =
            self.value("relay.max_reservations", parse_count, || Ok((128, Source::Default)), u64::to_string)?;
        let relay_max_circuits =
            self.value("relay.max_circuits", parse_count, || Ok((64, Source::Default)), u64::to_string)?;
        let relay_max_bytes_per_second = self.value(
            "relay.max_bytes_per_second",
            parse_bytes,
            || Ok((128 * KIB, Source::Default)),
            show_bytes,
        )?;
        let relay_max_bytes_per_circuit = self.value(
            "relay.max_bytes_per_circuit",
            parse_bytes,
            || Ok((32 * KIB * KIB, Source::Default)),
            show_bytes,
        )?;

        let token = match (inline_token, token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "both control.token and control.token_file are set; keep only one".into(),
                ));
            }
            (Some(token), None) => Some(TokenSource::Inline(token)),
            (None, Some(path)) => Some(TokenSource::File(path)),
            (None, None) => None,
        };
        if let Some(tcp) = tcp
            && !tcp.ip().is_loopback()
            && token.is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "control.tcp = {tcp} is not a loopback address, so the control API would be open to the \
                 network: set control.token_file (or control.token / RN_CONTROL_TOKEN) to require a bearer \
                 token, or listen on 127.0.0.1"
            )));
        }
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ConfigError::Invalid(format!(
                "control.socket path {} is {} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket path \
                 allows; choose a shorter path",
                socket.display(),
                socket.as_os_str().len()
            )));
        }

        let config = Config {
            data_dir,
            log_level,
            log_format,
            shutdown_timeout,
            control: ControlConfig { socket, tcp, token, limits: control_limits },
            quic_listen,
            quic_limits,
            dht: DhtConfig {
                listen: dht_listen,
                bootstrap,
                mode: dht_mode,
                announce_interval,
                lookup_interval,
            },
            monitoring_listen,
            monitoring_listen_source,
            monitoring_limits,
            store: StoreConfig { retention, max_peers, max_joined_topics },
            relay: RelayConfig {
                enabled: relay_enabled,
                max_reservations: relay_max_reservations,
                max_circuits: relay_max_circuits,
                max_bytes_per_second: relay_max_bytes_per_second,
                max_bytes_per_circuit: relay_max_bytes_per_circuit,
            },
        };
        Ok((config, self.shown))
    }
}

impl Resolver<'_> {
    /// A local server's connection cap, handshake and idle timeouts, under `keys` in that order.
    fn server_limits(
        &mut self,
        keys: [&'static str; 3],
        defaults: ServerLimitSettings,
    ) -> Result<ServerLimitSettings, ConfigError> {
        let [max_connections, handshake_timeout, idle_timeout] = keys;
        let max_connections = self.value(
            max_connections,
            parse_count,
            || Ok((defaults.max_connections as u64, Source::Default)),
            u64::to_string,
        )?;
        let handshake_timeout = self.value(
            handshake_timeout,
            parse_interval,
            || Ok((defaults.handshake_timeout, Source::Default)),
            show_duration,
        )?;
        let idle_timeout = self.value(
            idle_timeout,
            parse_interval,
            || Ok((defaults.idle_timeout, Source::Default)),
            show_duration,
        )?;
        Ok(ServerLimitSettings {
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            handshake_timeout,
            idle_timeout,
        })
    }

    /// The `quic.*` limits, defaulting to the transport's own defaults (one source for each).
    fn quic_limits(&mut self) -> Result<crate::quic::QuicLimits, ConfigError> {
        let defaults = crate::quic::QuicLimits::default();
        let count = |n: usize| move || Ok((n as u64, Source::Default));
        let duration = |d: Duration| move || Ok((d, Source::Default));
        let as_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let max_connections =
            self.value("quic.max_connections", parse_count, count(defaults.max_connections), u64::to_string)?;
        let handshake_timeout = self.value(
            "quic.handshake_timeout",
            parse_interval,
            duration(defaults.handshake_timeout),
            show_duration,
        )?;
        let inbound_handshake_timeout = self.value(
            "quic.inbound_handshake_timeout",
            parse_interval,
            duration(defaults.inbound_handshake_timeout),
            show_duration,
        )?;
        let max_pending_handshakes = self.value(
            "quic.max_pending_handshakes",
            parse_count,
            count(defaults.max_pending_handshakes),
            u64::to_string,
        )?;
        let retry_threshold =
            self.value("quic.retry_threshold", parse_count, count(defaults.retry_threshold), u64::to_string)?;
        let max_unvalidated_per_ip = self.value(
            "quic.max_unvalidated_per_ip",
            parse_count,
            count(defaults.max_unvalidated_per_ip),
            u64::to_string,
        )?;
        Ok(crate::quic::QuicLimits {
            max_connections: as_usize(max_connections),
            handshake_timeout,
            inbound_handshake_timeout,
            max_pending_handshakes: as_usize(max_pending_handshakes),
            retry_threshold: as_usize(retry_threshold),
            max_unvalidated_per_ip: as_usize(max_unvalidated_per_ip),
            ..defaults
        })
    }
}

fn addr(ip: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([ip, 0, 0, 0], port))
}

fn default_data_dir(env: &Env) -> Result<(PathBuf, Source), ConfigError> {
    // systemd may pass several directories separated by colons; ours is the first.
    if let Some(dirs) = env.get("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').next()
    {
        return Ok((PathBuf::from(first), Source::DefaultFrom("STATE_DIRECTORY")));
    }
    if let Some(data_home) = env.get("XDG_DATA_HOME") {
        return Ok((Path::new(data_home).join(APP_DIR), Source::DefaultFrom("XDG_DATA_HOME")));
    }
    if let Some(home) = env.get("HOME") {
        return Ok((Path::new(home).join(".local/share").join(APP_DIR), Source::DefaultFrom("HOME")));
    }
    Err(ConfigError::Invalid(
        "cannot choose a data directory: none of STATE_DIRECTORY, XDG_DATA_HOME or HOME is set; pass \
         --data-dir"
            .into(),
    ))
}

fn default_socket(env: &Env, data_dir: &Path) -> Result<(PathBuf, Source), ConfigError> {
    if let Some(dirs) = env.get("RUNTIME_DIRECTORY")
        && let Some(first) = dirs.split(':').next()
    {
        return Ok((Path::new(first).join(SOCKET_FILE), Source::DefaultFrom("RUNTIME_DIRECTORY")));
    }
    if let Some(runtime) = env.get("XDG_RUNTIME_DIR") {
        return Ok((
            Path::new(runtime).join(APP_DIR).join(SOCKET_FILE),
            Source::DefaultFrom("XDG_RUNTIME_DIR"),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok((Path::new("/run").join(APP_DIR).join(SOCKET_FILE), Source::Default));
    }
    Ok((data_dir.join(SOCKET_FILE), Source::Default))
}

fn text(raw: &Raw) -> Result<&str, String> {
    match raw {
        Raw::Text(s) => Ok(s),
        Raw::List(_) => Err("got a list".into()),
    }
}

fn parse_path(raw: &Raw) -> Result<PathBuf, String> {
    let s = text(raw)?;
    if s.is_empty() {
        return Err("got an empty path".into());
    }
    Ok(PathBuf::from(s))
}

fn parse_optional_path(raw: &Raw) -> Result<Option<PathBuf>, String> {
    let s = text(raw)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

fn parse_addr(raw: &Raw) -> Result<SocketAddr, String> {
    let s = text(raw)?;
    s.parse().map_err(|_| format!("`{s}` is not an IP:PORT address"))
}

fn parse_optional_addr(raw: &Raw) -> Result<Option<SocketAddr>, String> {
    let s = text(raw)?;
    if s.is_empty() { Ok(None) } else { parse_addr(raw).map(Some) }
}

fn parse_host_ports(raw: &Raw) -> Result<Vec<String>, String> {
    let items = match raw {
        Raw::List(items) => items.clone(),
        Raw::Text(s) => s.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
    };
    for item in &items {
        let valid = item
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !valid {
            return Err(format!("`{item}` is not HOST:PORT"));
        }
    }
    Ok(items)
}

fn parse_dht_mode(raw: &Raw) -> Result<DhtMode, String> {
    match text(raw)? {
        "auto" => Ok(DhtMode::Auto),
        "server" => Ok(DhtMode::Server),
        "client" => Ok(DhtMode::Client),
        other => Err(format!("`{other}` is not a DHT mode")),
    }
}

fn parse_bool(raw: &Raw) -> Result<bool, String> {
    match text(raw)? {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("`{other}` is not true or false")),
    }
}

const KIB: u64 = 1024;

/// `65536`, `64KiB`, `32MiB` or `1GiB` (binary units only: "KB" would be ambiguous).
fn parse_bytes(raw: &Raw) -> Result<u64, String> {
    let s = text(raw)?;
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let multiplier = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => KIB * KIB,
        "GiB" => KIB * KIB * KIB,
        other => return Err(format!("`{other}` is not a unit (use B, KiB, MiB or GiB)")),
    };
    match number.parse::<u64>().ok().and_then(|n| n.checked_mul(multiplier)) {
        Some(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of bytes of at least 1")),
    }
}

/// The largest binary unit that divides `bytes` evenly, as `parse_bytes` reads it.
fn show_bytes(bytes: &u64) -> String {
    let text = match *bytes {
        b if b >= KIB * KIB * KIB && b % (KIB * KIB * KIB) == 0 => format!("{}GiB", b / (KIB * KIB * KIB)),
        b if b >= KIB * KIB && b % (KIB * KIB) == 0 => format!("{}MiB", b / (KIB * KIB)),
        b if b >= KIB && b % KIB == 0 => format!("{}KiB", b / KIB),
        b => b.to_string(),
    };
    quote(&text)
}

fn parse_count(raw: &Raw) -> Result<u64, String> {
    let s = text(raw)?;
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

fn parse_secret(raw: &Raw) -> Result<Option<String>, String> {
    let s = text(raw)?;
    if s.is_empty() {
        return Ok(None);
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token holds spaces or non-ASCII characters".into());
    }
    Ok(Some(s.to_owned()))
}

fn parse_log_level(raw: &Raw) -> Result<String, String> {
    let s = text(raw)?;
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("`{s}` is not a log filter ({e})"))?;
    Ok(s.to_owned())
}

/// A duration that drives a timer: at least one second, so a typo cannot flood the network.
fn parse_interval(raw: &Raw) -> Result<Duration, String> {
    let interval = parse_duration_raw(raw)?;
    if interval < Duration::from_secs(1) {
        return Err(format!("{} is shorter than one second", format_duration(interval)));
    }
    Ok(interval)
}

fn parse_duration_raw(raw: &Raw) -> Result<Duration, String> {
    parse_duration(text(raw)?)
}

/// Parses durations such as `90s`, `15m`, `12h`, `30d`, `500ms`, `1h30m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("`{s}` is not a duration");
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        // Whole seconds in u64, as a bare number reads them, so that every duration shown reads back.
        let part = match &rest[..unit_len] {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = part.and_then(|part| total.checked_add(part)).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Reads `data` as a config file is read: TOML, keys flattened and checked, every value resolved and checked
/// as at start-up (no environment, no flags), and each line also as a duration and a byte size. For the fuzz
/// target (`tests/fuzz`) and the randomised tests.
///
/// # Panics
///
/// Only if a duration or byte size that was accepted does not read back from the form it is shown in.
pub fn fuzz_config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for line in text.lines() {
        if let Ok(duration) = parse_duration(line) {
            assert_eq!(
                parse_duration(&format_duration(duration)),
                Ok(duration),
                "{line:?} read back differently"
            );
        }
        if let Ok(bytes) = parse_bytes(&Raw::Text(line.to_owned())) {
            let shown = show_bytes(&bytes);
            let shown = shown.trim_matches('"').to_owned();
            assert_eq!(parse_bytes(&Raw::Text(shown)), Ok(bytes), "{line:?} read back differently");
        }
    }
    let Ok(table) = text.parse::<toml::Table>() else { return };
    let path = Path::new("fuzz.toml");
    let mut file_values = BTreeMap::new();
    if flatten(path, "", &table, &mut file_values).is_err() {
        return;
    }
    let (env, flags) = (Env::default(), FlagValues::default());
    let resolver = Resolver { file: Some(path), file_values, env: &env, flags: &flags, shown: Vec::new() };
    if let Ok((config, shown)) = resolver.resolve() {
        std::hint::black_box((config, shown));
    }
}

/// Formats a duration in the units [`parse_duration`] reads, largest first.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 {
        return format!("{millis}ms");
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if millis > 0 {
        out.push_str(&format!("{millis}ms"));
    }
    out
}

fn show_path(p: &Path) -> String {
    quote(&p.display().to_string())
}

fn show_addr(a: &SocketAddr) -> String {
    quote(&a.to_string())
}

fn show_duration(d: &Duration) -> String {
    quote(&format_duration(*d))
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().copied())
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn defaults_are_the_seed_ports_and_local_monitoring() {
        let loaded = load(
            None,
            &env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/1")]),
            &FlagValues::default(),
        )
        .expect("load");
        let c = loaded.config;
        assert_eq!(c.quic_listen.port(), 30906);
        assert_eq!(c.dht.listen.port(), 30609);
        assert_eq!(c.monitoring_listen.to_string(), "127.0.0.1:6060");
        assert_eq!(c.data_dir, Path::new("/home/u/.local/share/remote-network"));
        assert_eq!(c.control.socket, Path::new("/run/user/1/remote-network/control.sock"));
        assert!(c.control.tcp.is_none());
    }

    #[test]
    fn the_monitoring_address_knows_whether_the_operator_chose_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = [("HOME", "/home/u")];
        let source = |file: Option<&Path>, env_pairs: &[(&str, &str)], flags: &FlagValues| {
            let loaded = load(file, &env(env_pairs), flags).expect("load");
            (loaded.config.monitoring_listen.to_string(), loaded.config.monitoring_listen_source)
        };
        let (addr, from) = source(None, &home, &FlagValues::default());
        assert_eq!(addr, "127.0.0.1:6060");
        assert!(from.is_default(), "{from}");

        // The default's own value, given explicitly, is the operator's choice all the same.
        let mut flags = FlagValues::default();
        flags.set("monitoring.listen", Some("127.0.0.1:6060".into()));
        let (_, from) = source(None, &home, &flags);
        assert_eq!(from, Source::Flag("--monitoring-listen"));
        assert!(!from.is_default());
        let (_, from) = source(
            None,
            &[("HOME", "/home/u"), ("RN_MONITORING_LISTEN", "127.0.0.1:6060")],
            &FlagValues::default(),
        );
        assert_eq!(from, Source::Env("RN_MONITORING_LISTEN".into()));
        assert!(!from.is_default());
        let file = write(dir.path(), "[monitoring]\nlisten = \"127.0.0.1:6060\"\n");
        let (_, from) = source(Some(&file), &home, &FlagValues::default());
        assert_eq!(from, Source::File(file.clone()));
        assert!(!from.is_default());
    }

    #[test]
    fn systemd_directories_win_over_xdg() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", "/run/user/1"),
            ("STATE_DIRECTORY", "/var/lib/remote-network:/var/lib/other"),
            ("RUNTIME_DIRECTORY", "/run/remote-network"),
        ]);
        let loaded = load(None, &e, &FlagValues::default()).expect("load");
        assert_eq!(loaded.config.data_dir, Path::new("/var/lib/remote-network"));
        assert_eq!(loaded.config.control.socket, Path::new("/run/remote-network/control.sock"));
        assert!(loaded.render(false).contains("default (from $STATE_DIRECTORY)"));
    }

    #[test]
    fn precedence_is_flags_then_env_then_file_then_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(
            dir.path(),
            "data_dir = \"/from/file\"\n[quic]\nlisten = \"0.0.0.0:1111\"\n[dht]\nlisten = \"0.0.0.0:2222\"\n\
             [store]\nmax_peers = 7\n",
        );
        let e = env(&[("HOME", "/h"), ("RN_QUIC_LISTEN", "0.0.0.0:3333"), ("RN_DHT_LISTEN", "0.0.0.0:4444")]);
        let mut flags = FlagValues::default();
        flags.set("quic.listen", Some("127.0.0.1:5555".into()));
        let loaded = load(Some(&file), &e, &flags).expect("load");
        let c = &loaded.config;
        assert_eq!(c.quic_listen.to_string(), "127.0.0.1:5555");
        assert_eq!(c.dht.listen.to_string(), "0.0.0.0:4444");
        assert_eq!(c.data_dir, Path::new("/from/file"));
        assert_eq!(c.store.max_peers, 7);
        assert_eq!(c.store.max_joined_topics, 1024);
        let shown = loaded.render(false);
        assert!(shown.contains("quic.listen = \"127.0.0.1:5555\""), "{shown}");
        assert!(shown.contains("# flag --quic-listen"), "{shown}");
        assert!(shown.contains("# env RN_DHT_LISTEN"), "{shown}");
        assert!(shown.contains(&format!("# file {}", file.display())), "{shown}");
    }

    #[test]
    fn config_show_output_loads_back_as_the_same_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = env(&[("HOME", "/h"), ("RN_CONTROL_TOKEN", "tok"), ("RN_STORE_RETENTION", "1h30m")]);
        let mut flags = FlagValues::default();
        flags.set("control.tcp", Some("127.0.0.1:5000".into()));
        flags.set_list("dht.bootstrap", vec!["127.0.0.1:7000".into()]);
        let first = load(None, &e, &flags).expect("load");
        let file = write(dir.path(), &first.render(true));
        // The token is redacted in the output, so give it again; everything else comes from the file.
        let second =
            load(Some(&file), &env(&[("HOME", "/h"), ("RN_CONTROL_TOKEN", "tok")]), &FlagValues::default())
                .expect("rendered config loads");
        // Every value is explicit in the rendered file: the values are the same, only their sources differ.
        assert_eq!(second.config.monitoring_listen_source, Source::File(file.clone()));
        let mut second_config = second.config.clone();
        second_config.monitoring_listen_source = first.config.monitoring_listen_source.clone();
        assert_eq!(format!("{:?}", first.config), format!("{second_config:?}"));
        assert!(second.render(false).contains("# file "));
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(dir.path(), "[quic]\nlisen = \"0.0.0.0:1\"\n");
        let err =
            load(Some(&file), &env(&[("HOME", "/h")]), &FlagValues::default()).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("unknown config key `quic.lisen`"), "{msg}");
        assert!(msg.contains("quic.listen"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key_and_what_is_accepted() {
        let e = env(&[("HOME", "/h"), ("RN_STORE_RETENTION", "soon")]);
        let msg = load(None, &e, &FlagValues::default()).expect_err("bad duration").to_string();
        assert!(msg.contains("store.retention"), "{msg}");
        assert!(msg.contains("env RN_STORE_RETENTION"), "{msg}");
        assert!(msg.contains("30d"), "{msg}");

        let mut flags = FlagValues::default();
        flags.set("dht.listen", Some("localhost".into()));
        let msg = load(None, &env(&[("HOME", "/h")]), &flags).expect_err("bad addr").to_string();
        assert!(msg.contains("dht.listen") && msg.contains("IP:PORT"), "{msg}");

        let mut flags = FlagValues::default();
        flags.set_list("dht.bootstrap", vec!["nohost".into()]);
        let msg = load(None, &env(&[("HOME", "/h")]), &flags).expect_err("bad bootstrap").to_string();
        assert!(msg.contains("dht.bootstrap") && msg.contains("`nohost`"), "{msg}");
    }

    #[test]
    fn bootstrap_flags_replace_the_public_routers() {
        let mut flags = FlagValues::default();
        flags.set_list("dht.bootstrap", vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()]);
        let c = load(None, &env(&[("HOME", "/h")]), &flags).expect("load").config;
        assert_eq!(c.dht.bootstrap, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        let c = load(None, &env(&[("HOME", "/h"), ("RN_DHT_BOOTSTRAP", "a:1, b:2")]), &FlagValues::default())
            .expect("load")
            .config;
        assert_eq!(c.dht.bootstrap, ["a:1", "b:2"]);
    }

    #[test]
    fn public_tcp_listener_needs_a_token() {
        let mut flags = FlagValues::default();
        flags.set("control.tcp", Some("0.0.0.0:50051".into()));
        let msg = load(None, &env(&[("HOME", "/h")]), &flags).expect_err("needs token").to_string();
        assert!(msg.contains("control.token_file"), "{msg}");
        let ok = load(None, &env(&[("HOME", "/h"), ("RN_CONTROL_TOKEN", "s3cret")]), &flags).expect("load");
        assert!(matches!(ok.config.control.token, Some(TokenSource::Inline(_))));
        assert!(!ok.render(false).contains("s3cret"));
        let mut flags = FlagValues::default();
        flags.set("control.tcp", Some("127.0.0.1:50051".into()));
        assert!(load(None, &env(&[("HOME", "/h")]), &flags).is_ok());
    }

    #[test]
    fn rust_log_is_honoured_before_rn_log_level() {
        let c = load(
            None,
            &env(&[("HOME", "/h"), ("RUST_LOG", "debug"), ("RN_LOG_LEVEL", "warn")]),
            &FlagValues::default(),
        )
        .expect("load")
        .config;
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn byte_sizes_read_binary_units_and_show_back_the_same() {
        let raw = |s: &str| Raw::Text(s.to_owned());
        assert_eq!(parse_bytes(&raw("65536")), Ok(65536));
        assert_eq!(parse_bytes(&raw("64KiB")), Ok(64 * 1024));
        assert_eq!(parse_bytes(&raw("32MiB")), Ok(32 * 1024 * 1024));
        assert!(parse_bytes(&raw("0")).is_err());
        assert!(parse_bytes(&raw("10KB")).unwrap_err().contains("not a unit"));
        assert!(parse_bytes(&raw("99999999999GiB")).is_err(), "overflow is an error, not a wrap");
        for bytes in [1, 1000, 128 * 1024, 32 * 1024 * 1024, 3 * 1024 * 1024 * 1024] {
            let shown = show_bytes(&bytes);
            assert_eq!(parse_bytes(&raw(shown.trim_matches('"'))), Ok(bytes), "{shown}");
        }
        assert_eq!(parse_bool(&raw("false")), Ok(false));
        assert!(parse_bool(&raw("yes")).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        // The longest duration a bare number gives reads back from the days it is shown in.
        let longest = Duration::from_secs(u64::MAX);
        assert_eq!(parse_duration(&format_duration(longest)), Ok(longest));
        assert!(parse_duration("213503982334602d").is_err(), "past u64 seconds");
        assert_eq!(
            parse_duration(&format_duration(Duration::from_secs(93_784))),
            Ok(Duration::from_secs(93_784))
        );
    }

    #[test]
    fn the_example_config_and_edge_values_pass_the_fuzz_checks() {
        let example = include_str!("../deploy/config.example.toml");
        fuzz_config_text(example.as_bytes());
        let uncommented: String =
            example.lines().map(|line| line.trim_start_matches("# ")).collect::<Vec<_>>().join("\n");
        fuzz_config_text(uncommented.as_bytes());
        fuzz_config_text(
            b"18446744073709551615\n18446744073709551615d\n0ms\n1500ms\n16GiB\n17179869184KiB\n\xff",
        );
    }

    #[test]
    fn every_setting_has_a_unique_key_env_and_flag() {
        let mut keys = std::collections::HashSet::new();
        let mut envs = std::collections::HashSet::new();
        for s in SETTINGS {
            assert!(keys.insert(s.key), "{}", s.key);
            assert!(envs.insert(s.env), "{}", s.env);
            assert!(s.env.starts_with("RN_"));
            assert!(!s.doc.is_empty());
        }
    }
}
