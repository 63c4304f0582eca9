//! A real daemon under a flood of half-open QUIC handshakes: real ClientHellos, sent from one UDP socket that
//! never answers, while honest nodes keep connecting.
//!
//! The flood's packets are real QUIC Initials carrying a real raw-key ClientHello for the daemon's ALPN: the
//! test dials a socket of its own thousands of times and keeps the first packet of each attempt. Replayed from
//! one socket, each starts a handshake on the daemon that would never complete. Before admission control, 2000
//! of them in 4 s held all 1024 connection slots and 7 of 8 honest connects were refused.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{NodeDir, json};
use ed25519_dalek::SigningKey;
use remote_network::quic::{QuicEndpoint, QuicLimits};

/// Distinct half-open handshakes in the flood, and how fast they are sent (the flood: 2000 in 4 s).
const FLOOD_INITIALS: usize = 2000;
const FLOOD_PER_SECOND: u64 = 500;
/// Honest nodes that connect during the flood, each with a key of its own, and how many may fail.
const HONEST_DIALS: usize = 100;
const HONEST_FAILURES_ALLOWED: usize = 1;
/// The longest an honest dial may take (the bar), as its handshake timeout.
const HONEST_DIAL_DEADLINE: Duration = Duration::from_secs(15);

fn new_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("randomness");
    SigningKey::from_bytes(&seed)
}

/// The first packet of `count` distinct connection attempts: the Initial with the ClientHello. Dials a silent
/// socket of our own and reads what arrives there; retransmissions of an attempt carry the same destination
/// connection id and are skipped.
async fn capture_initials(count: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("sink socket");
    let sink_addr = sink.local_addr().expect("sink address");
    let limits = QuicLimits { handshake_timeout: Duration::from_secs(30), ..QuicLimits::default() };
    let dialer =
        QuicEndpoint::bind("127.0.0.1:0".parse().expect("address"), &new_key(), limits).expect("bind");
    let mut attempts = Vec::new();
    for _ in 0..count {
        let dialer = dialer.clone();
        attempts.push(tokio::spawn(async move { dialer.connect(sink_addr, None).await }));
    }
    let mut seen = HashSet::new();
    let mut initials = Vec::new();
    let mut buf = vec![0u8; 2048];
    while initials.len() < count {
        let (len, _) = tokio::time::timeout(Duration::from_secs(30), sink.recv_from(&mut buf))
            .await
            .expect("the dialer's Initials arrive")
            .expect("recv");
        let packet = &buf[..len];
        // A long-header Initial (RFC 9000 §17.2.2): form bit set, type 0; the destination connection id follows
        // the version.
        if len < 7 || packet[0] & 0xb0 != 0x80 {
            continue;
        }
        let dcid_len = usize::from(packet[5]);
        let Some(dcid) = packet.get(6..6 + dcid_len) else { continue };
        if seen.insert(dcid.to_vec()) {
            initials.push(packet.to_vec());
        }
    }
    for attempt in attempts {
        attempt.abort();
    }
    initials
}

/// The daemon's Prometheus text from its monitoring address.
fn metrics(monitoring: &str) -> String {
    let mut stream = TcpStream::connect(monitoring).expect("connect to the monitoring port");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_peers_connect_through_a_flood_of_half_open_handshakes() {
    let dir = NodeDir::new();
    let node = dir.start();
    let info = json(&dir.rnctl(&["-o", "json", "node", "info"]));
    let quic: SocketAddr =
        info["node"]["listen"]["quic"].as_str().expect("quic address").parse().expect("parse");
    let monitoring = info["node"]["listen"]["monitoring"].as_str().expect("monitoring address").to_owned();

    let initials = capture_initials(FLOOD_INITIALS).await;
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = {
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("flood socket");
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / FLOOD_PER_SECOND));
            let mut sent = 0u64;
            // Round after round: once the daemon dropped an attempt, replaying its Initial starts another.
            for packet in initials.iter().cycle() {
                if !flooding.load(Ordering::Relaxed) {
                    break;
                }
                ticker.tick().await;
                let _ = socket.send_to(packet, quic).await;
                sent += 1;
            }
            sent
        })
    };
    // Let the flood fill whatever it can fill before the honest nodes arrive.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let limits = QuicLimits { handshake_timeout: HONEST_DIAL_DEADLINE, ..QuicLimits::default() };
    let mut dials = Vec::new();
    for _ in 0..HONEST_DIALS {
        let limits = limits.clone();
        dials.push(tokio::spawn(async move {
            let endpoint = QuicEndpoint::bind("127.0.0.1:0".parse().expect("address"), &new_key(), limits)
                .expect("bind");
            endpoint.connect(quic, None).await.map(|outbound| outbound.node_id)
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut failures = Vec::new();
    for dial in dials {
        if let Err(e) = dial.await.expect("dial task") {
            failures.push(e.to_string());
        }
    }
    flooding.store(false, Ordering::Relaxed);
    let sent = flood.await.expect("flood task");

    let text = metrics(&monitoring);
    let retries = sample(&text, "rn_quic_inbound_attempts_total{outcome=\"retry\"}");
    assert!(
        failures.len() <= HONEST_FAILURES_ALLOWED,
        "{} of {HONEST_DIALS} honest dials failed during a flood of {sent} half-open handshakes: {failures:?}\n{}",
        failures.len(),
        node.stderr()
    );
    assert!(retries > 0.0, "the flood was met with Retries (metrics:\n{text})");
    let log = node.stderr();
    assert!(!log.contains("panicked"), "{log}");
}
