//! NAT lab: builds small IPv4 internets out of Linux network namespaces joined by veth links, with real
//! nftables NAT routers, so that the daemon's NAT features (observed addresses, classification, hole punching,
//! relays) are proven against the kernel's own NAT instead of a simulation.
//!
//! A [`Lab`] owns an "internet" namespace holding a bridge (`br0`) that every public host and every outermost
//! NAT router plugs into, and acts as the internet's only router (it owns 203.0.113.1 and 198.51.100.1, so the
//! two documentation ranges reach each other). Address plan:
//!
//! | what                                   | addresses                                          |
//! |----------------------------------------|----------------------------------------------------|
//! | internet router (bridge `br0`)         | 203.0.113.1/24, 198.51.100.1/24                    |
//! | public host k (k = 0, 1, …)            | 203.0.113.(10+k), second address 198.51.100.(10+k) |
//! | NAT router r on the internet           | outside 203.0.113.(100+r)                          |
//! | carrier (CGN) LAN c (c = 0, 1, …)      | 100.64.(1+c).0/24, carrier inside .1, homes .2 …   |
//! | home LAN n (n = 0, 1, …)               | 192.168.(1+n).0/24, router inside .1, hosts .2 …   |
//!
//! Every namespace is named `rnl<pid>-<lab>-<role>` (for example `rnl4242-0-alice-nat`), so parallel tests and
//! parallel test processes never collide. Interfaces are created directly inside their namespaces (`ip link add
//! … netns …`), so they can keep short fixed names (`eth0`, `wan`, `lan`, `br0`, `pN`) and nothing but the
//! namespace names themselves ever appears in the root namespace. The lab is IPv4-only: IPv6 is disabled in
//! every namespace so that no traffic can bypass the NATs over link-local addresses.
//!
//! A NAT router's ruleset (`Lab::ruleset`) is plain nftables: `masquerade` on the `wan` interface gives
//! endpoint-independent mapping with port preservation; `masquerade fully-random` gives endpoint-dependent
//! mapping with random ports, and `snat to …:numgen inc …` endpoint-dependent mapping with sequential ports. Filtering is conntrack's: only replies to a flow the inside opened come back (address-and-port
//! dependent). Everything else addressed to the router is dropped silently, as consumer routers do, and counted
//! ([`Lab::filtered_packets`]), which is how a test proves a packet was blocked without waiting "long enough".
//! Because the drop happens before conntrack confirms the flow, an unsolicited inbound packet leaves no trace:
//! it does not reserve the outside port and push the inside host's later outbound flow to another port, as it
//! would on a router that lets such packets reach its own (closed) port. Full cone and hairpin need what
//! conntrack does not keep, a table from outside port to inside endpoint: the router records each UDP mapping
//! in a dynamic nftables map as packets leave, and DNATs through that map.
//!
//! Tests run programs in a host with [`Lab::spawn`] or [`Lab::command`], and open sockets there directly with
//! [`Lab::udp_socket`] / [`Lab::in_netns`]. Dropping the [`Lab`] (also while unwinding from a panic) kills every
//! process in its namespaces and deletes them. Namespaces left behind by a test process that was killed
//! outright (and the processes still in them) are reaped by the next test process that builds a lab.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where `ip netns` keeps the namespaces it names.
const NETNS_DIR: &str = "/run/netns";
/// Start of every lab namespace name; followed by the owning test process's pid, which is how stale labs are
/// recognised.
const NAME_PREFIX: &str = "rnl";
/// How long a recorded mapping (full cone, hairpin) outlives the last packet that used it; conntrack's own
/// timeout for a UDP flow that saw replies.
const MAPPING_TIMEOUT: &str = "2m";
/// The ports a sequential NAT ([`Nat::Sequential`]) hands out, in turn, wrapping around (far more than a test
/// opens flows).
const SEQUENTIAL_FIRST_PORT: u32 = 20000;
const SEQUENTIAL_PORTS: u32 = 2048;

/// How a NAT router maps inside endpoints to outside ports, and whom it lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// One outside port per inside socket whatever the destination, the inside port kept when free; only the
    /// exact address and port the socket sent to may answer (port-restricted cone). Linux only keeps whole
    /// flows unique, so two hosts behind one router that bind the same inside port can end up sharing an
    /// outside port towards different destinations: give hosts sharing a router distinct ports.
    EndpointIndependent,
    /// A new random outside port for every destination (symmetric NAT); only that destination may answer.
    EndpointDependent,
    /// A new outside port for every destination, taken in turn from a counter the whole router shares (each
    /// new UDP flow gets the previous one's port plus one), as many carrier and older home NATs do; only
    /// that destination may answer.
    Sequential,
    /// Endpoint-independent mapping and filtering: once an inside socket has sent anything out, anyone may
    /// send to its outside port.
    FullCone,
}

/// A NAT router's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatOptions {
    pub nat: Nat,
    /// Whether hosts inside may reach each other through the router's outside address and their mapped
    /// ports.
    pub hairpin: bool,
}

/// A machine of the lab, in its own namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub netns: String,
    /// The address of its own interface (`eth0`).
    pub addr: IpAddr,
    /// The outside address of its outermost NAT; `None` for a public host.
    pub public_addr: Option<IpAddr>,
}

/// A NAT router of the lab, as tests may inspect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    pub name: String,
    pub netns: String,
    /// Its address on the LAN it serves (the hosts' or home routers' gateway).
    pub inside_addr: IpAddr,
    /// Its address on the network above it: the internet, or a carrier's LAN for a home router behind a
    /// carrier NAT.
    pub outside_addr: IpAddr,
    pub options: NatOptions,
}

/// Anything living in one of the lab's namespaces.
pub trait InNetns {
    fn netns_name(&self) -> &str;
}

impl InNetns for Host {
    fn netns_name(&self) -> &str {
        &self.netns
    }
}

impl InNetns for Router {
    fn netns_name(&self) -> &str {
        &self.netns
    }
}

/// What the lab remembers of a router beyond what [`Router`] shows.
struct RouterState {
    info: Router,
    /// The router whose LAN this router's `wan` is on; `None` when it is on the internet.
    upstream: Option<usize>,
    /// The first three octets of its LAN, a /24.
    lan: [u8; 3],
    /// Last octet the next machine attached to its LAN gets.
    next_lan_host: u8,
}

/// One test's network of namespaces; see the module documentation.
pub struct Lab {
    prefix: String,
    internet: String,
    /// Every namespace this lab created, in creation order.
    namespaces: Vec<String>,
    routers: Vec<RouterState>,
    /// Innermost router of each host, by namespace; `None` for public hosts.
    hosts: HashMap<String, Option<usize>>,
    /// Public hosts that already have their second address.
    second_addresses: HashSet<String>,
    next_public: u8,
    next_router: u8,
    next_home_lan: u8,
    next_carrier_lan: u8,
    /// Veth ends plugged into a bridge are named `p<N>`; unique in the lab, hence in each namespace.
    next_port: u32,
    /// Children started by [`Lab::spawn`], reaped on drop.
    children: Vec<u32>,
}

impl Lab {
    /// Creates the internet namespace with its bridge and router.
    pub fn new() -> io::Result<Lab> {
        static TOOLS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        TOOLS.get_or_init(check_tools).clone().map_err(io::Error::other)?;
        static REAPED: std::sync::Once = std::sync::Once::new();
        REAPED.call_once(reap_stale_labs);

        static NEXT_LAB: AtomicU32 = AtomicU32::new(0);
        let prefix =
            format!("{NAME_PREFIX}{}-{}", std::process::id(), NEXT_LAB.fetch_add(1, Ordering::Relaxed));
        let internet = format!("{prefix}-net");
        let mut lab = Lab {
            prefix,
            internet: internet.clone(),
            namespaces: Vec::new(),
            routers: Vec::new(),
            hosts: HashMap::new(),
            second_addresses: HashSet::new(),
            next_public: 0,
            next_router: 0,
            next_home_lan: 0,
            next_carrier_lan: 0,
            next_port: 0,
            children: Vec::new(),
        };
        // From here on `lab`'s Drop removes whatever was made, should a step fail.
        lab.add_namespace(&internet, true)?;
        ip_batch(
            &internet,
            &[
                "link add br0 type bridge".into(),
                "link set br0 up".into(),
                "addr add 203.0.113.1/24 dev br0".into(),
                "addr add 198.51.100.1/24 dev br0".into(),
            ],
        )?;
        Ok(lab)
    }

    /// This lab's namespace name prefix (`rnl<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every namespace the lab created so far.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A host on the internet at 203.0.113.(10+k).
    pub fn public_host(&mut self, name: &str) -> io::Result<Host> {
        let netns = self.node_name(name, "")?;
        let k = self.next_public;
        if k >= 90 {
            return Err(io::Error::other("the lab has no more public host addresses (203.0.113.10-99)"));
        }
        self.next_public += 1;
        let addr = Ipv4Addr::new(203, 0, 113, 10 + k);
        self.add_namespace(&netns, false)?;
        let internet = self.internet.clone();
        self.plug(&netns, "eth0", &internet, "br0")?;
        ip_batch(
            &netns,
            &[format!("addr add {addr}/24 dev eth0"), "route add default via 203.0.113.1".into()],
        )?;
        self.hosts.insert(netns.clone(), None);
        Ok(Host { name: name.to_owned(), netns, addr: addr.into(), public_addr: None })
    }

    /// Gives a public host a second address, 198.51.100.(10+k) for host 203.0.113.(10+k), so it can answer
    /// "from another address" (NAT behaviour discovery, dial-backs). Bind to it explicitly to send from it.
    pub fn add_second_address(&mut self, host: &Host) -> io::Result<IpAddr> {
        let IpAddr::V4(first) = host.addr else { unreachable!("the lab is IPv4-only") };
        if self.hosts.get(&host.netns) != Some(&None) || first.octets()[..3] != [203, 0, 113] {
            return Err(io::Error::other(format!("{} is not a public host of this lab", host.name)));
        }
        if !self.second_addresses.insert(host.netns.clone()) {
            return Err(io::Error::other(format!("{} already has a second address", host.name)));
        }
        let second = Ipv4Addr::new(198, 51, 100, first.octets()[3]);
        ip_batch(&host.netns, &[format!("addr add {second}/24 dev eth0")])?;
        Ok(second.into())
    }

    /// A host at 192.168.N.2 behind its own NAT router (inside 192.168.N.1, outside 203.0.113.x).
    pub fn private_host(&mut self, name: &str, options: NatOptions) -> io::Result<Host> {
        self.node_name(name, "")?;
        let router_ns = self.node_name(name, "-nat")?;
        let router = self.add_router(&router_ns, None, options, false)?;
        self.attach_host(name, router)
    }

    /// Another host on the LAN of `neighbour`'s innermost router (192.168.N.3, …): hairpin tests, or two peers
    /// behind one NAT.
    pub fn private_host_behind(&mut self, name: &str, neighbour: &Host) -> io::Result<Host> {
        let router = self.router_index(neighbour)?;
        self.attach_host(name, router)
    }

    /// A host behind two NATs: host (192.168.N.2) → home router (outside 100.64.C.2) → carrier NAT (inside
    /// 100.64.C.1, outside 203.0.113.x) → internet.
    pub fn double_nat_host(
        &mut self,
        name: &str,
        inner: NatOptions,
        carrier: NatOptions,
    ) -> io::Result<Host> {
        self.node_name(name, "")?;
        let carrier_ns = self.node_name(name, "-cgn")?;
        let carrier = self.add_router(&carrier_ns, None, carrier, true)?;
        let home_ns = self.node_name(name, "-home")?;
        let home = self.add_router(&home_ns, Some(carrier), inner, false)?;
        self.attach_host(name, home)
    }

    /// A host behind a new home router on the same carrier NAT as `neighbour` (100.64.C.3, …): two customers
    /// of one carrier, which only reach each other through the carrier's hairpin.
    pub fn double_nat_host_behind_carrier(
        &mut self,
        name: &str,
        inner: NatOptions,
        neighbour: &Host,
    ) -> io::Result<Host> {
        let carrier = self.outermost_router(neighbour)?;
        if self.routers[carrier].upstream.is_some() || self.routers[carrier].lan[0] != 100 {
            return Err(io::Error::other(format!("{} is not behind a carrier NAT", neighbour.name)));
        }
        self.node_name(name, "")?;
        let home_ns = self.node_name(name, "-home")?;
        let home = self.add_router(&home_ns, Some(carrier), inner, false)?;
        self.attach_host(name, home)
    }

    /// The NAT routers between `host` and the internet, innermost first; empty for a public host.
    pub fn routers_of(&self, host: &Host) -> io::Result<Vec<Router>> {
        let mut chain = Vec::new();
        let mut next = *self
            .hosts
            .get(&host.netns)
            .ok_or_else(|| io::Error::other(format!("{} is not a host of this lab", host.name)))?;
        while let Some(index) = next {
            chain.push(self.routers[index].info.clone());
            next = self.routers[index].upstream;
        }
        Ok(chain)
    }

    /// `ip netns exec NETNS program`: a command that runs inside `node`'s namespace. The program enters it
    /// only once `ip` runs, so a process spawned from this and not through [`Lab::spawn`] may escape the
    /// lab's cleanup if the lab is dropped within that instant.
    pub fn command(&self, node: &impl InNetns, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", node.netns_name()]).arg(program);
        cmd
    }

    /// Starts `cmd` inside `node`'s namespace (it enters the namespace between fork and exec, so `cmd` keeps its
    /// environment, directory and stdio; a command from [`Lab::command`] works too). The lab kills the process
    /// and reaps it when dropped; use the returned [`Child`] for its pid and pipes while the lab lives.
    pub fn spawn(&mut self, node: &impl InNetns, mut cmd: Command) -> io::Result<Child> {
        let netns = open_netns(node.netns_name())?;
        let fd = netns.as_raw_fd();
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on a descriptor that stays open
        // until spawn returns (`netns` outlives the call).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn()?;
        drop(netns);
        self.children.push(child.id());
        Ok(child)
    }

    /// Runs `f` on a thread that has entered `node`'s network namespace: sockets it creates live in that
    /// namespace for good, whichever thread uses them later (a std socket can then be handed to tokio).
    pub fn in_netns<T: Send>(
        &self,
        node: &impl InNetns,
        f: impl FnOnce() -> io::Result<T> + Send,
    ) -> io::Result<T> {
        in_netns(node.netns_name(), f)
    }

    /// A UDP socket bound to `addr` inside `node`'s namespace.
    pub fn udp_socket(&self, node: &impl InNetns, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.in_netns(node, || UdpSocket::bind(addr))
            .map_err(|e| io::Error::new(e.kind(), format!("bind {addr} in {}: {e}", node.netns_name())))
    }

    /// How many packets the NATs between `host` and the internet have dropped: inbound packets no mapping let
    /// in, and hairpin attempts on routers without hairpin. Lets a test wait for a packet it expects to be
    /// filtered, instead of waiting for a while and concluding it did not arrive.
    pub fn filtered_packets(&self, host: &Host) -> io::Result<u64> {
        let mut total = 0;
        for router in self.routers_of(host)? {
            let output =
                run(self.command(&router, "nft").args(["list", "counter", "ip", "lab", "filtered"]))?;
            let text = String::from_utf8_lossy(&output.stdout);
            let packets = text
                .split_whitespace()
                .skip_while(|word| *word != "packets")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| {
                    io::Error::other(format!("no packet count in {}'s counter:\n{text}", router.name))
                })?;
            total += packets;
        }
        Ok(total)
    }

    /// Waits until the NATs of `host` have dropped more than `before` packets (see
    /// [`Lab::filtered_packets`]); returns the new count.
    pub fn wait_filtered(&self, host: &Host, before: u64, timeout: Duration) -> io::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.filtered_packets(host)?;
            if now > before {
                return Ok(now);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the NATs of {} dropped nothing within {timeout:?}", host.name),
                ));
            }
            // Polling nft is the only way to observe the counter; 20 ms keeps the load low.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forgets every NAT flow of `host`'s routers (`conntrack -F`), as if they had timed out.
    pub fn flush_conntrack(&self, host: &Host) -> io::Result<()> {
        for router in self.routers_of(host)? {
            run(self.command(&router, "conntrack").arg("-F"))?;
        }
        Ok(())
    }

    /// Addresses, routes, rulesets, recorded mappings and conntrack flows of every namespace, for the message
    /// of a failing test.
    pub fn diagnostics(&self) -> String {
        let mut report = String::new();
        for netns in &self.namespaces {
            report.push_str(&format!("==== {netns}\n"));
            let is_router = self.routers.iter().any(|r| &r.info.netns == netns);
            let mut commands: Vec<Vec<&str>> = vec![vec!["ip", "-br", "addr"], vec!["ip", "route"]];
            if is_router {
                commands.push(vec!["nft", "list", "ruleset"]);
                commands.push(vec!["conntrack", "-L"]);
            }
            for args in commands {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).args(&args);
                match cmd.output() {
                    Ok(output) => {
                        report.push_str(&format!("$ {}\n", args.join(" ")));
                        report.push_str(&String::from_utf8_lossy(&output.stdout));
                        report.push_str(&String::from_utf8_lossy(&output.stderr));
                    }
                    Err(e) => report.push_str(&format!("$ {}: {e}\n", args.join(" "))),
                }
            }
        }
        report
    }

    /// The nftables ruleset of a NAT router whose outside interface is `wan` (address `outside`) and whose
    /// inside is the bridge `lan` (subnet `lan`).
    ///
    /// Full cone and hairpin cover UDP only, which is what the daemon's peers speak (QUIC, DHT); TCP is
    /// translated (`masquerade`) and filtered like UDP but never has either.
    fn ruleset(options: NatOptions, outside: Ipv4Addr, lan: &str) -> String {
        let random = match options.nat {
            Nat::EndpointDependent => " fully-random",
            Nat::EndpointIndependent | Nat::FullCone | Nat::Sequential => "",
        };
        // Only the first packet of a flow meets a nat chain, so the counter moves once per new flow. The
        // counter goes through a map because a port taken straight from `numgen` lands in the wrong byte order
        // (consecutive flows would be 256 ports apart).
        let sequential = if options.nat == Nat::Sequential {
            let ports: Vec<String> =
                (0..SEQUENTIAL_PORTS).map(|i| format!("{i} : {}", SEQUENTIAL_FIRST_PORT + i)).collect();
            format!(
                "        oifname \"wan\" meta l4proto udp snat ip to {outside} : numgen inc mod {SEQUENTIAL_PORTS} map {{ {} }}\n",
                ports.join(", ")
            )
        } else {
            String::new()
        };
        let mut prerouting = String::new();
        let mut hairpin_snat = String::new();
        if options.nat == Nat::FullCone {
            // Endpoint-independent filtering: anyone may use a recorded mapping. Only the first packet of a flow
            // meets a nat chain, so flows conntrack already knows are untouched.
            prerouting.push_str(&format!(
                "        iifname \"wan\" ip daddr {outside} dnat ip to udp dport map @mappings\n"
            ));
        }
        if options.hairpin {
            prerouting.push_str(&format!(
                "        iifname \"lan\" ip daddr {outside} dnat ip to udp dport map @mappings\n"
            ));
            // The target must see the sender's outside address, as from anywhere else, and must answer through
            // the router rather than straight across the LAN.
            hairpin_snat = format!(
                "        oifname \"lan\" ip saddr {lan} ct status dnat snat ip to {outside}{random}\n"
            );
        }
        format!(
            r#"table ip lab {{
    # Packets addressed to the router that no flow or mapping claims: dropped silently, like a consumer
    # router does, and counted so that tests can wait for them. Dropping before conntrack confirms the flow
    # also keeps such a packet from reserving its port, which would otherwise push a later outbound flow to
    # another outside port.
    counter filtered {{ }}

    # Outside UDP port -> inside endpoint, recorded as packets leave; conntrack alone cannot answer "who owns
    # this outside port", which full cone and hairpin need.
    map mappings {{
        type inet_service : ipv4_addr . inet_service
        flags dynamic, timeout
        timeout {MAPPING_TIMEOUT}
    }}

    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
{prerouting}    }}

    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
{hairpin_snat}{sequential}        oifname "wan" masquerade{random}
    }}

    # Runs after the NAT hook, when conntrack's reply tuple holds the outside port that was chosen.
    chain record_mappings {{
        type filter hook postrouting priority srcnat + 1; policy accept;
        oifname "wan" ct direction original ct status snat meta l4proto udp update @mappings {{ ct reply proto-dst : ct original ip saddr . ct original proto-src }}
    }}

    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {outside} meta l4proto {{ udp, tcp }} counter name "filtered" drop
    }}
}}
"#
        )
    }

    /// `<prefix>-<name><suffix>`, after checking `name` is usable and free.
    fn node_name(&self, name: &str, suffix: &str) -> io::Result<String> {
        if name.is_empty() || name.len() > 16 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("lab node name {name:?} must be 1-16 ASCII letters, digits or '_'"),
            ));
        }
        let netns = format!("{}-{name}{suffix}", self.prefix);
        if self.namespaces.contains(&netns) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("lab node {name:?} already exists"),
            ));
        }
        Ok(netns)
    }

    fn router_index(&self, host: &Host) -> io::Result<usize> {
        self.hosts
            .get(&host.netns)
            .copied()
            .flatten()
            .ok_or_else(|| io::Error::other(format!("{} is not a private host of this lab", host.name)))
    }

    fn outermost_router(&self, host: &Host) -> io::Result<usize> {
        let mut index = self.router_index(host)?;
        while let Some(up) = self.routers[index].upstream {
            index = up;
        }
        Ok(index)
    }

    /// Creates a namespace, records it for cleanup, brings `lo` up and sets the sysctls every lab namespace
    /// needs (before any interface exists, so that the `default` values apply to all of them).
    fn add_namespace(&mut self, netns: &str, forwards: bool) -> io::Result<()> {
        // Concurrent first uses of `ip netns add` race when setting up the /run/netns mount; one at a time.
        static NETNS_ADD: Mutex<()> = Mutex::new(());
        {
            let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("ip").args(["netns", "add", netns]))?;
        }
        self.namespaces.push(netns.to_owned());
        let mut sysctls = vec![
            // Asymmetric paths are normal here (a host with two addresses on one link, hairpins).
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv6/conf/all/disable_ipv6", "1"),
            ("net/ipv6/conf/default/disable_ipv6", "1"),
        ];
        if forwards {
            sysctls.extend([
                ("net/ipv4/ip_forward", "1"),
                // A router forwarding a hairpin (or 203.0.113 <-> 198.51.100) back out the interface it came in
                // on would otherwise teach the sender a shortcut around it.
                ("net/ipv4/conf/all/send_redirects", "0"),
                ("net/ipv4/conf/default/send_redirects", "0"),
            ]);
        }
        in_netns(netns, || {
            for (key, value) in &sysctls {
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, value).map_err(|e| {
                    io::Error::new(e.kind(), format!("write {value} to {path} in {netns}: {e}"))
                })?;
            }
            Ok(())
        })?;
        ip_batch(netns, &["link set lo up".into()])
    }

    /// Plugs `lower` into the bridge `bridge` of `upper` with a veth pair: `lower_if` in `lower` (left down,
    /// for the caller to address), `p<N>` in `upper`.
    fn plug(&mut self, lower: &str, lower_if: &str, upper: &str, bridge: &str) -> io::Result<()> {
        let port = format!("p{}", self.next_port);
        self.next_port += 1;
        ip_batch(lower, &[format!("link add {lower_if} type veth peer name {port} netns {upper}")])?;
        ip_batch(upper, &[format!("link set {port} master {bridge}"), format!("link set {port} up")])?;
        ip_batch(lower, &[format!("link set {lower_if} up")])
    }

    /// Next free address on `router`'s LAN.
    fn lease(&mut self, router: usize) -> io::Result<Ipv4Addr> {
        let state = &mut self.routers[router];
        if state.next_lan_host == 255 {
            return Err(io::Error::other(format!("{}'s LAN is full", state.info.name)));
        }
        let [a, b, c] = state.lan;
        let addr = Ipv4Addr::new(a, b, c, state.next_lan_host);
        state.next_lan_host += 1;
        Ok(addr)
    }

    /// A NAT router on the internet (`upstream` None) or on another router's LAN. Its LAN is a carrier's
    /// 100.64.C.0/24 when `carrier`, else a home's 192.168.N.0/24.
    fn add_router(
        &mut self,
        netns: &str,
        upstream: Option<usize>,
        options: NatOptions,
        carrier: bool,
    ) -> io::Result<usize> {
        let (outside, gateway, upper) = match upstream {
            None => {
                if self.next_router >= 150 {
                    return Err(io::Error::other("the lab has no more router addresses (203.0.113.100-249)"));
                }
                let outside = Ipv4Addr::new(203, 0, 113, 100 + self.next_router);
                self.next_router += 1;
                (outside, Ipv4Addr::new(203, 0, 113, 1), self.internet.clone())
            }
            Some(up) => {
                let outside = self.lease(up)?;
                let IpAddr::V4(gateway) = self.routers[up].info.inside_addr else {
                    unreachable!("IPv4-only")
                };
                (outside, gateway, self.routers[up].info.netns.clone())
            }
        };
        let counter = if carrier { &mut self.next_carrier_lan } else { &mut self.next_home_lan };
        if *counter == 254 {
            return Err(io::Error::other("the lab has no more LAN subnets"));
        }
        *counter += 1;
        let lan = if carrier { [100, 64, *counter] } else { [192, 168, *counter] };
        let inside = Ipv4Addr::new(lan[0], lan[1], lan[2], 1);
        let lan_subnet = format!("{}.{}.{}.0/24", lan[0], lan[1], lan[2]);

        self.add_namespace(netns, true)?;
        let bridge = if upstream.is_none() { "br0" } else { "lan" };
        self.plug(netns, "wan", &upper, bridge)?;
        ip_batch(
            netns,
            &[
                format!("addr add {outside}/24 dev wan"),
                format!("route add default via {gateway}"),
                "link add lan type bridge".into(),
                "link set lan up".into(),
                format!("addr add {inside}/24 dev lan"),
            ],
        )?;
        nft_apply(netns, &Self::ruleset(options, outside, &lan_subnet))?;

        let name = netns.strip_prefix(&format!("{}-", self.prefix)).unwrap_or(netns).to_owned();
        self.routers.push(RouterState {
            info: Router {
                name,
                netns: netns.to_owned(),
                inside_addr: inside.into(),
                outside_addr: outside.into(),
                options,
            },
            upstream,
            lan,
            next_lan_host: 2,
        });
        Ok(self.routers.len() - 1)
    }

    /// A host on `router`'s LAN.
    fn attach_host(&mut self, name: &str, router: usize) -> io::Result<Host> {
        let netns = self.node_name(name, "")?;
        let addr = self.lease(router)?;
        let IpAddr::V4(gateway) = self.routers[router].info.inside_addr else { unreachable!("IPv4-only") };
        let router_ns = self.routers[router].info.netns.clone();
        self.add_namespace(&netns, false)?;
        self.plug(&netns, "eth0", &router_ns, "lan")?;
        ip_batch(
            &netns,
            &[format!("addr add {addr}/24 dev eth0"), format!("route add default via {gateway}")],
        )?;
        self.hosts.insert(netns.clone(), Some(router));
        let outermost = self.outermost_router_of(router);
        Ok(Host {
            name: name.to_owned(),
            netns,
            addr: addr.into(),
            public_addr: Some(self.routers[outermost].info.outside_addr),
        })
    }

    fn outermost_router_of(&self, mut index: usize) -> usize {
        while let Some(up) = self.routers[index].upstream {
            index = up;
        }
        index
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Kill first: a namespace stays alive as long as a process is in it, even once its name is gone.
        let killed = kill_all_processes_in(&self.namespaces);
        for pid in self.children.drain(..) {
            // Reap our own children so they do not linger as zombies. Only those just killed: they were alive in
            // our namespace, so they are ours and not reaped yet, and the wait ends as soon as the kill lands. A
            // child that already exited is left to its Child handle (its pid may even belong to another process
            // by now).
            if killed.contains(&pid) {
                // SAFETY: waitpid on a child of this process; no memory is shared.
                unsafe {
                    libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
                }
            }
        }
        if let Err(e) = delete_namespaces(&self.namespaces) {
            eprintln!("NAT lab {}: cleanup failed: {e}", self.prefix);
        }
    }
}

/// Runs `f` on a new thread inside namespace `netns` (setns affects only the calling thread).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let file = open_netns(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a valid namespace descriptor; it changes only this thread's network
                // namespace, and the thread ends with `f`.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("setns into {netns}: {e}")));
                }
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn open_netns(netns: &str) -> io::Result<File> {
    File::open(format!("{NETNS_DIR}/{netns}"))
        .map_err(|e| io::Error::new(e.kind(), format!("open namespace {netns}: {e}")))
}

/// Runs a command to completion; an error carries the command line and its output.
fn run(cmd: &mut Command) -> io::Result<Output> {
    let output =
        cmd.stdin(Stdio::null()).output().map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(io::Error::other(format!(
            "{} failed ({}): {}{}",
            command_line(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        )))
    }
}

/// Feeds `input` to a command's stdin; an error carries the command line, the input and the output.
fn run_with_input(cmd: &mut Command, input: &str) -> io::Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", command_line(cmd))))?;
    // The inputs are small enough for the pipe buffer, so writing before reading cannot deadlock.
    child.stdin.take().expect("piped stdin").write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if output.status.success() {
        return Ok(());
    }
    let numbered: String =
        input.lines().enumerate().map(|(i, line)| format!("{:3}  {line}\n", i + 1)).collect();
    Err(io::Error::other(format!(
        "{} failed ({}): {}{}\ninput:\n{numbered}",
        command_line(cmd),
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    )))
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `ip` commands in `netns` in one process (`ip -n NETNS -batch -`).
fn ip_batch(netns: &str, lines: &[String]) -> io::Result<()> {
    run_with_input(Command::new("ip").args(["-n", netns, "-batch", "-"]), &lines.join("\n"))
}

/// Loads an nftables ruleset in `netns`, atomically.
fn nft_apply(netns: &str, ruleset: &str) -> io::Result<()> {
    run_with_input(Command::new("ip").args(["netns", "exec", netns, "nft", "-f", "-"]), ruleset)
}

/// SIGKILLs every process whose network namespace is one of `namespaces` (what `ip netns pids` finds), never
/// this test process itself; returns their pids.
fn kill_processes_in(namespaces: &[String]) -> HashSet<u32> {
    let mut killed = HashSet::new();
    let ours: HashSet<(u64, u64)> = namespaces
        .iter()
        .filter_map(|netns| std::fs::metadata(format!("{NETNS_DIR}/{netns}")).ok())
        .map(|meta| (meta.dev(), meta.ino()))
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else { return killed };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Zombies and processes that just exited have no namespace link any more; nothing to kill.
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else { continue };
        if ours.contains(&(meta.dev(), meta.ino())) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid was just seen in one of our namespaces.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed.insert(pid);
            }
        }
    }
    killed
}

/// Kills processes in `namespaces` until none is left: a dying process stays in its namespace until it has
/// exited, and a live one may fork while we kill. Returns every pid killed.
fn kill_all_processes_in(namespaces: &[String]) -> HashSet<u32> {
    let mut killed = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let round = kill_processes_in(namespaces);
        if round.is_empty() {
            return killed;
        }
        killed.extend(round);
        if Instant::now() > deadline {
            eprintln!(
                "NAT lab: processes {killed:?} survived SIGKILL for 10 s; deleting their namespaces anyway"
            );
            return killed;
        }
        // Nothing to wait on for processes that are not our children; they die within milliseconds.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ip netns del` for every name, continuing past failures, in one process.
fn delete_namespaces(namespaces: &[String]) -> io::Result<()> {
    if namespaces.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = namespaces.iter().map(|netns| format!("netns del {netns}")).collect();
    run_with_input(Command::new("ip").args(["-force", "-batch", "-"]), &lines.join("\n"))
}

/// Whether the programs the lab runs are installed, with a hint where to get them if not.
fn check_tools() -> Result<(), String> {
    for (program, flag) in [("ip", "-V"), ("nft", "--version"), ("conntrack", "--version")] {
        let found = Command::new(program).arg(flag).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !found.is_ok_and(|status| status.success()) {
            return Err(format!(
                "the NAT lab needs `{program}`: install the Debian packages listed in tests/apt-packages.txt"
            ));
        }
    }
    Ok(())
}

/// Deletes lab namespaces whose test process no longer exists (it was killed before its labs could drop).
fn reap_stale_labs() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    let stale: Vec<String> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            let Some(rest) = name.strip_prefix(NAME_PREFIX) else { return false };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            // Our own pid counts as dead: this runs before our first lab, so labs under our pid were left by
            // an earlier process that had the same pid.
            !pid.is_empty()
                && rest[pid.len()..].starts_with('-')
                && pid.parse::<u32>().is_ok_and(|pid| {
                    pid == std::process::id() || !std::path::Path::new(&format!("/proc/{pid}")).exists()
                })
        })
        .collect();
    if !stale.is_empty() {
        eprintln!("NAT lab: removing {} namespaces of dead test processes", stale.len());
        kill_all_processes_in(&stale);
        if let Err(e) = delete_namespaces(&stale) {
            eprintln!("NAT lab: removing stale namespaces failed: {e}");
        }
    }
}
