#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/: a short run each (CI), or a long campaign.
#
#   scripts/fuzz.sh [SECONDS]                       # SECONDS (default 60) wall time per target, in turn
#   FUZZ_TARGETS="decode_saved restore_e2e" scripts/fuzz.sh 30     # a subset
#   scripts/fuzz.sh --campaign CPU_SECONDS [--lanes N] [--no-build] [--stop-at EPOCH_SECONDS]
#
# Campaign mode is for long runs (hours). Each target fuzzes until its fuzzer process has used
# CPU_SECONDS of CPU time (user + system, read from /proc; wall time depends on what else the
# machine runs), N targets at a time (default 2) at `nice 19`, so the machine stays usable. A
# crash does not end a target's campaign: the artifact is kept, counted, and the target restarts
# on the remaining budget (at most 10 crashes per target). At the end each corpus is minimized
# with libFuzzer's `-merge=1` (same coverage, fewer inputs), and one line per target goes to
# $FUZZ_LOG_DIR/campaign.tsv: commit, CPU s, wall s, executions, exec/s, cov, ft, corpus before
# and after minimizing, crashes. `--no-build` reuses the binaries already in fuzz/target.
# `--stop-at` (e.g. `--stop-at "$(date -d 11:40 +%s)"`) ends every target at that wall-clock
# time even if its budget is not used up; its line then shows the CPU seconds it really got.
#
# 1. Seeds the corpora (fuzz/corpus/<target>/, gitignored): the golden blobs for decode_saved
#    (fuzz/seed-corpus.sh) and real runs of the driver over the simulator for every target
#    (tests/reliability_fuzz_seeds.rs, an #[ignore]d test).
# 2. Builds every target (cargo +nightly fuzz build -O -a --no-trace-compares: optimized, with
#    debug assertions and overflow checks — `-O` alone drops them, and every target refuses to
#    compile without them (fuzz/common/checked_build.rs) — AddressSanitizer + LeakSanitizer,
#    libFuzzer's leak check per input; comparison tracing is put back by fuzz/Cargo.toml for
#    every crate except the KMCL simulator — see there — and the simulator gets no coverage
#    instrumentation at all: fuzz/rustc-wrapper.sh).
# 3. Runs each target; prints executions, executions/s and crashes (new crash-/leak-/timeout-/oom-
#    artifacts in fuzz/artifacts/<target>/, or a non-zero libFuzzer exit) per target.
#
# Exit status: 0 when no target crashed (or when nightly/cargo-fuzz are missing: SKIPPED),
# 1 on any crash, 2 on a usage or build error. Logs: $FUZZ_LOG_DIR (default target/fuzz-logs).
set -uo pipefail

campaign=0
stop_at=0
lanes=2
build=1
seconds=60
while [ $# -gt 0 ]; do
    case "$1" in
        --campaign) campaign=1; seconds="${2:-}"; shift 2 || true ;;
        --lanes) lanes="${2:-}"; shift 2 || true ;;
        --no-build) build=0; shift ;;
        --stop-at) stop_at="${2:-}"; shift 2 || true ;;
        *) seconds="$1"; shift ;;
    esac
done
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ] \
    || ! [[ "$lanes" =~ ^[0-9]+$ ]] || [ "$lanes" -lt 1 ] || ! [[ "$stop_at" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS >= 1] | $0 --campaign CPU_SECONDS [--lanes N] [--no-build] [--stop-at EPOCH]" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
read -r -a targets <<<"${FUZZ_TARGETS:-decode_saved guest_packets control_ioctl restore_e2e inspect}"
logs="${FUZZ_LOG_DIR:-$root/target/fuzz-logs}"
# The flags of every build and run: fuzz/Cargo.toml turns comparison tracing back on per crate.
fuzz_build_flags=(-O -a --no-trace-compares)
# The KMCL simulator is compiled without coverage instrumentation (fuzz/rustc-wrapper.sh says why
# and how); the marker in RUSTFLAGS switches the wrapper on, and its value (a hash of the wrapper)
# is what puts the set-up into cargo's fingerprint. Only `cargo fuzz` sees them (the seed
# generation below is a normal test build). A RUSTC_WRAPPER already set (sccache, ...) is not
# chained: the fuzz build runs without it.
wrapper_hash=$(sha256sum "$root/fuzz/rustc-wrapper.sh" | cut -c1-16)
if ! [[ "$wrapper_hash" =~ ^[0-9a-f]{16}$ ]]; then
    echo "fuzz: cannot hash fuzz/rustc-wrapper.sh (sha256sum)" >&2
    exit 2
fi
fuzz_cargo() {
    RUSTC_WRAPPER="$root/fuzz/rustc-wrapper.sh" \
        RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }--cfg=vmbsrv_fuzz_uninstrumented_sim=\"$wrapper_hash\"" \
        cargo +nightly fuzz "$@"
}
mkdir -p "$logs"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: SKIPPED (no nightly toolchain: rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: SKIPPED (cargo-fuzz not installed: cargo install cargo-fuzz)"
    exit 0
fi

started=$(date +%s)
if [ "$build" -eq 1 ]; then
    echo "== seeding corpora"
    fuzz/seed-corpus.sh || exit 2
    cargo test --quiet --test reliability_fuzz_seeds -- --ignored --nocapture \
        || { echo "seed generation failed" >&2; exit 2; }

    echo "== building ${#targets[@]} target(s)"
    (cd fuzz && for target in "${targets[@]}"; do
        fuzz_cargo build "${fuzz_build_flags[@]}" "$target" || exit 1
    done) \
        >"$logs/build.log" 2>&1 \
        || { cat "$logs/build.log" >&2; echo "fuzz build failed" >&2; exit 2; }
fi

count_artifacts() {
    find "fuzz/artifacts/$1" -maxdepth 1 -type f \
        \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) \
        2>/dev/null | wc -l
}

if [ "$campaign" -eq 1 ]; then
    # shellcheck source=scripts/fuzz-campaign.inc.sh
    source "$root/scripts/fuzz-campaign.inc.sh"
    run_campaign "$seconds" "$lanes" "${targets[@]}"
    exit $?
fi

failed=0
summary=()
for target in "${targets[@]}"; do
    echo "== $target: ${seconds}s"
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    before=$(count_artifacts "$target")
    log="$logs/$target.log"
    (cd fuzz && fuzz_cargo run "${fuzz_build_flags[@]}" "$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1) \
        >"$log" 2>&1
    rc=$?
    after=$(count_artifacts "$target")
    crashes=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1
    fi
    execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
    rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # No final stats (the run died): take the last status line, "#N ... exec/s: R".
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
        rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | awk '{print $2}')
    fi
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    line=$(printf '%-14s %6ss %12s execs %8s exec/s %7s corpus %3s crashes' \
        "$target" "$seconds" "${execs:-?}" "${rate:-?}" "$corpus" "$crashes")
    echo "$line"
    summary+=("$line")
    if [ "$crashes" -ne 0 ]; then
        failed=1
        echo "   CRASH: see $log and fuzz/artifacts/$target/" >&2
        grep -E 'panicked|ERROR:|SUMMARY' "$log" | head -5 >&2
    fi
done

echo "== summary ($(($(date +%s) - started))s in total)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: FAILED (crashes found)"
    exit 1
fi
echo "fuzz: OK (no crash)"
