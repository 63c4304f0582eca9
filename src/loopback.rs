//! Running real daemons of this binary on one machine, on loopback: what `remote-network devnet` and `rn-bench`
//! both do. Each daemon gets its own directory (data dir, control socket, an empty config file so the
//! developer's own config stays out, and its log), serves the DHT from the start, and bootstraps only from the
//! node given, never from the public routers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::api::client::connect_unix;

/// Where a loopback daemon keeps its files.
#[derive(Debug, Clone)]
pub struct LoopbackPaths {
    pub socket: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    #[error("cannot prepare or start a daemon in {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("the daemon exited with {status} at start; see {log}")]
    Exited { status: std::process::ExitStatus, log: PathBuf },
    #[error("the daemon did not open {socket} within {timeout:?}; see {log}")]
    NotReady { socket: PathBuf, timeout: Duration, log: PathBuf },
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
    let paths = LoopbackPaths { socket: dir.join("control.sock"), log: dir.join("daemon.log") };
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
        // Not the caller's service manager's business.
        .env_remove("NOTIFY_SOCKET")
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

/// Waits until the daemon's control socket answers; kills it if it does not within `timeout`.
pub async fn wait_ready(
    child: &mut Child,
    paths: &LoopbackPaths,
    timeout: Duration,
) -> Result<Channel, LoopbackError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LoopbackError::Exited { status, log: paths.log.clone() });
        }
        if let Ok(channel) = connect_unix(&paths.socket).await {
            return Ok(channel);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LoopbackError::NotReady {
                socket: paths.socket.clone(),
                timeout,
                log: paths.log.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
