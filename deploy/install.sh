#!/usr/bin/env bash
# Installs (or uninstalls) the remote-network node from a source checkout as a systemd service: the daemon and
# rnctl, the unit, the system user, an example configuration (only where no configuration exists) and shell
# completions. Safe to run again: an upgrade is the same command. See deploy/README.md.
#
# Usage: deploy/install.sh [--no-build] [--uninstall [--purge]]
#
#   --no-build   install binaries built before (target/release, or $BIN_DIR) instead of building them
#   --uninstall  stop and disable the service and remove what this script installed; the node's state
#                (/var/lib/remote-network: its key and peer database) and configuration (/etc/remote-network)
#                are kept
#   --purge      with --uninstall: remove the state and the configuration too (the node key is lost)
#
# Environment:
#   DESTDIR  stage the files below this directory (for packaging) instead of installing them: no root needed,
#            and nothing outside DESTDIR changes (no user is created, systemd is not told)
#   PREFIX   installation prefix, /usr by default (/usr/local also works: systemd reads units and sysusers.d
#            files there). Configuration stays in /etc/remote-network, where the daemon looks for it.
#   BIN_DIR  directory holding built remote-network and rnctl binaries to install; implies --no-build
#   CARGO    cargo command used to build (default: cargo)
set -euo pipefail

# Files must come out world-readable (binaries, unit) unless made private on purpose below.
umask 022

readonly NAME=remote-network
SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly SRC_DIR

info() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    # The header comment above is the help text.
    sed -n '2,/^set -euo pipefail/{/^set -euo pipefail/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

build=yes
action=install
purge=no
for arg in "$@"; do
    case "$arg" in
        --no-build) build=no ;;
        --uninstall) action=uninstall ;;
        --purge) purge=yes ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument '$arg' (see --help)" ;;
    esac
done
[[ "$purge" == no || "$action" == uninstall ]] || die "--purge only goes with --uninstall"

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr}"
BIN_DIR="${BIN_DIR:-}"
CARGO="${CARGO:-cargo}"
[[ "$PREFIX" == /* ]] || die "PREFIX must be an absolute path, got '$PREFIX'"
[[ -z "$DESTDIR" || "$DESTDIR" == /* ]] || die "DESTDIR must be an absolute path, got '$DESTDIR'"
PREFIX="${PREFIX%/}"
DESTDIR="${DESTDIR%/}"
[[ -n "$BIN_DIR" ]] && build=no

# Where everything goes, as seen on the target system (without DESTDIR).
readonly BINDIR="$PREFIX/bin"
readonly UNITDIR="$PREFIX/lib/systemd/system"
readonly SYSUSERSDIR="$PREFIX/lib/sysusers.d"
readonly DOCDIR="$PREFIX/share/doc/$NAME"
readonly BASH_COMPLETIONDIR="$PREFIX/share/bash-completion/completions"
# Fixed paths: the daemon looks for /etc/remote-network/config.toml, and the unit's StateDirectory= is below
# /var/lib.
readonly CONFDIR=/etc/$NAME
readonly STATEDIR=/var/lib/$NAME

# Every file the install creates (and the uninstall removes), as seen on the target system.
readonly INSTALLED_FILES=(
    "$BINDIR/remote-network"
    "$BINDIR/rnctl"
    "$UNITDIR/$NAME.service"
    "$SYSUSERSDIR/$NAME.conf"
    "$DOCDIR/README.md"
    "$DOCDIR/config.example.toml"
    "$BASH_COMPLETIONDIR/rnctl"
)

# Staging for a package touches nothing but DESTDIR; a real install changes /usr, /etc and users: root only.
if [[ -z "$DESTDIR" && "$(id -u)" -ne 0 ]]; then
    die "run as root (sudo $0 $*), or set DESTDIR to stage the files for a package"
fi

# Whether to act on the running system: create the user, tell systemd. Never when staging.
live_system() {
    [[ -z "$DESTDIR" ]]
}

# Whether systemd is the running service manager (the test sd_booted(3) uses).
systemd_running() {
    live_system && [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

build_binaries() {
    if [[ "$build" == no ]]; then
        return
    fi
    command -v "$CARGO" >/dev/null 2>&1 || die "cargo not found in PATH. Build as your own user first:
    cargo build --release --locked --workspace --bins
then install what was built:
    sudo $0 --no-build"
    if [[ "$(id -u)" -eq 0 && -n "${SUDO_USER:-}" ]]; then
        warn "building as root leaves root-owned files in $SRC_DIR/target;" \
            "building as $SUDO_USER first and then running with --no-build avoids that"
    fi
    info "building release binaries (cargo build --release --locked --workspace --bins)"
    (cd "$SRC_DIR" && "$CARGO" build --release --locked --workspace --bins)
}

# Installs a file with a mode, replacing any previous version. `install` removes the old file before writing
# the new one, so a running daemon's executable is never modified in place.
put() {
    local mode="$1" src="$2" dest="$DESTDIR$3"
    install -D -m "$mode" "$src" "$dest"
    note "$dest ($mode)"
}

create_user() {
    if ! live_system; then
        note "staging only: the package must create the user from $SYSUSERSDIR/$NAME.conf (systemd-sysusers)"
        return
    fi
    if getent passwd "$NAME" >/dev/null && getent group "$NAME" >/dev/null; then
        info "system user and group $NAME exist"
        return
    fi
    if systemd_running && command -v systemd-sysusers >/dev/null 2>&1; then
        info "creating system user and group $NAME (systemd-sysusers)"
        systemd-sysusers "$SYSUSERSDIR/$NAME.conf"
    else
        # The same user sysusers.d would create: a system account with no login and "/" as home (see
        # deploy/sysusers.d/remote-network.conf for why).
        info "creating system user and group $NAME (groupadd/useradd)"
        getent group "$NAME" >/dev/null || groupadd --system "$NAME"
        getent passwd "$NAME" >/dev/null ||
            useradd --system --gid "$NAME" --home-dir / --no-create-home \
                --shell "$(command -v nologin || echo /usr/sbin/nologin)" \
                --comment "remote-network P2P node" "$NAME"
    fi
}

install_config() {
    local dir="$DESTDIR$CONFDIR" file="$DESTDIR$CONFDIR/config.toml"
    # Root's, traversable: matches ConfigurationDirectoryMode= in the unit, which systemd applies at start.
    install -d -m 0755 "$dir"
    if [[ -e "$file" ]]; then
        info "keeping the existing $file (the current example is $DESTDIR$DOCDIR/config.example.toml)"
        return
    fi
    # Readable by the service's group only, as it may come to hold control.token.
    install -m 0640 "$SRC_DIR/deploy/config.example.toml" "$file"
    if live_system; then
        chgrp "$NAME" "$file"
    fi
    info "installed the example configuration as $file (0640; every setting commented out)"
}

do_install() {
    [[ -f "$SRC_DIR/Cargo.toml" && -f "$SRC_DIR/deploy/$NAME.service" ]] ||
        die "$SRC_DIR does not look like a remote-network source checkout"
    build_binaries
    local bin_dir="${BIN_DIR:-$SRC_DIR/target/release}"
    local bin
    for bin in remote-network rnctl; do
        [[ -x "$bin_dir/$bin" ]] || die "$bin_dir/$bin is missing; build it with
    cargo build --release --locked --workspace --bins"
    done

    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064 # expand now: $tmp is local to this function
    trap "rm -rf '$tmp'" EXIT

    # The unit and the docs name /usr paths; point them at PREFIX.
    sed -e "s#/usr/bin/#$BINDIR/#g" -e "s#/usr/share/doc/$NAME#$DOCDIR#g" \
        "$SRC_DIR/deploy/$NAME.service" >"$tmp/$NAME.service"
    "$bin_dir/rnctl" completions bash >"$tmp/rnctl.bash" ||
        die "$bin_dir/rnctl could not print its completions"

    info "installing files${DESTDIR:+ below $DESTDIR}"
    put 0755 "$bin_dir/remote-network" "$BINDIR/remote-network"
    put 0755 "$bin_dir/rnctl" "$BINDIR/rnctl"
    put 0644 "$tmp/$NAME.service" "$UNITDIR/$NAME.service"
    put 0644 "$SRC_DIR/deploy/sysusers.d/$NAME.conf" "$SYSUSERSDIR/$NAME.conf"
    put 0644 "$SRC_DIR/deploy/README.md" "$DOCDIR/README.md"
    put 0644 "$SRC_DIR/deploy/config.example.toml" "$DOCDIR/config.example.toml"
    put 0644 "$tmp/rnctl.bash" "$BASH_COMPLETIONDIR/rnctl"

    create_user
    install_config

    if systemd_running; then
        info "reloading systemd"
        systemctl daemon-reload
    fi

    echo
    info "done. Next steps:"
    if ! live_system; then
        note "package $DESTDIR; on the target system create the user (systemd-sysusers), make"
        note "$CONFDIR/config.toml group $NAME, then enable the service as below."
    fi
    if systemd_running && systemctl is-active --quiet "$NAME.service"; then
        note "the service still runs the previous version:  systemctl restart $NAME"
    else
        note "review $CONFDIR/config.toml, then:  systemctl daemon-reload && systemctl enable --now $NAME"
    fi
    note "let a user drive the node with rnctl:        usermod -aG $NAME \$USER  (takes effect at next login)"
    note "check it:                                    systemctl status $NAME; rnctl node info"
    note "logs:                                        journalctl -u $NAME -f"
    note "open UDP ports 30906 (QUIC) and 30609 (DHT) in the firewall for peers to reach the node."
}

do_uninstall() {
    if systemd_running && systemctl cat "$NAME.service" >/dev/null 2>&1; then
        info "stopping and disabling $NAME.service"
        systemctl disable --now "$NAME.service" || warn "could not stop or disable $NAME.service"
    fi

    info "removing files${DESTDIR:+ below $DESTDIR}"
    local file
    for file in "${INSTALLED_FILES[@]}"; do
        if [[ -e "$DESTDIR$file" || -L "$DESTDIR$file" ]]; then
            rm -f "$DESTDIR$file"
            note "removed $DESTDIR$file"
        fi
    done
    # Only if empty: an operator may keep files of their own there.
    rmdir "$DESTDIR$DOCDIR" 2>/dev/null || true

    if systemd_running; then
        systemctl daemon-reload
    fi

    if [[ "$purge" == yes ]]; then
        info "purging the configuration and the state (node key and peer database)"
        rm -rf "$DESTDIR$CONFDIR" "$DESTDIR$STATEDIR"
        note "removed $DESTDIR$CONFDIR and $DESTDIR$STATEDIR"
    else
        info "kept $DESTDIR$CONFDIR (configuration) and $DESTDIR$STATEDIR (node key, peer database);"
        note "--uninstall --purge removes them"
    fi
    if live_system && getent passwd "$NAME" >/dev/null; then
        # Removing it could let a later account reuse its ID and inherit files it still owns (backups of the
        # state directory, say).
        note "the system user $NAME is kept; remove it with: userdel $NAME"
    fi
}

case "$action" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "unknown action '$action'" ;;
esac
