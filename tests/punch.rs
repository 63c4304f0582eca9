//! Every pair connects, between real daemons behind the kernel's own NATs (see `common::lab`): public nodes
//! serve as rendezvous and relays, private nodes behind endpoint-independent (EIM), endpoint-dependent with
//! random ports (EDM), endpoint-dependent with sequential ports (SEQ) and double NATs connect to each other by
//! node id (`rnctl connect ID`: stored addresses, then a punch introduced by a connected peer, then a relay
//! circuit). Directly wherever the NATs allow it: EIM pairs are punched, EIM × SEQ is punched at a predicted
//! port, EIM × EDM by the birthday strategy, EDM × EDM is relayed, end-to-end authenticated. Prints the matrix
//! of pairs with the path each got and the time to connected.
//! Needs root; skipped loudly without it (a failure in CI).

mod common;

use std::time::{Duration, Instant};

use common::lab::{Host, Lab, Nat, NatOptions};
use common::{NodeDir, TestNode, in_network_namespace, json, skip_without_root, stderr};

/// The QUIC port every lab node listens on (each in its own namespace).
const QUIC_PORT: u16 = 30906;

const EIM: NatOptions = NatOptions { nat: Nat::EndpointIndependent, hairpin: false };
const EDM: NatOptions = NatOptions { nat: Nat::EndpointDependent, hairpin: false };
const SEQ: NatOptions = NatOptions { nat: Nat::Sequential, hairpin: false };

struct LabNode {
    label: &'static str,
    host: Host,
    dir: NodeDir,
    id: String,
    node: TestNode,
}

impl LabNode {
    fn start(label: &'static str, host: Host) -> Self {
        Self::start_with(label, host, &[])
    }

    fn start_with(label: &'static str, host: Host, env: &[(&str, &str)]) -> Self {
        let dir =
            NodeDir::new().with_quic_listen(&format!("0.0.0.0:{QUIC_PORT}")).with_dht_listen("0.0.0.0:0");
        let mut cmd = dir.start_command();
        cmd.envs(env.iter().copied());
        cmd.env("RUST_LOG", "info,remote_network::exchange::punch=debug");
        let node = dir.spawn_ready(in_network_namespace(&cmd, &host.netns));
        let info = json(&dir.rnctl(&["-o", "json", "node", "info"]));
        let id = info["node"]["nodeId"].as_str().expect("node id").to_owned();
        Self { label, host, dir, id, node }
    }

    /// The address the world sees this node's QUIC socket at (its outermost NAT keeps the port).
    fn public_address(&self) -> String {
        format!("{}:{QUIC_PORT}", self.host.public_addr.unwrap_or(self.host.addr))
    }

    fn connect_address(&self, other: &LabNode) {
        let out =
            self.dir.rnctl(&["--timeout", "60", "connect", &format!("{}:{QUIC_PORT}", other.host.addr)]);
        assert!(out.status.success(), "{} → {}: {}", self.label, other.label, stderr(&out));
    }

    /// `rnctl connect ID`: returns whether it connected, and how long it took.
    fn connect_id(&self, other: &LabNode) -> (bool, Duration, String) {
        let started = Instant::now();
        let out = self.dir.rnctl(&["--timeout", "90", "connect", &other.id]);
        (out.status.success(), started.elapsed(), stderr(&out))
    }

    fn probe(&self) -> serde_json::Value {
        let out = self.dir.rnctl(&["--timeout", "120", "-o", "json", "nat", "probe"]);
        assert!(out.status.success(), "{}: {}", self.label, stderr(&out));
        json(&out)["report"].clone()
    }

    fn connection_to(&self, other: &LabNode) -> serde_json::Value {
        let out = self.dir.rnctl(&["-o", "json", "peers", "show", &other.id]);
        assert!(out.status.success(), "{}: peers show {}: {}", self.label, other.label, stderr(&out));
        json(&out)["peer"]["connection"].clone()
    }

    /// The connection to `other`, or `{}` while `other` is not even stored.
    fn connection_to_any(&self, other: &LabNode) -> serde_json::Value {
        let out = self.dir.rnctl(&["-o", "json", "peers", "show", &other.id]);
        if !out.status.success() {
            return serde_json::json!({});
        }
        json(&out)["peer"]["connection"].clone()
    }

    fn join(&self, topic: &str) {
        let out = self.dir.rnctl(&["topics", "join", topic]);
        assert!(out.status.success(), "{}: {}", self.label, stderr(&out));
    }

    fn nat_status(&self) -> serde_json::Value {
        let out = self.dir.rnctl(&["-o", "json", "nat", "status"]);
        assert!(out.status.success(), "{}: {}", self.label, stderr(&out));
        json(&out)["report"].clone()
    }
}

/// What one pair got.
struct PairResult {
    pair: String,
    connected: bool,
    path: String,
    remote: String,
    relay: String,
    elapsed: Duration,
}

/// Three public nodes that know each other and know they are public (each needs two others as witnesses of
/// its mapping). The third does not relay (`relay.enabled = false`).
fn start_publics(lab: &mut Lab) -> Vec<LabNode> {
    let mut publics = Vec::new();
    for label in ["rendezvous_a", "rendezvous_b", "rendezvous_c"] {
        let host = lab.public_host(label).expect("public host");
        lab.add_second_address(&host).expect("second address");
        let env: &[(&str, &str)] =
            if label == "rendezvous_c" { &[("RN_RELAY_ENABLED", "false")] } else { &[] };
        publics.push(LabNode::start_with(label, host, env));
    }
    for (i, node) in publics.iter().enumerate() {
        for other in publics.iter().skip(i + 1) {
            node.connect_address(other);
        }
    }
    for node in &publics {
        assert_eq!(node.probe()["reachability"], "REACHABILITY_PUBLIC", "{}", node.label);
    }
    publics
}

/// Private nodes behind the given NATs (`None`: EIM behind a carrier EIM), each connected to every public
/// node and done probing its NAT, so that its record names its rendezvous and it holds relay reservations.
fn start_privates(
    lab: &mut Lab,
    publics: &[LabNode],
    nats: &[(&'static str, Option<NatOptions>)],
) -> Vec<LabNode> {
    let privates: Vec<LabNode> = nats
        .iter()
        .map(|(label, nat)| {
            let host = match nat {
                Some(nat) => lab.private_host(label, *nat),
                None => lab.double_nat_host(label, EIM, EIM),
            };
            LabNode::start(label, host.expect("host"))
        })
        .collect();
    for node in &privates {
        for public in publics {
            node.connect_address(public);
        }
    }
    let reports: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let probes: Vec<_> = privates.iter().map(|node| scope.spawn(|| node.probe())).collect();
        probes.into_iter().map(|p| p.join().expect("probe thread")).collect()
    });
    for (node, report) in privates.iter().zip(&reports) {
        let expected = if node.label.starts_with("edm") {
            "REACHABILITY_PRIVATE_HARD"
        } else {
            "REACHABILITY_PRIVATE_PUNCHABLE"
        };
        assert_eq!(report["reachability"], expected, "{}: {report:#}", node.label);
    }
    privates
}

/// Nodes in a topic reach each other on their own: the private nodes only know the public ones, learn of each
/// other by peer exchange, and get punched or relayed connections without anyone asking.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_behind_nats_in_a_topic_connect_on_their_own() {
    if skip_without_root(
        "nodes_behind_nats_in_a_topic_connect_on_their_own",
        "it builds network namespaces and NATs",
    ) {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let publics = start_publics(&mut lab);
    for node in &publics {
        node.join("lab");
    }
    let privates = start_privates(
        &mut lab,
        &publics,
        &[("eim_1", Some(EIM)), ("eim_2", Some(EIM)), ("edm_1", Some(EDM))],
    );
    for node in &privates {
        node.join("lab");
    }
    // The EDM node is the hard side of two birthday punches at once: the second waits for the first's sockets.
    let expected = [
        ("eim_1", "eim_2", "CONNECTION_PATH_PUNCHED"),
        ("eim_1", "edm_1", "CONNECTION_PATH_PUNCHED"),
        ("eim_2", "edm_1", "CONNECTION_PATH_PUNCHED"),
    ];
    let by_label = |label: &str| privates.iter().find(|n| n.label == label).expect("node");
    // Peer exchange rounds, punches and circuits take a few seconds each; this only bounds a hang. A relayed
    // session counts once a punch has replaced it.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (a, b, path) in expected {
        let (a, b) = (by_label(a), by_label(b));
        let mut connection = a.connection_to_any(b);
        while (connection["connected"] != true || connection["path"] != path) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            connection = a.connection_to_any(b);
        }
        if connection["path"] != path {
            for node in [a, b] {
                for line in
                    node.node.stderr().lines().filter(|l| l.contains("punch") || l.contains("birthday"))
                {
                    eprintln!("{} log: {line}", node.label);
                }
            }
        }
        assert_eq!(
            connection["connected"], true,
            "{} and {} never connected: {connection:#}",
            a.label, b.label
        );
        assert_eq!(connection["path"], path, "{} × {}: {connection:#}", a.label, b.label);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pair_connects_directly_where_the_nats_allow_it() {
    if skip_without_root(
        "every_pair_connects_directly_where_the_nats_allow_it",
        "it builds network namespaces and NATs",
    ) {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let publics = start_publics(&mut lab);
    let privates = start_privates(
        &mut lab,
        &publics,
        &[
            ("eim_1", Some(EIM)),
            ("eim_2", Some(EIM)),
            ("double", None),
            ("seq_1", Some(SEQ)),
            ("edm_1", Some(EDM)),
            ("edm_2", Some(EDM)),
        ],
    );
    let by_label = |label: &str| privates.iter().find(|n| n.label == label).expect("node");

    // A direct dial to a private node's public mapping is filtered by its NAT: the punch below is needed.
    let (eim_1, eim_2) = (by_label("eim_1"), by_label("eim_2"));
    let direct = eim_1.dir.rnctl(&["--timeout", "60", "connect", &eim_2.public_address()]);
    assert!(
        !direct.status.success(),
        "eim_2's NAT let an unsolicited dial in: the lab is not what it claims"
    );

    let mut results = Vec::new();
    let pairs =
        [("eim_1", "eim_2"), ("double", "eim_1"), ("eim_2", "seq_1"), ("eim_1", "edm_1"), ("edm_1", "edm_2")];
    for (from, to) in pairs {
        let (a, b) = (by_label(from), by_label(to));
        let (connected, elapsed, error) = a.connect_id(b);
        let (path, remote, relay) = if connected {
            let connection = a.connection_to(b);
            (
                connection["path"].as_str().unwrap_or("?").to_owned(),
                connection["remoteAddress"].as_str().unwrap_or("?").to_owned(),
                connection["relay"].as_str().unwrap_or("").to_owned(),
            )
        } else {
            ("not connected".to_owned(), error.lines().last().unwrap_or("").to_owned(), String::new())
        };
        results.push(PairResult { pair: format!("{from} × {to}"), connected, path, remote, relay, elapsed });
    }
    // A punch that is slower than the relay fallback (2 s) replaces the relayed session when it succeeds; the
    // matrix shows the path a pair ends up with, and when it got there.
    for r in results.iter_mut().filter(|r| r.connected && r.path == "CONNECTION_PATH_RELAYED") {
        let (from, to) = r.pair.split_once(" × ").expect("pair");
        let (a, b) = (by_label(from), by_label(to));
        let waiting = Instant::now();
        let deadline = waiting + Duration::from_secs(15);
        let mut connection = a.connection_to(b);
        while connection["path"] != "CONNECTION_PATH_PUNCHED" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            connection = a.connection_to(b);
        }
        if connection["path"] == "CONNECTION_PATH_PUNCHED" {
            r.path = "CONNECTION_PATH_PUNCHED (after relayed)".into();
            r.remote = connection["remoteAddress"].as_str().unwrap_or("?").to_owned();
            r.relay = String::new();
            r.elapsed += waiting.elapsed();
        }
    }
    // A private node dials a public one: direct, no punch.
    let (connected, elapsed, _) = eim_2.connect_id(&publics[1]);
    let connection = eim_2.connection_to(&publics[1]);
    results.push(PairResult {
        pair: "eim_2 × rendezvous_b (public)".into(),
        connected,
        path: connection["path"].as_str().unwrap_or("?").to_owned(),
        remote: connection["remoteAddress"].as_str().unwrap_or("?").to_owned(),
        relay: String::new(),
        elapsed,
    });

    let relay_label = |id: &str| publics.iter().find(|p| p.id == id).map_or("", |p| p.label);
    println!("\n{:<32} {:<26} {:<22} {:<14} time to connected", "pair", "path", "remote", "relay");
    for r in &results {
        println!(
            "{:<32} {:<26} {:<22} {:<14} {:.0} ms",
            r.pair,
            r.path,
            r.remote,
            relay_label(&r.relay),
            r.elapsed.as_secs_f64() * 1000.0
        );
    }

    let result = |pair: &str| results.iter().find(|r| r.pair.starts_with(pair)).expect("pair");
    let dump_punch_logs = || {
        for node in &privates {
            for line in node.node.stderr().lines().filter(|l| l.contains("punch") || l.contains("predicted"))
            {
                eprintln!("{} log: {line}", node.label);
            }
        }
    };
    for (pair, target) in [("eim_1 × eim_2", eim_2), ("double × eim_1", eim_1)] {
        let r = result(pair);
        if !r.connected || r.path != "CONNECTION_PATH_PUNCHED" {
            dump_punch_logs();
        }
        assert!(r.connected, "{pair}: {}", r.remote);
        assert_eq!(r.path, "CONNECTION_PATH_PUNCHED", "{pair}");
        assert_eq!(
            r.remote,
            target.public_address(),
            "{pair}: connected to the NAT mapping, not via a relay"
        );
    }
    // Sequential ports: the EIM side reached a port the SEQ node predicted (its NAT's next one), not the one
    // its QUIC socket has towards anyone else; the EDM side: a port one of its 256 birthday sockets got.
    for (pair, target) in [("eim_2 × seq_1", by_label("seq_1")), ("eim_1 × edm_1", by_label("edm_1"))] {
        let r = result(pair);
        if !r.path.starts_with("CONNECTION_PATH_PUNCHED") {
            dump_punch_logs();
        }
        assert!(r.connected, "{pair}: {}", r.remote);
        assert!(r.path.starts_with("CONNECTION_PATH_PUNCHED"), "{pair}: {}", r.path);
        let public_ip = target.host.public_addr.expect("behind a NAT").to_string();
        assert!(r.remote.starts_with(&format!("{public_ip}:")), "{pair}: reached at {}", r.remote);
        assert_ne!(r.remote, target.public_address(), "{pair}: a new mapping, not the QUIC socket's own");
    }
    // The birthday punch's budget and outcome are on record at both ends, by NAT pair.
    let birthday_record = |node: &LabNode| {
        let punches = node.nat_status()["punches"].clone();
        punches
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["lastOutcome"].as_str().map(str::to_owned))
            .find(|outcome| outcome.contains("birthday"))
    };
    let easy = birthday_record(eim_1).expect("eim_1 records its birthday punch");
    assert!(easy.contains("easy side") && easy.contains("probes sent"), "{easy}");
    let hard = birthday_record(by_label("edm_1")).expect("edm_1 records its birthday punch");
    assert!(hard.contains("hard side: 256 sockets opened"), "{hard}");
    // The target side knows it was punched too, and both count the success by NAT pair.
    assert_eq!(eim_2.connection_to(eim_1)["path"], "CONNECTION_PATH_PUNCHED");
    for node in [eim_1, eim_2] {
        let punches = node.nat_status()["punches"].clone();
        let eim_pair = punches
            .as_array()
            .and_then(|list| {
                list.iter().find(|p| {
                    p["ourNat"] == "NAT_TYPE_ENDPOINT_INDEPENDENT"
                        && p["theirNat"] == "NAT_TYPE_ENDPOINT_INDEPENDENT"
                })
            })
            .cloned()
            .unwrap_or_else(|| panic!("{}: no EIM × EIM punch stats in {punches:#}", node.label));
        assert!(eim_pair["successes"].as_str().unwrap_or("0") != "0", "{}: {eim_pair:#}", node.label);
    }
    // Both endpoint-dependent with random ports: nothing to aim at, so the punch fails and a relay carries the
    // connection: still end to end, since `rnctl connect ID` pins the node id the inner TLS handshake must prove.
    let (pair, edm_1, edm_2) = ("edm_1 × edm_2", by_label("edm_1"), by_label("edm_2"));
    let r = result(pair);
    assert!(r.connected, "{pair}: {}", r.remote);
    assert_eq!(r.path, "CONNECTION_PATH_RELAYED", "{pair}");
    assert!(
        !relay_label(&r.relay).is_empty(),
        "{pair}: relayed by {:?}, not one of the public nodes",
        r.relay
    );
    assert_ne!(
        relay_label(&r.relay),
        "rendezvous_c",
        "{pair}: relayed by the node with relay.enabled = false"
    );
    assert_eq!(edm_1.connection_to(edm_2)["path"], "CONNECTION_PATH_RELAYED", "{pair}");
    // The target verified the initiator's identity through the circuit too.
    let back = edm_2.connection_to(edm_1);
    assert_eq!(back["connected"], true, "{pair}: {back:#}");
    let edm_status = edm_1.nat_status();
    let relays: Vec<&str> = edm_status["relays"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(relays.len(), 2, "edm_1 holds a reservation at each public node that relays: {edm_status:#}");
    assert!(
        !relays.contains(&publics[2].id.as_str()),
        "rendezvous_c refused the reservation: {edm_status:#}"
    );
    // The punch kept trying beside the relay; once its window is over, its failure is on record.
    let failed_punch = |status: &serde_json::Value| {
        status["punches"].as_array().is_some_and(|list| {
            list.iter().any(|p| p["lastOutcome"].as_str().unwrap_or("").contains("no connection"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut edm_status = edm_status;
    while !failed_punch(&edm_status) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        edm_status = edm_1.nat_status();
    }
    assert!(failed_punch(&edm_status), "edm_1 records its failed punches: {edm_status:#}");
    // And the relayed sessions are still up after the punch gave up.
    assert_eq!(edm_1.connection_to(edm_2)["path"], "CONNECTION_PATH_RELAYED");
}
