# Sourced by the other scripts: start_redis starts a private redis-server on a free loopback port
# and sets REDIS_PORT; every server started this way is stopped when the calling shell exits.

redis_dirs=()
redis_pids=()

stop_redis_servers() {
  for pid in "${redis_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${redis_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for dir in "${redis_dirs[@]}"; do rm -rf "$dir"; done
}
trap stop_redis_servers EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_redis() {
  local dir port
  dir=$(mktemp -d)
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" "$@" &
  redis_pids+=($!)
  redis_dirs+=("$dir")
  for _ in $(seq 100); do
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
      REDIS_PORT=$port
      return 0
    fi
    sleep 0.1
  done
  echo "redis-server did not start on port $port; its log:" >&2
  cat "$dir/redis.log" >&2
  return 1
}
