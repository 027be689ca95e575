#!/usr/bin/env bash
# The floor under the graph trampolines, in plain C (not part of CI):
#   bash bench/floor/run.sh
# 1. thunk_vs_hijack: two ordered clock reads around a call whose return
#    address is replaced in place (a mispredicted return) or that is called
#    through a thunk (calls and returns pair up); 2. ring_filler: the thunk
#    shape streaming its records into a 128 MiB ring, with 0, 40 and 80
#    filler instructions per side (the cost of each instruction between two
#    `lfence; rdtsc`).
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O2 -o "$work/thunk_vs_hijack" "$dir/thunk_vs_hijack.c"
"$work/thunk_vs_hijack" | tail -1
for f in 0 40 80; do
    gcc -O2 -DNFILL=$f -o "$work/ring_filler" "$dir/ring_filler.c"
    "$work/ring_filler"
done
