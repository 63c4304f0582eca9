//! The DHT actor: owns the joined topics and decides when each is looked up and announced.
//!
//! It never waits on the network itself. Lookups and announces run as tasks ([`super::tasks`]) that report
//! back when they end; the actor then schedules the next one. A lookup or announce of a topic is never run
//! twice at once: starting a new one aborts the old one, and leaving a topic aborts both.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mainline::async_dht::AsyncDht;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::mainline_node::NodeBuilder;
use super::own_node::OwnNode;
use super::tasks::{self, AnnounceJob, AnnounceReport, LookupJob, LookupReport, TaskContext, TaskEvent};
use super::{DhtOptions, DhtStatus, DhtTopicStatus, Discovery, Shared, topic_infohash};

/// First retry delay for an announce that failed; doubled on each retry up to the regular interval.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(5);
/// First retry delay for a lookup of a topic that has shown no peers yet; doubled on each retry up to the
/// regular interval. Shorter than an announce's: a node that just joined wants its first peers fast, and a peer
/// that joined a moment before us may have been announcing while our first lookup ran.
const FIRST_LOOKUP_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How often mainline's routing table size is read: the contact count `ListTopics` explains, and the watch
/// that looks up and announces every topic again the moment a node that had no contacts gets some.
const CONTACTS_CHECK: Duration = Duration::from_secs(2);
/// How long an empty routing table goes unreported (a bootstrap takes a moment), and the longest gap between
/// two reports of it.
const FIRST_NO_CONTACTS_REPORT: Duration = Duration::from_secs(10);
const MAX_NO_CONTACTS_REPORT: Duration = Duration::from_secs(30 * 60);
/// How long the routing table must stay empty, while nodes query us, before the mainline node is built again
/// with them as bootstrap nodes (see `super::mainline_node`); then the least time between two such rebuilds,
/// doubling up to the maximum while they do not help.
const FIRST_REBUILD_AFTER: Duration = Duration::from_secs(10);
const MAX_REBUILD_INTERVAL: Duration = Duration::from_secs(10 * 60);

pub(super) enum Command {
    Join(String),
    Leave(String),
    SetAnnouncePort(u16),
    /// New bootstrap nodes (a configuration reload): as configured, and resolved.
    SetBootstrap {
        configured: Vec<String>,
        resolved: Vec<std::net::SocketAddrV4>,
    },
    LookupNow(String),
    Status(oneshot::Sender<DhtStatus>),
    Topics(oneshot::Sender<Vec<DhtTopicStatus>>),
}

/// A lookup or announce task of one topic. `generation` tells its end report from that of a task it replaced.
struct RunningTask {
    generation: u64,
    handle: JoinHandle<()>,
}

struct TopicState {
    infohash: mainline::Id,
    lookup: Option<RunningTask>,
    /// `None` while a lookup runs: the next one is scheduled when it ends.
    next_lookup: Option<Instant>,
    /// Set once any lookup delivered a peer; until then lookups back off from FIRST_LOOKUP_RETRY_DELAY.
    found_peers: bool,
    lookup_retry_delay: Duration,
    announce: Option<RunningTask>,
    /// `None` while an announce runs or while the announce port is unknown.
    next_announce: Option<Instant>,
    announce_retry_delay: Duration,
    /// Outcomes of the last finished lookup and announce, with when they ended (ms since the epoch).
    last_lookup: Option<(i64, LookupReport)>,
    last_announce: Option<(i64, AnnounceReport)>,
}

impl TopicState {
    fn abort_tasks(&mut self) {
        for task in [self.lookup.take(), self.announce.take()].into_iter().flatten() {
            task.handle.abort();
        }
    }
}

pub(super) struct Actor {
    /// The mainline node; `None` only between dropping an old node and building its replacement, or after a
    /// rebuild failed (retried at each contacts check).
    dht: Option<AsyncDht>,
    builder: NodeBuilder,
    /// The bootstrap nodes added to the configured ones by the last rebuild.
    extra_bootstrap: Vec<std::net::SocketAddrV4>,
    /// The earliest time of the next rebuild, and the wait after it.
    next_rebuild: Option<(Instant, Duration)>,
    /// A rebuild decided while handling an event, run by the loop (it awaits).
    pending_rebuild: Option<Vec<std::net::SocketAddrV4>>,
    bootstrap_log: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    discoveries: mpsc::Sender<Discovery>,
    announce_interval: Duration,
    lookup_interval: Duration,
    announce_port: Option<u16>,
    /// A DHT started without bootstrap nodes is the first of its network: finding nobody is expected.
    has_bootstrap: bool,
    topics: HashMap<String, TopicState>,
    next_generation: u64,
    events: mpsc::UnboundedSender<TaskEvent>,
    event_receiver: mpsc::UnboundedReceiver<TaskEvent>,
    own: OwnNode,
    /// mainline's routing table size at the last check; `None` before the first.
    contacts: Option<usize>,
    /// Set while the routing table is empty: when to warn about it next.
    no_contacts: Option<NoContacts>,
    /// The bootstrap nodes as configured (host names included), for the warning.
    configured_bootstrap: Vec<String>,
}

struct NoContacts {
    since: Instant,
    next: Instant,
    interval: Duration,
    /// A warning went out, so the end of this state is worth a line too.
    reported: bool,
}

impl Actor {
    pub(super) fn new(
        dht: AsyncDht,
        builder: NodeBuilder,
        options: &DhtOptions,
        discoveries: mpsc::Sender<Discovery>,
        shared: Arc<Shared>,
    ) -> Actor {
        let (events, event_receiver) = mpsc::unbounded_channel();
        let own = OwnNode::new(
            match shared.local_addr {
                std::net::SocketAddr::V4(local) => local,
                // Dht::start refuses IPv6 listen addresses.
                std::net::SocketAddr::V6(_) => std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
            },
            options.mode != super::DhtMode::Client,
        );
        Actor {
            dht: Some(dht),
            builder,
            extra_bootstrap: Vec::new(),
            next_rebuild: None,
            pending_rebuild: None,
            bootstrap_log: None,
            shared,
            discoveries,
            // A zero interval would make the actor spin; a millisecond is as good as "right away".
            announce_interval: options.announce_interval.max(Duration::from_millis(1)),
            lookup_interval: options.lookup_interval.max(Duration::from_millis(1)),
            announce_port: options.announce_port,
            has_bootstrap: !options.bootstrap.is_empty(),
            topics: HashMap::new(),
            next_generation: 0,
            events,
            event_receiver,
            own,
            contacts: None,
            no_contacts: None,
            configured_bootstrap: options.bootstrap.clone(),
        }
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
    ) {
        // Whatever way this task ends (even a panic), waiters on `Dht::stopped` are released.
        let _stopped = self.shared.stopped.clone().drop_guard();
        if let Some(dht) = self.dht.clone() {
            let log = tasks::log_bootstrap(dht, self.has_bootstrap).in_current_span();
            self.bootstrap_log = Some(tokio::spawn(log));
        }
        let mut contacts_check = tokio::time::interval(CONTACTS_CHECK);
        contacts_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let next_deadline = self.next_deadline();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: nobody can join, leave or read discoveries any more.
                    None => break,
                },
                Some(event) = self.event_receiver.recv() => self.handle_event(event),
                () = sleep_until_deadline(next_deadline) => self.start_due_work(),
                _ = contacts_check.tick() => match self.dht.clone() {
                    Some(dht) => {
                        tokio::spawn(tasks::report_contacts(dht, self.events.clone()));
                    }
                    None if self.next_rebuild.is_none_or(|(at, _)| Instant::now() >= at) => {
                        let wait = self
                            .next_rebuild
                            .map_or(FIRST_REBUILD_AFTER, |(_, wait)| (wait * 2).min(MAX_REBUILD_INTERVAL));
                        self.next_rebuild = Some((Instant::now() + wait, wait));
                        self.pending_rebuild = Some(self.extra_bootstrap.clone());
                    }
                    None => {}
                },
            }
            if let Some(extra) = self.pending_rebuild.take() {
                self.rebuild(extra).await;
            }
        }

        self.release_node().await;
        tracing::info!("DHT stopped");
    }

    /// Stops every task that holds the mainline node and drops ours, so that its thread exits and frees the
    /// socket. Lookups and announces are left unscheduled: the caller schedules them again.
    async fn release_node(&mut self) {
        let mut handles: Vec<JoinHandle<()>> = self.bootstrap_log.take().into_iter().collect();
        for topic in self.topics.values_mut() {
            for task in [topic.lookup.take(), topic.announce.take()].into_iter().flatten() {
                handles.push(task.handle);
            }
            topic.next_lookup = None;
            topic.next_announce = None;
        }
        // Aborted tasks drop their mainline handles only once they are gone; wait so that dropping ours below
        // really is the last one and the mainline thread exits.
        for handle in handles {
            handle.abort();
            let _ = handle.await;
        }
        self.dht = None;
    }

    /// Builds the mainline node again with `extra` bootstrap nodes (the nodes that queried us), then looks up
    /// and announces every topic.
    async fn rebuild(&mut self, extra: Vec<std::net::SocketAddrV4>) {
        self.release_node().await;
        match self.builder.rebuild(&extra).await {
            Ok(node) => {
                tracing::info!(
                    bootstrap = ?extra,
                    "DHT routing table stayed empty while other nodes queried us: restarted the DHT node with \
                     them as bootstrap nodes"
                );
                let dht = node.as_async();
                self.bootstrap_log =
                    Some(tokio::spawn(tasks::log_bootstrap(dht.clone(), true).in_current_span()));
                self.dht = Some(dht);
                self.has_bootstrap = true;
                self.extra_bootstrap = extra;
                self.contacts = None;
                for state in self.topics.values_mut() {
                    state.next_lookup = None;
                    state.next_announce = None;
                }
                self.refresh_all_topics();
            }
            Err(error) => {
                tracing::error!(%error, "could not restart the DHT node; trying again shortly");
                self.extra_bootstrap = extra;
            }
        }
    }

    /// The nodes to rebuild with, when a rebuild is due: the table has been empty for a while, nodes queried
    /// us that the current node was not given as bootstrap nodes, and the last rebuild is long enough ago.
    fn rebuild_due(&mut self, now: Instant) -> Option<Vec<std::net::SocketAddrV4>> {
        // A node started without bootstrap nodes already adds whoever bootstraps from it (mainline's exception
        // for the first node of a network); bootstrap nodes of its own would only switch that off.
        if self.builder.bootstrap.is_empty() {
            return None;
        }
        let empty_since = self.no_contacts.as_ref()?.since;
        if now.duration_since(empty_since) < FIRST_REBUILD_AFTER {
            return None;
        }
        if self.next_rebuild.is_some_and(|(at, _)| now < at) {
            return None;
        }
        let known: Vec<std::net::SocketAddrV4> =
            self.builder.bootstrap.iter().chain(&self.extra_bootstrap).copied().collect();
        let requesters = self.builder.requesters.recent();
        if requesters.iter().all(|address| known.contains(address)) {
            return None;
        }
        let wait =
            self.next_rebuild.map_or(FIRST_REBUILD_AFTER, |(_, wait)| (wait * 2).min(MAX_REBUILD_INTERVAL));
        self.next_rebuild = Some((now + wait, wait));
        Some(requesters)
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Join(topic) => self.join(topic),
            Command::Leave(topic) => self.leave(&topic),
            Command::SetAnnouncePort(port) => self.set_announce_port(port),
            Command::SetBootstrap { configured, resolved } => {
                // mainline takes bootstrap nodes only when a node is built: build it again on the same socket,
                // keeping the nodes learnt from requesters and peer records.
                tracing::info!(bootstrap = ?configured, "DHT bootstrap nodes changed; restarting the DHT node");
                self.has_bootstrap = !resolved.is_empty() || !self.extra_bootstrap.is_empty();
                self.builder.bootstrap = resolved;
                self.configured_bootstrap = configured;
                self.next_rebuild = None;
                self.pending_rebuild = Some(self.extra_bootstrap.clone());
            }
            Command::LookupNow(topic) => {
                if self.topics.contains_key(&topic) {
                    self.start_lookup(&topic);
                } else {
                    tracing::debug!(topic = %topic, "lookup requested for a topic that is not joined; ignored");
                }
            }
            Command::Status(reply) => {
                // Without a node (mid-rebuild) the reply is dropped and the caller reports "not bootstrapped".
                if let Some(dht) = self.dht.clone() {
                    tokio::spawn(tasks::report_status(dht, self.shared.local_addr, reply));
                }
            }
            Command::Topics(reply) => {
                let _ = reply.send(self.topic_statuses());
            }
        }
    }

    fn join(&mut self, topic: String) {
        if self.topics.contains_key(&topic) {
            tracing::debug!(topic = %topic, "topic already joined");
            return;
        }
        let infohash = topic_infohash(&topic);
        tracing::info!(topic = %topic, %infohash, "joined DHT topic");
        self.topics.insert(
            topic.clone(),
            TopicState {
                infohash,
                lookup: None,
                next_lookup: None,
                found_peers: false,
                lookup_retry_delay: FIRST_LOOKUP_RETRY_DELAY.min(self.lookup_interval),
                announce: None,
                next_announce: None,
                announce_retry_delay: FIRST_RETRY_DELAY.min(self.announce_interval),
                last_lookup: None,
                last_announce: None,
            },
        );
        self.start_lookup(&topic);
        if self.announce_port.is_some() {
            self.start_announce(&topic);
        }
    }

    fn leave(&mut self, topic: &str) {
        match self.topics.remove(topic) {
            Some(mut state) => {
                state.abort_tasks();
                tracing::info!(topic = %topic, infohash = %state.infohash, "left DHT topic");
            }
            None => tracing::debug!(topic = %topic, "leave for a topic that is not joined; ignored"),
        }
    }

    fn set_announce_port(&mut self, port: u16) {
        if self.announce_port == Some(port) {
            return;
        }
        tracing::info!(port, "DHT announce port set; re-announcing joined topics");
        self.announce_port = Some(port);
        let topics: Vec<String> = self.topics.keys().cloned().collect();
        for topic in topics {
            self.start_announce(&topic);
        }
    }

    fn handle_event(&mut self, event: TaskEvent) {
        let now = Instant::now();
        match event {
            TaskEvent::LookupFinished { topic, generation, report } => {
                let lookup_interval = self.lookup_interval;
                let Some(state) = self.topics.get_mut(&topic) else { return };
                if state.lookup.as_ref().map(|task| task.generation) != Some(generation) {
                    return; // a lookup that was replaced in the meantime
                }
                state.lookup = None;
                state.found_peers |= report.delivered_peers > 0;
                state.last_lookup = Some((crate::clock::now_ms(), report));
                let delay = if state.found_peers {
                    lookup_interval
                } else {
                    let delay = state.lookup_retry_delay;
                    state.lookup_retry_delay = (delay * 2).min(lookup_interval);
                    delay
                };
                state.next_lookup = Some(now + jittered(delay));
            }
            TaskEvent::AnnounceFinished { topic, generation, report } => {
                let announce_interval = self.announce_interval;
                let Some(state) = self.topics.get_mut(&topic) else { return };
                if state.announce.as_ref().map(|task| task.generation) != Some(generation) {
                    return;
                }
                state.announce = None;
                let delay = if report.stored_remotely {
                    state.announce_retry_delay = FIRST_RETRY_DELAY.min(announce_interval);
                    announce_interval
                } else {
                    let delay = state.announce_retry_delay;
                    state.announce_retry_delay = (delay * 2).min(announce_interval);
                    delay
                };
                state.last_announce = Some((crate::clock::now_ms(), report));
                state.next_announce = Some(now + jittered(delay));
            }
            TaskEvent::Contacts { routing_table_size } => {
                let had_none = self.contacts.is_some_and(|size| size == 0);
                self.contacts = Some(routing_table_size);
                self.report_missing_contacts(routing_table_size == 0, now);
                if routing_table_size == 0 {
                    self.pending_rebuild = self.rebuild_due(now);
                } else {
                    self.next_rebuild = None;
                }
                if had_none && routing_table_size > 0 {
                    // Contacts came back (a bootstrap node answered at last, or a node that had lost every
                    // contact found one): whatever failed for want of them is worth doing now, not after its
                    // backoff, which may have grown to the full interval meanwhile.
                    tracing::info!(
                        routing_table_size,
                        "DHT has contacts again; looking up and announcing every topic"
                    );
                    self.refresh_all_topics();
                }
            }
        }
    }

    /// Warns while the routing table stays empty, first after [`FIRST_NO_CONTACTS_REPORT`] and then at
    /// doubling intervals (up to [`MAX_NO_CONTACTS_REPORT`]), and says when contacts are back: a dead bootstrap
    /// is never fatal, but an operator must hear of it without a line every two seconds.
    fn report_missing_contacts(&mut self, empty: bool, now: Instant) {
        if !empty {
            if self.no_contacts.take().is_some_and(|report| report.reported) {
                tracing::info!("DHT contacts found: the routing table is no longer empty");
            }
            return;
        }
        let report = self.no_contacts.get_or_insert(NoContacts {
            since: now,
            next: now + FIRST_NO_CONTACTS_REPORT,
            interval: FIRST_NO_CONTACTS_REPORT,
            reported: false,
        });
        if now < report.next {
            return;
        }
        report.reported = true;
        report.interval = (report.interval * 2).min(MAX_NO_CONTACTS_REPORT);
        report.next = now + report.interval;
        let for_secs = now.duration_since(report.since).as_secs();
        if self.has_bootstrap {
            tracing::warn!(
                for_secs,
                bootstrap = ?self.configured_bootstrap,
                learned = ?self.extra_bootstrap,
                "DHT has no contacts: none of its bootstrap nodes answers (they are asked again every 2 s). \
                 Check the addresses and that UDP reaches them; topics still work through peers that bootstrap \
                 from this node or that it knows from its store"
            );
        } else {
            tracing::info!(
                for_secs,
                "DHT has no contacts yet: started without bootstrap nodes, it waits for others to bootstrap from it"
            );
        }
    }

    /// Starts a lookup and an announce of every topic at once, with their retry delays reset.
    fn refresh_all_topics(&mut self) {
        let topics: Vec<String> = self.topics.keys().cloned().collect();
        for topic in topics {
            if let Some(state) = self.topics.get_mut(&topic) {
                state.lookup_retry_delay = FIRST_LOOKUP_RETRY_DELAY.min(self.lookup_interval);
                state.announce_retry_delay = FIRST_RETRY_DELAY.min(self.announce_interval);
            }
            self.start_lookup(&topic);
            self.start_announce(&topic);
        }
    }

    /// What `ListTopics` tells of each joined topic, from the actor's own state (no DHT round trip).
    fn topic_statuses(&self) -> Vec<DhtTopicStatus> {
        let now = Instant::now();
        let mut statuses: Vec<DhtTopicStatus> = self
            .topics
            .iter()
            .map(|(topic, state)| DhtTopicStatus {
                topic: topic.clone(),
                contacts: self.contacts,
                lookup_running: state.lookup.is_some(),
                last_lookup_ms: state.last_lookup.map(|(at, _)| at),
                last_lookup_peers: state.last_lookup.map(|(_, report)| report.delivered_peers),
                nodes_with_our_announce: state.last_lookup.map(|(_, report)| report.nodes_with_our_announce),
                announce_port: self.announce_port,
                announce_running: state.announce.is_some(),
                last_announce_ms: state.last_announce.as_ref().map(|(at, _)| *at),
                announce_stored_remotely: state
                    .last_announce
                    .as_ref()
                    .is_some_and(|(_, r)| r.stored_remotely),
                announce_stored_here: state.last_announce.as_ref().is_some_and(|(_, r)| r.stored_here),
                announce_error: state.last_announce.as_ref().and_then(|(_, r)| r.error.clone()),
                next_lookup_in: state.next_lookup.map(|at| at.saturating_duration_since(now)),
                has_bootstrap: self.has_bootstrap,
            })
            .collect();
        statuses.sort_by(|a, b| a.topic.cmp(&b.topic));
        statuses
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.topics.values().flat_map(|state| [state.next_lookup, state.next_announce]).flatten().min()
    }

    fn start_due_work(&mut self) {
        let now = Instant::now();
        let mut due_lookups = Vec::new();
        let mut due_announces = Vec::new();
        for (topic, state) in &self.topics {
            if state.next_lookup.is_some_and(|at| at <= now) {
                due_lookups.push(topic.clone());
            }
            if state.next_announce.is_some_and(|at| at <= now) {
                due_announces.push(topic.clone());
            }
        }
        for topic in due_lookups {
            self.start_lookup(&topic);
        }
        for topic in due_announces {
            self.start_announce(&topic);
        }
    }

    fn context(&self) -> Option<TaskContext> {
        Some(TaskContext {
            dht: self.dht.clone()?,
            shared: Arc::clone(&self.shared),
            events: self.events.clone(),
            own: self.own.clone(),
        })
    }

    fn start_lookup(&mut self, topic: &str) {
        let generation = self.next_generation();
        let context = self.context();
        let discoveries = self.discoveries.clone();
        let announce_port = self.announce_port;
        let Some(state) = self.topics.get_mut(topic) else { return };
        if let Some(previous) = state.lookup.take() {
            previous.handle.abort();
        }
        // Without a node (a rebuild failed) nothing is scheduled: the rebuild that brings one back schedules
        // every topic again, and a deadline left in the past would make the loop spin.
        let Some(context) = context else {
            state.next_lookup = None;
            return;
        };
        state.next_lookup = None;
        let job = LookupJob { topic: topic.to_owned(), infohash: state.infohash, generation, announce_port };
        let handle = tokio::spawn(tasks::run_lookup(context, job, discoveries));
        state.lookup = Some(RunningTask { generation, handle });
    }

    fn start_announce(&mut self, topic: &str) {
        let Some(port) = self.announce_port else { return };
        let generation = self.next_generation();
        let context = self.context();
        let Some(state) = self.topics.get_mut(topic) else { return };
        if let Some(previous) = state.announce.take() {
            previous.handle.abort();
        }
        let Some(context) = context else {
            state.next_announce = None;
            return;
        };
        state.next_announce = None;
        let job = AnnounceJob { topic: topic.to_owned(), infohash: state.infohash, generation, port };
        let handle = tokio::spawn(tasks::run_announce(context, job));
        state.announce = Some(RunningTask { generation, handle });
    }

    fn next_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// `interval` ±20%, so that nodes started together do not hit the same DHT nodes in lockstep.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.8 + 0.4 * random_fraction())
}

/// A number in [0, 1) that differs from call to call. Scheduling jitter needs no more than that, and std's
/// randomly keyed `RandomState` (fresh keys per instance) provides it without a dependency.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_twenty_percent_and_varies() {
        let interval = Duration::from_secs(100);
        let samples: Vec<Duration> = (0..200).map(|_| jittered(interval)).collect();
        assert!(samples.iter().all(|d| *d >= Duration::from_secs(80) && *d <= Duration::from_secs(120)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "jitter barely varies: {} distinct values", distinct.len());
    }
}
