//! The README's example of separately started daemons, run as the README writes it: the fenced block under "To
//! connect separately started daemons" is read from README.md when the test runs (so the README stays the one
//! source of truth), and each of its commands goes through `sh -c` with `remote-network` and `rnctl` resolving to
//! the binaries just built. The only change made to the commands is that their `/tmp/` paths point into a
//! private temporary directory.
//!
//! The daemons start in the background, one after the other once the previous one is ready, without
//! `--monitoring-listen` (the README passes none), so the second one finds the default monitoring address taken
//! by the first. A fixed port the block uses that another program holds fails the test with that said.
//!
//! The README's architecture table is checked against the source tree: every file and folder of `src/` is in it.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{READY_TIMEOUT, clean_command, daemon_bin, rnctl_bin};
use tempfile::TempDir;

/// The README sentence the block follows.
const SECTION: &str = "To connect separately started daemons";
/// Longest one `rnctl` command of the block may take before the test calls it hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The commands of the first `sh` block after [`SECTION`]: one per line, a line ending in a backslash joined
/// with the next exactly as the shell will join them.
fn readme_commands() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, after) = readme.split_once(SECTION).unwrap_or_else(|| panic!("README.md has no {SECTION:?}"));
    let (_, block) = after.split_once("```sh\n").expect("a ```sh block follows the section");
    let (block, _) = block.split_once("\n```").expect("the block is closed");
    let mut commands = Vec::new();
    let mut command = String::new();
    for line in block.lines() {
        command.push_str(line);
        if line.ends_with('\\') {
            command.push('\n');
            continue;
        }
        if !command.trim().is_empty() {
            commands.push(std::mem::take(&mut command));
        }
        command.clear();
    }
    assert!(command.is_empty(), "the block ends in a continued line: {command:?}");
    commands
}

/// The words of a command, as far as this test needs them (the block quotes nothing).
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().filter(|w| *w != "\\").collect()
}

fn is_daemon(command: &str) -> bool {
    words(command).starts_with(&["remote-network", "start"])
}

/// The value after `flag` in a command.
fn option<'a>(command: &'a str, flag: &str) -> Option<&'a str> {
    let words = words(command);
    words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1).copied())
}

/// The private directory the commands run in, with `remote-network` and `rnctl` first on PATH.
struct Sandbox {
    dir: TempDir,
    path: String,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("rn-readme-").tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin dir");
        std::os::unix::fs::symlink(daemon_bin(), bin.join("remote-network")).expect("link remote-network");
        std::os::unix::fs::symlink(rnctl_bin(), bin.join("rnctl")).expect("link rnctl");
        // An empty user config, so that a machine-wide /etc/remote-network/config.toml cannot change the test.
        let config = dir.path().join(".config/remote-network");
        std::fs::create_dir_all(&config).expect("config dir");
        std::fs::write(config.join("config.toml"), "").expect("empty config");
        let path = match std::env::var("PATH") {
            Ok(rest) => format!("{}:{rest}", bin.display()),
            Err(_) => bin.display().to_string(),
        };
        Self { dir, path }
    }

    /// The README's command with its `/tmp/` paths inside this directory: the one change allowed.
    fn localize(&self, command: &str) -> String {
        command.replace("/tmp/", &format!("{}/", self.dir.path().display()))
    }

    /// `sh -c COMMAND` in this directory, with HOME here and none of the daemon's variables inherited.
    fn shell(&self, command: &str) -> Command {
        let mut cmd = clean_command(Path::new("sh"));
        cmd.arg("-c")
            .arg(command)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("PATH", &self.path)
            .stdin(Stdio::null());
        cmd
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The daemons started by the block, each in a process group of its own; all are killed when this is dropped,
/// whether the test passed or not.
#[derive(Default)]
struct Daemons {
    running: Vec<(Child, PathBuf)>,
}

impl Daemons {
    /// Every daemon's log so far, for failure messages.
    fn logs(&self) -> String {
        self.running
            .iter()
            .map(|(_, log)| {
                format!("--- {}:\n{}", log.display(), std::fs::read_to_string(log).unwrap_or_default())
            })
            .collect()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (child, _) in &mut self.running {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the process group of a child we spawned as its leader and have not reaped,
                // so the group cannot have been reused.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.wait();
        }
    }
}

/// Fails the test, saying so, if a fixed address the daemon command listens on is taken.
fn require_free_fixed_ports(command: &str) {
    for flag in ["--dht-listen", "--quic-listen"] {
        let Some(address) = option(command, flag) else { continue };
        let address: SocketAddr =
            address.parse().unwrap_or_else(|e| panic!("{flag} {address} in the README: {e}"));
        if address.port() == 0 {
            continue;
        }
        if let Err(e) = UdpSocket::bind(address) {
            panic!(
                "the README's example listens on UDP {address} ({flag}), which is taken on this machine ({e}); \
                 free it to run this test"
            );
        }
    }
}

/// Starts a daemon command in the background and waits until it reports ready (systemd's `READY=1`, sent once
/// its control API serves) and its control socket is there.
fn start_daemon(sandbox: &Sandbox, daemons: &mut Daemons, command: &str) {
    require_free_fixed_ports(command);
    let index = daemons.running.len();
    let notify_path = sandbox.file(&format!("notify-{index}.sock"));
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let log = sandbox.file(&format!("daemon-{index}.log"));
    let child = sandbox
        .shell(command)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create log"))
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    daemons.running.push((child, log));

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(n) = notify.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1")
        {
            break;
        }
        if let Ok(Some(status)) = daemons.running[index].0.try_wait() {
            panic!("`{command}` exited with {status} before it was ready:\n{}", daemons.logs());
        }
        assert!(
            Instant::now() < deadline,
            "`{command}` was not ready within {READY_TIMEOUT:?}:\n{}",
            daemons.logs()
        );
    }
    let socket = option(command, "--control-socket").expect("the daemon command names its control socket");
    assert!(
        Path::new(socket).exists(),
        "{socket} is missing although `{command}` is ready:\n{}",
        daemons.logs()
    );
}

/// Runs a command to its end (killed if it hangs); returns its status, stdout and stderr.
fn run(sandbox: &Sandbox, command: &str) -> (ExitStatus, String, String) {
    let mut child = sandbox
        .shell(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: as in `Daemons::drop`: our own unreaped child's process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.wait();
            panic!("`{command}` did not end within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status, text(&output.stdout), text(&output.stderr))
}

#[test]
fn the_readme_two_daemon_example_runs_as_written() {
    let commands = readme_commands();
    assert!(
        commands.iter().filter(|c| is_daemon(c)).count() == 2
            && commands.last().is_some_and(|c| !is_daemon(c)),
        "the block should start two daemons and then run rnctl: {commands:#?}"
    );
    let sandbox = Sandbox::new();
    let mut daemons = Daemons::default();
    let mut last_stdout = String::new();
    for command in &commands {
        let local = sandbox.localize(command);
        if is_daemon(command) {
            start_daemon(&sandbox, &mut daemons, &local);
            continue;
        }
        let (status, stdout, stderr) = run(&sandbox, &local);
        assert!(
            status.success(),
            "`{local}` failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
            daemons.logs()
        );
        last_stdout = stdout;
    }
    // The last line waits for a verified peer: it ends once the other daemon is verified.
    assert!(last_stdout.contains("verified 1/1"), "{last_stdout}");
    // Both daemons are still up: neither gave up on the monitoring address the other holds.
    let exited = daemons.running.iter_mut().any(|(child, _)| !matches!(child.try_wait(), Ok(None)));
    assert!(!exited, "a daemon exited:\n{}", daemons.logs());
}

#[test]
fn the_architecture_table_names_every_part_of_src() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let table: String = readme
        .lines()
        .skip_while(|line| !line.starts_with("| path | holds |"))
        .take_while(|line| line.starts_with('|'))
        .map(|line| line.split('|').nth(1).unwrap_or_default().to_owned())
        .collect();
    assert!(!table.is_empty(), "README has no architecture table (| path | holds |)");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root.join("src")).expect("src/") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let named = if entry.path().is_dir() { format!("`src/{name}/") } else { format!("`src/{name}`") };
        if !table.contains(&named) {
            missing.push(named);
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "the README's architecture table does not name {missing:?}");
}
