#!/usr/bin/env bash
# Real programs under sustained load, textpoke against uftrace on the same
# binaries, side by side in one run (not part of CI):
#
#   - SQLite (the amalgamation, 4 threads inserting and querying; every
#     function traced, -fpatchable-function-entry=5 -DSQLITE_DISABLE_INLINE);
#   - the Lua 5.4 interpreter running fib, a table sort and string building
#     (about 44M calls on one thread);
#
# For each: wall time (best of REPS), events lost, trace bytes on disk, and
# the per-function call counts compared with uftrace's (functions whose
# counts differ). The sources come from the package registries this machine
# reaches: SQLite from npm (better-sqlite3 bundles the amalgamation), Lua
# from PyPI (lupa's source distribution bundles it); nothing of them is
# committed. Needs uftrace (installed from Debian when missing), gcc,
# npm, curl.
#
#   bench/workloads.sh                 # REPS=3
set -euo pipefail

REPS=${REPS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
command -v uftrace >/dev/null || {
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq uftrace >/dev/null
}
(cd "$root" && cargo build --release -q -p textpoke-cli)
textpoke="$root/target/release/textpoke"
cache=${WORKLOADS_CACHE:-$root/target/workloads}
mkdir -p "$cache"
cd "$cache"

# --- sources -----------------------------------------------------------------
if [ ! -f sqlite3.c ]; then
    npm pack better-sqlite3@11 >/dev/null 2>&1
    tar xzf better-sqlite3-*.tgz package/deps/sqlite3/sqlite3.c package/deps/sqlite3/sqlite3.h
    cp package/deps/sqlite3/sqlite3.[ch] .
fi
if [ ! -d lua54 ]; then
    url=$(curl -s https://pypi.org/simple/lupa/ | grep -o 'https://[^"#]*lupa-2.2.tar.gz' | head -1)
    curl -sL -o lupa.tgz "$url"
    tar xzf lupa.tgz lupa-2.2/third-party/lua54
    mv lupa-2.2/third-party/lua54 lua54
fi

# --- programs ------------------------------------------------------------------
cp "$root/bench/sqlite-test.c" st.c
cat >bench.lua <<'EOF'
local function fib(n) if n < 2 then return n end return fib(n-1) + fib(n-2) end
local s = fib(27)
local t = {}
for i = 1, 200000 do t[i] = (i * 7919) % 100003 end
table.sort(t)
local parts = {}
for i = 1, 100000 do parts[#parts+1] = tostring(i) .. "," end
local str = table.concat(parts)
print("fib", s, "sorted", t[1], t[#t], "len", #str)
EOF
[ -x st ] || gcc -O2 -g -pthread -fpatchable-function-entry=5 -DSQLITE_DISABLE_INLINE -o st st.c sqlite3.c -ldl -lm
if [ ! -x lua ]; then
    srcs=$(ls lua54/*.c | grep -v -e luac.c -e onelua.c -e ltests.c)
    # A fixed string-hash seed (Lua seeds it from the clock and addresses),
    # so that both tools see the same calls (with ASLR off, below).
    gcc -O2 -g -fpatchable-function-entry=5 -DLUA_USE_LINUX '-Dluai_makeseed(L)=0' -o lua $srcs -lm -ldl
fi

# --- runs ----------------------------------------------------------------------
# wall CMD...: seconds the command took, best of REPS.
wall() {
    local best=""
    for ((i = 0; i < REPS; i++)); do
        local t0 t1
        t0=$(date +%s.%N)
        "$@" >/dev/null 2>>log
        t1=$(date +%s.%N)
        local d
        d=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
        if [ -z "$best" ] || awk -v a="$d" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$d; fi
    done
    echo "$best"
}
# Without address randomisation, so that runs are the same program run.
norand="setarch $(uname -m) -R"
tp_run() { rm -rf tp.data && $norand "$textpoke" record -o tp.data -- "$@"; }
uf_run() { rm -rf u.data && $norand uftrace record -P . -d u.data "$@"; }

# name count per line, sorted. uftrace also reports the program's calls
# into shared libraries (through the PLT: malloc, memcpy...), which
# textpoke does not trace, and "(pre-empted)" pseudo-calls: they are left
# out of uftrace's list (counted apart) by keeping the functions the
# program itself defines (nm).
tp_counts() { "$textpoke" report -i tp.data --format csv | awk -F, 'NR > 1 { print $1, $2 }' | sort; }
uf_counts() {
    uftrace report -d u.data --no-pager 2>/dev/null |
        awk 'NR > 2 && NF >= 6 { print $NF, $5 }' | sort >c.uf.all
    nm --defined-only "$1" | awk '$2 ~ /[tT]/ { print $3 }' | sort -u >defined
    join c.uf.all defined
}

table=()
measure() { # name CMD...
    local name=$1
    shift
    local t_tp t_uf
    t_tp=$(wall tp_run "$@")
    t_uf=$(wall uf_run "$@")
    local lost events bytes_tp bytes_uf
    lost=$(python3 -c 'import json; print(json.load(open("tp.data/meta.json"))["total_dropped"])')
    events=$(python3 -c 'import json; print(json.load(open("tp.data/meta.json"))["total_events"])')
    bytes_tp=$(du -sb tp.data | cut -f1)
    bytes_uf=$(du -sb u.data | cut -f1)
    tp_counts >c.tp
    uf_counts "$1" >c.uf
    local funcs differ
    funcs=$(wc -l <c.tp)
    differ=$(join c.tp c.uf | awk '$2 != $3' | wc -l)
    local only_tp only_uf
    only_tp=$(join -v1 c.tp c.uf | wc -l)
    only_uf=$(join -v2 c.tp c.uf | wc -l)
    table+=("$(printf '| %-22s | %8s s | %8s s | %5.2fx | %11s | %6.1f | %6.1f | %5s | %9s |' \
        "$name" "$t_tp" "$t_uf" "$(awk -v a="$t_tp" -v b="$t_uf" 'BEGIN { print a / b }')" "$lost" \
        "$(awk -v b="$bytes_tp" -v e="$events" 'BEGIN { print 2 * b / e }')" \
        "$(awk -v b="$bytes_uf" -v e="$events" 'BEGIN { print 2 * b / e }')" "$funcs" \
        "$differ/$only_tp/$only_uf")")
}

measure "SQLite, 4 threads" ./st 4 2000
measure "Lua 5.4 (fib, sort)" ./lua bench.lua

echo
echo "best of $REPS runs, $(nproc) CPUs, Linux $(uname -r); bytes per call: trace on disk / calls"
echo "counts: functions whose call counts differ from uftrace's / only in textpoke's report / only in uftrace's"
echo "(uftrace's calls into shared libraries and pre-emption marks are left out; textpoke does not trace those)"
echo
echo "| program                |  textpoke  |  uftrace   |  ratio | events lost | B/call | uftrace B/call | funcs | counts    |"
echo "|------------------------|-----------:|-----------:|-------:|------------:|-------:|---------------:|------:|----------:|"
printf '%s\n' "${table[@]}"
