#!/usr/bin/env bash
# What one traced call costs under textpoke and under its peers, side by side
# in one run, at sustained load: every recorder writes its trace while the
# loop runs (not part of CI; these machines are shared and noisy, so only
# figures from one run are compared).
#
#   bench/peers.sh                     # N=10,000,000 calls per run, best of REPS=5
#   N=2000000 REPS=3 bench/peers.sh
#
# The workload is a C loop calling a leaf function N times, on one thread,
# then on THREADS threads (default 8, more than the cores) sharing the N
# calls; the program times the loop itself (CLOCK_MONOTONIC) after a short
# warm-up (100,000 calls, so that buffers exist), so tool start-up and the
# final flush are not counted — but the recorders' writing during the loop
# is: a trace of 10M calls is hundreds of times one thread's initial buffer.
# Rows:
#
#   plain (gcc)                gcc -O2 -fpatchable-function-entry=5, run as is
#   textpoke record            entry + exit with timestamps (function_graph)
#   textpoke, tsc-unordered    the same with plain rdtsc (--clock tsc-unordered)
#   textpoke --count-only      calls per function
#   uftrace record -P leaf     uftrace's dynamic patching of the same binary
#   plain (clang)              clang-16 -O2 -fxray-instrument, XRay not patched
#   XRay FDR                   all sleds patched, FDR mode recording every call
#                              (func_duration_threshold_us=0; buffers for the
#                              whole run, so nothing is overwritten)
#   XRay empty handler         all sleds patched, a handler that does nothing
#   bpftrace uprobe+uretprobe  counting in both probes (1/10 of the calls)
#
# Columns: ns per call (the multithreaded rows: wall time x CPUs / calls, the
# CPU time one call costs), overhead above the plain build of the same
# compiler, a peer's overhead divided by textpoke's (timestamped peers by
# `textpoke record`'s, the empty XRay handler by `--count-only`'s), events
# lost (textpoke: from the trace's metadata; uftrace: LOST records in
# `uftrace info`), and bytes of trace on disk per call.
#
# Installs Debian's uftrace, bpftrace, clang-16 and libclang-rt-16-dev when
# missing (needs root or sudo; bpftrace needs root).
set -euo pipefail

N=${N:-10000000}
REPS=${REPS:-5}
THREADS=${THREADS:-8}
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
#include <pthread.h>
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
static long per_thread;
__attribute__((noinline)) long leaf(long x) { sink += x; return x + 1; }
__attribute__((noinline)) void *worker(void *arg) {
    long s = 0;
    for (long i = 0; i < per_thread; i++) s += leaf(i);
    return (void *)s;
}
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}
/* argv: calls, output file, threads (0: the loop on the main thread) */
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int threads = argc > 3 ? atoi(argv[3]) : 0;
#ifdef XRAY_EMPTY
    __xray_set_handler(empty_handler);
    __xray_patch();
#endif
#ifdef XRAY_FDR
    if (__xray_log_init_mode("xray-fdr", "") != 2) { fprintf(stderr, "XRay FDR mode did not start\n"); return 1; }
#endif
    for (long i = 0; i < 100000; i++) leaf(i); /* warm-up: buffers exist */
    double a = now();
    long s = 0;
    if (threads == 0) {
        for (long i = 0; i < n; i++) s += leaf(i);
    } else {
        pthread_t t[64];
        per_thread = n / threads;
        for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, NULL);
        for (int i = 0; i < threads; i++) { void *r; pthread_join(t[i], &r); s += (long)r; }
        n = per_thread * threads;
    }
    double b = now();
#ifdef XRAY_FDR
    __xray_log_finalize();
    __xray_log_flushLog();
#endif
    FILE *f = fopen(argv[2], "w");
    fprintf(f, "%.3f\n", (b - a) / n);
    fclose(f);
    return s == 42;
}
EOF
gcc -O2 -pthread -fpatchable-function-entry=5 -o w.gcc w.c
clang-16 -O2 -pthread -fxray-instrument -fxray-instruction-threshold=1 -o w.clang w.c
clang-16 -O2 -pthread -DXRAY_FDR -fxray-instrument -fxray-instruction-threshold=1 -o w.fdr w.c
clang-16 -O2 -pthread -DXRAY_EMPTY -fxray-instrument -fxray-instruction-threshold=1 -o w.empty w.c
ncpu=$(nproc)

# best REPS CMD...: runs CMD (which writes ns/call to $work/ns) REPS times,
# prints the smallest figure (the run least disturbed by the rest of the
# machine) and leaves that run's extra figures (lost, bytes) in best.*.
best() {
    local reps=$1
    shift
    local b="" l="" y=""
    for ((i = 0; i < reps; i++)); do
        rm -f ns lost bytes
        "$@" >/dev/null 2>>log
        local v
        v=$(cat ns)
        if [ -z "$b" ] || awk -v a="$v" -v b="$b" 'BEGIN { exit !(a < b) }'; then
            b=$v
            l=$(cat lost 2>/dev/null || echo "")
            y=$(cat bytes 2>/dev/null || echo "")
        fi
    done
    echo "$l" >best.lost
    echo "$y" >best.bytes
    echo "$b"
}

bytes_of() { du -sb "$1" | cut -f1; }

tp() { # tp THREADS [record options...]
    local t=$1
    shift
    rm -rf tp.data
    "$textpoke" record "$@" -o tp.data -- ./w.gcc "$N" ns "$t" 2>tp.err
    python3 -c 'import json,sys; print(json.load(open("tp.data/meta.json"))["total_dropped"])' >lost
    bytes_of tp.data >bytes
}
uf() {
    rm -rf u.data
    uftrace record -d u.data -P leaf ./w.gcc "$N" ns "$1"
    (uftrace info -d u.data 2>/dev/null | grep -ci "lost" || true) >lost
    bytes_of u.data >bytes
}
fdr() {
    rm -f xray-log.*
    # Buffers for every call of the run (16-byte records, entry and exit):
    # FDR is a flight recorder and overwrites what does not fit.
    local bufs=$(((N * 32 + 100000 * 32) / 1048576 + 64))
    XRAY_OPTIONS="patch_premain=true xray_mode=xray-fdr xray_logfile_base=$work/xray-log." \
        XRAY_FDR_OPTIONS="func_duration_threshold_us=0 buffer_size=1048576 buffer_max=$bufs" ./w.fdr "$N" ns "$1"
    echo "n/a" >lost
    cat xray-log.* | wc -c >bytes
}
bpf() {
    local n=$((N / 10))
    bpftrace -e "uprobe:$work/w.gcc:leaf { @calls = count(); } uretprobe:$work/w.gcc:leaf { @returns = count(); }" \
        -c "$work/w.gcc $n $work/ns $1"
    echo "n/a" >lost
    echo "" >bytes
}

rows=()
row() { # name ns plain reference-overhead calls
    local lost bytes
    lost=$(cat best.lost)
    bytes=$(cat best.bytes)
    rows+=("$(awk -v name="$1" -v ns="$2" -v base="$3" -v ref="$4" -v lost="$lost" -v bytes="$bytes" -v calls="$5" 'BEGIN {
        o = ns - base
        r = (ref == "") ? "" : sprintf("%.1fx", o / ref)
        b = (bytes == "" || calls == 0) ? "" : sprintf("%.1f", bytes / calls)
        printf "| %-41s | %9.1f | %9.1f | %13s | %11s | %10s |", name, ns, o, r, lost, b
    }')")
}
plainrow() {
    echo "" >best.lost
    echo "" >best.bytes
    row "$1" "$2" "$2" "" 0
}
calls=$((N + 100000))

for t in 0 "$THREADS"; do
    if [ "$t" = 0 ]; then
        label=""
        scale=1
    else
        label=" ($t threads)"
        scale=$ncpu
    fi
    sc() { awk -v a="$1" -v s="$scale" 'BEGIN { print a * s }'; }
    echo "running $N calls${label}, best of $REPS runs ($ncpu CPUs, $(uname -r))" >&2
    plain_gcc=$(sc "$(best "$REPS" ./w.gcc "$N" ns "$t")")
    plainrow "plain (gcc)$label" "$plain_gcc"
    t_rec=$(sc "$(best "$REPS" tp "$t")")
    o_rec=$(awk -v a="$t_rec" -v b="$plain_gcc" 'BEGIN { print a - b }')
    row "textpoke record$label" "$t_rec" "$plain_gcc" "" "$calls"
    t_un=$(sc "$(best "$REPS" tp "$t" --clock tsc-unordered)")
    row "textpoke, tsc-unordered$label" "$t_un" "$plain_gcc" "" "$calls"
    t_cnt=$(sc "$(best "$REPS" tp "$t" --count-only)")
    o_cnt=$(awk -v a="$t_cnt" -v b="$plain_gcc" 'BEGIN { print a - b }')
    row "textpoke --count-only$label" "$t_cnt" "$plain_gcc" "" "$calls"
    t_uf=$(sc "$(best "$REPS" uf "$t")")
    row "uftrace record -P leaf$label" "$t_uf" "$plain_gcc" "$o_rec" "$calls"
    plain_clang=$(sc "$(best "$REPS" ./w.clang "$N" ns "$t")")
    plainrow "plain (clang, XRay sleds)$label" "$plain_clang"
    t_fdr=$(sc "$(best "$REPS" fdr "$t")")
    row "XRay FDR$label" "$t_fdr" "$plain_clang" "$o_rec" "$calls"
    t_empty=$(sc "$(XRAY_OPTIONS="patch_premain=false" best "$REPS" ./w.empty "$N" ns "$t")")
    row "XRay empty handler$label" "$t_empty" "$plain_clang" "$o_cnt" 0
    t_bpf=$(sc "$(best 3 bpf "$t")")
    row "bpftrace uprobe+uretprobe$label" "$t_bpf" "$plain_gcc" "$o_rec" 0
done

echo
echo "N=$N calls (bpftrace: N/10), best of $REPS runs (bpftrace: 3), $ncpu CPUs, Linux $(uname -r)"
echo "multithreaded rows: $THREADS threads sharing the calls; ns/call = wall time x $ncpu CPUs / calls"
echo
echo "| mode                                      |   ns/call |  overhead | peer/textpoke | events lost | bytes/call |"
echo "|-------------------------------------------|----------:|----------:|--------------:|------------:|-----------:|"
printf '%s\n' "${rows[@]}"
