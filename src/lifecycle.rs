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
    match notify_without_blocking(states) {
        Ok(()) => {}
        // A status line or watchdog ping the manager has no room for is dropped: the next one replaces it.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            tracing::debug!("the service manager's notification queue is full; notification dropped");
        }
        // Not fatal: the service manager will notice through its own timeouts; say so for the operator.
        Err(e) => tracing::warn!(error = %e, "could not notify the service manager"),
    }
}

/// Sends one `sd_notify` datagram to `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`) and
/// never waits: a manager that does not read its socket fills the queue (ten datagrams by default,
/// `net.unix.max_dgram_qlen`), and a blocking send would then stall the thread that reports status, which is
/// the one that waits for SIGTERM. No-op outside a service manager.
fn notify_without_blocking(states: &[NotifyState]) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => notify_to(&target, states),
        None => Ok(()),
    }
}

fn notify_to(target: &std::ffi::OsStr, states: &[NotifyState]) -> std::io::Result<()> {
    use std::os::unix::net::UnixDatagram;
    let message: String = states.iter().map(|state| format!("{state}\n")).collect();
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    let bytes = target.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(message.as_bytes(), &address)?;
    } else {
        socket.send_to(message.as_bytes(), Path::new(target))?;
    }
    Ok(())
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

/// Installs the SIGHUP handler now (its default action would end the process) and returns the stream of
/// hangups: each asks for the configuration to be loaded again.
pub fn hangup_signals() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // Hangups while a reload is waiting fold into it: one reload reads the latest file anyway.
            let _ = sender.try_send(());
        }
    });
    Ok(receiver)
}

/// What a graceful stop is doing, for the stop deadline's message: set by each stage of the stop.
static STOP_STAGE: std::sync::Mutex<&'static str> =
    std::sync::Mutex::new("the runtime had not yet handled the signal");

/// Records the stage a graceful stop has reached (see [`arm_stop_deadline`]).
pub fn stop_stage(stage: &'static str) {
    *STOP_STAGE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = stage;
}

/// Guarantees that a stop signal ends the process within `limit`, whatever state the async runtime is in: a
/// plain thread, outside the runtime, watches for SIGTERM or SIGINT and, if the process is still alive `limit`
/// after the first one, says which stage of the stop hung and exits with `exit_code`. A service manager would
/// otherwise wait for its own stop timeout and then kill the daemon without a word.
pub fn arm_stop_deadline(limit: Duration, exit_code: i32) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::IntoRawFd;
    // A self-pipe: the signal handler itself writes a byte, so the deadline starts even if the async runtime
    // never sees the signal, and the thread sleeps in `read` until then instead of polling a flag.
    let (mut woken, wake) = std::os::unix::net::UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    // The write end lives as long as the process: the handlers may run at any time.
    let wake = wake.into_raw_fd();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the action only calls write(2), which is async-signal-safe, on a non-blocking socket that is
        // never closed (a full buffer just drops the byte: one is enough); it runs beside tokio's own handler
        // for the same signals (the registry chains them).
        unsafe {
            signal_hook_registry::register(signal, move || {
                let _ = libc::write(wake, [1u8].as_ptr().cast(), 1);
            })?;
        }
    }
    std::thread::Builder::new().name("stop-deadline".to_owned()).spawn(move || {
        let mut byte = [0u8; 1];
        if woken.read_exact(&mut byte).is_err() {
            // Cannot happen while the write end is open; without a wake-up there is no deadline to keep.
            return;
        }
        std::thread::sleep(limit);
        let stage = *STOP_STAGE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        eprintln!(
            "remote-network did not exit within {} of the stop signal (stuck while: {stage}); exiting now",
            crate::config::format_duration(limit)
        );
        std::process::exit(exit_code);
    })?;
    Ok(())
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

    /// Set in the child process of the stop-deadline test.
    const DEADLINE_CHILD: &str = "RN_STOP_DEADLINE_CHILD";

    /// A process whose stop hangs is ended by the deadline, with the stage it hung in: the test runs itself as a
    /// child that arms the deadline, signals itself and then never stops on its own.
    #[test]
    fn a_stop_that_hangs_is_ended_by_the_deadline_with_the_stage_it_hung_in() {
        if std::env::var_os(DEADLINE_CHILD).is_some() {
            arm_stop_deadline(Duration::from_millis(200), 7).expect("arm");
            stop_stage("pretending to flush the store");
            // SAFETY: raise(3) on our own process; the registered handler replaces the default action.
            unsafe { libc::raise(libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        let this = std::env::current_exe().expect("test binary");
        let output = std::process::Command::new(this)
            .args([
                "--exact",
                "lifecycle::tests::a_stop_that_hangs_is_ended_by_the_deadline_with_the_stage_it_hung_in",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(DEADLINE_CHILD, "1")
            .output()
            .expect("run the child");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(7), "exit status of the hung child; stderr: {stderr}");
        assert!(
            stderr.contains(
                "did not exit within 200ms of the stop signal (stuck while: pretending to flush the store)"
            ),
            "{stderr}"
        );
    }

    /// A service manager that stops reading its socket must not stall the daemon: once the queue is full,
    /// sending fails at once instead of waiting (it used to block the thread that waits for SIGTERM).
    #[test]
    fn notifications_to_a_manager_that_does_not_read_never_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let manager = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let status = [NotifyState::Status("serving; 0 connected")];
        let outcomes: Vec<_> = (0..200).map(|_| notify_to(path.as_os_str(), &status)).collect();
        assert!(outcomes[0].is_ok(), "the first notification is delivered: {:?}", outcomes[0]);
        let refused = outcomes.iter().filter_map(|o| o.as_ref().err()).collect::<Vec<_>>();
        assert!(!refused.is_empty(), "a full queue refuses instead of blocking");
        assert!(refused.iter().all(|e| e.kind() == std::io::ErrorKind::WouldBlock), "{refused:?}");
        let mut buf = [0u8; 128];
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=serving; 0 connected\n");
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rn-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let manager = std::os::unix::net::UnixDatagram::bind_addr(&address).expect("bind");
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), &[NotifyState::Ready]).expect("send");
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\n");
    }

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
