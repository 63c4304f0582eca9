//! Self-tests of the NAT lab (`tests/common/lab.rs`): prove with real UDP packets that each topology behaves as
//! the harness claims (mapping, filtering, double NAT, hairpin) and that a lab leaves nothing behind, before any
//! daemon test relies on it.
//!
//! Probes are plain UDP sockets of this process, created inside a lab namespace ([`Lab::udp_socket`]), so a
//! test sees exactly which source address each datagram arrived from. A packet that must *not* arrive is
//! proven blocked by waiting for the NAT's drop counter to count it, then sending a marker along a path that is
//! open: the marker must be the first thing the probe receives.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::{Host, InNetns, Lab, Nat, NatOptions};
use common::skip_without_root;

/// Generous: a datagram on these links arrives in microseconds, but CI machines are shared and loaded.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

const EIM: NatOptions = NatOptions { nat: Nat::EndpointIndependent, hairpin: false };
const EDM: NatOptions = NatOptions { nat: Nat::EndpointDependent, hairpin: false };
const FULL_CONE: NatOptions = NatOptions { nat: Nat::FullCone, hairpin: false };

fn skip(test: &str) -> bool {
    skip_without_root(test, "builds network namespaces and nftables NAT routers")
}

fn lab() -> Lab {
    Lab::new().unwrap_or_else(|e| panic!("cannot build the NAT lab: {e}"))
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A UDP probe bound to `ip:port` in `node`'s namespace.
fn probe(lab: &Lab, node: &impl InNetns, ip: IpAddr, port: u16) -> UdpSocket {
    let socket = lab.udp_socket(node, sock(ip, port)).unwrap_or_else(|e| panic!("probe: {e}"));
    socket.set_read_timeout(Some(RECEIVE_TIMEOUT)).expect("set read timeout");
    socket
}

/// A probe on every address of `host`.
fn probe_any(lab: &Lab, host: &Host, port: u16) -> UdpSocket {
    probe(lab, host, Ipv4Addr::UNSPECIFIED.into(), port)
}

fn send(socket: &UdpSocket, to: SocketAddr, payload: &str) {
    socket.send_to(payload.as_bytes(), to).unwrap_or_else(|e| panic!("send {payload:?} to {to}: {e}"));
}

/// The next datagram of `socket` and where it came from; panics with the lab's state if none arrives.
fn receive(lab: &Lab, socket: &UdpSocket, waiting_for: &str) -> (String, SocketAddr) {
    let mut buf = [0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => (String::from_utf8_lossy(&buf[..n]).into_owned(), from),
        Err(e) => {
            panic!("{waiting_for}: nothing arrived within {RECEIVE_TIMEOUT:?} ({e})\n{}", lab.diagnostics())
        }
    }
}

/// Receives the datagram `payload`, which must be the next one; returns its source.
fn expect(lab: &Lab, socket: &UdpSocket, payload: &str) -> SocketAddr {
    let (got, from) = receive(lab, socket, &format!("waiting for {payload:?}"));
    assert_eq!(got, payload, "expected {payload:?}, got {got:?} from {from}\n{}", lab.diagnostics());
    from
}

/// Proves that `blocked` (a send to `behind`'s mapping) is dropped by `behind`'s NATs: waits until their drop
/// counter counts it, then has `open` send a marker that `receiver` must get before anything else.
fn expect_filtered(
    lab: &Lab,
    behind: &Host,
    receiver: &UdpSocket,
    blocked: impl FnOnce(),
    open: impl FnOnce(),
) {
    let before = lab.filtered_packets(behind).expect("read the drop counter");
    blocked();
    lab.wait_filtered(behind, before, RECEIVE_TIMEOUT)
        .unwrap_or_else(|e| panic!("the blocked packet was not dropped: {e}\n{}", lab.diagnostics()));
    open();
    let (got, from) = receive(lab, receiver, "waiting for the marker sent after the blocked packet");
    assert_eq!(got, "marker", "the NAT let {got:?} from {from} through\n{}", lab.diagnostics());
}

#[test]
fn public_hosts_reach_each_other_on_both_addresses() {
    if skip("public_hosts_reach_each_other_on_both_addresses") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    let p2 = lab.public_host("p2").unwrap();
    let p2_second = lab.add_second_address(&p2).unwrap();
    assert!(p1.public_addr.is_none() && p2.public_addr.is_none(), "public hosts are behind no NAT");
    assert_eq!(p1.addr, IpAddr::from([203, 0, 113, 10]));
    assert_eq!(p2_second, IpAddr::from([198, 51, 100, 11]));

    let s1 = probe_any(&lab, &p1, 7000);
    let s2 = probe(&lab, &p2, p2.addr, 7000);
    let s2_second = probe(&lab, &p2, p2_second, 7000);

    send(&s1, sock(p2.addr, 7000), "hello");
    assert_eq!(expect(&lab, &s2, "hello"), sock(p1.addr, 7000), "p2 sees p1's own address, untranslated");
    send(&s2, sock(p1.addr, 7000), "reply");
    assert_eq!(expect(&lab, &s1, "reply"), sock(p2.addr, 7000));

    // The second address is reachable, and answers come from it (across the internet router, since it is in
    // another subnet than p1).
    send(&s1, sock(p2_second, 7000), "to second");
    assert_eq!(expect(&lab, &s2_second, "to second"), sock(p1.addr, 7000));
    send(&s2_second, sock(p1.addr, 7000), "from second");
    assert_eq!(expect(&lab, &s1, "from second"), sock(p2_second, 7000));
}

#[test]
fn endpoint_independent_nat_keeps_one_mapping_and_filters_by_address_and_port() {
    if skip("endpoint_independent_nat_keeps_one_mapping_and_filters_by_address_and_port") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    let p2 = lab.public_host("p2").unwrap();
    let p1_second = lab.add_second_address(&p1).unwrap();
    let a = lab.private_host("a", EIM).unwrap();
    let public = a.public_addr.expect("a is behind a NAT");
    assert_eq!(a.addr, IpAddr::from([192, 168, 1, 2]));
    assert_ne!(public, a.addr);

    let s1 = probe(&lab, &p1, p1.addr, 7000);
    let s1_other_port = probe(&lab, &p1, p1.addr, 7001);
    let s1_other_addr = probe(&lab, &p1, p1_second, 7000);
    let s2 = probe_any(&lab, &p2, 7000);
    let sa = probe_any(&lab, &a, 40000);

    send(&sa, sock(p1.addr, 7000), "to p1");
    send(&sa, sock(p2.addr, 7000), "to p2");
    let seen_by_p1 = expect(&lab, &s1, "to p1");
    let seen_by_p2 = expect(&lab, &s2, "to p2");
    assert_eq!(
        seen_by_p1, seen_by_p2,
        "one inside socket must keep one outside mapping for every destination"
    );
    assert_eq!(seen_by_p1, sock(public, 40000), "MASQUERADE keeps the inside port when it is free");

    // Whoever the socket sent to may answer.
    send(&s1, seen_by_p1, "reply from p1");
    assert_eq!(expect(&lab, &sa, "reply from p1"), sock(p1.addr, 7000));
    send(&s2, seen_by_p2, "reply from p2");
    assert_eq!(expect(&lab, &sa, "reply from p2"), sock(p2.addr, 7000));

    // Another port of a host it sent to may not (port-restricted), nor another address of that host.
    expect_filtered(
        &lab,
        &a,
        &sa,
        || send(&s1_other_port, seen_by_p1, "other port"),
        || send(&s1, seen_by_p1, "marker"),
    );
    expect_filtered(
        &lab,
        &a,
        &sa,
        || send(&s1_other_addr, seen_by_p1, "other address"),
        || send(&s1, seen_by_p1, "marker"),
    );

    // The mapping lives in conntrack: once flushed, even p1 is shut out, until a sends again. The dropped
    // packet must not have claimed the port meanwhile, so a gets the same mapping back.
    lab.flush_conntrack(&a).expect("flush conntrack");
    expect_filtered(
        &lab,
        &a,
        &sa,
        || send(&s1, seen_by_p1, "after flush"),
        || {
            send(&sa, sock(p1.addr, 7000), "reopen");
            assert_eq!(expect(&lab, &s1, "reopen"), seen_by_p1, "a new flow gets the same mapping");
            send(&s1, seen_by_p1, "marker");
        },
    );
}

#[test]
fn tcp_connections_cross_the_nat() {
    if skip("tcp_connections_cross_the_nat") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    let a = lab.private_host("a", EIM).unwrap();
    let listener = lab.in_netns(&p1, || TcpListener::bind(sock(p1.addr, 8000))).unwrap();
    let mut client =
        lab.in_netns(&a, || TcpStream::connect_timeout(&sock(p1.addr, 8000), RECEIVE_TIMEOUT)).unwrap();
    // The handshake is complete, so the connection is already waiting in the backlog.
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer, sock(a.public_addr.unwrap(), client.local_addr().unwrap().port()));
    client.write_all(b"over tcp").unwrap();
    server.set_read_timeout(Some(RECEIVE_TIMEOUT)).unwrap();
    let mut buf = [0u8; 8];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"over tcp");
}

#[test]
fn endpoint_dependent_nat_maps_each_destination_to_its_own_port() {
    if skip("endpoint_dependent_nat_maps_each_destination_to_its_own_port") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    let p2 = lab.public_host("p2").unwrap();
    let a = lab.private_host("a", EDM).unwrap();
    let public = a.public_addr.expect("a is behind a NAT");

    let s1 = probe_any(&lab, &p1, 7000);
    let s2 = probe_any(&lab, &p2, 7000);
    let sa = probe_any(&lab, &a, 40000);

    send(&sa, sock(p1.addr, 7000), "to p1");
    send(&sa, sock(p2.addr, 7000), "to p2");
    let seen_by_p1 = expect(&lab, &s1, "to p1");
    let seen_by_p2 = expect(&lab, &s2, "to p2");
    assert_eq!(seen_by_p1.ip(), public);
    assert_eq!(seen_by_p2.ip(), public);
    // Both ports are drawn at random from 1024-65535, so this fails spuriously once in ~64 000 runs.
    assert_ne!(seen_by_p1.port(), seen_by_p2.port(), "each destination must get its own outside port");

    // Each mapping works for its own destination only.
    send(&s1, seen_by_p1, "reply from p1");
    assert_eq!(expect(&lab, &sa, "reply from p1"), sock(p1.addr, 7000));
    send(&s2, seen_by_p2, "reply from p2");
    assert_eq!(expect(&lab, &sa, "reply from p2"), sock(p2.addr, 7000));
    expect_filtered(
        &lab,
        &a,
        &sa,
        || send(&s2, seen_by_p1, "p2 on p1's mapping"),
        || send(&s1, seen_by_p1, "marker"),
    );
}

#[test]
fn full_cone_nat_lets_anyone_use_a_mapping_but_nothing_else() {
    if skip("full_cone_nat_lets_anyone_use_a_mapping_but_nothing_else") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    let p2 = lab.public_host("p2").unwrap();
    let a = lab.private_host("a", FULL_CONE).unwrap();
    let public = a.public_addr.expect("a is behind a NAT");

    let s1 = probe(&lab, &p1, p1.addr, 7000);
    let s1_other_port = probe(&lab, &p1, p1.addr, 7001);
    let s2 = probe_any(&lab, &p2, 7000);
    let sa = probe_any(&lab, &a, 40000);

    send(&sa, sock(p1.addr, 7000), "open mapping");
    let mapping = expect(&lab, &s1, "open mapping");
    assert_eq!(mapping, sock(public, 40000));

    // p2 never heard from a, yet reaches it; and a's answer leaves through the same mapping.
    send(&s2, mapping, "unsolicited from p2");
    assert_eq!(expect(&lab, &sa, "unsolicited from p2"), sock(p2.addr, 7000));
    send(&sa, sock(p2.addr, 7000), "answer to p2");
    assert_eq!(expect(&lab, &s2, "answer to p2"), mapping, "full cone mapping is endpoint-independent");
    send(&s1_other_port, mapping, "from p1's other port");
    assert_eq!(expect(&lab, &sa, "from p1's other port"), sock(p1.addr, 7001));

    // A port no inside socket ever sent from stays closed: this is a cone, not a forward-everything DMZ.
    expect_filtered(
        &lab,
        &a,
        &sa,
        || send(&s2, sock(public, mapping.port() + 1), "unmapped port"),
        || send(&s2, mapping, "marker"),
    );
}

#[test]
fn double_nat_host_is_seen_at_the_carrier_address() {
    if skip("double_nat_host_is_seen_at_the_carrier_address") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    let d = lab.double_nat_host("d", EIM, EIM).unwrap();
    let routers = lab.routers_of(&d).unwrap();
    let [home, carrier] = routers.as_slice() else {
        panic!("expected home and carrier routers, got {routers:?}")
    };
    let IpAddr::V4(home_outside) = home.outside_addr else { panic!("IPv4 only") };
    let [first, second, ..] = home_outside.octets();
    assert!(
        first == 100 && second & 0xc0 == 64,
        "the home router's outside address {home_outside} must be in 100.64.0.0/10"
    );
    assert_eq!(d.public_addr, Some(carrier.outside_addr), "a host's public address is its outermost NAT's");

    let s1 = probe_any(&lab, &p1, 7000);
    let sd = probe_any(&lab, &d, 40000);
    // A probe in the carrier's own namespace, on its inside address, sees what the home router sends out.
    let s_carrier = probe(&lab, carrier, carrier.inside_addr, 9000);

    send(&sd, sock(carrier.inside_addr, 9000), "to carrier");
    let seen_by_carrier = expect(&lab, &s_carrier, "to carrier");
    assert_eq!(seen_by_carrier.ip(), home.outside_addr, "the home router translates into the carrier's LAN");

    send(&sd, sock(p1.addr, 7000), "to p1");
    let seen_by_p1 = expect(&lab, &s1, "to p1");
    assert_eq!(seen_by_p1.ip(), carrier.outside_addr, "the internet sees the carrier NAT's address");
    send(&s1, seen_by_p1, "reply");
    assert_eq!(expect(&lab, &sd, "reply"), sock(p1.addr, 7000), "replies cross both NATs back");
}

/// Two hosts behind one NAT, after b opened a mapping by sending to p1.
struct Neighbours {
    a: Host,
    sa: UdpSocket,
    sb: UdpSocket,
    s1: UdpSocket,
    /// b's outside address and port, as p1 saw them.
    b_mapping: SocketAddr,
}

fn neighbours(lab: &mut Lab, options: NatOptions) -> Neighbours {
    let p1 = lab.public_host("p1").unwrap();
    let a = lab.private_host("a", options).unwrap();
    let b = lab.private_host_behind("b", &a).unwrap();
    assert_eq!(b.public_addr, a.public_addr, "a and b share a NAT");
    assert_ne!(b.addr, a.addr);
    let s1 = probe_any(lab, &p1, 7000);
    let sa = probe_any(lab, &a, 40000);
    let sb = probe_any(lab, &b, 40001);
    send(&sb, sock(p1.addr, 7000), "open mapping");
    let b_mapping = expect(lab, &s1, "open mapping");
    Neighbours { a, sa, sb, s1, b_mapping }
}

#[test]
fn hairpin_on_reaches_a_neighbour_through_the_public_address() {
    if skip("hairpin_on_reaches_a_neighbour_through_the_public_address") {
        return;
    }
    let mut lab = lab();
    let n = neighbours(&mut lab, NatOptions { nat: Nat::EndpointIndependent, hairpin: true });

    send(&n.sa, n.b_mapping, "hairpin");
    let seen_by_b = expect(&lab, &n.sb, "hairpin");
    assert_eq!(Some(seen_by_b.ip()), n.a.public_addr, "b sees a at the public address, as if from outside");
    send(&n.sb, seen_by_b, "hairpin reply");
    assert_eq!(expect(&lab, &n.sa, "hairpin reply"), n.b_mapping, "b answers from the address a dialled");
}

#[test]
fn hairpin_off_drops_a_neighbour_through_the_public_address() {
    if skip("hairpin_off_drops_a_neighbour_through_the_public_address") {
        return;
    }
    let mut lab = lab();
    let n = neighbours(&mut lab, EIM);
    expect_filtered(
        &lab,
        &n.a,
        &n.sb,
        || send(&n.sa, n.b_mapping, "hairpin"),
        || send(&n.s1, n.b_mapping, "marker"),
    );
}

#[test]
fn carrier_hairpin_joins_two_homes_behind_one_carrier() {
    if skip("carrier_hairpin_joins_two_homes_behind_one_carrier") {
        return;
    }
    let mut lab = lab();
    let p1 = lab.public_host("p1").unwrap();
    // Full-cone homes, so that only the carrier's hairpin decides.
    let c1 = lab
        .double_nat_host("c1", FULL_CONE, NatOptions { nat: Nat::EndpointIndependent, hairpin: true })
        .unwrap();
    let c2 = lab.double_nat_host_behind_carrier("c2", FULL_CONE, &c1).unwrap();
    assert_eq!(c1.public_addr, c2.public_addr, "both homes share the carrier's address");
    let (home1, home2) = (&lab.routers_of(&c1).unwrap()[0], &lab.routers_of(&c2).unwrap()[0]);
    assert_ne!(home1.outside_addr, home2.outside_addr, "each home has its own carrier-LAN address");

    let s1 = probe_any(&lab, &p1, 7000);
    let sc1 = probe_any(&lab, &c1, 40000);
    let sc2 = probe_any(&lab, &c2, 40001);
    send(&sc2, sock(p1.addr, 7000), "open mapping");
    let c2_mapping = expect(&lab, &s1, "open mapping");

    send(&sc1, c2_mapping, "via carrier");
    let seen_by_c2 = expect(&lab, &sc2, "via carrier");
    assert_eq!(Some(seen_by_c2.ip()), c1.public_addr);
    send(&sc2, seen_by_c2, "reply via carrier");
    assert_eq!(expect(&lab, &sc1, "reply via carrier"), c2_mapping);
}

/// Names of the namespaces `ip netns list` shows.
fn listed_namespaces() -> HashSet<String> {
    let output = Command::new("ip").args(["netns", "list"]).output().expect("run ip netns list");
    assert!(output.status.success(), "ip netns list failed: {}", String::from_utf8_lossy(&output.stderr));
    // Lines look like "name (id: 3)" or just "name".
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn root_links() -> HashSet<String> {
    let output = Command::new("ip").args(["-o", "link", "show"]).output().expect("run ip link");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(':').nth(1).map(|name| name.trim().to_owned()))
        .collect()
}

fn netns_inode(path: &str) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    (meta.dev(), meta.ino())
}

/// Waits until process `pid` is in namespace `netns`.
fn wait_until_in(pid: u32, netns: &str) {
    let target = netns_inode(&format!("/run/netns/{netns}"));
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    while std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| (m.dev(), m.ino())).ok() != Some(target) {
        assert!(Instant::now() < deadline, "process {pid} never entered {netns}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a child to end; the lab must have killed it.
fn wait_killed(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} is still running after its lab was dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dropping_a_lab_removes_its_namespaces_and_processes() {
    if skip("dropping_a_lab_removes_its_namespaces_and_processes") {
        return;
    }
    let links_before = root_links();
    let ipv6_sysctl = "/proc/sys/net/ipv6/conf/all/disable_ipv6";
    let root_ipv6_before = std::fs::read_to_string(ipv6_sysctl).unwrap();
    let mut lab = lab();
    let _p1 = lab.public_host("p1").unwrap();
    let a = lab.private_host("a", EIM).unwrap();
    let d = lab.double_nat_host("d", EIM, EIM).unwrap();
    let namespaces = lab.namespaces().to_vec();
    assert_eq!(namespaces.len(), 7, "internet, p1, a + router, d + home + carrier: {namespaces:?}");
    assert!(namespaces.iter().all(|netns| netns.starts_with(lab.prefix())));
    let listed = listed_namespaces();
    assert!(namespaces.iter().all(|netns| listed.contains(netns)), "not all of {namespaces:?} are listed");
    let new_links: Vec<_> = root_links().difference(&links_before).cloned().collect();
    assert!(new_links.is_empty(), "the lab created interfaces in the root namespace: {new_links:?}");

    // The lab's sysctls went to its namespaces, not to the root namespace.
    let output = lab.command(&a, "cat").arg(ipv6_sysctl).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1", "IPv6 is off in lab namespaces");
    assert_eq!(
        std::fs::read_to_string(ipv6_sysctl).unwrap(),
        root_ipv6_before,
        "the root namespace is untouched"
    );

    // `command` runs a program in the host's namespace: it sees the host's address.
    let output = lab.command(&a, "ip").args(["-4", "-o", "addr", "show", "dev", "eth0"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains(&format!("{}/24", a.addr)), "ip addr in {}: {text}", a.netns);

    // `spawn` starts a tracked process in the namespace; a process started by hand in a lab namespace is not
    // tracked but must die with the lab all the same.
    let mut sleep = Command::new("sleep");
    sleep.arg("600").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let tracked = lab.spawn(&a, sleep).unwrap();
    let tracked_pid = tracked.id();
    assert_eq!(
        netns_inode(&format!("/proc/{tracked_pid}/ns/net")),
        netns_inode(&format!("/run/netns/{}", a.netns)),
        "spawn must start the process in the host's namespace"
    );
    let mut untracked = lab
        .command(&d, "sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `ip netns exec` enters the namespace only once it runs; the lab kills what is in its namespaces.
    wait_until_in(untracked.id(), &d.netns);

    drop(lab);

    let left: Vec<_> = namespaces.iter().filter(|netns| listed_namespaces().contains(*netns)).collect();
    assert!(left.is_empty(), "namespaces left after drop: {left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{tracked_pid}")).exists(),
        "the spawned process was neither killed nor reaped"
    );
    drop(tracked);
    let status = wait_killed(&mut untracked, "a process started in a lab namespace");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn a_panicking_test_still_removes_its_lab() {
    if skip("a_panicking_test_still_removes_its_lab") {
        return;
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let mut lab = lab();
        lab.private_host("a", EIM).unwrap();
        sender.send(lab.namespaces().to_vec()).unwrap();
        panic!("deliberate panic with a live lab (expected by this test)");
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let namespaces = receiver.recv().expect("the lab was built before the panic");
    assert_eq!(namespaces.len(), 3, "internet, a and its router: {namespaces:?}");
    let left: Vec<_> = namespaces.iter().filter(|netns| listed_namespaces().contains(*netns)).collect();
    assert!(left.is_empty(), "namespaces left after the panic: {left:?}");
}
