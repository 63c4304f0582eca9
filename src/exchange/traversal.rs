//! Punching through endpoint-dependent NATs, where the port a peer must aim at is one nobody has seen yet (the
//! protocol is described in `proto/wire.proto`, "Hole punching through a rendezvous" and "Datagrams outside
//! QUIC"):
//! - **port prediction**: behind a NAT that hands out ports in turn, a node samples the port its NAT gives a
//!   new flow just before it signs its offer (an address reflection from a new socket) and offers the next
//!   ports, which the other side dials as well;
//! - **the birthday strategy**: behind a NAT with random ports, the hard side opens [`BIRTHDAY_SOCKETS`]
//!   mappings at once, each open to the easy side's one public address, and the easy side sprays up to
//!   [`BIRTHDAY_PROBES`] probes at random ports of the hard side's IP until one lands in a mapping; the hard
//!   side then dials the easy side with QUIC from the socket the probe reached.
//!
//! Which of these a punch uses follows from the NATs both offers state ([`strategy`]), so both sides agree
//! without another message. Everything is bounded: sockets, probes, the time they are sent over, and (in
//! `punch`) how many birthday punches run at once.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::quic::QuicEndpoint;
use crate::wire::{self, pb};

/// Extra sockets (and so NAT mappings) the hard side opens for a birthday punch.
pub const BIRTHDAY_SOCKETS: usize = 256;
/// Most probes the easy side sends in one birthday punch: with [`BIRTHDAY_SOCKETS`] mappings among the
/// ~64 500 ports a NAT hands out, 2048 random probes find one with probability 1 − (1 − 256/64 512)^2048 ≈
/// 99.97 % (a run stops at the first hit: ~250 probes on average).
pub const BIRTHDAY_PROBES: u32 = 2048;
/// Probes sent together, and the pause between such batches: 800 probes/s of 16 bytes (~13 KB/s), so the
/// whole budget goes out in about 2.6 s.
const PROBE_BATCH: u32 = 8;
const PROBE_BATCH_INTERVAL: Duration = Duration::from_millis(10);
/// Ports a NAT may hand out to a flow from an unprivileged port (Linux picks from 1024–65535).
const LOWEST_MAPPED_PORT: u16 = 1024;
/// Ports offered after a sampled one: room for the flows the node itself opens to the other side's several
/// candidates, and for a few flows of other hosts behind the same NAT.
pub const PREDICTED_PORTS: i32 = 16;
/// How long an address reflection may take before the punch goes on without a prediction.
const REFLECT_TIMEOUT: Duration = Duration::from_millis(300);
const REFLECT_ATTEMPTS: u32 = 2;

/// How a punch gets through, decided from both sides' NATs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Each side dials the other's candidates (and predicted addresses, if any).
    Dial,
    /// We are behind the random-port NAT: open [`BIRTHDAY_SOCKETS`] mappings and wait for a probe.
    BirthdayHard,
    /// The peer is behind the random-port NAT: probe its IP at random ports.
    BirthdayEasy,
}

/// Endpoint-dependent mapping whose ports nobody can predict.
fn random_ports(nat: &pb::NatInfo) -> bool {
    nat.mapping == pb::NatType::EndpointDependent as i32 && nat.port_delta == 0
}

/// Behind a NAT that maps one socket to one public port whatever the destination, as far as anyone knows: a
/// mapping still undecided (a node with a single public witness cannot tell endpoint-independent mapping from
/// address-dependent mapping) may be one, and an undecided verdict never blocks a punch.
fn one_mapping(nat: &pb::NatInfo) -> bool {
    nat.mapping == pb::NatType::EndpointIndependent as i32 || nat.mapping == pb::NatType::Unknown as i32
}

/// The strategy for a punch between a node behind `ours` and a peer behind `theirs`. A birthday punch needs
/// one side whose mapping is stable (that address is what the hard side's mappings are opened to); two
/// random-port NATs leave nothing to aim at, and a public side needs no punch at all.
pub fn strategy(ours: &pb::NatInfo, theirs: &pb::NatInfo) -> Strategy {
    if random_ports(ours) && one_mapping(theirs) {
        Strategy::BirthdayHard
    } else if one_mapping(ours) && random_ports(theirs) {
        Strategy::BirthdayEasy
    } else {
        Strategy::Dial
    }
}

/// The addresses a NAT with sequential ports will most likely give our next flows, after it gave `sampled`
/// to the flow just sampled: the next [`PREDICTED_PORTS`] steps of `delta`, within the port range.
pub fn predicted_addresses(sampled: SocketAddr, delta: i32) -> Vec<SocketAddr> {
    if delta == 0 {
        return Vec::new();
    }
    (1..=PREDICTED_PORTS)
        .filter_map(|step| {
            let port = i64::from(sampled.port()) + i64::from(delta) * i64::from(step);
            u16::try_from(port).ok().filter(|port| *port >= LOWEST_MAPPED_PORT)
        })
        .map(|port| SocketAddr::new(sampled.ip(), port))
        .collect()
}

fn unspecified_like(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without randomness, a fixed nonce only makes a forged reply easier, which costs a prediction.
    let _ = getrandom::fill(&mut bytes);
    bytes
}

/// Asks `reflector` (a public peer's QUIC socket) where a datagram from a new socket of ours comes from: the
/// port our NAT gave that new flow. `None` if no answer came in time.
pub async fn sample_new_mapping(reflector: SocketAddr) -> Option<SocketAddr> {
    let socket = UdpSocket::bind(unspecified_like(reflector)).await.ok()?;
    let nonce = random_bytes::<{ wire::REFLECT_NONCE_BYTES }>();
    let request = wire::reflect_request(&nonce);
    let mut buf = [0u8; 128];
    for _ in 0..REFLECT_ATTEMPTS {
        socket.send_to(&request, reflector).await.ok()?;
        let answer = tokio::time::timeout(REFLECT_TIMEOUT, async {
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.ok()?;
                if from == reflector
                    && let Some(observed) = wire::parse_reflect_reply(&buf[..len], &nonce)
                {
                    return Some(observed);
                }
            }
        })
        .await;
        if let Ok(observed) = answer {
            return observed;
        }
    }
    None
}

/// What one side of a birthday punch did, for the punch statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BirthdayReport {
    Hard {
        sockets: usize,
        hit: bool,
    },
    Easy {
        probes_sent: u32,
    },
    /// Another birthday punch was running, or the sockets could not be opened.
    Skipped(String),
}

impl std::fmt::Display for BirthdayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hard { sockets, hit: true } => {
                write!(f, "birthday, hard side: {sockets} sockets opened, a probe reached one")
            }
            Self::Hard { sockets, hit: false } => {
                write!(f, "birthday, hard side: {sockets} sockets opened, no probe reached them")
            }
            Self::Easy { probes_sent } => {
                write!(f, "birthday, easy side: {probes_sent} of {BIRTHDAY_PROBES} probes sent")
            }
            Self::Skipped(why) => write!(f, "birthday skipped: {why}"),
        }
    }
}

/// The hard side's mappings: [`BIRTHDAY_SOCKETS`] new sockets, each having sent one probe to `easy` (the easy
/// side's public address), so that its NAT lets `easy` answer on each.
pub async fn open_mappings(easy: SocketAddr, nonce: u64) -> std::io::Result<Vec<UdpSocket>> {
    let probe = wire::birthday_probe(nonce);
    let mut sockets = Vec::with_capacity(BIRTHDAY_SOCKETS);
    for _ in 0..BIRTHDAY_SOCKETS {
        let socket = UdpSocket::bind(unspecified_like(easy)).await?;
        // A lost opening probe costs one mapping of 256, not the punch.
        let _ = socket.send_to(&probe, easy).await;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Waits until a probe of the punch `nonce` from `easy`'s IP reaches one of `sockets`; returns that socket
/// and the address the probe came from (the easy side's mapping). The other sockets are closed.
pub async fn await_probe(
    sockets: Vec<UdpSocket>,
    easy: IpAddr,
    nonce: u64,
) -> Option<(UdpSocket, SocketAddr)> {
    let mut waiting = JoinSet::new();
    for socket in sockets {
        waiting.spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else { return None };
                if from.ip() == easy && wire::parse_birthday_probe(&buf[..len]) == Some(nonce) {
                    return Some((socket, from));
                }
            }
        });
    }
    while let Some(finished) = waiting.join_next().await {
        if let Ok(Some(hit)) = finished {
            waiting.abort_all();
            return Some(hit);
        }
    }
    None
}

/// The easy side: sends probes of the punch `nonce` from the node's socket to random ports of `hard`, in
/// paced batches, until `connected` says so or the budget is spent, telling `progress` the count sent after
/// each batch. Returns how many were sent.
pub async fn spray_probes(
    endpoint: &QuicEndpoint,
    hard: IpAddr,
    nonce: u64,
    connected: impl Fn() -> bool,
    progress: impl Fn(u32),
) -> u32 {
    let probe = wire::birthday_probe(nonce);
    let mut used: HashSet<u16> = HashSet::new();
    let mut sent = 0;
    while sent < BIRTHDAY_PROBES && !connected() {
        for _ in 0..PROBE_BATCH {
            let port = loop {
                let [a, b] = random_bytes::<2>();
                let port = u16::from_be_bytes([a, b]);
                // Every port is tried at most once; the budget is far below the range, so this ends.
                if port >= LOWEST_MAPPED_PORT && used.insert(port) {
                    break port;
                }
            };
            // A full socket buffer drops a probe, as the network might.
            let _ = endpoint.send_datagram(SocketAddr::new(hard, port), &probe);
            sent += 1;
        }
        progress(sent);
        tokio::time::sleep(PROBE_BATCH_INTERVAL).await;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(mapping: pb::NatType, port_delta: i32) -> pb::NatInfo {
        pb::NatInfo { mapping: mapping as i32, reachability: 0, port_delta }
    }

    #[test]
    fn the_strategy_follows_from_both_nats_and_both_sides_agree() {
        use pb::NatType::{
            EndpointDependent as Edm, EndpointIndependent as Eim, None as Public, Unknown as Undecided,
        };
        let cases = [
            (nat(Eim, 0), nat(Eim, 0), Strategy::Dial, Strategy::Dial),
            (nat(Edm, 0), nat(Eim, 0), Strategy::BirthdayHard, Strategy::BirthdayEasy),
            // An undecided mapping may be a single one: worth a birthday punch towards it.
            (nat(Edm, 0), nat(Undecided, 0), Strategy::BirthdayHard, Strategy::BirthdayEasy),
            (nat(Undecided, 0), nat(Undecided, 0), Strategy::Dial, Strategy::Dial),
            // Sequential ports: predicted, not sprayed.
            (nat(Edm, 1), nat(Eim, 0), Strategy::Dial, Strategy::Dial),
            // Nothing stable to aim at, or nothing to punch.
            (nat(Edm, 0), nat(Edm, 0), Strategy::Dial, Strategy::Dial),
            (nat(Edm, 0), nat(Public, 0), Strategy::Dial, Strategy::Dial),
        ];
        for (a, b, a_does, b_does) in cases {
            assert_eq!((strategy(&a, &b), strategy(&b, &a)), (a_does, b_does), "{a:?} × {b:?}");
        }
    }

    #[test]
    fn predictions_follow_the_step_and_stay_in_range() {
        let sampled: SocketAddr = "203.0.113.101:20007".parse().unwrap();
        let up = predicted_addresses(sampled, 1);
        assert_eq!(up.len(), PREDICTED_PORTS as usize);
        assert_eq!(up[0].port(), 20008);
        assert_eq!(up.last().map(|a| a.port()), Some(20023));
        assert!(up.iter().all(|a| a.ip() == sampled.ip()));
        let down = predicted_addresses(sampled, -2);
        assert_eq!(down[..2].iter().map(|a| a.port()).collect::<Vec<_>>(), vec![20005, 20003]);
        let top: SocketAddr = "203.0.113.101:65530".parse().unwrap();
        assert_eq!(predicted_addresses(top, 1).len(), 5, "no port beyond 65535");
        let bottom: SocketAddr = "203.0.113.101:1030".parse().unwrap();
        assert_eq!(predicted_addresses(bottom, -1).len(), 6, "none below the unprivileged range");
        assert!(predicted_addresses(sampled, 0).is_empty());
    }

    /// The reflection and probe datagrams over real sockets on loopback: a node's socket answers a reflection
    /// with the sender's address, and a probe reaches the one mapping socket it is aimed at.
    #[tokio::test]
    async fn a_reflection_names_the_new_socket_and_a_probe_finds_its_socket() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let endpoint =
            QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), &key, crate::quic::QuicLimits::default())
                .expect("bind");
        let node = endpoint.local_addr().expect("addr");
        let sampled = sample_new_mapping(node).await.expect("the node's socket reflects");
        assert_eq!(sampled.ip(), node.ip());
        assert_ne!(sampled.port(), node.port(), "the sample comes from a new socket");

        let sockets = open_mappings(node, 9).await.expect("sockets");
        assert_eq!(sockets.len(), BIRTHDAY_SOCKETS);
        let target = sockets[17].local_addr().expect("addr");
        let waiting = tokio::spawn(await_probe(sockets, node.ip(), 9));
        // A probe of another punch is ignored; the right one is found.
        endpoint.send_datagram(target, &wire::birthday_probe(8)).expect("send");
        endpoint.send_datagram(target, &wire::birthday_probe(9)).expect("send");
        let (socket, from) = waiting.await.expect("task").expect("a probe arrived");
        assert_eq!(socket.local_addr().expect("addr"), target);
        assert_eq!(from, node);
        endpoint.close().await;
    }

    /// A flood of reflection requests from one IP gets at most that source's burst of answers, each smaller
    /// than its request; another IP asking meanwhile still gets its answers (the budget was once shared by
    /// everyone, and a flooder left a legitimate asker 1 answer of 37); and QUIC on the socket is unaffected.
    #[tokio::test]
    async fn reflections_are_rate_limited_per_source() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        let endpoint =
            QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), &key, crate::quic::QuicLimits::default())
                .expect("bind");
        let node = endpoint.local_addr().expect("addr");
        // 127.0.0.2 is a loopback address of its own on Linux: another source IP.
        let flood = UdpSocket::bind("127.0.0.2:0").await.expect("bind");
        let asker = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let request = wire::reflect_request(&[3; wire::REFLECT_NONCE_BYTES]);
        let mut asked = 0;
        for i in 0..400 {
            flood.send_to(&request, node).await.expect("send");
            if i % 25 == 0 {
                asker.send_to(&request, node).await.expect("send");
                asked += 1;
            }
            // Keeps the loopback receive buffer from dropping requests before the node reads them.
            tokio::task::yield_now().await;
        }
        let count_answers = |socket: UdpSocket| async move {
            let mut answers = 0;
            let mut buf = [0u8; 128];
            while let Ok(Ok((len, _))) =
                tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf)).await
            {
                assert!(len < request.len());
                answers += 1;
            }
            answers
        };
        let (flooded, answered) = tokio::join!(count_answers(flood), count_answers(asker));
        assert!(flooded > 0, "reflections are answered");
        assert!(flooded <= 30, "{flooded} answers to a flood of 400 requests from one source");
        assert_eq!(answered, asked, "another source got every answer while the flood went on");
        // The socket still serves QUIC.
        let other = QuicEndpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            crate::quic::QuicLimits::default(),
        )
        .expect("bind");
        let accepting = tokio::spawn({
            let endpoint = endpoint.clone();
            async move {
                let mut inbound = endpoint.accept().await.expect("open").expect("inbound");
                inbound.authenticated().await
            }
        });
        other.connect(node, Some(endpoint.node_id())).await.expect("QUIC still works");
        assert!(accepting.await.expect("task").is_ok());
        other.close().await;
        endpoint.close().await;
    }
}
