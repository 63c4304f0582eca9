//! Shared harness of the end-to-end tests: starts the real `remote-network` binary in a temporary directory,
//! waits for its systemd-style `READY=1` on a notify socket the test owns, and drives it with the real `rnctl`
//! binary or a tonic client. Every process is killed and every file removed when the test ends, pass or fail.

#![allow(dead_code)]

/// `rnctl`'s exit statuses, as the README's table states them (`tests/cli_exit_codes.rs` checks every row).
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const CONNECT: i32 = 3;
    pub const DAEMON: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
}

pub mod lab;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use remote_network::api::client;
use tempfile::TempDir;
use tonic::transport::Channel;

/// Longest a daemon may take to report ready on a loaded machine before the test gives up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variables the daemon reads; cleared so the developer's shell cannot change a test.
const SCRUBBED_ENV: &[&str] = &[
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "XDG_RUNTIME_DIR",
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUST_LOG",
    "JOURNAL_STREAM",
    "RNCTL_SOCKET",
    "RNCTL_ENDPOINT",
    "RNCTL_TOKEN",
];

pub fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_remote-network"))
}

/// `rnctl` lives in another package of the workspace, so cargo does not hand its path to these tests; it is
/// built beside the daemon by `tests/run.sh`.
pub fn rnctl_bin() -> PathBuf {
    let path = daemon_bin().with_file_name("rnctl");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (tests/run.sh does)",
        path.display()
    );
    path
}

/// A command with the daemon's environment variables removed.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars() {
        if key.starts_with("RN_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// One test's directory: data dir, control socket, config file and logs of a daemon.
pub struct NodeDir {
    pub dir: TempDir,
    socket: PathBuf,
    data_dir: PathBuf,
    bootstrap: Option<String>,
    dht_server: bool,
    quic_listen: String,
    dht_listen: String,
    /// `--monitoring-listen`; `None` leaves the daemon its built-in default.
    monitoring_listen: Option<String>,
}

impl NodeDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("rn-test-").tempdir().expect("tempdir");
        let socket = dir.path().join("control.sock");
        let data_dir = dir.path().join("data");
        let loopback = "127.0.0.1:0".to_owned();
        Self {
            dir,
            socket,
            data_dir,
            bootstrap: None,
            dht_server: false,
            quic_listen: loopback.clone(),
            // An ephemeral port, so that daemons of tests running at once never compete for the default.
            monitoring_listen: Some(loopback.clone()),
            dht_listen: loopback,
        }
    }

    /// Starts the daemon without `--monitoring-listen`, so it uses its built-in default monitoring address.
    pub fn with_default_monitoring(mut self) -> Self {
        self.monitoring_listen = None;
        self
    }

    /// Listens for QUIC (and dials) on `address` instead of an ephemeral loopback port.
    pub fn with_quic_listen(mut self, address: &str) -> Self {
        self.quic_listen = address.to_owned();
        self
    }

    /// Runs the DHT on `address` instead of an ephemeral loopback port.
    pub fn with_dht_listen(mut self, address: &str) -> Self {
        self.dht_listen = address.to_owned();
        self
    }

    /// Bootstraps the DHT from `address` instead of starting a DHT of its own.
    pub fn with_bootstrap(mut self, address: &str) -> Self {
        self.bootstrap = Some(address.to_owned());
        self
    }

    /// Serves the DHT from the start (`--dht-server`).
    pub fn dht_server(mut self) -> Self {
        self.dht_server = true;
        self
    }

    /// Points this node at another control socket (for example one a live daemon owns).
    pub fn with_socket(mut self, socket: PathBuf) -> Self {
        self.socket = socket;
        self
    }

    /// Points this node at another data dir (for example one a live daemon owns).
    pub fn with_data_dir(mut self, data_dir: PathBuf) -> Self {
        self.data_dir = data_dir;
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    pub fn config_file(&self) -> PathBuf {
        let path = self.path().join("config.toml");
        if !path.exists() {
            std::fs::write(&path, "").expect("write config");
        }
        path
    }

    pub fn database(&self) -> PathBuf {
        self.data_dir().join("peers.db")
    }

    /// The daemon's `start` command for this directory, not yet spawned. Offline: it bootstraps only from what
    /// the test gave (`--no-bootstrap` otherwise), never from the public routers.
    pub fn start_command(&self) -> Command {
        let mut cmd = clean_command(&daemon_bin());
        cmd.arg("start")
            .arg("--config")
            .arg(self.config_file())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--control-socket")
            .arg(self.socket())
            .args(["--quic-listen", &self.quic_listen, "--dht-listen", &self.dht_listen])
            .env("HOME", self.path())
            .env("RUST_LOG", "info");
        if let Some(address) = &self.monitoring_listen {
            cmd.args(["--monitoring-listen", address]);
        }
        match &self.bootstrap {
            Some(address) => cmd.args(["--bootstrap", address]),
            None => cmd.arg("--no-bootstrap"),
        };
        if self.dht_server {
            cmd.arg("--dht-server");
        }
        cmd
    }

    /// Starts the daemon and waits until it reports ready.
    pub fn start(&self) -> TestNode {
        self.start_with(|_| {})
    }

    /// Starts the daemon with extra arguments or environment, and waits until it reports ready.
    pub fn start_with(&self, adjust: impl FnOnce(&mut Command)) -> TestNode {
        let mut cmd = self.start_command();
        adjust(&mut cmd);
        TestNode::spawn(self, cmd).wait_ready()
    }

    /// Runs the daemon expecting it to fail at start; returns its exit status and stderr.
    pub fn start_expecting_failure(&self, adjust: impl FnOnce(&mut Command)) -> (ExitStatus, String) {
        let mut cmd = self.start_command();
        adjust(&mut cmd);
        self.run_expecting_failure(cmd)
    }

    /// Spawns a prepared command (such as [`in_mount_namespace`]) and waits until it reports ready.
    pub fn spawn_ready(&self, cmd: Command) -> TestNode {
        TestNode::spawn(self, cmd).wait_ready()
    }

    /// Runs a prepared command expecting it to fail; returns its exit status and stderr.
    pub fn run_expecting_failure(&self, cmd: Command) -> (ExitStatus, String) {
        let mut node = TestNode::spawn(self, cmd);
        let status = node.wait_exit(READY_TIMEOUT).expect("the daemon should have exited");
        (status, node.stderr())
    }

    /// Runs `rnctl --socket <this node's socket> ARGS`.
    pub fn rnctl(&self, args: &[&str]) -> Output {
        rnctl_with(|cmd| {
            cmd.arg("--socket").arg(self.socket()).args(args);
        })
    }

    /// A tonic channel to this node's control socket.
    pub async fn channel(&self) -> Channel {
        client::connect_unix(&self.socket()).await.expect("connect to control socket")
    }
}

/// Runs `rnctl` with a clean environment, after `adjust` adds arguments or variables.
pub fn rnctl_with(adjust: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = clean_command(&rnctl_bin());
    adjust(&mut cmd);
    cmd.stdin(Stdio::null()).output().expect("run rnctl")
}

/// A running daemon, killed when dropped.
pub struct TestNode {
    child: Child,
    notify: UnixDatagram,
    stderr_path: PathBuf,
    pub socket: PathBuf,
}

impl TestNode {
    fn spawn(dir: &NodeDir, mut cmd: Command) -> Self {
        let notify_path = dir.path().join(format!("notify-{}.sock", unique()));
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        let stderr_path = dir.path().join(format!("daemon-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path).expect("create log");
        let child = cmd
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn remote-network");
        Self { child, notify, stderr_path, socket: dir.socket() }
    }

    /// Waits for `READY=1`; panics with the daemon's log if it exits or times out first.
    fn wait_ready(mut self) -> Self {
        let deadline = Instant::now() + READY_TIMEOUT;
        self.notify.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]);
                if message.lines().any(|l| l == "READY=1") {
                    return self;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("remote-network exited with {status} before it was ready:\n{}", self.stderr());
            }
        }
        panic!("remote-network was not ready within {READY_TIMEOUT:?}:\n{}", self.stderr());
    }

    /// Every notification received so far (after readiness), waiting up to `wait` for one containing `needle`.
    pub fn wait_notification(&self, needle: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if message.contains(needle) {
                    return Some(message);
                }
            }
        }
        None
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        match self.wait_exit(Duration::from_secs(30)) {
            Some(status) => (status, self.stderr()),
            None => {
                let stacks = self.thread_stacks();
                panic!(
                    "daemon did not stop within 30 s of SIGTERM\n---- threads ----\n{stacks}\n---- log ----\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Every thread's stack of the running daemon, from gdb when the machine has it: what a hang waits on.
    fn thread_stacks(&self) -> String {
        let pid = self.pid().to_string();
        match Command::new("gdb")
            .args(["-p", &pid, "-batch", "-ex", "thread apply all bt 30"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => format!("(no stacks: gdb did not run: {e})"),
        }
    }

    pub fn wait_exit(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Parses rnctl's JSON output, with the output in the panic message if it is not JSON.
pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("rnctl printed no JSON ({e}):\n{}\n{}", stdout(output), stderr(output)))
}

/// Whether a test that needs root must be skipped: prints a loud SKIPPED line when so. With
/// `RN_TESTS_REQUIRE_ROOT=1` (set by `.ci/run`) a missing root is a failure instead, so CI cannot pass by
/// skipping.
pub fn skip_without_root(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    assert!(
        std::env::var_os("RN_TESTS_REQUIRE_ROOT").is_none(),
        "{test} needs root ({why}) and CI requires it"
    );
    eprintln!("SKIPPED (needs root): {test}: {why}");
    true
}

/// Wraps a command so that it runs in a private mount namespace after the shell `setup` ran there. Mounts made
/// by `setup` vanish with the process, so nothing is left on the host even if the test fails.
pub fn in_mount_namespace(cmd: &Command, setup: &str) -> Command {
    let setup = format!("set -e; {setup}; exec \"$@\"");
    wrap(cmd, "unshare", &["--mount", "--propagation", "private", "--", "sh", "-c", &setup, "sh"])
}

/// Wraps a command so that it runs in network namespace `netns` (`ip netns exec` execs the program itself, so
/// the child's pid is the program's).
pub fn in_network_namespace(cmd: &Command, netns: &str) -> Command {
    wrap(cmd, "ip", &["netns", "exec", netns])
}

/// `launcher ARGS... PROGRAM PROGRAM-ARGS...` with the command's environment changes carried over.
fn wrap(cmd: &Command, launcher: &str, args: &[&str]) -> Command {
    let mut wrapped = Command::new(launcher);
    wrapped.args(args).arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}
