//! OpenTelemetry trace export over OTLP (gRPC or HTTP/protobuf), configured by the standard `OTEL_*`
//! environment variables and off unless an endpoint is set.
//!
//! | variable | meaning |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | the traces URL, used as is (HTTP: the full `.../v1/traces` URL) |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | the collector's base URL (HTTP: `/v1/traces` is appended) |
//! | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` (default, as the specification says) |
//! | `OTEL_EXPORTER_OTLP_TIMEOUT` / `OTEL_EXPORTER_OTLP_HEADERS` | read by the exporter itself |
//! | `OTEL_SERVICE_NAME` | `service.name`, default `remote-network` |
//! | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes (`key=value,...`) |
//! | `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` | the sampler (default `parentbased_always_on`) |
//! | `OTEL_BSP_MAX_QUEUE_SIZE` | spans waiting for export before new ones are dropped (default 2048) |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_EXPORT_TIMEOUT` | batch tuning |
//! | `OTEL_SDK_DISABLED` | `true` turns export off whatever else is set |
//! | `RN_OTEL_FILTER` | which spans are exported, as `target=level,...` (default `remote_network=info`) |
//!
//! A slow or absent collector never slows the node: finished spans go to a bounded queue drained by the SDK's
//! batch thread, and spans that find it full are dropped and counted ([`dropped_spans`]). The exporter's
//! network I/O runs on a small runtime of its own, so it neither competes with the node's runtime nor depends
//! on it still running when the [`OtelGuard`] flushes at exit.
//!
//! Spans of the HTTP/2 and gRPC stack (`h2`, `hyper`, `tonic`, `tower`) are never exported: the exporter itself
//! uses that stack, and tracing it would trace itself.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tracing::Instrument as _;
use tracing::level_filters::LevelFilter;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// Default `service.name`.
pub const DEFAULT_SERVICE_NAME: &str = "remote-network";
/// Default bound of the queue of finished spans waiting for export.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;
/// Longest [`OtelGuard::shutdown`] waits for the last spans to reach the collector.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Targets never exported, whatever `RN_OTEL_FILTER` says: the exporter's own stack.
const NEVER_EXPORTED: &[&str] =
    &["h2", "hyper", "hyper_util", "tonic", "tower", "opentelemetry", "opentelemetry_sdk"];

static DROPPED_SPANS: AtomicU64 = AtomicU64::new(0);
static FAILED_SPANS: AtomicU64 = AtomicU64::new(0);
static EXPORTED_SPANS: AtomicU64 = AtomicU64::new(0);
static NODE_ID: OnceLock<String> = OnceLock::new();

/// Spans dropped because the export queue was full (the collector is slow or absent), since start.
pub fn dropped_spans() -> u64 {
    DROPPED_SPANS.load(Ordering::Relaxed)
}

/// Spans handed to the collector in batches that failed (unreachable, rejected, timed out), since start.
pub fn failed_spans() -> u64 {
    FAILED_SPANS.load(Ordering::Relaxed)
}

/// Spans the collector accepted, since start.
pub fn exported_spans() -> u64 {
    EXPORTED_SPANS.load(Ordering::Relaxed)
}

/// Records this node's id: every span started afterwards carries it as the attribute `node.id`. Only the
/// first call counts. (The resource is fixed before the identity is loaded, so the id is a span attribute.)
pub fn set_node_id(node_id: impl Into<String>) {
    let _ = NODE_ID.set(node_id.into());
}

/// Why OTel export could not be set up from the environment.
#[derive(Debug)]
pub enum OtelError {
    /// A variable has a value we do not understand.
    InvalidVariable { name: &'static str, value: String, expected: &'static str },
    /// The exporter or its runtime could not be built.
    Build(String),
}

impl fmt::Display for OtelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidVariable { name, value, expected } => {
                write!(f, "{name}={value:?} is not valid: expected {expected}")
            }
            Self::Build(e) => write!(f, "cannot set up OTLP trace export: {e}"),
        }
    }
}

impl std::error::Error for OtelError {}

/// The OTLP wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// What [`layer_from_env`] read; also useful to log once logging is up.
#[derive(Debug, Clone)]
pub struct OtelConfig {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub max_queue_size: usize,
    pub filter: Targets,
}

impl OtelConfig {
    /// Reads the configuration from `var` (the process environment in [`layer_from_env`]); `None` when export
    /// is off (no endpoint, or `OTEL_SDK_DISABLED=true`).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, OtelError> {
        let var = |name: &str| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(disabled) = var("OTEL_SDK_DISABLED") {
            match disabled.to_ascii_lowercase().as_str() {
                "true" => return Ok(None),
                "false" => {}
                _ => {
                    return Err(OtelError::InvalidVariable {
                        name: "OTEL_SDK_DISABLED",
                        value: disabled,
                        expected: "true or false",
                    });
                }
            }
        }
        let protocol =
            match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL")) {
                None => OtlpProtocol::HttpProtobuf,
                Some(p) if p == "grpc" => OtlpProtocol::Grpc,
                Some(p) if p == "http/protobuf" => OtlpProtocol::HttpProtobuf,
                Some(p) => {
                    return Err(OtelError::InvalidVariable {
                        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
                        value: p,
                        expected: "grpc or http/protobuf",
                    });
                }
            };
        let endpoint = if let Some(url) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            url
        } else if let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            match protocol {
                OtlpProtocol::Grpc => base,
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            }
        } else {
            return Ok(None);
        };
        if endpoint.starts_with("https://") {
            // Refused here rather than failing every export later, silently, for want of TLS in the exporter.
            return Err(OtelError::InvalidVariable {
                name: "OTEL_EXPORTER_OTLP_ENDPOINT",
                value: endpoint,
                expected: "an http:// URL: TLS to the collector is not built in; run a collector or agent on \
                           this host (OpenTelemetry Collector, rotel) at http://127.0.0.1:4317 and let it \
                           forward over TLS",
            });
        }
        if !endpoint.starts_with("http://") {
            return Err(OtelError::InvalidVariable {
                name: "OTEL_EXPORTER_OTLP_ENDPOINT",
                value: endpoint,
                expected: "an http:// URL",
            });
        }
        let max_queue_size = match var("OTEL_BSP_MAX_QUEUE_SIZE") {
            None => DEFAULT_MAX_QUEUE_SIZE,
            Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or(OtelError::InvalidVariable {
                name: "OTEL_BSP_MAX_QUEUE_SIZE",
                value: v,
                expected: "a positive integer",
            })?,
        };
        let mut filter = match var("RN_OTEL_FILTER") {
            None => Targets::new().with_target("remote_network", LevelFilter::INFO),
            Some(v) => Targets::from_str(&v).map_err(|_| OtelError::InvalidVariable {
                name: "RN_OTEL_FILTER",
                value: v,
                expected: "target=level,... (such as remote_network=debug)",
            })?,
        };
        for target in NEVER_EXPORTED {
            filter = filter.with_target(*target, LevelFilter::OFF);
        }
        Ok(Some(Self { endpoint, protocol, max_queue_size, filter }))
    }
}

/// Builds the tracing layer that exports spans over OTLP, with the guard that flushes them at exit; `None`
/// when no endpoint is configured. Call it outside any async runtime (it starts one of its own for the
/// exporter's I/O). The layer is already filtered (see `RN_OTEL_FILTER`); add it to the registry beside the
/// log layer.
pub fn layer_from_env<S>() -> Result<Option<(impl Layer<S> + Send + Sync + 'static, OtelGuard)>, OtelError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let Some(config) = OtelConfig::from_vars(|name| std::env::var(name).ok())? else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()
        .map_err(|e| OtelError::Build(format!("cannot start the export runtime: {e}")))?;
    let exporter = {
        let _entered = runtime.enter();
        let built = match config.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&config.endpoint)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(RuntimeHttpClient {
                    handle: runtime.handle().clone(),
                    inner: opentelemetry_http::hyper::HyperClient::with_default_connector(
                        export_timeout(),
                        None,
                    ),
                })
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(&config.endpoint)
                .build(),
        };
        built.map_err(|e| OtelError::Build(e.to_string()))?
    };
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(CountingExporter { inner: exporter, queued: queued.clone() })
        .with_batch_config(
            // Our own bound (`max_queue_size`) is enforced before the SDK's queue, which gets headroom so it
            // never drops uncounted.
            BatchConfigBuilder::default()
                .with_max_queue_size(config.max_queue_size.saturating_mul(2))
                .build(),
        )
        .build();
    let processor = BoundedProcessor { inner: batch, queued, max_queued: config.max_queue_size };
    let provider =
        SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource()).build();
    let tracer = provider.tracer("remote-network");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(config.filter.clone());
    Ok(Some((layer, OtelGuard { provider: Some(provider), runtime: Some(runtime), config })))
}

fn export_timeout() -> Duration {
    std::env::var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// `service.name` (default `remote-network`), `service.version`, `OTEL_RESOURCE_ATTRIBUTES`, and the SDK's own.
fn resource() -> Resource {
    let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let has = |key: &str| attributes.split(',').any(|kv| kv.split('=').next().map(str::trim) == Some(key));
    let mut builder = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) && !has("service.name") {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    if !has("service.version") {
        builder = builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    builder.build()
}

/// Flushes the spans still queued and stops the exporter, within [`SHUTDOWN_TIMEOUT`]; done on drop too.
pub struct OtelGuard {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
    config: OtelConfig,
}

impl fmt::Debug for OtelGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelGuard").field("config", &self.config).finish_non_exhaustive()
    }
}

impl OtelGuard {
    /// What export was configured with.
    pub fn config(&self) -> &OtelConfig {
        &self.config
    }

    /// Flushes and shuts the exporter down; waits at most [`SHUTDOWN_TIMEOUT`] (plus a little to stop the
    /// runtime), whatever the collector does. Idempotent.
    pub fn shutdown(&mut self) {
        let (Some(provider), Some(runtime)) = (self.provider.take(), self.runtime.take()) else {
            return;
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // The batch thread exports through this runtime, so shut down from one of its blocking threads (a
        // blocked current-thread runtime would export nothing).
        runtime.spawn_blocking(move || {
            let _ = done_tx.send(provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        });
        match done_rx.recv_timeout(SHUTDOWN_TIMEOUT + Duration::from_millis(500)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(target: "otel_export", error = %e, "OTLP trace export did not shut down cleanly")
            }
            Err(_) => {
                tracing::warn!(target: "otel_export", "OTLP trace export did not finish within {SHUTDOWN_TIMEOUT:?}")
            }
        }
        let dropped = dropped_spans();
        if dropped > 0 {
            tracing::warn!(target: "otel_export", dropped, "spans were dropped because the export queue was full");
        }
        runtime.shutdown_timeout(Duration::from_millis(500));
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Enforces the queue bound before the SDK's batch processor, so drops are counted; stamps `node.id`.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet taken by the exporter.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        if let Some(id) = NODE_ID.get() {
            span.set_attribute(KeyValue::new("node.id", id.clone()));
        }
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            DROPPED_SPANS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts spans leaving the queue and their fate.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    queued: Arc<AtomicUsize>,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(n)));
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => EXPORTED_SPANS.fetch_add(n as u64, Ordering::Relaxed),
            Err(_) => FAILED_SPANS.fetch_add(n as u64, Ordering::Relaxed),
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Hyper's client needs a Tokio runtime in the calling thread, and the SDK's batch thread has none: run each
/// request on the export runtime.
#[derive(Debug, Clone)]
struct RuntimeHttpClient {
    handle: tokio::runtime::Handle,
    inner: opentelemetry_http::hyper::HyperClient,
}

#[async_trait::async_trait]
impl HttpClient for RuntimeHttpClient {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.handle
            .spawn(async move { inner.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as HttpError)?
    }
}

/// Tower layer for the control server: one `control.rpc` span per call, named by its gRPC method, whose
/// parent is the caller's W3C `traceparent` (and `tracestate`) when the request carries one.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

/// The service [`GrpcTraceLayer`] wraps around the control API.
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", path));
        let span = tracing::info_span!(
            "control.rpc",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<OtelConfig>, OtelError> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        OtelConfig::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn off_without_endpoint_or_when_disabled() {
        assert!(config(&[]).unwrap().is_none());
        assert!(config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap().is_none());
        let disabled =
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_SDK_DISABLED", "TRUE")];
        assert!(config(&disabled).unwrap().is_none());
    }

    #[test]
    fn endpoints_per_protocol() {
        let grpc = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((grpc.endpoint.as_str(), grpc.protocol), ("http://c:4317", OtlpProtocol::Grpc));
        let http = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).unwrap().unwrap();
        assert_eq!(
            (http.endpoint.as_str(), http.protocol),
            ("http://c:4318/v1/traces", OtlpProtocol::HttpProtobuf)
        );
        let exact = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/x"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(exact.endpoint, "http://t:1/x");
    }

    #[test]
    fn rejects_bad_values() {
        let bad_protocol =
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")];
        assert!(config(&bad_protocol).is_err());
        assert!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317")]).is_err());
        let https = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4317")]);
        let message = https.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("TLS to the collector is not built in"), "{message}");
        assert!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_BSP_MAX_QUEUE_SIZE", "0")]).is_err()
        );
        assert!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("OTEL_SDK_DISABLED", "maybe")]).is_err()
        );
    }

    #[test]
    fn the_stack_of_the_exporter_is_never_exported() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), ("RN_OTEL_FILTER", "trace")])
            .unwrap()
            .unwrap();
        for target in ["h2", "hyper::proto", "tonic::transport", "tower::buffer"] {
            assert!(!c.filter.would_enable(target, &tracing::Level::ERROR), "{target}");
        }
        assert!(c.filter.would_enable("remote_network::node", &tracing::Level::DEBUG));
    }
}
