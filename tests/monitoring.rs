//! The operator endpoints of a real daemon: Prometheus metrics, a jemalloc heap profile in pprof format,
//! liveness and readiness, on the monitoring address `GetNodeInfo` reports; and what happens when the monitoring
//! address is taken: the default gives way to another loopback port, an address the operator chose stops the
//! daemon.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use common::{NodeDir, json};

/// The daemon's built-in monitoring address.
const DEFAULT_MONITORING: &str = "127.0.0.1:6060";

/// Serializes the tests of this file that need the default monitoring address taken, so that one releasing it
/// cannot free it under another.
static DEFAULT_PORT: Mutex<()> = Mutex::new(());

/// Makes sure the default monitoring address is taken: holds it for as long as the returned listener lives if
/// it is free, else leaves it to whatever already listens there (the default is taken all the same).
fn occupy_default_monitoring_address() -> Option<TcpListener> {
    match TcpListener::bind(DEFAULT_MONITORING) {
        Ok(listener) => Some(listener),
        Err(e) if e.kind() == ErrorKind::AddrInUse => None,
        Err(e) => panic!("cannot bind {DEFAULT_MONITORING} to take it: {e}"),
    }
}

/// A minimal HTTP/1.1 exchange: status code and body bytes.
fn http(address: &str, method: &str, path: &str) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(address).expect("connect to the monitoring port");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let mut body = response[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16).expect("hex size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

#[test]
fn metrics_heap_profile_and_health_are_served_on_the_monitoring_address() {
    let dir = NodeDir::new();
    let _node = dir.start();
    dir.rnctl(&["topics", "join", "observed"]);
    let info = json(&dir.rnctl(&["-o", "json", "node", "info"]));
    let address = info["node"]["listen"]["monitoring"].as_str().expect("monitoring address").to_owned();
    assert!(address.starts_with("127.0.0.1:"), "{address}");

    let (status, body) = http(&address, "GET", "/metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf-8");
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
    };
    assert_eq!(value("rn_build_info"), 1.0);
    assert_eq!(value("rn_store_joined_topics"), 1.0);
    assert_eq!(value("rn_store_healthy"), 1.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("jemalloc_allocated_bytes") > 0.0, "jemalloc is the allocator");
    assert!(text.contains("# TYPE rn_exchanges_total counter"), "{text}");

    let (status, body) = http(&address, "GET", "/debug/pprof/heap");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..2], &[0x1f, 0x8b], "a gzipped pprof profile");

    assert_eq!(http(&address, "GET", "/healthz"), (200, b"ok\n".to_vec()));
    assert_eq!(http(&address, "GET", "/readyz").0, 200);
    assert_eq!(http(&address, "GET", "/no-such-page").0, 404);
}

#[test]
fn a_taken_default_monitoring_address_gives_way_to_another_loopback_port_with_a_warning() {
    let _serial = DEFAULT_PORT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _held = occupy_default_monitoring_address();
    let dir = NodeDir::new().with_default_monitoring();
    let node = dir.start();

    let info = json(&dir.rnctl(&["-o", "json", "node", "info"]));
    let reported = info["node"]["listen"]["monitoring"].as_str().expect("monitoring address").to_owned();
    let address: SocketAddr = reported.parse().unwrap_or_else(|e| panic!("{reported}: {e}"));
    assert!(address.ip().is_loopback(), "{address}");
    assert!(address.port() != 6060 && address.port() != 0, "{address}");
    assert_eq!(http(&reported, "GET", "/healthz"), (200, b"ok\n".to_vec()), "served where it is reported");

    let log = node.stderr();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains(DEFAULT_MONITORING))
        .unwrap_or_else(|| panic!("no warning naming {DEFAULT_MONITORING}:\n{log}"));
    assert!(warning.contains(&reported), "the warning names the address it got instead: {warning}");
    let started = log.lines().find(|l| l.contains(": node started")).expect("node started line");
    assert!(started.contains(&format!("monitoring={reported}")), "{started}");
}

#[test]
fn a_taken_monitoring_address_the_operator_chose_stops_the_daemon() {
    let _serial = DEFAULT_PORT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _held = occupy_default_monitoring_address();
    // The default's own value, but chosen: by flag, environment and config file.
    type Choose = fn(&NodeDir, &mut std::process::Command);
    let ways: [(&str, Choose); 3] = [
        ("flag", |_, cmd| {
            cmd.args(["--monitoring-listen", DEFAULT_MONITORING]);
        }),
        ("env", |_, cmd| {
            cmd.env("RN_MONITORING_LISTEN", DEFAULT_MONITORING);
        }),
        ("file", |dir, _| {
            let text = format!("[monitoring]\nlisten = \"{DEFAULT_MONITORING}\"\n");
            std::fs::write(dir.config_file(), text).expect("write config");
        }),
    ];
    for (way, choose) in ways {
        let dir = NodeDir::new().with_default_monitoring();
        let (status, log) = dir.start_expecting_failure(|cmd| choose(&dir, cmd));
        assert_eq!(status.code(), Some(1), "{way}: {log}");
        assert!(
            log.contains(&format!("the monitoring address {DEFAULT_MONITORING} is already in use")),
            "{way}: {log}"
        );
        assert!(log.contains("monitoring.listen"), "{way}: says which setting to change: {log}");
    }
}
