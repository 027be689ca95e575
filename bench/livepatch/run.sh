#!/bin/sh
# `textpoke patch` on 8 busy threads, none inside the patched function:
# the time from the agent being loaded to the transition's completion, as
# `textpoke patch -v` prints it ("complete N ms after the agent was
# loaded"). The first apply injects the agent; each later one reaches the
# same agent again (a patch session), so REPS applies and reverts follow.
#   TEXTPOKE=target/release/textpoke REPS=10 THREADS=8 bench/livepatch/run.sh
# FLOOR=1 also measures, right after, how long until every one of THREADS
# spinning threads has run once (sched_floor.c): the floor for any
# signal-free transition on busy threads.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
textpoke=${TEXTPOKE:-$root/target/release/textpoke}
reps=${REPS:-10}
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
gcc -O2 -pthread -pg -mfentry -mnop-mcount -mrecord-mcount -fno-pie -no-pie \
    -flive-patching=inline-clone -Wl,--build-id -o "$work/target" "$here/target.c"
id=$(readelf -n "$work/target" | sed -n 's/.*Build ID: //p')
gcc -O2 -shared -fPIC -I "$root/crates/textpoke-c/include" -DBUILD_ID="\"$id\"" \
    -o "$work/cold-v2.so" "$here/patch.c"
"$work/target" "${THREADS:-8}" > "$work/pid" &
pid=$!
sleep 0.5
i=0
while [ $i -lt "$reps" ]; do
    "$textpoke" patch $pid "$work/cold-v2.so" -v 2>&1 | sed -n 's/.*\(complete .* after the agent was loaded\).*/apply: \1/p; /^patched/p'
    "$textpoke" patch $pid --revert | sed 's/^/revert: /'
    i=$((i + 1))
done
if [ "${FLOOR:-0}" = 1 ]; then
    kill $pid 2>/dev/null || true
    gcc -O2 -pthread -o "$work/sched_floor" "$here/sched_floor.c"
    "$work/sched_floor" "${THREADS:-8}" 50 | sed 's/^/floor: /'
fi
