#!/usr/bin/env bash
# What one traced call costs under textpoke and under its peers, side by side
# in one run (not part of CI; these machines are shared and noisy, so only
# figures from one run are compared).
#
#   bench/peers.sh                 # N=80000 calls per run, best of REPS=9 runs
#   N=20000 REPS=15 bench/peers.sh
#
# The workload is one C loop calling a leaf function N times; the program
# runs the loop once to warm up (buffers mapped and faulted in), waits
# 200 ms (background writers drain), then times the loop (CLOCK_MONOTONIC)
# and writes ns per call: tool start-up, first-touch page faults and trace
# writing at exit are not counted. Rows:
#
#   plain (gcc)                gcc -O2 -fpatchable-function-entry=5, run as is
#   textpoke record            entry + exit with timestamps (function_graph)
#   textpoke --count-only      calls per function
#   uftrace record -P leaf     uftrace's dynamic patching of the same binary
#   plain (clang)              clang-16 -O2 -fxray-instrument, XRay not patched
#   XRay FDR                   all sleds patched, FDR mode recording every call
#                              (func_duration_threshold_us=0), flushed at the end
#   XRay empty handler         all sleds patched, a handler that does nothing
#   bpftrace uprobe+uretprobe  counting in both probes
#
# "overhead" is ns per call above the plain build of the same compiler;
# "peer/textpoke" divides a peer's overhead by textpoke's (timestamped peers
# by `textpoke record`, the empty XRay handler by `--count-only`).
#
# N is small enough (3 records per call) that textpoke's per-thread ring
# (256 Ki records) does not fill during the timed loop: no record is
# dropped, so every call pays the full cost (the script warns otherwise). Installs Debian's uftrace, bpftrace, clang-16 and
# libclang-rt-16-dev when missing (needs root or sudo; bpftrace needs root).
set -euo pipefail

N=${N:-80000}
REPS=${REPS:-9}
root=$(cd "$(dirname "$0")/.." && pwd)

missing=()
for pkg in uftrace bpftrace clang-16 libclang-rt-16-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

(cd "$root" && cargo build --release -q -p textpoke-cli)
textpoke="$root/target/release/textpoke"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
cat >w.c <<'EOF'
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef XRAY_EMPTY
int __xray_set_handler(void (*entry)(int32_t, int));
int __xray_patch(void);
__attribute__((xray_never_instrument)) static void empty_handler(int32_t id, int type) { (void)id; (void)type; }
#endif
#ifdef XRAY_FDR
int __xray_log_init_mode(const char *mode, const char *config);
int __xray_log_finalize(void);
int __xray_log_flushLog(void);
#endif
static volatile long sink;
__attribute__((noinline)) long leaf(long x) { sink += x; return x + 1; }
int main(int argc, char **argv) {
    long n = atol(argv[1]);
#ifdef XRAY_EMPTY
    __xray_set_handler(empty_handler);
    __xray_patch();
#endif
#ifdef XRAY_FDR
    if (__xray_log_init_mode("xray-fdr", "") != 2) { fprintf(stderr, "XRay FDR mode did not start\n"); return 1; }
#endif
    /* Warm up: as many calls again as timed below (buffers are mapped and
       faulted in), then 200 ms for background writers to drain them. */
    for (long i = 0; i < n; i++) leaf(i);
    struct timespec a, b, nap = { 0, 10 * 1000 * 1000 };
    clock_gettime(CLOCK_MONOTONIC, &a);
    do { nanosleep(&nap, NULL); clock_gettime(CLOCK_MONOTONIC, &b); }
    while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < 200000000L);
    clock_gettime(CLOCK_MONOTONIC, &a);
    long s = 0;
    for (long i = 0; i < n; i++) s += leaf(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
#ifdef XRAY_FDR
    __xray_log_finalize();
    __xray_log_flushLog();
#endif
    FILE *f = fopen(argv[2], "w");
    fprintf(f, "%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    fclose(f);
    return s == 42;
}
EOF
gcc -O2 -fpatchable-function-entry=5 -o w.gcc w.c
clang-16 -O2 -fxray-instrument -fxray-instruction-threshold=1 -o w.clang w.c
clang-16 -O2 -DXRAY_FDR -fxray-instrument -fxray-instruction-threshold=1 -o w.fdr w.c
clang-16 -O2 -DXRAY_EMPTY -fxray-instrument -fxray-instruction-threshold=1 -o w.empty w.c

# best REPS CMD...: runs CMD (which writes ns/call to $work/ns) REPS times,
# prints the smallest figure (as cargo bench --bench trace-bench does: the
# run least disturbed by the rest of the machine).
best() {
    local reps=$1
    shift
    local vals=()
    for ((i = 0; i < reps; i++)); do
        rm -f ns
        "$@" >/dev/null 2>>log
        vals+=("$(cat ns)")
    done
    printf '%s\n' "${vals[@]}" | sort -g | head -n 1
}

tp_record() {
    rm -rf tp.data
    "$textpoke" record -o tp.data -- ./w.gcc "$N" ns 2>tp.err
    grep -q ', 0 dropped' tp.err || cat tp.err >>drops
}
tp_count() {
    rm -rf tp.data
    "$textpoke" record --count-only -o tp.data -- ./w.gcc "$N" ns 2>tp.err
    grep -q ', 0 dropped' tp.err || cat tp.err >>drops
}
uftrace_rec() {
    rm -rf u.data
    uftrace record -d u.data -P leaf ./w.gcc "$N" ns
}
fdr() {
    rm -f xray-log.*
    XRAY_OPTIONS="patch_premain=true xray_mode=xray-fdr xray_logfile_base=$work/xray-log." \
        XRAY_FDR_OPTIONS="func_duration_threshold_us=0 buffer_size=1048576 buffer_max=64" ./w.fdr "$N" ns
}
bpf() {
    bpftrace -e "uprobe:$work/w.gcc:leaf { @calls = count(); } uretprobe:$work/w.gcc:leaf { @returns = count(); }" \
        -c "$work/w.gcc $N $work/ns"
}

echo "running: $N calls per run, best of $REPS runs ($(nproc) CPUs, $(uname -r))" >&2
plain_gcc=$(best "$REPS" ./w.gcc "$N" ns)
t_rec=$(best "$REPS" tp_record)
t_cnt=$(best "$REPS" tp_count)
t_uf=$(best "$REPS" uftrace_rec)
plain_clang=$(best "$REPS" ./w.clang "$N" ns)
t_fdr=$(best "$REPS" fdr)
t_empty=$(XRAY_OPTIONS="patch_premain=false" best "$REPS" ./w.empty "$N" ns)
t_bpf=$(best 3 bpf)

row() { # name ns plain reference-overhead
    awk -v name="$1" -v ns="$2" -v base="$3" -v ref="$4" 'BEGIN {
        o = ns - base
        r = (ref == "") ? "" : sprintf("%.1fx", o / ref)
        printf "| %-28s | %9.1f | %9.1f | %13s |\n", name, ns, o, r
    }'
}
o_rec=$(awk -v a="$t_rec" -v b="$plain_gcc" 'BEGIN { print a - b }')
o_cnt=$(awk -v a="$t_cnt" -v b="$plain_gcc" 'BEGIN { print a - b }')
echo
echo "N=$N calls, best of $REPS runs (bpftrace: 3), $(nproc) CPUs, Linux $(uname -r)"
echo
echo "| mode                         |   ns/call |  overhead | peer/textpoke |"
echo "|------------------------------|----------:|----------:|--------------:|"
row "plain (gcc)" "$plain_gcc" "$plain_gcc" ""
row "textpoke record" "$t_rec" "$plain_gcc" ""
row "textpoke --count-only" "$t_cnt" "$plain_gcc" ""
row "uftrace record -P leaf" "$t_uf" "$plain_gcc" "$o_rec"
row "plain (clang, XRay sleds)" "$plain_clang" "$plain_clang" ""
row "XRay FDR" "$t_fdr" "$plain_clang" "$o_rec"
row "XRay empty handler" "$t_empty" "$plain_clang" "$o_cnt"
row "bpftrace uprobe+uretprobe" "$t_bpf" "$plain_gcc" "$o_rec"
if [ -s drops ]; then
    echo
    echo "warning: textpoke dropped records in some runs (lower N):"
    cat drops
fi
