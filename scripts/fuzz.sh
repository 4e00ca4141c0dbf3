#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ and runs each for a bounded time with libFuzzer, on the
# stable toolchain (coverage-guided, without a sanitizer; see fuzz/README.md). Each target first
# replays its regression inputs (fuzz/regressions/<target>/), then fuzzes from its seed corpus
# (fuzz/corpus/<target>/). The targets run side by side, one per core. Exits non-zero on any
# panic, hang or memory blow-up, leaving the input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh              # every target, 20 s each
#   scripts/fuzz.sh 300          # every target, 5 minutes each
#   scripts/fuzz.sh 60 conn      # one target
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
# libFuzzer reads -max_total_time=0 as "no limit".
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [seconds > 0] [target...]" >&2
  exit 64
fi
triple="$(rustc -vV | sed -n 's/^host: //p')"
if ! command -v "${CXX:-c++}" >/dev/null; then
  echo "fuzz: libFuzzer is C++: install a C++ compiler (g++) or set CXX" >&2
  exit 69
fi
bin="fuzz/target/$triple/release"

# The coverage instrumentation that cargo-fuzz adds with `--sanitizer none`: stable `-C` flags
# only. `--target` keeps them away from build scripts and proc macros, which must not be
# instrumented (nothing provides libFuzzer's hooks to them).
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  -Cllvm-args=-sanitizer-coverage-stack-depth \
  ${RUSTFLAGS:-}"
# Its own target dir, whatever CARGO_TARGET_DIR says: the binaries are run from there below.
cargo build --manifest-path fuzz/Cargo.toml --target-dir fuzz/target --locked --release \
  --target "$triple" --bins

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -vx 'sluice-fuzz')
fi

# One target: replay, then fuzz. -timeout: an input running this long is a hang;
# -rss_limit_mb: a blow-up wherever the target's own memory bound does not look.
fuzz_one() {
  local target="$1" work="fuzz/target/corpus/$1" artifacts="fuzz/artifacts/$1"
  local limits=(-timeout=10 -rss_limit_mb=1024 -artifact_prefix="$artifacts/")
  mkdir -p "$work" "$artifacts"
  if [ -d "fuzz/regressions/$target" ]; then
    "$bin/$target" "${limits[@]}" fuzz/regressions/"$target"/* || return 1
  fi
  local dict=()
  if [ -f "fuzz/dict/$target.dict" ]; then
    dict=(-dict="fuzz/dict/$target.dict")
  fi
  # New inputs go to the first corpus directory (ignored by git); the seeds stay as they are.
  "$bin/$target" "$work" "fuzz/corpus/$target" "${dict[@]}" "${limits[@]}" \
    -max_total_time="$seconds" -max_len=16384 -print_final_stats=1
}

pids=()
for target in "${targets[@]}"; do
  echo "fuzz: $target for ${seconds}s (log in fuzz/target/$target.log)"
  fuzz_one "$target" >"fuzz/target/$target.log" 2>&1 &
  pids+=($!)
done
failed=()
for i in "${!targets[@]}"; do
  target="${targets[$i]}"
  if wait "${pids[$i]}"; then
    echo "fuzz: $target passed:" $(grep -E '^stat::(number_of_executed_units|new_units_added)' \
      "fuzz/target/$target.log" | tr -d ' ')
  else
    tail -n 60 "fuzz/target/$target.log" | grep -vE '^ +([0-9]+: |at )'
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]}; inputs in fuzz/artifacts/; replay one with" \
    "$bin/<target> <input>" >&2
  exit 1
fi
