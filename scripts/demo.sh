#!/usr/bin/env bash
# Prepares the machine, then runs the demo on a private redis-server that the demo starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
