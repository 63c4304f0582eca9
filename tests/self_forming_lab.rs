//! Networks form on their own, between real daemons behind the kernel's own NATs (see `common::lab`): each node
//! is given only what a user gives it, a bootstrap address (the seed's DHT address; the seed itself serves the
//! DHT with `--dht-server --no-bootstrap`) and a topic (`rnctl topics join`). Nobody runs `rnctl connect`, no
//! public node is added for the test's sake, and no flag or variable changes behaviour (only `RUST_LOG`, for
//! the record). The tests only watch `rnctl peers list` / `rnctl peers show` until the network is what the
//! NATs allow:
//! - one public seed and three nodes behind endpoint-independent NATs (one of them behind a double NAT): every
//!   pair verified and connected, the private pairs straight to each other's NAT mapping (hole-punched, see
//!   [`NAT_TO_NAT`]) and none relayed at the end;
//! - one public seed, one endpoint-independent and two random-port endpoint-dependent nodes: every pair
//!   connected, EIM × EDM hole-punched (the birthday strategy), EDM × EDM relayed by the seed;
//! - a warm start: two private nodes that punched to each other are stopped with their seed, and restarted
//!   alone with the same data dirs and command lines; they reconnect directly from what their stores hold.
//!
//! Timeouts only bound a hang; the time each pair took is printed for the record (`--nocapture`), never
//! asserted. Every daemon's full log is kept under cargo's test tmpdir (`target/tmp/self_forming_lab/`); on
//! failure the NAT status, topics and peers of each node are printed with the log lines about punches and relays.
//! Needs root; skipped loudly without it (a failure in CI).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::{Host, Lab, Nat, NatOptions};
use common::{NodeDir, TestNode, in_network_namespace, json, skip_without_root, stderr};

/// The defaults of `quic.listen` and `dht.listen`: what a user who sets nothing gets (each node has a
/// namespace, hence ports, of its own).
const QUIC_LISTEN: &str = "0.0.0.0:30906";
const DHT_LISTEN: &str = "0.0.0.0:30609";
const QUIC_PORT: u16 = 30906;
const DHT_PORT: u16 = 30609;
const TOPIC: &str = "self-forming";
/// Logging only: what the daemons tried is on record when a case fails.
const LOG: &str = "info,remote_network::exchange=debug,remote_network::nat=debug,remote_network::dht=debug";
/// Bounds a hang: discovery rounds, NAT probes, punches and relay circuits take seconds each.
const FORMING_TIMEOUT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(500);

const EIM: NatOptions = NatOptions { nat: Nat::EndpointIndependent, hairpin: false };
const EDM: NatOptions = NatOptions { nat: Nat::EndpointDependent, hairpin: false };

const DIRECT: &str = "CONNECTION_PATH_DIRECT";
const PUNCHED: &str = "CONNECTION_PATH_PUNCHED";
const RELAYED: &str = "CONNECTION_PATH_RELAYED";

/// The paths a pair may end with.
type Paths = &'static [&'static str];
/// To the public seed, straight to its own address: a plain dial, or a punch when the node learnt the seed by
/// peer exchange (its verdict is undecided with no second public witness) before its own dial got through,
/// which happens on a loaded machine. Never through a relay.
const DIALED: Paths = &[DIRECT, PUNCHED];
/// Between two nodes behind NATs, straight to each other's NAT mapping. The daemon calls it "punched" when its
/// punch through a rendezvous made it, and "direct" when both sides' own dials (each found the other's
/// mapping in the DHT at about the same time) met in the NATs first; either way both NATs let the other in
/// only because each side sent out first (a hole punch), and no relay carries it.
const NAT_TO_NAT: Paths = &[PUNCHED, DIRECT];
/// Through a relay circuit.
const RELAY: Paths = &[RELAYED];

fn on_path(connection: &serde_json::Value, paths: Paths) -> bool {
    paths.iter().any(|path| connection["path"] == *path)
}

fn short(paths: Paths) -> String {
    paths.iter().map(|p| p.trim_start_matches("CONNECTION_PATH_")).collect::<Vec<_>>().join("|")
}

/// One daemon of a lab, which may be stopped and started again with the same directory and command line.
struct LabNode {
    label: &'static str,
    host: Host,
    dir: NodeDir,
    id: String,
    daemon: Option<TestNode>,
    /// Logs of earlier runs of this node (before a restart).
    earlier_logs: String,
}

impl LabNode {
    /// The seed: serves the DHT from the start and bootstraps from nobody.
    fn seed(label: &'static str, host: Host) -> Self {
        Self::start(label, host, NodeDir::new().dht_server())
    }

    /// A node given only the seed's DHT address.
    fn joining(label: &'static str, host: Host, bootstrap: &str) -> Self {
        Self::start(label, host, NodeDir::new().with_bootstrap(bootstrap))
    }

    fn start(label: &'static str, host: Host, dir: NodeDir) -> Self {
        let dir = dir.with_quic_listen(QUIC_LISTEN).with_dht_listen(DHT_LISTEN);
        let mut node =
            Self { label, host, dir, id: String::new(), daemon: None, earlier_logs: String::new() };
        node.daemon = Some(node.dir.spawn_ready(node.command()));
        let info = json(&node.rnctl(&["-o", "json", "node", "info"]));
        node.id = info["node"]["nodeId"].as_str().expect("node id").to_owned();
        node
    }

    /// The same command line every time: the daemon's `start` in this node's namespace.
    fn command(&self) -> Command {
        let mut cmd = self.dir.start_command();
        cmd.env("RUST_LOG", LOG);
        in_network_namespace(&cmd, &self.host.netns)
    }

    /// SIGTERM, and waits for the exit; keeps the log.
    fn stop(&mut self) {
        let daemon = self.daemon.take().expect("running");
        let (status, log) = daemon.terminate();
        assert!(status.success(), "{} exited with {status} after SIGTERM; its log:\n{log}", self.label);
        self.earlier_logs.push_str(&log);
        self.earlier_logs.push_str("\n---- stopped; restarted below ----\n");
    }

    fn rnctl(&self, args: &[&str]) -> std::process::Output {
        self.dir.rnctl(args)
    }

    fn join(&self, topic: &str) {
        let out = self.rnctl(&["topics", "join", topic]);
        assert!(out.status.success(), "{}: topics join: {}", self.label, stderr(&out));
    }

    /// Where the world reaches this node's QUIC socket (its outermost NAT keeps the port).
    fn public_address(&self) -> String {
        format!("{}:{QUIC_PORT}", self.host.public_addr.unwrap_or(self.host.addr))
    }

    /// The connection to `other` as `peers show` reports it; `{}` while `other` is not even stored.
    fn connection_to(&self, other: &LabNode) -> serde_json::Value {
        let out = self.rnctl(&["-o", "json", "peers", "show", &other.id]);
        if !out.status.success() {
            return serde_json::json!({});
        }
        json(&out)["peer"]["connection"].clone()
    }

    /// Node ids in `peers list` with a verified record (seq > 0; proto3 JSON leaves a 0 out).
    fn verified_peers(&self) -> Vec<String> {
        let out = self.rnctl(&["-o", "json", "peers", "list"]);
        if !out.status.success() {
            return Vec::new();
        }
        json(&out)["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["seq"].as_str().is_some_and(|seq| seq != "0"))
            .filter_map(|p| p["nodeId"].as_str().map(str::to_owned))
            .collect()
    }

    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.rnctl(&all);
        if out.status.success() { json(&out) } else { serde_json::json!({ "rnctl failed": stderr(&out) }) }
    }

    fn nat_status(&self) -> serde_json::Value {
        self.cli_json(&["nat", "status"])["report"].clone()
    }

    fn logs(&self) -> String {
        let current = self.daemon.as_ref().map(TestNode::stderr).unwrap_or_default();
        format!("{}{current}", self.earlier_logs)
    }

    /// One line: reachability, mapping, filtering, NAT type.
    fn nat_summary(&self) -> String {
        let report = self.nat_status();
        let field = |key: &str| report[key].as_str().unwrap_or("-").to_owned();
        format!(
            "{} ({}): {} mapping {} filtering {} nat {}",
            self.label,
            self.public_address(),
            field("reachability"),
            field("mapping"),
            field("filtering"),
            field("natType")
        )
    }
}

/// What a pair must end with, and when it got there.
struct Pair {
    a: usize,
    b: usize,
    want: Paths,
    /// Since the last topic join: first time both ends held a connection (any path).
    connected_at: Option<Duration>,
    /// First time both ends showed the expected path.
    settled_at: Option<Duration>,
    last: (serde_json::Value, serde_json::Value),
}

/// The labs' nodes, with what each case expects of every pair.
struct Network {
    name: &'static str,
    nodes: Vec<LabNode>,
    pairs: Vec<Pair>,
}

impl Network {
    fn new(name: &'static str, nodes: Vec<LabNode>) -> Self {
        Self { name, nodes, pairs: Vec::new() }
    }

    fn index(&self, label: &str) -> usize {
        self.nodes.iter().position(|n| n.label == label).unwrap_or_else(|| panic!("no node {label}"))
    }

    fn node(&self, label: &str) -> &LabNode {
        &self.nodes[self.index(label)]
    }

    fn expect(&mut self, a: &str, b: &str, want: Paths) {
        let (a, b) = (self.index(a), self.index(b));
        self.pairs.push(Pair {
            a,
            b,
            want,
            connected_at: None,
            settled_at: None,
            last: (serde_json::json!({}), serde_json::json!({})),
        });
    }

    /// Every pair of nodes, each expecting a direct connection when one of them is `public`, else `private`.
    fn expect_all(&mut self, public: &[&str], private: impl Fn(&str, &str) -> Paths) {
        let labels: Vec<&'static str> = self.nodes.iter().map(|n| n.label).collect();
        for (i, a) in labels.iter().enumerate() {
            for b in &labels[i + 1..] {
                let want = if public.contains(a) || public.contains(b) { DIALED } else { private(a, b) };
                self.expect(a, b, want);
            }
        }
    }

    fn join_all(&self) -> Instant {
        for node in &self.nodes {
            node.join(TOPIC);
        }
        Instant::now()
    }

    /// Polls until, in one round, every pair is connected at both ends with its expected path and every node
    /// lists every other as verified; returns whether that happened before the timeout.
    fn wait_formed(&mut self, since: Instant, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for pair in &mut self.pairs {
                let (a, b) = (&self.nodes[pair.a], &self.nodes[pair.b]);
                let there = a.connection_to(b);
                let back = b.connection_to(a);
                let connected = there["connected"] == true && back["connected"] == true;
                if connected && pair.connected_at.is_none() {
                    pair.connected_at = Some(since.elapsed());
                }
                let settled = connected && on_path(&there, pair.want) && on_path(&back, pair.want);
                if settled && pair.settled_at.is_none() {
                    pair.settled_at = Some(since.elapsed());
                }
                all &= settled;
                pair.last = (there, back);
            }
            if all {
                let listed = self.nodes.iter().all(|node| {
                    let verified = node.verified_peers();
                    self.nodes.iter().filter(|o| o.id != node.id).all(|o| verified.contains(&o.id))
                });
                if listed {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// The pairs with their paths and times, and each node's NAT verdict, printed at once (tests run in
    /// parallel).
    fn report(&self, times: &str) {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "\n[{}] pairs (times since {times})", self.name);
        let _ = writeln!(
            out,
            "{:<18} {:<16} {:<16} {:<22} {:<10} {:<10} expected",
            "pair", "path a→b", "path b→a", "remote (a→b)", "connected", "settled"
        );
        let secs =
            |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
        let path = |c: &serde_json::Value| {
            let p = c["path"].as_str().unwrap_or(if c["connected"] == true { "?" } else { "not connected" });
            p.trim_start_matches("CONNECTION_PATH_").to_owned()
        };
        for pair in &self.pairs {
            let (a, b) = (&self.nodes[pair.a], &self.nodes[pair.b]);
            let _ = writeln!(
                out,
                "{:<18} {:<16} {:<16} {:<22} {:<10} {:<10} {}",
                format!("{} × {}", a.label, b.label),
                path(&pair.last.0),
                path(&pair.last.1),
                pair.last.0["remoteAddress"].as_str().unwrap_or("-"),
                secs(pair.connected_at),
                secs(pair.settled_at),
                short(pair.want),
            );
        }
        let _ = writeln!(out, "[{}] NAT verdicts", self.name);
        for node in self.nodes.iter().filter(|n| n.daemon.is_some()) {
            let _ = writeln!(out, "  {}", node.nat_summary());
        }
        print!("{out}");
    }

    /// Writes every node's full log so far to `<cargo test tmpdir>/self_forming_lab/<case>/<node>.log`, for the
    /// record whether the case passed or not; returns the directory.
    fn keep_logs(&self) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("self_forming_lab").join(self.name);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        for node in &self.nodes {
            let _ = std::fs::write(dir.join(format!("{}.log", node.label)), node.logs());
        }
        dir
    }

    /// Everything that explains a failure, printed at once (parallel tests interleave otherwise): each node's
    /// NAT status, topics and peers, the log lines about discovery, punches and relays; the full logs and
    /// statuses are kept on disk.
    fn diagnose(&self) {
        use std::fmt::Write as _;
        let dir = self.keep_logs();
        let mut out = String::new();
        let label_of = |id: &str| self.nodes.iter().find(|n| n.id == id).map_or("?", |n| n.label);
        for node in &self.nodes {
            let _ = writeln!(
                out,
                "\n===== [{}] {} ({}, id {}) =====",
                self.name,
                node.label,
                node.public_address(),
                &node.id[..16]
            );
            let logs = node.logs();
            if node.daemon.is_some() {
                let nat = node.nat_status();
                let _ = std::fs::write(dir.join(format!("{}.nat.json", node.label)), format!("{nat:#}"));
                let _ = writeln!(out, "{}", node.nat_summary());
                for line in nat["explanation"].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "  nat: {}", line.as_str().unwrap_or(""));
                }
                for observed in nat["observed"].as_array().into_iter().flatten() {
                    let _ =
                        writeln!(out, "  observed {} ×{}", observed["address"], observed["confirmations"]);
                }
                let relays: Vec<&str> = nat["relays"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str())
                    .map(label_of)
                    .collect();
                let _ = writeln!(out, "  relays held: {relays:?}");
                for punch in nat["punches"].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "  punches: {punch}");
                }
                let topics = node.cli_json(&["topics", "list"]);
                for topic in topics["topics"].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "  topic: {topic}");
                }
                let peers = node.cli_json(&["peers", "list"]);
                for peer in peers["peers"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        out,
                        "  peer {}: seq {} type {} nat {}",
                        label_of(peer["nodeId"].as_str().unwrap_or("")),
                        peer["seq"].as_str().unwrap_or("0"),
                        peer["nodeType"].as_str().unwrap_or("-"),
                        peer["natType"].as_str().unwrap_or("-")
                    );
                }
            }
            let keywords =
                ["punch", "relay", "birthday", "rendezvous", "classified", "strategy", "WARN", "ERROR"];
            let lines: Vec<&str> = logs.lines().filter(|l| keywords.iter().any(|k| l.contains(k))).collect();
            for line in &lines[lines.len().saturating_sub(60)..] {
                let _ = writeln!(out, "{} log: {line}", node.label);
            }
        }
        let _ = writeln!(out, "\nfull logs of [{}] kept in {}", self.name, dir.display());
        let _ = std::fs::write(dir.join("diagnosis.txt"), &out);
        eprint!("{out}");
    }

    /// Asserts the outcome of [`Network::wait_formed`], with the diagnosis first when it failed.
    /// Every node joins the topic; waits until every pair is on its expected path, and fails if not.
    fn form(&mut self) {
        let joined = self.join_all();
        let formed = self.wait_formed(joined, FORMING_TIMEOUT);
        self.assert_formed(formed);
    }

    fn assert_formed(&self, formed: bool) {
        self.report("the last `topics join`");
        if formed {
            self.keep_logs();
            return;
        }
        self.diagnose();
        let mut failures = Vec::new();
        for pair in &self.pairs {
            let (a, b) = (&self.nodes[pair.a], &self.nodes[pair.b]);
            if pair.last.0["connected"] != true || pair.last.1["connected"] != true {
                failures.push(format!("{} × {} not connected at both ends", a.label, b.label));
            } else if !on_path(&pair.last.0, pair.want) || !on_path(&pair.last.1, pair.want) {
                failures.push(format!(
                    "{} × {}: paths {} / {}, expected {}",
                    a.label,
                    b.label,
                    pair.last.0["path"],
                    pair.last.1["path"],
                    short(pair.want)
                ));
            }
        }
        for node in &self.nodes {
            let verified = node.verified_peers();
            for other in self.nodes.iter().filter(|o| o.id != node.id && !verified.contains(&o.id)) {
                failures.push(format!("{} does not list {} as verified", node.label, other.label));
            }
        }
        panic!(
            "[{}] the network did not form within {FORMING_TIMEOUT:?}:\n  {}",
            self.name,
            failures.join("\n  ")
        );
    }
}

fn skip(test: &str) -> bool {
    skip_without_root(test, "it builds network namespaces and NATs")
}

/// The seed's DHT address: the one thing every other node is given.
fn seed_bootstrap(seed: &Host) -> String {
    format!("{}:{DHT_PORT}", seed.addr)
}

/// A network of the public `seed` and the `private` hosts, each of which is given only the seed's DHT address.
fn seeded(name: &'static str, seed: Host, private: Vec<(&'static str, Host)>) -> Network {
    let bootstrap = seed_bootstrap(&seed);
    let mut nodes = vec![LabNode::seed("seed", seed)];
    nodes.extend(private.into_iter().map(|(label, host)| LabNode::joining(label, host, &bootstrap)));
    Network::new(name, nodes)
}

/// Case b: a seed and three nodes behind endpoint-independent NATs, one of them behind a double NAT (home EIM
/// behind a carrier EIM). Every node finds the others through the seed's DHT and peer exchange; the private
/// nodes reach each other's NAT mappings, by dials that cross in the NATs or by a punch through the seed as
/// rendezvous, and end with no relayed session.
#[test]
fn eim_nodes_and_one_seed_form_a_punched_network() {
    if skip("eim_nodes_and_one_seed_form_a_punched_network") {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let seed_host = lab.public_host("seed").expect("public host");
    let eim_1 = lab.private_host("eim_1", EIM).expect("host");
    let eim_2 = lab.private_host("eim_2", EIM).expect("host");
    let double = lab.double_nat_host("double", EIM, EIM).expect("host");

    let mut net = seeded("b_eim", seed_host, vec![("eim_1", eim_1), ("eim_2", eim_2), ("double", double)]);
    net.expect_all(&["seed"], |_, _| NAT_TO_NAT);
    net.form();
    // Punched to the NAT mappings themselves (the port kept by every EIM NAT), not through a relay.
    for pair in net.pairs.iter().filter(|p| p.want == NAT_TO_NAT) {
        let (a, b) = (&net.nodes[pair.a], &net.nodes[pair.b]);
        assert_eq!(pair.last.0["remoteAddress"], b.public_address(), "{} × {}", a.label, b.label);
        assert_eq!(pair.last.1["remoteAddress"], a.public_address(), "{} × {}", b.label, a.label);
    }
}

/// Case c: a seed, one endpoint-independent node and two random-port endpoint-dependent nodes. EIM × EDM is
/// punched by the birthday strategy and EDM × EDM relayed (by the seed, the only public node).
///
/// With a single public witness, the classifier cannot vote for an address (it needs reports from two
/// destination IPs). What decides the EDM nodes' verdicts is the mapping towards a second port of the seed:
/// each node pings the seed's DHT socket (the port its record names) from its QUIC socket, and the address in
/// the reply differs from the one the seed reports on the QUIC connection. The EIM node's mapping stays
/// undecided (two ports that agree cannot tell endpoint-independent from address-dependent mapping), and an
/// undecided mapping may be a single one: the EDM side opens its birthday mappings towards it. The seed has
/// one address; the lab adds no second one.
#[test]
fn eim_and_edm_nodes_and_one_seed_form_a_network() {
    if skip("eim_and_edm_nodes_and_one_seed_form_a_network") {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let seed_host = lab.public_host("seed").expect("public host");
    let eim = lab.private_host("eim", EIM).expect("host");
    let edm_1 = lab.private_host("edm_1", EDM).expect("host");
    let edm_2 = lab.private_host("edm_2", EDM).expect("host");

    let mut net = seeded("c_eim_edm", seed_host, vec![("eim", eim), ("edm_1", edm_1), ("edm_2", edm_2)]);
    net.expect_all(
        &["seed"],
        |a, b| if a.starts_with("edm") && b.starts_with("edm") { RELAY } else { NAT_TO_NAT },
    );
    net.form();
    let seed_id = net.node("seed").id.clone();
    for pair in &net.pairs {
        let (a, b) = (&net.nodes[pair.a], &net.nodes[pair.b]);
        if pair.want == RELAY {
            assert_eq!(
                pair.last.0["relay"],
                seed_id.as_str(),
                "{} × {}: relayed by the seed",
                a.label,
                b.label
            );
        } else if pair.want == NAT_TO_NAT {
            // The birthday strategy reaches the EDM node at a port one of its extra sockets got, on its IP.
            let edm = if a.label.starts_with("edm") { a } else { b };
            let remote = if edm.id == b.id { &pair.last.0 } else { &pair.last.1 };
            let ip = edm.host.public_addr.expect("behind a NAT").to_string();
            let remote = remote["remoteAddress"].as_str().unwrap_or("");
            assert!(
                remote.starts_with(&format!("{ip}:")),
                "{} × {}: {} reached at {remote}",
                a.label,
                b.label,
                edm.label
            );
        }
    }
}

/// Case d2: a warm start. Two nodes behind endpoint-independent NATs punch to each other through their seed;
/// then all three stop. Only the two private nodes start again, with the same data dirs and command lines: the
/// seed, their only bootstrap, is gone, so nothing but their stores can bring them together. The NATs' flows
/// are flushed before the restart (as if the restart came after they timed out), so the old mappings cannot
/// let the first packet in: each daemon dials the other's last known public address at start, both at about
/// the same time, which is itself a hole punch. Both must end connected to each other's NAT mapping.
#[test]
fn punched_nodes_reconnect_directly_after_a_restart_without_their_seed() {
    if skip("punched_nodes_reconnect_directly_after_a_restart_without_their_seed") {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let seed_host = lab.public_host("seed").expect("public host");
    let eim_1 = lab.private_host("eim_1", EIM).expect("host");
    let eim_2 = lab.private_host("eim_2", EIM).expect("host");

    let mut net = seeded("d2_warm_start", seed_host, vec![("eim_1", eim_1), ("eim_2", eim_2)]);
    net.expect("eim_1", "eim_2", NAT_TO_NAT);
    net.form();

    for node in &mut net.nodes {
        node.stop();
    }
    for label in ["eim_1", "eim_2"] {
        lab.flush_conntrack(&net.node(label).host).expect("flush conntrack");
    }

    // Both start together, as after a power cut; each waits for its own readiness.
    let restarted = Instant::now();
    let (first, second) = (net.index("eim_1"), net.index("eim_2"));
    let daemons: BTreeMap<usize, TestNode> = std::thread::scope(|scope| {
        let nodes = &net.nodes;
        let spawns: Vec<_> = [first, second]
            .into_iter()
            .map(|i| scope.spawn(move || (i, nodes[i].dir.spawn_ready(nodes[i].command()))))
            .collect();
        spawns.into_iter().map(|s| s.join().expect("start thread")).collect()
    });
    for (i, daemon) in daemons {
        net.nodes[i].daemon = Some(daemon);
    }
    net.name = "d2_warm_start_restarted";
    net.pairs.clear();
    net.expect("eim_1", "eim_2", NAT_TO_NAT);
    // A restart dial is direct; should the daemons route it through their punch machinery, it is punched:
    // either is a direct path to the NAT mapping, never a relay (there is no relay left).
    let deadline = restarted + FORMING_TIMEOUT;
    let (a, b) = (&net.nodes[first], &net.nodes[second]);
    let mut first_seen = None;
    let (there, back) = loop {
        let there = a.connection_to(b);
        let back = b.connection_to(a);
        let connected = there["connected"] == true && back["connected"] == true;
        if connected {
            first_seen.get_or_insert(restarted.elapsed());
        }
        let direct = |c: &serde_json::Value| on_path(c, NAT_TO_NAT);
        if (connected && direct(&there) && direct(&back)) || Instant::now() > deadline {
            break (there, back);
        }
        std::thread::sleep(POLL);
    };
    net.pairs[0].connected_at = first_seen;
    net.pairs[0].settled_at = first_seen;
    net.pairs[0].last = (there.clone(), back.clone());
    net.report("both restarts began");
    let ok = there["connected"] == true
        && back["connected"] == true
        && there["remoteAddress"] == b.public_address()
        && back["remoteAddress"] == a.public_address();
    if ok {
        net.keep_logs();
    } else {
        net.diagnose();
    }
    assert_eq!(there["connected"], true, "eim_1 did not reconnect to eim_2: {there:#}");
    assert_eq!(back["connected"], true, "eim_2 did not reconnect to eim_1: {back:#}");
    for (from, c) in [("eim_1", &there), ("eim_2", &back)] {
        assert!(on_path(c, NAT_TO_NAT), "{from}: not a direct path: {c:#}");
    }
    assert_eq!(there["remoteAddress"], b.public_address(), "eim_1 → eim_2 not at its NAT mapping: {there:#}");
    assert_eq!(back["remoteAddress"], a.public_address(), "eim_2 → eim_1 not at its NAT mapping: {back:#}");
}
