# Campaign mode of scripts/fuzz.sh (sourced by it; see its header). Runs each target's fuzzer
# binary directly (not through `cargo fuzz run`, which would rebuild when the tree changes under a
# campaign that lasts hours) until the process has used its CPU budget.

bin_dir="$root/fuzz/target/x86_64-unknown-linux-gnu/release"
clk_tck=$(getconf CLK_TCK)
max_crashes_per_target=10

# CPU seconds (user + system) used so far by process $1; empty once it has gone.
cpu_seconds_of() {
    awk -v tck="$clk_tck" '{ printf "%d\n", ($14 + $15) / tck }' "/proc/$1/stat" 2>/dev/null
}

# One target's campaign: fuzz until $2 CPU seconds are used, restarting after a crash, then
# minimize the corpus. Appends one line to campaign.tsv.
campaign_target() {
    local target="$1" budget="$2"
    local bin="$bin_dir/$target" corpus="$root/fuzz/corpus/$target"
    local artifacts="$root/fuzz/artifacts/$target" log="$logs/campaign-$target.log"
    local used=0 crashes=0 execs=0 wall_started last cpu rc pid
    mkdir -p "$corpus" "$artifacts"
    : >"$log"
    [ -x "$bin" ] || { echo "$target: no fuzzer binary at $bin (build first)" >&2; return 2; }
    wall_started=$(date +%s)
    local deadline_hit=0
    while [ "$used" -lt "$budget" ] && [ "$crashes" -lt "$max_crashes_per_target" ] \
        && [ "$deadline_hit" -eq 0 ]; do
        nice -n 19 "$bin" -artifact_prefix="$artifacts/" -timeout=20 -rss_limit_mb=4096 \
            -print_final_stats=1 "$corpus" >>"$log" 2>&1 &
        pid=$!
        last=0
        while kill -0 "$pid" 2>/dev/null; do
            cpu=$(cpu_seconds_of "$pid")
            [ -n "$cpu" ] && last="$cpu"
            if [ $((used + last)) -ge "$budget" ]; then
                kill -INT "$pid" 2>/dev/null
                break
            fi
            if [ "$stop_at" -gt 0 ] && [ "$(date +%s)" -ge "$stop_at" ]; then
                deadline_hit=1
                kill -INT "$pid" 2>/dev/null
                break
            fi
            sleep 5
        done
        wait "$pid"
        rc=$?
        used=$((used + last))
        # 0: finished; 72: libFuzzer's exit code after SIGINT (its -interrupted_exitcode).
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 72 ]; then
            crashes=$((crashes + 1))
            echo "   $target: crash #$crashes after $used CPU s (exit $rc); artifact in $artifacts" >&2
        fi
    done
    # Every run prints its final stats (on SIGINT and on a crash alike): sum them.
    execs=$(awk '/stat::number_of_executed_units/ {n += $2} END {print n + 0}' "$log")
    local wall=$(($(date +%s) - wall_started))
    local status cov ft
    status=$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$status")
    ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$status")
    local before after
    before=$(find "$corpus" -type f | wc -l)
    local minimized="$corpus.min.$$"
    rm -rf "$minimized"
    mkdir -p "$minimized"
    if nice -n 19 "$bin" -merge=1 -timeout=20 -rss_limit_mb=4096 "$minimized" "$corpus" \
        >"$logs/campaign-$target.merge.log" 2>&1 && [ -n "$(ls -A "$minimized")" ]; then
        rm -rf "$corpus" && mv "$minimized" "$corpus"
    else
        echo "   $target: minimizing failed, corpus kept as is (see campaign-$target.merge.log)" >&2
        rm -rf "$minimized"
    fi
    after=$(find "$corpus" -type f | wc -l)
    local rate=$((execs / (used > 0 ? used : 1)))
    printf '%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\t%d\t%d\t%d\n' "$target" "$commit" "$used" "$wall" \
        "$execs" "$rate" "${cov:-?}" "${ft:-?}" "$before" "$after" "$crashes" \
        >>"$logs/campaign.tsv"
    printf '%-14s %6d CPU s %6d wall s %11d execs %7d exec/CPU s  cov %5s ft %6s  corpus %d -> %d  %d crashes\n' \
        "$target" "$used" "$wall" "$execs" "$rate" "${cov:-?}" "${ft:-?}" "$before" "$after" "$crashes"
    [ "$crashes" -eq 0 ]
}

run_campaign() {
    local budget="$1" lanes="$2"
    shift 2
    commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ -s "$logs/campaign.tsv" ] || printf 'target\tcommit\tcpu_s\twall_s\texecs\texec_per_cpu_s\tcov\tft\tcorpus_before\tcorpus_after\tcrashes\n' >"$logs/campaign.tsv"
    echo "== campaign: ${#@} target(s), $budget CPU s each, $lanes at a time, commit $commit"
    local target results="$logs/campaign.$$.tsv"
    : >"$results"
    for target in "$@"; do
        while [ "$(jobs -rp | wc -l)" -ge "$lanes" ]; do
            sleep 5
        done
        ( campaign_target "$target" "$budget"; echo "$target $?" >>"$results" ) &
    done
    wait
    echo "== campaign done in $(($(date +%s) - started))s; results in $logs/campaign.tsv"
    if awk '$2 != 0 {bad = 1} END {exit !bad}' "$results" || [ "$(wc -l <"$results")" -ne "$#" ]; then
        echo "fuzz campaign: crashes found (artifacts in fuzz/artifacts/)"
        return 1
    fi
    echo "fuzz campaign: OK (no crash)"
}
