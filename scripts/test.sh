#!/usr/bin/env bash
# Runs every test: the Go suite with the race detector and the Python suite, against a private
# redis-server on a free loopback port. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/redis.sh

start_redis
export SL_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
echo "test: redis-server on 127.0.0.1:$REDIS_PORT"

echo "test: go vet and go test -race"
go vet ./...
go test -race -count=1 ./...

echo "test: pytest"
.venv/bin/python -m pytest tests_py "$@"
