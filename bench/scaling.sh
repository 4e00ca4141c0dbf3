#!/usr/bin/env bash
# Multi-core scaling: Sluice vs HAProxy with 1, 2, 4 and 8 workers (threads), each balancer
# confined to as many cores as workers, clients and backends on other cores. Needs >= 16 cores.
#
#   bench/scaling.sh                       # tools from PATH
#   BIN=bench/device-bin bench/scaling.sh  # tools bundled by bench/device-bundle.sh
# Environment: ROUNDS [3], COUNTS ["1 2 4 8"], OUT [bench/results/scaling-<ts>],
# CLIENT_CORES ["8-11"], REDIS_CORES ["12 13 14 15"], IPERF_CORE [15], MIN_CORES [16]
# (a smoke test on a small machine: MIN_CORES=2 CLIENT_CORES=1 REDIS_CORES="1 1 1 1"
# IPERF_CORE=1 COUNTS=1 ROUNDS=1). The balancer with N workers gets cores 0..N-1.
# Loopback only; everything started is killed on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-}
ROUNDS=${ROUNDS:-3}
COUNTS=${COUNTS:-"1 2 4 8"}
OUT=${OUT:-$ROOT/bench/results/scaling-$(date +%Y%m%d-%H%M%S)}
CLIENT_CORES=${CLIENT_CORES:-8-11}
read -r -a REDIS_CORES <<<"${REDIS_CORES:-12 13 14 15}"
IPERF_CORE=${IPERF_CORE:-15}
MIN_CORES=${MIN_CORES:-16}
tool() { if [ -n "$BIN" ]; then echo "$ROOT/$BIN/$1"; else command -v "$1"; fi; }
SLUICE=${SLUICE:-$( [ -n "$BIN" ] && tool sluice || echo "$ROOT/target/release/sluice")}
HAPROXY=$(tool haproxy); REDIS=$(tool redis-server); RB=$(tool redis-benchmark)
CLI=$(tool redis-cli); IPERF=$(tool iperf3)
(( $(nproc) >= MIN_CORES )) || { echo "scaling.sh needs $MIN_CORES cores, this machine has $(nproc)" >&2; exit 1; }
mkdir -p "$OUT"; TMP=$(mktemp -d /tmp/sluice-scaling.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  cp "$TMP"/*.log "$TMP"/*.yaml "$TMP"/*.cfg "$OUT/" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

for i in 0 1 2 3; do
  taskset -c "${REDIS_CORES[$i]}" "$REDIS" --port $((27000 + i)) --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no >"$TMP/redis-$i.log" 2>&1 &
  pids+=($!)
done
taskset -c "$IPERF_CORE" "$IPERF" -s -B 127.0.0.1 -p 27100 >"$TMP/iperf-s.log" 2>&1 &
pids+=($!)
sleep 1

start_balancer() { # target workers -> sets BPID
  local target=$1 n=$2 cores="0-$(( $2 - 1 ))"
  if [ "$target" = sluice ]; then
    cat >"$TMP/sluice.yaml" <<YAML
workers: $n
listeners:
  - name: redis
    bind: "127.0.0.1:27201"
    backends: ["127.0.0.1:27000", "127.0.0.1:27001", "127.0.0.1:27002", "127.0.0.1:27003"]
  - name: iperf
    bind: "127.0.0.1:27202"
    backends: ["127.0.0.1:27100"]
YAML
    taskset -c "$cores" "$SLUICE" run -c "$TMP/sluice.yaml" --log-level warn 2>>"$TMP/sluice.log" &
  else
    cat >"$TMP/haproxy.cfg" <<CFG
global
  nbthread $n
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
listen redis
  bind 127.0.0.1:27201
  balance roundrobin
  server r0 127.0.0.1:27000
  server r1 127.0.0.1:27001
  server r2 127.0.0.1:27002
  server r3 127.0.0.1:27003
listen iperf
  bind 127.0.0.1:27202
  server i0 127.0.0.1:27100
CFG
    taskset -c "$cores" "$HAPROXY" -f "$TMP/haproxy.cfg" -db >>"$TMP/haproxy.log" 2>&1 &
  fi
  BPID=$!
  for _ in $(seq 50); do "$CLI" -p 27201 PING >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$target did not come up" >&2; exit 1
}

rb() { # args -> mean req/s of GET and SET
  taskset -c "$CLIENT_CORES" "$RB" -p 27201 -t get,set --threads 4 -c 256 "$@" -q 2>/dev/null | tr '\r' '\n' \
    | awk '/requests per second/ {s += $2; n++} END {if (n) printf "%.0f", s / n; else print "nan"}'
}
bulk_gbps() { # port -> Gbit/s
  taskset -c "$CLIENT_CORES" "$IPERF" -c 127.0.0.1 -p "$1" -t 4 -P 8 -J 2>/dev/null \
    | awk -F: '/"bits_per_second"/ {v=$2} END {gsub(/[ ,]/, "", v); printf "%.2f", v / 1e9}'
}

RAW="$OUT/raw.tsv"; : >"$RAW"
for round in $(seq "$ROUNDS"); do
  for n in $COUNTS; do
    for target in sluice haproxy; do
      start_balancer "$target" "$n"
      p16=$(rb -n 2000000 -P 16); p1=$(rb -n 400000); bulk=$(bulk_gbps 27202)
      kill "$BPID"; wait "$BPID" 2>/dev/null || true
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$n" "$target" "$p16" "$p1" "$bulk" | tee -a "$RAW" >&2
    done
  done
  printf '%s\t-\tdirect\t-\t-\t%s\n' "$round" "$(bulk_gbps 27100)" | tee -a "$RAW" >&2
done

command -v python3 >/dev/null || { echo "python3 missing: raw results in $RAW" >&2; cat "$RAW"; exit 0; }
python3 - "$RAW" <<'PY' | tee "$OUT/scaling.md"
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
def med(n, t, col):
    vals = [float(r[col]) for r in rows if r[1] == n and r[2] == t and r[col] not in ("-", "nan")]
    return statistics.median(vals) if vals else float("nan")
direct = med("-", "direct", 5)
print(f"direct iperf3 -P 8: {direct:.2f} Gbit/s (median)\n")
print("| workers | redis -P16 sluice | haproxy | ratio | redis P1 sluice | haproxy | ratio | iperf3 -P8 sluice | haproxy | ratio | sluice/direct |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for n in sorted({r[1] for r in rows if r[1] != "-"}, key=int):
    a, b = med(n, "sluice", 3), med(n, "haproxy", 3)
    c, d = med(n, "sluice", 4), med(n, "haproxy", 4)
    e, f = med(n, "sluice", 5), med(n, "haproxy", 5)
    print(f"| {n} | {a:,.0f} | {b:,.0f} | {a/b:.2f} | {c:,.0f} | {d:,.0f} | {c/d:.2f} | {e:.2f} | {f:.2f} | {e/f:.2f} | {e/direct:.2f} |")
PY
