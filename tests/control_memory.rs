//! The control socket under many half-made connections: each sends the HTTP/2 preface and one frame header
//! announcing a large frame, then nothing. The daemon's framing shim used to allocate the announced size at
//! once: 4000 such connections took its RSS from 21 MB to 1.13 GB, still 890 MB 30 s after they closed.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::NodeDir;

const CONNECTIONS: usize = 4000;
/// How far above its baseline the daemon's RSS may be once the connections are gone (the bar).
const RSS_MARGIN_KB: u64 = 50 * 1024;

fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Raises this process's open-file limit (and so the daemon's, which inherits it) to at least `want`.
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_max = limit.rlim_max.max(want);
        limit.rlim_cur = limit.rlim_cur.max(want).min(limit.rlim_max);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "raise RLIMIT_NOFILE (needs root beyond the hard limit)"
        );
    }
}

#[test]
fn half_made_control_connections_cost_no_memory_once_closed() {
    raise_fd_limit(16_384);
    let dir = NodeDir::new();
    let node = dir.start();
    assert!(dir.rnctl(&["node", "info"]).status.success());
    let baseline = rss_kb(node.pid());

    // The client preface, then a HEADERS frame header announcing 256 KiB that never comes.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0x04, 0x00, 0x00, 0x01, 0x04, 0, 0, 0, 1]);
    let mut open = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let Ok(mut stream) = UnixStream::connect(dir.socket()) else { continue };
        // A connection the daemon already closed (beyond its cap) may refuse the bytes: that is the point.
        let _ = stream.write_all(&hello);
        open.push(stream);
    }
    let peak = rss_kb(node.pid());
    // Connections beyond the cap were closed at once, and the rest once they stalled past the handshake
    // timeout (10 s): the slots are free again for a real client although the stalled ones are still open.
    std::thread::sleep(Duration::from_secs(12));
    let info = dir.rnctl(&["node", "info"]);
    assert!(
        info.status.success(),
        "stalled connections still hold the control API: {}",
        common::stderr(&info)
    );
    drop(open);

    std::thread::sleep(Duration::from_secs(30));
    let after = rss_kb(node.pid());
    println!(
        "RSS: baseline {baseline} kB, with {CONNECTIONS} connections {peak} kB, 30 s after closing {after} kB"
    );
    assert!(
        after <= baseline + RSS_MARGIN_KB,
        "RSS {after} kB 30 s after the connections closed, baseline {baseline} kB"
    );
    assert!(dir.rnctl(&["node", "info"]).status.success(), "serving after the connections closed");
    let (status, log) = node.terminate();
    assert!(status.success(), "{log}");
}
