#!/usr/bin/env bash
# What starting and finishing a recording costs: `textpoke record` against
# `uftrace record -P .` on the same binaries, side by side in one run (issue
# #9, item 4: "a tiny run and a 100k-function program: wall time within
# 1.5x of uftrace record's"). Not part of CI; these machines are shared and
# noisy, so only figures from one run are compared.
#
#   bench/startup.sh                          # best of REPS=7 runs
#   REPS=11 bench/startup.sh
#   BASE=/path/to/textpoke bench/startup.sh   # adds another build's rows
#                                             # (before/after a change)
#
# Workloads (built once into target/bench-startup/, which is not committed):
#
#   big      100,001 functions, each called once: f0..f99999, `noinline`,
#            each `sink += x + i`, main calls each once (generated C,
#            gcc -O1 -fpatchable-function-entry=5). Every function is
#            traced: the tracer's start-up (find the sites, make 100,001
#            stubs, patch them) and the trace's finish dominate.
#   sqlite   SQLite, the amalgamation of `npm pack better-sqlite3@11`
#            (package/deps/sqlite3/sqlite3.c), with a small driver
#            (below) run as `st 1 100`: one thread inserting 100 rows and
#            querying them; gcc -O1 -fpatchable-function-entry=5, about
#            1,500 functions. A tiny run: start-up is most of it.
#
# Each run is the whole command, as a user types it: the tool, the program
# with it, the trace written. Rows per workload: the program alone,
# `textpoke record -o DIR -- PROG` (BASE: the same with that build) and
# `uftrace record -P . -d DIR PROG`, interleaved, REPS times each; the
# trace directories are removed before each run (outside the timing).
# "wall" is the best of the REPS runs (the run least disturbed by the rest
# of the machine); "max RSS" is /usr/bin/time's %M, the largest resident
# set of the tool and its program, smallest of the REPS runs; "/ uftrace"
# divides by uftrace's best wall.
#
# Needs gcc, python3, uftrace (Debian's package; installed when missing),
# and npm with network access for the SQLite sources the first time.
set -euo pipefail

REPS=${REPS:-7}
root=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v uftrace >/dev/null; then
    echo "installing uftrace" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq uftrace >/dev/null
fi

(cd "$root" && cargo build --release -q -p textpoke-cli)
textpoke="$root/target/release/textpoke"
base=${BASE:-}

work="$root/target/bench-startup"
mkdir -p "$work"
cd "$work"

if [ ! -x big ]; then
    echo "building big (100,001 functions)" >&2
    python3 - <<'EOF'
n = 100_000
with open("big.c", "w") as f:
    f.write("#include <stdio.h>\nvolatile long sink;\n")
    f.writelines(f"__attribute__((noinline)) void f{i}(long x) {{ sink += x + {i}; }}\n" for i in range(n))
    f.write("int main(void) {\n" + "".join(f"  f{i}({i});\n" for i in range(n)))
    f.write('  printf("%ld\\n", sink);\n  return 0;\n}\n')
EOF
    gcc -O1 -fpatchable-function-entry=5 -o big big.c
fi

if [ ! -x st ]; then
    if [ ! -f package/deps/sqlite3/sqlite3.c ]; then
        echo "fetching the SQLite amalgamation (npm pack better-sqlite3@11)" >&2
        tgz=$(npm pack better-sqlite3@11 --silent | tail -n 1)
        tar xzf "$tgz" package/deps/sqlite3
        rm -f "$tgz"
    fi
    cp "$root/bench/sqlite-test.c" st.c
    echo "building sqlite" >&2
    gcc -O1 -fpatchable-function-entry=5 -Ipackage/deps/sqlite3 -o st st.c package/deps/sqlite3/sqlite3.c \
        -lpthread -ldl -lm
fi

# run NAME CMD...: one timed run of CMD; appends "NAME wall_s maxrss_kb" to
# runs.txt. The trace directories are removed first, untimed.
run() {
    local name=$1
    shift
    rm -rf tp.data tp.data.old base.data base.data.old u.data u.data.old
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -f %M -o rss.txt "$@" >/dev/null 2>err.txt || {
        echo "$name failed:" >&2
        cat err.txt >&2
        exit 1
    }
    t1=$(date +%s%N)
    echo "$name $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }') $(tail -n 1 rss.txt)" >>runs.txt
}

# bench WORKLOAD PROG [ARGS]: every row, interleaved, REPS times.
bench() {
    local w=$1
    shift
    for ((i = 0; i < REPS; i++)); do
        run "$w/program" "$@"
        run "$w/textpoke" "$textpoke" record -o tp.data -- "$@"
        [ -n "$base" ] && run "$w/base" "$base" record -o base.data -- "$@"
        run "$w/uftrace" uftrace record -P . -d u.data "$@"
    done
}

rm -f runs.txt
echo "running: best of $REPS runs ($(nproc) CPUs, $(uname -r))" >&2
bench big ./big
traced_big=$("$textpoke" record -o tp.data -- ./big 2>&1 >/dev/null | grep -o '[0-9]* functions traced' || true)
bench sqlite ./st 1 100
traced_st=$("$textpoke" record -o tp.data -- ./st 1 100 2>&1 >/dev/null | grep -o '[0-9]* functions traced' || true)
rm -rf tp.data tp.data.old

echo
echo "best of $REPS runs, $(nproc) CPUs, Linux $(uname -r); big: $traced_big, sqlite: $traced_st"
echo
echo "| workload | command                     |  wall (s) | / uftrace | max RSS (MB) |"
echo "|----------|-----------------------------|----------:|----------:|-------------:|"
awk -v base="$base" '
    { split($1, k, "/"); w = k[1]; t = k[2]
      if (!((w, t) in wall) || $2 < wall[w, t]) wall[w, t] = $2
      if (!((w, t) in rss) || $3 < rss[w, t]) rss[w, t] = $3 }
    END {
        n = split("big sqlite", ws, " ")
        names["program"] = "program alone"
        names["textpoke"] = "textpoke record"
        names["base"] = "textpoke record (BASE)"
        names["uftrace"] = "uftrace record -P ."
        m = split("program textpoke base uftrace", ts, " ")
        for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) {
            w = ws[i]; t = ts[j]
            if (!((w, t) in wall)) continue
            printf "| %-8s | %-27s | %9.3f | %8.2fx | %12.1f |\n", w, names[t], wall[w, t], wall[w, t] / wall[w, "uftrace"], rss[w, t] / 1024
        }
    }' runs.txt
