//! The node's configuration: a TOML file, `RN_*` environment variables and command-line flags, layered with
//! precedence flags > environment > file > defaults.
//!
//! Every setting is declared once in [`SETTINGS`] (`settings.rs`: its key, environment variable, flag, kind,
//! default, whether a running node applies a new value on SIGHUP, and meaning). That one table drives loading,
//! defaults (the daemon's and the modules' own, through [`declared`]), unknown-key detection, validation
//! messages ("what was wrong and what is accepted"), reloading, and `remote-network config show`, which prints
//! the effective value of each key with where it came from.

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

mod resolve;
mod settings;
#[cfg(test)]
mod tests;
mod values;

use resolve::*;
use settings::*;
pub use settings::{declared, reloadable};
use values::*;
pub use values::{format_duration, fuzz_config_text, parse_duration};

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
                if setting.reload {
                    out.push_str("; SIGHUP applies a new value");
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
