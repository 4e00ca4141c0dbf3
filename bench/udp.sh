#!/usr/bin/env bash
# UDP comparison: Sluice (protocol: udp) vs nginx (stream, UDP) vs a direct exchange.
#
# Usage: bench/udp.sh
# Environment (defaults in brackets):
#   ROUNDS [5]         interleaved rounds; the target order is rotated every round
#   TARGETS ["sluice nginx direct"]
#   WORKLOADS ["dns echo_64 echo_1400"]
#   DNS_T [5]          seconds per dnsperf run (-l)
#   DNS_C [20]         dnsperf clients (-c; each is one UDP socket, i.e. one source port)
#   DNS_Q [100]        dnsperf maximum outstanding queries (-q, its default)
#   ECHO_T [4]         measured seconds per echo run (after ECHO_WARMUP [0.5] s)
#   ECHO_SOCKETS [16]  echo client flows (connected sockets)
#   ECHO_WINDOW [4]    datagrams in flight per flow (closed loop)
#   ECHO_LOSS_MS [200] a flow's outstanding datagrams count as lost after this long without an echo
#   BUILD [0]          1: cargo build --release -p sluice -p sluice-udp-load first
#   SLUICE_BIN [target/release/sluice]  UDP_LOAD_BIN [target/release/udp-load]
#   RESULTS_DIR [bench/results/udp-<timestamp>]
# Every balancer runs one worker. Loopback only. Everything it starts is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-5}
TARGETS=${TARGETS:-"sluice nginx direct"}
WORKLOADS=${WORKLOADS:-"dns echo_64 echo_1400"}
DNS_T=${DNS_T:-5}
DNS_C=${DNS_C:-20}
DNS_Q=${DNS_Q:-100}
ECHO_T=${ECHO_T:-4}
ECHO_WARMUP=${ECHO_WARMUP:-0.5}
ECHO_SOCKETS=${ECHO_SOCKETS:-16}
ECHO_WINDOW=${ECHO_WINDOW:-4}
ECHO_LOSS_MS=${ECHO_LOSS_MS:-200}
BUILD=${BUILD:-0}
SLUICE_BIN=${SLUICE_BIN:-$ROOT/target/release/sluice}
UDP_LOAD_BIN=${UDP_LOAD_BIN:-$ROOT/target/release/udp-load}
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results/udp-$(date +%Y%m%d-%H%M%S)}

# Ports (UDP): backends, then per balancer BASE+53 (dns) and BASE+54 (echo); Sluice's admin
# endpoint (TCP) on 21900. Distinct from compare.sh's TCP ports.
DNS_PORT=25353
ECHO_PORT=25400
ADMIN_PORT=21900
declare -A BASE=([sluice]=21000 [nginx]=23000)

log() { printf '[udp] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in dnsmasq dnsperf dig nginx python3 ss curl; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

if [[ $BUILD == 1 ]]; then
    log "building sluice and sluice-udp-load (release)"
    (cd "$ROOT" && cargo build --release -p sluice -p sluice-udp-load) >&2 || die "build failed"
fi
if [[ ! -x "$UDP_LOAD_BIN" ]] && [[ " $WORKLOADS " == *" echo_"* ]]; then
    log "building udp-load"
    (cd "$ROOT" && cargo build --release -p sluice-udp-load) >&2 || die "cannot build udp-load"
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$RESULTS_DIR/logs"
TMP=$(mktemp -d /tmp/sluice-udp.XXXXXX)
RAW="$RESULTS_DIR/raw.tsv"
printf 'round\tworkload\ttarget\tvalue\tlost\tlate\n' >"$RAW"
PIDS=()

# Kernel view of the listening sockets (skmem d = datagrams the socket dropped, e.g. its receive
# buffer was full) and of UDP as a whole; taken at start and at the end.
socket_snapshot() {
    {
        echo "# $1 $(date -Is)"
        grep '^Udp:' /proc/net/snmp
        ss -Huanm "( sport = :$DNS_PORT or sport = :$ECHO_PORT or sport = :21053 or sport = :21054 or sport = :23053 or sport = :23054 )" || true
    } >>"$RESULTS_DIR/sockets.txt" 2>&1
}

cleanup() {
    local p
    socket_snapshot end || true
    if [[ -n "${PID_OF[sluice]:-}" ]]; then
        curl -s -m 2 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$RESULTS_DIR/sluice-metrics.txt" 2>/dev/null || true
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    cp "$TMP"/*.log "$RESULTS_DIR/logs/" 2>/dev/null || true
    [[ -f "$TMP/nginx/logs/error.log" ]] && cp "$TMP/nginx/logs/error.log" "$RESULTS_DIR/logs/nginx-error.log"
    rm -rf "$TMP"
}
declare -A PID_OF PORT_DNS PORT_ECHO
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait until a UDP socket is bound to port $1 (timeout $2 s).
wait_udp() {
    local port=$1 t=${2:-10} i
    for ((i = 0; i < t * 10; i++)); do
        ss -Hlun "( sport = :$port )" | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# One A query for example.test through port $1; prints the answer.
dig_one() { timeout 5 dig +short +time=1 +tries=2 -p "$1" @127.0.0.1 example.test A 2>&1 || true; }

# ---------------------------------------------------------------- backends
log "results: $RESULTS_DIR"
# dnsmasq: answers example.test (and every name under it) from its own config, never forwards
# (--no-resolv, no server=), reads no /etc/hosts or /etc/dnsmasq.conf, no DHCP; foreground, log to
# stderr. --dns-forward-max only limits forwarded queries, so it does not apply here.
DNSMASQ_USER=()
[[ $(id -u) == 0 ]] && DNSMASQ_USER=(--user=root)
dnsmasq --keep-in-foreground --conf-file=/dev/null "${DNSMASQ_USER[@]}" \
    --listen-address=127.0.0.1 --bind-interfaces --port="$DNS_PORT" \
    --no-resolv --no-hosts --no-poll --cache-size=10000 --pid-file= --log-facility=- \
    --address=/example.test/10.1.2.3 >"$TMP/dnsmasq.log" 2>&1 &
PIDS+=($!)
if [[ " $WORKLOADS " == *" echo_"* ]]; then
    "$UDP_LOAD_BIN" echo --listen "127.0.0.1:$ECHO_PORT" >"$TMP/echo.log" 2>&1 &
    PIDS+=($!)
    wait_udp "$ECHO_PORT" || die "udp-load echo did not start"
fi
wait_udp "$DNS_PORT" || die "dnsmasq did not start"
[[ "$(dig_one "$DNS_PORT")" == 10.1.2.3 ]] || die "dnsmasq does not answer example.test"

# Query file: dnsperf cycles through it.
for ((i = 0; i < 1000; i++)); do echo "example.test A"; done >"$TMP/queries.txt"

# ---------------------------------------------------------------- balancers
# dns: one reply per query ends the session (sluice responses: 1, nginx proxy_responses 1), as a
#   DNS deployment would configure it; each finished session's backend socket is closed (nginx)
#   or pooled (Sluice, if it does).
# echo: long-lived sessions, one per client flow, no reply limit (sluice responses 0, nginx without
#   proxy_responses); both end a session after 60 s idle (timeouts.idle / proxy_timeout), which
#   never happens during a run, so this measures steady-state datagram relaying, not session churn.
start_sluice() {
    local cfg="$TMP/sluice.yaml" b=${BASE[sluice]} i
    if [[ ! -x "$SLUICE_BIN" ]]; then
        log "SKIPPING sluice: $SLUICE_BIN not found (build it with: cargo build --release -p sluice)"
        return 1
    fi
    cat >"$cfg" <<EOF
workers: 1
admin:
  bind: "127.0.0.1:$ADMIN_PORT"
listeners:
  - name: dns
    protocol: udp
    bind: "127.0.0.1:$((b + 53))"
    backends: ["127.0.0.1:$DNS_PORT"]
    responses: 1
    timeouts: { idle: 10s }
  - name: echo
    protocol: udp
    bind: "127.0.0.1:$((b + 54))"
    backends: ["127.0.0.1:$ECHO_PORT"]
    timeouts: { idle: 60s }
EOF
    cp "$cfg" "$RESULTS_DIR/"
    "$SLUICE_BIN" run -c "$cfg" >"$TMP/sluice.out" 2>"$TMP/sluice.log" &
    STARTED_PID=$!
    for ((i = 0; i < 100; i++)); do
        grep -q 'sluice ready' "$TMP/sluice.log" 2>/dev/null && return 0
        kill -0 "$STARTED_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "SKIPPING sluice: it did not print 'sluice ready' within 10 s; its stderr:"
    tail -n 20 "$TMP/sluice.log" >&2 || true
    kill "$STARTED_PID" 2>/dev/null || true
    return 1
}

start_nginx() {
    local d="$TMP/nginx" b=${BASE[nginx]}
    mkdir -p "$d/logs"
    {
        printf 'load_module %s;\nworker_processes 1;\nworker_rlimit_nofile %s;\n' \
            "$NGINX_STREAM_MODULE" "$(ulimit -n)"
        printf 'daemon off;\nmaster_process on;\npid %s/nginx.pid;\n' "$d"
        printf 'error_log %s/logs/error.log warn;\n' "$d"
        printf 'events { worker_connections 16384; }\n'
        printf 'stream {\n'
        printf '    server { listen 127.0.0.1:%s udp; proxy_pass 127.0.0.1:%s;' $((b + 53)) "$DNS_PORT"
        printf ' proxy_responses 1; proxy_timeout 10s; }\n'
        printf '    server { listen 127.0.0.1:%s udp; proxy_pass 127.0.0.1:%s;' $((b + 54)) "$ECHO_PORT"
        printf ' proxy_timeout 60s; }\n'
        printf '}\n'
    } >"$d/nginx.conf"
    cp "$d/nginx.conf" "$RESULTS_DIR/nginx.conf"
    nginx -p "$d" -e "$d/logs/error.log" -c "$d/nginx.conf" >"$TMP/nginx.log" 2>&1 &
    STARTED_PID=$!
}

ACTIVE=()
for t in $TARGETS; do
    case $t in
    direct)
        PORT_DNS[direct]=$DNS_PORT PORT_ECHO[direct]=$ECHO_PORT
        ACTIVE+=(direct)
        continue
        ;;
    sluice | nginx) "start_$t" || continue ;;
    *) die "unknown target $t" ;;
    esac
    PID_OF[$t]=$STARTED_PID
    PIDS+=("$STARTED_PID")
    b=${BASE[$t]}
    PORT_DNS[$t]=$((b + 53)) PORT_ECHO[$t]=$((b + 54))
    if ! wait_udp "${PORT_DNS[$t]}" 10; then
        log "SKIPPING $t: not bound to ${PORT_DNS[$t]}"
        continue
    fi
    if [[ "$(dig_one "${PORT_DNS[$t]}")" != 10.1.2.3 ]]; then
        log "SKIPPING $t: a DNS query through it failed"
        continue
    fi
    if [[ " $WORKLOADS " == *" echo_"* ]] && ! "$UDP_LOAD_BIN" load --target "127.0.0.1:${PORT_ECHO[$t]}" \
        --size 64 --sockets 2 --window 1 --warmup 0 --duration 0.3 >/dev/null 2>&1; then
        log "SKIPPING $t: no echo through it"
        continue
    fi
    ACTIVE+=("$t")
done
((${#ACTIVE[@]} > 0)) || die "no target to measure"
log "targets: ${ACTIVE[*]}; rounds: $ROUNDS; workloads: $WORKLOADS"
{
    echo "date: $(date -Is)"
    echo "kernel: $(uname -r); cpus: $(nproc); cpu: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "targets: ${ACTIVE[*]}"
    echo "ROUNDS=$ROUNDS DNS_T=$DNS_T DNS_C=$DNS_C DNS_Q=$DNS_Q ECHO_T=$ECHO_T ECHO_WARMUP=$ECHO_WARMUP ECHO_SOCKETS=$ECHO_SOCKETS ECHO_WINDOW=$ECHO_WINDOW ECHO_LOSS_MS=$ECHO_LOSS_MS"
    echo "net.core.rmem_default=$(cat /proc/sys/net/core/rmem_default) rmem_max=$(cat /proc/sys/net/core/rmem_max)"
    nginx -v 2>&1
    dnsmasq --version | head -1
    dnsperf -h 2>&1 | grep -i '^version' || true
    [[ -x "$SLUICE_BIN" ]] && "$SLUICE_BIN" --version 2>&1 | head -1 || true
} >"$RESULTS_DIR/env.txt"
socket_snapshot start

# ---------------------------------------------------------------- workloads
# Each prints "VALUE LOST LATE" on stdout (or nothing on failure).

# dnsperf: queries per second, and queries lost (no answer within dnsperf's 5 s timeout).
dns_run() {
    local port=$1 name=$2 out="$RESULTS_DIR/logs/$2.txt"
    timeout $((DNS_T + 30)) dnsperf -s 127.0.0.1 -p "$port" -d "$TMP/queries.txt" \
        -c "$DNS_C" -q "$DNS_Q" -l "$DNS_T" >"$out" 2>&1 || { log "dnsperf failed ($name)"; return 0; }
    awk '/Queries per second:/ {q = $4} /Queries lost:/ {l = $3} END {if (q != "") print q, l, 0}' "$out"
}

# udp-load: echoed datagrams (round trips) per second, datagrams given up as lost (no echo within
# ECHO_LOSS_MS), and how many of those came back later (late: a stall, not a drop).
echo_run() {
    local port=$1 size=$2 name=$3 out="$RESULTS_DIR/logs/$3.txt"
    timeout 60 "$UDP_LOAD_BIN" load --target "127.0.0.1:$port" --size "$size" \
        --sockets "$ECHO_SOCKETS" --window "$ECHO_WINDOW" --warmup "$ECHO_WARMUP" \
        --duration "$ECHO_T" --loss-timeout-ms "$ECHO_LOSS_MS" >"$out" 2>&1 || { log "udp-load failed ($name)"; return 0; }
    sed -n 's/^rt_per_s=\([0-9.]*\) .* lost=\([0-9]*\) late=\([0-9]*\) .*/\1 \2 \3/p' "$out"
}

run_one() {
    local w=$1 t=$2 name="r${3}-${1}-${2}"
    case $w in
    dns) dns_run "${PORT_DNS[$t]}" "$name" ;;
    echo_64) echo_run "${PORT_ECHO[$t]}" 64 "$name" ;;
    echo_1400) echo_run "${PORT_ECHO[$t]}" 1400 "$name" ;;
    *) die "unknown workload $w" ;;
    esac
}

n=${#ACTIVE[@]}
start_s=$SECONDS
for ((r = 1; r <= ROUNDS; r++)); do
    for w in $WORKLOADS; do
        for ((k = 0; k < n; k++)); do
            t=${ACTIVE[$(((k + r - 1) % n))]}
            res=$(run_one "$w" "$t" "$r")
            read -r v lost late <<<"$res" || true
            [[ -n "$res" ]] && printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$w" "$t" "$v" "$lost" "$late" >>"$RAW"
            log "round $r/$ROUNDS $w $t: ${v:-n/a} (lost ${lost:-?}, late ${late:-?}) ($((SECONDS - start_s)) s)"
        done
    done
done

# ---------------------------------------------------------------- summary
python3 - "$RAW" "${ACTIVE[*]}" "$WORKLOADS" >"$RESULTS_DIR/summary.md" <<'EOF'
import csv, statistics, sys
raw, active, workloads = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
vals, lost, late = {}, {}, {}
for row in csv.DictReader(open(raw), delimiter="\t"):
    key = (row["workload"], row["target"])
    vals.setdefault(key, []).append(float(row["value"]))
    lost[key] = lost.get(key, 0) + int(row["lost"] or 0)
    late[key] = late.get(key, 0) + int(row["late"] or 0)
info = {
    "dns": ("dnsperf -c 20 vs dnsmasq (A example.test)", "queries/s"),
    "echo_64": ("UDP echo, 64 B datagrams", "round trips/s"),
    "echo_1400": ("UDP echo, 1400 B datagrams", "round trips/s"),
}
cols = [t for t in ("sluice", "nginx", "direct") if t in active]
def med(w, t):
    v = vals.get((w, t))
    return statistics.median(v) if v else None
def fmt(x):
    if x is None: return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"
hdr = ["workload", "unit", *cols, "sluice/nginx", "sluice/direct", "nginx/direct",
       "lost (late) " + "/".join(cols) + ", all rounds", "goal"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for w in workloads:
    name, unit = info[w]
    m = {t: med(w, t) for t in ("sluice", "nginx", "direct")}
    s = m["sluice"]
    if w == "dns":
        r = s / m["nginx"] if s is not None and m["nginx"] else None
        goal = ">= 1.5x nginx: " + ("-" if r is None else ("met" if r >= 1.5 else "MISSED"))
    else:
        goal = "-"
    n = max((len(vals.get((w, t), [])) for t in cols), default=0)
    cells = [f"{name} (n={n})", unit, *[fmt(m[t]) for t in cols],
             ratio(s, m["nginx"]), ratio(s, m["direct"]), ratio(m["nginx"], m["direct"]),
             " / ".join(f"{lost[(w, t)]} ({late[(w, t)]})" if (w, t) in lost else "-"
                        for t in cols), goal]
    print("| " + " | ".join(cells) + " |")
EOF
echo
cat "$RESULTS_DIR/env.txt"
echo
cat "$RESULTS_DIR/summary.md"
echo
echo "raw results: $RAW"
