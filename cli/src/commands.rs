//! What each subcommand asks the daemon and prints. Input has already been checked by the argument parsers,
//! and the connection made, by the time these run.

use std::time::SystemTime;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use remote_network::api::control::topic_service_client::TopicServiceClient;
use remote_network::api::control::{
    ConnectPeerRequest, ForgetPeerRequest, GetNatStatusRequest, GetNodeInfoRequest, GetPeerRequest,
    JoinTopicRequest, LeaveTopicRequest, ListPeersRequest, ListPeersResponse, ListTopicsRequest, NodeType,
    PeerEvent, PeerEventKind, PeerOrder, ProbeNatRequest, QueryPeerMetadataRequest, WatchPeersRequest,
};
use remote_network::api::names::NodeId;
use tokio::signal::unix::{SignalKind, signal};

use crate::args::{
    ConnectTarget, DaemonCommand, ListPeersArgs, NatCommand, NodeCommand, PeersCommand, TopicsCommand,
};
use crate::daemon::{AuthChannel, Daemon};
use crate::exit::Failure;
use crate::output::Printer;
use crate::render;
use crate::timefmt::{timestamp_before, unix_seconds};

/// Runs a subcommand against the connected daemon.
pub async fn run(command: DaemonCommand, daemon: &Daemon, printer: &mut Printer) -> Result<(), Failure> {
    match command {
        DaemonCommand::Node(NodeCommand::Info) => node_info(daemon, printer).await,
        DaemonCommand::Peers(PeersCommand::List(args)) => list_peers(daemon, printer, args).await,
        DaemonCommand::Peers(PeersCommand::Show { id }) => show_peer(daemon, printer, id).await,
        DaemonCommand::Peers(PeersCommand::Watch { topic, snapshot }) => {
            watch_peers(daemon, printer, topic, snapshot).await
        }
        DaemonCommand::Peers(PeersCommand::Forget { id }) => forget_peer(daemon, printer, id).await,
        DaemonCommand::Peers(PeersCommand::Query { id }) => query_peer(daemon, printer, id).await,
        DaemonCommand::Connect { address } => connect(daemon, printer, address).await,
        DaemonCommand::Nat(command) => nat(daemon, printer, command).await,
        DaemonCommand::Topics(TopicsCommand::Join { topic, wait: false, .. }) => {
            join_topic(daemon, printer, topic).await
        }
        DaemonCommand::Topics(TopicsCommand::Join { topic, wait: true, peers }) => {
            join_and_wait(daemon, printer, topic, peers).await
        }
        DaemonCommand::Topics(TopicsCommand::Leave { topic }) => leave_topic(daemon, printer, topic).await,
        DaemonCommand::Topics(TopicsCommand::List) => list_topics(daemon, printer).await,
    }
}

fn now() -> i64 {
    unix_seconds(SystemTime::now())
}

async fn node_info(daemon: &Daemon, printer: &mut Printer) -> Result<(), Failure> {
    let mut client = daemon.nodes();
    let response = daemon.unary(client.get_node_info(GetNodeInfoRequest {})).await?;
    let now = now();
    printer.response(&response, |response| render::node_info(&response.node.clone().unwrap_or_default(), now))
}

/// How many peers `peers list` should print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    AtMost(u64),
    All,
}

/// Fetches pages until `wanted` peers are collected or the store has no more. Each request asks for at most the
/// number still wanted, so no page is cut short and the last page's token stays valid for `--page-token`.
async fn list_peers(daemon: &Daemon, printer: &mut Printer, args: ListPeersArgs) -> Result<(), Failure> {
    let wanted = match (args.all, args.limit) {
        (true, _) => Wanted::All,
        (false, Some(limit)) => Wanted::AtMost(limit),
        (false, None) => Wanted::AtMost(u64::from(args.page_size)),
    };
    let mut request = ListPeersRequest {
        topic: args.topic.unwrap_or_default(),
        node_type: args.node_type.map_or(NodeType::Unknown, NodeType::from) as i32,
        seen_since: args.seen_since.map(|age| timestamp_before(SystemTime::now(), age)),
        order: PeerOrder::from(args.order) as i32,
        page_size: args.page_size,
        page_token: args.page_token.unwrap_or_default(),
    };
    let mut client = daemon.peers();
    let mut listing = ListPeersResponse::default();
    loop {
        request.page_size = page_size_for(wanted, args.page_size, listing.peers.len());
        let page = daemon.unary(client.list_peers(request.clone())).await?;
        let page_was_empty = page.peers.is_empty();
        listing.peers.extend(page.peers);
        listing.total = page.total;
        listing.next_page_token = page.next_page_token;
        let have_enough = match wanted {
            Wanted::AtMost(limit) => listing.peers.len() as u64 >= limit,
            Wanted::All => false,
        };
        // An empty page with a token would loop forever on a misbehaving daemon; treat it as the end.
        if listing.next_page_token.is_empty() || have_enough || page_was_empty {
            break;
        }
        request.page_token = listing.next_page_token.clone();
    }
    if wanted == Wanted::All {
        listing.next_page_token.clear();
    }

    let now = now();
    printer.response(&listing, |listing| {
        if listing.peers.is_empty() {
            return "no peers\n".to_owned();
        }
        let mut text = render::peer_table(&listing.peers, now);
        if !listing.next_page_token.is_empty() {
            text.push_str(&render::more_peers_footer(listing.peers.len(), listing.total));
        }
        text
    })
}

/// Page size for the next request: the configured size, or less when fewer peers are still wanted.
fn page_size_for(wanted: Wanted, page_size: u32, collected: usize) -> u32 {
    match wanted {
        Wanted::All => page_size,
        Wanted::AtMost(limit) => {
            let remaining = limit.saturating_sub(collected as u64).max(1);
            u32::try_from(remaining).map_or(page_size, |remaining| remaining.min(page_size))
        }
    }
}

async fn show_peer(daemon: &Daemon, printer: &mut Printer, id: NodeId) -> Result<(), Failure> {
    let mut client = daemon.peers();
    let request = GetPeerRequest { node_id: id.to_string() };
    let response = daemon.unary(client.get_peer(request)).await?;
    if !printer.is_json() && response.peer.is_none() {
        return Err(Failure::NotFound(format!("the daemon returned no peer for {id}")));
    }
    let now = now();
    printer
        .response(&response, |response| render::peer_detail(&response.peer.clone().unwrap_or_default(), now))
}

/// Streams events until the daemon ends the stream or the user stops rnctl (Ctrl-C or SIGTERM), both of which
/// are a normal end. No deadline applies: the stream is meant to stay open.
async fn watch_peers(
    daemon: &Daemon,
    printer: &mut Printer,
    topic: Option<String>,
    include_snapshot: bool,
) -> Result<(), Failure> {
    let signal_error = |error| Failure::Other(anyhow::Error::new(error).context("cannot handle Ctrl-C"));
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;

    let request = WatchPeersRequest { include_snapshot, topic: topic.unwrap_or_default() };
    let mut client = daemon.peers();
    let mut stream = tokio::select! {
        response = client.watch_peers(request) => response?.into_inner(),
        _ = interrupt.recv() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    let mut snapshot_peers: u64 = 0;
    loop {
        let event: Option<PeerEvent> = tokio::select! {
            message = stream.message() => message?,
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        };
        let Some(event) = event else {
            return Ok(());
        };
        if event.kind == PeerEventKind::Snapshot as i32 {
            snapshot_peers += 1;
        }
        let now = now();
        printer.stream_item(&event, |event| render::peer_event_line(event, now, snapshot_peers))?;
    }
}

/// Forgetting an unknown peer is "not found" (exit status 5), so scripts can tell it from a real deletion.
async fn forget_peer(daemon: &Daemon, printer: &mut Printer, id: NodeId) -> Result<(), Failure> {
    let mut client = daemon.peers();
    let request = ForgetPeerRequest { node_id: id.to_string() };
    let response = daemon.unary(client.forget_peer(request)).await?;
    if printer.is_json() {
        printer.response(&response, |_| String::new())?;
    } else if response.forgotten {
        printer.text(&format!("forgot {id}"))?;
    }
    if response.forgotten { Ok(()) } else { Err(Failure::NotFound(format!("no peer {id} in the store"))) }
}

async fn join_topic(daemon: &Daemon, printer: &mut Printer, topic: String) -> Result<(), Failure> {
    let mut client = daemon.topics();
    let request = JoinTopicRequest { topic: topic.clone() };
    let response = daemon.unary(client.join_topic(request)).await?;
    printer.response(&response, |response| {
        if response.newly_joined { format!("joined {topic}\n") } else { format!("already joined {topic}\n") }
    })
}

/// How often `topics join --wait` reads the topic's discovery status to report its progress.
const DISCOVERY_POLL: Duration = Duration::from_millis(500);

/// Joins, then follows the topic's peers until `wanted` of them are verified: every peer added or updated after
/// the join started counts (a stored peer from an earlier run counts only once it is verified again).
///
/// While it waits, the topic's discovery explanation (from `ListTopics`) goes to stderr each time it changes, so
/// a wait that takes long says why ("0 contacts", "the last lookup found nobody") and stdout stays as it was.
async fn join_and_wait(
    daemon: &Daemon,
    printer: &mut Printer,
    topic: String,
    wanted: u32,
) -> Result<(), Failure> {
    let started = Instant::now();
    let started_at = now();
    let mut peers = daemon.peers();
    // Watch first, so no verification between the join and the watch can be missed.
    let request = WatchPeersRequest { include_snapshot: true, topic: topic.clone() };
    let mut stream = daemon.unary(peers.watch_peers(request)).await?;
    let mut topics = daemon.topics();
    let joined = daemon.unary(topics.join_topic(JoinTopicRequest { topic: topic.clone() })).await?;
    let progress = |printer: &mut Printer, line: String| {
        // Progress goes to stderr in JSON mode, so stdout stays one JSON document.
        if printer.is_json() {
            eprintln!("{line}");
            Ok(())
        } else {
            printer.text(&line)
        }
    };
    progress(
        printer,
        format!(
            "{} {topic}; waiting for {wanted} verified peer(s)",
            if joined.newly_joined { "joined" } else { "already in" }
        ),
    )?;
    let deadline = daemon.deadline().map(|d| started + d);
    let timed_out = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed_out);
    let mut poll = tokio::time::interval(DISCOVERY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut explanation = String::new();
    let mut verified = BTreeSet::new();
    while verified.len() < wanted as usize {
        let next = tokio::select! {
            next = stream.message() => next?,
            _ = poll.tick() => {
                if let Some(now_explained) = discovery_explanation(&mut topics, &topic).await
                    && now_explained != explanation
                {
                    eprintln!("discovery: {now_explained}");
                    explanation = now_explained;
                }
                continue;
            }
            () = &mut timed_out => {
                return Err(Failure::Status(tonic::Status::deadline_exceeded(format!(
                    "{} of {wanted} peers of {topic} verified within {}s (see --timeout)",
                    verified.len(),
                    daemon.deadline().unwrap_or_default().as_secs()
                ))));
            }
        };
        let Some(event) = next else {
            // The daemon ends watches when it stops: the connection is going away, not a refused request.
            return Err(Failure::Connect("the daemon ended the watch (is it stopping?)".to_owned()));
        };
        let kind = event.kind();
        let Some(peer) = event.peer else { continue };
        let fresh = match kind {
            PeerEventKind::Added | PeerEventKind::Updated => true,
            PeerEventKind::Snapshot => peer.last_seen.as_ref().is_some_and(|t| t.seconds >= started_at),
            _ => false,
        };
        if fresh && peer.seq > 0 && verified.insert(peer.node_id.clone()) {
            progress(printer, format!("verified {}/{wanted}: {}", verified.len(), peer.node_id))?;
        }
    }
    let elapsed = started.elapsed();
    if printer.is_json() {
        printer.response(&joined, |_| String::new())
    } else {
        printer.text(&format!(
            "{} peers of {topic} verified in {:.1}s",
            verified.len(),
            elapsed.as_secs_f64()
        ))
    }
}

/// The topic's discovery explanation, or `None` when the daemon has none yet or does not answer in time: progress
/// is best effort and never fails the wait.
async fn discovery_explanation(topics: &mut TopicServiceClient<AuthChannel>, topic: &str) -> Option<String> {
    let listing =
        tokio::time::timeout(DISCOVERY_POLL, topics.list_topics(ListTopicsRequest {})).await.ok()?.ok()?;
    listing
        .into_inner()
        .topics
        .into_iter()
        .find(|t| t.name == topic)
        .and_then(|t| t.discovery)
        .map(|d| d.explanation)
        .filter(|e| !e.is_empty())
}

async fn nat(daemon: &Daemon, printer: &mut Printer, command: NatCommand) -> Result<(), Failure> {
    let mut client = daemon.nodes();
    let response = match command {
        NatCommand::Status => daemon.unary(client.get_nat_status(GetNatStatusRequest {})).await?,
        NatCommand::Probe => daemon.unary(client.probe_nat(ProbeNatRequest {})).await?,
    };
    let now = now();
    printer
        .response(&response, |response| render::nat_report(&response.report.clone().unwrap_or_default(), now))
}

async fn connect(daemon: &Daemon, printer: &mut Printer, target: ConnectTarget) -> Result<(), Failure> {
    let mut client = daemon.peers();
    // A node id names a known peer: the daemon tries its addresses, then hole punching.
    let (request, address) = match target {
        ConnectTarget::Node(id) => {
            (ConnectPeerRequest { node_id: id.to_string(), ..Default::default() }, id.to_string())
        }
        ConnectTarget::Address(address) => {
            (ConnectPeerRequest { address: address.clone(), ..Default::default() }, address)
        }
    };
    let response = daemon.unary(client.connect_peer(request)).await?;
    let now = now();
    printer.response(&response, |response| {
        let peer = response.peer.clone().unwrap_or_default();
        let rtt = response.rtt.as_ref().map(crate::timefmt::format_rtt).unwrap_or_default();
        let remote = peer.connection.as_ref().map_or(address.as_str(), |c| c.remote_address.as_str());
        format!("verified {} at {remote} in {rtt}\n{}", peer.node_id, render::peer_detail(&peer, now))
    })
}

async fn query_peer(daemon: &Daemon, printer: &mut Printer, id: NodeId) -> Result<(), Failure> {
    let mut client = daemon.peers();
    let response = daemon
        .unary(client.query_peer_metadata(QueryPeerMetadataRequest { node_id: id.to_string() }))
        .await?;
    let now = now();
    printer.response(&response, |response| {
        let peer = response.peer.clone().unwrap_or_default();
        let rtt = response.rtt.as_ref().map(crate::timefmt::format_rtt).unwrap_or_default();
        format!("fresh record from {id}, round trip {rtt}\n{}", render::peer_detail(&peer, now))
    })
}

async fn leave_topic(daemon: &Daemon, printer: &mut Printer, topic: String) -> Result<(), Failure> {
    let mut client = daemon.topics();
    let request = LeaveTopicRequest { topic: topic.clone() };
    let response = daemon.unary(client.leave_topic(request)).await?;
    printer.response(&response, |response| {
        if response.left { format!("left {topic}\n") } else { format!("was not in {topic}\n") }
    })
}

async fn list_topics(daemon: &Daemon, printer: &mut Printer) -> Result<(), Failure> {
    let mut client = daemon.topics();
    let response = daemon.unary(client.list_topics(ListTopicsRequest {})).await?;
    let now = now();
    printer.response(&response, |response| {
        if response.topics.is_empty() {
            "no topics joined\n".to_owned()
        } else {
            render::topic_table(&response.topics, now)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_never_overshoot_a_limit() {
        assert_eq!(page_size_for(Wanted::All, 100, 500), 100);
        assert_eq!(page_size_for(Wanted::AtMost(100), 100, 0), 100);
        assert_eq!(page_size_for(Wanted::AtMost(5), 100, 0), 5);
        assert_eq!(page_size_for(Wanted::AtMost(250), 100, 200), 50);
        assert_eq!(page_size_for(Wanted::AtMost(u64::MAX), 1000, 0), 1000);
    }
}
