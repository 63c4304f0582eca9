//! Admission of inbound QUIC connections: which connection attempts get handshake state, which are asked to
//! prove their address first (a stateless QUIC Retry, RFC 9000 §8.1.2), and which are refused.
//!
//! A connection attempt costs us state from its first packet until its handshake completes or times out. An
//! attacker who sends ClientHellos and never continues (from one socket, or from spoofed addresses) would
//! otherwise hold every slot for a whole handshake timeout. The rules, in order:
//!
//! 1. At `max_connections` live connections, new attempts are refused (verified peers keep their slots).
//! 2. An attempt whose address is not validated is sent a Retry when handshakes in progress reach
//!    `retry_threshold`, or when its IP already has `max_unvalidated_per_ip` unvalidated handshakes in progress.
//!    A Retry keeps no state; a real client answers it within one round trip and comes back validated, while a
//!    flooder that does not read our packets (or spoofs its source) never does. Below the threshold nobody pays
//!    the extra round trip, so first contact stays at one.
//! 3. At `max_pending_handshakes` handshakes in progress, even validated attempts are refused: the slots they
//!    would take belong to peers that finish their handshakes.
//!
//! Slots are released when the handshake completes, fails or times out (see [`PendingHandshake`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::Throttle;

/// Counts kept for operators: what admission did since the endpoint started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Inbound handshakes in progress now.
    pub pending_handshakes: u64,
    /// Attempts sent a Retry to prove their address.
    pub retries_sent: u64,
    /// Attempts refused because `max_connections` connections were live.
    pub refused_connection_limit: u64,
    /// Attempts refused because `max_pending_handshakes` handshakes were in progress.
    pub refused_pending_limit: u64,
    /// Inbound handshakes that did not complete within the inbound handshake timeout.
    pub handshakes_timed_out: u64,
}

/// What to do with one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    Accept,
    Retry,
    RefuseConnectionLimit,
    RefusePendingLimit,
}

/// The limits admission applies; a part of [`super::QuicLimits`].
#[derive(Debug, Clone, Copy)]
pub(super) struct AdmissionLimits {
    pub max_connections: usize,
    pub max_pending_handshakes: usize,
    pub retry_threshold: usize,
    pub max_unvalidated_per_ip: usize,
}

#[derive(Default)]
struct Pending {
    total: usize,
    unvalidated_by_ip: HashMap<IpAddr, usize>,
}

/// How often at most a refusal is logged at WARN; the refusals in between are counted into the next line.
const REFUSAL_WARN_INTERVAL: Duration = Duration::from_secs(10);

pub(super) struct Admission {
    pending: Mutex<Pending>,
    retries_sent: AtomicU64,
    refused_connection_limit: AtomicU64,
    refused_pending_limit: AtomicU64,
    handshakes_timed_out: AtomicU64,
    refusal_warnings: Throttle,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            pending: Mutex::default(),
            retries_sent: AtomicU64::default(),
            refused_connection_limit: AtomicU64::default(),
            refused_pending_limit: AtomicU64::default(),
            handshakes_timed_out: AtomicU64::default(),
            refusal_warnings: Throttle::new(REFUSAL_WARN_INTERVAL),
        }
    }
}

impl Admission {
    /// Decides about an attempt from `ip` and, when it is accepted, takes its slot: the returned guard releases
    /// it. Deciding and taking are one step, so concurrent attempts cannot both take the last slot.
    pub(super) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        validated: bool,
        live_connections: usize,
        limits: &AdmissionLimits,
    ) -> (Decision, Option<PendingHandshake>) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let unvalidated_here = pending.unvalidated_by_ip.get(&ip).copied().unwrap_or(0);
        let decision = decide(limits, live_connections, pending.total, validated, unvalidated_here);
        match decision {
            Decision::Accept => {
                pending.total += 1;
                if !validated {
                    *pending.unvalidated_by_ip.entry(ip).or_insert(0) += 1;
                }
                drop(pending);
                let guard = PendingHandshake { admission: self.clone(), ip: (!validated).then_some(ip) };
                return (decision, Some(guard));
            }
            Decision::Retry => {
                self.retries_sent.fetch_add(1, Ordering::Relaxed);
            }
            Decision::RefuseConnectionLimit => {
                self.refused_connection_limit.fetch_add(1, Ordering::Relaxed);
            }
            Decision::RefusePendingLimit => {
                self.refused_pending_limit.fetch_add(1, Ordering::Relaxed);
            }
        }
        (decision, None)
    }

    /// Counts a refusal towards the next WARN line, and writes one if the last is long enough ago.
    pub(super) fn log_refusal(&self, why: &str, limit: usize) {
        let Some(refused) = self.refusal_warnings.event() else { return };
        tracing::warn!(
            refused,
            limit,
            "inbound QUIC connections refused: {why}; if this is not a flood, raise the limit (see `quic.*` in \
             the configuration)"
        );
    }

    pub(super) fn count_timeout(&self) {
        self.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn stats(&self) -> AdmissionStats {
        let pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).total;
        AdmissionStats {
            pending_handshakes: pending as u64,
            retries_sent: self.retries_sent.load(Ordering::Relaxed),
            refused_connection_limit: self.refused_connection_limit.load(Ordering::Relaxed),
            refused_pending_limit: self.refused_pending_limit.load(Ordering::Relaxed),
            handshakes_timed_out: self.handshakes_timed_out.load(Ordering::Relaxed),
        }
    }

    fn release(&self, ip: Option<IpAddr>) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.total = pending.total.saturating_sub(1);
        if let Some(ip) = ip
            && let Some(count) = pending.unvalidated_by_ip.get_mut(&ip)
        {
            *count -= 1;
            if *count == 0 {
                pending.unvalidated_by_ip.remove(&ip);
            }
        }
    }
}

/// The rules of the module documentation, without state.
fn decide(
    limits: &AdmissionLimits,
    live_connections: usize,
    pending: usize,
    validated: bool,
    unvalidated_from_this_ip: usize,
) -> Decision {
    if live_connections >= limits.max_connections {
        return Decision::RefuseConnectionLimit;
    }
    if !validated
        && (pending >= limits.retry_threshold || unvalidated_from_this_ip >= limits.max_unvalidated_per_ip)
    {
        return Decision::Retry;
    }
    if pending >= limits.max_pending_handshakes {
        return Decision::RefusePendingLimit;
    }
    Decision::Accept
}

/// One inbound handshake's slot, released when dropped (the handshake completed, failed or timed out).
pub(super) struct PendingHandshake {
    admission: Arc<Admission>,
    /// Set when the attempt was not validated: its IP's unvalidated count is released too.
    ip: Option<IpAddr>,
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.admission.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AdmissionLimits = AdmissionLimits {
        max_connections: 100,
        max_pending_handshakes: 20,
        retry_threshold: 8,
        max_unvalidated_per_ip: 3,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, last])
    }

    #[test]
    fn one_source_gets_its_share_of_unvalidated_slots_then_retries() {
        let admission = Arc::new(Admission::default());
        let held: Vec<_> = (0..3).map(|_| admission.admit(ip(1), false, 0, &LIMITS)).collect();
        assert!(held.iter().all(|(d, g)| *d == Decision::Accept && g.is_some()));
        assert_eq!(admission.admit(ip(1), false, 0, &LIMITS).0, Decision::Retry);
        // Another source is not held up by the first, and a validated attempt from the first is accepted.
        assert_eq!(admission.admit(ip(2), false, 0, &LIMITS).0, Decision::Accept);
        assert_eq!(admission.admit(ip(1), true, 0, &LIMITS).0, Decision::Accept);
        assert_eq!(admission.stats().retries_sent, 1);
    }

    #[test]
    fn slots_come_back_when_handshakes_end() {
        let admission = Arc::new(Admission::default());
        let held: Vec<_> = (0..3).map(|_| admission.admit(ip(1), false, 0, &LIMITS).1).collect();
        assert_eq!(admission.stats().pending_handshakes, 3);
        drop(held);
        assert_eq!(admission.stats().pending_handshakes, 0);
        assert_eq!(admission.admit(ip(1), false, 0, &LIMITS).0, Decision::Accept);
    }

    #[test]
    fn above_the_threshold_every_unvalidated_attempt_must_prove_its_address() {
        let admission = Arc::new(Admission::default());
        let _held: Vec<_> = (0..8).map(|i| admission.admit(ip(i), false, 0, &LIMITS)).collect();
        assert_eq!(admission.admit(ip(200), false, 0, &LIMITS).0, Decision::Retry);
        assert_eq!(admission.admit(ip(200), true, 0, &LIMITS).0, Decision::Accept);
    }

    #[test]
    fn full_endpoints_refuse_even_validated_attempts() {
        let admission = Arc::new(Admission::default());
        let _held: Vec<_> = (0..20).map(|_| admission.admit(ip(1), true, 0, &LIMITS)).collect();
        assert_eq!(admission.admit(ip(1), true, 0, &LIMITS).0, Decision::RefusePendingLimit);
        assert_eq!(admission.admit(ip(3), true, 100, &LIMITS).0, Decision::RefuseConnectionLimit);
        let stats = admission.stats();
        assert_eq!((stats.refused_pending_limit, stats.refused_connection_limit), (1, 1));
    }
}
