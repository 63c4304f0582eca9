//! The daemon's local servers under clients that connect and then do nothing, as careless scripts and
//! attackers do: connections beyond `control.max_connections` / `monitoring.max_connections` are closed as they
//! arrive, silent or dribbling clients are closed after the handshake timeout, idle ones after the idle
//! timeout, and none of it touches what the daemon needs its file descriptors for (the control API, the
//! database). A call in progress, such as `rnctl peers watch`, keeps its connection however quiet it is.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{NodeDir, json, stderr};

/// How long the test waits for the daemon to close a connection: bounds a hang, not a timing goal.
const CLOSE_WAIT: Duration = Duration::from_secs(20);

/// Whether the peer closed `stream` (end of stream or an error) within `within`.
fn closed_within<S: Read>(stream: &mut S, set_timeout: impl Fn(&S, Duration), within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        set_timeout(stream, Duration::from_millis(200));
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn unix_closed_within(stream: &mut UnixStream, within: Duration) -> bool {
    closed_within(stream, |s, t| s.set_read_timeout(Some(t)).expect("timeout"), within)
}

fn tcp_closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    closed_within(stream, |s, t| s.set_read_timeout(Some(t)).expect("timeout"), within)
}

/// An HTTP/2 client that sent the preface and an empty SETTINGS frame, then nothing.
fn idle_http2(dir: &NodeDir) -> UnixStream {
    let mut stream = UnixStream::connect(dir.socket()).expect("connect to the control socket");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).expect("send the preface");
    stream
}

fn monitoring_address(dir: &NodeDir) -> String {
    let info = dir.rnctl(&["-o", "json", "node", "info"]);
    assert!(info.status.success(), "{}", stderr(&info));
    json(&info)["node"]["listen"]["monitoring"].as_str().expect("monitoring address").to_owned()
}

#[test]
fn idle_control_connections_are_closed_but_a_watch_keeps_its_own() {
    let dir = NodeDir::new();
    let _node = dir.start_with(|cmd| {
        cmd.env("RN_CONTROL_IDLE_TIMEOUT", "2s");
    });
    let mut watch = common::clean_command(&common::rnctl_bin())
        .arg("--socket")
        .arg(dir.socket())
        .args(["peers", "watch"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rnctl peers watch");

    // A connection that made no call: closed once idle for 2 s.
    let mut idle = idle_http2(&dir);
    let opened = Instant::now();
    assert!(unix_closed_within(&mut idle, CLOSE_WAIT), "an idle control connection stayed open");
    assert!(opened.elapsed() >= Duration::from_secs(1), "closed before it was idle: {:?}", opened.elapsed());

    // The watch, quiet all along (no peer came or went), still runs, and calls on new connections work.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        watch.try_wait().expect("poll the watch").is_none(),
        "the idle timeout ended a watch in progress"
    );
    assert!(dir.rnctl(&["node", "info"]).status.success());
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn control_connections_beyond_the_cap_are_refused_and_silent_ones_freed() {
    let dir = NodeDir::new();
    let _node = dir.start_with(|cmd| {
        cmd.env("RN_CONTROL_MAX_CONNECTIONS", "4").env("RN_CONTROL_HANDSHAKE_TIMEOUT", "2s");
    });
    // Four clients connect and send nothing: every slot is taken.
    let mut silent: Vec<UnixStream> =
        (0..4).map(|_| UnixStream::connect(dir.socket()).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fifth = UnixStream::connect(dir.socket()).expect("the kernel accepts");
    assert!(unix_closed_within(&mut fifth, Duration::from_secs(2)), "a fifth connection was served");

    // Without preface and headers within the handshake timeout they are closed, and the API is usable again.
    for stream in &mut silent {
        assert!(unix_closed_within(stream, CLOSE_WAIT), "a silent connection kept its slot");
    }
    let info = dir.rnctl(&["node", "info"]);
    assert!(info.status.success(), "{}", stderr(&info));
}

/// The case: with the daemon's `ulimit -n` at 256, about 230 idle monitoring connections used to take
/// the descriptors the control API and the database need (`unable to open database file`).
#[test]
fn idle_monitoring_connections_cannot_starve_the_daemon_of_file_descriptors() {
    let dir = NodeDir::new();
    let node = dir.start_with(|cmd| {
        cmd.env("RN_MONITORING_HANDSHAKE_TIMEOUT", "3s");
        // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    let monitoring = monitoring_address(&dir);
    let idle: Vec<TcpStream> = (0..230).filter_map(|_| TcpStream::connect(&monitoring).ok()).collect();
    assert!(idle.len() >= 200, "only {} connections made", idle.len());
    std::thread::sleep(Duration::from_millis(500));

    // The control API and the database go on working while the idle clients stay connected.
    for topic in ["fd-a", "fd-b", "fd-c"] {
        let joined = dir.rnctl(&["topics", "join", topic]);
        assert!(joined.status.success(), "{}\n{}", stderr(&joined), node.stderr());
    }
    let listed = dir.rnctl(&["topics", "list"]);
    assert!(common::stdout(&listed).contains("fd-c"), "{}", stderr(&listed));

    // The silent ones are closed after the handshake timeout, and scrapes work again.
    let mut idle = idle;
    for stream in idle.iter_mut().take(64) {
        assert!(tcp_closed_within(stream, CLOSE_WAIT), "a silent monitoring connection stayed open");
    }
    drop(idle);
    let mut scrape = TcpStream::connect(&monitoring).expect("connect");
    scrape.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut answer = String::new();
    scrape.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(node.stderr().contains("monitoring connections refused"), "the refusals are reported");
}
