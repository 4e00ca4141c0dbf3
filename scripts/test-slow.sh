#!/usr/bin/env bash
# The slow tier: the fault-injection suite at larger sizes (more transfers, connections and
# bytes than the default tier that .ci/run runs), then its table. Takes several minutes more
# than the default tier; run it on demand, before a release or after touching the data plane.
#
#   scripts/test-slow.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
SLUICE_TIER=slow exec scripts/fault-table.sh
