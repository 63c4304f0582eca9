//! The gRPC control API: `NodeService`, `PeerService` and `TopicService` (from `proto/control.proto`), plus
//! `grpc.health.v1.Health` and server reflection v1 and v1alpha, served on the control socket and, when
//! configured, on TCP behind a bearer token.
//!
//! Handlers are thin: they validate arguments (INVALID_ARGUMENT naming the field and the rule), call the store
//! or another part through its handle, and map the result with [`convert`].

mod authority;
mod convert;
mod node_info;
mod peers;
mod status;
mod topics;
pub mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::service::{InterceptorLayer, Routes};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::CONTROL_DESCRIPTOR_SET;
use crate::api::control::ListenAddresses;
use crate::api::control::node_service_server::NodeServiceServer;
use crate::api::control::peer_service_server::PeerServiceServer;
use crate::api::control::topic_service_server::TopicServiceServer;
use crate::api::names::NodeId;
use crate::config::{ControlConfig, TokenSource};
use crate::limits::{ServerLimitSettings, ServerLimits};
use crate::store::Store;
pub use authority::fuzz_forward_requests;
pub use transport::{ControlSocket, TransportError};

pub use peers::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

/// What the handlers share: cheap handles to the node's parts and facts fixed at start.
pub struct NodeContext {
    pub node_id: NodeId,
    pub started_at: SystemTime,
    pub started: Instant,
    pub data_dir: PathBuf,
    pub listen: ListenAddresses,
    pub store: Store,
    pub exchange: crate::exchange::Exchange,
    pub dht: crate::dht::Dht,
    pub nat: crate::nat::prober::NatProber<crate::exchange::Exchange>,
    /// Cancelled when the node stops; ends long-lived streams so the server can drain.
    pub shutdown: CancellationToken,
}

pub type Context = Arc<NodeContext>;

impl NodeContext {
    /// Makes the DHT and our signed record follow a topic joined or left in the store.
    pub async fn topic_changed(&self, topic: &str, joined: bool) -> Result<(), crate::store::StoreError> {
        if joined {
            self.dht.join(topic);
        } else {
            self.dht.leave(topic);
        }
        let topics = self.store.joined_topics().await?.into_iter().map(|t| t.name).collect();
        self.exchange.publisher().set_topics(topics).await
    }
}

/// The control listeners, bound before anything is served so that their addresses can be reported.
pub struct ControlListeners {
    socket: ControlSocket,
    tcp: Option<(tokio::net::TcpListener, SocketAddr, Option<String>)>,
    limits: ServerLimitSettings,
}

impl ControlListeners {
    /// Binds the socket (and TCP listener if configured). Must run inside a tokio runtime.
    pub async fn bind(config: &ControlConfig) -> Result<Self, TransportError> {
        let token = config.token.as_ref().map(transport::load_token).transpose()?;
        let socket = ControlSocket::bind(&config.socket)?;
        let tcp = match config.tcp {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| TransportError::Tcp { addr, source })?;
                let local = listener.local_addr().map_err(|source| TransportError::Tcp { addr, source })?;
                Some((listener, local, token))
            }
            None => None,
        };
        Ok(Self { socket, tcp, limits: config.limits })
    }

    pub fn socket_path(&self) -> &std::path::Path {
        self.socket.path()
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|(_, addr, _)| *addr)
    }
}

/// Every service of the control API, health and reflection included, with the health reporter.
async fn routes(ctx: &Context) -> Result<(Routes, HealthReporter), TransportError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeServiceServer<node_info::Node>>().await;
    health.set_serving::<PeerServiceServer<peers::Peers>>().await;
    health.set_serving::<TopicServiceServer<topics::Topics>>().await;

    let reflection_error = |e: tonic_reflection::server::Error| TransportError::Reflection(e.to_string());
    // grpcurl 1.8 and Python's reflection client speak only v1alpha; newer tools use v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(CONTROL_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    let routes = Routes::new(NodeServiceServer::new(node_info::Node(ctx.clone())))
        .add_service(PeerServiceServer::new(peers::Peers(ctx.clone())))
        .add_service(TopicServiceServer::new(topics::Topics(ctx.clone())))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((routes, health))
}

/// Serves `routes` on `incoming` until `stop`, with tracing and client-fault statuses and no token check (the
/// Unix socket, guarded by its file mode, and a loopback TCP listener without a token).
fn serve_open<S>(routes: Routes, incoming: S, stop: CancellationToken) -> ServerTask
where
    S: tokio_stream::Stream<Item = std::io::Result<tokio::io::DuplexStream>> + Send + 'static,
{
    tokio::spawn(async move {
        Server::builder()
            .layer(crate::telemetry::otel::GrpcTraceLayer)
            .layer(status::ClientFaultsLayer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
    })
}

/// The optional TCP listener of the control API, bound.
struct TcpListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    token: Option<String>,
    limits: Arc<ServerLimits>,
}

type ServerTask = JoinHandle<Result<(), tonic::transport::Error>>;

impl TcpListener {
    /// Serves `routes` until `stop`; with a token, every call must carry it (the check is returned, so that a
    /// reload can replace its token).
    fn serve(self, routes: Routes, stop: CancellationToken) -> (ServerTask, Option<transport::RequireToken>) {
        let Self { listener, addr, token, limits } = self;
        let incoming =
            TcpListenerStream::new(listener).map(move |conn| conn.map(|conn| authority::wrap(conn, &limits)));
        match token {
            Some(token) => {
                tracing::info!(%addr, "control API on TCP, bearer token required");
                let check = transport::RequireToken::new(&token);
                let layer = InterceptorLayer::new(check.clone());
                let server = tokio::spawn(async move {
                    Server::builder()
                        .layer(crate::telemetry::otel::GrpcTraceLayer)
                        .layer(status::ClientFaultsLayer)
                        .layer(layer)
                        .add_routes(routes)
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                });
                (server, Some(check))
            }
            None => {
                tracing::warn!(%addr, "control API on loopback TCP without a token: any local user can use it");
                (serve_open(routes, incoming, stop), None)
            }
        }
    }
}

/// The running control servers.
pub struct ControlServer {
    servers: Vec<ServerTask>,
    health: HealthReporter,
    /// The limits in force on each listener, changed in place on reload.
    limits: Vec<Arc<ServerLimits>>,
    /// The TCP listener's token check, if it has one; its token is replaced on reload.
    token: Option<transport::RequireToken>,
    /// Removes the socket file when the server is dropped.
    _socket: ControlSocket,
}

impl ControlServer {
    /// Starts serving on the bound listeners until `ctx.shutdown` is cancelled.
    pub async fn start(mut listeners: ControlListeners, ctx: Context) -> Result<Self, TransportError> {
        let (routes, health) = routes(&ctx).await?;

        let mut servers = Vec::new();
        let socket_listener = listeners.socket.take_listener().ok_or_else(|| TransportError::Io {
            action: "serve",
            path: listeners.socket.path().to_path_buf(),
            source: std::io::Error::other("the control socket was already served"),
        })?;
        let stop = ctx.shutdown.clone();
        let unix_routes = routes.clone();
        let limits = ServerLimits::new(listeners.limits);
        let unix_limits = limits.clone();
        let unix_incoming = UnixListenerStream::new(socket_listener)
            .map(move |conn| conn.map(|conn| authority::wrap(conn, &unix_limits)));
        servers.push(serve_open(unix_routes, unix_incoming, stop));

        let mut all_limits = vec![limits];
        let mut token_check = None;
        if let Some((listener, addr, token)) = listeners.tcp.take() {
            // Its own connection slots (a local script flooding one listener leaves the other usable), under
            // the same limits.
            let tcp_limits = ServerLimits::new(listeners.limits);
            all_limits.push(tcp_limits.clone());
            let tcp = TcpListener { listener, addr, token, limits: tcp_limits };
            let (server, check) = tcp.serve(routes, ctx.shutdown.clone());
            servers.push(server);
            token_check = check;
        }
        Ok(Self { servers, health, limits: all_limits, token: token_check, _socket: listeners.socket })
    }

    /// Puts new connection limits in force on every listener.
    pub fn set_limits(&self, settings: ServerLimitSettings) {
        for limits in &self.limits {
            limits.set(settings);
        }
    }

    /// Reads the TCP listener's token again from `source` (a token file may have been rewritten) and puts it
    /// in force; says whether it changed. A listener started without a token, or a source removed, needs a
    /// restart: `Ok(None)`.
    pub fn reload_token(&self, source: Option<&TokenSource>) -> Result<Option<bool>, TransportError> {
        let (Some(check), Some(source)) = (&self.token, source) else { return Ok(None) };
        let token = transport::load_token(source)?;
        Ok(Some(check.replace(&token)))
    }

    /// Reports overall serving health (the empty service name) to health checkers.
    pub async fn set_healthy(&self, healthy: bool) {
        let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.health.set_service_status("", status).await;
    }

    /// Waits until every server has drained after `ctx.shutdown` was cancelled.
    pub async fn wait(self) {
        for server in self.servers {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "control server failed"),
                Err(e) => tracing::error!(error = %e, "control server task panicked"),
            }
        }
    }
}
