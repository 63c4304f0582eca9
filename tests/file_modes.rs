//! Everything the daemon keeps in its data dir is private to its user, whatever the umask it was started with
//! and whatever modes the dir and files had before: the node key, the peer database and its WAL, the lock.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::{NodeDir, stdout};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// Every entry under `dir` with a mode that lets other users in, as `path mode` lines.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read data dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let kind = entry.file_type().expect("file type");
        // A control socket placed in the data dir keeps its own, deliberate 0660 (the group may connect).
        if kind.is_socket() {
            continue;
        }
        if mode(&path) & 0o077 != 0 {
            found.push(format!("{} {:o}", path.display(), mode(&path)));
        }
        if kind.is_dir() {
            found.extend(open_to_others(&path));
        }
    }
    found
}

#[test]
fn data_dir_files_are_private_whatever_the_umask_and_earlier_modes() {
    let dir = NodeDir::new();
    let data = dir.data_dir();
    // An operator created the data dir by hand, world-readable, and an earlier run left a readable database.
    std::fs::create_dir_all(&data).expect("create data dir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let node = dir.start_with(|cmd| {
        // SAFETY: umask(2) is async-signal-safe and touches only the child's own state.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
    });
    // A write, so that the WAL and its shared-memory file exist.
    let joined = dir.rnctl(&["topics", "join", "modes"]);
    assert!(joined.status.success(), "{}", common::stderr(&joined));
    assert!(stdout(&dir.rnctl(&["topics", "list"])).contains("modes"));

    assert_eq!(mode(&data), 0o700, "the data dir");
    assert_eq!(mode(&dir.database()), 0o600, "the database");
    let wal = data.join("peers.db-wal");
    assert!(wal.exists(), "the store writes through its WAL");
    assert_eq!(open_to_others(&data), Vec::<String>::new(), "files others can read or write");
    let (status, log) = node.terminate();
    assert!(status.success(), "{log}");

    // A database file left readable by others (copied in, or made by an older version) is narrowed at start.
    std::fs::set_permissions(dir.database(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let node = dir.start();
    assert_eq!(open_to_others(&data), Vec::<String>::new(), "after a restart");
    assert_eq!(mode(&data), 0o700);
    let (status, log) = node.terminate();
    assert!(status.success(), "{log}");
}
