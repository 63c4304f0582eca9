//! Process lifecycle: talking to systemd (`Type=notify` readiness, status lines, watchdog pings), waiting for
//! SIGTERM/SIGINT, and exclusive locks that keep two daemons off the same data dir or control socket.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) the notifications are no-ops, so the same binary runs in a terminal.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the daemon is ready to serve, with a status line.
pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the one-line status `systemctl status` shows.
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd a graceful stop has begun.
pub fn notify_stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        // Not fatal: the service manager will notice through its own timeouts; say so for the operator.
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for (`WATCHDOG_USEC`), until `stop` is cancelled.
/// Returns `None` when no watchdog is configured.
///
/// The pings come from a runtime task, so a wedged runtime stops them and systemd restarts the service.
pub fn spawn_watchdog(stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    }))
}

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that resolves on the first of them.
///
/// Call it before the node reports ready: from the moment systemd sees `READY=1` it may send SIGTERM, and
/// without a handler the default action would kill the process before the store writer flushes.
pub fn shutdown_signals() -> std::io::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// An exclusive advisory lock on a file, held until dropped (or the process dies, which is what makes it safe
/// against crashes: the kernel releases it).
#[derive(Debug)]
pub struct ExclusiveLock {
    _file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{what} is in use by another running remote-network (lock {path} is held); stop that daemon first"
    )]
    Busy { what: String, path: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl ExclusiveLock {
    /// Takes the lock at `path` without waiting; `what` names the guarded resource in the error.
    pub fn acquire(path: &Path, what: &str) -> Result<Self, LockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| LockError::Io { path: path.to_path_buf(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path: path.to_path_buf() }),
            Err(TryLockError::WouldBlock) => {
                Err(LockError::Busy { what: what.to_owned(), path: path.to_path_buf() })
            }
            Err(TryLockError::Error(source)) => Err(LockError::Io { path: path.to_path_buf(), source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let first = ExclusiveLock::acquire(&path, "the data dir").expect("first");
        let err = ExclusiveLock::acquire(&path, "the data dir").expect_err("second");
        assert!(err.to_string().contains("the data dir is in use"), "{err}");
        drop(first);
        ExclusiveLock::acquire(&path, "the data dir").expect("after drop");
    }
}
