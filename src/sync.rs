//! Locking shared tables that stay consistent even when a holder panicked, throttling repeated log lines, and
//! running async parsers from synchronous fuzz entry points.
//!
//! The node's in-memory tables (punch and relay state, relay circuits) are only ever changed by single inserts,
//! removals and counter updates, so a panic in another holder cannot leave them half-changed: the lock is taken
//! regardless of poisoning rather than spreading one task's panic to every later caller.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Locks `mutex`, ignoring poisoning (see the module doc for when that is right).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `future` to completion on this thread's own single-threaded runtime (with timers), made once per
/// thread: for fuzz entry points, which call async stream readers on in-memory input millions of times.
/// `None` if no runtime could be made. Must not be called from inside a runtime.
pub fn block_on_local<F: std::future::Future>(future: F) -> Option<F::Output> {
    thread_local! {
        static RUNTIME: Option<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_time().build().ok();
    }
    RUNTIME.with(|runtime| runtime.as_ref().map(|runtime| runtime.block_on(future)))
}

/// Lets a repeated event be reported at most once per interval: each event is counted, and the first one after
/// the interval learns how many happened since the last report (itself included). For WARN lines about
/// refusals that a flood would otherwise repeat thousands of times a second.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// When the last report was made, and the events since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Self { interval, state: Mutex::new((None, 0)) }
    }

    /// Counts one event; `Some(count)` when it is time to report, with the events since the last report.
    pub fn event(&self) -> Option<u64> {
        let mut state = lock(&self.state);
        state.1 += 1;
        let now = Instant::now();
        if state.0.is_some_and(|last| now.duration_since(last) < self.interval) {
            return None;
        }
        state.0 = Some(now);
        Some(std::mem::take(&mut state.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_reports_the_first_event_then_counts_until_the_interval_passes() {
        let throttle = Throttle::new(Duration::from_millis(50));
        assert_eq!(throttle.event(), Some(1));
        assert_eq!(throttle.event(), None);
        assert_eq!(throttle.event(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.event(), Some(3), "the two held back and this one");
    }
}
