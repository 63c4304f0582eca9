//! The dialer: turns candidate addresses (from the DHT, peer exchange, the operator, or stale stored peers) into
//! verified sessions, politely.
//!
//! One task owns all dial state. It skips addresses that are our own, being dialed, backing off after
//! failures, or belonging to a peer verified recently and still connected; it bounds concurrent dials and
//! queues the rest (boundedly); and it backs off exponentially, with jitter, per failing address. Every table
//! here has a bound and an eviction rule.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::connector::Dial;
use super::{ExchangeError, Inner, Verified};
use crate::api::names::NodeId;
use crate::store::{AddressSource, PeerQuery};

#[derive(Debug, Clone)]
pub struct DialerOptions {
    /// Dials in flight at once.
    pub max_concurrent: usize,
    /// First wait after a failed dial; doubles per consecutive failure.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A peer verified this recently on an address is not dialed there again while connected.
    pub recent_success: Duration,
    /// Addresses whose dial history is remembered (least recently used forgotten first).
    pub max_tracked_addresses: usize,
    /// Candidates waiting for a free dial slot; more are dropped (discovery will offer them again).
    pub max_queued: usize,
    /// How often stored peers of our topics that are not connected are dialed to refresh their records.
    pub refresh_interval: Duration,
    /// Longest one dial (handshake and `Hello`s) may take.
    pub dial_timeout: Duration,
}

impl Default for DialerOptions {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(15 * 60),
            recent_success: Duration::from_secs(60),
            max_tracked_addresses: 4096,
            max_queued: 1024,
            refresh_interval: Duration::from_secs(300),
            dial_timeout: Duration::from_secs(15),
        }
    }
}

pub enum DialOutcome {
    Verified(Verified),
    Failed(ExchangeError),
}

enum Job {
    Candidates(Vec<SocketAddr>, AddressSource),
    Now { address: SocketAddr, source: AddressSource, reply: oneshot::Sender<DialOutcome> },
}

/// Handle to the dialer task.
#[derive(Clone)]
pub struct Dialer {
    jobs: mpsc::Sender<Job>,
}

impl Dialer {
    pub(super) fn start(
        options: DialerOptions,
        exchange: Weak<Inner>,
        shutdown: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (jobs, queue) = mpsc::channel(256);
        let state = DialerState::new(options, exchange);
        tasks.spawn(state.run(queue, shutdown));
        Self { jobs }
    }

    /// Offers addresses for dialing; never waits (a full queue drops them: discovery repeats itself).
    pub fn candidates(&self, addresses: Vec<SocketAddr>, source: AddressSource) {
        if addresses.is_empty() {
            return;
        }
        if self.jobs.try_send(Job::Candidates(addresses, source)).is_err() {
            tracing::debug!("dialer busy: candidates dropped");
        }
    }

    /// Dials now, ignoring backoff, and waits for the outcome.
    pub async fn dial_now(&self, address: SocketAddr, source: AddressSource) -> DialOutcome {
        let (reply, outcome) = oneshot::channel();
        if self.jobs.send(Job::Now { address, source, reply }).await.is_err() {
            return DialOutcome::Failed(ExchangeError::Stopping);
        }
        outcome.await.unwrap_or(DialOutcome::Failed(ExchangeError::Stopping))
    }
}

#[derive(Debug, Clone)]
struct AddressHistory {
    failures: u32,
    next_attempt: Instant,
    last_success: Option<(Instant, NodeId)>,
    last_used: Instant,
}

/// The result of one dial, reported back to the dialer task.
struct Finished {
    address: SocketAddr,
    result: Result<Verified, ExchangeError>,
}

struct DialerState {
    options: DialerOptions,
    exchange: Weak<Inner>,
    in_flight: HashSet<SocketAddr>,
    waiters: HashMap<SocketAddr, Vec<oneshot::Sender<DialOutcome>>>,
    queued: VecDeque<(SocketAddr, AddressSource)>,
    history: HashMap<SocketAddr, AddressHistory>,
    /// Addresses that led back to this node: never dialed again (bounded like `history`).
    own_addresses: HashSet<SocketAddr>,
    jitter: Jitter,
}

impl DialerState {
    fn new(options: DialerOptions, exchange: Weak<Inner>) -> Self {
        Self {
            options,
            exchange,
            in_flight: HashSet::new(),
            waiters: HashMap::new(),
            queued: VecDeque::new(),
            history: HashMap::new(),
            own_addresses: HashSet::new(),
            jitter: Jitter::new(),
        }
    }

    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let (done_tx, mut done) = mpsc::channel::<Finished>(self.options.max_concurrent.max(1));
        let mut refresh = tokio::time::interval(self.options.refresh_interval);
        refresh.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                job = jobs.recv() => match job {
                    None => return,
                    Some(Job::Candidates(addresses, source)) => {
                        for address in addresses {
                            if self.worth_dialing(address) && self.queued.len() < self.options.max_queued {
                                self.queued.push_back((address, source));
                            }
                        }
                    }
                    Some(Job::Now { address, source, reply }) => {
                        self.waiters.entry(address).or_default().push(reply);
                        if !self.in_flight.contains(&address) {
                            self.spawn_dial(address, source, &done_tx);
                        }
                    }
                },
                Some(finished) = done.recv() => self.finish(finished),
                _ = refresh.tick() => self.queue_stale_peers().await,
            }
            self.start_queued(&done_tx);
        }
    }

    /// Whether a discovered address deserves a dial now.
    fn worth_dialing(&self, address: SocketAddr) -> bool {
        if self.own_addresses.contains(&address) || self.in_flight.contains(&address) {
            return false;
        }
        if self.queued.iter().any(|(a, _)| *a == address) {
            return false;
        }
        let Some(exchange) = self.exchange.upgrade() else { return false };
        if exchange.endpoint.local_addr().is_ok_and(|local| local == address) {
            return false;
        }
        if let Some(history) = self.history.get(&address) {
            if Instant::now() < history.next_attempt {
                return false;
            }
            if let Some((at, peer)) = history.last_success
                && at.elapsed() < self.options.recent_success
                && exchange.sessions.get(&peer).is_some()
            {
                return false;
            }
        }
        // Already connected through this very address (inbound or outbound).
        !exchange.sessions.any(|s| s.connection().remote_address() == address)
    }

    fn start_queued(&mut self, done: &mpsc::Sender<Finished>) {
        while self.in_flight.len() < self.options.max_concurrent {
            let Some((address, source)) = self.queued.pop_front() else { return };
            if self.worth_dialing(address) {
                self.spawn_dial(address, source, done);
            }
        }
    }

    fn spawn_dial(&mut self, address: SocketAddr, source: AddressSource, done: &mpsc::Sender<Finished>) {
        let Some(exchange) = self.exchange.upgrade() else { return };
        self.in_flight.insert(address);
        let done = done.clone();
        let timeout = self.options.dial_timeout;
        let span = tracing::info_span!("exchange.dial", %address, ?source);
        exchange.tasks.clone().spawn(tracing::Instrument::instrument(
            async move {
                let dial = Dial { deadline: Some(timeout), ..Dial::to(address, None, source) };
                let result = exchange.dial(dial).await;
                let _ = done.send(Finished { address, result }).await;
            },
            span,
        ));
    }

    fn finish(&mut self, finished: Finished) {
        let Finished { address, result } = finished;
        self.in_flight.remove(&address);
        let now = Instant::now();
        self.forget_least_recently_used();
        let history = self.history.entry(address).or_insert(AddressHistory {
            failures: 0,
            next_attempt: now,
            last_success: None,
            last_used: now,
        });
        history.last_used = now;
        match &result {
            Ok(verified) => {
                history.failures = 0;
                history.next_attempt = now;
                history.last_success = Some((now, verified.node_id));
            }
            Err(ExchangeError::SelfConnection) => {
                self.history.remove(&address);
                if self.own_addresses.len() < self.options.max_tracked_addresses {
                    self.own_addresses.insert(address);
                }
            }
            Err(_) => {
                history.failures = history.failures.saturating_add(1);
                let wait = backoff(self.options.backoff_base, self.options.backoff_max, history.failures);
                history.next_attempt = now + self.jitter.spread(wait);
            }
        }
        let mut result = Some(result);
        for waiter in self.waiters.remove(&address).unwrap_or_default() {
            let outcome = match result.take() {
                Some(Ok(verified)) => DialOutcome::Verified(verified),
                Some(Err(e)) => DialOutcome::Failed(e),
                None => DialOutcome::Failed(ExchangeError::TimedOut("a concurrent dial of the same address")),
            };
            let _ = waiter.send(outcome);
        }
    }

    fn forget_least_recently_used(&mut self) {
        while self.history.len() >= self.options.max_tracked_addresses {
            let oldest = self.history.iter().min_by_key(|(_, h)| h.last_used).map(|(a, _)| *a);
            match oldest {
                Some(address) => self.history.remove(&address),
                None => return,
            };
        }
    }

    /// Queues the best address of each stored peer of our topics that is not connected and was not seen
    /// within the refresh interval, so its record does not go stale.
    async fn queue_stale_peers(&mut self) {
        let Some(exchange) = self.exchange.upgrade() else { return };
        let cutoff =
            super::now_ms() - i64::try_from(self.options.refresh_interval.as_millis()).unwrap_or(i64::MAX);
        for topic in exchange.publisher.topics() {
            let query = PeerQuery { topic: Some(topic), limit: 100, ..Default::default() };
            let Ok(page) = exchange.store.list_peers(query).await else { continue };
            for peer in page.peers.into_iter().filter(|p| p.last_seen_ms < cutoff) {
                if exchange.sessions.get(&peer.node_id).is_some() {
                    continue;
                }
                let Ok(Some(detail)) = exchange.store.get_peer(peer.node_id).await else { continue };
                let best = detail.addresses.first().map(|a| a.address);
                if let Some(address) = best
                    && self.worth_dialing(address)
                    && self.queued.len() < self.options.max_queued
                {
                    self.queued.push_back((address, AddressSource::Record));
                }
            }
        }
    }
}

/// `base * 2^(failures-1)`, capped at `max`.
fn backoff(base: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// Spreads waits by ±25% so that many nodes failing together do not retry together.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        // A fixed seed only makes retries less spread out; it is not a security property.
        let _ = getrandom::fill(&mut seed);
        Self(u64::from_le_bytes(seed) | 1)
    }

    fn spread(&mut self, wait: Duration) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let permille = 750 + (self.0 % 501); // 0.75 ..= 1.25
        wait.saturating_mul(permille as u32) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(900);
        assert_eq!(backoff(base, max, 1), Duration::from_secs(5));
        assert_eq!(backoff(base, max, 2), Duration::from_secs(10));
        assert_eq!(backoff(base, max, 5), Duration::from_secs(80));
        assert_eq!(backoff(base, max, 50), max);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let mut jitter = Jitter::new();
        for _ in 0..1000 {
            let spread = jitter.spread(Duration::from_secs(100));
            assert!((75..=125).contains(&spread.as_secs()), "{spread:?}");
        }
    }
}
