#!/usr/bin/env bash
# Runs the benches and checks their SUMMARY lines against issue #15's targets.
#
#   scripts/perf-targets.sh            # quick mode (VMBSRV_BENCH_QUICK=1), about 2 minutes once built
#   scripts/perf-targets.sh --full     # criterion's full sampling (several minutes)
#
# Every bench ends with one line `SUMMARY <bench> key=value ...` (benches/*.rs). This script
# collects those lines, prints them, and one verdict line per target. The targets are medians of
# one run on a shared machine, not timed tests: the exit status is 0 whatever the verdicts
# unless --strict is given (then 1 when a target is missed), and 2 when a bench fails or a
# SUMMARY line is missing. Logs: target/perf-logs/<bench>.log.
set -uo pipefail

mode=quick
strict=0
for arg in "$@"; do
    case "$arg" in
        --full) mode=full ;;
        --strict) strict=1 ;;
        *) echo "usage: $0 [--full] [--strict]" >&2; exit 2 ;;
    esac
done
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
logs="$root/target/perf-logs"
mkdir -p "$logs"
if [ "$mode" = quick ]; then export VMBSRV_BENCH_QUICK=1; else unset VMBSRV_BENCH_QUICK; fi

summaries=()
for bench in codec save_restore; do
    echo "== cargo bench --bench $bench ($mode)"
    if ! cargo bench --all-features --bench "$bench" >"$logs/$bench.log" 2>&1; then
        tail -20 "$logs/$bench.log" >&2
        echo "bench $bench failed (log: $logs/$bench.log)" >&2
        exit 2
    fi
    mapfile -t lines < <(grep '^SUMMARY ' "$logs/$bench.log")
    if [ "${#lines[@]}" -eq 0 ]; then
        echo "bench $bench printed no SUMMARY line (log: $logs/$bench.log)" >&2
        exit 2
    fi
    summaries+=("${lines[@]}")
done
printf '%s\n' "${summaries[@]}"

# value KEY: the value of KEY=… in any SUMMARY line.
value() {
    printf '%s\n' "${summaries[@]}" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1
}
missed=0
# check KEY OP LIMIT TEXT: one verdict line.
check() {
    local v
    v=$(value "$1")
    if [ -z "$v" ]; then
        echo "target $4: $1 missing from the SUMMARY lines" >&2
        exit 2
    fi
    if awk -v v="$v" -v l="$3" -v op="$2" 'BEGIN { exit !(op == "<=" ? v <= l : v >= l) }'; then
        printf 'target %-48s %s=%s (%s %s): met\n' "$4" "$1" "$v" "$2" "$3"
    else
        printf 'target %-48s %s=%s (%s %s): MISSED\n' "$4" "$1" "$v" "$2" "$3"
        missed=1
    fi
}
check encode_ratio '<=' 1.5 "encode / (memcpy + CRC32C)"
check decode_ratio '<=' 1.5 "validated decode / (memcpy + CRC32C)"
check postcard_over_encode '>=' 6 "postcard+CRC / encode"
check postcard_over_decode '>=' 6 "postcard+CRC / decode"
check vsp_save_ns '<=' 25 "VSP save work per packet (ns)"
check vsp_restore_ns '<=' 25 "VSP restore work per packet (ns)"
check save_ns_per_packet '<=' 140 "saved packet through the simulator (ns)"
check restore_ns_per_packet '<=' 180 "restored packet through the simulator (ns)"
if [ "$missed" -ne 0 ] && [ "$strict" -eq 1 ]; then
    exit 1
fi
exit 0
