#!/bin/sh
# Fuzzes textpoke's trace reader and control protocol for a fixed time
# (issue #10): each target runs SECONDS (default 60) with the stable,
# in-process, structure-aware fuzzer of crates/textpoke-fuzz, and prints
# inputs per second, the slowest command and the most memory seen, and
# what it found.
#
#   fuzz/run.sh [SECONDS] [SEED]
#
# The reader target starts from fuzz/corpus/reader and from a 10 MB trace
# recorded once with the recorder's API (4 threads, two forked children)
# into $FUZZ_OUT/base-10mb; a quarter of its inputs are derived from that
# trace, and on those each command must stay under 2 s of CPU and 200 MB
# of heap. Findings (the input and a .txt saying what went wrong and which
# mutations made it) and inputs that did something new go to
# $FUZZ_OUT/{reader,control} (default fuzz/out, not committed). An input
# that kills the fuzzer (an allocation over the 2 GiB cap aborts it; a
# hang over 120 s stops it) is saved there too.
#
# Builds with the `fuzz` profile (optimised, with overflow checks and
# debug assertions) under `nice`: the machine is shared.
set -eu
SECS=${1:-60}
SEED=${2:-$(date +%s)}
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${FUZZ_OUT:-fuzz/out}
WORK=/dev/shm/textpoke-fuzz-$$
[ -d /dev/shm ] || WORK=${TMPDIR:-/tmp}/textpoke-fuzz-$$
nice -n 10 cargo build --quiet --profile fuzz -p textpoke-fuzz
BIN=$TARGET/fuzz/textpoke-fuzz
mkdir -p "$OUT"
BASE=$OUT/base-10mb
if [ ! -f "$BASE/meta.json" ]; then
    rm -rf "$BASE"
    nice -n 10 "$BIN" record "$BASE" --mb 10 --threads 4 --seed 1 --fork
fi

status=0
run() {
    target=$1
    shift
    rc=0
    nice -n 10 "$BIN" "$target" --seconds "$SECS" --seed "$SEED" --out "$OUT/$target" "$@" || rc=$?
    if [ "$rc" -gt 1 ]; then
        echo "fuzz/run.sh: textpoke-fuzz $target died (status $rc)" >&2
        if [ -d "$WORK/in" ]; then
            "$BIN" pack "$WORK/in" "$OUT/$target/died-$SEED.tpf" &&
                echo "fuzz/run.sh: the input it was checking: $OUT/$target/died-$SEED.tpf" >&2
        fi
    fi
    [ "$rc" -eq 0 ] || status=1
    rm -rf "$WORK"
}
run reader --corpus fuzz/corpus/reader --base "$BASE" --work "$WORK"
run control --corpus fuzz/corpus/control
exit $status
