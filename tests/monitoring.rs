//! The operator endpoints of a real daemon: Prometheus metrics, a jemalloc heap profile in pprof format,
//! liveness and readiness, on the monitoring address `GetNodeInfo` reports.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{NodeDir, json};

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
