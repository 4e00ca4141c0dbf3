#!/usr/bin/env bash
# A/B of two Sluice binaries on bulk TCP: both run at once in front of one iperf3 server,
# and iperf3 runs alternate between them (A, B, B, A, ...), so that whatever else the machine
# does weighs on both alike. Prints each run and the median ratio B/A.
#
# Usage: bench/ab.sh BINARY_A BINARY_B
# Environment: ROUNDS [6], STREAMS [8], SECONDS_PER_RUN [3], WORKERS [1]
set -euo pipefail
A=$1
B=$2
ROUNDS=${ROUNDS:-6}
STREAMS=${STREAMS:-8}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
WORKERS=${WORKERS:-1}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
BACKEND=127.0.0.1:25201
iperf3 -s -p 25201 >/dev/null 2>&1 &
for side in a b; do
    port=$([[ $side == a ]] && echo 25211 || echo 25212)
    cat > "$DIR/$side.yaml" <<YAML
workers: $WORKERS
listeners:
  - name: bulk
    bind: "127.0.0.1:$port"
    backends: ["$BACKEND"]
YAML
done
"$A" run -c "$DIR/a.yaml" 2>"$DIR/a.log" &
"$B" run -c "$DIR/b.yaml" 2>"$DIR/b.log" &
sleep 1
run() { # port -> Gbit/s
    iperf3 -c 127.0.0.1 -p "$1" -P "$STREAMS" -t "$SECONDS_PER_RUN" -J \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))'
}
ratios=()
for round in $(seq 1 "$ROUNDS"); do
    if (( round % 2 )); then a=$(run 25211); b=$(run 25212); else b=$(run 25212); a=$(run 25211); fi
    ratio=$(python3 -c "print(round($b/$a, 3))")
    ratios+=("$ratio")
    echo "round $round: A $a Gbit/s, B $b Gbit/s, B/A $ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | python3 -c 'import sys; v=[float(x) for x in sys.stdin]; print("median B/A:", v[len(v)//2])'
