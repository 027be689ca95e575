//! Seed 001's hazard, reproduced on purpose: trampolines and op data are
//! freed only after every thread was seen outside them — a thread held in
//! a callback, inside a trampoline, or right after a site's CALL (on the
//! first instruction of the stub, before it raised its count) — and
//! grace periods interrupt no thread (no signal, where the kernel has
//! membarrier).

mod common;

use common::{
    child_scenario, compile_so, glob_filter, mapped, peek, rerun_self, rerun_self_with, stub_and_trampoline, Lib,
    PATCHABLE,
};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use textpoke::trace::{wait_for_grace, Entry, Filter, TraceOp, Tracer};

/// The tracer is process-wide: tests that register ops run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn filter(names: &[&str]) -> Filter {
    glob_filter(names.iter().map(|s| s.to_string()), Vec::<String>::new()).unwrap()
}

/// An op whose callback holds the calling thread until released.
struct Holder {
    armed: AtomicBool,
    inside: AtomicBool,
    release: AtomicBool,
}

impl TraceOp for Holder {
    fn entry(&self, _e: &Entry<'_>) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.inside.store(true, Ordering::Release);
            while !self.release.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
    }
}

/// Counts entries.
struct Count(AtomicU64);

impl TraceOp for Count {
    fn entry(&self, _e: &Entry<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// What an untraced site holds: a 5-byte NOP (aarch64: a pad's first NOP).
#[cfg(target_arch = "x86_64")]
const SITE_NOP: &[u8] = &textpoke::arch::NOP5;
#[cfg(target_arch = "aarch64")]
const SITE_NOP: &[u8] = &textpoke::arch::SITE_NOP;

/// Runs the scenario; returns whether the held thread came back.
fn held_thread_while_unregistering(grace: bool) -> bool {
    let lib = Arc::new(Lib::open(&compile_so("hazard", "int haz_fn(int x) { return x + 1; }", &[PATCHABLE, "-O1"])));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(grace);
    let op = Arc::new(Holder {
        armed: AtomicBool::new(true),
        inside: AtomicBool::new(false),
        release: AtomicBool::new(false),
    });
    let h = t.register(op.clone(), filter(&["haz_fn"])).unwrap();
    let f = lib.sym("haz_fn");
    assert_ne!(peek(f, SITE_NOP.len()), SITE_NOP, "the site calls its stub");
    let (stub, tramp) = stub_and_trampoline(f);
    let lib2 = lib.clone();
    let held = std::thread::spawn(move || {
        // SAFETY: haz_fn's signature.
        let haz = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib2.sym("haz_fn")) };
        haz(41)
    });
    while !op.inside.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    // The thread is inside the callback: a return into the trampoline is on
    // its stack. Unregister the op.
    t.unregister(h).unwrap();
    assert_eq!(peek(f, SITE_NOP.len()), SITE_NOP);
    if grace {
        assert!(t.reclaim(Duration::from_millis(300)).unwrap() == 0, "nothing may be freed while the thread is held");
        assert!(t.retired() > 0);
        assert!(mapped(tramp), "the trampoline block is still mapped");
    } else {
        assert!(!mapped(tramp), "without a grace period the block is gone at once");
        println!("freed while held");
    }
    op.release.store(true, Ordering::Release);
    let r = held.join().unwrap();
    assert_eq!(r, 42);
    t.reclaim(Duration::from_secs(5)).unwrap();
    assert_eq!(t.retired(), 0, "freed once the thread moved on");
    assert!(!mapped(tramp), "the trampoline block was unmapped");
    assert!(mapped(stub), "stubs stay: a thread may sit on a stub's first instruction at any time");
    true
}

#[test]
fn child_entry() {
    match child_scenario().as_deref() {
        Some("no-grace") => {
            held_thread_while_unregistering(false);
            println!("survived");
        }
        Some("dynamic-tls") => {
            // TEXTPOKE_TEST_DYNAMIC_TLS=1: stubs call the never-freed
            // enter and leave routines instead of counting in place.
            assert_eq!(Tracer::global().counter_mode(), "calls");
            assert!(held_thread_while_unregistering(true));
            if std::env::var_os("GRACE_STRESS_ROUNDS").is_none() {
                std::env::set_var("GRACE_STRESS_ROUNDS", "300");
            }
            stress();
            println!("dynamic-tls-ok");
        }
        Some(other) => panic!("unknown scenario {other}"),
        None => {}
    }
}

/// With the count behind helper calls (the tracer's thread-local in
/// dynamic TLS, forced by a test switch): the same grace periods.
#[test]
fn grace_periods_with_the_count_in_dynamic_tls() {
    let _s = serial();
    let out = rerun_self_with("child_entry", "dynamic-tls", &[("TEXTPOKE_TEST_DYNAMIC_TLS", "1")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("dynamic-tls-ok"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn trampoline_is_not_freed_until_the_held_thread_moves_on() {
    let _s = serial();
    assert!(held_thread_while_unregistering(true));
}

#[test]
fn without_a_grace_period_the_held_thread_crashes() {
    let out = rerun_self("child_entry", "no-grace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("freed while held"), "{stdout}");
    assert!(!stdout.contains("survived"));
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "returned into unmapped trampoline: {:?}", out.status);
}

// ---------------------------------------------------------------------------
// A thread held at a chosen instruction by a signal handler of the test.

/// Where the SIGUSR2 handler holds its thread: PCs in `[lo, hi)` (0: none).
static HOLD_LO: AtomicUsize = AtomicUsize::new(0);
static HOLD_HI: AtomicUsize = AtomicUsize::new(0);
/// Set by the handler to the PC it holds the thread at.
static HELD_AT: AtomicUsize = AtomicUsize::new(0);
static GO: AtomicBool = AtomicBool::new(false);
/// When non-zero: instead of holding where it found the thread, the
/// handler makes the thread call the function at this address as if it
/// had just executed the function's patched site: on x86-64 (`call stub`)
/// it pushes the interrupted PC (the function's return address), then the
/// address after the site; on aarch64 (`b stub`, after the caller's `bl`)
/// it sets x30 to the interrupted PC. Then it resumes the thread at the
/// stub.
static CALL_FN: AtomicUsize = AtomicUsize::new(0);
static CALL_STUB: AtomicUsize = AtomicUsize::new(0);

extern "C" fn hold(_: i32, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let uc = unsafe { &mut *(uc as *mut libc::ucontext_t) };
    let pc = pc_of(uc);
    let (lo, hi) = (HOLD_LO.load(Ordering::SeqCst), HOLD_HI.load(Ordering::SeqCst));
    if !(lo..hi).contains(&pc) || HELD_AT.load(Ordering::SeqCst) != 0 {
        return;
    }
    let f = CALL_FN.load(Ordering::SeqCst);
    if f != 0 {
        call_stub_from(uc, pc, f, CALL_STUB.load(Ordering::SeqCst));
    }
    HELD_AT.store(if f != 0 { CALL_STUB.load(Ordering::SeqCst) } else { pc }, Ordering::SeqCst);
    while !GO.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
}

/// The interrupted PC.
#[cfg(target_arch = "x86_64")]
fn pc_of(uc: &libc::ucontext_t) -> usize {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize
}

#[cfg(target_arch = "aarch64")]
fn pc_of(uc: &libc::ucontext_t) -> usize {
    uc.uc_mcontext.pc as usize
}

/// Makes the interrupted thread (at `pc`) resume in `stub` as if it had
/// called `f` from `pc` and run `f`'s site.
#[cfg(target_arch = "x86_64")]
fn call_stub_from(uc: &mut libc::ucontext_t, pc: usize, f: usize, stub: usize) {
    let gregs = &mut uc.uc_mcontext.gregs;
    // The interrupted code is a leaf spin loop with nothing in its red
    // zone; the kernel put this handler's frame below the red zone.
    let mut sp = gregs[libc::REG_RSP as usize] as usize;
    for ret in [pc, f + 5] {
        sp -= 8;
        // SAFETY: the thread's own stack, below its stack pointer.
        unsafe { (sp as *mut usize).write(ret) };
    }
    gregs[libc::REG_RSP as usize] = sp as i64;
    gregs[libc::REG_RIP as usize] = stub as i64;
}

#[cfg(target_arch = "aarch64")]
fn call_stub_from(uc: &mut libc::ucontext_t, pc: usize, _f: usize, stub: usize) {
    // The spin loop saved its own x30 in its frame (it calls spin_tick):
    // x30 is free to be the return address of the call.
    uc.uc_mcontext.regs[30] = pc as u64;
    uc.uc_mcontext.pc = stub as u64;
}

fn install_hold() {
    // SAFETY: installing an SA_SIGINFO handler of the right signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = hold as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
    }
}

fn reset_hold(lo: usize, hi: usize) {
    HELD_AT.store(0, Ordering::SeqCst);
    GO.store(false, Ordering::SeqCst);
    CALL_FN.store(0, Ordering::SeqCst);
    HOLD_LO.store(lo, Ordering::SeqCst);
    HOLD_HI.store(hi, Ordering::SeqCst);
}

/// Signals `th` until its handler holds it; panics after 30 s.
fn catch(th: libc::pthread_t) {
    let start = Instant::now();
    while HELD_AT.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the thread was never caught where wanted");
        // SAFETY: the thread runs until the test stops it.
        unsafe { libc::pthread_kill(th, libc::SIGUSR2) };
        std::thread::sleep(Duration::from_micros(50));
    }
}

const SPIN_C: &str = r#"
#define F __attribute__((noipa))
volatile int spin_stop;
volatile long held_calls;
F long held_fn(long x) { held_calls++; return x + 1; }
F long loop_fn(long n) { long s = 0; for (long i = 0; i < n; i++) s += held_fn(i); return s; }
#ifdef __aarch64__
/* Not a leaf, and calling in its loop: x30 is saved in the frame and free
   while the loop spins, and nothing lives in a caller-saved register
   across the loop's instructions but the flag just loaded (the test's
   handler makes the loop call held_fn from anywhere in it). */
F void spin_tick(void) {}
F void spin(void) { while (!spin_stop) spin_tick(); }
#else
F void spin(void) { while (!spin_stop) ; }
#endif
F void spin_end(void) {}
"#;

#[test]
fn a_thread_inside_a_trampoline_blocks_the_grace_period() {
    let _s = serial();
    let lib = Arc::new(Lib::open(&compile_so("gtramp", SPIN_C, &[PATCHABLE, "-O1"])));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(true);
    install_hold();
    let op = Arc::new(Count(AtomicU64::new(0)));
    let h = t.register(op.clone(), filter(&["held_fn"])).unwrap();
    let (_, tramp) = stub_and_trampoline(lib.sym("held_fn"));
    // The trampoline's first bytes: saving registers, before any callback.
    reset_hold(tramp, tramp + 0x20);
    let stop = Arc::new(AtomicBool::new(false));
    let (lib2, stop2) = (lib.clone(), stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        // SAFETY: long (long).
        let looper: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib2.sym("loop_fn")) };
        // SAFETY: no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        while !stop2.load(Ordering::Relaxed) {
            assert_eq!(looper(100), 5050, "held_fn's results");
        }
    });
    catch(rx.recv().unwrap());
    // The thread's count is raised (its stub did it before the trampoline):
    // no grace period can end, though it runs no callback.
    assert!(!wait_for_grace(Duration::from_millis(300)).unwrap(), "a thread in a trampoline is not quiescent");
    t.unregister(h).unwrap();
    assert_eq!(t.reclaim(Duration::from_millis(300)).unwrap(), 0, "its trampoline is not freed under it");
    assert!(mapped(tramp));
    GO.store(true, Ordering::SeqCst);
    assert!(wait_for_grace(Duration::from_secs(5)).unwrap(), "released, it leaves the trampoline");
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    t.reclaim(Duration::from_secs(5)).unwrap();
    assert!(!mapped(tramp), "then the trampoline block goes");
}

/// A thread that executed a traced site's `call stub` and was preempted
/// before the stub's first instruction has not raised its count: grace
/// periods do not wait for it. What makes that safe: the stub is never
/// freed, and by the time the thread goes on, its word leads to the null
/// path, not to the freed trampoline. Held there (by a signal handler that
/// emulates the site's call), the thread must survive its op's
/// unregistration and the unmapping of the trampoline block, and finish
/// the call untraced.
#[test]
fn a_thread_preempted_right_after_a_site_call_survives_the_unmapping() {
    let _s = serial();
    let lib = Arc::new(Lib::open(&compile_so("gcall", SPIN_C, &[PATCHABLE, "-O1"])));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(true);
    install_hold();
    let held_fn = lib.sym("held_fn");
    let calls = || peek(lib.sym("held_calls"), 8);
    let op = Arc::new(Count(AtomicU64::new(0)));
    let h = t.register(op.clone(), filter(&["held_fn"])).unwrap();
    let (stub, tramp) = stub_and_trampoline(held_fn);
    reset_hold(lib.sym("spin"), lib.sym("spin_end"));
    CALL_STUB.store(stub, Ordering::SeqCst);
    CALL_FN.store(held_fn, Ordering::SeqCst);
    let lib2 = lib.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        // SAFETY: long (long).
        let f: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib2.sym("held_fn")) };
        // SAFETY: void (void).
        let spin: extern "C" fn() = unsafe { std::mem::transmute(lib2.sym("spin")) };
        assert_eq!(f(1), 2); // traced once: the thread is registered
                             // SAFETY: no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        spin();
    });
    catch(rx.recv().unwrap());
    assert_eq!(HELD_AT.load(Ordering::SeqCst), stub, "held on the stub's first instruction");
    let before = calls();
    let entries = op.0.load(Ordering::Relaxed);
    t.unregister(h).unwrap();
    assert!(t.reclaim(Duration::from_secs(5)).unwrap() > 0, "the grace period ends: the thread raised no count");
    assert!(!mapped(tramp), "the trampoline block is unmapped under the held thread");
    assert!(mapped(stub), "its stub is not");
    GO.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while calls() == before {
        assert!(start.elapsed() < Duration::from_secs(10), "the held call never completed");
        std::thread::yield_now();
    }
    // SAFETY: a global of the library.
    unsafe { (lib.sym("spin_stop") as *mut i32).write_volatile(1) };
    worker.join().unwrap();
    assert_eq!(op.0.load(Ordering::Relaxed), entries, "the late call went through the null path, untraced");
}

/// Eight threads (on however few cores) run traced functions in a loop
/// while their sites are traced and untraced thousands of times, each
/// time the trampoline block retired and unmapped by an explicit grace
/// period: threads are preempted everywhere, right after a site's CALL
/// included, and none may run freed code or get a wrong result.
#[test]
fn preempted_threads_survive_thousands_of_retirements() {
    let _s = serial();
    stress();
}

fn stress() {
    let lib = Arc::new(Lib::open(&compile_so(
        "gstress",
        r#"
#define F __attribute__((noipa))
F long gs_a(long x) { return x + 1; }
F long gs_b(long x) { return gs_a(x) * 2; }
F long gs_loop(long n) { long s = 0; for (long i = 0; i < n; i++) s += gs_b(i); return s; }
"#,
        &[PATCHABLE, "-O1"],
    )));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(true);
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let (lib, stop, bad) = (lib.clone(), stop.clone(), bad.clone());
            std::thread::spawn(move || {
                // SAFETY: long (long).
                let f: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("gs_loop")) };
                // The lowest priority: the test's thread preempts the workers
                // at will (everywhere in the stubs and trampolines), and is
                // not starved by ten of them on two cores.
                // SAFETY: setpriority on this thread's id.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
                while !stop.load(Ordering::Relaxed) {
                    // sum of 2(i+1) for i < 50
                    if f(50) != 2550 {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let rounds: usize = std::env::var("GRACE_STRESS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let op = Arc::new(Count(AtomicU64::new(0)));
    let (mut freed, mut left, start) = (0, 0, Instant::now());
    for k in 0..rounds {
        // Alternate between one op (direct trampolines) and two (list).
        let h = t.register(op.clone(), filter(&["gs_*"])).unwrap();
        let h2 = (k % 2 == 1).then(|| t.register(op.clone(), filter(&["gs_a"])).unwrap());
        std::thread::yield_now();
        if let Some(h2) = h2 {
            t.unregister(h2).unwrap();
        }
        t.unregister(h).unwrap();
        // The background reclaimer may free some of them first: either way
        // nothing retired may be left once the explicit step returns.
        freed += t.reclaim(Duration::from_secs(5)).unwrap();
        left += t.retired();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    println!(
        "{rounds} rounds in {:?}: {freed} items freed, {} traced calls",
        start.elapsed(),
        op.0.load(Ordering::Relaxed)
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "wrong results");
    assert_eq!(left, 0, "every round's trampolines and ops were freed");
    assert!(freed > 0, "the explicit grace periods freed retired items");
    assert!(op.0.load(Ordering::Relaxed) > 0, "the sites were traced");
}

/// A site's stubs live as long as its object: unloaded while traced, the
/// object's stub block is retired at the next refresh and freed after a
/// grace period.
#[test]
fn stubs_of_an_unloaded_object_are_freed() {
    let _s = serial();
    let lib = Lib::open(&compile_so("gunload", "long gu_fn(long x) { return x * 3; }", &[PATCHABLE, "-O1"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(true);
    let op = Arc::new(Count(AtomicU64::new(0)));
    let h = t.register(op.clone(), filter(&["gu_fn"])).unwrap();
    // SAFETY: long (long).
    let f: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("gu_fn")) };
    assert_eq!(f(2), 6);
    assert_eq!(op.0.load(Ordering::Relaxed), 1);
    let (stub, _) = stub_and_trampoline(lib.sym("gu_fn"));
    lib.close();
    t.refresh().unwrap();
    assert!(!t.functions().iter().any(|x| &*x.function == "gu_fn"));
    t.reclaim(Duration::from_secs(5)).unwrap();
    assert!(!mapped(stub), "the stubs of the unloaded library were unmapped");
    t.unregister(h).unwrap();
    t.reclaim(Duration::from_secs(5)).unwrap();
    assert_eq!(t.retired(), 0);
}
