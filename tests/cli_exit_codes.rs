//! rnctl's exit codes, one test per row of the README's table, against a real daemon. The table itself is read
//! from README.md, so a row added there without a test here (or a code tested here that the README does not
//! list) fails `the_readme_table_lists_exactly_the_tested_codes`.

mod common;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{NodeDir, exit, json, stderr, stdout};

/// Every code this file tests, each by the test named beside it.
const TESTED: [i32; 6] = [exit::OK, exit::FAILURE, exit::USAGE, exit::CONNECT, exit::DAEMON, exit::NOT_FOUND];

/// A node id no test daemon has heard of.
const UNKNOWN_ID: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

/// The codes in the README's exit-code table: the first cell of each row after the header.
fn readme_codes() -> BTreeSet<i32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let (_, after) =
        readme.split_once("| Code | Meaning | Example |").expect("README has the exit-code table");
    after
        .lines()
        .skip(2) // the rest of the header line and the |---| line
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cell = line.trim_start_matches('|').split('|').next().unwrap_or_default().trim();
            cell.parse().unwrap_or_else(|_| panic!("not an exit code: {line}"))
        })
        .collect()
}

#[test]
fn the_readme_table_lists_exactly_the_tested_codes() {
    assert_eq!(readme_codes(), TESTED.into_iter().collect::<BTreeSet<_>>());
}

#[test]
fn exit_0_on_success() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let out = dir.rnctl(&["node", "info"]);
    assert_eq!(code(&out), Some(exit::OK), "{}", stderr(&out));
    assert!(stdout(&out).contains("node"), "{}", stdout(&out));
}

#[test]
fn exit_1_when_the_output_cannot_be_written() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let out = common::rnctl_with(|cmd| {
        cmd.arg("--socket").arg(dir.socket()).args(["node", "info"]).stdout(full);
    });
    assert_eq!(code(&out), Some(exit::FAILURE), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot write output"), "{}", stderr(&out));
}

#[test]
fn exit_2_for_usage_errors_and_invalid_input() {
    let dir = NodeDir::new();
    let _node = dir.start();
    for args in [
        &["connect", "notanaddress"][..],
        &["connect", "not an address"],
        &["connect", "203.0.113.7:99999"],
        &["connect", "abc"],
        &["peers", "show", "abc"],
        &["topics", "join", ""],
        &["--timeout", "ten", "node", "info"],
        &["node", "nonsense"],
    ] {
        let out = dir.rnctl(args);
        assert_eq!(code(&out), Some(exit::USAGE), "{args:?}: {}", stderr(&out));
    }
    // Refused before anything is sent, with what is expected.
    let out = dir.rnctl(&["connect", "notanaddress"]);
    assert!(stderr(&out).contains("HOST:PORT"), "{}", stderr(&out));
}

#[test]
fn exit_3_when_the_daemon_cannot_be_reached() {
    let dir = NodeDir::new();
    // No daemon at all.
    let out = dir.rnctl(&["node", "info"]);
    assert_eq!(code(&out), Some(exit::CONNECT), "{}", stderr(&out));

    // Something listens on the socket but drops every connection: the connection breaks, no daemon answers.
    let listener = UnixListener::bind(dir.socket()).expect("bind a socket");
    let dropper = std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            drop(stream);
        }
    });
    let out = dir.rnctl(&["--timeout", "5", "node", "info"]);
    assert_eq!(code(&out), Some(exit::CONNECT), "{}", stderr(&out));
    drop(dropper);
}

#[test]
fn exit_4_when_the_daemon_answers_with_an_error() {
    let dir = NodeDir::new();
    let _node = dir.start();
    let own = json(&dir.rnctl(&["-o", "json", "node", "info"]))["node"]["listen"]["quic"]
        .as_str()
        .expect("quic address")
        .to_owned();
    let out = dir.rnctl(&["connect", &own]);
    assert_eq!(code(&out), Some(exit::DAEMON), "{}", stderr(&out));
    assert!(stderr(&out).contains("this node itself"), "{}", stderr(&out));
}

/// A dead address with the default timeout: the daemon's QUIC handshake gives up after 10 s and says so, and
/// rnctl waits for that answer instead of giving up at the same moment with "the daemon did not answer".
#[test]
fn exit_4_with_the_daemons_error_for_a_dead_address() {
    let dir = NodeDir::new();
    let _node = dir.start();
    // A bound UDP socket nobody reads: packets to it vanish, like a host that went away.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind a silent socket");
    let address = silent.local_addr().expect("address").to_string();
    let started = Instant::now();
    let out = dir.rnctl(&["connect", &address]);
    let err = stderr(&out);
    assert_eq!(code(&out), Some(exit::DAEMON), "{err}");
    assert!(err.contains("QUIC handshake"), "the daemon's error, not a client deadline: {err}");
    assert!(!err.contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    drop(silent);
}

#[test]
fn exit_5_when_the_peer_is_not_found() {
    let dir = NodeDir::new();
    let _node = dir.start();
    for args in [
        &["peers", "show", UNKNOWN_ID][..],
        &["peers", "forget", UNKNOWN_ID],
        &["peers", "query", UNKNOWN_ID],
        &["connect", UNKNOWN_ID],
    ] {
        let out = dir.rnctl(args);
        let err = stderr(&out);
        assert_eq!(code(&out), Some(exit::NOT_FOUND), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains("not found"), "{args:?}: {err}");
        assert!(!err.contains("punch") && !err.contains("relay"), "{args:?}: no chain of attempts: {err}");
    }
}
