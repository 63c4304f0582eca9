//! SIGHUP reloads the configuration file of a running daemon, as `systemctl reload` does: what a running node
//! can change is applied and logged, what needs a restart is said, a bad file changes nothing, and the daemon
//! never stops (SIGHUP's default action used to end it on the spot).

mod common;

use std::time::{Duration, Instant};

use common::{NodeDir, TestNode, stdout};

/// How long a reload may take to show in the log: a generous bound, not a timing goal.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// Waits until the log has `count` lines containing `needle`; returns the log.
fn wait_for_log(node: &TestNode, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let log = node.stderr();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(Instant::now() < deadline, "no {count}x `{needle}` in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_applies_what_it_can_names_what_needs_a_restart_and_survives_a_bad_file() {
    let dir = NodeDir::new();
    let config = dir.config_file();
    std::fs::write(&config, "log_level = \"info\"\n[store]\nmax_peers = 1000\n").expect("write config");
    let mut node = dir.start_with(|cmd| {
        // The log level comes from the file here, not from the harness's environment.
        cmd.env_remove("RUST_LOG");
    });

    // Nothing changed: said so.
    node.signal(libc::SIGHUP);
    wait_for_log(&node, "configuration reloaded: nothing changed", 1);

    std::fs::write(
        &config,
        "log_level = \"debug\"\n\
         [store]\nmax_peers = 5\n\
         [relay]\nmax_circuits = 2\n\
         [quic]\nretry_threshold = 8\nreflections_per_ip = 5\n\
         [control]\nmax_connections = 100\n\
         [monitoring]\nidle_timeout = \"30s\"\n\
         [dht]\nannounce_interval = \"20m\"\n",
    )
    .expect("write config");
    node.signal(libc::SIGHUP);
    let log = wait_for_log(&node, "configuration reloaded applied=", 1);
    for key in [
        "store.max_peers",
        "relay.max_circuits",
        "quic.retry_threshold",
        "quic.reflections_per_ip",
        "control.max_connections",
        "monitoring.idle_timeout",
        "log_level",
    ] {
        let quoted = format!("setting=\"{key}\"");
        let bare = format!("setting={key} ");
        let line = log.lines().find(|l| l.contains(&quoted) || l.contains(&bare));
        let line = line.unwrap_or_else(|| panic!("nothing said about {key}:\n{log}"));
        assert!(line.contains("setting changed") && !line.contains("restart"), "{key} applied: {line}");
    }
    let restart =
        log.lines().find(|l| l.contains("dht.announce_interval")).unwrap_or_else(|| panic!("{log}"));
    assert!(restart.contains("takes effect after a restart"), "{restart}");
    // The new log level is in force: the node's own debug lines appear from now on.
    let topics = dir.rnctl(&["topics", "join", "reloaded"]);
    assert!(topics.status.success(), "{}", common::stderr(&topics));
    wait_for_log(&node, " DEBUG ", 1);

    // A file that does not load: the usual message, the running settings stay, the node goes on serving.
    std::fs::write(&config, "log_level = \"info\"\n[store\nmax_peers = ").expect("write config");
    node.signal(libc::SIGHUP);
    let log = wait_for_log(&node, "configuration not reloaded", 1);
    assert!(log.contains("not valid TOML"), "{log}");
    assert!(node.is_running(), "a bad file never stops the daemon");
    assert!(stdout(&dir.rnctl(&["topics", "list"])).contains("reloaded"), "still serving");

    let (status, log) = node.terminate();
    assert!(status.success(), "{log}");
}

/// A rewritten token file is read again on SIGHUP, though the config names the same file: the TCP listener
/// takes the new token at once and refuses the old one. A token file that became unreadable changes nothing.
#[test]
fn sighup_reads_the_control_token_file_again() {
    use std::os::unix::fs::PermissionsExt;

    let dir = NodeDir::new();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first-token\n").expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let node = dir.start_with(|cmd| {
        cmd.arg("--control-tcp")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--control-token-file")
            .arg(&token_file);
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    let with_token = |token: &str| {
        common::rnctl_with(|cmd| {
            cmd.args(["--endpoint", &endpoint, "node", "info"]).env("RNCTL_TOKEN", token);
        })
    };
    assert!(with_token("first-token").status.success());

    std::fs::write(&token_file, "second-token\n").expect("rewrite the token");
    node.signal(libc::SIGHUP);
    let log = wait_for_log(&node, "control token replaced", 1);
    assert!(log.contains("setting reloaded from the file it names"), "{log}");
    assert!(with_token("second-token").status.success(), "the new token is in force");
    let old = with_token("first-token");
    assert_eq!(old.status.code(), Some(4), "the old token is refused: {}", common::stderr(&old));

    // Readable by everyone: refused with the usual message, the token in force stays.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    node.signal(libc::SIGHUP);
    let log = wait_for_log(&node, "setting could not be reloaded", 1);
    assert!(log.contains("chmod"), "{log}");
    assert!(with_token("second-token").status.success(), "the token in force stays");
}
