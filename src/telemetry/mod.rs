//! Operator-facing monitoring: Prometheus metrics, liveness and readiness probes, and jemalloc heap profiles,
//! served over HTTP on `monitoring.listen` (default `127.0.0.1:6060`; when that default is taken, as by a second
//! node on the machine, another loopback port with a warning).
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /metrics` | text format 0.0.4: the [`Registry`]'s families, `process_*`, `jemalloc_*` |
//! | `GET /healthz` | 200 `ok` while the process serves HTTP (liveness) |
//! | `GET /readyz` | 200 `ready`, or 503 with the readiness function's reason |
//! | `GET /debug/pprof/heap` | gzipped pprof heap profile; 503 unavailable, 409 paused, 429 busy |
//! | `POST /debug/pprof/heap/activate` / `deactivate` | resume / pause heap sampling |
//! | `GET`/`POST /debug/pprof/symbol` | pprof's symbol lookup, answered "none" so pprof symbolises locally |
//! | `GET /` | the list above and the heap profiling state |
//!
//! Typical wiring (in the node):
//! ```ignore
//! let registry = Arc::new(Registry::new());
//! telemetry::register_process_metrics(&registry);
//! telemetry::register_allocator_metrics(&registry);
//! // ... module metrics and collectors ...
//! let listen = MonitoringListen::Configured(addr);
//! let monitoring = telemetry::serve(listen, registry, readiness, shutdown.clone()).await?;
//! // on stop: cancel `shutdown`, then `monitoring.wait().await`
//! ```
//!
//! Heap profiles need the binary to use jemalloc as its global allocator with profiling enabled in its
//! `malloc_conf`; see [`heap`] for what happens otherwise.

pub mod heap;
pub mod http;
pub mod metrics;
pub mod otel;
pub mod process;

#[cfg(test)]
mod tests;

pub use heap::{
    AllocatorStats, HeapProfileError, HeapProfiling, heap_profile_pprof, heap_profiling,
    jemalloc_is_global_allocator, register_allocator_metrics, set_heap_profiling,
};
pub use http::{Monitoring, MonitoringError, MonitoringListen, Readiness, serve};
pub use metrics::{
    Collector, Counter, Gauge, Histogram, HistogramSnapshot, MetricKind, Registry, SampleValue, SampleWriter,
    Snapshot, exponential_buckets, linear_buckets,
};
pub use process::{ProcessStats, register_process_metrics};
