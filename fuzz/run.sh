#!/usr/bin/env bash
# Runs every fuzz target (or the ones named as arguments) for FUZZ_SECS seconds each
# (default 60), one after the other, and prints per target the executions and whether it
# crashed. Exits 1 when any target crashed (or its run failed), 0 otherwise.
#
#   fuzz/run.sh                        # every target, 60 s each
#   FUZZ_SECS=300 fuzz/run.sh image_decode weights_check
#
# New inputs libFuzzer finds go to fuzz/corpus-work/<target>/ (ignored by git); the
# committed seeds in fuzz/corpus/<target>/ are only read. Crashes are written to
# fuzz/artifacts/<target>/, each run's log to fuzz/target/run-logs/<target>.log.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail

FUZZ_SECS="${FUZZ_SECS:-60}"
# A single input running longer than this counts as a crash (a hang).
FUZZ_TIMEOUT="${FUZZ_TIMEOUT:-30}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

logs="$here/target/run-logs"
mkdir -p "$logs"
if ! cargo +nightly fuzz build >"$logs/build.log" 2>&1; then
    cat "$logs/build.log" >&2
    echo "fuzz: build failed" >&2
    exit 2
fi

failed=0
summary=()
for t in "${targets[@]}"; do
    work="$here/corpus-work/$t"
    seeds="$here/corpus/$t"
    mkdir -p "$work" "$seeds"
    log="$logs/$t.log"
    echo "fuzz: $t for ${FUZZ_SECS}s (log: ${log#"$PWD"/})"
    start=$(date +%s)
    set +e
    cargo +nightly fuzz run "$t" "$work" "$seeds" -- \
        -max_total_time="$FUZZ_SECS" -rss_limit_mb=2048 -timeout="$FUZZ_TIMEOUT" \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's own time; the wall time also counts cargo rebuilding what changed.
    secs=$(grep -o '^Done [0-9]* runs in [0-9]* second' "$log" | tail -n1 | awk '{print $5}' || true)
    secs=${secs:-$(($(date +%s) - start))}
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$' || true)
    if [ -z "$execs" ]; then
        execs=$(grep -o '^#[0-9]*' "$log" | tail -n1 | tr -d '#' || true)
    fi
    if [ "$rc" -eq 0 ]; then
        verdict="no crash"
    else
        failed=1
        artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n1 | sed 's/Test unit written to //' || true)
        verdict="CRASHED (exit $rc${artifact:+, input: $artifact})"
        grep -m1 -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY)' "$log" | sed 's/^/    /' || true
    fi
    line="$(printf '%-16s %5ss  %12s execs  %s' "$t" "$secs" "${execs:-?}" "$verdict")"
    echo "$line"
    summary+=("$line")
done

echo
echo "fuzz summary (FUZZ_SECS=$FUZZ_SECS):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
