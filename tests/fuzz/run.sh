#!/usr/bin/env bash
# Runs every libFuzzer target built by `make fuzz` (tests/fuzz/bin/fuzz_*):
#   1. fuzzes it for SECONDS (default 20) on a copy of its committed corpus,
#      so what it finds lands in WORK/corpus/<target>, never in the tree;
#   2. replays the committed corpus, tests/fuzz/corpus/<target>, as it is.
# Exit status 1 when any run crashes, leaks, times out or runs out of memory;
# the reproducer's path (WORK/artifacts/<target>/crash-...) is printed.
# Usage: tests/fuzz/run.sh [SECONDS [WORK]]   (WORK defaults to ./build-fuzz)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-20}
work=${2:-$PWD/build-fuzz}
status=0

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

shopt -s nullglob
bins=("$here"/bin/fuzz_*)
if [ ${#bins[@]} -eq 0 ]; then
    echo "no fuzz targets in $here/bin: run 'make fuzz' first" >&2
    exit 1
fi

report() { # target log artifact-prefix binary
    echo "FAIL $1: see $2"
    grep -E "^==[0-9]+==ERROR|^SUMMARY|runtime error:|Test unit written to" "$2" | head -n 20
    for a in "$3"crash-* "$3"leak-* "$3"timeout-* "$3"oom-* "$3"slow-unit-*; do
        echo "  reproducer: $a  (replay: $4 $a)"
    done
}

for bin in "${bins[@]}"; do
    t=${bin##*/fuzz_}
    seeds=$here/corpus/$t
    corpus=$work/corpus/$t
    art=$work/artifacts/$t
    rm -rf "$corpus" "$art"
    mkdir -p "$corpus" "$art" "$work/logs"
    [ -d "$seeds" ] && cp -p "$seeds"/* "$corpus"/ 2>/dev/null

    log=$work/logs/$t.fuzz.log
    if "$bin" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=25 -print_final_stats=1 \
        -artifact_prefix="$art/" "$corpus" >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        echo "ok   $t: ${secs}s, ${runs:-?} executions, $(ls "$corpus" | wc -l) inputs in $corpus"
    else
        status=1
        report "$t" "$log" "$art/" "$bin"
    fi

    log=$work/logs/$t.replay.log
    if [ -d "$seeds" ]; then
        if "$bin" -runs=0 -rss_limit_mb=2048 -timeout=25 -artifact_prefix="$art/replay-" \
            "$seeds" >"$log" 2>&1; then
            echo "ok   $t: replayed $(ls "$seeds" | wc -l) committed inputs"
        else
            status=1
            report "$t (committed corpus)" "$log" "$art/replay-" "$bin"
        fi
    else
        echo "FAIL $t: no committed corpus at $seeds"
        status=1
    fi
done
exit $status
