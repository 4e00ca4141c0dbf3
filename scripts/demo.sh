#!/usr/bin/env bash
# Shows Sluice doing its main job on this machine: two redis-server backends on loopback,
# Sluice in front of them (round-robin, 1 worker), real traffic through it with redis-cli and
# redis-benchmark, and the metrics that traffic produced. Everything stops when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
cargo build --release --locked -p sluice
dir=$(mktemp -d /tmp/sluice-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
for port in 16391 16392; do
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --dir "$dir" >"$dir/redis-$port.log" 2>&1 &
  pids+=($!)
done
cat >"$dir/sluice.yaml" <<YAML
workers: 1
admin: { bind: "127.0.0.1:16390" }
listeners:
  - name: redis
    bind: "127.0.0.1:16379"
    backends: ["127.0.0.1:16391", "127.0.0.1:16392"]
YAML
target/release/sluice run -c "$dir/sluice.yaml" 2>"$dir/sluice.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "sluice ready" "$dir/sluice.log" && break; sleep 0.1; done
grep -q "sluice ready" "$dir/sluice.log" || { cat "$dir/sluice.log"; exit 1; }
echo "== Sluice on 127.0.0.1:16379 -> redis-server on :16391 and :16392 (round-robin)"
for i in 1 2 3 4; do
  port=$(redis-cli -p 16379 INFO server | tr -d '\r' | sed -n 's/^tcp_port://p')
  echo "connection $i through Sluice answered by the redis-server on port $port"
done
echo "SET then GET on one connection: $(printf 'SET demo:k v1\r\nGET demo:k\r\n' | redis-cli -p 16379 | tail -1)"
echo "== redis-benchmark through Sluice (SET/GET, 50 clients, 20000 requests each)"
redis-benchmark -p 16379 -t set,get -n 20000 -c 50 -q
echo "== /metrics"
curl -s http://127.0.0.1:16390/metrics | grep -E '^sluice_(connections_accepted|connections_closed|bytes_to)' | grep -v ' 0$'
