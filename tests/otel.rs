//! OpenTelemetry trace export against a real collector: `rotel-agent` (PyPI `rotel`, installed by tests/run.sh)
//! receives OTLP over gRPC or HTTP and prints every span it gets. The real daemon exports to it; a gRPC call
//! carrying a W3C `traceparent` must appear in the caller's trace, and SIGTERM must flush what is queued.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::NodeDir;
use remote_network::api::control::GetNodeInfoRequest;
use remote_network::api::control::node_service_client::NodeServiceClient;

/// Trace and parent span of the incoming call, as a remote caller would send them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// `rotel-agent` from PATH, or from the `rotel` package of the venv whose `bin` is on PATH (the wheel keeps
/// the binary inside the package).
fn rotel_agent() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let direct = dir.join("rotel-agent");
        if direct.is_file() {
            return direct;
        }
        if let Ok(libs) = std::fs::read_dir(dir.join("../lib")) {
            for lib in libs.flatten() {
                let bundled = lib.path().join("site-packages/rotel/rotel-agent");
                if bundled.is_file() {
                    return bundled;
                }
            }
        }
    }
    panic!(
        "rotel-agent not found on PATH nor in a venv's site-packages/rotel: run the tests through tests/run.sh \
         (it installs PyPI `rotel` from tests/requirements.txt into target/test-tools/venv)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A running `rotel-agent` printing the spans it receives; killed when dropped, pass or fail.
struct Collector {
    child: Child,
    output: PathBuf,
    grpc: String,
    http: String,
    _dir: tempfile::TempDir,
}

impl Collector {
    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("rn-otel-").tempdir().expect("tempdir");
        let output = dir.path().join("rotel.log");
        let log = std::fs::File::create(&output).expect("create log");
        let grpc = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(rotel_agent())
            .args(["start", "--otlp-grpc-endpoint", &grpc, "--otlp-http-endpoint", &http])
            .args(["--exporter", "blackhole", "--debug-log", "traces", "--debug-log-verbosity", "detailed"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn rotel-agent");
        let collector = Self { child, output, grpc, http, _dir: dir };
        collector.wait_for("Starting Rotel", Duration::from_secs(20));
        // It logs before binding: wait until both receivers accept connections.
        let deadline = Instant::now() + Duration::from_secs(20);
        for address in [&collector.grpc, &collector.http] {
            while std::net::TcpStream::connect(address).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "rotel-agent does not listen on {address}:\n{}",
                    collector.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        collector
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Waits until the collector printed `needle`; panics with its output otherwise.
    fn wait_for(&self, needle: &str, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "rotel-agent never printed {needle:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One span as rotel's detailed debug log prints it.
#[derive(Debug, Default)]
struct PrintedSpan {
    name: String,
    trace_id: String,
    parent_id: String,
    attributes: Vec<String>,
}

fn spans(log: &str) -> Vec<PrintedSpan> {
    let mut spans = Vec::new();
    let mut current: Option<PrintedSpan> = None;
    for line in log.lines() {
        let line = line.trim();
        if line.starts_with("Span #") {
            spans.extend(current.replace(PrintedSpan::default()));
            continue;
        }
        if line.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            continue;
        }
        let Some(span) = current.as_mut() else { continue };
        let value = |line: &str| line.split_once(':').map(|(_, v)| v.trim().to_owned()).unwrap_or_default();
        if line.starts_with("Name ") {
            span.name = value(line);
        } else if line.starts_with("Trace ID") {
            span.trace_id = value(line);
        } else if line.starts_with("Parent ID") {
            span.parent_id = value(line);
        } else if let Some(attribute) = line.strip_prefix("-> ") {
            span.attributes.push(attribute.to_owned());
        }
    }
    spans.extend(current);
    spans
}

/// Runs a node exporting to `collector` with `protocol`, makes a traced call and an rnctl call, stops the node
/// with SIGTERM, and checks what the collector received.
async fn exports_over(protocol: &str, endpoint: String) -> Collector {
    let collector = Collector::start();
    let endpoint = endpoint.replace("{grpc}", &collector.grpc).replace("{http}", &collector.http);
    let dir = NodeDir::new();
    let node = dir.start_with(|cmd| {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SDK_DISABLED")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .env_remove("OTEL_TRACES_SAMPLER");
    });

    let joined = dir.rnctl(&["topics", "join", "t"]);
    assert!(joined.status.success(), "rnctl topics join: {}", common::stderr(&joined));
    let node_id = common::json(&dir.rnctl(&["-o", "json", "node", "info"]))["node"]["nodeId"]
        .as_str()
        .expect("node id")
        .to_owned();

    // A peer to exchange with: the dial, the exchange and the store writes it causes are traced too.
    let peer_dir = NodeDir::new();
    let _peer = peer_dir.start();
    let peer_info = common::json(&peer_dir.rnctl(&["-o", "json", "node", "info"]));
    let peer_id = peer_info["node"]["nodeId"].as_str().expect("peer id").to_owned();
    let peer_quic = peer_info["node"]["listen"]["quic"].as_str().expect("peer QUIC address").to_owned();
    let connected = dir.rnctl(&["connect", &peer_quic]);
    assert!(connected.status.success(), "rnctl connect: {}", common::stderr(&connected));

    let mut request = tonic::Request::new(GetNodeInfoRequest {});
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().expect("ascii"));
    NodeServiceClient::new(dir.channel().await).get_node_info(request).await.expect("GetNodeInfo");

    let (status, stderr) = node.terminate();
    assert!(status.success(), "the daemon failed to stop: {status}\n{stderr}");

    // Everything was flushed before the process exited; give the collector a moment to print it.
    let log = collector.wait_for(TRACE_ID, Duration::from_secs(10));
    assert!(
        log.contains("service.name: Str(remote-network)"),
        "no resource with service.name=remote-network:\n{log}\n--- daemon ---\n{stderr}"
    );
    let spans = spans(&log);
    let traced = spans
        .iter()
        .find(|s| s.trace_id == TRACE_ID)
        .unwrap_or_else(|| panic!("no span in trace {TRACE_ID}: {spans:#?}"));
    assert_eq!(traced.name, "control.rpc", "{traced:#?}");
    assert_eq!(
        traced.parent_id, PARENT_SPAN_ID,
        "the call's span must be a child of the caller's: {traced:#?}"
    );
    assert!(traced.attributes.iter().any(|a| a == "rpc.method: Str(GetNodeInfo)"), "{traced:#?}");
    assert!(
        spans.iter().any(|s| s.name == "control.rpc"
            && s.attributes.iter().any(|a| a == "rpc.method: Str(JoinTopic)")
            && s.trace_id != TRACE_ID),
        "rnctl's JoinTopic call (no traceparent) must be a trace of its own: {spans:#?}"
    );
    // The pipeline below the control API: the exchange with the peer (its id as attribute) and the store's
    // write batches, all stamped with this node's id.
    let exchange = spans
        .iter()
        .find(|s| s.name == "exchange.outbound")
        .unwrap_or_else(|| panic!("no exchange.outbound span: {spans:#?}"));
    assert!(exchange.attributes.iter().any(|a| a == &format!("peer: Str({peer_id})")), "{exchange:#?}");
    assert!(exchange.attributes.iter().any(|a| a == &format!("node.id: Str({node_id})")), "{exchange:#?}");
    assert!(spans.iter().any(|s| s.name == "store.write_batch"), "no store.write_batch span: {spans:#?}");
    let stack = ["h2", "hyper", "tonic", "tower"];
    for span in &spans {
        let target = span.attributes.iter().find_map(|a| a.strip_prefix("target: Str(")).unwrap_or_default();
        assert!(
            !stack.iter().any(|crate_name| target.starts_with(crate_name)),
            "the exporter's own stack was exported: {span:#?}"
        );
    }
    collector
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_a_collector_over_grpc_and_join_the_callers_trace() {
    exports_over("grpc", "http://{grpc}".to_owned()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_a_collector_over_http_protobuf() {
    exports_over("http/protobuf", "http://{http}".to_owned()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_collector_neither_blocks_the_node_nor_its_stop() {
    // Nothing listens on this port: exports fail, the node serves and stops as usual.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let dir = NodeDir::new();
    let node = dir.start_with(|cmd| {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint).env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
    });
    let started = Instant::now();
    for _ in 0..20 {
        let joined = dir.rnctl(&["topics", "join", "t"]);
        assert!(joined.status.success(), "rnctl topics join: {}", common::stderr(&joined));
    }
    assert!(started.elapsed() < Duration::from_secs(20), "calls were slow: {:?}", started.elapsed());
    let stopping = Instant::now();
    let (status, stderr) = node.terminate();
    assert!(status.success(), "the daemon failed to stop: {status}\n{stderr}");
    assert!(stopping.elapsed() < Duration::from_secs(15), "stop took {:?}:\n{stderr}", stopping.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_delays_neither_calls_nor_stop() {
    // Accepts connections and never answers: each export hangs until its timeout.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            holder.lock().expect("lock").push(stream);
        }
    });
    for protocol in ["grpc", "http/protobuf"] {
        let dir = NodeDir::new();
        let node = dir.start_with(|cmd| {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
                .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        });
        let started = Instant::now();
        for _ in 0..20 {
            let joined = dir.rnctl(&["topics", "join", "t"]);
            assert!(joined.status.success(), "rnctl topics join: {}", common::stderr(&joined));
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{protocol}: calls were slow: {:?}",
            started.elapsed()
        );
        let stopping = Instant::now();
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{protocol}: the daemon failed to stop: {status}\n{stderr}");
        // The exporter gets 5 s to flush, then the process exits regardless.
        assert!(
            stopping.elapsed() < Duration::from_secs(12),
            "{protocol}: stop took {:?}:\n{stderr}",
            stopping.elapsed()
        );
        eprintln!("{protocol}: stopped in {:?}", stopping.elapsed());
    }
    assert!(!held.lock().expect("lock").is_empty(), "the daemon never connected to the silent collector");
}
