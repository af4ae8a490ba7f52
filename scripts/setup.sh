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
    say "Node.js 20 or newer is needed for the libsignal sidecar (Debian: apt-get install nodejs npm)."
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
say "ready"
