//! The opt-in nudge (`Patcher::set_nudge`, `live/nudge.rs`): a thread in
//! a pure loop, which never calls a traced or patched function, switches
//! only when nudged; a thread blocked in a system call inside a patched
//! function is never signalled (its `poll` is not interrupted) and keeps
//! the old versions until it returns.
//!
//! C functions compiled with `-fpatchable-function-entry=5`; one test, as
//! the process has one patcher.
#![cfg(target_arch = "x86_64")]

mod common;

use common::{compile_so, Lib};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use textpoke::live::{Activity, FuncDesc, LiveError, PatchDesc, Patcher};

const SRC: &str = r#"
#include <errno.h>
#include <poll.h>
#define V __attribute__((noipa))
V int f(void) { return 1; }
V int f_v2(void) { return 2; }
/* Blocks in poll() (20 s at most) inside held(), then calls f(). */
V int held(int fd, int *got) {
    struct pollfd p = { fd, POLLIN, 0 };
    *got = poll(&p, 1, 20000);
    if (*got < 0) *got = -errno;
    return 10 + f();
}
V int held_v2(int fd, int *got) { (void)fd; *got = 0; return 20 + f(); }
/* A pure loop: no call, no system call. */
V void spin(volatile int *stop) { while (!*stop) { } }
"#;

fn size(addr: usize) -> usize {
    textpoke_sys::loader::symbol_at(addr).map(|s| s.size).filter(|&s| s > 0).expect("a sized symbol")
}

fn func(lib: &Lib, name: &str, repl: &str) -> FuncDesc {
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

fn desc(funcs: Vec<FuncDesc>) -> PatchDesc {
    PatchDesc { name: "nudge".into(), replace: false, funcs, callbacks: Default::default(), keep_alive: None }
}

/// Signals the program's own handler got.
static PROGRAM_SIGNALS: AtomicU64 = AtomicU64::new(0);

extern "C" fn program_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    PROGRAM_SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn gettid() -> i32 {
    textpoke_sys::threads::gettid()
}

/// Starts `f` on a thread with a stack no earlier thread used (see
/// tests/live.rs `fresh_thread`: no stale return addresses for a scan to
/// find); returns its tid once it runs.
fn spawn<T: Send + 'static>(size: usize, f: impl FnOnce() -> T + Send + 'static) -> (i32, std::thread::JoinHandle<T>) {
    let tid = Arc::new(AtomicI32::new(0));
    let t2 = tid.clone();
    let h = std::thread::Builder::new()
        .stack_size(size)
        .spawn(move || {
            t2.store(gettid(), Ordering::SeqCst);
            f()
        })
        .unwrap();
    while tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    (tid.load(Ordering::SeqCst), h)
}

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

fn pending(p: &'static Patcher, wait: Duration) -> textpoke::live::TransitionReport {
    match p.wait(wait) {
        Err(LiveError::Pending(r)) => r,
        other => panic!("expected a pending transition, got {other:?}"),
    }
}

#[test]
fn a_pure_loop_switches_when_nudged_and_a_blocked_thread_is_never_signalled() {
    let lib = Lib::open(&compile_so("live_nudge", SRC, &["-fpatchable-function-entry=5"]));
    let (spin, held) = (lib.sym("spin"), lib.sym("held"));
    let p = Patcher::global();

    // A thread spinning in a loop that calls nothing.
    let stop: &'static AtomicI32 = Box::leak(Box::new(AtomicI32::new(0)));
    let stop_addr = stop as *const AtomicI32 as usize;
    let (spinner, spinning) = spawn(4 << 20, move || {
        // SAFETY: void spin(volatile int *), a leaked int.
        let spin = unsafe { std::mem::transmute::<usize, extern "C" fn(usize)>(spin) };
        spin(stop_addr);
    });
    // A thread blocked in poll() inside held().
    let mut fds = [0; 2];
    // SAFETY: a valid array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let (poller, polling) = spawn((4 << 20) + (64 << 10), move || {
        // SAFETY: int held(int, int *).
        let held = unsafe { std::mem::transmute::<usize, extern "C" fn(i32, *mut i32) -> i32>(held) };
        let mut got = -7;
        let r = held(rd, &mut got);
        (r, got)
    });
    wait_blocked_in(poller, libc::SYS_poll);

    p.set_nudge(None);
    let id = p.apply(desc(vec![func(&lib, "f", "f_v2"), func(&lib, "held", "held_v2")])).unwrap();
    // Not nudged: the spinner never switches.
    let r = pending(p, Duration::from_millis(300));
    let t = r.pending.iter().find(|t| t.tid == spinner).unwrap_or_else(|| panic!("{r}"));
    assert!(matches!(t.activity, Activity::Running), "{r}");
    assert_eq!(p.nudges().sent, 0);

    // Nudged: the spinner switches; the poller, blocked, is left alone.
    p.set_nudge(Some(Duration::from_millis(20)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = pending(p, Duration::from_millis(100));
        if r.pending.iter().all(|t| t.tid != spinner) {
            break r;
        }
        assert!(Instant::now() < deadline, "the nudged spinner never switched: {r}");
    };
    let t = r.pending.iter().find(|t| t.tid == poller).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(t.holds.as_ref().map(|h| h.function.as_str()), Some("held"), "{r}");
    let n = p.nudges();
    assert!(n.sent >= 1 && n.interrupted == 0, "{n:?}");

    // SAFETY: one byte from a valid buffer.
    assert_eq!(unsafe { libc::write(wr, b"x".as_ptr().cast(), 1) }, 1);
    let (r, got) = polling.join().unwrap();
    assert_eq!(got, 1, "poll() returned {got}: interrupted?");
    assert_eq!(r, 11, "the poller's old held() called the old f()");
    let done = p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!done.forced && done.patch == id);
    // Unpatching too: the nudged spinner switches back.
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));

    // The program installs a handler of its own on the nudge's signal (the
    // highest handled real-time one below the rendezvous signal): no more
    // nudges, which would now run the program's handler.
    let handled = |s: i32| textpoke_sys::signals::action(s).sa_sigaction != libc::SIG_DFL;
    let sig = ((libc::SIGRTMIN() + 4)..(libc::SIGRTMAX() - 1)).rev().find(|&s| handled(s)).expect("the nudge's signal");
    textpoke_sys::signals::install(sig, program_handler, libc::SA_RESTART).unwrap();
    let sent = p.nudges().sent;
    let id = p.apply(desc(vec![func(&lib, "f", "f_v2")])).unwrap();
    let r = pending(p, Duration::from_millis(300));
    assert!(r.pending.iter().any(|t| t.tid == spinner), "{r}");
    assert_eq!((p.nudges().sent, PROGRAM_SIGNALS.load(Ordering::SeqCst)), (sent, 0), "the program's handler ran");
    stop.store(1, Ordering::SeqCst);
    spinning.join().unwrap();
    p.set_nudge(None);
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: our descriptors.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
}
