#!/usr/bin/env bash
# Side-by-side comparison: Sluice vs HAProxy (mode tcp) vs nginx (stream) vs a direct connection.
#
# Usage: bench/compare.sh
# Environment (defaults in brackets):
#   ROUNDS [5]         interleaved rounds; the target order is rotated every round
#   WORKERS [1]        worker threads/processes of every balancer
#   TARGETS ["sluice haproxy nginx direct"]
#   WORKLOADS ["redis_p16 redis_p1 redis_conn iperf_1 iperf_8 mem_idle"]
#   REDIS_N [400000]   requests per pipelined redis-benchmark run (-P 16)
#   REDIS_P1_N [60000] requests per unpipelined run
#   REDIS_CONN_N [15000]  requests per connection-per-request run (-k 0)
#   REDIS_C [50]       redis-benchmark clients
#   IPERF_T [5]        seconds per iperf3 run
#   MEM_LOW [4000] MEM_HIGH [8000]  idle connection counts for the RSS slope
#   SLUICE_BIN [target/release/sluice]
#   RESULTS_DIR [bench/results/compare-<timestamp>]
# Loopback only. Everything it starts is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-5}
WORKERS=${WORKERS:-1}
TARGETS=${TARGETS:-"sluice haproxy nginx direct"}
WORKLOADS=${WORKLOADS:-"redis_p16 redis_p1 redis_conn iperf_1 iperf_8 mem_idle"}
REDIS_N=${REDIS_N:-400000}
REDIS_P1_N=${REDIS_P1_N:-60000}
REDIS_CONN_N=${REDIS_CONN_N:-15000}
REDIS_C=${REDIS_C:-50}
IPERF_T=${IPERF_T:-5}
MEM_LOW=${MEM_LOW:-4000}
MEM_HIGH=${MEM_HIGH:-8000}
SLUICE_BIN=${SLUICE_BIN:-$ROOT/target/release/sluice}
IDLE_BIN=${IDLE_BIN:-$ROOT/target/release/idle-conns}
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results/compare-$(date +%Y%m%d-%H%M%S)}

# Ports: backends, then one block per balancer: BASE+1..2 (redis, iperf) for the long-lived
# instance, BASE+4 (idle) for the fresh instances of the memory samples.
REDIS_PORT=26379
IPERF_PORT=25201
HOLD_PORT=25301
declare -A BASE=([sluice]=21000 [haproxy]=22000 [nginx]=23000)

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in redis-server redis-benchmark redis-cli iperf3 haproxy nginx python3 ss; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

# fds: the balancer holds 2 per proxied connection (MEM_HIGH -> 2*MEM_HIGH).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (( $(ulimit -n) < 2 * MEM_HIGH + 1000 )); then
    log "warning: ulimit -n $(ulimit -n) is low for $MEM_HIGH idle connections"
fi

mkdir -p "$RESULTS_DIR"
TMP=$(mktemp -d /tmp/sluice-compare.XXXXXX)
RAW="$RESULTS_DIR/raw.tsv"
printf 'round\tworkload\ttarget\tvalue\n' >"$RAW"
PIDS=()
HOLD_PID=""

cleanup() {
    local p
    [[ -n "$HOLD_PID" ]] && kill "$HOLD_PID" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    mkdir -p "$RESULTS_DIR/logs"
    cp "$TMP"/*.log "$RESULTS_DIR/logs/" 2>/dev/null || true
    for p in "$TMP"/nginx-*/logs/error.log; do
        [[ -f $p ]] && cp "$p" "$RESULTS_DIR/logs/$(basename "$(dirname "$(dirname "$p")")")-error.log"
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait until something listens on TCP port $1 (timeout $2 s). Uses ss, never a probe
# connection (iperf3 -s would take a probe for a test client).
wait_port() {
    local port=$1 t=${2:-10} i
    for ((i = 0; i < t * 10; i++)); do
        ss -Hltn "( sport = :$port )" | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# Sum of VmRSS (bytes) of a pid and its direct children (nginx/haproxy master + workers).
rss_bytes() {
    local root=$1 total=0 p kb
    for p in "$root" $(pgrep -P "$root" || true); do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0} * 1024))
    done
    echo "$total"
}

# ---------------------------------------------------------------- backends
log "results: $RESULTS_DIR"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --protected-mode no --maxclients 10000 --daemonize no >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >"$TMP/iperf3-server.log" 2>&1 &
PIDS+=($!)
wait_port "$REDIS_PORT" || die "redis-server did not start"
wait_port "$IPERF_PORT" || die "iperf3 server did not start"

if [[ ! -x "$IDLE_BIN" ]] && [[ " $WORKLOADS " == *" mem_idle "* ]]; then
    log "building idle-conns helper"
    (cd "$ROOT" && cargo build --release -p sluice-forwarding-bench --bin idle-conns) >&2 \
        || die "cannot build idle-conns"
fi

# ---------------------------------------------------------------- balancers
declare -A PID_OF PORT_REDIS PORT_IPERF
ACTIVE=()

# Each start_<balancer> VARIANT starts one instance in the background and sets STARTED_PID.
# VARIANT "main": two listeners (redis, iperf) on BASE+1..2, kept for the whole run;
# VARIANT "mem": a fresh instance with only the idle listener on BASE+4, for one memory sample.
listeners_of() {
    local variant=$2 b=${BASE[$1]}
    if [[ $variant == main ]]; then
        echo "redis $((b + 1)) $REDIS_PORT"
        echo "iperf $((b + 2)) $IPERF_PORT"
    else
        echo "idle $((b + 4)) $HOLD_PORT"
    fi
}

start_haproxy() {
    local variant=$1 cfg="$TMP/haproxy-$1.cfg" name port backend
    {
        printf 'global\n    nbthread %s\n    maxconn %s\n' "$WORKERS" $((MEM_HIGH + 1000))
        printf 'defaults\n    mode tcp\n    maxconn %s\n' $((MEM_HIGH + 1000))
        printf '    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n'
        while read -r name port backend; do
            printf 'listen %s\n    bind 127.0.0.1:%s\n    server s1 127.0.0.1:%s\n' \
                "$name" "$port" "$backend"
        done < <(listeners_of haproxy "$variant")
    } >"$cfg"
    cp "$cfg" "$RESULTS_DIR/"
    haproxy -f "$cfg" -db >"$TMP/haproxy-$variant.log" 2>&1 &
    STARTED_PID=$!
}

start_nginx() {
    local variant=$1 d="$TMP/nginx-$1" name port backend
    mkdir -p "$d/logs"
    {
        printf 'load_module %s;\nworker_processes %s;\nworker_rlimit_nofile %s;\n' \
            "$NGINX_STREAM_MODULE" "$WORKERS" "$(ulimit -n)"
        printf 'daemon off;\nmaster_process on;\npid %s/nginx.pid;\n' "$d"
        printf 'error_log %s/logs/error.log warn;\n' "$d"
        printf 'events { worker_connections %s; }\n' $((2 * MEM_HIGH + 2000))
        printf 'stream {\n    proxy_timeout 1h;\n'
        while read -r name port backend; do
            printf '    server { listen 127.0.0.1:%s; proxy_pass 127.0.0.1:%s; }\n' \
                "$port" "$backend"
        done < <(listeners_of nginx "$variant")
        printf '}\n'
    } >"$d/nginx.conf"
    cp "$d/nginx.conf" "$RESULTS_DIR/nginx-$variant.conf"
    nginx -p "$d" -e "$d/logs/error.log" -c "$d/nginx.conf" >"$TMP/nginx-$variant.log" 2>&1 &
    STARTED_PID=$!
}

start_sluice() {
    local variant=$1 cfg="$TMP/sluice-$1.yaml" name port backend i
    if [[ ! -x "$SLUICE_BIN" ]]; then
        log "SKIPPING sluice: $SLUICE_BIN not found (build it with: cargo build --release -p sluice)"
        return 1
    fi
    {
        printf 'workers: %s\nlisteners:\n' "$WORKERS"
        while read -r name port backend; do
            printf '  - name: %s\n    bind: "127.0.0.1:%s"\n    backends: ["127.0.0.1:%s"]\n' \
                "$name" "$port" "$backend"
        done < <(listeners_of sluice "$variant")
    } >"$cfg"
    cp "$cfg" "$RESULTS_DIR/"
    "$SLUICE_BIN" run -c "$cfg" >"$TMP/sluice-$variant.out" 2>"$TMP/sluice-$variant.log" &
    STARTED_PID=$!
    for ((i = 0; i < 100; i++)); do
        grep -q 'sluice ready' "$TMP/sluice-$variant.log" 2>/dev/null && return 0
        kill -0 "$STARTED_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "SKIPPING sluice: it did not print 'sluice ready' within 10 s; its stderr:"
    tail -n 20 "$TMP/sluice-$variant.log" >&2 || true
    kill "$STARTED_PID" 2>/dev/null || true
    return 1
}

for t in $TARGETS; do
    case $t in
    direct)
        PORT_REDIS[direct]=$REDIS_PORT PORT_IPERF[direct]=$IPERF_PORT
        ACTIVE+=(direct)
        continue
        ;;
    sluice | haproxy | nginx) "start_$t" main || continue ;;
    *) die "unknown target $t" ;;
    esac
    PID_OF[$t]=$STARTED_PID
    PIDS+=("$STARTED_PID")
    b=${BASE[$t]}
    PORT_REDIS[$t]=$((b + 1)) PORT_IPERF[$t]=$((b + 2))
    if ! wait_port "${PORT_REDIS[$t]}" 10; then
        log "SKIPPING $t: not listening on ${PORT_REDIS[$t]}"
        cat "$TMP/$t-main.log" >&2 2>/dev/null || true
        continue
    fi
    if [[ "$(timeout 5 redis-cli -p "${PORT_REDIS[$t]}" ping 2>&1)" != PONG ]]; then
        log "SKIPPING $t: PING through it failed"
        continue
    fi
    ACTIVE+=("$t")
done
((${#ACTIVE[@]} > 0)) || die "no target to measure"
log "targets: ${ACTIVE[*]}; workers: $WORKERS; rounds: $ROUNDS; workloads: $WORKLOADS"
{
    echo "date: $(date -Is)"
    echo "kernel: $(uname -r); cpus: $(nproc)"
    echo "targets: ${ACTIVE[*]}"
    echo "ROUNDS=$ROUNDS WORKERS=$WORKERS REDIS_N=$REDIS_N REDIS_P1_N=$REDIS_P1_N REDIS_CONN_N=$REDIS_CONN_N REDIS_C=$REDIS_C IPERF_T=$IPERF_T MEM_LOW=$MEM_LOW MEM_HIGH=$MEM_HIGH"
    haproxy -v | head -1
    nginx -v 2>&1
    redis-server --version
    iperf3 --version | head -1
    [[ -x "$SLUICE_BIN" ]] && "$SLUICE_BIN" --version 2>&1 | head -1 || true
} >"$RESULTS_DIR/env.txt"

# ---------------------------------------------------------------- workloads
# Each prints one number on stdout (or nothing on failure).

# redis-benchmark: mean of the GET and SET requests/s.
redis_run() {
    local port=$1 name=$2
    shift 2
    local out="$RESULTS_DIR/logs/$name.csv"
    timeout 120 redis-benchmark -h 127.0.0.1 -p "$port" -t get,set -c "$REDIS_C" --csv "$@" \
        >"$out" 2>&1 || { log "redis-benchmark failed ($name)"; return 0; }
    python3 - "$out" <<'EOF'
import csv, sys
rps = [float(r[1]) for r in csv.reader(open(sys.argv[1])) if r and r[0] in ("GET", "SET")]
if len(rps) == 2:
    print(f"{sum(rps) / 2:.1f}")
EOF
}

# iperf3: received throughput in Gbit/s.
iperf_run() {
    local port=$1 streams=$2 name=$3
    local out="$RESULTS_DIR/logs/$name.json"
    timeout $((IPERF_T + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_T" -P "$streams" -J \
        >"$out" 2>&1 || { log "iperf3 failed ($name)"; return 0; }
    python3 - "$out" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
print(f"{j['end']['sum_received']['bits_per_second'] / 1e9:.3f}")
EOF
}

# Count connections the holder has accepted (established, local port HOLD_PORT).
held_conns() { ss -Htn state established "( sport = :$HOLD_PORT )" | wc -l; }

wait_held() {
    local want=$1 i
    for ((i = 0; i < 300; i++)); do
        (($(held_conns) >= want)) && return 0
        sleep 0.1
    done
    return 1
}

# Memory per idle proxied connection: (RSS@HIGH - RSS@LOW) / (HIGH - LOW), in bytes, measured on
# a fresh instance of the balancer (a reused one would serve the new connections from memory its
# allocator kept from an earlier sample and report a slope near zero).
mem_run() {
    local t=$1 port=$((BASE[$1] + 4)) r1 r2 line res="" base held
    MEM_OPID="" MEM_BPID="" HOLD_PID=""
    # This runs in a $(...) subshell: make sure its helpers die with it.
    trap 'kill ${MEM_OPID:-} ${HOLD_PID:-} ${MEM_BPID:-} 2>/dev/null || true' EXIT
    "$IDLE_BIN" hold --listen "127.0.0.1:$HOLD_PORT" >"$TMP/hold.out" 2>&1 &
    HOLD_PID=$!
    wait_port "$HOLD_PORT" 5 || { log "holder did not start"; return 0; }
    "start_$t" mem >&2 || return 0
    MEM_BPID=$STARTED_PID
    wait_port "$port" 10 || { log "mem: $t not listening on $port"; return 0; }
    base=$(held_conns)
    coproc OPENER { exec "$IDLE_BIN" open --connect "127.0.0.1:$port" --count "$MEM_LOW"; }
    MEM_OPID=$OPENER_PID
    if read -r -t 60 line <&"${OPENER[0]}" && wait_held $((base + MEM_LOW)); then
        sleep 0.5
        r1=$(rss_bytes "$MEM_BPID")
        echo "$MEM_HIGH" >&"${OPENER[1]}"
        if read -r -t 60 line <&"${OPENER[0]}" && wait_held $((base + MEM_HIGH)); then
            sleep 0.5
            r2=$(rss_bytes "$MEM_BPID")
            res=$(((r2 - r1) / (MEM_HIGH - MEM_LOW)))
            printf '%s\t%s\t%s\n' "$t" "$r1" "$r2" >>"$RESULTS_DIR/logs/mem_rss.tsv"
        else
            held=$(held_conns)
            log "mem: $t did not reach $MEM_HIGH proxied connections (backend holds $((held - base)))"
        fi
    else
        held=$(held_conns)
        log "mem: $t did not reach $MEM_LOW proxied connections (backend holds $((held - base)))"
    fi
    eval "exec ${OPENER[1]}>&-" || true
    kill "$MEM_OPID" "$MEM_BPID" "$HOLD_PID" 2>/dev/null || true
    wait "$MEM_OPID" "$MEM_BPID" "$HOLD_PID" 2>/dev/null || true
    sleep 0.5
    echo "$res"
}

run_one() {
    local w=$1 t=$2 r=$3 name="r${3}-${1}-${2}"
    case $w in
    redis_p16) redis_run "${PORT_REDIS[$t]}" "$name" -n "$REDIS_N" -P 16 ;;
    redis_p1) redis_run "${PORT_REDIS[$t]}" "$name" -n "$REDIS_P1_N" ;;
    redis_conn) redis_run "${PORT_REDIS[$t]}" "$name" -n "$REDIS_CONN_N" -k 0 ;;
    iperf_1) iperf_run "${PORT_IPERF[$t]}" 1 "$name" ;;
    iperf_8) iperf_run "${PORT_IPERF[$t]}" 8 "$name" ;;
    mem_idle)
        [[ $t == direct ]] && return 0
        mem_run "$t"
        ;;
    *) die "unknown workload $w" ;;
    esac
}

mkdir -p "$RESULTS_DIR/logs"
n=${#ACTIVE[@]}
start_s=$SECONDS
for ((r = 1; r <= ROUNDS; r++)); do
    for w in $WORKLOADS; do
        for ((k = 0; k < n; k++)); do
            t=${ACTIVE[$(((k + r - 1) % n))]}
            v=$(run_one "$w" "$t" "$r")
            [[ -n "$v" ]] && printf '%s\t%s\t%s\t%s\n' "$r" "$w" "$t" "$v" >>"$RAW"
            log "round $r/$ROUNDS $w $t: ${v:-n/a} ($((SECONDS - start_s)) s)"
        done
    done
done

# ---------------------------------------------------------------- summary
python3 - "$RAW" "${ACTIVE[*]}" "$WORKLOADS" >"$RESULTS_DIR/summary.md" <<'EOF'
import csv, statistics, sys
raw, active, workloads = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
vals = {}
for row in csv.DictReader(open(raw), delimiter="\t"):
    vals.setdefault((row["workload"], row["target"]), []).append(float(row["value"]))
info = {
    "redis_p16": ("redis-benchmark get/set -P 16", "req/s", True),
    "redis_p1": ("redis-benchmark get/set, no pipelining", "req/s", True),
    "redis_conn": ("redis-benchmark get/set -k 0 (connection per request)", "req/s", True),
    "iperf_1": ("iperf3, 1 stream", "Gbit/s", True),
    "iperf_8": ("iperf3, 8 streams", "Gbit/s", True),
    "mem_idle": ("RSS per idle proxied connection", "bytes", False),
}
cols = [t for t in ("sluice", "haproxy", "nginx", "direct") if t in active]
def med(w, t):
    v = vals.get((w, t))
    return statistics.median(v) if v else None
def fmt(x):
    if x is None: return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"
hdr = ["workload", "unit", *cols, "sluice/haproxy", "sluice/nginx", "sluice/direct",
       "haproxy/direct", "nginx/direct", "goal"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for w in workloads:
    name, unit, higher = info[w]
    m = {t: med(w, t) for t in ("sluice", "haproxy", "nginx", "direct")}
    s = m["sluice"]
    if w == "mem_idle":
        goal = "<= 1024 B: " + ("-" if s is None else ("met" if s <= 1024 else "MISSED"))
    else:
        r = s / m["haproxy"] if s is not None and m["haproxy"] else None
        goal = ">= 1.3x haproxy: " + ("-" if r is None else ("met" if r >= 1.3 else "MISSED"))
        if w.startswith("iperf"):
            d = s / m["direct"] if s is not None and m["direct"] else None
            goal += "; >= 0.7x direct: " + ("-" if d is None else ("met" if d >= 0.7 else "MISSED"))
    n = max((len(vals.get((w, t), [])) for t in cols), default=0)
    cells = [f"{name} (n={n})", unit + ("" if higher else ", lower is better"),
             *[fmt(m[t]) for t in cols],
             ratio(s, m["haproxy"]), ratio(s, m["nginx"]), ratio(s, m["direct"]),
             ratio(m["haproxy"], m["direct"]), ratio(m["nginx"], m["direct"]), goal]
    print("| " + " | ".join(cells) + " |")
EOF
echo
cat "$RESULTS_DIR/env.txt"
echo
cat "$RESULTS_DIR/summary.md"
echo
echo "raw results: $RAW"
