//! A small metrics registry rendered in the Prometheus text exposition format 0.0.4.
//!
//! Two ways to put a metric family on `/metrics`:
//! - **Owned metrics** ([`Counter`], [`Gauge`], [`Histogram`]): a module asks the registry for one and keeps the
//!   `Arc`; updating it is one relaxed atomic operation (a histogram: two, plus a CAS loop for the sum), so it is
//!   cheap enough for hot paths.
//! - **Collectors**: [`Registry::register`] takes a closure that writes the family's samples at scrape time, so
//!   counters that already live elsewhere (the exchange's and the DHT's atomics) are read where they are, without
//!   plumbing an owned metric into those modules.
//!
//! Sources that need an `.await` (the store's statistics run a query on its reader pool) cannot be read from a
//! synchronous collector. [`Registry::snapshot`] registers an async fetch that the scrape handler runs
//! ([`Registry::refresh`]) before rendering, bounded by [`REFRESH_TIMEOUT`]; collectors then read the
//! [`Snapshot`]. A fetch that fails or times out clears its snapshot, so its families are rendered without
//! samples instead of with stale values (Prometheus then marks the series stale rather than flat-lining).
//!
//! Families are rendered sorted by name so consecutive scrapes diff cleanly. Metric and label names are checked
//! with `debug_assert!`: a bad name is a programming error that tests catch, not an operator's problem.

use std::collections::BTreeMap;
use std::fmt::{self, Display, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

/// Longest an async snapshot fetch may take during a scrape. Prometheus' default scrape timeout is 10 s; staying
/// well under it means a stuck source costs its own families, not the whole scrape.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// The `# TYPE` of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (resets on restart). By convention its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// `_bucket{le=..}`, `_sum` and `_count` series; write them with [`SampleWriter::histogram`].
    Histogram,
    /// No type information (for values whose semantics are unknown, e.g. mirrored from elsewhere).
    Untyped,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
            MetricKind::Untyped => "untyped",
        }
    }
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An integer value that goes up and down (connections, queue lengths, bytes). Floating-point gauges are
/// written by collectors.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn dec(&self) {
        self.add(-1);
    }

    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds `start, start*factor, ...` (`count` of them), e.g. `exponential_buckets(0.001, 2.0, 14)` for
/// latencies from 1 ms to about 8 s.
pub fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    debug_assert!(start > 0.0 && factor > 1.0, "exponential buckets need start > 0 and factor > 1");
    std::iter::successors(Some(start), |b| Some(b * factor)).take(count).collect()
}

/// Bucket bounds `start, start+width, ...` (`count` of them).
pub fn linear_buckets(start: f64, width: f64, count: usize) -> Vec<f64> {
    debug_assert!(width > 0.0, "linear buckets need width > 0");
    (0..count).map(|i| start + width * i as f64).collect()
}

/// A fixed-bucket histogram.
///
/// Each bucket slot counts only the observations that fall in it (not cumulative), so `observe` touches one
/// slot; cumulation happens at render time. The count is the sum of the slots rather than a separate atomic,
/// which guarantees `_bucket{le="+Inf"} == _count` even when a scrape races with observations.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[f64]>,
    /// One slot per bound, plus the `+Inf` slot.
    slots: Box<[AtomicU64]>,
    /// The sum as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// `bounds` are the buckets' inclusive upper bounds (`le`), strictly increasing and finite; `+Inf` is
    /// implied. In release builds bad bounds are repaired (sorted, deduplicated, non-finite ones dropped) rather
    /// than rejected: a histogram with odd buckets is better than a daemon that refuses to start.
    pub fn new(bounds: &[f64]) -> Self {
        debug_assert!(
            bounds.iter().all(|b| b.is_finite()) && bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be finite and strictly increasing: {bounds:?}"
        );
        let mut bounds: Vec<f64> = bounds.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let slots = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self { bounds: bounds.into_boxed_slice(), slots, sum: AtomicU64::new(0f64.to_bits()) }
    }

    /// Records one value. NaN is ignored: it would turn the sum into NaN for the rest of the process' life.
    pub fn observe(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        // First bound >= value; past the end is the +Inf slot.
        let slot = self.bounds.partition_point(|&bound| bound < value);
        self.slots[slot].fetch_add(1, Ordering::Relaxed);
        // A CAS loop instead of a lock: contention is rare and the loop is short.
        let _ = self.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    /// Records a duration in seconds (the base unit for `_seconds` histograms).
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// The current state with cumulative bucket counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, slot) in self.bounds.iter().zip(self.slots.iter()) {
            total += slot.load(Ordering::Relaxed);
            buckets.push((*bound, total));
        }
        total += self.slots[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot { buckets, count: total, sum: f64::from_bits(self.sum.load(Ordering::Relaxed)) }
    }
}

/// A histogram's state as rendered: `(upper bound, cumulative count)` per finite bucket; `count` is also the
/// `+Inf` bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// A sample's value. Integers are written exactly (an `f64` would round counters above 2^53).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleValue {
    Int(i128),
    Float(f64),
}

macro_rules! int_sample_value {
    ($($t:ty),*) => {$(
        impl From<$t> for SampleValue {
            fn from(value: $t) -> Self {
                SampleValue::Int(i128::from(value))
            }
        }
    )*};
}
int_sample_value!(u8, u16, u32, u64, i8, i16, i32, i64);

impl From<usize> for SampleValue {
    fn from(value: usize) -> Self {
        // usize is at most 64 bits on every supported target, so this never saturates in practice.
        SampleValue::Int(i128::try_from(value).unwrap_or(i128::MAX))
    }
}

impl From<f64> for SampleValue {
    fn from(value: f64) -> Self {
        SampleValue::Float(value)
    }
}

impl From<bool> for SampleValue {
    fn from(value: bool) -> Self {
        SampleValue::Int(i128::from(u8::from(value)))
    }
}

impl Display for SampleValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SampleValue::Int(v) => write!(f, "{v}"),
            SampleValue::Float(v) => write_float(f, v),
        }
    }
}

/// Go's `strconv.ParseFloat` (what Prometheus parses with) spells infinities `+Inf`/`-Inf`; Rust prints `inf`.
/// Whole numbers of ordinary size are written without a fraction (`3`, as other clients do); everything else
/// uses Rust's shortest round-trip form in `Debug` style, which switches to exponent notation (`1e-300`) for
/// extreme magnitudes where `Display` would write hundreds of digits. Go parses both.
fn write_float(out: &mut impl fmt::Write, v: f64) -> fmt::Result {
    if v.is_nan() {
        out.write_str("NaN")
    } else if v == f64::INFINITY {
        out.write_str("+Inf")
    } else if v == f64::NEG_INFINITY {
        out.write_str("-Inf")
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        write!(out, "{v:.0}")
    } else {
        write!(out, "{v:?}")
    }
}

/// Writes the samples of one family; handed to collectors at scrape time.
pub struct SampleWriter<'a> {
    out: &'a mut String,
    name: &'a str,
    kind: MetricKind,
}

impl SampleWriter<'_> {
    /// One unlabelled sample named like the family.
    pub fn value(&mut self, value: impl Into<SampleValue>) {
        self.sample(&[], value);
    }

    /// One sample named like the family, with labels. Values are escaped here; names must be valid label
    /// names (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<SampleValue>) {
        debug_assert!(
            self.kind != MetricKind::Histogram,
            "{}: histogram families are written with SampleWriter::histogram",
            self.name
        );
        write_sample(self.out, self.name, "", labels, None, value.into());
    }

    /// The `_bucket`, `_sum` and `_count` series of one histogram (one label set).
    pub fn histogram(&mut self, labels: &[(&str, &str)], snapshot: &HistogramSnapshot) {
        debug_assert!(self.kind == MetricKind::Histogram, "{} is not declared as a histogram", self.name);
        debug_assert!(
            labels.iter().all(|(name, _)| *name != "le"),
            "{}: `le` is reserved in histograms",
            self.name
        );
        let mut le = String::new();
        for &(bound, count) in &snapshot.buckets {
            le.clear();
            let _ = write_float(&mut le, bound);
            write_sample(self.out, self.name, "_bucket", labels, Some(&le), SampleValue::from(count));
        }
        write_sample(self.out, self.name, "_bucket", labels, Some("+Inf"), SampleValue::from(snapshot.count));
        write_sample(self.out, self.name, "_sum", labels, None, SampleValue::Float(snapshot.sum));
        write_sample(self.out, self.name, "_count", labels, None, SampleValue::from(snapshot.count));
    }
}

fn write_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: SampleValue,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (label, label_value)) in all.enumerate() {
            debug_assert!(is_valid_label_name(label), "{name}: invalid label name {label:?}");
            if i > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            escape_label_value(out, label_value);
            out.push('"');
        }
        out.push('}');
    }
    // Writing into a String cannot fail.
    let _ = writeln!(out, " {value}");
}

/// Label values escape `\`, `"` and newline (format 0.0.4).
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes only `\` and newline (a `"` is literal there).
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, and not `__`-prefixed (reserved for Prometheus' internal labels).
pub fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// A value refreshed by an async fetch before each scrape renders; read it from collectors.
#[derive(Debug)]
pub struct Snapshot<T> {
    value: Mutex<Option<Arc<T>>>,
}

impl<T> Snapshot<T> {
    fn new() -> Self {
        Self { value: Mutex::new(None) }
    }

    /// The value from the latest successful fetch, or `None` when the latest fetch failed or timed out (or none
    /// has run yet).
    pub fn get(&self) -> Option<Arc<T>> {
        // The lock only guards a pointer swap; a panic elsewhere cannot leave it half-written.
        self.value.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, value: Option<T>) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = value.map(Arc::new);
    }
}

/// Writes one family's samples at scrape time; see [`Registry::register`].
pub type Collector = Box<dyn Fn(&mut SampleWriter<'_>) + Send + Sync>;
type RefreshFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type RefreshFn = Box<dyn Fn() -> RefreshFuture + Send + Sync>;

enum Source {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
    Collector(Collector),
}

struct Family {
    help: String,
    kind: MetricKind,
    source: Source,
}

/// The set of metric families served on `/metrics`.
///
/// One registry per node (not a process-wide global), so several nodes in one process (devnet, tests) do not
/// collide. Register at any time; a scrape sees what is registered when it renders.
#[derive(Default)]
pub struct Registry {
    families: RwLock<BTreeMap<String, Family>>,
    refreshers: RwLock<Vec<Arc<RefreshFn>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// An owned counter; asking again for the same name returns the same counter.
    pub fn counter(&self, name: &str, help: &str) -> Arc<Counter> {
        self.owned(
            name,
            help,
            MetricKind::Counter,
            |s| match s {
                Source::Counter(c) => Some(c.clone()),
                _ => None,
            },
            || {
                let c = Arc::new(Counter::default());
                (c.clone(), Source::Counter(c))
            },
        )
    }

    /// An owned gauge; asking again for the same name returns the same gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Arc<Gauge> {
        self.owned(
            name,
            help,
            MetricKind::Gauge,
            |s| match s {
                Source::Gauge(g) => Some(g.clone()),
                _ => None,
            },
            || {
                let g = Arc::new(Gauge::default());
                (g.clone(), Source::Gauge(g))
            },
        )
    }

    /// An owned histogram with the given bucket bounds; asking again for the same name returns the same
    /// histogram (with its original bounds).
    pub fn histogram(&self, name: &str, help: &str, bounds: &[f64]) -> Arc<Histogram> {
        self.owned(
            name,
            help,
            MetricKind::Histogram,
            |s| match s {
                Source::Histogram(h) => Some(h.clone()),
                _ => None,
            },
            || {
                let h = Arc::new(Histogram::new(bounds));
                (h.clone(), Source::Histogram(h))
            },
        )
    }

    /// A family whose samples `collect` writes at scrape time.
    ///
    /// `collect` runs while the registry is read-locked: it must be quick, must not block, and must not register
    /// metrics itself. Registering a name twice is a programming error (debug builds panic; release builds keep
    /// the first and log).
    pub fn register(&self, name: &str, help: &str, kind: MetricKind, collect: Collector) {
        check_family_name(name, kind);
        let mut families = self.families.write().unwrap_or_else(PoisonError::into_inner);
        if families.contains_key(name) {
            duplicate(name);
            return;
        }
        families.insert(
            name.to_owned(),
            Family { help: help.to_owned(), kind, source: Source::Collector(collect) },
        );
    }

    /// A family with one unlabelled sample that `value` computes at scrape time (e.g. a length, or an atomic
    /// owned by another module). Same rules as [`Registry::register`].
    pub fn register_value<V: Into<SampleValue>>(
        &self,
        name: &str,
        help: &str,
        kind: MetricKind,
        value: impl Fn() -> V + Send + Sync + 'static,
    ) {
        self.register(name, help, kind, Box::new(move |w| w.value(value())));
    }

    /// A family with one unlabelled sample read from a [`Snapshot`] by `field`; no sample while the snapshot is
    /// empty (its source failed). Same rules as [`Registry::register`].
    pub fn register_from<T, V>(
        &self,
        name: &str,
        help: &str,
        kind: MetricKind,
        snapshot: &Arc<Snapshot<T>>,
        field: impl Fn(&T) -> V + Send + Sync + 'static,
    ) where
        T: Send + Sync + 'static,
        V: Into<SampleValue>,
    {
        let snapshot = snapshot.clone();
        self.register(
            name,
            help,
            kind,
            Box::new(move |w| {
                if let Some(value) = snapshot.get() {
                    w.value(field(&value));
                }
            }),
        );
    }

    /// Registers an async fetch run before each scrape renders (see [`Registry::refresh`]) and returns the
    /// snapshot it fills, for collectors to read. `what` names the source in logs.
    ///
    /// ```ignore
    /// let store = store.clone();
    /// let stats = registry.snapshot("store stats", move || {
    ///     let store = store.clone();
    ///     async move { store.stats().await }
    /// });
    /// registry.register_from("rn_store_peers", "Peers in the store.", MetricKind::Gauge, &stats, |s| s.peers);
    /// ```
    pub fn snapshot<T, E, F, Fut>(&self, what: &'static str, fetch: F) -> Arc<Snapshot<T>>
    where
        T: Send + Sync + 'static,
        E: Display,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let snapshot = Arc::new(Snapshot::new());
        // Log when a source starts or stops failing, not on every scrape: Prometheus scrapes every 15 s or so.
        let failing = Arc::new(AtomicBool::new(false));
        let target = snapshot.clone();
        let fetch = Arc::new(fetch);
        let refresh: RefreshFn = Box::new(move || {
            let (fetch, target, failing) = (fetch.clone(), target.clone(), failing.clone());
            Box::pin(async move {
                let error = match tokio::time::timeout(REFRESH_TIMEOUT, fetch()).await {
                    Ok(Ok(value)) => {
                        target.set(Some(value));
                        if failing.swap(false, Ordering::Relaxed) {
                            tracing::info!(source = what, "metrics source readable again");
                        }
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {} ms", REFRESH_TIMEOUT.as_millis()),
                };
                target.set(None);
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(source = what, %error, "metrics source unreadable; its metrics are left out");
                }
            })
        });
        self.refreshers.write().unwrap_or_else(PoisonError::into_inner).push(Arc::new(refresh));
        snapshot
    }

    /// Runs every snapshot fetch concurrently, each bounded by [`REFRESH_TIMEOUT`]. Needs a Tokio runtime.
    pub async fn refresh(&self) {
        let refreshers: Vec<Arc<RefreshFn>> =
            self.refreshers.read().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
        // Spawned so one slow source does not delay the others; each is already time-bounded.
        let tasks: Vec<_> = refreshers.iter().map(|refresh| tokio::spawn(refresh())).collect();
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a metrics snapshot fetch panicked");
            }
        }
    }

    /// Refreshes the snapshots, then renders: what the `/metrics` handler serves.
    pub async fn scrape(&self) -> String {
        self.refresh().await;
        self.render()
    }

    /// Renders every family in the text format 0.0.4, sorted by name.
    pub fn render(&self) -> String {
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(families.len() * 128);
        for (name, family) in families.iter() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape_help(&mut out, &family.help);
            out.push('\n');
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
            let mut writer = SampleWriter { out: &mut out, name, kind: family.kind };
            match &family.source {
                Source::Counter(c) => writer.value(c.get()),
                Source::Gauge(g) => writer.value(g.get()),
                Source::Histogram(h) => writer.histogram(&[], &h.snapshot()),
                Source::Collector(collect) => collect(&mut writer),
            }
        }
        out
    }

    fn owned<M>(
        &self,
        name: &str,
        help: &str,
        kind: MetricKind,
        existing: impl Fn(&Source) -> Option<Arc<M>>,
        create: impl FnOnce() -> (Arc<M>, Source),
    ) -> Arc<M> {
        check_family_name(name, kind);
        let mut families = self.families.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(family) = families.get(name) {
            if let Some(metric) = existing(&family.source) {
                return metric;
            }
            // Same name, different kind: hand out a working metric that is simply not exported, rather than
            // failing the caller in production.
            duplicate(name);
            return create().0;
        }
        let (metric, source) = create();
        families.insert(name.to_owned(), Family { help: help.to_owned(), kind, source });
        metric
    }
}

fn check_family_name(name: &str, kind: MetricKind) {
    debug_assert!(is_valid_metric_name(name), "invalid metric name {name:?}");
    debug_assert!(
        kind != MetricKind::Counter || name.ends_with("_total"),
        "counter {name:?} should end in _total (Prometheus naming convention)"
    );
}

fn duplicate(name: &str) {
    debug_assert!(false, "metric family {name:?} registered twice");
    tracing::error!(metric = name, "metric family registered twice; the second registration is not exported");
}
