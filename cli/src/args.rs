//! The command-line surface of rnctl, declared with clap's derive API, and the parsers that check input
//! (node ids, topics, durations, URLs) before anything is sent, so mistakes are usage errors (exit status 2)
//! that name the broken rule.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use remote_network::api::control;
use remote_network::api::names::{self, NodeId};

use crate::exit::EXIT_STATUS_HELP;
use crate::timefmt;

/// Help heading of the options every subcommand accepts, so a subcommand's own options come first.
const GLOBAL: &str = "Global Options";

const ABOUT: &str = "Control a running remote-network node through its gRPC control API";

/// How rnctl finds the daemon, shown under the exit statuses in `rnctl --help`.
const AFTER_HELP: &str = "\
Finding the daemon: --socket or --endpoint (not both), else the first of these that exists:
  $XDG_RUNTIME_DIR/remote-network/control.sock, /run/remote-network/control.sock,
  $XDG_DATA_HOME/remote-network/control.sock (XDG_DATA_HOME defaults to ~/.local/share).
";

#[derive(Debug, Parser)]
#[command(
    name = "rnctl",
    version,
    about = ABOUT,
    after_help = format!("{EXIT_STATUS_HELP}\n\n{AFTER_HELP}"),
    arg_required_else_help = true,
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options accepted before or after any subcommand.
#[derive(Debug, Args)]
#[command(next_help_heading = GLOBAL)]
pub struct GlobalArgs {
    /// Output format: aligned text for people, or the API's proto3 JSON mapping for scripts
    #[arg(short, long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Control socket of the daemon [default: the first existing one of the places `rnctl --help` lists]
    #[arg(
        long,
        global = true,
        env = "RNCTL_SOCKET",
        value_name = "PATH",
        value_parser = path_or_empty()
    )]
    pub socket: Option<PathBuf>,

    /// TCP endpoint of the daemon, e.g. http://127.0.0.1:50051 (cannot be combined with --socket)
    #[arg(
        long,
        global = true,
        env = "RNCTL_ENDPOINT",
        value_name = "URL",
        value_parser = parse_endpoint
    )]
    pub endpoint: Option<String>,

    /// Bearer token for the daemon's TCP endpoint
    #[arg(long, global = true, env = "RNCTL_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the bearer token from a file (surrounding whitespace is ignored)
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Seconds to wait for the connection and for each answer, and with `topics join --wait` for the peers; 0
    /// waits forever (not applied to `peers watch` once connected). `connect` and `peers query` wait 120 s for
    /// their answer unless this is given: the daemon's own dial, punch and relay timeouts end them sooner
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value = "10",
        value_parser = parse_timeout
    )]
    pub timeout: CallTimeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// `--timeout`: `None` means no deadline. A newtype because clap reads a bare `Option` as "may be absent".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTimeout(pub Option<Duration>);

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Daemon(DaemonCommand),
    /// Print a shell completion script (works without a daemon)
    Completions {
        /// Shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The subcommands that talk to a daemon; kept apart from `completions` so only these reach a connection.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// The node itself
    #[command(subcommand)]
    Node(NodeCommand),
    /// Peers in the node's store
    #[command(subcommand)]
    Peers(PeersCommand),
    /// Topics the node has joined
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// The NAT in front of this node: observed addresses, mapping and filtering verdicts, dial-backs
    #[command(subcommand)]
    Nat(NatCommand),
    /// Dial a peer's QUIC address, exchange verified metadata and store it
    Connect {
        /// The peer's QUIC address, HOST:PORT (IPv6 hosts in brackets), or the node id of a known peer
        /// (its stored addresses are tried, then hole punching through a connected peer)
        #[arg(value_name = "ADDR|NODE_ID", value_parser = parse_connect_target)]
        address: ConnectTarget,
    },
}

#[derive(Debug, Subcommand)]
pub enum NatCommand {
    /// What the node knows of its NAT, with the evidence for each verdict
    Status,
    /// Probe now through connected peers (dial-backs), then show the status
    Probe,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Identity, version, listen addresses and the state of the store, DHT and NAT detection
    Info,
}

#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// List stored peers, newest first (one page unless --all or --limit asks for more)
    List(ListPeersArgs),
    /// Show one peer with its addresses and connection quality
    Show {
        /// Node id: 64 lowercase hexadecimal characters
        #[arg(value_name = "ID")]
        id: NodeId,
    },
    /// Print peers as they are added, updated and removed, until Ctrl-C or the daemon ends the stream
    Watch {
        /// Only peers sharing this topic
        #[arg(long, value_name = "T", value_parser = parse_topic)]
        topic: Option<String>,
        /// Start with every stored peer, then a snapshot-done event, then live events
        #[arg(long)]
        snapshot: bool,
    },
    /// Fetch a fresh signed record from the peer over QUIC (not from the store), with the round trip
    Query {
        /// Node id: 64 lowercase hexadecimal characters
        #[arg(value_name = "ID")]
        id: NodeId,
    },
    /// Delete a peer and everything known about it from the store
    Forget {
        /// Node id: 64 lowercase hexadecimal characters
        #[arg(value_name = "ID")]
        id: NodeId,
    },
}

#[derive(Debug, Args)]
pub struct ListPeersArgs {
    /// Only peers sharing this topic
    #[arg(long, value_name = "T", value_parser = parse_topic)]
    pub topic: Option<String>,

    /// Only peers of this type
    #[arg(long = "type", value_name = "TYPE", value_enum)]
    pub node_type: Option<PeerTypeFilter>,

    /// Only peers seen within this long, e.g. 10m, 2h, 7d or 1h30m
    #[arg(long, value_name = "DURATION", value_parser = parse_seen_since)]
    pub seen_since: Option<Duration>,

    /// Sort order: most recently seen first, or highest quality score first
    #[arg(long, value_enum, default_value_t = PeerOrderArg::LastSeen)]
    pub order: PeerOrderArg,

    /// Print at most N peers, fetching further pages as needed
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "all")]
    pub limit: Option<u64>,

    /// Peers per request (the daemon allows at most 1000)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub page_size: u32,

    /// Fetch every page, not just the first
    #[arg(long)]
    pub all: bool,

    /// Continue from the nextPageToken of an earlier `-o json` listing (same filters and order)
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerTypeFilter {
    Public,
    Private,
}

impl From<PeerTypeFilter> for control::NodeType {
    fn from(filter: PeerTypeFilter) -> Self {
        match filter {
            PeerTypeFilter::Public => Self::Public,
            PeerTypeFilter::Private => Self::Private,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerOrderArg {
    LastSeen,
    Score,
}

impl From<PeerOrderArg> for control::PeerOrder {
    fn from(order: PeerOrderArg) -> Self {
        match order {
            PeerOrderArg::LastSeen => Self::LastSeen,
            PeerOrderArg::Score => Self::Score,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Join a topic: announce this node and look up peers for it (kept across restarts)
    Join {
        /// Topic name: 1-255 bytes of UTF-8 without control characters
        #[arg(value_name = "T", value_parser = parse_topic)]
        topic: String,
        /// Show progress until --peers peers of the topic are verified, or --timeout passes
        #[arg(long)]
        wait: bool,
        /// With --wait: how many verified peers to wait for
        #[arg(long, value_name = "N", default_value_t = 1, requires = "wait", value_parser = clap::value_parser!(u32).range(1..))]
        peers: u32,
    },
    /// Leave a topic
    Leave {
        /// Topic name
        #[arg(value_name = "T", value_parser = parse_topic)]
        topic: String,
    },
    /// List joined topics
    List,
}

/// What `rnctl connect` dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectTarget {
    /// A known peer: the daemon tries its stored addresses, then hole punching and relays.
    Node(NodeId),
    /// `HOST:PORT`, checked for its shape here and resolved by the daemon.
    Address(String),
}

/// Longest host name DNS allows.
const MAX_HOST_LEN: usize = 253;

/// Checks the shape of a connect target before anything is sent, so a typo is a usage error (exit status 2)
/// rather than a round trip to the daemon. Host names are only checked for their characters: the daemon
/// resolves them.
fn parse_connect_target(text: &str) -> Result<ConnectTarget, String> {
    const EXPECTED: &str = "expected a peer address HOST:PORT, such as 203.0.113.7:30906, [2001:db8::7]:30906 or \
                            seed.example.org:30906, or the 64-character node id of a known peer";
    if let Ok(id) = NodeId::parse(text) {
        return Ok(ConnectTarget::Node(id));
    }
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(ConnectTarget::Address(text.to_owned()));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        // Hex without a port was most likely meant as a node id: say what is wrong with it as one.
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NodeId::parse(text).err().map_or_else(|| EXPECTED.to_owned(), |e| e.to_string()));
        }
        return Err(format!("no port: {EXPECTED}"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("the port must be a number from 0 to 65535: {EXPECTED}"));
    }
    let valid_host = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host.len() <= MAX_HOST_LEN
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if !valid_host {
        return Err(format!("not a host name or IP address before the port: {EXPECTED}"));
    }
    Ok(ConnectTarget::Address(text.to_owned()))
}

/// Any path, including the empty one: clap's own path parser refuses empty values, but `RNCTL_SOCKET=` should
/// read as "unset" (see `target::choose`) rather than as a usage error.
fn path_or_empty() -> impl TypedValueParser<Value = PathBuf> {
    OsStringValueParser::new().map(PathBuf::from)
}

/// Checks a topic name with the same rule the daemon applies.
fn parse_topic(text: &str) -> Result<String, names::NameError> {
    names::validate_topic(text).map(|()| text.to_owned())
}

fn parse_seen_since(text: &str) -> Result<Duration, String> {
    timefmt::parse_duration(text)
}

/// Accepts a whole or fractional number of seconds; 0 turns the deadline off.
fn parse_timeout(text: &str) -> Result<CallTimeout, String> {
    let seconds: f64 =
        text.parse().map_err(|_| format!("expected a number of seconds such as 10 or 0.5, got {text:?}"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err("the timeout must be 0 (no deadline) or a positive number of seconds".to_owned());
    }
    if seconds == 0.0 {
        return Ok(CallTimeout(None));
    }
    Duration::try_from_secs_f64(seconds)
        .map(|duration| CallTimeout(Some(duration)))
        .map_err(|_| format!("{text} seconds is too long a timeout"))
}

/// Accepts `http://host:port` (a bare `host:port` gets `http://`); an empty value means unset, so
/// `RNCTL_ENDPOINT=` can clear an exported endpoint. The control API's TCP listener speaks plain HTTP/2, and
/// rnctl is built without TLS, so `https://` is refused here rather than failing obscurely at connect time.
fn parse_endpoint(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Ok(String::new());
    }
    let url = if text.contains("://") { text.to_owned() } else { format!("http://{text}") };
    if !url.starts_with("http://") {
        return Err("only http:// endpoints are supported, e.g. http://127.0.0.1:50051".to_owned());
    }
    let uri: tonic::transport::Uri =
        url.parse().map_err(|error| format!("not a URL like http://127.0.0.1:50051: {error}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("the endpoint needs a host, e.g. http://127.0.0.1:50051".to_owned());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeout_accepts_seconds_and_zero() {
        assert_eq!(parse_timeout("10"), Ok(CallTimeout(Some(Duration::from_secs(10)))));
        assert_eq!(parse_timeout("0.5"), Ok(CallTimeout(Some(Duration::from_millis(500)))));
        assert_eq!(parse_timeout("0"), Ok(CallTimeout(None)));
        for bad in ["", "-1", "ten", "inf", "NaN", "1e300"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn endpoint_must_be_plain_http() {
        assert_eq!(parse_endpoint("http://127.0.0.1:50051").as_deref(), Ok("http://127.0.0.1:50051"));
        assert_eq!(parse_endpoint("127.0.0.1:50051").as_deref(), Ok("http://127.0.0.1:50051"));
        assert_eq!(parse_endpoint("[::1]:50051").as_deref(), Ok("http://[::1]:50051"));
        assert_eq!(parse_endpoint("").as_deref(), Ok(""));
        assert!(parse_endpoint("https://example.org:443").is_err());
        assert!(parse_endpoint("unix:///run/x.sock").is_err());
        assert!(parse_endpoint("http://").is_err());
        assert!(parse_endpoint("http://exa mple:1").is_err());
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["rnctl", "peers", "list", "-o", "json", "--timeout", "3"]).expect("parses");
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.timeout, CallTimeout(Some(Duration::from_secs(3))));
    }

    #[test]
    fn connect_targets_are_checked_before_sending() {
        let id = "ab".repeat(32);
        assert_eq!(parse_connect_target(&id), Ok(ConnectTarget::Node(NodeId::parse(&id).expect("id"))));
        for good in ["203.0.113.7:30906", "[2001:db8::7]:30906", "seed.example.org:1", "localhost:0"] {
            assert_eq!(parse_connect_target(good), Ok(ConnectTarget::Address(good.to_owned())), "{good}");
        }
        for bad in [
            "notanaddress",
            "not an address",
            "host:",
            "host:65536",
            ":30906",
            "2001:db8::7:30906x",
            "[2001:db8::7:30906",
            "[host]:1",
            "exa mple.org:1",
            "",
        ] {
            assert!(parse_connect_target(bad).is_err(), "{bad:?} was accepted");
        }
        let short_id = parse_connect_target("abc").expect_err("rejected");
        assert!(short_id.contains("64 lowercase hexadecimal"), "{short_id}");
        let usage = Cli::try_parse_from(["rnctl", "connect", "notanaddress"]).expect_err("rejected");
        assert_eq!(usage.exit_code(), 2);
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        let short_id = Cli::try_parse_from(["rnctl", "peers", "show", "abc"]).expect_err("rejected");
        assert!(short_id.to_string().contains("64 lowercase hexadecimal"), "{short_id}");
        assert_eq!(short_id.exit_code(), 2);
        let topic = Cli::try_parse_from(["rnctl", "topics", "join", ""]).expect_err("rejected");
        assert!(topic.to_string().contains("1-255 bytes"), "{topic}");
        let both =
            Cli::try_parse_from(["rnctl", "peers", "list", "--all", "--limit", "5"]).expect_err("rejected");
        assert_eq!(both.exit_code(), 2);
    }
}
