//! `textpoke record`, `ctl` and `list PROG` end to end: C programs
//! compiled here with gcc, run through the built `textpoke` binary (which
//! preloads the agent), their traces read back with
//! `textpoke_record::tracedata::Trace`.
//!
//! These tests count the programs' own functions exactly, so they record
//! with `--no-libcall`; library calls are tested in `libcall.rs`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use textpoke_record::tracedata::{RecordKind, Trace};

// ---------------------------------------------------------------------------
// Helpers.

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh path under the work directory.
fn fresh(name: &str) -> PathBuf {
    let p = work_dir().join(name);
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// A private socket directory for one test.
fn socket_dir(name: &str) -> PathBuf {
    let d = fresh(&format!("sock-{name}"));
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn textpoke(sockets: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_textpoke"));
    c.env("TEXTPOKE_SOCKET_DIR", sockets).current_dir(work_dir());
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Compiles C source `src` into an executable `name` with gcc and `flags`.
fn compile(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let dir = work_dir();
    let c = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&c, src).unwrap();
    let out = Command::new("gcc")
        .args(["-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg(&c)
        .args(flags)
        .output()
        .expect("gcc must be installed to build the test programs");
    assert!(out.status.success(), "gcc {name}: {}", text(&out.stderr));
    exe
}

const SITES: &str = "-fpatchable-function-entry=5";

/// Per function name: (entries, exits), summed over threads; checks that
/// each thread's entries and exits balance per function.
fn tally(trace: &Trace) -> BTreeMap<String, (u64, u64)> {
    tally_with(trace, true)
}

/// As [`tally`], without the balance check (a process that execs never
/// returns from main; a forked child returns from a main it entered in the
/// parent).
fn tally_with(trace: &Trace, balanced: bool) -> BTreeMap<String, (u64, u64)> {
    let mut total: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for th in trace.threads() {
        let mut mine: BTreeMap<String, i64> = BTreeMap::new();
        for r in trace.records(th).unwrap() {
            let r = r.unwrap();
            let name = trace.name(r.func).to_string();
            let t = total.entry(name.clone()).or_default();
            let m = mine.entry(name).or_default();
            match r.kind {
                RecordKind::Entry => (t.0 += 1, *m += 1),
                RecordKind::Exit => (t.1 += 1, *m -= 1),
                RecordKind::Gap => panic!("thread {}: {} events lost", th.tid(), r.lost),
                RecordKind::Cut => ((), ()),
            };
        }
        for (f, bal) in mine.into_iter().filter(|_| balanced) {
            assert_eq!(bal, 0, "thread {}: {f} entries and exits do not balance", th.tid());
        }
    }
    total
}

/// Calls per function name of a trace: its exact counts, which in record
/// mode must also be the entries recorded.
fn calls(trace: &Trace) -> BTreeMap<String, u64> {
    let counted: BTreeMap<String, u64> =
        trace.counts().iter().filter(|(_, n)| *n > 0).map(|&(f, n)| (trace.name(f).to_string(), n)).collect();
    if trace.mode() == textpoke_record::Mode::Record {
        let entered: BTreeMap<String, u64> =
            tally_with(trace, false).into_iter().filter(|(_, (e, _))| *e > 0).map(|(k, (e, _))| (k, e)).collect();
        if trace.dropped() == 0 {
            assert_eq!(counted, entered, "counts and recorded entries agree");
        } else {
            // Calls whose events were not recorded are still counted.
            for (f, n) in &entered {
                assert!(counted[f] >= *n, "{f}: {} counted, {n} recorded", counted[f]);
            }
        }
    }
    counted
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

fn open_complete(dir: &Path) -> Trace {
    let t = Trace::open(dir).unwrap_or_else(|e| panic!("trace {}: {e}", dir.display()));
    assert!(t.is_complete());
    assert_eq!(t.dropped(), 0, "no record dropped");
    t
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The agent built with the binary under test.
fn agent() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_textpoke"));
    let p = bin.parent().unwrap().join("deps/libtextpoke_agent.so");
    assert!(p.is_file(), "{} is built with textpoke", p.display());
    p
}

// ---------------------------------------------------------------------------
// Programs.

/// Threads, signal handlers, recursion: 4 threads each call leaf 50 times
/// and signal themselves 5 times (the handler calls on_sig_work, which
/// calls leaf), then fib(10) (177 calls). Exits with argv[1].
const THREADS_C: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
static volatile long sink;
__attribute__((noinline)) long leaf(long x) { sink += x; return x + 1; }
__attribute__((noinline)) long fib(int n) { if (n < 2) { sink += n; return n; } return fib(n - 1) + fib(n - 2); }
__attribute__((noinline)) void on_sig_work(int s) { leaf(s); }
static void handler(int s) { on_sig_work(s); }
__attribute__((noinline)) void *worker(void *a) {
    for (int i = 0; i < 50; i++) { leaf(i); if (i % 10 == 0) pthread_kill(pthread_self(), SIGUSR1); }
    return (void *)fib(10);
}
int main(int argc, char **argv) {
    struct sigaction sa = { .sa_handler = handler };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, NULL);
    long s = 0;
    for (int i = 0; i < 4; i++) { void *r; pthread_join(t[i], &r); s += (long)r; }
    printf("threads ok %ld\n", s);
    return argc > 1 ? atoi(argv[1]) : 0;
}
"#;

fn threads_prog() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| compile("threads", THREADS_C, &[SITES]))
}

/// A program without patchable entries: prints its arguments and a line
/// of stdin, exits with 42.
const PLAIN_C: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) {
    char line[256] = "";
    if (!fgets(line, sizeof line, stdin)) line[0] = 0;
    printf("plain:");
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf(" stdin=%s", line);
    fflush(stdout);
    fprintf(stderr, "plain stderr\n");
    return 42;
}
"#;

fn plain_prog() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| compile("plain", PLAIN_C, &[]))
}

/// A traced program to exec into: calls `leaf2` argv[1] times.
const TRACED_CHILD_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
static volatile long sink;
__attribute__((noinline)) long leaf2(long x) { sink += x; return x; }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    for (int i = 0; i < n; i++) leaf2(i);
    printf("traced child %d\n", n);
    return 0;
}
"#;

fn traced_child_prog() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| compile("traced_child", TRACED_CHILD_C, &[SITES]))
}

// ---------------------------------------------------------------------------
// Recording.

#[test]
fn threads_signals_recursion_exact_counts_and_exit_code() {
    let dir = fresh("threads.data");
    let out = run(textpoke(&socket_dir("threads"))
        .args(["record", "--no-libcall"])
        .arg("-o")
        .arg(&dir)
        .arg(threads_prog())
        .arg("7"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert_eq!(text(&out.stdout), format!("threads ok {}\n", 4 * 55));
    let summary = stderr.lines().last().unwrap();
    assert!(summary.starts_with("textpoke: 6 functions traced (of 6),"), "{stderr}");
    assert!(summary.contains("5 threads") && summary.contains(&dir.display().to_string()), "{summary}");
    let trace = open_complete(&dir);
    assert_eq!(trace.threads().len(), 5);
    let want = [
        ("main", (1, 1)),
        ("worker", (4, 4)),
        ("leaf", (4 * 55, 4 * 55)),
        ("handler", (20, 20)),
        ("on_sig_work", (20, 20)),
        ("fib", (4 * 177, 4 * 177)),
    ];
    let want: BTreeMap<String, (u64, u64)> = want.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    assert_eq!(tally(&trace), want);
}

/// An independent count of every call: gcc's `-finstrument-functions`
/// hooks count each function's calls in the program itself, which writes
/// them to argv[1]. 8 threads (more than the cores) and a storm of
/// signals whose handler calls traced functions; far more events than a
/// buffer segment holds, so the writer works while the threads run.
const COUNTED_C: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define NOI __attribute__((noinline))
#define UNTRACED __attribute__((no_instrument_function, patchable_function_entry(0, 0)))
#define THREADS 8
#define ITERS 60000
static void *fns[8];
static const char *names[8];
static int nfns;
static _Atomic unsigned long counts[8];
UNTRACED void __cyg_profile_func_enter(void *fn, void *site) {
    (void)site;
    for (int i = 0; i < nfns; i++)
        if (fns[i] == fn) { atomic_fetch_add_explicit(&counts[i], 1, memory_order_relaxed); return; }
}
UNTRACED void __cyg_profile_func_exit(void *fn, void *site) { (void)fn; (void)site; }
static volatile long sink;
NOI long leaf(long x) { sink += x; return x + 1; }
NOI long mid(long x) { return leaf(x) + leaf(x + 1); }
NOI long fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
NOI void in_handler(int s) { mid(s); }
UNTRACED static void handler(int s) { in_handler(s); }
/* Workers stay alive (waiting) until the storm is over: signalling a
   thread that was joined is undefined. */
static atomic_int finished, released;
NOI void *worker(void *arg) {
    (void)arg;
    for (long i = 0; i < ITERS; i++) { mid(i); if (i % 100 == 0) fib(8); }
    atomic_fetch_add(&finished, 1);
    while (!atomic_load(&released)) usleep(1000);
    return 0;
}
UNTRACED static void *storm(void *arg) {
    pthread_t *t = arg;
    while (atomic_load(&finished) < THREADS) {
        for (int i = 0; i < THREADS; i++) pthread_kill(t[i], SIGUSR1);
        usleep(20);
    }
    return 0;
}
#define REG(f) (fns[nfns] = (void *)f, names[nfns++] = #f)
UNTRACED int main(int argc, char **argv) {
    REG(leaf); REG(mid); REG(fib); REG(in_handler); REG(worker);
    struct sigaction sa = { .sa_handler = handler, .sa_flags = SA_RESTART };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t[THREADS], s;
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, NULL);
    pthread_create(&s, NULL, storm, t);
    pthread_join(s, NULL);
    atomic_store(&released, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    FILE *f = fopen(argv[1], "w");
    for (int i = 0; i < nfns; i++) fprintf(f, "%s %lu\n", names[i], atomic_load(&counts[i]));
    fclose(f);
    return 0;
}
"#;

#[test]
fn counts_equal_an_independent_counter_under_a_signal_storm() {
    let prog = compile("counted", COUNTED_C, &[SITES, "-finstrument-functions"]);
    let sockets = socket_dir("counted");
    let dir = fresh("counted.data");
    let out_file = fresh("counted.txt");
    let o = run(textpoke(&sockets)
        .args(["record", "--no-libcall"])
        .arg("-o")
        .arg(&dir)
        .arg("--")
        .arg(&prog)
        .arg(&out_file));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let truth: BTreeMap<String, u64> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, n) = l.split_once(' ').unwrap();
            (name.to_string(), n.parse().unwrap())
        })
        .collect();
    assert!(truth["in_handler"] > 0, "signal handlers ran: {truth:?}");
    let trace = Trace::open(&dir).unwrap();
    // Events are lost only where a handler ran inside the tracer or the
    // recorder: counted, and marked where it happened.
    for th in trace.threads() {
        assert_eq!(th.meta.lost, 0, "thread {}: nothing lost to the buffer limits", th.tid());
        let marked: u64 =
            trace.records(th).unwrap().map(|r| r.unwrap()).filter(|r| r.kind == RecordKind::Cut).map(|r| r.lost).sum();
        assert_eq!(marked, th.meta.dropped_nested, "thread {}: every cut event marked", th.tid());
    }
    let counted = calls(&trace); // also checks counts == recorded entries
    for (name, &n) in &truth {
        assert_eq!(counted.get(name).copied(), Some(n), "{name}: textpoke's count against the program's own");
    }
    let events: u64 = trace.meta().total_events;
    let segment = trace.meta().buffers.segment_bytes / 8;
    assert!(events > 20 * segment, "{events} events: many segments per thread were written while recording");
    let _ = tally(&trace); // balanced per thread
}

/// The buffers' limit reached on purpose (`-b 256K`: two segments per
/// thread, 8 busy threads on 2 cores): events are lost, said loudly, and
/// marked where they were lost; `replay` shows the gaps and stays nested;
/// `report`'s calls are still exact (the program's own counts).
#[test]
fn past_the_buffer_limit_losses_are_said_marked_and_calls_exact() {
    let prog = compile("counted-limit", COUNTED_C, &[SITES, "-finstrument-functions"]);
    let sockets = socket_dir("limit");
    let dir = fresh("limit.data");
    let out_file = fresh("limit.txt");
    let o = run(textpoke(&sockets)
        .args(["record", "--no-libcall", "-b", "256K", "-o"])
        .arg(&dir)
        .arg("--")
        .arg(&prog)
        .arg(&out_file));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    let trace = Trace::open(&dir).unwrap();
    let lost: u64 = trace.threads().iter().map(|t| t.meta.lost).sum();
    assert!(lost > 0, "8 threads on 2 cores outran the writer with 256 KiB each: {err}");
    assert!(err.contains("WARNING") && err.contains("LOST") && err.contains("256 KiB"), "{err}");
    // Every loss marked where it happened (the last ones may end a thread's
    // stream with no later segment to carry the mark).
    let mut marked = 0;
    for th in trace.threads() {
        marked += trace.records(th).unwrap().map(|r| r.unwrap()).filter(|r| r.kind == RecordKind::Gap).count();
    }
    assert!(marked > 0, "gaps in the streams");
    let r = run(textpoke(&sockets).args(["replay", "-i"]).arg(&dir));
    assert!(r.status.success(), "{}", text(&r.stderr));
    let replay = text(&r.stdout);
    assert!(replay.contains("event(s) lost here; resuming at depth"), "replay marks the gaps");
    // Nested per thread between gaps: every closing line closes the last
    // open call of the same name.
    for section in replay.split("# thread ").skip(1) {
        let mut open: Vec<&str> = Vec::new();
        for line in section.lines() {
            let Some((_, body)) = line.split_once(" | ") else { continue };
            let body = body.trim();
            if body.starts_with("==========") {
                open.clear(); // a gap: what was open is closed there
            } else if let Some(name) = body.strip_suffix("() {") {
                open.push(name);
            } else if let Some(rest) = body.strip_prefix("} /* ") {
                let name = rest.trim_end_matches(" */");
                if open.last() == Some(&name) {
                    open.pop();
                } else {
                    assert!(open.is_empty(), "'{name}' closes '{:?}'", open.last());
                }
            }
        }
    }
    let truth: BTreeMap<String, u64> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, n) = l.split_once(' ').unwrap();
            (name.to_string(), n.parse().unwrap())
        })
        .collect();
    let counted: BTreeMap<String, u64> = trace.counts().iter().map(|&(f, n)| (trace.name(f).to_string(), n)).collect();
    for (name, &n) in &truth {
        assert_eq!(counted.get(name).copied(), Some(n), "{name}: exact calls past the limit");
    }
}

/// A shell script (no sites of its own) that runs three traced programs,
/// without exec: the summary counts what they recorded, and `report` on
/// the trace directory shows the three processes.
#[test]
fn a_script_running_traced_children() {
    let prog = threads_prog();
    let sockets = socket_dir("script");
    let dir = fresh("script.data");
    let script = work_dir().join("run3.sh");
    std::fs::write(&script, format!("#!/bin/sh\n{p} 0\n{p} 0\n{p} 0\n", p = prog.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = run(textpoke(&sockets).args(["record", "--no-libcall"]).arg("-o").arg(&dir).arg("--").arg(&script));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("ran no traced code itself; the 3 processes it started recorded"), "{err}");
    assert!(!err.contains("nothing recorded"), "{err}");
    let r = run(textpoke(&sockets).args(["report", "-i"]).arg(&dir));
    assert!(r.status.success(), "{}", text(&r.stderr));
    let out = text(&r.stdout);
    assert_eq!(out.lines().filter(|l| l.starts_with("# process")).count(), 3, "{out}");
    assert!(out.lines().filter(|l| l.contains(" leaf")).count() >= 3, "each process's report: {out}");
    let rp = run(textpoke(&sockets).args(["replay", "-i"]).arg(&dir));
    assert!(rp.status.success(), "{}", text(&rp.stderr));
}

#[test]
fn count_only_and_filters() {
    let sockets = socket_dir("filters");
    let dir = fresh("counts.data");
    let out =
        run(textpoke(&sockets).args(["record", "--no-libcall", "--count-only", "-o"]).arg(&dir).arg(threads_prog()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let trace = open_complete(&dir);
    assert_eq!(
        calls(&trace),
        expect(&[("main", 1), ("worker", 4), ("leaf", 220), ("handler", 20), ("on_sig_work", 20), ("fib", 708)])
    );
    assert!(text(&out.stderr).contains(&format!("{} calls counted", 1 + 4 + 220 + 20 + 20 + 708)));

    // -F twice, -N removing one of them: only leaf; `l*` matches nothing else.
    let dir = fresh("filtered.data");
    let out = run(textpoke(&sockets)
        .args(["record", "--no-libcall", "-F", "l*", "-F", "fib", "-N", "fib", "-o"])
        .arg(&dir)
        .arg(threads_prog()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("1 function traced (of 6)"), "{}", text(&out.stderr));
    assert_eq!(calls(&open_complete(&dir)), expect(&[("leaf", 220)]));

    // A second recording moves the first to DIR.old.
    let out = run(textpoke(&sockets).args(["record", "--no-libcall", "-F", "fib", "-o"]).arg(&dir).arg(threads_prog()));
    assert!(out.status.success());
    assert_eq!(calls(&open_complete(&dir)), expect(&[("fib", 708)]));
    let mut old = dir.clone().into_os_string();
    old.push(".old");
    assert_eq!(calls(&open_complete(Path::new(&old))), expect(&[("leaf", 220)]));
}

#[test]
fn demo_runs_without_a_program() {
    let dir = fresh("demo.data");
    let out = run(textpoke(&socket_dir("demo")).args(["record", "--no-libcall", "-o"]).arg(&dir));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(text(&out.stdout).starts_with("textpoke-demo: 4 threads, 20 items each, 16 signals handled"));
    assert!(stderr.contains("8 functions traced (of 8)"), "{stderr}");
    let trace = open_complete(&dir);
    assert_eq!(trace.meta().process_name, "textpoke-demo");
    // Per item: fib(12) is 465 calls, walk_tree(4) 31 with 16 leaves, each
    // calling checksum, plus 16 checksum calls; every 5th item signals.
    let items = 4 * 20;
    assert_eq!(
        calls(&trace),
        expect(&[
            ("main", 1),
            ("worker", 4),
            ("work_item", items),
            ("fib", items * 465),
            ("walk_tree", items * 31),
            ("checksum", items * 32),
            ("on_usr1", 16),
            ("note_signal", 16),
        ])
    );
}

/// Forks twice: one child ends with `_exit`, the other returns from main.
const FORK_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
static volatile long sink;
__attribute__((noinline)) long pwork(long x) { sink += x; return x; }
__attribute__((noinline)) long cwork(long x) { sink -= x; return x; }
int main(void) {
    for (int i = 0; i < 10; i++) pwork(i);
    fflush(stdout);
    pid_t a = fork();
    if (a == 0) { for (int i = 0; i < 7; i++) cwork(i); _exit(0); }
    pid_t b = fork();
    if (b == 0) { for (int i = 0; i < 3; i++) cwork(i); pwork(1); return 0; }
    int st;
    waitpid(a, &st, 0);
    waitpid(b, &st, 0);
    for (int i = 0; i < 5; i++) pwork(i);
    printf("%d %d\n", (int)a, (int)b);
    return 0;
}
"#;

#[test]
fn fork_children_are_recorded_apart() {
    let prog = compile("forks", FORK_C, &[SITES]);
    let dir = fresh("fork.data");
    let out = run(textpoke(&socket_dir("fork")).args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let pids: Vec<&str> = stdout.split_whitespace().collect();
    assert!(text(&out.stderr).contains("2 child traces"), "{}", text(&out.stderr));
    let parent = open_complete(&dir);
    assert_eq!(calls(&parent), expect(&[("main", 1), ("pwork", 15)]));
    assert_eq!(parent.children().len(), 2);
    let a = open_complete(&dir.join(format!("child-{}", pids[0])));
    assert_eq!(calls(&a), expect(&[("cwork", 7)]), "the _exit child");
    assert_eq!(a.meta().parent_pid, Some(parent.meta().pid));
    let b = open_complete(&dir.join(format!("child-{}", pids[1])));
    // The child returns from a main it entered in the parent.
    let got = tally_with(&b, false);
    assert_eq!(got["cwork"], (3, 3));
    assert_eq!(got["pwork"], (1, 1));
    assert_eq!(got["main"], (0, 1));
}

/// A `SIGTERM` handler that calls `_exit(3)`, run after `work` was called
/// 100 times and the trace written once: raised from `main` (argv[1]
/// "outside"), or from inside `malloc` while the heap's lock is held
/// ("inside"). This program's allocator (not traced) takes a lock of its
/// own around glibc's, as glibc's takes its arena lock; being the
/// executable's, it serves every object, the agent included. Prints its
/// pid first.
const EXIT_IN_HANDLER_C: &str = r#"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);
static pthread_mutex_t heap = PTHREAD_MUTEX_INITIALIZER;
static volatile sig_atomic_t term_inside_malloc;
/* Not traced: the writer's and the agent's allocations are not the program's. */
#define NOTRACE __attribute__((patchable_function_entry(0, 0)))
NOTRACE void *malloc(size_t n) {
    pthread_mutex_lock(&heap);
    if (term_inside_malloc) { term_inside_malloc = 0; raise(SIGTERM); }
    void *p = __libc_malloc(n);
    pthread_mutex_unlock(&heap);
    return p;
}
NOTRACE void free(void *q) { pthread_mutex_lock(&heap); __libc_free(q); pthread_mutex_unlock(&heap); }
NOTRACE void *calloc(size_t n, size_t m) {
    pthread_mutex_lock(&heap); void *p = __libc_calloc(n, m); pthread_mutex_unlock(&heap); return p;
}
NOTRACE void *realloc(void *q, size_t n) {
    pthread_mutex_lock(&heap); void *p = __libc_realloc(q, n); pthread_mutex_unlock(&heap); return p;
}
NOTRACE void *memalign(size_t a, size_t n) {
    pthread_mutex_lock(&heap); void *p = __libc_memalign(a, n); pthread_mutex_unlock(&heap); return p;
}
NOTRACE void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
NOTRACE int posix_memalign(void **r, size_t a, size_t n) { void *p = memalign(a, n); if (!p) return ENOMEM; *r = p; return 0; }

static volatile long sink;
__attribute__((noinline)) long work(long x) { sink += x; return x; }
__attribute__((noinline)) void cleanup(int s) { sink += s; }
static void on_term(int s) { cleanup(s); _exit(3); }
int main(int argc, char **argv) {
    struct sigaction sa = { .sa_handler = on_term };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    printf("%d\n", (int)getpid());
    fflush(stdout);
    for (int i = 0; i < 100; i++) work(i);
    usleep(200 * 1000); /* the writer drains the records */
    if (argc > 1 && argv[1][0] == 'i') {
        term_inside_malloc = 1;
        void *volatile p = malloc(64);
        free(p);
    } else {
        raise(SIGTERM);
    }
    return 0;
}
"#;

/// Runs `cmd` (`textpoke record` of a program that prints its pid first);
/// kills the program if the whole does not end within 30 s.
fn run_or_kill(cmd: &mut Command) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap_or_else(|_| panic!("pid line {line:?}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // SAFETY: signalling the program this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = child.wait_with_output().unwrap();
            panic!("process {pid} did not end within 30 s (deadlocked?): {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = child.wait_with_output().unwrap();
    stdout.read_to_end(&mut out.stdout).unwrap();
    out
}

#[test]
fn exit_from_a_signal_handler_ends_the_program() {
    let prog = compile("exit_in_handler", EXIT_IN_HANDLER_C, &[SITES, "-fno-builtin"]);
    let sockets = socket_dir("exit-handler");

    // A handler that interrupted nothing: the trace is finished.
    let dir = fresh("exit-handler.data");
    let out =
        run_or_kill(textpoke(&sockets).args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog).arg("outside"));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let trace = open_complete(&dir);
    assert_eq!(calls(&trace), expect(&[("main", 1), ("work", 100), ("on_term", 1), ("cleanup", 1)]));

    // A handler that interrupted malloc: stopping the recorder on the
    // thread in `_exit` would deadlock on the heap's lock, which that
    // thread holds. The program ends (after the agent's wait for its
    // thread, which blocks on that lock) with the trace left as the writer
    // last wrote it, marked incomplete.
    let dir = fresh("exit-in-malloc.data");
    let out = run_or_kill(textpoke(&sockets).args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog).arg("inside"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("the trace could not be finished at _exit"), "{stderr}");
    assert!(stderr.contains("(incomplete: "), "{stderr}");
    let trace = Trace::open_with(&dir, textpoke_record::tracedata::OpenOptions { allow_incomplete: true }).unwrap();
    assert!(!trace.is_complete());
    assert_eq!(calls(&trace)["work"], 100, "the records drained before the signal are kept");
    assert_eq!(std::fs::read_dir(&sockets).unwrap().count(), 0, "the socket is removed");
}

/// Calls `ework` three times, then execs argv[1] with the rest of argv (by
/// `execv`, or `execlp` when argv[1] is "lp").
const EXEC_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
static volatile long sink;
__attribute__((noinline)) long ework(long x) { sink += x; return x; }
int main(int argc, char **argv) {
    for (int i = 0; i < 3; i++) ework(i);
    fflush(stdout);
    if (argv[1][0] == 'l' && argv[1][1] == 'p') execlp(argv[2], argv[2], argv[3], (char *)0);
    else execv(argv[1], argv + 1);
    perror("exec");
    return 99;
}
"#;

#[test]
fn exec_of_a_program_without_sites_runs_normally() {
    let prog = compile("execer", EXEC_C, &[SITES]);
    let dir = fresh("exec-plain.data");
    let mut child = textpoke(&socket_dir("exec-plain"))
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&prog)
        .arg(plain_prog())
        .args(["a", "b c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"from stdin\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(42), "{stderr}");
    assert_eq!(text(&out.stdout), "plain: a b c stdin=from stdin\n");
    // The program's stderr, then the summary; nothing else from textpoke.
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines[0], "plain stderr", "{stderr}");
    assert_eq!(lines.len(), 2, "{stderr}");
    let trace = open_complete(&dir);
    assert_eq!(calls(&trace), expect(&[("ework", 3), ("main", 1)]));
    assert!(trace.children().is_empty(), "a program without sites writes nothing");
}

#[test]
fn exec_of_a_traced_program_writes_its_own_trace() {
    let prog = compile("execer2", EXEC_C, &[SITES]);
    let dir = fresh("exec-traced.data");
    let out = run(textpoke(&socket_dir("exec-traced"))
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&prog)
        .arg("lp")
        .arg(traced_child_prog())
        .arg("9"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "traced child 9\n");
    let trace = open_complete(&dir);
    assert_eq!(calls(&trace), expect(&[("ework", 3), ("main", 1)]));
    let pid = trace.meta().pid;
    let exec_dir = dir.join(format!("child-{pid}-exec"));
    assert_eq!(trace.children(), std::slice::from_ref(&exec_dir));
    let after = open_complete(&exec_dir);
    assert_eq!(after.meta().pid, pid, "the same process, after exec");
    assert_eq!(calls(&after), expect(&[("leaf2", 9), ("main", 1)]));
}

/// `system` (posix_spawn inside glibc) and `vfork`+`execv` start traced
/// children that write their own directories.
const SPAWN_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "exec %s 4", argv[1]);
    if (system(cmd) != 0) return 1;
    pid_t v = vfork();
    if (v == 0) { char *args[] = { argv[1], "6", NULL }; execv(argv[1], args); _exit(127); }
    int st;
    waitpid(v, &st, 0);
    printf("vfork %d\n", (int)v);
    return WEXITSTATUS(st);
}
"#;

#[test]
fn spawned_and_vforked_children_write_their_own_traces() {
    let prog = compile("spawner", SPAWN_C, &[SITES]);
    let dir = fresh("spawn.data");
    let out = run(textpoke(&socket_dir("spawn"))
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&prog)
        .arg(traced_child_prog()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("traced child 4\ntraced child 6\nvfork "), "{stdout}");
    let vpid: i32 = stdout.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let trace = open_complete(&dir);
    assert_eq!(calls(&trace), expect(&[("main", 1)]));
    let mut found: BTreeMap<u64, i32> = BTreeMap::new();
    for c in trace.children() {
        let t = open_complete(c);
        found.insert(calls(&t)["leaf2"], t.meta().pid);
    }
    assert_eq!(found.len(), 2, "{:?}", trace.children());
    assert_eq!(found[&6], vpid, "the vfork child writes child-<its pid>");
}

/// Prints its pid, then calls `tick` (and `tock` on a second thread)
/// until stdin closes.
const SPIN_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile long sink;
__attribute__((noinline)) long tick(long x) { sink += x; return x; }
__attribute__((noinline)) long tock(long x) { sink -= x; return x; }
static volatile int stop;
void *spin(void *a) { while (!stop) { tock(1); usleep(200); } return a; }
void *ticker(void *a) { while (!stop) { tick(1); usleep(200); } return a; }
int main(void) {
    pthread_t t[2];
    pthread_create(&t[0], NULL, spin, NULL);
    pthread_create(&t[1], NULL, ticker, NULL);
    printf("%d\n", (int)getpid());
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) != 0) {}
    stop = 1;
    pthread_join(t[0], NULL);
    pthread_join(t[1], NULL);
    return 0;
}
"#;

/// Starts the spin program under `textpoke record`; returns the CLI child
/// and the program's pid.
fn start_spin(sockets: &Path, dir: &Path, extra: &[&str]) -> (Child, i32) {
    let mut cmd = textpoke(sockets);
    cmd.args(["record", "--no-libcall"]).args(extra).arg("-o").arg(dir).arg(spin_prog());
    start_recording(cmd, sockets)
}

fn spin_prog() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| compile("spin", SPIN_C, &[SITES]))
}

/// Spawns `cmd`, a `textpoke record` of a program that prints its pid
/// first, with stdin, stdout and stderr piped; returns the CLI child and
/// the program's pid once the program's agent made its socket.
fn start_recording(mut cmd: Command, sockets: &Path) -> (Child, i32) {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap_or_else(|_| panic!("pid line {line:?}"));
    let sock = sockets.join(format!("{pid}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the agent made no socket {}", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, pid)
}

fn ctl(sockets: &Path, pid: i32, args: &[&str]) -> Output {
    run(textpoke(sockets).arg("ctl").arg(pid.to_string()).args(args))
}

fn status_field(sockets: &Path, pid: i32, key: &str) -> String {
    let out = ctl(sockets, pid, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {stdout}"));
    line[key.len()..].trim().to_string()
}

/// Calls counted so far (exact, in both modes).
fn records_now(sockets: &Path, pid: i32) -> u64 {
    let out = ctl(sockets, pid, &["status"]);
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("calls")).expect("a count");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn wait_growth(sockets: &Path, pid: i32) -> u64 {
    let r0 = records_now(sockets, pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let r = records_now(sockets, pid);
        if r > r0 {
            return r;
        }
        assert!(Instant::now() < deadline, "records stay at {r0}");
    }
}

#[test]
fn ctl_toggles_tracing_of_a_live_program() {
    let sockets = socket_dir("ctl");
    let dir = fresh("ctl.data");
    let (mut child, pid) = start_spin(&sockets, &dir, &[]);

    assert_eq!(status_field(&sockets, pid, "state"), "recording (record mode)");
    assert_eq!(status_field(&sockets, pid, "functions"), "5 traced of 5");
    // Function entries whose only op is the recorder's record inline.
    assert_eq!(status_field(&sockets, pid, "sites"), "5 traced, 5 recorded inline");
    assert_eq!(status_field(&sockets, pid, "rules"), "+*");
    let sock = sockets.join(format!("{pid}.sock"));
    assert_eq!(std::fs::symlink_metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    wait_growth(&sockets, pid);

    // Disable everything: the records stop growing.
    let out = ctl(&sockets, pid, &["disable", "*"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0 functions traced of 5\n");
    std::thread::sleep(Duration::from_millis(100)); // calls in flight return
    let quiet_from = monotonic_ns();
    let r1 = records_now(&sockets, pid);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(records_now(&sockets, pid), r1, "no records while nothing is traced");
    let quiet_to = monotonic_ns();

    // Enable tick again: they grow.
    let out = ctl(&sockets, pid, &["enable", "tick"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1 function traced of 5\n");
    assert!(wait_growth(&sockets, pid) > r1);
    // `-*` overrode `+*` for every function: it was dropped.
    assert_eq!(status_field(&sockets, pid, "rules"), "-* +tick");
    assert_eq!(status_field(&sockets, pid, "functions"), "1 traced of 5");

    // A glob that matches nothing is refused with close names.
    let out = ctl(&sockets, pid, &["enable", "tikc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no traceable function matches \"tikc\"; did you mean: tick"));
    let out = ctl(&sockets, pid, &["disable", "a["]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("bad function filter"), "{}", text(&out.stderr));

    drop(child.stdin.take()); // the program ends
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("1 function traced (of 5)"), "{}", text(&out.stderr));
    assert!(!sock.exists(), "the socket is removed at exit");

    // The trace: nothing between the disable and the enable; tock never
    // again after the disable.
    let trace = open_complete(&dir);
    let mut tock_after = 0;
    for th in trace.threads() {
        for r in trace.records(th).unwrap() {
            let r = r.unwrap();
            let t = trace.to_ns(r.ts);
            assert!(!(quiet_from..quiet_to).contains(&t), "a record while tracing was disabled");
            if trace.name(r.func) == "tock" && t >= quiet_from {
                tock_after += 1;
            }
        }
    }
    assert_eq!(tock_after, 0);
    let got = tally(&trace);
    assert!(got["tick"].0 > 0 && got["tock"].0 > 0);
}

#[test]
fn signals_pass_through() {
    let sockets = socket_dir("signals");
    // SIGTERM sent to textpoke goes to the program, which dies of it; the
    // agent stops the recorder first, so the trace is complete.
    let dir = fresh("sigterm.data");
    let (mut child, pid) = start_spin(&sockets, &dir, &["--count-only"]);
    let stdin = child.stdin.take(); // kept open: the program runs until killed
    wait_growth(&sockets, pid);
    // SAFETY: signalling the textpoke process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "textpoke dies of the program's signal: {:?}", out.status);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("calls counted"), "{stderr}");
    assert!(!stderr.contains("incomplete"), "{stderr}");
    let trace = open_complete(&dir);
    assert!(calls(&trace)["tick"] > 0);

    // SIGUSR1 sent to textpoke reaches the program's handler.
    const USR1_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static volatile sig_atomic_t got;
__attribute__((noinline)) void note(int s) { got = s; }
static void on_usr1(int s) { note(s); }
int main(void) {
    signal(SIGUSR1, on_usr1);
    printf("ready\n");
    fflush(stdout);
    while (!got) usleep(1000);
    printf("got %d\n", (int)got);
    return 5;
}
"#;
    let prog = compile("usr1", USR1_C, &[SITES]);
    let dir = fresh("usr1.data");
    let mut child = textpoke(&sockets)
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&prog)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY: signalling the textpoke process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(rest, format!("got {}\n", libc::SIGUSR1));
    assert_eq!(status.code(), Some(5));
    assert_eq!(calls(&open_complete(&dir)), expect(&[("main", 1), ("note", 1), ("on_usr1", 1)]));
}

/// dlopen twice: the library's sites are traced after each load and
/// forgotten at each dlclose.
const DLOPEN_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>
static void settle(void) {
    /* The agent patches new code within milliseconds; wait a second of
       wall time (sleeps are interrupted by the patching signals). */
    struct timespec t0, t, d = { 0, 10 * 1000 * 1000 };
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do { nanosleep(&d, NULL); clock_gettime(CLOCK_MONOTONIC, &t); }
    while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 1000000000L);
}
int main(int argc, char **argv) {
    for (int round = 0; round < 2; round++) {
        void *h = dlopen(argv[1], RTLD_NOW);
        if (!h) { printf("%s\n", dlerror()); return 1; }
        long (*plug)(long) = (long (*)(long))dlsym(h, "plug");
        settle();
        for (int i = 0; i < 5; i++) plug(i);
        if (dlclose(h) != 0 || dlerror() != NULL) return 2;
    }
    printf("done\n");
    return 0;
}
"#;

#[test]
fn libraries_loaded_later_are_traced() {
    let lib = work_dir().join("libplug.so");
    let src = work_dir().join("plug.c");
    std::fs::write(&src, "static volatile long s; long plug(long x) { s += x; return x; }\n").unwrap();
    let out = Command::new("gcc").args(["-O1", "-shared", "-fPIC", SITES, "-o"]).arg(&lib).arg(&src).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let prog = compile("dlopener", DLOPEN_C, &[SITES, "-ldl"]);
    let dir = fresh("dlopen.data");
    let out =
        run(textpoke(&socket_dir("dlopen")).args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog).arg(&lib));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let trace = open_complete(&dir);
    let got = calls(&trace);
    assert_eq!(got["plug"], 10, "{got:?} {}", text(&out.stderr));
    assert_eq!(got["main"], 1);
}

// ---------------------------------------------------------------------------
// When `textpoke record` goes away.

/// Prints its pid, then calls `beat` every 200 µs and prints `alive N`
/// every 100 calls, forever.
const CHATTY_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
static volatile long sink;
__attribute__((noinline)) long beat(long x) { sink += x; return x; }
int main(void) {
    printf("%d\n", (int)getpid());
    fflush(stdout);
    for (long i = 0;; i++) {
        beat(i);
        if (i % 100 == 0) { printf("alive %ld\n", i); fflush(stdout); }
        usleep(200);
    }
}
"#;

/// Kills a process this test started (and that outlived its parent) when
/// the test ends, passed or not.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test started.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// Total size of the files under `dir`, subdirectories included.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { tree_size(&e.path()) } else { m.len() };
    }
    total
}

/// Reads `alive N` lines until N passed `past`; the last N.
fn alive_past(out: &mut impl BufRead, past: u64) -> u64 {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the program stopped printing");
        let n: u64 = line.trim().strip_prefix("alive ").and_then(|n| n.parse().ok()).expect("an alive line");
        if n > past {
            return n;
        }
    }
}

/// The descriptors open in process `pid`, with what they point to.
fn fds_of(pid: i32) -> Vec<(i32, String)> {
    let mut fds = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_default();
        fds.push((n, target));
    }
    fds
}

#[test]
fn killing_textpoke_finishes_the_trace_and_the_program_runs_on() {
    let prog = compile("chatty", CHATTY_C, &[SITES]);
    let sockets = socket_dir("front");
    let dir = fresh("front.data");
    let mut cli = textpoke(&sockets)
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&prog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(cli.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap_or_else(|_| panic!("pid line {line:?}"));
    let _program = KillOnDrop(pid);
    let sock = sockets.join(format!("{pid}.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the agent made no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_growth(&sockets, pid);
    // Nothing was passed to the program to watch textpoke by (the agent's
    // pidfd is its own, high): no pipe, socket or pidfd sits at the
    // program's low numbers but stdin, stdout and stderr (the recorder's
    // trace files may).
    let fds = fds_of(pid);
    assert!(fds.iter().all(|(n, t)| *n <= 2 || *n >= 10 || t.starts_with('/')), "{fds:?}");

    // SAFETY: killing the textpoke process this test started.
    unsafe { libc::kill(cli.id() as i32, libc::SIGKILL) };
    let status = cli.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let killed_at = alive_past(&mut out, 0);

    // The agent finishes the trace: it becomes complete...
    let deadline = Instant::now() + Duration::from_secs(10);
    let trace = loop {
        match Trace::open(&dir) {
            Ok(t) if t.is_complete() => break t,
            _ => assert!(Instant::now() < deadline, "the trace was never finished after textpoke was killed"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(calls(&trace)["beat"] > 0);
    // ... and stops growing, while the program goes on printing.
    let size = tree_size(&dir);
    let later = alive_past(&mut out, killed_at + 2_000);
    assert!(later > killed_at);
    assert_eq!(tree_size(&dir), size, "the trace directory grows after the trace was finished");
    // Tracing is off (the sites unpatched) and stays so; ctl says why.
    assert_eq!(status_field(&sockets, pid, "state"), "stopped (textpoke record ended) (record mode)");
    assert_eq!(status_field(&sockets, pid, "sites"), "0 traced, 0 recorded inline");
    assert_eq!(status_field(&sockets, pid, "functions"), "0 traced of 2");
    let agent: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("agent.json")).unwrap()).unwrap();
    assert_eq!(agent["state"], "stopped (textpoke record ended)");
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the program still runs");
}

#[test]
fn a_program_started_after_textpoke_died_records_nothing() {
    let sockets = socket_dir("front-gone");
    let preloaded = |dir: &Path, front: String| {
        Command::new(threads_prog())
            .env("LD_PRELOAD", agent())
            .env("TEXTPOKE_DIR", dir)
            .env("TEXTPOKE_SOCKET_DIR", &sockets)
            .env("TEXTPOKE_RECORD_PID", front)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let dir = fresh("front-gone.data");
    let out = preloaded(&dir, format!("{}:0", gone.id()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("threads ok {}\n", 4 * 55));
    assert_eq!(text(&out.stderr), "");
    assert!(!dir.exists(), "nothing recorded");
    // This test process, alive, as the front: recorded.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start = stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(19).unwrap().to_owned();
    let dir = fresh("front-alive.data");
    let out = preloaded(&dir, format!("{}:{start}", std::process::id()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(calls(&open_complete(&dir))["fib"], 4 * 177);
}

// ---------------------------------------------------------------------------
// The control socket under load and abuse.

/// A raw connection to the agent of `pid`, with a generous read timeout.
fn raw_client(sockets: &Path, pid: i32) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(sockets.join(format!("{pid}.sock"))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn read_reply(r: &mut impl BufRead) -> textpoke_control::Reply {
    textpoke_control::Reply::read(r).unwrap()
}

/// The reply's error message, or a panic naming what came instead.
fn error_of(r: &textpoke_control::Reply) -> &str {
    r.error.as_deref().unwrap_or_else(|| panic!("an error reply, not {r:?}"))
}

/// `textpoke ctl PID status`, and how long it took.
fn timed_status(sockets: &Path, pid: i32) -> Duration {
    let t = Instant::now();
    let out = ctl(sockets, pid, &["status"]);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("state      recording"), "{}", text(&out.stdout));
    took
}

/// Ends the spin program and checks that its trace is complete.
fn end_spin(mut child: Child, dir: &Path) {
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    open_complete(dir);
}

/// Raises this process's soft descriptor limit to at least `n`.
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit of this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(lim.rlim_cur >= n, "this test needs {n} descriptors; the hard limit is {}", lim.rlim_max);
}

#[test]
fn ctl_answers_with_thousands_of_idle_connections_open() {
    const IDLE: usize = 2000;
    raise_nofile(IDLE as u64 + 256);
    let sockets = socket_dir("flood");
    let dir = fresh("flood.data");
    // The program runs with 256 descriptors: the agent serves at most a
    // 32nd of them (8) at once.
    let mut cmd = textpoke(&sockets);
    cmd.args(["record", "--no-libcall", "-o"]).arg(&dir).arg(spin_prog());
    // SAFETY: setrlimit is async-signal-safe; it runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        })
    };
    let (child, pid) = start_recording(cmd, &sockets);
    let idle: Vec<_> = (0..IDLE).map(|_| raw_client(&sockets, pid)).collect();
    let took = timed_status(&sockets, pid);
    eprintln!("ctl status with {IDLE} idle connections open: {took:?}");
    assert!(took < Duration::from_secs(2), "status took {took:?}");
    let mut first = BufReader::new(&idle[0]);
    assert!(error_of(&read_reply(&mut first)).contains("too many connections"), "the oldest idle one is closed");
    // Its sockets: the listener and the connections it serves.
    let sockets_held = fds_of(pid).iter().filter(|(_, t)| t.starts_with("socket:")).count();
    eprintln!("sockets the agent holds with RLIMIT_NOFILE 256: {sockets_held} (the listener and the connections)");
    assert!(sockets_held <= 1 + 8, "the agent holds {sockets_held} sockets with RLIMIT_NOFILE 256");
    // A raw client's round trip, for the record.
    let s = raw_client(&sockets, pid);
    let t = Instant::now();
    (&s).write_all(b"status\n").unwrap();
    assert_eq!(read_reply(&mut BufReader::new(&s)).get("state"), Some("recording"));
    eprintln!("one status round trip with {IDLE} idle connections open: {:?}", t.elapsed());
    drop(idle);
    end_spin(child, &dir);
}

#[test]
fn a_half_written_request_delays_no_other_client() {
    let sockets = socket_dir("half");
    let dir = fresh("half.data");
    let (child, pid) = start_spin(&sockets, &dir, &[]);
    let half = raw_client(&sockets, pid);
    (&half).write_all(b"stat").unwrap();
    let idle = raw_client(&sockets, pid);
    let took = timed_status(&sockets, pid);
    eprintln!("ctl status with a half-written request and an idle connection open: {took:?}");
    assert!(took < Duration::from_secs(2), "status waited {took:?} for the half-written request");
    // The half line is refused at its deadline; the idle connection has none.
    let e = read_reply(&mut BufReader::new(&half));
    assert!(error_of(&e).contains("no newline within 5 s"), "{e:?}");
    (&idle).write_all(b"status\n").unwrap();
    assert_eq!(read_reply(&mut BufReader::new(&idle)).get("state"), Some("recording"));
    end_spin(child, &dir);
}

#[test]
fn malformed_requests_get_error_replies() {
    let sockets = socket_dir("malformed");
    let dir = fresh("malformed.data");
    let (child, pid) = start_spin(&sockets, &dir, &[]);

    // Garbage, bad UTF-8, NUL, no glob, unknown: an error each, and the
    // connection goes on.
    let s = raw_client(&sockets, pid);
    (&s).write_all(b"\x00\x01\x02\xff\xfe binary\nenable \xff\xfe*\nenable \nfrobnicate\nstatus\n").unwrap();
    let mut r = BufReader::new(&s);
    for want in ["NUL byte", "not UTF-8 text", "`enable` needs a GLOB", "unknown request \"frobnicate\""] {
        let e = read_reply(&mut r);
        assert!(error_of(&e).contains(want), "{want}: {e:?}");
    }
    assert_eq!(read_reply(&mut r).get("state"), Some("recording"));

    // A 1 MB line: refused once it passes the limit, then closed.
    let s = raw_client(&sockets, pid);
    let writer = {
        let s = s.try_clone().unwrap();
        std::thread::spawn(move || (&s).write_all(&vec![b'x'; 1 << 20]).is_ok())
    };
    let e = read_reply(&mut BufReader::new(&s));
    assert!(error_of(&e).contains("request line too long (over 4096 bytes)"), "{e:?}");
    assert!(!writer.join().unwrap(), "the rest of the line is not read");

    // Binary garbage without a newline, then the end of the input.
    let s = raw_client(&sockets, pid);
    (&s).write_all(b"\xde\xad\xbe\xef\x00").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let e = read_reply(&mut BufReader::new(&s));
    assert!(error_of(&e).contains("ended in the middle of a request line"), "{e:?}");

    // Through ctl: an empty glob.
    let out = ctl(&sockets, pid, &["enable", ""]);
    refused(&out, 1, &["`enable` needs a GLOB"]);
    end_spin(child, &dir);
}

#[test]
fn sockets_of_dead_processes_are_removed_when_an_agent_starts() {
    let sockets = socket_dir("stale");
    let dead = || {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let sock = |pid: u32| sockets.join(format!("{pid}.sock"));
    let bind_and_leave = |p: &Path| drop(std::os::unix::net::UnixListener::bind(p).unwrap());
    let stale = sock(dead());
    bind_and_leave(&stale);
    let file = sock(dead());
    std::fs::write(&file, "not a socket").unwrap();
    let outside = fresh("stale-outside.sock");
    bind_and_leave(&outside);
    let link = sock(dead());
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let listening = sock(dead());
    let _listener = std::os::unix::net::UnixListener::bind(&listening).unwrap();
    let mut kept = vec![file, link, outside, listening];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let foreign = sock(dead());
        bind_and_leave(&foreign);
        let c = std::ffi::CString::new(foreign.to_str().unwrap()).unwrap();
        // SAFETY: chown of a file this test made.
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
        kept.push(foreign);
    }

    let dir = fresh("stale.data");
    let (child, _pid) = start_spin(&sockets, &dir, &[]);
    assert!(std::fs::symlink_metadata(&stale).is_err(), "{} is left behind", stale.display());
    for k in &kept {
        assert!(std::fs::symlink_metadata(k).is_ok(), "{} was removed", k.display());
    }
    end_spin(child, &dir);
}

/// Starts a thread calling `work` every 200 µs and prints its pid; then,
/// line by line on stdin: `fill` opens /dev/null until no descriptor is
/// left (prints `full N`), `free` closes them (prints `freed`), the end of
/// stdin ends it.
const FD_HOG_C: &str = r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile long sink;
static volatile int stop;
__attribute__((noinline)) long work(long x) { sink += x; return x; }
static void *spin(void *a) { while (!stop) { work(1); usleep(200); } return a; }
static void line(void) { char c; while (read(0, &c, 1) == 1 && c != '\n') {} }
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    printf("%d\n", (int)getpid());
    fflush(stdout);
    line();
    int fds[4096], n = 0;
    /* Twice: a descriptor the recorder's writer held during the first
       pass (a file being replaced) is taken in the second. */
    for (int pass = 0; pass < 2; pass++) {
        while (n < 4096 && (fds[n] = open("/dev/null", O_RDONLY)) >= 0) n++;
        usleep(200 * 1000);
    }
    printf("full %d\n", n);
    fflush(stdout);
    line();
    for (int i = 0; i < n; i++) close(fds[i]);
    printf("freed\n");
    fflush(stdout);
    line();
    stop = 1;
    pthread_join(t, NULL);
    return 0;
}
"#;

/// CPU time (user + system, clock ticks) of the thread of `pid` named
/// `name`.
fn thread_cpu(pid: i32, name: &str) -> u64 {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // Fields 14 and 15 (utime, stime); the first after the name is 3.
        return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    panic!("process {pid} has no thread {name}");
}

#[test]
fn a_program_out_of_descriptors_does_not_make_the_agent_spin() {
    let prog = compile("fd_hog", FD_HOG_C, &[SITES]);
    let sockets = socket_dir("fd-hog");
    let dir = fresh("fd-hog.data");
    let mut cmd = textpoke(&sockets);
    cmd.args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog);
    // SAFETY: setrlimit is async-signal-safe; it runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        })
    };
    let (mut child, pid) = start_recording(cmd, &sockets);
    wait_growth(&sockets, pid);
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    stdin.write_all(b"fill\n").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("full "), "{line:?}");
    // Clients while the table is full: the agent cannot accept them, and
    // must not spin on the listener that stays readable. (Two, each saying
    // all it has to say: should the program's table have one descriptor
    // free after all, the other still waits.)
    let clients: Vec<_> = (0..2).map(|_| raw_client(&sockets, pid)).collect();
    for c in &clients {
        (&*c).write_all(b"status\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let cpu = thread_cpu(pid, "textpoke-agent");
    std::thread::sleep(Duration::from_secs(1));
    let spent = thread_cpu(pid, "textpoke-agent") - cpu;
    eprintln!("agent thread CPU over 1 s with a client waiting and no descriptor free: {spent} ticks");
    assert!(spent < 30, "the agent thread spent {spent} ticks of 1 s waiting for a descriptor");
    // Descriptors free again: the client is served.
    stdin.write_all(b"free\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "freed\n");
    for c in &clients {
        assert_eq!(read_reply(&mut BufReader::new(c)).get("state"), Some("recording"));
    }
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Starts a thread calling `work` every 200 µs, prints its pid, waits for
/// a line on stdin, then stops the thread and calls `_exit(0)`.
const EXIT_LATER_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile long sink;
static volatile int stop;
__attribute__((noinline)) long work(long x) { sink += x; return x; }
static void *spin(void *a) { while (!stop) { work(1); usleep(200); } return a; }
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, spin, NULL);
    printf("%d\n", (int)getpid());
    fflush(stdout);
    char buf[16];
    if (read(0, buf, sizeof buf) < 0) return 1;
    stop = 1;
    pthread_join(t, NULL);
    _exit(0);
}
"#;

/// A connection that sends half a line and trickles a byte every 100 ms
/// (until it is closed or told to stop), then an idle one.
fn pester(sockets: &Path, pid: i32) -> (std::os::unix::net::UnixStream, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let trickler = raw_client(sockets, pid);
    let idle = raw_client(sockets, pid);
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) && (&trickler).write_all(b"s").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(200)); // both are connected
    (idle, stop)
}

#[test]
fn exit_and_stop_signals_are_not_held_up_by_clients() {
    use std::sync::atomic::Ordering;
    let prog = compile("exit_later", EXIT_LATER_C, &[SITES]);
    let sockets = socket_dir("exit-clients");

    // `_exit` while clients are connected: the agent thread finishes the
    // trace at once (it used to sit in a client's read while `_exit`
    // waited 5 s, then gave up: an incomplete trace).
    let dir = fresh("exit-clients.data");
    let mut cmd = textpoke(&sockets);
    cmd.args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog);
    let (mut child, pid) = start_recording(cmd, &sockets);
    wait_growth(&sockets, pid);
    let (_idle, stop) = pester(&sockets, pid);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    stop.store(true, Ordering::Relaxed);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("could not be finished at _exit"), "{stderr}");
    assert!(!stderr.contains("incomplete"), "{stderr}");
    assert!(calls(&open_complete(&dir))["work"] > 0);

    // SIGTERM while clients are connected: the program dies of it with a
    // complete trace (the agent thread stops the recorder first).
    let dir = fresh("term-clients.data");
    let mut cmd = textpoke(&sockets);
    cmd.args(["record", "--no-libcall", "-o"]).arg(&dir).arg(&prog);
    let (child, pid) = start_recording(cmd, &sockets);
    wait_growth(&sockets, pid);
    let (_idle, stop) = pester(&sockets, pid);
    // SAFETY: signalling the textpoke process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = run_until(child, Duration::from_secs(20), pid);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{}", text(&out.stderr));
    open_complete(&dir);
}

/// Waits for `child` (`textpoke record` of program `pid`) at most `limit`,
/// then kills the program and fails.
fn run_until(mut child: Child, limit: Duration, pid: i32) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // SAFETY: signalling the program this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = child.wait_with_output().unwrap();
            panic!("process {pid} did not end within {limit:?}: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

// ---------------------------------------------------------------------------
// The agent is harmless.

#[test]
fn agent_is_quiet_in_a_program_without_sites() {
    let dir = fresh("quiet.data");
    let sockets = socket_dir("quiet");
    let out = Command::new(plain_prog())
        .arg("x")
        .env("LD_PRELOAD", agent())
        .env("TEXTPOKE_DIR", &dir)
        .env("TEXTPOKE_SOCKET_DIR", &sockets)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(text(&out.stdout), "plain: x stdin=");
    assert_eq!(text(&out.stderr), "plain stderr\n");
    assert!(!dir.exists(), "nothing written");
    assert_eq!(std::fs::read_dir(&sockets).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------
// Bad input.

fn refused(out: &Output, code: i32, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} in {stderr}");
    }
}

#[test]
fn bad_programs_are_refused() {
    let s = socket_dir("bad");
    let out = run(textpoke(&s).args(["record", "--no-libcall", "--", "/nonexistent/prog"]));
    refused(&out, 127, &["textpoke record: /nonexistent/prog: no such file"]);
    let out = run(textpoke(&s).args(["record", "--no-libcall", "no-such-program-textpoke"]));
    refused(&out, 127, &["not found in PATH"]);
    let data = work_dir().join("not-executable");
    std::fs::write(&data, "x").unwrap();
    let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg(&data));
    refused(&out, 126, &["is not executable"]);
    let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg(work_dir()));
    refused(&out, 126, &["is a directory"]);
    let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg(plain_prog()));
    refused(
        &out,
        2,
        &[
            "has no patchable function entries",
            "-fpatchable-function-entry=5",
            "-pg -mfentry -mnop-mcount -mrecord-mcount",
            "#[textpoke::traced]",
        ],
    );
    let src = work_dir().join("static.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let static_prog = work_dir().join("static");
    let built = Command::new("gcc").args(["-static", SITES, "-o"]).arg(&static_prog).arg(&src).output().unwrap();
    if built.status.success() {
        let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg(&static_prog));
        refused(&out, 2, &["statically linked"]);
    } else {
        eprintln!("no static libc: the statically linked case is not checked");
    }
    // `list` only reads the file: not finding it is a plain failure (1),
    // not the shell's "command not found" (127) that `record` uses.
    let out = run(textpoke(&s).args(["list", "/nonexistent/prog"]));
    refused(&out, 1, &["No such file"]);
    let out = run(textpoke(&s).arg("list").arg(plain_prog()));
    refused(&out, 1, &["has no patchable function entries", "-fpatchable-function-entry=5"]);
}

#[test]
fn bad_filters_and_outputs_are_refused() {
    let s = socket_dir("badf");
    let out = run(textpoke(&s).args(["record", "--no-libcall", "-F", "wroker"]).arg(threads_prog()));
    refused(&out, 2, &["-F \"wroker\" matches no traceable function; did you mean: worker"]);
    let out = run(textpoke(&s).args(["record", "--no-libcall", "-N", "fibb"]).arg(threads_prog()));
    refused(&out, 2, &["-N \"fibb\" matches no traceable function; did you mean: fib"]);
    let out = run(textpoke(&s).args(["record", "--no-libcall", "-F", "zzzzqqqq*"]).arg(threads_prog()));
    refused(&out, 2, &["-F \"zzzzqqqq*\" matches no traceable function (", "traceable functions; list them"]);
    let out = run(textpoke(&s).args(["record", "--no-libcall", "-F", "a[b"]).arg(threads_prog()));
    refused(&out, 2, &["bad glob"]);
    let busy = fresh("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("precious"), "x").unwrap();
    let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg("-o").arg(&busy).arg(threads_prog()));
    refused(&out, 2, &["is not empty and holds no textpoke trace"]);
    assert!(busy.join("precious").exists());
}

/// What `DIR.old` holds is removed only when it is an earlier trace: the
/// user's own directory there, or a link, is refused before the program
/// runs, and left as it was.
#[test]
fn dir_old_that_is_not_a_trace_is_refused_and_kept() {
    let s = socket_dir("dir-old");
    let dir = fresh("old-kept.data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("meta.json"), "{}").unwrap(); // an earlier trace, as far as the check sees
    let mut old = dir.clone().into_os_string();
    old.push(".old");
    let old = PathBuf::from(old);
    let _ = std::fs::remove_dir_all(&old);
    let _ = std::fs::remove_file(&old);
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("thesis.tex"), "keep").unwrap();
    let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg("-o").arg(&dir).arg(threads_prog()));
    refused(&out, 2, &["old-kept.data.old", "holds no textpoke trace, which textpoke does not remove"]);
    assert!(out.stdout.is_empty(), "the program did not run: {}", text(&out.stdout));
    assert_eq!(std::fs::read_to_string(old.join("thesis.tex")).unwrap(), "keep");
    assert!(dir.join("meta.json").exists());

    std::fs::remove_dir_all(&old).unwrap();
    let elsewhere = fresh("old-kept-elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &old).unwrap();
    let out = run(textpoke(&s).args(["record", "--no-libcall"]).arg("-o").arg(&dir).arg(threads_prog()));
    refused(&out, 2, &["it is a symbolic link, which textpoke does not remove"]);
    assert!(std::fs::symlink_metadata(&old).unwrap().file_type().is_symlink());
}

#[test]
fn ctl_refuses_what_is_not_an_agent() {
    let s = socket_dir("ctl-bad");
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id() as i32;
    // spawn returns before the child's exec: wait until it is `sleep`.
    let comm = format!("/proc/{pid}/comm");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = ctl(&s, pid, &["status"]);
    refused(&out, 1, &[&format!("process {pid} (sleep) is not running under `textpoke record`")]);
    let out = ctl(&s, 999_999_999, &["status"]);
    refused(&out, 1, &["no process 999999999"]);

    // A socket there that is not ours is refused before connecting.
    let sock = s.join(format!("{pid}.sock"));
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = ctl(&s, pid, &["status"]);
    refused(&out, 1, &["lets other users in"]);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(sock.to_str().unwrap()).unwrap();
        // SAFETY: chown of a file this test made.
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
        let out = ctl(&s, pid, &["status"]);
        refused(&out, 1, &["is owned by uid 65534, not by you (uid 0)"]);
    } else {
        eprintln!("not root: the foreign-owner case needs chown; checked the mode case only");
    }
    // A directory others may enter is refused too.
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = ctl(&s, pid, &["status"]);
    refused(&out, 1, &["is not a safe socket directory"]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// Waits until process `pid` maps a file whose path ends with `suffix`
/// (its exec and the loader are done).
fn wait_mapped(pid: i32, suffix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.lines().any(|l| l.ends_with(suffix)) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} never mapped {suffix}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn ctl_knows_the_agent_by_its_file_name() {
    let s = socket_dir("ctl-maps");
    // The agent loaded but idle (no sites): no socket, and ctl says so.
    let mut idle = Command::new(plain_prog())
        .env("LD_PRELOAD", agent())
        .env("TEXTPOKE_SOCKET_DIR", &s)
        .env("TEXTPOKE_DIR", fresh("ctl-maps.data"))
        .stdin(Stdio::piped()) // kept open: the program waits for a line
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = idle.id() as i32;
    wait_mapped(pid, "/libtextpoke_agent.so");
    let out = ctl(&s, pid, &["status"]);
    refused(&out, 1, &[&format!("process {pid} (plain) has the textpoke agent but no control socket")]);
    drop(idle.stdin.take());
    let _ = idle.wait();

    // A program whose mapped files' names merely contain the agent's (its
    // own executable here: a copy of the plain program) has no agent.
    let lookalike = work_dir().join("libtextpoke_agent.so.plain");
    std::fs::copy(plain_prog(), &lookalike).unwrap();
    let mut other = Command::new(&lookalike).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let pid = other.id() as i32;
    wait_mapped(pid, "/libtextpoke_agent.so.plain");
    let out = ctl(&s, pid, &["status"]);
    refused(&out, 1, &[&format!("process {pid} (libtextpoke_age) is not running under `textpoke record`")]);
    drop(other.stdin.take());
    let _ = other.wait();
}

#[test]
fn list_shows_the_patchable_functions() {
    let out = run(textpoke(&socket_dir("list")).arg("list").arg(threads_prog()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut names: Vec<&str> = stdout.lines().map(|l| l.split_whitespace().last().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["fib", "handler", "leaf", "main", "on_sig_work", "worker"]);
    assert!(stdout.lines().all(|l| l.split_whitespace().nth(1) == Some("patchable")), "{stdout}");
    assert!(text(&out.stderr).contains("6 site(s) in 6 function(s)"), "{}", text(&out.stderr));
}
