//! The systemd deployment in `deploy/` stays correct as the code moves:
//!
//! - `systemd-analyze verify` accepts the unit, and `systemd-analyze security` scores its sandbox no worse
//!   than measured, failing only the checks a peer-to-peer node must fail (so hardening cannot be weakened
//!   silently);
//! - the unit agrees with the daemon (stop timeout above `shutdown_timeout`, the config-error exit code);
//! - `deploy/config.example.toml` holds exactly the keys `remote-network config show` knows, each with the
//!   code's own description, environment variable, flag and (systemd) default, and loads as it is;
//! - `deploy/install.sh` stages the right files with the right modes below `DESTDIR` without touching the
//!   system, keeps an operator's configuration, uninstalls, and passes shellcheck.
//!
//! systemd need not run: only `systemd-analyze` is used, on files. A missing tool skips its check loudly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{daemon_bin, rnctl_bin};
use remote_network::config::parse_duration;

/// The exposure score `systemd-analyze security` gave the unit when its sandbox was written (systemd 252).
/// Lower it when hardening improves; never raise it to make the test pass.
const MAX_EXPOSURE: f64 = 1.3;

/// The only sandbox checks the unit may fail, each with the reason it has to.
const ACCEPTED_EXPOSURES: &[(&str, &str)] = &[
    ("PrivateNetwork=", "a peer-to-peer node needs the host's network"),
    ("IPAddressDeny=", "peers may be at any address on the internet"),
    ("RestrictAddressFamilies=~AF_(INET|INET6)", "QUIC, the DHT, monitoring and control TCP"),
    ("RestrictAddressFamilies=~AF_UNIX", "the control socket and the notify socket"),
    ("RestrictAddressFamilies=~AF_NETLINK", "getifaddrs() lists interface addresses over netlink"),
    ("RootDirectory=/RootImage=", "the daemon is installed on the host, not as an image"),
    ("PrivateUsers=", "user namespaces are unavailable on some container hosts"),
    ("ProcSubset=", "the daemon reads /proc/meminfo (advertised memory) and /proc/stat (metrics)"),
    ("DeviceAllow=", "ProtectClock= itself allows reading the RTC"),
];

/// The daemon's exit code for configuration errors (`src/main.rs`), which the unit must not restart on.
const EXIT_CONFIG: i32 = 78;

/// What systemd gives the service; the example shows the defaults the daemon derives from it.
const STATE_DIRECTORY: &str = "/var/lib/remote-network";
const RUNTIME_DIRECTORY: &str = "/run/remote-network";

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Whether a command can be run at all; prints a loud SKIPPED line for `check` when not.
fn tool_or_skip(tool: &str, check: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: {check}: `{tool}` cannot be run ({e})");
            false
        }
    }
}

/// The major version of the installed systemd, from `systemd-analyze --version` ("systemd 252 (252.38-1)").
fn systemd_version() -> u32 {
    let output =
        Command::new("systemd-analyze").arg("--version").output().expect("systemd-analyze --version");
    let first = text(&output.stdout);
    first
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the systemd version from {first:?}"))
}

/// A copy of the unit in a temporary directory, with `ExecStart=` pointing at the daemon built for this test:
/// `systemd-analyze verify` insists that the executable exists.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let unit = read(&deploy_file("remote-network.service"));
    let daemon = daemon_bin();
    let daemon = daemon.to_str().expect("daemon path is UTF-8");
    assert!(!daemon.contains(char::is_whitespace), "unquoted ExecStart= path: {daemon}");
    assert!(
        unit.contains("\nExecStart=/usr/bin/remote-network start\n"),
        "the unit starts /usr/bin/remote-network"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // Same file name: systemd derives the unit's name from it.
    let path = dir.path().join("remote-network.service");
    fs::write(&path, unit.replace("ExecStart=/usr/bin/remote-network ", &format!("ExecStart={daemon} ")))
        .expect("write unit copy");
    (dir, path)
}

/// `Key=value` settings of the unit, in order (a key may repeat).
fn unit_settings() -> Vec<(String, String)> {
    read(&deploy_file("remote-network.service"))
        .lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn unit_setting(key: &str) -> String {
    let values: Vec<String> = unit_settings().into_iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect();
    assert_eq!(values.len(), 1, "the unit sets {key}= exactly once: {values:?}");
    values.into_iter().next().expect("one value")
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !tool_or_skip("systemd-analyze", "unit_passes_systemd_analyze_verify") {
        return;
    }
    let (_dir, unit) = unit_copy();
    let output = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    // Strict: any warning (an unknown or misspelt key, a bad value, a missing dependency) fails the test.
    assert!(
        output.status.success() && output.stderr.is_empty() && output.stdout.is_empty(),
        "{}",
        describe("systemd-analyze verify", &output)
    );
}

#[test]
fn unit_sandbox_keeps_its_security_score() {
    if !tool_or_skip("systemd-analyze", "unit_sandbox_keeps_its_security_score") {
        return;
    }
    let version = systemd_version();
    if version < 252 {
        eprintln!(
            "SKIPPED: unit_sandbox_keeps_its_security_score: systemd {version} has no `security --offline`"
        );
        return;
    }
    let (_dir, unit) = unit_copy();
    let security = |extra: &[&str]| {
        let output = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .args(extra)
            .arg(&unit)
            .output()
            .expect("systemd-analyze security");
        assert!(output.status.success(), "{}", describe("systemd-analyze security", &output));
        output
    };

    let table = text(&security(&[]).stdout);
    let score: f64 = table
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for remote-network.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{table}"));

    let checks: serde_json::Value =
        serde_json::from_slice(&security(&["--json=short"]).stdout).expect("security --json=short is JSON");
    let failed: BTreeSet<String> = checks
        .as_array()
        .expect("a list of checks")
        .iter()
        .filter(|check| {
            check["exposure"]
                .as_str()
                .and_then(|e| e.parse::<f64>().ok())
                .is_some_and(|exposure| exposure > 0.0)
        })
        .map(|check| check["name"].as_str().expect("check name").to_owned())
        .collect();
    let accepted: BTreeSet<String> = ACCEPTED_EXPOSURES.iter().map(|(name, _)| (*name).to_owned()).collect();
    let newly_failed: Vec<&String> = failed.difference(&accepted).collect();
    assert!(
        newly_failed.is_empty(),
        "the unit's sandbox now fails {newly_failed:?}; restore the hardening (or, if the daemon truly needs \
         it, add it to ACCEPTED_EXPOSURES with the reason)\n{table}"
    );
    assert!(
        score <= MAX_EXPOSURE + 1e-9,
        "exposure {score} is above the {MAX_EXPOSURE} the unit was measured at; restore the \
         hardening\n{table}"
    );
    eprintln!("systemd {version}: exposure {score} (at most {MAX_EXPOSURE}), accepted failures {failed:?}");
}

#[test]
fn unit_agrees_with_the_daemon() {
    // systemd must not SIGKILL a graceful stop the daemon is still allowed to finish.
    let stop = unit_setting("TimeoutStopSec");
    let stop = parse_duration(&stop).unwrap_or_else(|e| panic!("TimeoutStopSec={stop}: {e}"));
    let defaults = config_show(&empty_config().1, &[]);
    let shutdown = match defaults.get("shutdown_timeout") {
        Some(toml::Value::String(s)) => parse_duration(s).expect("shutdown_timeout parses"),
        other => panic!("config show printed shutdown_timeout = {other:?}"),
    };
    assert!(
        stop >= shutdown + Duration::from_secs(2),
        "TimeoutStopSec ({stop:?}) must exceed shutdown_timeout ({shutdown:?}) by a margin"
    );

    // A configuration error must not restart the service in a loop.
    assert_eq!(unit_setting("RestartPreventExitStatus"), EXIT_CONFIG.to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, "no_such_key = 1\n").expect("write");
    let output = show_command(&bad, &[]).output().expect("run the daemon");
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        describe("config show with a bad key", &output)
    );

    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("User", "remote-network"),
        ("Group", "remote-network"),
        ("StateDirectory", "remote-network"),
        ("RuntimeDirectory", "remote-network"),
        ("RuntimeDirectoryMode", "0750"),
    ] {
        assert_eq!(unit_setting(key), value, "{key}=");
    }
    assert!(parse_duration(&unit_setting("WatchdogSec")).is_ok_and(|d| d >= Duration::from_secs(10)));
}

// ---- the example configuration ----------------------------------------------------------------------------

/// An empty config file: passing it keeps `/etc/remote-network/config.toml` of the machine out of the test.
fn empty_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.toml");
    fs::write(&path, "").expect("write");
    (dir, path)
}

/// `remote-network config show --config FILE ARGS` in the environment systemd gives the service, and nothing
/// else of the caller's (no RN_*, RUST_LOG, XDG_*).
fn show_command(file: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(daemon_bin());
    cmd.env_clear()
        .env("HOME", "/nonexistent")
        .env("STATE_DIRECTORY", STATE_DIRECTORY)
        .env("RUNTIME_DIRECTORY", RUNTIME_DIRECTORY)
        .args(["config", "show", "--config"])
        .arg(file)
        .args(args);
    cmd
}

fn show_output(file: &Path, args: &[&str]) -> String {
    let output = show_command(file, args).output().expect("run the daemon");
    assert!(
        output.status.success(),
        "{}",
        describe(&format!("config show --config {}", file.display()), &output)
    );
    text(&output.stdout)
}

/// The effective configuration `config show` prints, by dotted key.
fn config_show(file: &Path, args: &[&str]) -> BTreeMap<String, toml::Value> {
    let shown = show_output(file, args);
    flat_toml(&shown).unwrap_or_else(|e| panic!("config show printed invalid TOML ({e}):\n{shown}"))
}

/// Parses TOML and flattens its tables into dotted keys (no setting holds a table).
fn flat_toml(source: &str) -> Result<BTreeMap<String, toml::Value>, toml::de::Error> {
    fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
        for (name, value) in table {
            let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match value {
                toml::Value::Table(inner) => flatten(&key, inner, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    let table: toml::Table = source.parse()?;
    let mut out = BTreeMap::new();
    flatten("", &table, &mut out);
    Ok(out)
}

/// What `config show --docs` says of each key: its description and its "env ..., flag ..." line.
fn documented_keys() -> BTreeMap<String, (String, String)> {
    let shown = show_output(&empty_config().1, &["--docs"]);
    let mut docs = BTreeMap::new();
    let (mut doc, mut env) = (None, None);
    for line in shown.lines() {
        if let Some(rest) = line.strip_prefix("# env ") {
            env = Some(format!("# env {rest}"));
        } else if let Some(rest) = line.strip_prefix("# ") {
            doc = Some(rest.to_owned());
        } else if let Some((key, _)) = line.split_once(" = ") {
            let entry = (doc.take().unwrap_or_default(), env.take().unwrap_or_default());
            assert!(!entry.0.is_empty() && !entry.1.is_empty(), "no docs for {key} in:\n{shown}");
            docs.insert(key.to_owned(), entry);
        }
    }
    docs
}

/// A setting line of the example: `#key = value` (commented out) or `key = value`. Prose comments start with
/// "# ", so they never match.
fn setting_key(line: &str) -> Option<&str> {
    let line = line.strip_prefix('#').unwrap_or(line);
    let (key, _) = line.split_once(" = ")?;
    let valid = key.starts_with(|c: char| c.is_ascii_lowercase())
        && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    valid.then_some(key)
}

/// Collapses a comment block to its words, so that wrapping does not matter.
fn words(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| l.trim_start_matches('#'))
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn example_config_documents_every_key_with_its_default() {
    let example_path = deploy_file("config.example.toml");
    let example = read(&example_path);
    let lines: Vec<&str> = example.lines().collect();

    // Every setting line uncommented: the file an operator gets by enabling everything.
    let activated: String = lines
        .iter()
        .map(|line| match (setting_key(line), line.strip_prefix('#')) {
            (Some(_), Some(uncommented)) => uncommented,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let listed = flat_toml(&activated)
        .unwrap_or_else(|e| panic!("config.example.toml with every setting uncommented is not TOML: {e}"));

    let (_empty_dir, empty) = empty_config();
    let defaults = config_show(&empty, &[]);
    let missing: Vec<&String> = defaults.keys().filter(|k| !listed.contains_key(*k)).collect();
    let unknown: Vec<&String> = listed.keys().filter(|k| !defaults.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "deploy/config.example.toml is out of sync with `remote-network config show`: missing keys \
         {missing:?}, \
         unknown keys {unknown:?}. Start from `remote-network config show --docs` (with \
         STATE_DIRECTORY={STATE_DIRECTORY} RUNTIME_DIRECTORY={RUNTIME_DIRECTORY})."
    );

    // The values shown are the defaults of the daemon under the unit.
    for (key, default) in &defaults {
        assert_eq!(
            &listed[key], default,
            "config.example.toml shows {key} = {}, the default is {default}",
            listed[key]
        );
    }

    // Each key's comment block carries the code's description and its "env ..., flag ..." line verbatim.
    let docs = documented_keys();
    assert_eq!(
        docs.keys().collect::<Vec<_>>(),
        defaults.keys().collect::<Vec<_>>(),
        "config show --docs keys"
    );
    for (index, line) in lines.iter().enumerate() {
        let Some(key) = setting_key(line) else { continue };
        let start = lines[..index].iter().rposition(|l| l.trim().is_empty()).map_or(0, |blank| blank + 1);
        let block = &lines[start..index];
        let (doc, env) = &docs[key];
        assert!(
            block.contains(&env.as_str()),
            "the comment above {key} in config.example.toml lacks the line `{env}`:\n{}",
            block.join("\n")
        );
        assert!(
            words(block).contains(&words(&[doc.as_str()])),
            "the comment above {key} in config.example.toml does not say what the code says:\n  {doc}\n\
             it says:\n{}",
            block.join("\n")
        );
    }

    // The daemon itself accepts every key and value of it (unknown keys and bad values exit 78)...
    let dir = tempfile::tempdir().expect("tempdir");
    let activated_path = dir.path().join("activated.toml");
    fs::write(&activated_path, &activated).expect("write");
    assert_eq!(config_show(&activated_path, &[]), defaults, "the example's values load as the defaults");
    // ...and the file as shipped loads and changes nothing.
    assert_eq!(config_show(&example_path, &[]), defaults, "config.example.toml as shipped changes nothing");
}

// ---- install.sh -------------------------------------------------------------------------------------------

/// What `install.sh` stages below DESTDIR with the default PREFIX, and the modes.
const STAGED: &[(&str, u32)] = &[
    ("usr/bin/remote-network", 0o755),
    ("usr/bin/rnctl", 0o755),
    ("usr/lib/systemd/system/remote-network.service", 0o644),
    ("usr/lib/sysusers.d/remote-network.conf", 0o644),
    ("usr/share/doc/remote-network/README.md", 0o644),
    ("usr/share/doc/remote-network/config.example.toml", 0o644),
    ("usr/share/bash-completion/completions/rnctl", 0o644),
    ("etc/remote-network/config.toml", 0o640),
];

/// Runs deploy/install.sh with DESTDIR and BIN_DIR set, PREFIX from `prefix`; `CARGO=false` proves it never
/// builds.
fn install_sh(destdir: &Path, bin_dir: &Path, prefix: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(deploy_file("install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("BIN_DIR", bin_dir)
        .env("CARGO", "false")
        .env_remove("PREFIX");
    if let Some(prefix) = prefix {
        cmd.env("PREFIX", prefix);
    }
    cmd.output().expect("run install.sh")
}

/// Every file below `root`, relative to it, with its permission bits.
fn files_below(root: &Path) -> BTreeMap<String, u32> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).expect("below root").to_string_lossy().into_owned();
                out.insert(relative, meta.permissions().mode() & 0o7777);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn same_contents(a: &Path, b: &Path) -> bool {
    const CHUNK: usize = 1 << 20;
    let len = fs::metadata(a).expect("stat").len();
    if fs::metadata(b).expect("stat").len() != len {
        return false;
    }
    let (mut fa, mut fb) = (fs::File::open(a).expect("open"), fs::File::open(b).expect("open"));
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut left = usize::try_from(len).expect("file size fits usize");
    while left > 0 {
        let n = left.min(CHUNK);
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
        left -= n;
    }
    true
}

/// The state of the real system's paths install.sh would use without DESTDIR.
fn system_snapshot() -> Vec<(String, Option<(u64, std::time::SystemTime)>)> {
    STAGED
        .iter()
        .map(|(path, _)| format!("/{path}"))
        .chain(["/var/lib/remote-network".to_owned()])
        .map(|path| {
            let state = fs::symlink_metadata(&path).ok().map(|m| (m.len(), m.modified().expect("mtime")));
            (path, state)
        })
        .chain([("user remote-network".to_owned(), user_exists().then_some((0, std::time::UNIX_EPOCH)))])
        .collect()
}

fn user_exists() -> bool {
    Command::new("getent").args(["passwd", "remote-network"]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn install_script_stages_below_destdir_and_uninstalls() {
    let bin_dir = daemon_bin().parent().expect("bin dir").to_path_buf();
    let rnctl = rnctl_bin();
    let dest = tempfile::tempdir().expect("tempdir");
    let destdir = dest.path().join("stage");
    let before = system_snapshot();

    let output = install_sh(&destdir, &bin_dir, None, &[]);
    assert!(output.status.success(), "{}", describe("install.sh", &output));
    let expected: BTreeMap<String, u32> = STAGED.iter().map(|(p, m)| ((*p).to_owned(), *m)).collect();
    assert_eq!(files_below(&destdir), expected, "files and modes staged by install.sh");

    assert!(same_contents(&destdir.join("usr/bin/remote-network"), &daemon_bin()), "daemon copied as built");
    assert!(same_contents(&destdir.join("usr/bin/rnctl"), &rnctl), "rnctl copied as built");
    assert_eq!(
        read(&destdir.join("usr/lib/systemd/system/remote-network.service")),
        read(&deploy_file("remote-network.service"))
    );
    assert_eq!(
        read(&destdir.join("etc/remote-network/config.toml")),
        read(&deploy_file("config.example.toml"))
    );
    let completion = read(&destdir.join("usr/share/bash-completion/completions/rnctl"));
    assert!(completion.contains("complete") && completion.contains("rnctl"), "a bash completion script");
    assert_eq!(system_snapshot(), before, "install.sh with DESTDIR changed the real system");

    // Uninstalling keeps the configuration and the state; purging removes them.
    let state = destdir.join("var/lib/remote-network/node.key");
    fs::create_dir_all(state.parent().expect("parent")).expect("mkdir");
    fs::write(&state, "key").expect("write");
    let output = install_sh(&destdir, &bin_dir, None, &["--uninstall"]);
    assert!(output.status.success(), "{}", describe("install.sh --uninstall", &output));
    let left: Vec<String> = files_below(&destdir).into_keys().collect();
    assert_eq!(
        left,
        ["etc/remote-network/config.toml", "var/lib/remote-network/node.key"],
        "kept by --uninstall"
    );

    let output = install_sh(&destdir, &bin_dir, None, &["--uninstall", "--purge"]);
    assert!(output.status.success(), "{}", describe("install.sh --uninstall --purge", &output));
    assert!(files_below(&destdir).is_empty(), "left after --purge: {:?}", files_below(&destdir));
    assert_eq!(system_snapshot(), before, "install.sh --uninstall with DESTDIR changed the real system");
}

/// Stand-ins for the binaries, so that checks of the script itself need not copy the real ones around.
fn fake_binaries(dir: &Path) -> PathBuf {
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).expect("mkdir");
    for (name, body) in [("remote-network", "exit 0"), ("rnctl", "echo \"complete -F _rnctl rnctl # $*\"")] {
        let path = bin_dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    bin_dir
}

#[test]
fn install_script_honours_prefix_and_keeps_an_operators_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = fake_binaries(dir.path());
    let destdir = dir.path().join("stage");

    let output = install_sh(&destdir, &bin_dir, Some("/usr/local"), &[]);
    assert!(output.status.success(), "{}", describe("install.sh with PREFIX=/usr/local", &output));
    let unit = read(&destdir.join("usr/local/lib/systemd/system/remote-network.service"));
    assert!(
        unit.contains("\nExecStart=/usr/local/bin/remote-network start\n"),
        "ExecStart follows PREFIX:\n{unit}"
    );
    assert!(
        unit.contains("Documentation=file:/usr/local/share/doc/remote-network/README.md"),
        "docs follow PREFIX"
    );
    assert!(!unit.contains("/usr/bin/"), "no /usr/bin path left in the unit");
    for file in [
        "usr/local/bin/remote-network",
        "usr/local/bin/rnctl",
        "usr/local/lib/sysusers.d/remote-network.conf",
    ] {
        assert!(destdir.join(file).is_file(), "{file} staged");
    }

    // Running again is an upgrade: the operator's configuration stays as it is.
    let config = destdir.join("etc/remote-network/config.toml");
    fs::write(&config, "log_level = \"debug\"\n").expect("edit config");
    let output = install_sh(&destdir, &bin_dir, Some("/usr/local"), &[]);
    assert!(output.status.success(), "{}", describe("install.sh, second run", &output));
    assert_eq!(read(&config), "log_level = \"debug\"\n", "install.sh overwrote the operator's config");
    assert!(text(&output.stdout).contains("keeping the existing"), "{}", describe("second run", &output));

    // Refusals, each with a message.
    for (args, prefix, message) in [
        (&["--purge"][..], None, "--purge only goes with --uninstall"),
        (&["--bogus"][..], None, "unknown argument"),
        (&[][..], Some("relative/prefix"), "PREFIX must be an absolute path"),
    ] {
        let output = install_sh(&destdir, &bin_dir, prefix, args);
        assert!(
            !output.status.success() && text(&output.stderr).contains(message),
            "{}",
            describe(&format!("install.sh {args:?}"), &output)
        );
    }
}

#[test]
fn install_script_refuses_a_real_install_without_root() {
    // A copy the unprivileged user can read wherever the checkout lives (a CI checkout may be in /root).
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let script = dir.path().join("install.sh");
    fs::copy(deploy_file("install.sh"), &script).expect("copy install.sh");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");

    // Without DESTDIR the script would install into the system: it must refuse unless run by root.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        if !tool_or_skip("setpriv", "install_script_refuses_a_real_install_without_root") {
            return;
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"]);
        cmd
    } else {
        Command::new("bash")
    };
    let output = cmd
        .arg(&script)
        .arg("--no-build")
        .env_remove("DESTDIR")
        .current_dir(dir.path())
        .output()
        .expect("run install.sh unprivileged");
    assert!(
        !output.status.success() && text(&output.stderr).contains("run as root"),
        "{}",
        describe("install.sh run unprivileged without DESTDIR", &output)
    );
}

#[test]
fn install_script_passes_shellcheck() {
    if !tool_or_skip("shellcheck", "install_script_passes_shellcheck (apt-get install shellcheck)") {
        return;
    }
    let output = Command::new("shellcheck").arg(deploy_file("install.sh")).output().expect("shellcheck");
    assert!(output.status.success(), "{}", describe("shellcheck deploy/install.sh", &output));
}
