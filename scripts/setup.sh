#!/usr/bin/env bash
# Prepares a machine for the demo and the tests: redis-server from Debian's packages, the Go
# modules, and a virtual environment in .venv with self_limiters built from this checkout and the
# test dependencies. Safe to run again: it reinstalls the package only when its sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "setup: installing redis-server and redis-tools from Debian's packages"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi

if ! command -v go >/dev/null; then
  echo "setup: the Go toolchain (go 1.26 or newer) must be on PATH to build self_limiters" >&2
  exit 1
fi
go mod download

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

# The stamp is a hash of everything that goes into the installed package.
stamp=$(cat go.mod go.sum setup.py pyproject.toml $(git ls-files core pybridge python 2>/dev/null || find core pybridge python -type f) | sha256sum | cut -c1-16)
if [ "$(cat .venv/.self-limiters-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "setup: building and installing self_limiters into .venv (about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q '.[test]'
  echo "$stamp" > .venv/.self-limiters-stamp
fi
echo "setup: ready ($(redis-server --version | cut -d' ' -f3), $(go version | cut -d' ' -f3), $(.venv/bin/python --version))"
