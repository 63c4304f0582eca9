//! The monitoring HTTP server: `/metrics`, `/healthz`, `/readyz` and the jemalloc heap profile endpoints.
//!
//! HTTP/1.1 only (Prometheus, curl and `go tool pprof` all speak it), on axum, which tonic already pulls in.
//! Nothing here reads a request body, so a client cannot make the server buffer anything; the expensive
//! request (a heap profile) runs on the blocking pool, one at a time. Connections are capped, and closed when a
//! request's headers take longer than the handshake timeout or nothing moves for the idle timeout
//! (`monitoring.*` settings, see [`crate::limits`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::heap::{self, HeapProfileError, HeapProfiling};
use super::metrics::Registry;
use crate::limits::{IdleTimeout, ServerLimits};
use crate::sync::Throttle;

/// Says whether the node can do its job; `Err` carries the reason shown by `/readyz`.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    #[error(
        "the monitoring address {0} is already in use (another node or program listens on this TCP port); \
         choose another with monitoring.listen / RN_MONITORING_LISTEN / --monitoring-listen"
    )]
    AddrInUse(SocketAddr),
    #[error("cannot listen for monitoring HTTP on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Where the monitoring server listens, and so what an address already in use means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitoringListen {
    /// An address the operator configured (flag, environment or file): whatever scrapes the node expects it
    /// there, so if it is taken the node does not start.
    Configured(SocketAddr),
    /// The built-in default. A second node on the same machine finds it taken by the first; it then listens on
    /// a free port of the same IP and warns which, rather than refusing to start over an address nobody chose.
    Default(SocketAddr),
}

impl MonitoringListen {
    pub fn addr(self) -> SocketAddr {
        match self {
            Self::Configured(addr) | Self::Default(addr) => addr,
        }
    }
}

/// A running monitoring server. It stops when the `shutdown` token given to [`serve`] is cancelled.
#[derive(Debug)]
pub struct Monitoring {
    /// The bound address (the actual port when port 0 was asked for).
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Monitoring {
    /// Waits until the server has stopped: the token was cancelled and in-flight requests were answered.
    pub async fn wait(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the monitoring server task failed");
        }
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    readiness: Readiness,
    local_addr: SocketAddr,
}

/// Binds `listen` and serves the monitoring endpoints until `shutdown` is cancelled. The address actually
/// bound is [`Monitoring::local_addr`]; it differs from the one asked for when port 0 was asked for, or when the
/// default was taken (see [`MonitoringListen::Default`]).
///
/// The default address is loopback; a wider one is the operator's explicit choice but is logged as a warning,
/// because `/debug/pprof/heap` reveals code addresses and memory usage and nothing here authenticates.
pub async fn serve(
    listen: MonitoringListen,
    registry: Arc<Registry>,
    readiness: Readiness,
    limits: Arc<ServerLimits>,
    shutdown: CancellationToken,
) -> Result<Monitoring, MonitoringError> {
    let listener = match (bind(listen.addr()).await, listen) {
        (Err(MonitoringError::AddrInUse(taken)), MonitoringListen::Default(_)) => {
            let listener = bind(SocketAddr::new(taken.ip(), 0)).await?;
            let instead =
                listener.local_addr().map_err(|source| MonitoringError::Bind { addr: taken, source })?;
            tracing::warn!(
                %taken,
                %instead,
                "the default monitoring address {taken} is already in use (another node or program listens \
                 on it); listening on {instead} instead. Set monitoring.listen / RN_MONITORING_LISTEN / \
                 --monitoring-listen to choose the address"
            );
            listener
        }
        (bound, _) => bound?,
    };
    let local_addr =
        listener.local_addr().map_err(|source| MonitoringError::Bind { addr: listen.addr(), source })?;
    if !local_addr.ip().is_loopback() {
        tracing::warn!(
            %local_addr,
            "monitoring endpoints (metrics, heap profiles, profiling switch) are reachable from other hosts \
             and unauthenticated; restrict access with a firewall or bind a loopback address"
        );
    }
    let app = router(AppState { registry, readiness, local_addr });
    let task = tokio::spawn(accept_loop(listener, app, limits, shutdown));
    tracing::info!(%local_addr, "monitoring endpoints listening (/metrics, /healthz, /readyz, /debug/pprof/heap)");
    Ok(Monitoring { local_addr, task })
}

/// Serves each accepted connection within `limits` until `shutdown`, then lets the requests in flight finish.
///
/// Not `axum::serve`: it has no connection cap and no timeouts, and each idle or slow client would hold a file
/// descriptor for as long as it liked (about 230 idle connections starved the database at `ulimit -n` 256).
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Arc<ServerLimits>,
    shutdown: CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin, and keep serving the others.
                tracing::warn!(error = %e, "monitoring server could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = limits.try_open() else {
            log_refused(limits.settings().max_connections);
            drop(stream);
            continue;
        };
        let headers_within = limits.handshake_timeout();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(IdleTimeout::new(stream, slot));
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(headers_within);
            let builder = builder.http1_only();
            let connection = builder.serve_connection(io, service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "monitoring connection ended with an error");
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// Logs refused connections at WARN, at most once per 10 s with the count since.
fn log_refused(limit: usize) {
    static REFUSALS: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(refused) = REFUSALS.event() {
        tracing::warn!(
            refused,
            limit,
            "monitoring connections refused: too many are open (monitoring.max_connections); close idle clients"
        );
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, MonitoringError> {
    TcpListener::bind(addr).await.map_err(|source| match source.kind() {
        std::io::ErrorKind::AddrInUse => MonitoringError::AddrInUse(addr),
        _ => MonitoringError::Bind { addr, source },
    })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/debug/pprof/heap", get(heap_profile))
        .route("/debug/pprof/heap/activate", post(activate))
        .route("/debug/pprof/heap/deactivate", post(deactivate))
        .route("/debug/pprof/symbol", get(symbol_count).post(symbolize))
        .fallback(not_found)
        .with_state(state)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT)], body.into()).into_response()
}

async fn index(State(state): State<AppState>) -> Response {
    let profiling = match heap::heap_profiling() {
        HeapProfiling::Active { lg_sample } => {
            let interval = 1u64.checked_shl(lg_sample).unwrap_or(u64::MAX);
            format!("active, one sample per {} KiB allocated on average", interval / 1024)
        }
        HeapProfiling::Paused => "paused (POST /debug/pprof/heap/activate to resume)".to_owned(),
        HeapProfiling::Unavailable(why) => why,
    };
    let addr = state.local_addr;
    text(
        StatusCode::OK,
        format!(
            "remote-network monitoring\n\n\
             GET  /metrics                       Prometheus metrics (text format 0.0.4)\n\
             GET  /healthz                       liveness: 200 while this server answers\n\
             GET  /readyz                        readiness: 200, or 503 with the reason\n\
             GET  /debug/pprof/heap              jemalloc heap profile (pprof, gzipped protobuf)\n\
             POST /debug/pprof/heap/activate     resume heap sampling\n\
             POST /debug/pprof/heap/deactivate   pause heap sampling (discards samples)\n\
             GET  /debug/pprof/symbol            pprof symbol lookups (answers: none; pprof symbolises locally)\n\n\
             heap profiling: {profiling}\n\n\
             Profiles hold raw addresses; pprof symbolises them with the binary and its libraries:\n\
             on this host:     go tool pprof -http=: http://{addr}/debug/pprof/heap\n\
             another machine:  curl -o heap.pb.gz http://{addr}/debug/pprof/heap, copy it with the binary,\n\
             \x20                 then go tool pprof -http=: ./remote-network heap.pb.gz\n"
        ),
    )
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.registry.scrape().await;
    (StatusCode::OK, [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AppState>) -> Response {
    match (state.readiness)() {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

/// Go's `/debug/pprof/heap` accepts `?gc=1`, `?debug=1` and `?seconds=N`; this one ignores query parameters
/// and always answers with the current in-use profile in protobuf, which is what `go tool pprof` asks for.
async fn heap_profile(State(state): State<AppState>) -> Response {
    match heap::heap_profile_pprof().await {
        Ok(pprof) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"heap.pb.gz\""),
            ],
            pprof,
        )
            .into_response(),
        Err(e) => heap_error(&state, &e),
    }
}

async fn activate(State(state): State<AppState>) -> Response {
    switch(&state, true).await
}

async fn deactivate(State(state): State<AppState>) -> Response {
    switch(&state, false).await
}

async fn switch(state: &AppState, active: bool) -> Response {
    match heap::set_heap_profiling(active).await {
        Ok(()) if active => text(
            StatusCode::OK,
            "heap sampling active; allocations from now on are sampled (GET /debug/pprof/heap)\n",
        ),
        Ok(()) => text(StatusCode::OK, "heap sampling paused; samples taken so far were discarded\n"),
        Err(e) => heap_error(state, &e),
    }
}

fn heap_error(state: &AppState, error: &HeapProfileError) -> Response {
    let status = match error {
        HeapProfileError::NotGlobalAllocator
        | HeapProfileError::NotCompiledIn
        | HeapProfileError::DisabledAtStart => StatusCode::SERVICE_UNAVAILABLE,
        HeapProfileError::Paused => StatusCode::CONFLICT,
        HeapProfileError::Busy => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, TEXT), (header::RETRY_AFTER, "5")],
                format!("{error}\n"),
            )
                .into_response();
        }
        HeapProfileError::Dump(_) | HeapProfileError::Switch(_) => {
            tracing::warn!(%error, "heap profile request failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    // The message names a placeholder so it reads well in logs too; here the real address is known.
    let body = error.to_string().replace("<monitoring address>", &state.local_addr.to_string());
    text(status, body + "\n")
}

/// The symbolz protocol of Go's `net/http/pprof`, answered with "no symbols here". Profiles carry raw
/// addresses plus the mappings (path, build ID) of the binary and libraries; `go tool pprof` symbolises them
/// locally first and then POSTs the addresses it could not resolve (libc without debug info, say) here. A 404
/// would make it abort the whole fetch, so this answers with an empty list: those frames stay as addresses.
async fn symbol_count() -> Response {
    text(StatusCode::OK, "num_symbols: 0\n")
}

/// The request body (a `+`-separated address list) is deliberately not read: nothing is resolved here.
async fn symbolize() -> Response {
    text(StatusCode::OK, "")
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found; GET / lists the endpoints\n")
}
