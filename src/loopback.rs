//! Running real daemons of this binary on one machine, on loopback: what `remote-network devnet` and `rn-bench`
//! both do. Each daemon gets its own directory (data dir, control socket, an empty config file so the
//! developer's own config stays out, and its log), serves the DHT from the start, and bootstraps only from the
//! node given, never from the public routers.
//!
//! Readiness and exit are awaited, not polled: each daemon reports `READY=1` to a notification socket of its own
//! (the `sd_notify` protocol it speaks to systemd), and a child's exit is seen through its pidfd.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

use crate::api::client::connect_unix;

/// Where a loopback daemon keeps its files, and the socket it reports readiness to.
#[derive(Debug, Clone)]
pub struct LoopbackPaths {
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Bound before the daemon starts, so that no notification is sent to a socket nobody listens on yet.
    notify: Arc<UnixDatagram>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    #[error("cannot prepare or start a daemon in {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("the daemon exited with {status} at start; see {log}")]
    Exited { status: std::process::ExitStatus, log: PathBuf },
    #[error("the daemon did not report ready within {timeout:?}; see {log}")]
    NotReady { timeout: Duration, log: PathBuf },
    #[error("the daemon reported ready but its control socket {socket} does not answer: {source}; see {log}")]
    Connect { socket: PathBuf, log: PathBuf, source: tonic::transport::Error },
}

/// The `start` command of a DHT-serving daemon living in `dir`, bootstrapping from `bootstrap` (or starting a
/// DHT of its own), not yet spawned: callers may add environment before spawning it.
pub fn command(
    binary: &Path,
    dir: &Path,
    bootstrap: Option<&str>,
) -> Result<(Command, LoopbackPaths), LoopbackError> {
    let io = |source| LoopbackError::Io { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, "").map_err(io)?;
    let notify_path = dir.join("notify.sock");
    match std::fs::remove_file(&notify_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let notify = UnixDatagram::bind(&notify_path).map_err(io)?;
    notify.set_nonblocking(true).map_err(io)?;
    let paths = LoopbackPaths {
        socket: dir.join("control.sock"),
        log: dir.join("daemon.log"),
        notify: Arc::new(notify),
    };
    let log = std::fs::File::create(&paths.log).map_err(io)?;
    let mut command = Command::new(binary);
    command
        .arg("start")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--control-socket")
        .arg(&paths.socket)
        .args([
            "--quic-listen",
            "127.0.0.1:0",
            "--dht-listen",
            "127.0.0.1:0",
            "--monitoring-listen",
            "127.0.0.1:0",
        ])
        .arg("--dht-server")
        // Readiness goes to us, not to the caller's own service manager, and nobody expects watchdog pings.
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    match bootstrap {
        Some(address) => command.args(["--bootstrap", address]),
        None => command.arg("--no-bootstrap"),
    };
    Ok((command, paths))
}

/// Waits until the daemon reports `READY=1` (it does once its control servers listen), then connects to its
/// control socket; kills it if it is not ready within `timeout`.
pub async fn wait_ready(
    child: &mut Child,
    paths: &LoopbackPaths,
    timeout: Duration,
) -> Result<Channel, LoopbackError> {
    let io = |source| LoopbackError::Io {
        dir: paths.log.parent().unwrap_or(Path::new(".")).to_path_buf(),
        source,
    };
    let started = tokio::time::timeout(timeout, ready_or_exited(child, paths)).await;
    match started {
        Ok(Ok(Started::Ready)) => connect_unix(&paths.socket).await.map_err(|source| {
            LoopbackError::Connect { socket: paths.socket.clone(), log: paths.log.clone(), source }
        }),
        Ok(Ok(Started::Exited(status))) => Err(LoopbackError::Exited { status, log: paths.log.clone() }),
        Ok(Err(e)) => Err(io(e)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(LoopbackError::NotReady { timeout, log: paths.log.clone() })
        }
    }
}

enum Started {
    Ready,
    Exited(ExitStatus),
}

async fn ready_or_exited(child: &mut Child, paths: &LoopbackPaths) -> std::io::Result<Started> {
    let notify = tokio::net::UnixDatagram::from_std(paths.notify.try_clone()?)?;
    let exit = exited(child);
    tokio::pin!(exit);
    let mut datagram = [0u8; 4096];
    loop {
        tokio::select! {
            received = notify.recv(&mut datagram) => {
                let message = String::from_utf8_lossy(&datagram[..received?]).into_owned();
                if message.lines().any(|line| line == "READY=1") {
                    return Ok(Started::Ready);
                }
            }
            status = &mut exit => return Ok(Started::Exited(status?)),
        }
    }
}

/// Waits until `child` exits, without polling (its pidfd becomes readable then), and reaps it.
pub async fn exited(child: &mut Child) -> std::io::Result<ExitStatus> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open(2) on a child we have not reaped (checked just above, and nothing else reaps it):
    // it returns a new descriptor we own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) };
    // SAFETY: an `OwnedFd` stays open and refers to the same pidfd until the `AsyncFd` that owns it drops.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let _exited = fd.readable().await?;
    child.wait()
}
