//! Tests of the monitoring endpoints over real HTTP on loopback, with a minimal HTTP/1.1 client, plus checks of
//! the exposition format that a Prometheus server would otherwise catch only in production.
//!
//! These run without jemalloc as the global allocator, so the heap profile endpoints must answer 503 with a
//! reason; a profile actually being produced is tested by a separate binary that installs jemalloc.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::heap::DumpGate;
use super::metrics::{is_valid_label_name, is_valid_metric_name};
use super::*;
use crate::limits::{ServerLimitSettings, ServerLimits};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("text body is UTF-8")
    }
}

/// Sends one request with `Connection: close` and reads the whole reply.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the monitoring server");
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("reply within 10 s")
        .expect("read reply");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = std::str::from_utf8(&raw[..split]).expect("ASCII headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header has a colon");
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    if let Some((_, len)) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
        assert_eq!(len.parse::<usize>().ok(), Some(body.len()), "Content-Length matches the body");
    }
    Reply { status, headers, body }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..eol]).expect("ASCII chunk size");
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("hex size");
        rest = &rest[eol + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

struct Server {
    monitoring: Monitoring,
    shutdown: CancellationToken,
}

impl Server {
    fn addr(&self) -> SocketAddr {
        self.monitoring.local_addr
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.monitoring.wait())
            .await
            .expect("server stops within 5 s of cancellation");
    }
}

async fn start(registry: Arc<Registry>, readiness: Readiness) -> Server {
    let shutdown = CancellationToken::new();
    let listen = MonitoringListen::Configured("127.0.0.1:0".parse().expect("addr"));
    let monitoring = serve(listen, registry, readiness, default_limits(), shutdown.clone())
        .await
        .expect("bind loopback port 0");
    Server { monitoring, shutdown }
}

fn default_limits() -> Arc<ServerLimits> {
    ServerLimits::new(ServerLimitSettings::monitoring())
}

fn always_ready() -> Readiness {
    Arc::new(|| Ok(()))
}

/// One parsed sample line.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the text format strictly, line by line: `# HELP` / `# TYPE` lines, and sample lines
/// `name{label="value",...} value` whose names belong to the family declared by the preceding `# TYPE`
/// (histograms: `_bucket`, `_sum`, `_count`). Label values are unescaped. Panics on anything else.
fn parse_exposition(text: &str) -> (BTreeMap<String, (String, String)>, Vec<Sample>) {
    assert!(text.is_empty() || text.ends_with('\n'), "exposition ends with a newline");
    let mut families: BTreeMap<String, (String, String)> = BTreeMap::new(); // name -> (help, type)
    let mut current: Option<(String, String)> = None;
    let mut samples = Vec::new();
    let mut order = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(is_valid_metric_name(name), "HELP name {name:?}");
            assert!(!families.contains_key(name), "family {name} declared once");
            families.insert(name.to_owned(), (help.to_owned(), String::new()));
            order.push(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "TYPE {kind}");
            let family = families.get_mut(name).expect("HELP precedes TYPE");
            family.1 = kind.to_owned();
            current = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment line {line:?}");
        let sample = parse_sample(line);
        let (family, kind) = current.as_ref().expect("samples follow a TYPE line");
        let allowed = if kind == "histogram" {
            [format!("{family}_bucket"), format!("{family}_sum"), format!("{family}_count")]
                .contains(&sample.name)
        } else {
            &sample.name == family
        };
        assert!(allowed, "sample {} outside its family {family} ({kind})", sample.name);
        samples.push(sample);
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "families are rendered in a stable, sorted order");
    (families, samples)
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("sample line {line:?}"));
    let name = &line[..name_end];
    assert!(is_valid_metric_name(name), "metric name {name:?}");
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut i = 0;
        loop {
            if after[i..].starts_with('}') {
                rest = &after[i + 1..];
                break;
            }
            let eq = after[i..].find('=').expect("label =") + i;
            let label = &after[i..eq];
            assert!(is_valid_label_name(label), "label name {label:?}");
            assert_eq!(after.as_bytes().get(eq + 1), Some(&b'"'), "label value is quoted");
            let mut value = String::new();
            i = eq + 2;
            loop {
                let c = after[i..].chars().next().expect("closing quote");
                i += c.len_utf8();
                match c {
                    '\\' => {
                        let escaped = after[i..].chars().next().expect("escaped char");
                        i += escaped.len_utf8();
                        value.push(match escaped {
                            '\\' => '\\',
                            '"' => '"',
                            'n' => '\n',
                            other => panic!("invalid escape \\{other}"),
                        });
                    }
                    '"' => break,
                    '\n' => panic!("raw newline in label value"),
                    c => value.push(c),
                }
            }
            labels.push((label.to_owned(), value));
            match after.as_bytes().get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {}
                other => panic!("unexpected {other:?} after label value in {line:?}"),
            }
        }
    }
    let value_text = rest.strip_prefix(' ').unwrap_or_else(|| panic!("space before value in {line:?}"));
    assert!(!value_text.contains(' '), "no timestamp expected in {line:?}");
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().unwrap_or_else(|_| panic!("value {v:?} in {line:?}")),
    };
    Sample { name: name.to_owned(), labels, value }
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && s.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
    })
}

#[tokio::test]
async fn metrics_endpoint_serves_valid_exposition() {
    let registry = Arc::new(Registry::new());
    register_process_metrics(&registry);
    register_allocator_metrics(&registry);
    let requests = registry.counter("rn_test_requests_total", "Requests handled.");
    requests.inc_by(41);
    requests.inc();
    let depth = registry.gauge("rn_test_queue_depth", "Items queued.");
    depth.set(7);
    depth.dec();
    let latency =
        registry.histogram("rn_test_latency_seconds", "Latency.", &exponential_buckets(0.001, 10.0, 3));
    latency.observe_duration(Duration::from_millis(5));
    registry.register(
        "rn_test_exchanges_total",
        "Exchanges by result.",
        MetricKind::Counter,
        Box::new(|w| {
            w.sample(&[("result", "ok")], 3u64);
            w.sample(&[("result", "failed"), ("reason", "timeout")], 1u64);
        }),
    );
    let server = start(registry, always_ready()).await;

    let reply = request(server.addr(), "GET", "/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let (families, samples) = parse_exposition(reply.text());

    assert_eq!(families["rn_test_requests_total"].1, "counter");
    assert_eq!(families["rn_test_latency_seconds"].1, "histogram");
    assert_eq!(find(&samples, "rn_test_requests_total", &[]).map(|s| s.value), Some(42.0));
    assert_eq!(find(&samples, "rn_test_queue_depth", &[]).map(|s| s.value), Some(6.0));
    assert_eq!(find(&samples, "rn_test_exchanges_total", &[("result", "ok")]).map(|s| s.value), Some(3.0));
    let failed = find(&samples, "rn_test_exchanges_total", &[("result", "failed"), ("reason", "timeout")]);
    assert_eq!(failed.map(|s| s.value), Some(1.0));
    assert_eq!(
        find(&samples, "rn_test_latency_seconds_bucket", &[("le", "0.01")]).map(|s| s.value),
        Some(1.0)
    );

    // Process metrics come from /proc/self at scrape time.
    let rss = find(&samples, "process_resident_memory_bytes", &[]).expect("RSS sample").value;
    assert!(rss > 1e6, "resident memory {rss}");
    assert!(find(&samples, "process_open_fds", &[]).expect("fd sample").value >= 3.0);
    assert!(find(&samples, "process_threads", &[]).expect("threads sample").value >= 1.0);
    // The server's own accept loop at least.
    assert!(find(&samples, "rn_runtime_alive_tasks", &[]).expect("task count").value >= 1.0);
    assert!(find(&samples, "process_cpu_seconds_total", &[]).is_some());
    assert!(find(&samples, "process_start_time_seconds", &[]).expect("start time").value > 1.6e9);
    // jemalloc is not this test binary's allocator: no jemalloc families, profiling reported off.
    assert!(!families.contains_key("jemalloc_allocated_bytes"));
    assert_eq!(find(&samples, "rn_heap_profiling_active", &[]).map(|s| s.value), Some(0.0));
    server.stop().await;
}

#[test]
fn histogram_buckets_are_cumulative_and_inf_equals_count() {
    let registry = Registry::new();
    let h = registry.histogram("rn_test_size_bytes", "Sizes.", &[10.0, 100.0, 1000.0]);
    for v in [1.0, 10.0, 10.5, 99.0, 100.0, 5000.0, 1e9, f64::NAN] {
        h.observe(v);
    }
    let snap = h.snapshot();
    // `le` is inclusive: 10.0 counts in the 10 bucket, 100.0 in the 100 bucket; NaN is dropped.
    assert_eq!(snap.buckets, vec![(10.0, 2), (100.0, 5), (1000.0, 5)]);
    assert_eq!(snap.count, 7);
    assert_eq!(snap.sum, 1.0 + 10.0 + 10.5 + 99.0 + 100.0 + 5000.0 + 1e9);

    let (_, samples) = parse_exposition(&registry.render());
    let buckets: Vec<(String, f64)> = samples
        .iter()
        .filter(|s| s.name == "rn_test_size_bytes_bucket")
        .map(|s| (s.labels[0].1.clone(), s.value))
        .collect();
    assert_eq!(
        buckets,
        vec![("10".into(), 2.0), ("100".into(), 5.0), ("1000".into(), 5.0), ("+Inf".into(), 7.0)]
    );
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
    let count = find(&samples, "rn_test_size_bytes_count", &[]).expect("count").value;
    assert_eq!(buckets.last().map(|b| b.1), Some(count), "+Inf bucket == _count");
    assert_eq!(find(&samples, "rn_test_size_bytes_sum", &[]).map(|s| s.value), Some(snap.sum));
}

#[test]
fn histogram_under_concurrent_observers_stays_consistent() {
    let h = Arc::new(Histogram::new(&linear_buckets(0.0, 1.0, 10)));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    h.observe(f64::from((i + t) % 12));
                }
            })
        })
        .collect();
    for _ in 0..100 {
        let snap = h.snapshot();
        assert!(snap.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(snap.buckets.last().is_none_or(|b| b.1 <= snap.count));
    }
    for t in threads {
        t.join().expect("observer thread");
    }
    assert_eq!(h.snapshot().count, 40_000);
}

#[test]
fn help_and_label_values_are_escaped() {
    let registry = Registry::new();
    registry.register(
        "rn_test_escaping",
        "Help with a backslash \\ and\na newline and \"quotes\".",
        MetricKind::Gauge,
        Box::new(|w| w.sample(&[("path", "C:\\dir\n\"x\""), ("plain", "ünï")], 1u8)),
    );
    registry.register(
        "rn_test_special_values",
        "Non-finite values.",
        MetricKind::Untyped,
        Box::new(|w| {
            w.sample(&[("v", "inf")], f64::INFINITY);
            w.sample(&[("v", "-inf")], f64::NEG_INFINITY);
            w.sample(&[("v", "nan")], f64::NAN);
            w.sample(&[("v", "big")], u64::MAX);
            w.sample(&[("v", "tiny")], 1e-300);
            w.sample(&[("v", "whole")], 3.0);
            w.sample(&[("v", "frac")], -0.25);
        }),
    );
    let text = registry.render();
    assert!(
        text.contains("# HELP rn_test_escaping Help with a backslash \\\\ and\\na newline and \"quotes\".\n")
    );
    assert!(text.contains("rn_test_escaping{path=\"C:\\\\dir\\n\\\"x\\\"\",plain=\"ünï\"} 1\n"));
    assert!(text.contains("rn_test_special_values{v=\"inf\"} +Inf\n"));
    assert!(text.contains("rn_test_special_values{v=\"-inf\"} -Inf\n"));
    assert!(text.contains("rn_test_special_values{v=\"nan\"} NaN\n"));
    // Integers are exact, not rounded through f64.
    assert!(text.contains("rn_test_special_values{v=\"big\"} 18446744073709551615\n"));
    // Floats: whole numbers without a fraction, extreme magnitudes in exponent notation.
    assert!(text.contains("rn_test_special_values{v=\"tiny\"} 1e-300\n"));
    assert!(text.contains("rn_test_special_values{v=\"whole\"} 3\n"));
    assert!(text.contains("rn_test_special_values{v=\"frac\"} -0.25\n"));
    let (_, samples) = parse_exposition(&text);
    let s = find(&samples, "rn_test_escaping", &[("path", "C:\\dir\n\"x\""), ("plain", "ünï")]);
    assert!(s.is_some(), "escaped label value round-trips: {samples:?}");
}

#[test]
fn names_are_validated() {
    for good in ["rn_up", "a:b_c1", "_x", "process_cpu_seconds_total"] {
        assert!(is_valid_metric_name(good), "{good}");
    }
    for bad in ["", "1x", "rn-up", "rn up", "rné"] {
        assert!(!is_valid_metric_name(bad), "{bad}");
    }
    for good in ["le", "result", "_x", "a1"] {
        assert!(is_valid_label_name(good), "{good}");
    }
    for bad in ["", "__name__", "a:b", "1a", "a-b"] {
        assert!(!is_valid_label_name(bad), "{bad}");
    }
}

#[test]
#[should_panic(expected = "registered twice")]
fn registering_a_family_twice_is_caught_in_debug_builds() {
    let registry = Registry::new();
    registry.register("rn_test_dup", "x", MetricKind::Gauge, Box::new(|_| {}));
    registry.register("rn_test_dup", "x", MetricKind::Gauge, Box::new(|_| {}));
}

#[test]
fn owned_metrics_are_shared_by_name() {
    let registry = Registry::new();
    registry.counter("rn_test_shared_total", "x").inc();
    registry.counter("rn_test_shared_total", "x").inc();
    assert!(registry.render().contains("\nrn_test_shared_total 2\n"));
}

#[tokio::test]
async fn async_snapshots_are_refreshed_before_render_and_dropped_on_failure() {
    let registry = Arc::new(Registry::new());
    // The source's answer for the next scrape: a value, an error, or a hang.
    let next: Arc<Mutex<Result<u64, &'static str>>> = Arc::new(Mutex::new(Ok(5)));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats = {
        let (next, hang) = (next.clone(), hang.clone());
        registry.snapshot("test source", move || {
            let answer = *next.lock().expect("lock");
            let hang = hang.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                answer
            }
        })
    };
    registry.register(
        "rn_test_peers",
        "Peers from an async source.",
        MetricKind::Gauge,
        Box::new(move |w| {
            if let Some(v) = stats.get() {
                w.value(*v);
            }
        }),
    );
    let server = start(registry.clone(), always_ready()).await;
    let scrape = || async { request(server.addr(), "GET", "/metrics").await.text().to_owned() };

    assert!(scrape().await.contains("\nrn_test_peers 5\n"));
    *next.lock().expect("lock") = Ok(6);
    assert!(scrape().await.contains("\nrn_test_peers 6\n"), "refreshed on every scrape");
    *next.lock().expect("lock") = Err("database is locked");
    let text = scrape().await;
    assert!(text.contains("# TYPE rn_test_peers gauge\n") && !text.contains("\nrn_test_peers "), "{text}");
    *next.lock().expect("lock") = Ok(7);
    assert!(scrape().await.contains("\nrn_test_peers 7\n"), "recovers");
    // A hanging source costs at most REFRESH_TIMEOUT and is left out, not reported stale.
    hang.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    let text = scrape().await;
    let took = started.elapsed();
    assert!(took >= metrics::REFRESH_TIMEOUT && took < metrics::REFRESH_TIMEOUT * 3, "took {took:?}");
    assert!(!text.contains("\nrn_test_peers "), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn healthz_and_readyz() {
    let reason: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let readiness: Readiness = {
        let reason = reason.clone();
        Arc::new(move || match reason.lock().expect("lock").clone() {
            None => Ok(()),
            Some(why) => Err(why),
        })
    };
    let server = start(Arc::new(Registry::new()), readiness).await;

    let health = request(server.addr(), "GET", "/healthz").await;
    assert_eq!((health.status, health.text()), (200, "ok\n"));
    let ready = request(server.addr(), "GET", "/readyz").await;
    assert_eq!((ready.status, ready.text()), (200, "ready\n"));

    *reason.lock().expect("lock") = Some("store degraded: database or disk is full".to_owned());
    let ready = request(server.addr(), "GET", "/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.text(), "not ready: store degraded: database or disk is full\n");
    // Liveness does not depend on readiness: a degraded store must not get the process restarted.
    assert_eq!(request(server.addr(), "GET", "/healthz").await.status, 200);

    *reason.lock().expect("lock") = None;
    assert_eq!(request(server.addr(), "GET", "/readyz").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn heap_profile_without_jemalloc_is_503_with_reason() {
    assert!(!jemalloc_is_global_allocator(), "the unit tests run on the system allocator");
    let server = start(Arc::new(Registry::new()), always_ready()).await;

    let reply = request(server.addr(), "GET", "/debug/pprof/heap").await;
    assert_eq!(reply.status, 503);
    assert!(reply.text().contains("jemalloc is not this program's global allocator"), "{}", reply.text());
    for switch in ["/debug/pprof/heap/activate", "/debug/pprof/heap/deactivate"] {
        let reply = request(server.addr(), "POST", switch).await;
        assert_eq!(reply.status, 503, "{switch}");
        // A state change is never done by GET (crawlers, link prefetchers).
        assert_eq!(request(server.addr(), "GET", switch).await.status, 405, "{switch}");
    }
    // pprof's symbol lookup must not fail (a 404 makes `go tool pprof` abort); it resolves nothing here.
    let symbols = request(server.addr(), "GET", "/debug/pprof/symbol").await;
    assert_eq!((symbols.status, symbols.text()), (200, "num_symbols: 0\n"));
    let symbols = request(server.addr(), "POST", "/debug/pprof/symbol").await;
    assert_eq!((symbols.status, symbols.text()), (200, ""));
    let index = request(server.addr(), "GET", "/").await;
    assert_eq!(index.status, 200);
    assert!(index.text().contains("heap profiling: heap profiling is unavailable"), "{}", index.text());
    assert_eq!(request(server.addr(), "GET", "/nope").await.status, 404);
    server.stop().await;
}

#[test]
fn one_dump_at_a_time() {
    let gate = DumpGate::new();
    let first = gate.try_acquire().expect("free gate");
    assert!(gate.try_acquire().is_none(), "second dump refused while the first runs");
    drop(first);
    assert!(gate.try_acquire().is_some(), "free again after the first ends");
}

/// Whether the server closed `stream` (end of stream or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn connections_are_capped_and_idle_or_slow_ones_closed() {
    let limits = ServerLimits::new(ServerLimitSettings {
        max_connections: 3,
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(3),
    });
    let shutdown = CancellationToken::new();
    let listen = MonitoringListen::Configured("127.0.0.1:0".parse().expect("addr"));
    let monitoring =
        serve(listen, Arc::new(Registry::new()), always_ready(), limits.clone(), shutdown.clone())
            .await
            .expect("bind");
    let addr = monitoring.local_addr;
    // Three connections that send nothing take every slot; a fourth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    while limits.open_connections() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut refused = TcpStream::connect(addr).await.expect("the kernel accepts");
    assert!(closed_within(&mut refused, Duration::from_secs(1)).await, "a fourth connection was served");
    // Silent connections are closed after the handshake timeout (no request headers), freeing their slots.
    for stream in &mut idle {
        assert!(closed_within(stream, Duration::from_secs(10)).await, "a silent connection stayed open");
    }
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
    // A client that dribbles its headers a byte every half second (never idle) is closed once its headers
    // took longer than the handshake timeout, long before it would finish.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let dribbled = b"GET /metrics HTTP/1.1\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for byte in dribbled {
        if slow.write_all(&[*byte]).await.is_err()
            || closed_within(&mut slow, Duration::from_millis(500)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a client dribbling its headers for {} s held the connection", dribbled.len() / 2);
    // A kept-alive connection that goes quiet after its answer is closed after the idle timeout.
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 256];
    let n = kept.read(&mut buf).await.expect("answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        closed_within(&mut kept, Duration::from_secs(10)).await,
        "an idle kept-alive connection stayed open"
    );
    shutdown.cancel();
    monitoring.wait().await;
    assert_eq!(limits.open_connections(), 0);
}

#[tokio::test]
async fn stops_on_cancel_and_reports_port_in_use() {
    let server = start(Arc::new(Registry::new()), always_ready()).await;
    let addr = server.addr();

    let err = serve(
        MonitoringListen::Configured(addr),
        Arc::new(Registry::new()),
        always_ready(),
        default_limits(),
        CancellationToken::new(),
    )
    .await
    .expect_err("the port is taken");
    assert!(matches!(err, MonitoringError::AddrInUse(a) if a == addr), "{err}");
    assert!(err.to_string().contains("monitoring.listen"), "says which setting to change: {err}");

    // An idle keep-alive connection must not hold up shutdown.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    server.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed after shutdown");
}

#[tokio::test]
async fn a_taken_default_address_gives_way_to_another_port_of_the_same_ip() {
    let first = start(Arc::new(Registry::new()), always_ready()).await;
    let taken = first.addr();

    let shutdown = CancellationToken::new();
    let second = serve(
        MonitoringListen::Default(taken),
        Arc::new(Registry::new()),
        always_ready(),
        default_limits(),
        shutdown.clone(),
    )
    .await
    .expect("the default gives way");
    assert_eq!(second.local_addr.ip(), taken.ip());
    assert_ne!(second.local_addr.port(), taken.port());
    assert_ne!(second.local_addr.port(), 0, "reports the port it got");
    let reply = request(second.local_addr, "GET", "/healthz").await;
    assert_eq!((reply.status, reply.text()), (200, "ok\n"));

    shutdown.cancel();
    second.wait().await;
    first.stop().await;
}
