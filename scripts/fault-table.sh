#!/usr/bin/env bash
# Runs the fault-injection suite (crates/sluice/tests/fault_*.rs) and prints the table of
# faults, pass figures and measured figures that each test reports through
# sluice_testkit::figure. Sizes follow the tier: SLUICE_TIER=slow for the larger ones.
#
#   scripts/fault-table.sh              # default tier (what .ci/run runs, as part of the suite)
#   SLUICE_TIER=slow scripts/fault-table.sh
#
# The test files run one after another and the tests within a file one at a time, so that the
# CPU and throughput figures are not measured against each other.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
figures=$(mktemp)
trap 'rm -f "$figures"' EXIT
tests=()
for file in crates/sluice/tests/fault_*.rs; do
    tests+=(--test "$(basename "$file" .rs)")
done
SLUICE_FIGURES="$figures" cargo test --locked -p sluice "${tests[@]}" -- --test-threads=1
echo
echo "| fault | pass figure | measured figure |"
echo "|---|---|---|"
sort "$figures" | while IFS=$'\t' read -r fault pass measured; do
    echo "| $fault | $pass | $measured |"
done
