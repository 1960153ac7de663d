#!/usr/bin/env bash
# AddressSanitizer/LeakSanitizer over the simulator end-to-end suites, and Miri over the KMCL
# wrappers, the callback trampolines, the simulator and a small end-to-end scenario.
#
#   scripts/sanitizers.sh            # both steps
#   scripts/sanitizers.sh asan       # only AddressSanitizer
#   scripts/sanitizers.sh miri       # only Miri
#
# Exit status: 0 when every step passed or was SKIPPED (nightly or a component not installable;
# the reason is printed), 1 on a finding (a sanitizer or Miri error, a failing test, or a canary
# the sanitizer did not catch). docs/reliability.md explains the choices below and the figures.
#
# Builds go to target/sanitizers (ASan) and target/miri, never touching the normal target dir.
# Logs: $SANITIZER_LOG_DIR (default target/sanitizer-logs).
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
logs="${SANITIZER_LOG_DIR:-$root/target/sanitizer-logs}"
mkdir -p "$logs"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(asan miri)
host=x86_64-unknown-linux-gnu
started=$(date +%s)
failed=0
summary=()

note() { summary+=("$1"); echo "$1"; }
elapsed() { echo "$(($(date +%s) - $1))s"; }

# Installs a nightly component if missing; says why not if it cannot.
have_component() {
    local component=$1
    if rustup +nightly component list --installed 2>/dev/null | grep -q "^$component"; then
        return 0
    fi
    echo "installing nightly component $component ..."
    rustup toolchain install nightly --profile minimal --component "$component" \
        >"$logs/install-$component.log" 2>&1 \
        && rustup +nightly component list --installed 2>/dev/null | grep -q "^$component"
}

if ! cargo +nightly --version >/dev/null 2>&1 \
    && ! rustup toolchain install nightly --profile minimal >"$logs/install-nightly.log" 2>&1; then
    echo "asan: SKIPPED (no nightly toolchain and it could not be installed)"
    echo "miri: SKIPPED (no nightly toolchain and it could not be installed)"
    exit 0
fi

# Runs "$@" with output to $1.log; returns its status.
run_logged() {
    local log="$logs/$1.log"
    shift
    "$@" >"$log" 2>&1
}

# ---- AddressSanitizer + LeakSanitizer ---------------------------------------------------------
asan() {
    local t0
    t0=$(date +%s)
    if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
        note "asan: SKIPPED (needs x86_64 Linux, this is $(uname -s)-$(uname -m))"
        return
    fi
    if ! have_component rust-src; then
        note "asan: SKIPPED (nightly rust-src, needed by -Zbuild-std, is not installable)"
        return
    fi
    # The simulator suites end to end (and the control interface over it), plus the reliability
    # suites; each is a separate test binary, so LeakSanitizer checks each process at exit.
    local tests=()
    for f in tests/e2e_*.rs crates/kmcl-sim/tests/sim_*.rs tests/control_e2e.rs tests/reliability_*.rs; do
        case "$f" in
        tests/reliability_canary.rs | tests/reliability_fuzz_seeds.rs) ;;
        *) tests+=(--test "$(basename "$f" .rs)") ;;
        esac
    done
    # -Zbuild-std instruments std too. panic = "abort" (the crate's dev profile) cannot be
    # combined with a rebuilt std in a test build, so this build unwinds (tests do anyway).
    local cargo_asan=(env RUSTFLAGS="-Zsanitizer=address" RUSTDOCFLAGS="-Zsanitizer=address"
        ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1"
        cargo +nightly test -Zbuild-std --target "$host" --workspace
        --target-dir target/sanitizers --config 'profile.dev.panic="unwind"')
    if ! run_logged asan-build "${cargo_asan[@]}" "${tests[@]}" --test reliability_canary --no-run; then
        note "asan: FAILED to build (see $logs/asan-build.log)"
        failed=1
        return
    fi
    local t1
    t1=$(date +%s)
    if run_logged asan-tests "${cargo_asan[@]}" "${tests[@]}"; then
        local passed
        passed=$(grep -oE 'test result: ok\. [0-9]+ passed' "$logs/asan-tests.log" \
            | awk '{s += $4} END {print s}')
        note "asan: OK — $((${#tests[@]} / 2)) suites, $passed tests, no ASan/LSan report (build $((t1 - t0))s, run $(elapsed "$t1"))"
    else
        note "asan: FINDING — see $logs/asan-tests.log"
        grep -E 'ERROR: (Address|Leak)Sanitizer|SUMMARY|panicked|FAILED' "$logs/asan-tests.log" | head -20
        failed=1
    fi
    # The canaries must be caught, or the run above proved nothing.
    local canary
    for canary in leak_canary:LeakSanitizer overflow_canary:heap-buffer-overflow; do
        local name=${canary%%:*} expect=${canary#*:}
        if run_logged "asan-$name" "${cargo_asan[@]}" --test reliability_canary -- --ignored --exact "$name"; then
            note "asan: FINDING — canary $name was not caught (is the build instrumented?)"
            failed=1
        elif grep -q "$expect" "$logs/asan-$name.log"; then
            note "asan: canary $name caught ($expect)"
        else
            note "asan: FINDING — canary $name failed without a $expect report (see $logs/asan-$name.log)"
            failed=1
        fi
    done
}

# ---- Miri ---------------------------------------------------------------------------------------
miri() {
    local t0
    t0=$(date +%s)
    if ! have_component miri || ! have_component rust-src; then
        note "miri: SKIPPED (nightly miri/rust-src components are not installable)"
        return
    fi
    if ! run_logged miri-setup cargo +nightly miri setup; then
        note "miri: SKIPPED (cargo miri setup failed, see $logs/miri-setup.log)"
        return
    fi
    # Strict provenance: the simulator's handles and the packet tokens are made with
    # ptr::without_provenance and never dereferenced, so no int-to-pointer cast is needed.
    local flags="-Zmiri-strict-provenance"
    # The proptest-based unit tests need the file system (failure persistence), which Miri's
    # isolation forbids; they are plain parsers, covered by the fuzz targets instead.
    local proptests=(--skip arbitrary_bytes_never_panic --skip any_bytes_parse_without_panicking)

    # (1) x86_64, the driver's main target ("win64" trampolines, the documented x64 layouts).
    # CRC32C runs through src/hwcrc.rs, whose CPUID probe is inline assembly that Miri cannot
    # execute; every test that checksums (saved records, the save protocol, the simulator's
    # container, any post) is therefore left to step (2).
    # The host tools (vmbsrv-client, vmbsrvctl) are user-mode programs whose unit tests use the
    # file system, which Miri's isolation forbids; they hold no unsafe code Miri could check
    # beyond the Windows-only transport, which Linux does not build.
    local host_tools=(--exclude vmbsrv-client --exclude vmbsrvctl)
    local t1
    t1=$(date +%s)
    if run_logged miri-x86_64-units env MIRIFLAGS="$flags" cargo +nightly miri test --workspace \
        "${host_tools[@]}" --target-dir target/miri --lib -- "${proptests[@]}" \
        --skip hwcrc --skip saved:: --skip container:: --skip vsp::save_protocol; then
        note "miri: x86_64 unit tests OK — $(grep -oE '[0-9]+ passed' "$logs/miri-x86_64-units.log" | tail -1) (kmcl-sys layouts/status, kmcl, vsp table/protocol/control, kmcl-sim handles/IRQL/lock/table, fallible) ($(elapsed "$t1"))"
    else
        note "miri: FINDING in x86_64 unit tests — see $logs/miri-x86_64-units.log"
        failed=1
    fi

    # (2) aarch64 (the driver's other target: the "system" ABI, and no CPUID: the portable CRC
    # table), every unit test and the end-to-end scenarios. criterion (a bench dev-dependency)
    # pulls `alloca`, whose build script compiles C for the target; Miri never links it, so the
    # host compiler stands in for the missing cross compiler.
    local arm_env=(CC_aarch64_unknown_linux_gnu="${CC:-cc}" AR_aarch64_unknown_linux_gnu="${AR:-ar}")
    local arm=(cargo +nightly miri test --target aarch64-unknown-linux-gnu
        --target-dir target/miri)
    t1=$(date +%s)
    if run_logged miri-aarch64-units env MIRIFLAGS="$flags" "${arm_env[@]}" "${arm[@]}" \
        --workspace "${host_tools[@]}" --lib -- "${proptests[@]}"; then
        note "miri: aarch64 unit tests OK — $(grep -oE '[0-9]+ passed' "$logs/miri-aarch64-units.log" | tail -1) ($(elapsed "$t1"))"
    else
        note "miri: FINDING in aarch64 unit tests — see $logs/miri-aarch64-units.log"
        failed=1
    fi
    # One process per scenario (see tests/reliability_miri.rs: one interface query per
    # process), each under several schedules: Miri's seed picks thread interleavings.
    local seeds="${MIRI_SEEDS:-0..4}"
    local scenario
    for scenario in miri_tiny_migration miri_guest_requests_and_hostile_completions; do
        t1=$(date +%s)
        if run_logged "miri-$scenario" env MIRIFLAGS="$flags -Zmiri-many-seeds=$seeds" \
            "${arm_env[@]}" "${arm[@]}" --test reliability_miri -- --exact "$scenario"; then
            note "miri: end to end $scenario OK under seeds $seeds ($(elapsed "$t1"))"
        else
            note "miri: FINDING in $scenario — see $logs/miri-$scenario.log"
            failed=1
        fi
    done
    note "miri: done in $(elapsed "$t0")"
}

for step in "${steps[@]}"; do
    case "$step" in
    asan) asan ;;
    miri) miri ;;
    *)
        echo "usage: $0 [asan] [miri]" >&2
        exit 2
        ;;
    esac
done

echo "== summary ($(elapsed "$started") in total)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "sanitizers: FINDINGS (logs in $logs)"
    exit 1
fi
echo "sanitizers: OK"
