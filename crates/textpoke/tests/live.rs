//! Live patching with the kernel's consistency model (issue 12):
//! `textpoke::live::Patcher` over C functions compiled with
//! `-fpatchable-function-entry=5` (gcc's pads: enabled by their first
//! byte, a jump to their mirror slot, by the breakpoint protocol; no
//! thread is signalled).
//!
//! The fixture's functions return version tags: `outer` returns
//! `10 * its version + inner's version`, so a caller sees at once whether
//! one thread mixed versions. The scenarios share the process's one
//! patcher, so one test runs them in turn: a test waiting for another
//! would be one more blocked thread, on a stack a finished test's thread
//! may have left return addresses on (see the conservative scan in
//! `live/stack.rs`).

mod common;

use common::{compile_so, Lib};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use textpoke::live::{Activity, FuncDesc, Held, LiveError, PatchDesc, PatchState, Patcher};

const SRC: &str = r#"
#include <unistd.h>
#define V __attribute__((noipa))
/* Version 1: the program's. */
V int inner(void) { return 1; }
V int outer(int fd, int *got) { if (fd >= 0) { char c; *got = read(fd, &c, 1); } return 10 * 1 + inner(); }
V int rec(int n, int fd, int *got) {
    if (n == 0) { if (fd >= 0) { char c; *got = read(fd, &c, 1); } return 0x100 | inner(); }
    return rec(n - 1, fd, got) | 0x100;
}
V int f(void) { return 1; }
V int g(void) { return 1; }
V long mix(long a, long b, long c, long d, long e, long f, double x, double y) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + (long)(x * 10) + (long)(y * 100);
}
/* Version 2: a patch's. */
V long mix_v2(long a, long b, long c, long d, long e, long f, double x, double y) {
    return 1000000 + a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + (long)(x * 10) + (long)(y * 100);
}
V int inner_v2(void) { return 2; }
V int outer_v2(int fd, int *got) { if (fd >= 0) { char c; *got = read(fd, &c, 1); } return 10 * 2 + inner(); }
V int rec_v2(int n, int fd, int *got) {
    if (n == 0) { if (fd >= 0) { char c; *got = read(fd, &c, 1); } return 0x200 | inner(); }
    return rec(n - 1, fd, got) | 0x200;
}
V int f_v2(void) { return 2; }
V int f_v3(void) { return 3; }
V int g_v3(void) { return 3; }
"#;

struct Fixture {
    lib: Lib,
    /// `outer`, `rec`: looked up once (signal handlers call them; dlsym
    /// takes the loader's lock).
    outer: usize,
    rec: usize,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let lib = Lib::open(&compile_so("live", SRC, &["-fpatchable-function-entry=5"]));
        Fixture { outer: lib.sym("outer"), rec: lib.sym("rec"), lib }
    })
}

fn size(addr: usize) -> usize {
    textpoke_sys::loader::symbol_at(addr).map(|s| s.size).filter(|&s| s > 0).expect("a sized symbol")
}

fn func(name: &str, repl: &str) -> FuncDesc {
    let lib = &fixture().lib;
    let (target, replacement) = (lib.sym(name), lib.sym(repl));
    FuncDesc {
        name: name.into(),
        target,
        target_size: size(target),
        replacement,
        replacement_size: size(replacement),
        ..Default::default()
    }
}

fn desc(name: &str, funcs: Vec<FuncDesc>) -> PatchDesc {
    PatchDesc { name: name.into(), replace: false, funcs, callbacks: Default::default(), keep_alive: None }
}

fn outer(fd: i32, got: &mut i32) -> i32 {
    // SAFETY: the C signature.
    let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32, *mut i32) -> i32>(fixture().outer) };
    f(fd, got)
}

fn rec(n: i32, fd: i32, got: &mut i32) -> i32 {
    // SAFETY: the C signature.
    let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32, i32, *mut i32) -> i32>(fixture().rec) };
    f(n, fd, got)
}

fn call0(name: &str) -> i32 {
    // SAFETY: int (void).
    let f = unsafe { std::mem::transmute::<usize, extern "C" fn() -> i32>(fixture().lib.sym(name)) };
    f()
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn write_byte(fd: i32) {
    // SAFETY: one byte from a valid buffer.
    assert_eq!(unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) }, 1);
}

fn gettid() -> i32 {
    textpoke_sys::threads::gettid()
}

/// Waits until thread `tid` is blocked in system call `nr`.
fn wait_blocked_in(tid: i32, nr: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if s.split_whitespace().next().and_then(|n| n.parse::<i64>().ok()) == Some(nr) {
            return;
        }
        assert!(Instant::now() < deadline, "thread {tid} never blocked in syscall {nr}: {s}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A thread blocked in `read` inside old `outer()` (or `rec`'s deepest
/// frame) until `release` is written; returns (its tid, its handle giving
/// (result, read's result)).
fn blocked_caller(deep: bool) -> (i32, i32, std::thread::JoinHandle<(i32, i32)>) {
    let (rd, wr) = pipe();
    let tid = Arc::new(AtomicI32::new(0));
    let t2 = tid.clone();
    let h = std::thread::Builder::new()
        .name("lp-sleeper".into())
        .spawn(move || {
            t2.store(gettid(), Ordering::SeqCst);
            let mut got = -7;
            let r = if deep { rec(200, rd, &mut got) } else { outer(rd, &mut got) };
            // SAFETY: our descriptor.
            unsafe { libc::close(rd) };
            (r, got)
        })
        .unwrap();
    while tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let tid = tid.load(Ordering::SeqCst);
    wait_blocked_in(tid, libc::SYS_read);
    (tid, wr, h)
}

/// A thread on a stack no earlier thread used. Threads that block in the
/// kernel and never call a patched function can only be switched from
/// outside; where the unwind of such a thread is not reliable (its
/// innermost frames are frame-pointer code, Rust's std: `rbp` is unknown
/// from outside), the conservative scan decides, and a stack glibc
/// reused from a finished thread may hold stale return addresses into
/// the patched functions, which pin it (it then switches when it runs
/// a traced or patched call, or by force). Each such thread here gets a
/// stack larger than any before it (glibc reuses a cached stack only for
/// a request no larger than it), so glibc maps it a fresh, zeroed stack.
fn fresh_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let size = (4 << 20) + (64 << 10) * (1 + NEXT.fetch_add(1, Ordering::Relaxed) as usize);
    std::thread::Builder::new().stack_size(size).spawn(f).unwrap()
}

/// Completes whatever transition is left (a failed scenario's).
fn settle() {
    let p = Patcher::global();
    if p.transition().is_some() {
        let _ = p.force();
    }
    while p.revert(None).is_ok() {
        if p.wait(Duration::from_secs(10)).is_err() {
            let _ = p.force();
        }
    }
}

fn a_thread_sleeping_in_old_outer_keeps_old_inner_until_it_returns() {
    settle();
    let p = Patcher::global();
    let mut got = 0;
    assert_eq!(outer(-1, &mut got), 11);
    let (tid, wr, sleeper) = blocked_caller(false);
    let id = p.apply(desc("outer+inner", vec![func("outer", "outer_v2"), func("inner", "inner_v2")])).unwrap();
    // Pending: the sleeper holds old outer().
    let report = match p.wait(Duration::from_millis(300)) {
        Err(LiveError::Pending(r)) => r,
        other => panic!("expected a pending transition, got {other:?}"),
    };
    let t = report.pending.iter().find(|t| t.tid == tid).unwrap_or_else(|| panic!("{report}"));
    let holds = t.holds.as_ref().unwrap_or_else(|| panic!("{report}"));
    assert_eq!((holds.function.as_str(), holds.version), ("outer", Held::Old), "{report}");
    assert!(matches!(&t.activity, Activity::Blocked { syscall: Some(s), .. } if s == "read"), "{report}");
    // Other threads get the new versions meanwhile.
    let fresh = std::thread::spawn(|| {
        let mut got = 0;
        outer(-1, &mut got)
    });
    assert_eq!(fresh.join().unwrap(), 22);
    assert!(p.transition().is_some(), "still pending");
    // Woken, the sleeper's old outer() calls the OLD inner().
    write_byte(wr);
    let (r, read) = sleeper.join().unwrap();
    assert_eq!(read, 1, "read returned {read}: interrupted?");
    assert_eq!(r, 11, "the sleeper mixed versions");
    let done = p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!done.forced);
    assert_eq!(done.patch, id);
    assert_eq!(outer(-1, &mut got), 22);
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(outer(-1, &mut got), 11);
    assert!(p.patches().is_empty());
}

fn eight_threads_never_mix_versions_over_a_thousand_patch_revert_cycles() {
    settle();
    let p = Patcher::global();
    let cycles: u64 = std::env::var("LIVE_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    // phase = cycle << 1 | patching; stored before each apply / revert.
    let phase = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (mixed, back, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (phase, stop, mixed, back, calls) =
                (phase.clone(), stop.clone(), mixed.clone(), back.clone(), calls.clone());
            std::thread::spawn(move || {
                let (mut seen_phase, mut last) = (u64::MAX, 0);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let before = phase.load(Ordering::SeqCst);
                    let mut got = 0;
                    let r = outer(-1, &mut got);
                    let after = phase.load(Ordering::SeqCst);
                    let (o, i) = (r / 10, r % 10);
                    if o != i {
                        mixed.fetch_add(1, Ordering::Relaxed);
                    }
                    if before == after {
                        if before != seen_phase {
                            (seen_phase, last) = (before, o);
                        }
                        // Patching goes 1 -> 2 only; reverting 2 -> 1 only.
                        let forward = if before & 1 == 1 { o < last } else { o > last };
                        if forward {
                            back.fetch_add(1, Ordering::Relaxed);
                        }
                        last = o;
                    }
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let started = Instant::now();
    for cycle in 0..cycles {
        phase.store(cycle << 1 | 1, Ordering::SeqCst);
        let id = p.apply(desc("outer+inner", vec![func("outer", "outer_v2"), func("inner", "inner_v2")])).unwrap();
        let done = p.wait(Duration::from_secs(30)).unwrap_or_else(|e| panic!("cycle {cycle} patching: {e}"));
        assert!(!done.forced);
        phase.store(cycle << 1, Ordering::SeqCst);
        p.revert(Some(id)).unwrap();
        p.wait(Duration::from_secs(30)).unwrap_or_else(|e| panic!("cycle {cycle} reverting: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let calls = calls.load(Ordering::Relaxed);
    eprintln!("{cycles} cycles in {:?}, {calls} calls", started.elapsed());
    assert_eq!(mixed.load(Ordering::Relaxed), 0, "calls that mixed outer and inner versions");
    assert_eq!(back.load(Ordering::Relaxed), 0, "threads that went back within a transition");
    assert!(calls > cycles, "the workers ran ({calls} calls)");
    assert!(p.patches().is_empty());
}

fn signal_handlers_and_deep_recursion_keep_one_version() {
    static MIXED: AtomicU64 = AtomicU64::new(0);
    static HANDLED: AtomicU64 = AtomicU64::new(0);
    extern "C" fn on_alarm(_: i32) {
        let mut got = 0;
        let r = outer(-1, &mut got);
        if r / 10 != r % 10 {
            MIXED.fetch_add(1, Ordering::Relaxed);
        }
        HANDLED.fetch_add(1, Ordering::Relaxed);
    }
    settle();
    let p = Patcher::global();
    let _ = fixture();
    // A recursion 200 deep, entered before the patch, blocked at its
    // bottom: its frames pin the old versions.
    let (tid, wr, deep) = blocked_caller(true);
    // SAFETY: a plain handler, SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let busy_tids: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let h = std::thread::spawn(move || {
                // SAFETY: pthread_self is always valid.
                tx.send(unsafe { libc::pthread_self() }).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let mut got = 0;
                    let r = rec(20, -1, &mut got);
                    let (tags, inner) = (r & 0x300, r & 0xff);
                    if !(tags == 0x100 && inner == 1 || tags == 0x200 && inner == 2) {
                        MIXED.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            (rx.recv().unwrap(), h)
        })
        .collect();
    let storm = {
        let stop = stop.clone();
        let targets: Vec<usize> = busy_tids.iter().map(|(t, _)| *t as usize).collect();
        fresh_thread(move || {
            while !stop.load(Ordering::Relaxed) {
                for &t in &targets {
                    // SAFETY: the worker threads live until `stop`.
                    unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGALRM) };
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let patch =
        || desc("rec+outer+inner", vec![func("rec", "rec_v2"), func("outer", "outer_v2"), func("inner", "inner_v2")]);
    let id = p.apply(patch()).unwrap();
    match p.wait(Duration::from_millis(300)) {
        Err(LiveError::Pending(r)) => {
            let t = r.pending.iter().find(|t| t.tid == tid).unwrap_or_else(|| panic!("{r}"));
            assert_eq!(t.holds.as_ref().map(|h| h.version), Some(Held::Old), "{r}");
        }
        other => panic!("the deep recursion must pin the old versions: {other:?}"),
    }
    write_byte(wr);
    let (r, read) = deep.join().unwrap();
    assert_eq!(read, 1);
    assert_eq!(r, 0x101, "the deep recursion entered before the patch runs old versions to its end");
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    let mut id = id;
    for _ in 0..30 {
        p.revert(Some(id)).unwrap();
        p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
        id = p.apply(patch()).unwrap();
        p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    }
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    stop.store(true, Ordering::Relaxed);
    storm.join().unwrap();
    for (_, h) in busy_tids {
        h.join().unwrap();
    }
    // SAFETY: back to the default disposition.
    unsafe { libc::signal(libc::SIGALRM, libc::SIG_IGN) };
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };
    assert_eq!(MIXED.load(Ordering::Relaxed), 0, "calls that mixed versions");
    assert!(HANDLED.load(Ordering::Relaxed) > 0, "the handlers ran");
}

fn stacked_patches_revert_in_order_and_atomic_replace_replaces_them() {
    settle();
    let p = Patcher::global();
    let wait = || p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((call0("f"), call0("g")), (1, 1));
    let p1 = p.apply(desc("P1", vec![func("f", "f_v2")])).unwrap();
    wait();
    assert_eq!(call0("f"), 2);
    let p2 = p.apply(desc("P2", vec![func("f", "f_v3")])).unwrap();
    wait();
    assert_eq!(call0("f"), 3);
    match p.revert(Some(p1)) {
        Err(e @ LiveError::Stacked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("P1") && msg.contains("P2") && msg.contains("f()"), "{msg}");
        }
        other => panic!("reverting P1 under P2 must be refused: {other:?}"),
    }
    assert_eq!(call0("f"), 3, "a refused revert changes nothing");
    p.revert(Some(p2)).unwrap();
    wait();
    assert_eq!(call0("f"), 2, "P1 again");
    let p2 = p.apply(desc("P2", vec![func("f", "f_v3")])).unwrap();
    wait();
    // An atomic replace patching only g: f goes back to its original.
    let mut d = desc("P3", vec![func("g", "g_v3")]);
    d.replace = true;
    let p3 = p.apply(d).unwrap();
    wait();
    assert_eq!((call0("f"), call0("g")), (1, 3));
    let list = p.patches();
    assert_eq!(list.len(), 1, "only the replacing patch is left");
    assert_eq!((list[0].id, list[0].replace, list[0].state), (p3, true, PatchState::Enabled));
    assert!(matches!(p.revert(Some(p2)), Err(LiveError::UnknownPatch(_))));
    p.revert(None).unwrap();
    wait();
    assert_eq!((call0("f"), call0("g")), (1, 1));
    assert!(p.patches().is_empty());
}

fn a_thread_that_never_leaves_is_named_and_force_completes() {
    settle();
    let p = Patcher::global();
    let (tid, wr, sleeper) = blocked_caller(false);
    let id = p.apply(desc("stuck", vec![func("outer", "outer_v2"), func("inner", "inner_v2")])).unwrap();
    let report = match p.wait(Duration::from_millis(400)) {
        Err(LiveError::Pending(r)) => r,
        other => panic!("expected pending: {other:?}"),
    };
    let text = report.to_string();
    assert!(text.contains(&format!("tid {tid}")) && text.contains("outer()"), "{text}");
    let forced = p.force().unwrap();
    assert!(forced.iter().any(|t| t.tid == tid), "{forced:?}");
    let info = p.patches();
    assert!(info.iter().any(|i| i.id == id && i.forced && i.state == PatchState::Enabled), "{info:?}");
    let mut got = 0;
    assert_eq!(outer(-1, &mut got), 22);
    write_byte(wr);
    let (_, read) = sleeper.join().unwrap();
    assert_eq!(read, 1);
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outer(-1, &mut got), 11);
}

fn a_transition_reversed_midway_ends_in_the_original_versions() {
    settle();
    let p = Patcher::global();
    let (tid, wr, sleeper) = blocked_caller(false);
    let id = p.apply(desc("reversed", vec![func("outer", "outer_v2"), func("inner", "inner_v2")])).unwrap();
    assert!(matches!(p.wait(Duration::from_millis(200)), Err(LiveError::Pending(_))));
    // Threads meanwhile switch to the new versions.
    let mut got = 0;
    assert_eq!(std::thread::spawn(|| outer(-1, &mut 0)).join().unwrap(), 22);
    assert_eq!(p.revert(None).unwrap(), id, "reverses the patch in transition");
    let info = p.patches();
    assert_eq!(info[0].state, PatchState::Unpatching);
    let done = p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!done.forced);
    assert!(p.patches().is_empty(), "reverted");
    assert_eq!(outer(-1, &mut got), 11);
    // The pinned thread never switched: its old outer() calls old inner().
    write_byte(wr);
    let (r, read) = sleeper.join().unwrap();
    assert_eq!((r, read), (11, 1), "tid {tid}");
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };
}

/// Every argument register (six integers, two vectors) survives the
/// stubs' slow path, taken by a thread's first call in a transition.
fn arguments_survive_the_slow_path() {
    settle();
    let p = Patcher::global();
    type Mix = extern "C" fn(i64, i64, i64, i64, i64, i64, f64, f64) -> i64;
    // SAFETY: the C signature.
    let mix = unsafe { std::mem::transmute::<usize, Mix>(fixture().lib.sym("mix")) };
    let expect = 1 + 2 * 2 + 3 * 3 + 4 * 4 + 5 * 5 + 6 * 6 + 15 + 250;
    assert_eq!(mix(1, 2, 3, 4, 5, 6, 1.5, 2.5), expect);
    // A pinned thread keeps the transition pending: every thread's first
    // call goes through the slow path meanwhile.
    let (tid, wr, sleeper) = blocked_caller(false);
    let id = p
        .apply(desc("mix", vec![func("outer", "outer_v2"), func("inner", "inner_v2"), func("mix", "mix_v2")]))
        .unwrap();
    assert_eq!(mix(1, 2, 3, 4, 5, 6, 1.5, 2.5), 1_000_000 + expect, "switched in the slow path");
    let other = std::thread::spawn(move || mix(1, 2, 3, 4, 5, 6, 1.5, 2.5)).join().unwrap();
    assert_eq!(other, 1_000_000 + expect);
    let report = p.transition().expect("pending");
    assert!(report.pending.iter().any(|t| t.tid == tid), "{report}");
    write_byte(wr);
    assert_eq!(sleeper.join().unwrap(), (11, 1));
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mix(1, 2, 3, 4, 5, 6, 1.5, 2.5), expect);
}

fn refused_patches_write_nothing() {
    settle();
    let p = Patcher::global();
    let before = common::peek(fixture().lib.sym("outer"), 5);
    // A target without an entry site.
    let plain = textpoke_sys::loader::global_symbol(c"getpid").unwrap();
    let mut bad = func("outer", "outer_v2");
    bad.target = plain;
    bad.name = "getpid".into();
    let e = p.apply(desc("bad", vec![func("inner", "inner_v2"), bad])).unwrap_err();
    assert!(e.to_string().contains("getpid") && e.to_string().contains("patchable-function-entry"), "{e}");
    // A failing pre-patch callback.
    unsafe extern "C" fn no() -> i32 {
        -22
    }
    let mut d = desc("pre", vec![func("outer", "outer_v2")]);
    d.callbacks.pre_patch = Some(no);
    let e = p.apply(d).unwrap_err();
    assert!(matches!(e, LiveError::Callback { code: -22, .. }), "{e}");
    assert_eq!(common::peek(fixture().lib.sym("outer"), 5), before, "nothing written");
    assert!(p.patches().is_empty() && p.transition().is_none());
}

fn blocked_threads_see_no_eintr_over_a_hundred_cycles() {
    settle();
    let p = Patcher::global();
    let patch = || desc("outer+inner", vec![func("outer", "outer_v2"), func("inner", "inner_v2")]);
    // No warm-up cycle: a pad's first jump is written by its first byte
    // (its mirror slot), with no signal, like every later change.
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for kind in 0..3 {
        let (stop, bad) = (stop.clone(), bad.clone());
        threads.push(fresh_thread(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match kind {
                    0 => {
                        let ask = Duration::from_millis(7);
                        let t0 = Instant::now();
                        let ts = libc::timespec { tv_sec: 0, tv_nsec: ask.as_nanos() as i64 };
                        // SAFETY: a valid timespec, no remainder wanted.
                        let r = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
                        if r != 0 || t0.elapsed() < ask {
                            bad.lock().unwrap().push(format!("nanosleep {r} after {:?}", t0.elapsed()));
                        }
                    }
                    1 => {
                        // SAFETY: plain epoll calls on our own descriptor.
                        let ep = unsafe { libc::epoll_create1(0) };
                        let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 1];
                        // SAFETY: as above.
                        let r = unsafe { libc::epoll_wait(ep, ev.as_mut_ptr(), 1, 5) };
                        if r != 0 {
                            bad.lock()
                                .unwrap()
                                .push(format!("epoll_wait {r} errno {}", textpoke_sys::threads::errno()));
                        }
                        // SAFETY: ours.
                        unsafe { libc::close(ep) };
                    }
                    _ => {
                        let word = 0u32;
                        let ts = libc::timespec { tv_sec: 0, tv_nsec: 6_000_000 };
                        // SAFETY: a futex wait on our own word with a timeout.
                        let r = unsafe {
                            libc::syscall(
                                libc::SYS_futex,
                                &word as *const u32,
                                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                                0,
                                &ts,
                            )
                        };
                        let e = textpoke_sys::threads::errno();
                        if r != -1 || e != libc::ETIMEDOUT {
                            bad.lock().unwrap().push(format!("futex {r} errno {e}"));
                        }
                    }
                }
                n += 1;
            }
            n
        }));
    }
    for cycle in 0..100 {
        let id = p.apply(patch()).unwrap();
        p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        p.revert(Some(id)).unwrap();
        p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    let waits: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(waits > 0);
    let bad = bad.lock().unwrap();
    assert!(bad.is_empty(), "system calls that returned early: {bad:?}");
}

#[test]
fn live_patching_scenarios() {
    eprintln!("scenario: a_thread_sleeping_in_old_outer_keeps_old_inner_until_it_returns");
    a_thread_sleeping_in_old_outer_keeps_old_inner_until_it_returns();
    eprintln!("scenario: eight_threads_never_mix_versions_over_a_thousand_patch_revert_cycles");
    eight_threads_never_mix_versions_over_a_thousand_patch_revert_cycles();
    eprintln!("scenario: signal_handlers_and_deep_recursion_keep_one_version");
    signal_handlers_and_deep_recursion_keep_one_version();
    eprintln!("scenario: stacked_patches_revert_in_order_and_atomic_replace_replaces_them");
    stacked_patches_revert_in_order_and_atomic_replace_replaces_them();
    eprintln!("scenario: a_thread_that_never_leaves_is_named_and_force_completes");
    a_thread_that_never_leaves_is_named_and_force_completes();
    eprintln!("scenario: a_transition_reversed_midway_ends_in_the_original_versions");
    a_transition_reversed_midway_ends_in_the_original_versions();
    eprintln!("scenario: arguments_survive_the_slow_path");
    arguments_survive_the_slow_path();
    eprintln!("scenario: refused_patches_write_nothing");
    refused_patches_write_nothing();
    eprintln!("scenario: blocked_threads_see_no_eintr_over_a_hundred_cycles");
    blocked_threads_see_no_eintr_over_a_hundred_cycles();
}
