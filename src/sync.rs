//! Locking shared tables that stay consistent even when a holder panicked.
//!
//! The node's in-memory tables (punch and relay state, relay circuits) are only ever changed by single inserts,
//! removals and counter updates, so a panic in another holder cannot leave them half-changed: the lock is taken
//! regardless of poisoning rather than spreading one task's panic to every later caller.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poisoning (see the module doc for when that is right).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
