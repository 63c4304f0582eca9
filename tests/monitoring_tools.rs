//! The operators' monitoring toolkit in `monitoring/` against real daemons on loopback: `heap-profiles`
//! captures, diffs and summarises real heap profiles, `soak` runs a short devnet under churn and writes its
//! JSON report, and every metric the Grafana dashboard queries exists in a real `/metrics` scrape.
//!
//! Needs Python 3 and the binaries (`cargo build --workspace --bins`); `tests/run.sh` provides both.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{NodeDir, json};

fn tool(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring").join(name)
}

/// Runs a monitoring tool with the daemon's environment variables removed.
fn run_tool(name: &str, args: &[&str]) -> Output {
    common::clean_command(&tool(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run monitoring/{name} (needs python3): {err}"))
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The monitoring address a running node reports in `GetNodeInfo`.
fn monitoring_address(dir: &NodeDir) -> String {
    let info = json(&dir.rnctl(&["-o", "json", "node", "info"]));
    let address = info["node"]["listen"]["monitoring"].as_str().expect("listen.monitoring").to_owned();
    assert!(address.starts_with("127.0.0.1:"), "monitoring should bind loopback, got {address}");
    address
}

/// GET over HTTP/1.0 (no chunked encoding): status and body.
fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the monitoring port");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").expect("end of headers");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    (status, body.to_owned())
}

/// Metric family names in a Prometheus text exposition.
fn scraped_names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(|c: char| c == '{' || c.is_whitespace()).next())
        .map(str::to_owned)
        .collect()
}

/// Metric names in a PromQL expression: every identifier with one of the daemon's prefixes.
fn promql_metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if is_ident(bytes[i]) && (i == 0 || !is_ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if ["rn_", "process_", "jemalloc_"].iter().any(|p| word.starts_with(p)) {
                into.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
}

fn collect_exprs(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("expr", serde_json::Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_exprs(item, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, into)),
        _ => {}
    }
}

#[test]
fn heap_profiles_capture_diff_and_top_a_real_node() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let url = format!("http://{}", monitoring_address(&dir));
    let out_dir = dir.path().join("profiles");
    let out_arg = out_dir.to_str().expect("utf-8 path");

    let capture = run_tool(
        "heap-profiles",
        &["capture", "--url", &url, "--every", "1s", "--count", "2", "--out", out_arg],
    );
    assert!(capture.status.success(), "capture failed:\n{}", text(&capture));
    let mut profiles: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .expect("profiles dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "gz"))
        .collect();
    profiles.sort();
    assert_eq!(profiles.len(), 2, "two profiles expected:\n{}", text(&capture));
    for path in &profiles {
        let bytes = std::fs::read(path).expect("read profile");
        assert_eq!(&bytes[..2], b"\x1f\x8b", "{} is not gzipped", path.display());
    }
    // A second capture run, as the brief's workflow does (a later snapshot to diff against).
    let later = run_tool("heap-profiles", &["capture", "--url", &url, "--count", "1", "--out", out_arg]);
    assert!(later.status.success(), "second capture failed:\n{}", text(&later));
    let newest = String::from_utf8_lossy(&later.stdout).trim().to_owned();
    assert!(Path::new(&newest).exists(), "capture should print the saved path:\n{}", text(&later));

    let old = profiles[0].to_str().expect("utf-8 path");
    let diff = run_tool("heap-profiles", &["diff", old, &newest, "--top", "10"]);
    assert!(diff.status.success(), "diff failed:\n{}", text(&diff));
    let diff_out = String::from_utf8_lossy(&diff.stdout);
    assert!(diff_out.contains("call site (most growth first)"), "diff header missing:\n{}", text(&diff));
    assert!(
        diff_out.lines().any(|l| l.starts_with("total: ") && l.contains("delta")),
        "diff totals:\n{}",
        text(&diff)
    );
    let sites_line = diff_out.lines().find(|l| l.starts_with("sites: ")).expect("sites line");
    let all: u64 = sites_line
        .rsplit(", ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("site count");
    assert!(all > 0, "a live daemon's profiles should attribute bytes to call sites:\n{}", text(&diff));

    let top = run_tool("heap-profiles", &["top", &newest, "--top", "5"]);
    assert!(top.status.success(), "top failed:\n{}", text(&top));
    let top_out = String::from_utf8_lossy(&top.stdout);
    let rows = top_out.lines().filter(|l| l.contains('%') && !l.contains("share")).count();
    assert!(rows >= 1, "top should list call sites:\n{}", text(&top));
    assert!(top_out.lines().any(|l| l.starts_with("total in use: ")), "top total:\n{}", text(&top));

    // Clear errors: an address nobody serves, and a file that is no profile.
    let refused = run_tool("heap-profiles", &["capture", "--url", "http://127.0.0.1:1", "--out", out_arg]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot fetch"), "{}", text(&refused));
    let not_profile = dir.path().join("not-a-profile");
    std::fs::write(&not_profile, b"\x07\x07\x07").expect("write");
    let bad = run_tool("heap-profiles", &["top", not_profile.to_str().expect("utf-8")]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
}

#[test]
fn soak_quick_run_reports_samples_per_node() {
    let work = tempfile::Builder::new().prefix("rn-soak-test-").tempdir().expect("tempdir");
    let report_path = work.path().join("soak.json");
    let bin_dir = common::daemon_bin().parent().expect("bin dir").to_path_buf();
    common::rnctl_bin(); // asserts rnctl is built beside the daemon
    let soak = common::clean_command(&tool("soak"))
        .args(["--nodes", "2", "--duration", "20s", "--interval", "2s", "--churn-every", "3s"])
        .args(["--max-growth-mib", "512", "--topic", "soak-test"])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--json")
        .arg(&report_path)
        .current_dir(work.path())
        .stdin(Stdio::null())
        .output()
        .expect("run monitoring/soak (needs python3)");
    assert!(soak.status.success(), "soak failed:\n{}", text(&soak));
    let stdout = String::from_utf8_lossy(&soak.stdout);
    assert!(stdout.contains("slope MiB/h"), "growth table missing:\n{}", text(&soak));

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("read report")).expect("report is JSON");
    assert_eq!(report["complete"], true, "{report:#}");
    assert_eq!(report["nodes"].as_array().map(Vec::len), Some(2), "{report:#}");
    for name in ["n1", "n2"] {
        let samples =
            report["samples"][name].as_array().unwrap_or_else(|| panic!("samples of {name}: {report:#}"));
        assert!(samples.len() >= 5, "{name} should have a sample every 2 s for 20 s, got {}", samples.len());
        for sample in samples {
            for key in [
                "t",
                "process_resident_memory_bytes",
                "jemalloc_allocated_bytes",
                "rn_connected_peers",
                "rn_store_peers",
                "process_open_fds",
                "rn_runtime_alive_tasks",
            ] {
                assert!(sample[key].is_number(), "{name} sample lacks {key}: {sample}");
            }
        }
        for what in ["rss", "heap"] {
            let row = &report["summary"][name][what];
            for key in ["start_bytes", "end_bytes", "delta_bytes", "slope_bytes_per_hour"] {
                assert!(row[key].is_number(), "summary {name}.{what} lacks {key}: {report:#}");
            }
        }
        // A running daemon holds sockets and files, and runs tasks.
        for what in ["fds", "tasks"] {
            let row = &report["summary"][name][what];
            assert!(row["min"].as_f64().is_some_and(|n| n >= 1.0), "summary {name}.{what}: {report:#}");
            assert!(row["slope_per_hour"].is_number(), "summary {name}.{what}: {report:#}");
        }
    }
    let churn = report["churn"].as_array().expect("churn list");
    assert!(churn.iter().filter(|c| c["ok"] == true).count() >= 3, "churn should have happened: {churn:?}");

    // Everything it started is gone: the devnet removes its directory when stopped.
    let devnet_dir = report["nodes"][0]["socket"]
        .as_str()
        .expect("socket")
        .rsplitn(3, '/')
        .nth(2)
        .expect("dir")
        .to_owned();
    assert!(!Path::new(&devnet_dir).exists(), "soak left {devnet_dir} behind");
}

#[test]
fn grafana_dashboard_queries_only_metrics_a_node_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tool("grafana-dashboard.json")).expect("read dashboard"))
            .expect("dashboard is valid JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"job") && variables.contains(&"instance"),
        "template variables: {variables:?}"
    );
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 20, "expected a panel per metric family, got {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for expr in &exprs {
        promql_metric_names(expr, &mut used);
    }
    for template in dashboard["templating"]["list"].as_array().expect("templating") {
        if let Some(query) = template["definition"].as_str() {
            promql_metric_names(query, &mut used);
        }
    }

    let dir = NodeDir::new();
    let _node = dir.start();
    let (status, body) = http_get(&monitoring_address(&dir), "/metrics");
    assert_eq!(status, 200, "{body}");
    let exported = scraped_names(&body);
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the node does not export: {missing:?}\nexported: {exported:?}"
    );
    for family in [
        "rn_connected_peers",
        "rn_exchanges_total",
        "rn_exchange_records_rejected_total",
        "rn_dht_routing_table_nodes",
        "rn_store_peers",
        "rn_store_healthy",
        "process_resident_memory_bytes",
        "jemalloc_allocated_bytes",
        "jemalloc_resident_bytes",
        "rn_heap_profiling_active",
    ] {
        assert!(used.contains(family), "the dashboard should chart {family}");
    }
}
