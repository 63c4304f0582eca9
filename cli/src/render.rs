//! Table mode: API responses rendered as text for people. Pure functions from messages (and the current time,
//! for ages) to strings, so every layout is unit-testable.
//!
//! Conventions: node ids in their one full text form; enum values short and lowercase (`endpoint-independent`);
//! times as ages in tables and as RFC 3339 UTC plus age in detail views; absent values as `-` or a word that
//! says why (`never`, `unknown`, `not listening`), never as a guess.

use prost_reflect::prost_types::Timestamp;
use remote_network::api::control::{
    self, AddressSource, DhtState, NatType, NodeType, PeerEventKind, Reachability, StoreHealth,
};

use crate::table::{Align, Fields, Table};
use crate::timefmt::{format_age, format_proto_duration, format_rfc3339, format_rtt};

/// Shown for an absent value in a table cell.
const NONE: &str = "-";

/// The short lowercase form of a protobuf enum value: `NAT_TYPE_ENDPOINT_INDEPENDENT` with prefix `NAT_TYPE_`
/// becomes `endpoint-independent`. Zero values (`..._UNKNOWN`, `..._UNSPECIFIED`) read `unknown`.
fn short_enum_name(full_name: &str, prefix: &str) -> String {
    match full_name.strip_prefix(prefix).unwrap_or(full_name) {
        "UNKNOWN" | "UNSPECIFIED" => "unknown".to_owned(),
        short => short.to_ascii_lowercase().replace('_', "-"),
    }
}

/// Names a raw enum number from the wire; a number this rnctl does not know (a newer daemon) is shown as is.
macro_rules! enum_text {
    ($fn_name:ident, $enum:ty, $prefix:literal) => {
        pub fn $fn_name(value: i32) -> String {
            match <$enum>::try_from(value) {
                Ok(known) => short_enum_name(known.as_str_name(), $prefix),
                Err(_) => format!("unknown({value})"),
            }
        }
    };
}

enum_text!(node_type_text, NodeType, "NODE_TYPE_");
enum_text!(nat_type_text, NatType, "NAT_TYPE_");
enum_text!(reachability_text, Reachability, "REACHABILITY_");
enum_text!(store_health_text, StoreHealth, "STORE_HEALTH_");
enum_text!(dht_state_text, DhtState, "DHT_STATE_");
enum_text!(address_source_text, AddressSource, "ADDRESS_SOURCE_");
enum_text!(event_kind_text, PeerEventKind, "PEER_EVENT_KIND_");

/// `3m ago`, or `never` when the time is absent.
fn age(time: Option<&Timestamp>, now: i64) -> String {
    time.map_or_else(|| "never".to_owned(), |t| format_age(t.seconds, now))
}

/// `2025-01-01T00:00:00Z (3m ago)`, or `absent` when the time is absent.
fn time_and_age(time: Option<&Timestamp>, now: i64, absent: &str) -> String {
    match time {
        Some(t) => format!("{} ({})", format_rfc3339(t.seconds), format_age(t.seconds, now)),
        None => absent.to_owned(),
    }
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `12.3 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `value`, or `not listening` for the empty string the API uses for an unbound listener.
fn listening(address: &str) -> String {
    if address.is_empty() { "not listening".to_owned() } else { address.to_owned() }
}

fn or_unknown(text: &str) -> String {
    if text.is_empty() { "unknown".to_owned() } else { text.to_owned() }
}

fn join_or(items: &[String], empty: &str) -> String {
    if items.is_empty() { empty.to_owned() } else { items.join(", ") }
}

fn plural(count: u64, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// `rnctl node info`: one `key: value` line per fact.
pub fn node_info(node: &control::NodeInfo, now: i64) -> String {
    let listen = node.listen.clone().unwrap_or_default();
    let store = node.store.clone().unwrap_or_default();
    let dht = node.dht.clone().unwrap_or_default();
    let nat = node.nat.clone().unwrap_or_default();

    let mut fields = Fields::new();
    fields.add("node id", or_unknown(&node.node_id));
    fields.add("version", or_unknown(&node.version));
    fields.add("started", time_and_age(node.started_at.as_ref(), now, "unknown"));
    fields.add("uptime", node.uptime.as_ref().map_or_else(|| "unknown".to_owned(), format_proto_duration));
    fields.add("data dir", or_unknown(&node.data_dir));
    fields.add("control socket", listening(&listen.control_socket));
    fields.add("control tcp", listening(&listen.control_tcp));
    fields.add("quic listen", listening(&listen.quic));
    fields.add("dht listen", listening(&listen.dht));
    fields.add("monitoring", listening(&listen.monitoring));

    let mut health = store_health_text(store.health);
    if !store.health_detail.is_empty() {
        health = format!("{health} ({})", store.health_detail);
    }
    fields.add(
        "store",
        format!(
            "{health}, {}, {}, {}",
            plural(store.peers, "peer", "peers"),
            plural(store.peer_addresses, "address", "addresses"),
            format_bytes(store.size_bytes)
        ),
    );
    fields.add("store path", or_unknown(&store.path));

    // Details of a DHT whose state is unknown or disabled would be invented: show the state alone.
    let dht_running = matches!(
        control::DhtState::try_from(dht.state),
        Ok(control::DhtState::Bootstrapping | control::DhtState::Ready)
    );
    let mut dht_parts = vec![dht_state_text(dht.state)];
    if dht_running {
        dht_parts.push(plural(
            u64::from(dht.routing_table_size),
            "node in routing table",
            "nodes in routing table",
        ));
        dht_parts.push(if dht.server_mode { "server mode".to_owned() } else { "client mode".to_owned() });
        if dht.firewalled {
            dht_parts.push("firewalled".to_owned());
        }
    }
    fields.add("dht", dht_parts.join(", "));
    fields.add("dht public address", or_unknown(&dht.public_address));
    fields.add("nat type", nat_type_text(nat.nat_type));
    fields.add("reachability", reachability_text(nat.reachability));
    fields.add("public addresses", join_or(&nat.public_addresses, "unknown"));
    fields.add("joined topics", join_or(&node.joined_topics, "none"));
    fields.render()
}

/// `rnctl peers list`: one row per peer.
pub fn peer_table(peers: &[control::Peer], now: i64) -> String {
    let mut table = Table::new(&[
        ("NODE ID", Align::Left),
        ("TYPE", Align::Left),
        ("NAT", Align::Left),
        ("SEQ", Align::Right),
        ("SCORE", Align::Right),
        ("LAST SEEN", Align::Left),
        ("TOPICS", Align::Left),
    ]);
    for peer in peers {
        table.push_row(vec![
            peer.node_id.clone(),
            node_type_text(peer.node_type),
            nat_type_text(peer.nat_type),
            peer.seq.to_string(),
            format!("{:.2}", peer.score),
            age(peer.last_seen.as_ref(), now),
            join_or(&peer.topics, NONE),
        ]);
    }
    table.render()
}

/// The footer under a `peers list` page that is not the last one.
pub fn more_peers_footer(shown: usize, total: u64) -> String {
    format!("showing {shown} of {total} peers; more with --all\n")
}

/// `rnctl peers show`: the peer's facts, its addresses as a table, then its connection quality.
pub fn peer_detail(peer: &control::Peer, now: i64) -> String {
    let mut fields = Fields::new();
    fields.add("node id", peer.node_id.clone());
    fields.add("type", node_type_text(peer.node_type));
    fields.add("nat", nat_type_text(peer.nat_type));
    fields.add("seq", peer.seq.to_string());
    fields.add("score", format!("{:.2}", peer.score));
    fields.add("first seen", time_and_age(peer.first_seen.as_ref(), now, "unknown"));
    fields.add("last seen", time_and_age(peer.last_seen.as_ref(), now, "never"));
    fields.add("topics", join_or(&peer.topics, "none"));
    match &peer.capabilities {
        Some(caps) => {
            let platform = match (caps.os.as_str(), caps.arch.as_str()) {
                ("", "") => "unknown".to_owned(),
                (os, arch) => format!("{}/{}", or_unknown(os), or_unknown(arch)),
            };
            fields.add("platform", platform);
            let cores = if caps.cpu_cores == 0 { "unknown".to_owned() } else { caps.cpu_cores.to_string() };
            fields.add("cpu cores", cores);
            let memory =
                if caps.memory_bytes == 0 { "unknown".to_owned() } else { format_bytes(caps.memory_bytes) };
            fields.add("memory", memory);
            fields.add("software", or_unknown(&caps.software_version));
        }
        None => fields.add("capabilities", "unknown"),
    }
    let services: Vec<String> = peer.services.iter().map(service_text).collect();
    fields.add("services", join_or(&services, "none"));
    let record = if peer.record.is_empty() {
        "none".to_owned()
    } else {
        plural(peer.record.len() as u64, "byte", "bytes")
    };
    fields.add("metadata record", record);
    if let Some(connection) = &peer.connection {
        fields.add("connection", connection_text(connection, now));
    }

    let mut out = fields.render();
    out.push('\n');
    if peer.addresses.is_empty() {
        out.push_str("addresses: none\n");
    } else {
        out.push_str("addresses:\n");
        out.push_str(&address_table(&peer.addresses, now));
    }
    out.push('\n');
    out.push_str("quality:\n");
    out.push_str(&quality_fields(peer.quality.as_ref(), now));
    out
}

/// `outbound to 198.51.100.7:30906, direct, since 2m ago, rtt 12.3 ms` or `not connected`.
fn connection_text(connection: &control::PeerConnection, now: i64) -> String {
    if !connection.connected {
        return "not connected".to_owned();
    }
    let direction = match control::ConnectionDirection::try_from(connection.direction) {
        Ok(control::ConnectionDirection::Inbound) => "inbound from",
        Ok(control::ConnectionDirection::Outbound) => "outbound to",
        _ => "connected to",
    };
    let path = match control::ConnectionPath::try_from(connection.path) {
        Ok(control::ConnectionPath::Direct) => "direct",
        Ok(control::ConnectionPath::Punched) => "hole-punched",
        Ok(control::ConnectionPath::Relayed) => "relayed",
        _ => "path unknown",
    };
    let mut text = format!("{direction} {}, {path}", connection.remote_address);
    if !connection.relay.is_empty() {
        text.push_str(&format!(" by {}", connection.relay));
    }
    if let Some(since) = &connection.since {
        text.push_str(&format!(", since {}", format_age(since.seconds, now)));
    }
    if let Some(rtt) = &connection.rtt {
        text.push_str(&format!(", rtt {}", format_rtt(rtt)));
    }
    text
}

/// `ssh 2.0 (port=22, user=x)`, attributes sorted so the text is stable.
fn service_text(service: &control::Service) -> String {
    let mut text = service.name.clone();
    if !service.version.is_empty() {
        text = format!("{text} {}", service.version);
    }
    if !service.attributes.is_empty() {
        let mut attributes: Vec<_> = service.attributes.iter().collect();
        attributes.sort();
        let attributes: Vec<String> =
            attributes.iter().map(|(key, value)| format!("{key}={value}")).collect();
        text = format!("{text} ({})", attributes.join(", "));
    }
    text
}

fn address_table(addresses: &[control::PeerAddress], now: i64) -> String {
    let mut table = Table::new(&[
        ("ADDRESS", Align::Left),
        ("SOURCE", Align::Left),
        ("FIRST SEEN", Align::Left),
        ("LAST SUCCESS", Align::Left),
        ("LAST FAILURE", Align::Left),
        ("FAILURES", Align::Right),
    ]);
    for address in addresses {
        table.push_row(vec![
            address.address.clone(),
            address_source_text(address.source),
            age(address.first_seen.as_ref(), now),
            age(address.last_success.as_ref(), now),
            age(address.last_failure.as_ref(), now),
            address.consecutive_failures.to_string(),
        ]);
    }
    table.render()
}

fn quality_fields(quality: Option<&control::ConnectionQuality>, now: i64) -> String {
    let quality = quality.cloned().unwrap_or_default();
    let mut fields = Fields::new();
    let rtt = match &quality.rtt {
        Some(rtt) => format!("{} ({})", format_rtt(rtt), plural(quality.rtt_samples, "sample", "samples")),
        None => "not measured".to_owned(),
    };
    fields.add("rtt", rtt);
    fields.add("successes", quality.successes.to_string());
    fields.add("failures", quality.failures.to_string());
    fields.add("last success", time_and_age(quality.last_success_at.as_ref(), now, "never"));
    let last_error = if quality.last_error.is_empty() {
        "none".to_owned()
    } else {
        match &quality.last_error_at {
            Some(at) => format!("{} ({})", quality.last_error, format_age(at.seconds, now)),
            None => quality.last_error.clone(),
        }
    };
    fields.add("last error", last_error);
    // Indented under the "quality:" heading.
    fields.render().lines().map(|line| format!("  {line}\n")).collect()
}

/// Width of the widest event kind (`snapshot-done`), so ids line up from one event line to the next.
const EVENT_KIND_WIDTH: usize = 13;

/// One line for a `peers watch` event: time, kind, node id, topics. `snapshot_peers` is how many snapshot
/// events came before, reported on the snapshot-done line.
pub fn peer_event_line(event: &control::PeerEvent, now: i64, snapshot_peers: u64) -> String {
    let time = format_rfc3339(event.at.as_ref().map_or(now, |at| at.seconds));
    let kind = event_kind_text(event.kind);
    let detail = match (PeerEventKind::try_from(event.kind), &event.peer) {
        (Ok(PeerEventKind::SnapshotDone), _) => {
            format!("end of snapshot: {}", plural(snapshot_peers, "peer", "peers"))
        }
        (_, Some(peer)) if peer.topics.is_empty() => peer.node_id.clone(),
        (_, Some(peer)) => format!("{}  {}", peer.node_id, peer.topics.join(", ")),
        (_, None) => NONE.to_owned(),
    };
    format!("{time}  {kind:<EVENT_KIND_WIDTH$}  {detail}")
}

/// `rnctl topics list`: one row per joined topic with where its discovery stands (DHT contacts, the last lookup
/// and what it found, the next one, where our announce is stored), then one line per topic saying in words why it
/// finds peers or not.
pub fn topic_table(topics: &[control::Topic], now: i64) -> String {
    let mut table = Table::new(&[
        ("TOPIC", Align::Left),
        ("PEERS", Align::Right),
        ("JOINED", Align::Left),
        ("CONTACTS", Align::Right),
        ("LAST LOOKUP", Align::Left),
        ("FOUND", Align::Right),
        ("NEXT LOOKUP", Align::Left),
        ("OUR ANNOUNCE", Align::Left),
        ("INFOHASH", Align::Left),
    ]);
    let mut explanations = String::new();
    for topic in topics {
        let mut row = vec![topic.name.clone(), topic.peers.to_string(), age(topic.joined_at.as_ref(), now)];
        match &topic.discovery {
            Some(discovery) => {
                row.extend(discovery_cells(discovery, now));
                explanations.push_str(&format!("{}: {}\n", topic.name, or_unknown(&discovery.explanation)));
            }
            None => {
                row.extend(std::iter::repeat_n(NONE.to_owned(), 5));
                explanations.push_str(&format!("{}: the DHT has not taken this topic up yet\n", topic.name));
            }
        }
        row.push(topic.infohash.clone());
        table.push_row(row);
    }
    format!("{}\n{explanations}", table.render())
}

/// The CONTACTS, LAST LOOKUP, FOUND, NEXT LOOKUP and OUR ANNOUNCE cells of a topic row.
fn discovery_cells(discovery: &control::TopicDiscovery, now: i64) -> [String; 5] {
    let count = |value: Option<u32>| value.map_or_else(|| NONE.to_owned(), |n| n.to_string());
    let last_lookup = if discovery.lookup_running {
        "running".to_owned()
    } else {
        age(discovery.last_lookup_at.as_ref(), now)
    };
    let next_lookup = match &discovery.next_lookup_in {
        Some(wait) if wait.seconds <= 0 => "due".to_owned(),
        Some(wait) => format!("in {}", format_proto_duration(wait)),
        None => NONE.to_owned(),
    };
    [
        count(discovery.dht_contacts),
        last_lookup,
        count(discovery.last_lookup_peers),
        next_lookup,
        announce_text(discovery),
    ]
}

/// Where our announce is: `on 3 nodes`, `here only` (our own DHT node), `not stored`, or not yet tried.
fn announce_text(discovery: &control::TopicDiscovery) -> String {
    if discovery.announce_port.is_none() {
        return "not yet".to_owned();
    }
    if discovery.announce_stored_remotely {
        return match discovery.nodes_with_our_announce {
            Some(nodes) if nodes > 0 => format!("on {}", plural(u64::from(nodes), "node", "nodes")),
            _ => "stored".to_owned(),
        };
    }
    if discovery.announce_stored_here {
        return "here only".to_owned();
    }
    match (&discovery.last_announce_at, discovery.announce_running) {
        (None, true) => "running".to_owned(),
        (None, false) => "not yet".to_owned(),
        (Some(_), _) => "not stored".to_owned(),
    }
}

/// `rnctl nat status`: the verdicts, the evidence for each, observed addresses and dial-backs.
pub fn nat_report(report: &control::NatReport, now: i64) -> String {
    let mut fields = Fields::new();
    fields.add("nat type", nat_type_text(report.nat_type));
    fields.add("reachability", reachability_text(report.reachability));
    let mapping = match control::MappingBehavior::try_from(report.mapping) {
        Ok(control::MappingBehavior::None) => "none (no address translation)".to_owned(),
        Ok(control::MappingBehavior::EndpointIndependent) => "endpoint-independent".to_owned(),
        Ok(control::MappingBehavior::EndpointDependent) => match report.port_allocation.as_str() {
            "" => "endpoint-dependent".to_owned(),
            allocation => format!("endpoint-dependent, ports {allocation}"),
        },
        _ => "unknown".to_owned(),
    };
    fields.add("mapping", mapping);
    let preservation = match report.port_preservation {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    fields.add("port preservation", preservation);
    let filtering = match control::FilteringBehavior::try_from(report.filtering) {
        Ok(control::FilteringBehavior::EndpointIndependent) => "endpoint-independent",
        Ok(control::FilteringBehavior::AddressDependent) => "address-dependent",
        Ok(control::FilteringBehavior::AddressAndPortDependent) => "address-and-port-dependent",
        _ => "unknown",
    };
    fields.add("filtering", filtering);
    let hairpin = match control::HairpinSupport::try_from(report.hairpin) {
        Ok(control::HairpinSupport::Supported) => "supported",
        Ok(control::HairpinSupport::NotSupported) => "not supported",
        _ => "unknown",
    };
    fields.add("hairpin", hairpin);
    fields.add("last probe", time_and_age(report.last_probe.as_ref(), now, "never"));
    let mut out = fields.render();

    if !report.explanation.is_empty() {
        out.push_str("\nwhy:\n");
        for line in &report.explanation {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out.push_str("\nobserved addresses:\n");
    if report.observed.is_empty() {
        out.push_str("  none yet (no peer has reported one)\n");
    } else {
        let mut table = Table::new(&[
            ("ADDRESS", Align::Left),
            ("CONFIRMED BY", Align::Right),
            ("LAST REPORT", Align::Left),
        ]);
        for observed in &report.observed {
            table.push_row(vec![
                observed.address.clone(),
                plural(u64::from(observed.confirmations), "peer", "peers"),
                age(observed.last_report.as_ref(), now),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push_str("\ndial-backs:\n");
    if report.dial_backs.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let mut table = Table::new(&[
            ("WHEN", Align::Left),
            ("KIND", Align::Left),
            ("RESULT", Align::Left),
            ("FROM", Align::Left),
            ("HELPER", Align::Left),
            ("DETAIL", Align::Left),
        ]);
        for dial_back in &report.dial_backs {
            let kind = match control::DialBackKind::try_from(dial_back.kind) {
                Ok(control::DialBackKind::OtherPort) => "other port",
                Ok(control::DialBackKind::OtherIp) => "other ip",
                _ => "unknown",
            };
            let result = match (dial_back.attempted, dial_back.arrived) {
                (false, _) => "not attempted",
                (true, true) => "arrived",
                (true, false) => "blocked",
            };
            table.push_row(vec![
                age(dial_back.at.as_ref(), now),
                kind.to_owned(),
                result.to_owned(),
                dial_back.from_address.clone(),
                dial_back.helper.clone(),
                dial_back.detail.clone(),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push_str("\nrelays holding a reservation for us:\n");
    if report.relays.is_empty() {
        out.push_str("  none\n");
    }
    for relay in &report.relays {
        out.push_str(&format!("  {relay}\n"));
    }
    out.push_str("\nhole punching:\n");
    if report.punches.is_empty() {
        out.push_str("  no attempts yet\n");
    } else {
        let mut table = Table::new(&[
            ("OURS", Align::Left),
            ("THEIRS", Align::Left),
            ("ATTEMPTS", Align::Right),
            ("SUCCEEDED", Align::Right),
            ("CONNECTED IN", Align::Right),
            ("LAST", Align::Left),
        ]);
        for punch in &report.punches {
            table.push_row(vec![
                nat_type_text(punch.our_nat),
                nat_type_text(punch.their_nat),
                punch.attempts.to_string(),
                punch.successes.to_string(),
                punch.last_time_to_connected.as_ref().map(format_rtt).unwrap_or_else(|| "-".to_owned()),
                punch.last_outcome.clone(),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_735_689_600; // 2025-01-01T00:00:00Z

    fn at(seconds_ago: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds: NOW - seconds_ago, nanos: 0 })
    }

    #[test]
    fn enum_values_are_short_and_lowercase() {
        assert_eq!(nat_type_text(NatType::EndpointIndependent as i32), "endpoint-independent");
        assert_eq!(nat_type_text(NatType::Unknown as i32), "unknown");
        assert_eq!(node_type_text(NodeType::Public as i32), "public");
        assert_eq!(store_health_text(StoreHealth::Ok as i32), "ok");
        assert_eq!(store_health_text(StoreHealth::Unspecified as i32), "unknown");
        assert_eq!(reachability_text(Reachability::PrivatePunchable as i32), "private-punchable");
        assert_eq!(event_kind_text(PeerEventKind::SnapshotDone as i32), "snapshot-done");
        assert_eq!(address_source_text(AddressSource::PeerExchange as i32), "peer-exchange");
        assert_eq!(dht_state_text(99), "unknown(99)");
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn peer_rows_show_full_ids_and_ages() {
        let peer = control::Peer {
            node_id: "ab".repeat(32),
            seq: 7,
            last_seen: at(180),
            node_type: NodeType::Private as i32,
            nat_type: NatType::EndpointDependent as i32,
            topics: vec!["chat".into(), "files".into()],
            score: 0.875,
            ..Default::default()
        };
        let text = peer_table(&[peer], NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NODE ID"));
        let id = "ab".repeat(32);
        assert_eq!(
            lines[1],
            format!("{id}  private  endpoint-dependent    7   0.88  3m ago     chat, files")
        );
    }

    #[test]
    fn node_info_says_what_is_not_listening_or_unknown() {
        let node = control::NodeInfo {
            node_id: "cd".repeat(32),
            version: "0.1.0".into(),
            uptime: Some(prost_reflect::prost_types::Duration { seconds: 3723, nanos: 0 }),
            listen: Some(control::ListenAddresses {
                control_socket: "/run/remote-network/control.sock".into(),
                quic: "0.0.0.0:4433".into(),
                ..Default::default()
            }),
            store: Some(control::StoreStats {
                health: StoreHealth::Ok as i32,
                peers: 1,
                size_bytes: 2048,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = node_info(&node, NOW);
        assert!(text.contains("uptime:             1h 2m 3s\n"), "{text}");
        assert!(text.contains("control tcp:        not listening\n"), "{text}");
        assert!(text.contains("quic listen:        0.0.0.0:4433\n"), "{text}");
        assert!(text.contains("store:              ok, 1 peer, 0 addresses, 2.0 KiB\n"), "{text}");
        assert!(text.contains("nat type:           unknown\n"), "{text}");
        assert!(text.contains("joined topics:      none\n"), "{text}");
    }

    #[test]
    fn event_lines_carry_time_kind_id_and_topics() {
        let id = "ef".repeat(32);
        let added = control::PeerEvent {
            kind: PeerEventKind::Added as i32,
            peer: Some(control::Peer {
                node_id: id.clone(),
                topics: vec!["chat".into()],
                ..Default::default()
            }),
            at: at(0),
        };
        assert_eq!(
            peer_event_line(&added, NOW, 0),
            format!("2025-01-01T00:00:00Z  added          {id}  chat")
        );
        let done = control::PeerEvent { kind: PeerEventKind::SnapshotDone as i32, peer: None, at: at(0) };
        assert_eq!(
            peer_event_line(&done, NOW, 2),
            "2025-01-01T00:00:00Z  snapshot-done  end of snapshot: 2 peers"
        );
    }

    #[test]
    fn topic_rows_show_discovery_and_why() {
        let found = control::Topic {
            name: "chat".into(),
            joined_at: at(7200),
            peers: 12,
            infohash: "aa".repeat(20),
            discovery: Some(control::TopicDiscovery {
                dht_contacts: Some(8),
                last_lookup_at: at(5),
                last_lookup_peers: Some(3),
                nodes_with_our_announce: Some(4),
                next_lookup_in: Some(prost_reflect::prost_types::Duration { seconds: 55, nanos: 0 }),
                announce_port: Some(30906),
                last_announce_at: at(60),
                announce_stored_remotely: true,
                explanation: "the last lookup found 3 peer address(es)".into(),
                ..Default::default()
            }),
        };
        let lone = control::Topic {
            name: "lone".into(),
            joined_at: at(60),
            infohash: "bb".repeat(20),
            discovery: Some(control::TopicDiscovery {
                dht_contacts: Some(0),
                lookup_running: true,
                announce_port: Some(30906),
                last_announce_at: at(30),
                announce_stored_here: true,
                explanation: "no DHT node knows us yet: 0 contacts".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let fresh = control::Topic {
            name: "new".into(),
            joined_at: at(0),
            infohash: "cc".repeat(20),
            ..Default::default()
        };
        let text = topic_table(&[found, lone, fresh], NOW);
        let (aa, bb, cc) = ("aa".repeat(20), "bb".repeat(20), "cc".repeat(20));
        assert_eq!(
            text,
            format!(
                "TOPIC  PEERS  JOINED    CONTACTS  LAST LOOKUP  FOUND  NEXT LOOKUP  OUR ANNOUNCE  INFOHASH\n\
                 chat      12  2h ago           8  5s ago           3  in 55s       on 4 nodes    {aa}\n\
                 lone       0  1m ago           0  running          -  -            here only     {bb}\n\
                 new        0  just now         -  -                -  -            -             {cc}\n\
                 \n\
                 chat: the last lookup found 3 peer address(es)\n\
                 lone: no DHT node knows us yet: 0 contacts\n\
                 new: the DHT has not taken this topic up yet\n"
            )
        );
    }

    #[test]
    fn our_announce_says_where_it_is_stored() {
        let discovery = |edit: fn(&mut control::TopicDiscovery)| {
            let mut d = control::TopicDiscovery { announce_port: Some(1), ..Default::default() };
            edit(&mut d);
            announce_text(&d)
        };
        assert_eq!(discovery(|d| d.announce_port = None), "not yet");
        assert_eq!(discovery(|_| {}), "not yet");
        assert_eq!(discovery(|d| d.announce_running = true), "running");
        assert_eq!(discovery(|d| d.last_announce_at = at(1)), "not stored");
        assert_eq!(discovery(|d| d.announce_stored_remotely = true), "stored");
        assert_eq!(
            discovery(|d| {
                d.announce_stored_remotely = true;
                d.nodes_with_our_announce = Some(1);
            }),
            "on 1 node"
        );
    }
}
