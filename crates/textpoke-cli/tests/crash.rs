//! Crashes of a traced program (issue #10, defect 2): a fatal signal
//! (`SIGSEGV`, `SIGBUS`, `SIGFPE`, `SIGABRT`, a stack overflow) writes
//! the trace up to the crash, then kills the process as it would have,
//! with its core dump; programs that handle their signals keep doing so.
//! C programs compiled here with gcc, run with the agent preloaded (so
//! that the test sees the program's own wait status and core dump) or
//! through `textpoke record`; their traces read back with
//! `textpoke_record::tracedata::Trace` and the CLI's `--salvage`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use textpoke_record::format::SignalEnd;
use textpoke_record::tracedata::{OpenOptions, RecordKind, Trace};

// ---------------------------------------------------------------------------
// Helpers.

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-crash-{}", std::process::id()));
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

fn socket_dir(name: &str) -> PathBuf {
    let d = fresh(&format!("sock-{name}"));
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Compiles C source `src` into an executable `name` with gcc, with
/// patchable function entries.
fn compile(name: &str, src: &str) -> PathBuf {
    let dir = work_dir();
    let c = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&c, src).unwrap();
    let out = Command::new("gcc")
        .args(["-O1", "-pthread", "-fpatchable-function-entry=5", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .expect("gcc must be installed to build the test programs");
    assert!(out.status.success(), "gcc {name}: {}", text(&out.stderr));
    exe
}

/// The agent built with the binary under test.
fn agent() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_textpoke"));
    let p = bin.parent().unwrap().join("deps/libtextpoke_agent.so");
    assert!(p.is_file(), "{} is built with textpoke", p.display());
    p
}

/// Where the kernel writes the core of process `pid` started in `cwd`
/// (`/proc/sys/kernel/core_pattern` with `%p` and `%%`), if it is a file
/// this test can name; `None` for a pipe or other specifiers.
fn core_file(pid: u32, cwd: &Path) -> Option<PathBuf> {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").ok()?;
    let pattern = pattern.trim_end();
    if pattern.is_empty() || pattern.starts_with('|') {
        return None;
    }
    let mut out = String::new();
    let mut chars = pattern.chars();
    let mut has_pid = false;
    while let Some(c) = chars.next() {
        match (c, c == '%') {
            (_, true) => match chars.next() {
                Some('p') => {
                    out.push_str(&pid.to_string());
                    has_pid = true;
                }
                Some('%') => out.push('%'),
                _ => return None,
            },
            (c, false) => out.push(c),
        }
    }
    let uses_pid = std::fs::read_to_string("/proc/sys/kernel/core_uses_pid").is_ok_and(|v| v.trim() == "1");
    if uses_pid && !has_pid {
        out.push_str(&format!(".{pid}"));
    }
    Some(cwd.join(out))
}

/// Whether this machine writes core dumps at all (a pattern is set).
fn cores_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/core_pattern").is_ok_and(|p| !p.trim().is_empty())
}

/// Lets the child dump core: `RLIMIT_CORE` unlimited.
fn allow_core(cmd: &mut Command) {
    // SAFETY: setrlimit is async-signal-safe; it runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
            if libc::setrlimit(libc::RLIMIT_CORE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a run left: its status, output, pid, and its trace directory.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    dir: PathBuf,
}

/// Runs `prog args` with the agent preloaded (as `textpoke record` runs
/// it), writing `name.data`, allowed to dump core; the core file is
/// removed.
fn run_preloaded(name: &str, prog: &Path, args: &[&str]) -> Run {
    run_preloaded_with(name, prog, args, false)
}

/// As [`run_preloaded`]; `libcalls`: library calls traced too (off above,
/// where the tests compare exact lists of the program's own functions).
fn run_preloaded_with(name: &str, prog: &Path, args: &[&str], libcalls: bool) -> Run {
    let dir = fresh(&format!("{name}.data"));
    let cwd = fresh(&format!("{name}.cwd"));
    std::fs::create_dir(&cwd).unwrap();
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .current_dir(&cwd)
        .env("LD_PRELOAD", agent())
        .env("TEXTPOKE_DIR", &dir)
        .env("TEXTPOKE_SOCKET_DIR", socket_dir(name))
        .env_remove("TEXTPOKE_PID")
        .env_remove("TEXTPOKE_RECORD_PID")
        .env("TEXTPOKE_NO_LIBCALL", if libcalls { "0" } else { "1" })
        .stdin(Stdio::null());
    allow_core(&mut cmd);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out: Output = child.wait_with_output().unwrap();
    if let Some(core) = core_file(pid, &cwd) {
        let _ = std::fs::remove_file(core);
    }
    let _ = std::fs::remove_dir_all(&cwd);
    Run { status: out.status, stdout: text(&out.stdout), stderr: text(&out.stderr), dir }
}

/// The process died of `sig`, with a core dump when this machine writes
/// them.
fn assert_died_of(r: &Run, sig: i32) {
    assert_eq!(r.status.signal(), Some(sig), "the program dies of signal {sig}: {:?}\n{}", r.status, r.stderr);
    if cores_enabled() {
        assert!(r.status.core_dumped(), "a core dump, as without textpoke: {:?}\n{}", r.status, r.stderr);
    }
}

fn salvage(dir: &Path) -> Trace {
    let t = Trace::open_with(dir, OpenOptions { allow_incomplete: true })
        .unwrap_or_else(|e| panic!("salvaging {}: {e}", dir.display()));
    assert!(!t.is_complete(), "the process died: no final flush");
    assert!(
        t.salvage_notes().is_empty(),
        "the crash flush leaves metadata and files that agree: {:?}",
        t.salvage_notes()
    );
    t
}

/// A thread's records as (function, kind).
fn records(t: &Trace, tid: i32) -> Vec<(String, RecordKind)> {
    let th = t.threads().iter().find(|x| x.tid() == tid).unwrap_or_else(|| panic!("thread {tid} is in the trace"));
    t.records(th).unwrap().map(|r| r.unwrap()).map(|r| (t.name(r.func).to_string(), r.kind)).collect()
}

/// Entries per function on a thread.
fn entries(recs: &[(String, RecordKind)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (f, k) in recs {
        assert!(!matches!(k, RecordKind::Gap), "no event lost");
        if *k == RecordKind::Entry {
            *m.entry(f.clone()).or_insert(0) += 1;
        }
    }
    m
}

fn ended_by(t: &Trace) -> SignalEnd {
    t.meta().ended_by.clone().expect("the metadata says which signal ended the recording")
}

/// The number after `key ` in the program's output (`crasher 1234`).
fn number_after(out: &str, key: &str) -> i64 {
    let rest = &out[out.find(key).unwrap_or_else(|| panic!("{key:?} in {out:?}")) + key.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn textpoke(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_textpoke")).args(args).arg("-i").arg(dir).stdin(Stdio::null()).output().unwrap()
}

// ---------------------------------------------------------------------------
// Programs.

/// Three threads call `mid` (which calls `leaf`) until the end; a fourth
/// calls `mid` 1000 times, says its tid on stderr and writes through a
/// null pointer in `crash_here`.
const THREADS_SEGV_C: &str = r#"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
#define NOI __attribute__((noinline))
static volatile long sink;
NOI long leaf(long x) { sink += x; return x + 1; }
NOI long mid(long x) { return leaf(x) + 1; }
NOI void crash_here(int *p) { int *volatile q = p; *q = 42; }
NOI void *spinner(void *a) { (void)a; for (;;) mid(1); return 0; }
NOI void *crasher(void *a) {
    (void)a;
    for (int i = 0; i < 1000; i++) mid(i);
    char b[64];
    int n = snprintf(b, sizeof b, "crasher %ld\n", (long)syscall(SYS_gettid));
    write(2, b, n);
    crash_here(0);
    return 0;
}
int main(void) {
    pthread_t t[4];
    for (int i = 0; i < 3; i++) pthread_create(&t[i], 0, spinner, 0);
    usleep(50 * 1000);
    pthread_create(&t[3], 0, crasher, 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    return 0;
}
"#;

/// A SIGSEGV on one of several threads, the others busy recording: the
/// process dies of it with a core dump; the salvaged trace's last event
/// on that thread is `crash_here`'s entry, every event before it is
/// there, the metadata names the signal and the thread, and `report` and
/// `replay --salvage` show the crash and say no event was lost.
#[test]
fn sigsegv_on_one_of_several_threads_leaves_the_trace_up_to_the_crash() {
    let prog = compile("threads_segv", THREADS_SEGV_C);
    let r = run_preloaded("threads_segv", &prog, &[]);
    assert_died_of(&r, libc::SIGSEGV);
    let crasher = number_after(&r.stderr, "crasher ") as i32;
    let t = salvage(&r.dir);
    let end = ended_by(&t);
    assert_eq!(
        (end.signal, end.name.as_str(), end.tid, end.code, end.addr),
        (libc::SIGSEGV, "SIGSEGV", crasher, 1, Some(0))
    );
    let recs = records(&t, crasher);
    assert_eq!(recs.last(), Some(&("crash_here".to_string(), RecordKind::Entry)), "the crashing thread's last event");
    let e = entries(&recs);
    assert_eq!((e["mid"], e["leaf"], e["crash_here"]), (1000, 1000, 1));
    assert_eq!(t.threads().len(), 5, "main, three spinners and the crasher");
    for th in t.threads() {
        assert_eq!(th.dropped(), 0, "thread {}: no event lost", th.tid());
        if th.tid() != crasher && th.tid() != t.meta().pid {
            let e = entries(&records(&t, th.tid()));
            assert!(e["mid"] > 0 && e["leaf"] >= e["mid"] - 1, "a spinner recorded: {e:?}");
        }
    }
    let counts: BTreeMap<&str, u64> = t.counts().iter().map(|&(f, n)| (t.name(f), n)).collect();
    assert_eq!(counts["crash_here"], 1, "exact counts up to the crash");

    let report = textpoke(&["report", "--salvage"], &r.dir);
    let (out, err) = (text(&report.stdout), text(&report.stderr));
    assert!(report.status.success(), "{err}");
    assert!(out.contains("crash_here"), "{out}");
    assert!(out.contains(&format!("incomplete trace (salvaged: SIGSEGV on thread {crasher})")), "{out}");
    assert!(
        out.contains(&format!(
            "# the recording ended with SIGSEGV (address not mapped, at 0x0) on thread {crasher}, which crashed the process; events lost: none"
        )),
        "{out}"
    );
    assert!(err.contains("everything recorded up to then was written; events lost: none"), "{err}");
    let replay = textpoke(&["replay", "--salvage", "--tid", &crasher.to_string()], &r.dir);
    let out = text(&replay.stdout);
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    let tail: Vec<&str> = out.lines().rev().take(6).collect();
    assert!(tail.iter().any(|l| l.contains("crash_here();") && l.contains('>')), "the open call: {tail:?}");
    assert!(
        out.contains(&format!(
            "# the recording ends here: SIGSEGV (address not mapped, at 0x0) on thread {crasher} crashed"
        )),
        "{out}"
    );
    // Without --salvage the trace is refused, and says how to read it.
    let refused = textpoke(&["report"], &r.dir);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("--salvage"), "{}", text(&refused.stderr));
}

/// `work` 100 times, then per argv[1]: `abort` calls abort() in
/// `fail_here`; `assert` fails an assert() there; `handled` first installs
/// a SIGABRT handler that calls `on_abort` and returns (abort() then kills
/// the process behind it); `fpe` divides by zero in `divide`; `bus`
/// touches a mapping past the end of an empty file in `touch_mapping`;
/// `deep` recurses in `deep` until the stack overflows.
const FAULTS_C: &str = r#"
#include <assert.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#define NOI __attribute__((noinline))
static volatile long sink;
NOI long work(long x) { sink += x; return x; }
NOI void fail_here(int how) { if (how) assert(how == 0); abort(); }
NOI void on_abort(int s) { sink += s; }
static void handler(int s) { on_abort(s); }
NOI int divide(int a, int b) { return a / b; }
NOI void touch_mapping(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    volatile char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    p[0] = 1;
}
NOI long deep(long n) { char b[512]; memset(b, (int)n, sizeof b); sink += b[n % 512]; return deep(n + 1) + b[7]; }
int main(int argc, char **argv) {
    for (int i = 0; i < 100; i++) work(i);
    const char *m = argv[1];
    if (!strcmp(m, "abort")) fail_here(0);
    if (!strcmp(m, "assert")) fail_here(1);
    if (!strcmp(m, "handled")) { signal(SIGABRT, handler); fail_here(0); }
    if (!strcmp(m, "fpe")) printf("%d\n", divide(1, argc - 2));
    if (!strcmp(m, "bus")) touch_mapping(argv[2]);
    if (!strcmp(m, "deep")) printf("%ld\n", deep(0));
    return 0;
}
"#;

/// The main thread's records, after the 100 calls of `work`.
fn after_work(t: &Trace) -> Vec<(String, RecordKind)> {
    let recs = records(t, t.meta().pid);
    assert_eq!(entries(&recs)["work"], 100);
    recs.into_iter().filter(|(f, _)| f != "work" && f != "main").collect()
}

/// abort() and a failed assert(): the process dies of SIGABRT with its
/// core dump, after one flush; the trace ends at `fail_here`'s entry. A
/// SIGABRT handler that returns still runs (abort() then kills the
/// process behind it): the trace has its calls too.
#[test]
fn abort_and_assert_are_flushed_once_and_kill_with_sigabrt() {
    let prog = compile("faults-abort", FAULTS_C);
    for mode in ["abort", "assert"] {
        let r = run_preloaded(&format!("abort-{mode}"), &prog, &[mode]);
        assert_died_of(&r, libc::SIGABRT);
        let t = salvage(&r.dir);
        let end = ended_by(&t);
        assert_eq!(
            (end.signal, end.tid, end.code, end.sender_pid),
            (libc::SIGABRT, t.meta().pid, libc::SI_TKILL, Some(t.meta().pid))
        );
        assert_eq!(after_work(&t), [("fail_here".to_string(), RecordKind::Entry)], "{mode}");
        if mode == "assert" {
            assert!(r.stderr.contains("Assertion `how == 0' failed"), "{}", r.stderr);
        }
        let report = text(&textpoke(&["report", "--salvage"], &r.dir).stdout);
        assert!(report.contains("SIGABRT (abort(), a failed assert() or raise())"), "{report}");
    }
    let r = run_preloaded("abort-handled", &prog, &["handled"]);
    assert_died_of(&r, libc::SIGABRT);
    let t = salvage(&r.dir);
    assert_eq!(ended_by(&t).signal, libc::SIGABRT);
    assert_eq!(
        after_work(&t),
        [
            ("fail_here".to_string(), RecordKind::Entry),
            ("handler".to_string(), RecordKind::Entry),
            ("on_abort".to_string(), RecordKind::Entry),
            ("on_abort".to_string(), RecordKind::Exit),
            ("handler".to_string(), RecordKind::Exit),
        ],
        "the program's handler ran, then the trace was flushed"
    );
}

/// SIGFPE and SIGBUS from the kernel, and a stack overflow (SIGSEGV on
/// the alternate stack the agent gives recording threads): each kills
/// the process with its core dump, and the trace ends at the entry of the
/// function that faulted.
#[test]
fn sigfpe_sigbus_and_stack_overflow_are_flushed() {
    let prog = compile("faults-kernel", FAULTS_C);
    let r = run_preloaded("fpe", &prog, &["fpe"]);
    assert_died_of(&r, libc::SIGFPE);
    let t = salvage(&r.dir);
    let end = ended_by(&t);
    assert_eq!((end.signal, end.name.as_str(), end.code), (libc::SIGFPE, "SIGFPE", 1), "FPE_INTDIV");
    assert!(end.addr.is_some_and(|a| a != 0), "the faulting instruction's address: {end:?}");
    assert_eq!(after_work(&t), [("divide".to_string(), RecordKind::Entry)]);

    let file = fresh("bus.file");
    let r = run_preloaded("bus", &prog, &["bus", file.to_str().unwrap()]);
    assert_died_of(&r, libc::SIGBUS);
    let t = salvage(&r.dir);
    let end = ended_by(&t);
    assert_eq!((end.signal, end.name.as_str(), end.code), (libc::SIGBUS, "SIGBUS", 2), "BUS_ADRERR");
    assert_eq!(after_work(&t), [("touch_mapping".to_string(), RecordKind::Entry)]);
    let _ = std::fs::remove_file(file);

    let r = run_preloaded("deep", &prog, &["deep"]);
    assert_died_of(&r, libc::SIGSEGV);
    let t = salvage(&r.dir);
    assert_eq!(ended_by(&t).signal, libc::SIGSEGV);
    let rest = after_work(&t);
    assert!(rest.len() > 1000, "thousands of frames: {}", rest.len());
    assert!(rest.iter().all(|r| *r == ("deep".to_string(), RecordKind::Entry)), "entries of deep only");
    assert_eq!(
        entries(&records(&t, t.meta().pid))["deep"],
        t.counts().iter().find(|c| t.name(c.0) == "deep").unwrap().1
    );
}

/// A program that handles its own faults. `recover`: 200 times, a page
/// is made inaccessible and touched in `touch_page`; the SIGSEGV handler
/// (SA_SIGINFO) checks the siginfo (the address, SEGV_ACCERR) and the
/// ucontext (RIP inside `touch_page`), calls `fix_page`, which makes the
/// page writable, and returns; then 50 times `illegal` executes ud2 and
/// the SIGILL handler skips it by moving RIP in the ucontext. It prints
/// what it saw and exits 0. `then-crash`: the same, then SIG_DFL again
/// and a write through a null pointer in `crash_here`. `reraise`: a handler that calls
/// `on_segv`, restores SIG_DFL and raises the signal again; `resethand`:
/// an SA_RESETHAND handler that calls `on_segv` and returns (the fault
/// happens again, now with the default action).
const HANDLERS_C: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <sys/mman.h>
#define NOI __attribute__((noinline))
static volatile long sink;
static char *page;
static int faults, bad_info, bad_context, ills;
NOI void touch_page(void) { page[1] = 7; sink += page[1]; }
NOI void fix_page(void) { mprotect(page, 4096, PROT_READ | PROT_WRITE); }
NOI void illegal(void) { __asm__ volatile("ud2"); sink++; }
NOI void crash_here(int *p) { int *volatile q = p; *q = 42; }
NOI void on_segv(int s) { sink += s; }
static void recover(int s, siginfo_t *si, void *ctx) {
    (void)s;
    ucontext_t *uc = ctx;
    uintptr_t rip = uc->uc_mcontext.gregs[REG_RIP];
    faults++;
    if (si->si_addr != page + 1 || si->si_code != SEGV_ACCERR) bad_info++;
    if (rip < (uintptr_t)touch_page || rip > (uintptr_t)touch_page + 64) bad_context++;
    fix_page();
}
static void skip_ud2(int s, siginfo_t *si, void *ctx) {
    (void)s; (void)si;
    ((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP] += 2;
    ills++;
}
static void reraise(int s) { on_segv(s); signal(s, SIG_DFL); raise(s); }
static void once(int s) { on_segv(s); }
int main(int argc, char **argv) {
    const char *m = argv[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    if (!strcmp(m, "reraise")) { signal(SIGSEGV, reraise); crash_here(0); }
    if (!strcmp(m, "resethand")) {
        sa.sa_handler = once;
        sa.sa_flags = SA_RESETHAND;
        sigaction(SIGSEGV, &sa, 0);
        crash_here(0);
    }
    page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    sa.sa_sigaction = recover;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, 0);
    sa.sa_sigaction = skip_ud2;
    sigaction(SIGILL, &sa, 0);
    struct sigaction back;
    sigaction(SIGSEGV, 0, &back);
    int same = back.sa_sigaction == recover && (back.sa_flags & SA_SIGINFO);
    for (int i = 0; i < 200; i++) { mprotect(page, 4096, PROT_NONE); touch_page(); }
    for (int i = 0; i < 50; i++) illegal();
    printf("faults %d bad_info %d bad_context %d ills %d same %d\n", faults, bad_info, bad_context, ills, same);
    fflush(stdout);
    if (argc > 2) { signal(SIGSEGV, SIG_DFL); crash_here(0); }
    return 0;
}
"#;

/// Handlers that recover keep working, with the kernel's siginfo and
/// ucontext (a change to RIP included), and cost no flush: a process
/// that recovered 250 times and then crashes for real has its trace
/// flushed at the real crash (a flush is once per crash: one at a fault
/// the program recovered from would have ended the trace there).
#[test]
fn handlers_that_recover_run_as_before_and_cost_no_flush() {
    let prog = compile("handlers-recover", HANDLERS_C);
    let r = run_preloaded("recover", &prog, &["recover"]);
    assert!(r.status.success(), "{:?}\n{}", r.status, r.stderr);
    assert_eq!(r.stdout.trim(), "faults 200 bad_info 0 bad_context 0 ills 50 same 1", "{}", r.stderr);
    let t = Trace::open(&r.dir).unwrap();
    assert!(t.meta().ended_by.is_none(), "no fatal signal ended it");
    let counts: BTreeMap<&str, u64> = t.counts().iter().map(|&(f, n)| (t.name(f), n)).collect();
    assert_eq!((counts["touch_page"], counts["fix_page"], counts["illegal"]), (200, 200, 50));

    let r = run_preloaded("recover-then-crash", &prog, &["recover", "then-crash"]);
    assert_died_of(&r, libc::SIGSEGV);
    assert!(r.stdout.starts_with("faults 200 bad_info 0 bad_context 0 ills 50"), "{}", r.stdout);
    let t = salvage(&r.dir);
    let end = ended_by(&t);
    assert_eq!((end.signal, end.code, end.addr), (libc::SIGSEGV, 1, Some(0)), "the real crash, not a recovered fault");
    let recs = records(&t, t.meta().pid);
    assert_eq!(recs.last(), Some(&("crash_here".to_string(), RecordKind::Entry)));
    let e = entries(&recs);
    assert_eq!((e["touch_page"], e["fix_page"], e["illegal"]), (200, 200, 50));
}

/// A program's own SIGSEGV handler that re-raises after restoring
/// SIG_DFL, and an SA_RESETHAND one that returns into the fault again:
/// the handler runs, then the process dies of SIGSEGV with its core dump,
/// the trace flushed with the handler's calls after the crash site.
#[test]
fn handlers_that_reraise_run_then_the_trace_is_flushed() {
    let prog = compile("handlers-reraise", HANDLERS_C);
    for (mode, handler) in [("reraise", "reraise"), ("resethand", "once")] {
        let r = run_preloaded(&format!("handler-{mode}"), &prog, &[mode]);
        assert_died_of(&r, libc::SIGSEGV);
        let t = salvage(&r.dir);
        assert_eq!(ended_by(&t).signal, libc::SIGSEGV);
        let recs: Vec<(String, RecordKind)> =
            records(&t, t.meta().pid).into_iter().filter(|(f, _)| f != "main").collect();
        let ev = |f: &str, k| (f.to_string(), k);
        assert_eq!(
            recs,
            [
                ev("crash_here", RecordKind::Entry),
                ev(handler, RecordKind::Entry),
                ev("on_segv", RecordKind::Entry),
                ev("on_segv", RecordKind::Exit),
                ev(handler, RecordKind::Exit),
            ],
            "{mode}: the crash site, then the program's handler"
        );
    }
}

/// The same with library calls traced: the program's `signal` and
/// `raise`, called through thunks, still reach the agent's interposed
/// `signal` (a lazily bound slot is resolved as the loader would bind it:
/// to the preloaded unversioned definition, not libc's versioned one), so
/// the crash is flushed and says which signal ended the recording; the
/// program's own functions are recorded as without library calls.
#[test]
fn handlers_that_reraise_through_traced_library_calls() {
    let prog = compile("handlers-reraise-libcall", HANDLERS_C);
    let r = run_preloaded_with("handler-reraise-libcall", &prog, &["reraise"], true);
    assert_died_of(&r, libc::SIGSEGV);
    let t = salvage(&r.dir);
    assert_eq!(ended_by(&t).signal, libc::SIGSEGV);
    let recs = records(&t, t.meta().pid);
    let names: Vec<&str> = recs.iter().map(|(f, _)| f.as_str()).collect();
    assert!(names.contains(&"signal") && names.contains(&"raise"), "library calls recorded: {names:?}");
    let own: Vec<(String, RecordKind)> =
        recs.iter().filter(|(f, _)| ["crash_here", "reraise", "on_segv"].contains(&f.as_str())).cloned().collect();
    let ev = |f: &str, k| (f.to_string(), k);
    assert_eq!(
        own,
        [
            ev("crash_here", RecordKind::Entry),
            ev("reraise", RecordKind::Entry),
            ev("on_segv", RecordKind::Entry),
            ev("on_segv", RecordKind::Exit),
            ev("reraise", RecordKind::Exit),
        ]
    );
}

/// A burst: 200,000 calls (400,000 events, 3 MB, two dozen segments) and
/// at once a crash, through `textpoke record`: whatever the writer had not
/// drained is written at the crash, nothing is lost, and the summary says
/// which signal ended the recording; `textpoke` dies of it as the program
/// did.
const BURST_C: &str = r#"
#define NOI __attribute__((noinline))
static volatile long sink;
NOI long leaf(long x) { sink += x; return x + 1; }
NOI void crash_here(int *p) { int *volatile q = p; *q = 42; }
int main(void) {
    for (long i = 0; i < 200000; i++) leaf(i);
    crash_here(0);
    return 0;
}
"#;

#[test]
fn a_burst_just_before_the_crash_is_kept() {
    let prog = compile("burst", BURST_C);
    let dir = fresh("burst.data");
    let out = Command::new(env!("CARGO_BIN_EXE_textpoke"))
        .env("TEXTPOKE_SOCKET_DIR", socket_dir("burst"))
        .args(["record", "--no-libcall", "-o"])
        .arg(&dir)
        .arg(&prog)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "textpoke dies of the program's signal: {stderr}");
    assert!(stderr.contains("(incomplete: SIGSEGV (address not mapped, at 0x0) on thread"), "{stderr}");
    let t = salvage(&dir);
    // However far the writer got (it drains a segment as it fills, and
    // keeps what it took in its own buffer a while), the rest was written
    // at the crash: nothing is missing.
    let end = ended_by(&t);
    assert!(end.flushed_events <= 400_002, "{end:?}");
    let recs = records(&t, t.meta().pid);
    assert_eq!(recs.last(), Some(&("crash_here".to_string(), RecordKind::Entry)));
    assert_eq!(entries(&recs)["leaf"], 200_000);
    assert_eq!(t.dropped(), 0);
}

/// The program's own allocator takes a lock (as glibc's takes its
/// arena's) and crashes while holding it — heap corruption found inside
/// malloc. The crash flush allocates nothing, so it is not held up by
/// that lock: the trace ends at `corrupt`'s entry, inside malloc.
const MALLOC_C: &str = r#"
#include <pthread.h>
#include <stddef.h>
#include <string.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);
static pthread_mutex_t heap = PTHREAD_MUTEX_INITIALIZER;
static volatile int corrupted;
#define NOI __attribute__((noinline))
#define NOTRACE __attribute__((patchable_function_entry(0, 0)))
NOI void corrupt(int *p) { int *volatile q = p; *q = 1; }
NOTRACE void *malloc(size_t n) {
    pthread_mutex_lock(&heap);
    if (corrupted) corrupt(0);
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
NOTRACE int posix_memalign(void **r, size_t a, size_t n) { void *p = memalign(a, n); if (!p) return 12; *r = p; return 0; }
static volatile long sink;
NOI long work(long x) { sink += x; return x; }
int main(void) {
    for (int i = 0; i < 100; i++) { work(i); free(malloc(32)); }
    corrupted = 1;
    void *volatile p = malloc(64);
    return p != 0;
}
"#;

#[test]
fn a_crash_inside_malloc_with_its_lock_held_is_flushed() {
    let prog = compile("malloc_crash", MALLOC_C);
    let r = run_preloaded("malloc_crash", &prog, &[]);
    assert_died_of(&r, libc::SIGSEGV);
    let t = salvage(&r.dir);
    assert_eq!(ended_by(&t).signal, libc::SIGSEGV);
    let recs = records(&t, t.meta().pid);
    assert_eq!(recs.last(), Some(&("corrupt".to_string(), RecordKind::Entry)));
    assert_eq!(entries(&recs)["work"], 100);
}

/// Four threads crash at once, and the main thread records meanwhile;
/// `argv[1]` `wait` instead prints the pid and waits (for a `SIGABRT`
/// sent from outside), recording on another thread.
const MANY_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#define NOI __attribute__((noinline))
static volatile long sink;
static pthread_barrier_t go;
NOI long leaf(long x) { sink += x; return x + 1; }
NOI void crash_here(int *p) { int *volatile q = p; *q = 42; }
NOI void *crasher(void *a) {
    (void)a;
    for (int i = 0; i < 100; i++) leaf(i);
    pthread_barrier_wait(&go);
    crash_here(0);
    return 0;
}
NOI void *busy(void *a) { (void)a; for (;;) { leaf(1); usleep(100); } return 0; }
int main(int argc, char **argv) {
    pthread_t t[4];
    if (argc > 1 && !strcmp(argv[1], "wait")) {
        pthread_create(&t[0], 0, busy, 0);
        for (int i = 0; i < 10; i++) leaf(i);
        printf("%d\n", (int)getpid());
        fflush(stdout);
        for (;;) pause();
    }
    pthread_barrier_init(&go, 0, 4);
    for (int i = 0; i < 4; i++) pthread_create(&t[i], 0, crasher, 0);
    for (;;) leaf(2);
}
"#;

/// Four threads crash at the same moment: one flush (by the first), no
/// deadlock between them, the process dies of SIGSEGV with its core, and
/// the thread the metadata names ends at `crash_here`'s entry.
#[test]
fn threads_crashing_at_once_flush_once_and_die() {
    let prog = compile("many-at-once", MANY_C);
    for round in 0..3 {
        let r = run_preloaded(&format!("many-{round}"), &prog, &[]);
        assert_died_of(&r, libc::SIGSEGV);
        let t = salvage(&r.dir);
        let end = ended_by(&t);
        assert_eq!((end.signal, end.addr), (libc::SIGSEGV, Some(0)));
        let recs = records(&t, end.tid);
        assert_eq!(recs.last(), Some(&("crash_here".to_string(), RecordKind::Entry)), "round {round}");
        assert_eq!(entries(&recs)["leaf"], 100);
    }
}

/// A SIGABRT sent by another process (here: the test) while the program
/// waits: whichever thread the kernel picks (a program thread, the
/// agent's, the recorder's writer) flushes, and the process dies of it.
#[test]
fn a_fatal_signal_sent_from_outside_is_flushed() {
    let prog = compile("many-sent", MANY_C);
    let dir = fresh("sent.data");
    let cwd = fresh("sent.cwd");
    std::fs::create_dir(&cwd).unwrap();
    let mut cmd = Command::new(&prog);
    cmd.arg("wait")
        .current_dir(&cwd)
        .env("LD_PRELOAD", agent())
        .env("TEXTPOKE_DIR", &dir)
        .env("TEXTPOKE_SOCKET_DIR", socket_dir("sent"))
        .env_remove("TEXTPOKE_PID")
        .env_remove("TEXTPOKE_RECORD_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    allow_core(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: signalling the program this test started.
    unsafe { libc::kill(pid, libc::SIGABRT) };
    let out = child.wait_with_output().unwrap();
    if let Some(core) = core_file(pid as u32, &cwd) {
        let _ = std::fs::remove_file(core);
    }
    let _ = std::fs::remove_dir_all(&cwd);
    let r = Run { status: out.status, stdout: String::new(), stderr: text(&out.stderr), dir };
    assert_died_of(&r, libc::SIGABRT);
    let t = salvage(&r.dir);
    let end = ended_by(&t);
    assert_eq!((end.signal, end.code, end.sender_pid), (libc::SIGABRT, libc::SI_USER, Some(std::process::id() as i32)));
    assert_eq!(entries(&records(&t, pid))["leaf"], 10);
    let report = text(&textpoke(&["report", "--salvage"], &r.dir).stdout);
    assert!(report.contains(&format!("SIGABRT (sent by another process, pid {})", std::process::id())), "{report}");
}

/// A library with sites (`lib_work`, `lib_crash`), and a program without
/// any that installs its SIGSEGV handler (re-raising with SIG_DFL) first,
/// then loads the library: recording, and the agent's handler, start only
/// then, in front of the program's.
const LATE_LIB_C: &str = r#"
static volatile long sink;
__attribute__((noinline)) long lib_work(long x) { sink += x; return x; }
__attribute__((noinline)) void lib_crash(int *p) { int *volatile q = p; *q = 42; }
"#;

const LATE_MAIN_C: &str = r#"
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
static void on_segv(int s) { write(2, "on_segv ran\n", 12); signal(s, SIG_DFL); raise(s); }
int main(int argc, char **argv) {
    (void)argc;
    signal(SIGSEGV, on_segv);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    long (*work)(long) = (long (*)(long))dlsym(h, "lib_work");
    void (*crash)(int *) = (void (*)(int *))dlsym(h, "lib_crash");
    /* The agent thread finds the new sites (its patching may interrupt
       the sleep: sleep on). */
    struct timespec t = { 0, 500 * 1000 * 1000 };
    while (nanosleep(&t, &t) != 0) {}
    for (int i = 0; i < 10; i++) work(i);
    crash(0);
    return 0;
}
"#;

/// A handler the program installed before the agent took the signal over
/// (recording starts with a library loaded later) still runs, and the
/// process dies of the signal with the trace flushed.
#[test]
fn a_handler_installed_before_recording_started_is_kept() {
    let dir = work_dir();
    let lib = dir.join("liblate.so");
    let c = dir.join("liblate.c");
    std::fs::write(&c, LATE_LIB_C).unwrap();
    let out = Command::new("gcc")
        .args(["-O1", "-shared", "-fPIC", "-fpatchable-function-entry=5", "-o"])
        .arg(&lib)
        .arg(&c)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let main_c = dir.join("late_main.c");
    let exe = dir.join("late_main");
    std::fs::write(&main_c, LATE_MAIN_C).unwrap();
    let out = Command::new("gcc").args(["-O1", "-o"]).arg(&exe).arg(&main_c).arg("-ldl").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = run_preloaded("late", &exe, &[lib.to_str().unwrap()]);
    assert_died_of(&r, libc::SIGSEGV);
    assert!(r.stderr.contains("on_segv ran"), "the program's handler ran: {}", r.stderr);
    let t = salvage(&r.dir);
    assert_eq!(ended_by(&t).signal, libc::SIGSEGV);
    let recs = records(&t, t.meta().pid);
    assert_eq!(recs.last(), Some(&("lib_crash".to_string(), RecordKind::Entry)));
    assert_eq!(entries(&recs)["lib_work"], 10);
}
