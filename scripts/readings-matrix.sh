#!/usr/bin/env bash
# Runs the end-to-end suites and the main job under combinations of the simulator's readings of
# KMCL's undocumented behaviour (docs/kmcl-bindings.md, "Undocumented points"), one line per
# combination. The combinations come from `examples/readings_matrix.rs`: by default a covering
# array in which every pair of readings of any two points runs together at least once (13
# combinations instead of the full product's 4,608); --each runs each reading alone.
#
#   scripts/readings-matrix.sh [--pairwise | --each] [--list]
#
# Exit status: 0 if every combination passed, 1 otherwise (the failing output is kept under
# target/readings-matrix/).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=--pairwise
list=false
for arg in "$@"; do
  case "$arg" in
    --pairwise | --each) mode=$arg ;;
    --list) list=true ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

export CARGO_TERM_COLOR=never
# Suites whose guest is scripted by the test. The product's correctness under a reading must
# not depend on the test's guest, except for one point: where Pause waits for the guest to
# complete every packet it holds, a guest that is not running while the host pauses makes any
# product hang, so those combinations run what keeps a live guest (the main job, and the test
# written for that reading).
suites=(e2e_migration e2e_faults exactly_once_hardening control_e2e alloc_free_save ledger_evidence)
test_args=()
for s in "${suites[@]}"; do test_args+=(--test "$s"); done

rows=$(cargo run -q --example readings_matrix -- "$mode") || exit 1
if $list; then
  echo "$rows"
  exit 0
fi

out=target/readings-matrix
mkdir -p "$out"
echo "building the suites and the main job once ..."
cargo test -q --all-features --no-run "${test_args[@]}" >"$out/build.log" 2>&1 || {
  tail -20 "$out/build.log"; exit 1; }
cargo build -q --release --example live_migration >>"$out/build.log" 2>&1 || {
  tail -20 "$out/build.log"; exit 1; }

failed=0
n=0
total=$(echo "$rows" | wc -l)
while IFS= read -r spec; do
  n=$((n + 1))
  start=$SECONDS
  log="$out/combination-$n.log"
  : >"$log"
  ok=true
  suite_spec=$spec
  if [[ "$spec" == *pause_waits=outgoing* ]]; then
    # The main job and the live-guest test run under the combination as it is; the scripted
    # suites under the same combination with Pause waiting for incoming packets only, so that
    # every pair of the other points is still covered by them.
    what="main job + live-guest test; suites with pause_waits=incoming"
    suite_spec=${spec/pause_waits=outgoing/pause_waits=incoming}
    VMBSRV_SIM_READINGS="$spec" cargo test -q --all-features --test exactly_once_hardening \
      a_pause_that_waits_for_outgoing_packets >>"$log" 2>&1 || ok=false
  else
    what="${#suites[@]} suites + main job"
  fi
  VMBSRV_SIM_READINGS="$suite_spec" cargo test -q --all-features --no-fail-fast "${test_args[@]}" \
    >>"$log" 2>&1 || ok=false
  VMBSRV_SIM_READINGS="$spec" target/release/examples/live_migration --messages 3000 --quiet \
    >>"$log" 2>&1 || ok=false
  result=$(grep -h '^RESULT' "$log" | tail -1)
  passed=$(grep -h '^test result' "$log" | awk '{s += $4} END {print s + 0}')
  if $ok; then
    status=PASS
  else
    status=FAIL
    failed=$((failed + 1))
  fi
  printf '%s %2d/%d %4ss  %s tests, %s; %s\n    %s\n' "$status" "$n" "$total" \
    $((SECONDS - start)) "$passed" "$what" "${result:-no main-job result}" "$spec"
done <<<"$rows"

echo
if [ "$failed" -eq 0 ]; then
  echo "readings matrix: all $total combinations passed"
else
  echo "readings matrix: $failed of $total combinations FAILED (logs in $out/)"
  exit 1
fi
