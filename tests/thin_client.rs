//! `rnctl` is a thin client: its build must not pull in the node's P2P or database code.

use std::process::Command;

#[test]
fn rnctl_builds_without_p2p_or_database_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--locked", "-p", "rnctl", "-e", "normal,build", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("tonic ")), "the tree lists rnctl's dependencies:\n{tree}");
    for forbidden in ["quinn", "mainline", "rusqlite", "libsqlite3-sys", "r2d2"] {
        assert!(
            !tree.lines().any(|l| l.split_whitespace().next() == Some(forbidden)),
            "rnctl depends on {forbidden}:\n{tree}"
        );
    }
}
