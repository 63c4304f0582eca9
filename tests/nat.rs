//! NAT behaviour of real daemons in the namespace lab: public hosts, and hosts behind an endpoint-independent
//! NAT, endpoint-dependent NATs (random and sequential ports), a full-cone NAT and a double NAT (home router behind a carrier NAT), all
//! built from the kernel's own NAT (see `common::lab`). Each private node dials the public ones, probes its NAT
//! through them (mapping reports and dial-backs), and must arrive at the verdict the lab built for it.
//! Needs root; skipped loudly without it (a failure in CI).

mod common;

use std::net::IpAddr;
use std::time::Instant;

use common::lab::{Host, Lab, Nat, NatOptions};
use common::{NodeDir, TestNode, in_network_namespace, json, skip_without_root, stderr};

/// The QUIC port every lab node listens on (each in its own namespace, so they never collide).
const QUIC_PORT: u16 = 30906;

struct LabNode {
    label: &'static str,
    host: Host,
    dir: NodeDir,
    _node: TestNode,
}

impl LabNode {
    fn start(label: &'static str, host: Host) -> Self {
        let dir =
            NodeDir::new().with_quic_listen(&format!("0.0.0.0:{QUIC_PORT}")).with_dht_listen("0.0.0.0:0");
        let mut cmd = dir.start_command();
        // Dial-back details, printed when a verdict is not the expected one.
        cmd.env("RUST_LOG", "info,remote_network::nat=debug,remote_network::exchange::dial_back=debug");
        let node = dir.spawn_ready(in_network_namespace(&cmd, &host.netns));
        Self { label, host, dir, _node: node }
    }

    fn quic_address(&self) -> String {
        format!("{}:{QUIC_PORT}", self.host.addr)
    }

    /// `rnctl connect`: the peer must be verified.
    fn connect(&self, other: &LabNode) -> std::time::Duration {
        let started = Instant::now();
        let out = self.dir.rnctl(&["--timeout", "60", "connect", &other.quic_address()]);
        assert!(out.status.success(), "{} → {}: {}", self.label, other.label, stderr(&out));
        started.elapsed()
    }

    fn probe(&self) -> serde_json::Value {
        let out = self.dir.rnctl(&["--timeout", "120", "-o", "json", "nat", "probe"]);
        assert!(out.status.success(), "{}: {}", self.label, stderr(&out));
        json(&out)["report"].clone()
    }
}

const EIM: NatOptions = NatOptions { nat: Nat::EndpointIndependent, hairpin: false };
const EDM: NatOptions = NatOptions { nat: Nat::EndpointDependent, hairpin: false };
const SEQ: NatOptions = NatOptions { nat: Nat::Sequential, hairpin: false };
const CONE: NatOptions = NatOptions { nat: Nat::FullCone, hairpin: false };

#[tokio::test(flavor = "multi_thread")]
async fn each_node_classifies_the_nat_the_lab_built() {
    if skip_without_root(
        "each_node_classifies_the_nat_the_lab_built",
        "it builds network namespaces and NATs",
    ) {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let mut publics = Vec::new();
    for label in ["pub_a", "pub_b", "pub_c"] {
        let host = lab.public_host(label).expect("public host");
        // A second address per public host: dial-backs "from another IP" come from it.
        lab.add_second_address(&host).expect("second address");
        publics.push(LabNode::start(label, host));
    }
    // Public hosts learn what they are from each other first, so that private nodes later pick them as helpers.
    for (i, node) in publics.iter().enumerate() {
        for other in publics.iter().skip(i + 1) {
            node.connect(other);
        }
    }
    for node in &publics {
        let report = node.probe();
        assert_eq!(report["natType"], "NAT_TYPE_NONE", "{}: {report:#}", node.label);
        assert_eq!(report["reachability"], "REACHABILITY_PUBLIC", "{}: {report:#}", node.label);
        // The hairpin probe (a second socket dialing our external address) reaches us: no NAT in the way.
        assert_eq!(report["hairpin"], "HAIRPIN_SUPPORT_SUPPORTED", "{}: {report:#}", node.label);
    }

    let privates = [
        ("eim", "endpoint-independent", lab.private_host("eim", EIM).expect("host")),
        ("edm", "endpoint-dependent", lab.private_host("edm", EDM).expect("host")),
        ("seq", "endpoint-dependent, sequential", lab.private_host("seq", SEQ).expect("host")),
        ("cone", "full cone", lab.private_host("cone", CONE).expect("host")),
        ("double", "EIM behind carrier EIM", lab.double_nat_host("double", EIM, EIM).expect("host")),
    ];
    let mut nodes = Vec::new();
    for (label, nat, host) in privates {
        let node = LabNode::start(label, host);
        let mut time_to_connected = Vec::new();
        for public in &publics {
            time_to_connected.push(node.connect(public));
        }
        nodes.push((node, nat, time_to_connected));
    }
    // Probing runs through the public helpers; all nodes probe at once.
    let reports: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes.iter().map(|(node, _, _)| scope.spawn(|| node.probe())).collect();
        handles.into_iter().map(|h| h.join().expect("probe thread")).collect()
    });

    println!(
        "\n{:<8} {:<24} {:<30} {:<28} {:<34} first connection",
        "node", "lab NAT", "mapping", "filtering", "verdict"
    );
    for ((node, nat, times), report) in nodes.iter().zip(&reports) {
        println!(
            "{:<8} {:<24} {:<30} {:<28} {:<34} {:.0} ms",
            node.label,
            nat,
            report["mapping"].as_str().unwrap_or("?"),
            report["filtering"].as_str().unwrap_or("?"),
            report["reachability"].as_str().unwrap_or("?"),
            times[0].as_secs_f64() * 1000.0
        );
    }
    let expect = |label: &str, nat_type: &str, reachability: &str| {
        let (_, report) = nodes
            .iter()
            .zip(&reports)
            .find(|((node, _, _), _)| node.label == label)
            .map(|((node, _, _), report)| (node, report))
            .expect("node");
        if report["reachability"] != reachability || report["natType"] != nat_type {
            eprintln!("{label}: {:#}", report["explanation"]);
            let (node, _, _) = nodes.iter().find(|(node, _, _)| node.label == label).expect("node");
            for line in node._node.stderr().lines().filter(|l| l.contains("dial")) {
                eprintln!("{label} log: {line}");
            }
            for public in &publics {
                for line in public._node.stderr().lines().filter(|l| l.contains("dial-back")) {
                    eprintln!("{} log: {line}", public.label);
                }
            }
        }
        assert_eq!(report["natType"], nat_type, "{label}: {report:#}");
        assert_eq!(report["reachability"], reachability, "{label}: {report:#}");
        report.clone()
    };
    let eim = expect("eim", "NAT_TYPE_ENDPOINT_INDEPENDENT", "REACHABILITY_PRIVATE_PUNCHABLE");
    // The NAT drops our hairpin probe; a lost probe proves nothing (see prober), so no verdict is claimed.
    assert_eq!(eim["hairpin"], "HAIRPIN_SUPPORT_UNKNOWN", "{eim:#}");
    assert_eq!(eim["filtering"], "FILTERING_BEHAVIOR_ADDRESS_AND_PORT_DEPENDENT", "{eim:#}");
    assert_eq!(eim["portPreservation"], true, "MASQUERADE keeps the port: {eim:#}");
    let edm = expect("edm", "NAT_TYPE_ENDPOINT_DEPENDENT", "REACHABILITY_PRIVATE_HARD");
    assert_eq!(edm["portAllocation"], "unpredictable", "fully-random ports: {edm:#}");
    // Each new flow takes the next port: predictable, so punching can aim at the port the next flow will get.
    let seq = expect("seq", "NAT_TYPE_ENDPOINT_DEPENDENT", "REACHABILITY_PRIVATE_PUNCHABLE");
    assert_eq!(seq["portAllocation"], "sequential, delta 1", "{seq:#}");
    let cone = expect("cone", "NAT_TYPE_ENDPOINT_INDEPENDENT", "REACHABILITY_PUBLIC");
    assert_eq!(cone["filtering"], "FILTERING_BEHAVIOR_ENDPOINT_INDEPENDENT", "{cone:#}");
    expect("double", "NAT_TYPE_ENDPOINT_INDEPENDENT", "REACHABILITY_PRIVATE_PUNCHABLE");

    // `rnctl nat status` states it in words, with the evidence.
    let (eim_node, _, _) = &nodes[0];
    let out = eim_node.dir.rnctl(&["nat", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("endpoint-independent") && text.contains("address-and-port-dependent"), "{text}");
    let public_ip = eim_node.host.public_addr.expect("eim has a NAT").to_string();
    assert!(text.contains(&format!("{public_ip}:{QUIC_PORT}")), "the observed public address: {text}");
}

/// A node that gets a new interface address re-signs its record, and its peers hold the new record without
/// asking (the record is pushed), so they can reach it at the new address.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_interface_address_reaches_connected_peers() {
    if skip_without_root("a_new_interface_address_reaches_connected_peers", "it builds network namespaces") {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let public = LabNode::start("public", lab.public_host("public").expect("host"));
    let private = LabNode::start("private", lab.private_host("private", EIM).expect("host"));
    private.connect(&public);
    let private_id = json(&private.dir.rnctl(&["-o", "json", "node", "info"]))["node"]["nodeId"]
        .as_str()
        .expect("node id")
        .to_owned();
    let IpAddr::V4(first) = private.host.addr else { panic!("the lab is IPv4") };
    let octets = first.octets();
    let added = format!("{}.{}.{}.{}", octets[0], octets[1], octets[2], 200);
    let out = lab
        .command(&private.host, "ip")
        .args(["addr", "add", &format!("{added}/24"), "dev", "eth0"])
        .output();
    assert!(out.is_ok_and(|o| o.status.success()), "could not add {added} in the lab");

    let wanted = format!("{added}:{QUIC_PORT}");
    let stored_addresses = || {
        let out = public.dir.rnctl(&["-o", "json", "peers", "show", &private_id]);
        json(&out)["peer"]["addresses"].as_array().cloned().unwrap_or_default()
    };
    // The prober looks at the interfaces every few seconds; this only bounds a hang.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut addresses = stored_addresses();
    while !addresses.iter().any(|a| a["address"] == wanted.as_str()) && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        addresses = stored_addresses();
    }
    assert!(
        addresses.iter().any(|a| a["address"] == wanted.as_str()),
        "the public peer never learnt {wanted}: {addresses:#?}"
    );
}
