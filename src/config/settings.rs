//! The declaration of every setting: key, environment variable, flag, kind, default, whether a running node
//! takes a new value on reload, and meaning. Each default is written here once: the resolver falls back to it,
//! and the modules' own defaults ([`declared`]) are read from it.

/// What kind of value a setting holds; decides parsing and the "accepted values" text of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
    pub(super) fn accepted(self) -> &'static str {
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

/// What a setting is when nothing sets it.
#[derive(Debug, Clone, Copy)]
pub(super) enum DefaultValue {
    /// Read as if the file said it (the empty string is "none" for optional values).
    Text(&'static str),
    List(&'static [&'static str]),
    /// Derived from the environment at load time (see `resolve`).
    Computed,
}

/// One configuration key.
pub(super) struct Setting {
    pub(super) key: &'static str,
    pub(super) env: &'static str,
    pub(super) flag: Option<&'static str>,
    pub(super) kind: Kind,
    pub(super) default: DefaultValue,
    /// Whether a running node puts a new value in force on reload (SIGHUP).
    pub(super) reload: bool,
    pub(super) doc: &'static str,
}

/// Every configuration key, in the order `config show` prints them.
pub(super) const SETTINGS: &[Setting] = &[
    Setting {
        key: "data_dir",
        env: "RN_DATA_DIR",
        flag: Some("--data-dir"),
        kind: Kind::Path,
        default: DefaultValue::Computed,
        reload: false,
        doc: "Directory holding the node key and the peer database. Default: $STATE_DIRECTORY (systemd), \
              else $XDG_DATA_HOME/remote-network.",
    },
    Setting {
        key: "log_level",
        env: "RN_LOG_LEVEL",
        flag: Some("--log-level"),
        kind: Kind::LogLevel,
        default: DefaultValue::Text("info"),
        reload: true,
        doc: "Log filter. RUST_LOG, when set, is used before RN_LOG_LEVEL.",
    },
    Setting {
        key: "log_format",
        env: "RN_LOG_FORMAT",
        flag: Some("--log-format"),
        kind: Kind::LogFormat,
        default: DefaultValue::Text("text"),
        reload: false,
        doc: "text: one readable line per event (under journald without colours or timestamps); json: one JSON \
              object per line, for log shippers.",
    },
    Setting {
        key: "shutdown_timeout",
        env: "RN_SHUTDOWN_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("10s"),
        reload: false,
        doc: "How long a graceful stop may take before the process gives up and exits with an error.",
    },
    Setting {
        key: "control.socket",
        env: "RN_CONTROL_SOCKET",
        flag: Some("--control-socket"),
        kind: Kind::Path,
        default: DefaultValue::Computed,
        reload: false,
        doc: "Unix socket of the gRPC control API (mode 0660). Default: $RUNTIME_DIRECTORY/control.sock, \
              else $XDG_RUNTIME_DIR/remote-network/control.sock, else /run/remote-network/control.sock for \
              root, else in the data dir.",
    },
    Setting {
        key: "control.tcp",
        env: "RN_CONTROL_TCP",
        flag: Some("--control-tcp"),
        kind: Kind::OptionalAddr,
        default: DefaultValue::Text(""),
        reload: false,
        doc: "Optional TCP listener for the control API. A non-loopback address requires a token.",
    },
    Setting {
        key: "control.token",
        env: "RN_CONTROL_TOKEN",
        flag: None,
        kind: Kind::Secret,
        default: DefaultValue::Text(""),
        reload: false,
        doc: "Bearer token required on the TCP listener. Prefer control.token_file.",
    },
    Setting {
        key: "control.token_file",
        env: "RN_CONTROL_TOKEN_FILE",
        flag: Some("--control-token-file"),
        kind: Kind::OptionalPath,
        default: DefaultValue::Text(""),
        reload: false,
        doc: "File holding the bearer token (must not be readable by others).",
    },
    Setting {
        key: "control.max_connections",
        env: "RN_CONTROL_MAX_CONNECTIONS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("512"),
        reload: true,
        doc: "Control connections (socket and TCP, each) served at once; more are closed as they arrive.",
    },
    Setting {
        key: "control.handshake_timeout",
        env: "RN_CONTROL_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("10s"),
        reload: true,
        doc: "How long a new control connection may take to send the HTTP/2 preface and its first request's \
              headers.",
    },
    Setting {
        key: "control.idle_timeout",
        env: "RN_CONTROL_IDLE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("5m"),
        reload: true,
        doc: "A control connection with no call in progress for this long is closed (clients reconnect on \
              their next call; a watch in progress keeps its connection).",
    },
    Setting {
        key: "quic.listen",
        env: "RN_QUIC_LISTEN",
        flag: Some("--quic-listen"),
        kind: Kind::Addr,
        default: DefaultValue::Text("0.0.0.0:30906"),
        reload: false,
        doc: "UDP address of the QUIC endpoint (listening and dialing share this one socket).",
    },
    Setting {
        key: "quic.max_connections",
        env: "RN_QUIC_MAX_CONNECTIONS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("1024"),
        reload: true,
        doc: "Most QUIC connections at once, inbound and outbound; more inbound ones are refused before any \
              TLS work.",
    },
    Setting {
        key: "quic.handshake_timeout",
        env: "RN_QUIC_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("10s"),
        reload: true,
        doc: "How long a QUIC handshake we dial may take before the dial fails.",
    },
    Setting {
        key: "quic.inbound_handshake_timeout",
        env: "RN_QUIC_INBOUND_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("5s"),
        reload: true,
        doc: "How long an inbound QUIC handshake may hold its slot; a dialer that stalls longer is dropped.",
    },
    Setting {
        key: "quic.max_pending_handshakes",
        env: "RN_QUIC_MAX_PENDING_HANDSHAKES",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("256"),
        reload: true,
        doc: "Most inbound QUIC handshakes in progress at once; more attempts are refused until some finish.",
    },
    Setting {
        key: "quic.retry_threshold",
        env: "RN_QUIC_RETRY_THRESHOLD",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("64"),
        reload: true,
        doc: "Inbound handshakes in progress from which new dialers must first prove their address with a QUIC \
              Retry (one extra round trip; stops floods from spoofed or silent sources).",
    },
    Setting {
        key: "quic.max_unvalidated_per_ip",
        env: "RN_QUIC_MAX_UNVALIDATED_PER_IP",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("32"),
        reload: true,
        doc: "Inbound handshakes one IP may have in progress before proving its address; its further dialers \
              get a QUIC Retry.",
    },
    Setting {
        key: "quic.reflections_per_ip",
        env: "RN_QUIC_REFLECTIONS_PER_IP",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("10"),
        reload: true,
        doc: "Address reflections (\"which address do you see me at?\", unauthenticated UDP) answered per second to \
              one IP; more are dropped.",
    },
    Setting {
        key: "quic.reflection_burst",
        env: "RN_QUIC_REFLECTION_BURST",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("20"),
        reload: true,
        doc: "Address reflections one IP may get at once before its per-second rate applies.",
    },
    Setting {
        key: "quic.reflections_per_second",
        env: "RN_QUIC_REFLECTIONS_PER_SECOND",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("200"),
        reload: true,
        doc: "Address reflections answered per second to everyone together.",
    },
    Setting {
        key: "dht.listen",
        env: "RN_DHT_LISTEN",
        flag: Some("--dht-listen"),
        kind: Kind::Addr,
        default: DefaultValue::Text("0.0.0.0:30609"),
        reload: false,
        doc: "UDP address of the Mainline DHT node.",
    },
    Setting {
        key: "dht.bootstrap",
        env: "RN_DHT_BOOTSTRAP",
        flag: Some("--bootstrap"),
        kind: Kind::HostPortList,
        default: DefaultValue::List(&mainline::DEFAULT_BOOTSTRAP_NODES),
        reload: true,
        doc: "DHT bootstrap nodes (comma-separated in the environment). Giving any replaces the public \
              default routers.",
    },
    Setting {
        key: "dht.mode",
        env: "RN_DHT_MODE",
        flag: Some("--dht-server"),
        kind: Kind::DhtMode,
        default: DefaultValue::Text("auto"),
        reload: false,
        doc: "server: answer DHT queries from the start (a reachable node should, so that a network of our \
              nodes works on its own); client: only query; auto: serve once the DHT finds us reachable.",
    },
    Setting {
        key: "dht.announce_interval",
        env: "RN_DHT_ANNOUNCE_INTERVAL",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("10m"),
        reload: false,
        doc: "How often each joined topic is announced again (BEP 5 peers expire after about 30 minutes).",
    },
    Setting {
        key: "dht.lookup_interval",
        env: "RN_DHT_LOOKUP_INTERVAL",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("1m"),
        reload: false,
        doc: "How often each joined topic is looked up again (with jitter; sooner while no peer is known).",
    },
    Setting {
        key: "monitoring.listen",
        env: "RN_MONITORING_LISTEN",
        flag: Some("--monitoring-listen"),
        kind: Kind::Addr,
        default: DefaultValue::Text("127.0.0.1:6060"),
        reload: false,
        doc: "HTTP address of the metrics and profiling endpoints. Keep it on loopback unless protected. When \
              the default 127.0.0.1:6060 is taken (a second node on the machine), another loopback port is \
              used with a warning; an address set here that is taken stops the node.",
    },
    Setting {
        key: "monitoring.max_connections",
        env: "RN_MONITORING_MAX_CONNECTIONS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("64"),
        reload: true,
        doc: "Monitoring HTTP connections served at once; more are closed as they arrive.",
    },
    Setting {
        key: "monitoring.handshake_timeout",
        env: "RN_MONITORING_HANDSHAKE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("10s"),
        reload: true,
        doc: "How long a request's headers may take to arrive on the monitoring port.",
    },
    Setting {
        key: "monitoring.idle_timeout",
        env: "RN_MONITORING_IDLE_TIMEOUT",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("1m"),
        reload: true,
        doc: "A monitoring connection on which nothing moves for this long is closed.",
    },
    Setting {
        key: "store.retention",
        env: "RN_STORE_RETENTION",
        flag: None,
        kind: Kind::Duration,
        default: DefaultValue::Text("30d"),
        reload: true,
        doc: "Peers not seen for this long are removed from the database.",
    },
    Setting {
        key: "store.max_peers",
        env: "RN_STORE_MAX_PEERS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("100000"),
        reload: true,
        doc: "Hard bound on stored peers; beyond it the least recently seen are removed.",
    },
    Setting {
        key: "store.max_joined_topics",
        env: "RN_STORE_MAX_JOINED_TOPICS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("1024"),
        reload: true,
        doc: "Hard bound on topics the node can join at once.",
    },
    Setting {
        key: "relay.enabled",
        env: "RN_RELAY_ENABLED",
        flag: None,
        kind: Kind::Bool,
        default: DefaultValue::Text("true"),
        reload: true,
        doc: "Relay circuits for peers that cannot be reached otherwise (they must reserve a slot first). Only \
              peers behind NATs that hold a direct connection to this node can reserve, so it matters on \
              publicly reachable nodes.",
    },
    Setting {
        key: "relay.max_reservations",
        env: "RN_RELAY_MAX_RESERVATIONS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("128"),
        reload: true,
        doc: "Peers that may hold a relay reservation at once.",
    },
    Setting {
        key: "relay.max_circuits",
        env: "RN_RELAY_MAX_CIRCUITS",
        flag: None,
        kind: Kind::Count,
        default: DefaultValue::Text("64"),
        reload: true,
        doc: "Relay circuits carried at once.",
    },
    Setting {
        key: "relay.max_bytes_per_second",
        env: "RN_RELAY_MAX_BYTES_PER_SECOND",
        flag: None,
        kind: Kind::Bytes,
        default: DefaultValue::Text("128KiB"),
        reload: true,
        doc: "Rate limit of each relay circuit, each way.",
    },
    Setting {
        key: "relay.max_bytes_per_circuit",
        env: "RN_RELAY_MAX_BYTES_PER_CIRCUIT",
        flag: None,
        kind: Kind::Bytes,
        default: DefaultValue::Text("32MiB"),
        reload: true,
        doc: "Bytes one relay circuit may carry in total (both ways); it is closed beyond.",
    },
];

pub(super) fn setting(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Whether a running node applies a new value of `key` on reload (SIGHUP); unknown keys are not.
pub fn reloadable(key: &str) -> bool {
    setting(key).is_some_and(|s| s.reload)
}

/// The declared defaults, for the modules whose own defaults (used where no config is loaded: tests, the
/// benchmark, embedders) must be the same as the daemon's.
///
/// # Panics
///
/// If `key` is not declared with a default of that kind: a mistake in this crate, which the unit test
/// `every_declared_default_reads_as_its_kind` rules out for every declared key.
pub mod declared {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::super::Raw;
    use super::super::values::{parse_addr, parse_bool, parse_bytes, parse_count, parse_duration_raw};
    use super::{DefaultValue, setting};

    fn read<T>(key: &str, parse: fn(&Raw) -> Result<T, String>) -> T {
        let Some(DefaultValue::Text(text)) = setting(key).map(|s| s.default) else {
            panic!("no setting {key} with a default value is declared");
        };
        parse(&Raw::Text(text.to_owned())).unwrap_or_else(|e| panic!("the declared default of {key}: {e}"))
    }

    pub fn count(key: &str) -> usize {
        usize::try_from(read(key, parse_count)).unwrap_or(usize::MAX)
    }

    pub fn duration(key: &str) -> Duration {
        read(key, parse_duration_raw)
    }

    pub fn bytes(key: &str) -> u64 {
        read(key, parse_bytes)
    }

    pub fn flag(key: &str) -> bool {
        read(key, parse_bool)
    }

    pub fn address(key: &str) -> SocketAddr {
        read(key, parse_addr)
    }

    pub fn list(key: &str) -> Vec<String> {
        match setting(key).map(|s| s.default) {
            Some(DefaultValue::List(items)) => items.iter().map(|item| (*item).to_owned()).collect(),
            _ => panic!("no setting {key} with a default list is declared"),
        }
    }
}
