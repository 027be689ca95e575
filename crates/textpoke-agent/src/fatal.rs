//! Fatal signals — `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGABRT` —
//! and the crash flush (see the crate docs, step 6, and
//! `textpoke_record::crash`): when one is about to kill the process, the
//! trace is written up to it first; the process then dies of it as it
//! would have, with a core dump when the default action dumps core.
//!
//! # Whose handler
//!
//! When recording starts, the agent's handler becomes the disposition of
//! the five signals, and the program's — what it had then, what it sets
//! later — is kept in a table the program sees instead of the kernel's:
//! `sigaction`, `signal`, `bsd_signal` and `sysv_signal` are wrapped (the
//! program's calls to them, not glibc's own). So the program's handlers
//! run as they would: with the same `siginfo` and `ucontext` (the ones the
//! kernel passed, changes included), the mask they asked for, on the
//! stack they asked for. The agent's disposition mirrors the program's
//! flags: its mask, `SA_RESTART`, `SA_NODEFER`, and `SA_ONSTACK` as the
//! program asked (always for `SIG_DFL`, so that a stack overflow reaches
//! the handler on an alternate stack: see `altstack`). `SIG_IGN` is set
//! as `SIG_IGN`: an ignored signal interrupts nothing. A disposition set
//! around the wrappers (a raw `rt_sigaction`, `sigset`) replaces the
//! agent's: noticed at the next wrapped call, which then passes through.
//!
//! # The handler (A1–A6)
//!
//! - **A1** reads the program's disposition (a seqlock: the wrappers
//!   write it with every signal blocked, so a handler never waits for its
//!   own thread).
//! - **A2** a fatal signal while this thread flushes the trace (the flush
//!   faulted on trampled memory): die at once of the first signal.
//! - **A3** a program handler: `SA_RESETHAND` is applied to the table, the
//!   handler is called. A program that recovers (guard pages, a JIT, a
//!   garbage collector's barriers) returns here and goes on: no flush.
//! - **A4** it returned from a `SIGABRT` the process sent itself: that is
//!   `abort()` (or `assert()`), which now removes the handler and raises
//!   again behind any wrapper (glibc's own `sigaction`), so the process
//!   dies without coming back here: flush now (a `raise(SIGABRT)` whose
//!   handler returns also pays one flush; the recorder carries on).
//! - **A5** `SIG_DFL` (or `SIG_IGN` for a fault the kernel reported,
//!   which it forces to the default): the default action is about to
//!   apply. Asynchronous signals are blocked, the flush runs on a stack
//!   of its own (256 KiB, mapped at install: the handler may be on a small
//!   alternate stack), then
//! - **A6** the disposition becomes `SIG_DFL` and the signal is queued
//!   again to this thread with its siginfo (`rt_tgsigqueueinfo`), unblocked
//!   in the context the handler returns to: the kernel delivers it as the
//!   handler returns, with the registers of the interrupted code. The
//!   process dies of that signal, dumping core when the default does
//!   (`RLIMIT_CORE`), and the core shows where it crashed. `abort()`'s
//!   `SIGABRT` is flushed once: the first one kills.
//!
//! Everything the handler does is async-signal-safe: atomics,
//! `sigaction`, `rt_sigprocmask`, `rt_tgsigqueueinfo`, `write` (a note on
//! `stderr` when the trace could not be written), `getpid`/`gettid`, and
//! the crash flush (see its docs); no allocation, no lock but the one the
//! flush only tries; `errno` is kept.
//!
//! # Limits
//!
//! A fatal signal the kernel cannot deliver kills the process at once:
//! a stack overflow on a thread without an alternate stack (one that never
//! recorded, or whose program handler lacks `SA_ONSTACK`), or a fault
//! while the signal is blocked. A program that ignores `SIGABRT` and calls
//! `abort()` dies in glibc's second raise, unflushed.

use crate::{getpid, AGENT_PID};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use textpoke_record::crash::{self, CrashFlush, FatalSignal};
use textpoke_sys::threads::{self, gettid};
use textpoke_sys::{anon, process, signals};

/// The signals whose default action the crash flush precedes.
pub(crate) const FATAL: [c_int; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGABRT];

fn slot_of(sig: c_int) -> Option<usize> {
    FATAL.iter().position(|&s| s == sig)
}

/// The kernel's flag for a signal-return trampoline, which glibc's
/// `sigaction` sets (x86-64; libc does not name it).
const SA_RESTORER: c_int = 0x0400_0000;

/// Signals the kernel raises for a fault of the instruction itself:
/// never blocked while the agent's code runs (blocked, they would kill).
const SYNC: [c_int; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP];

// ---------------------------------------------------------------------------
// The program's dispositions (A1).

/// The program's disposition of one signal.
struct Slot {
    /// Seqlock sequence: odd while a wrapper writes.
    seq: AtomicU32,
    handler: AtomicUsize,
    flags: AtomicI32,
    /// Signals 1–64 of its `sa_mask`.
    mask: AtomicU64,
    /// The agent's handler (or `SIG_IGN`, standing for the program's) is
    /// the kernel's disposition.
    taken: AtomicBool,
}

static SLOTS: [Slot; 5] = [const {
    Slot {
        seq: AtomicU32::new(0),
        handler: AtomicUsize::new(0),
        flags: AtomicI32::new(0),
        mask: AtomicU64::new(0),
        taken: AtomicBool::new(false),
    }
}; 5];

/// Serialises the wrappers' writes (a spin lock taken with every signal
/// blocked).
static WRITING: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, Debug)]
struct Action {
    handler: usize,
    flags: c_int,
    mask: u64,
}

impl Action {
    fn is_handler(&self) -> bool {
        self.handler != libc::SIG_DFL && self.handler != libc::SIG_IGN
    }
}

/// A1: the program's disposition of slot `i`. Async-signal-safe: retries
/// while a wrapper on another thread writes (a few instructions, with
/// its signals blocked).
fn load(i: usize) -> Action {
    let s = &SLOTS[i];
    loop {
        // Acquire pairs with the writer's final release store of `seq`.
        let s1 = s.seq.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            let a = Action {
                handler: s.handler.load(Ordering::Relaxed),
                flags: s.flags.load(Ordering::Relaxed),
                mask: s.mask.load(Ordering::Relaxed),
            };
            // The loads above happen before the check below (pairs with
            // the writer's release fence after its odd store).
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) == s1 {
                return a;
            }
        }
        std::hint::spin_loop();
    }
}

/// Stores slot `i`'s disposition. The caller holds [`WRITING`].
fn store(i: usize, a: Action) {
    let s = &SLOTS[i];
    let n = s.seq.load(Ordering::Relaxed);
    s.seq.store(n.wrapping_add(1), Ordering::Relaxed);
    // Release fence: the odd sequence is visible before the new fields
    // (pairs with the reader's acquire fence).
    fence(Ordering::Release);
    s.handler.store(a.handler, Ordering::Relaxed);
    s.flags.store(a.flags, Ordering::Relaxed);
    s.mask.store(a.mask, Ordering::Relaxed);
    // Release pairs with the reader's acquire load of `seq`.
    s.seq.store(n.wrapping_add(2), Ordering::Release);
}

/// Runs `f` holding [`WRITING`] with every signal blocked, so that no
/// handler on this thread can wait for it.
fn with_write_lock<R>(f: impl FnOnce() -> R) -> R {
    let old = signals::swap_mask(libc::SIG_SETMASK, &signals::all_but(&[]));
    // Acquire pairs with the release below on another thread.
    while WRITING.swap(true, Ordering::Acquire) {
        std::hint::spin_loop();
    }
    let r = f();
    WRITING.store(false, Ordering::Release);
    signals::set_mask(libc::SIG_SETMASK, &old); // the mask saved above
    r
}

/// The first 64 signals of a set.
fn mask_bits(set: &libc::sigset_t) -> u64 {
    // SAFETY: glibc's sigset_t is an array of words whose first holds
    // signals 1–64 (bit n-1 for signal n).
    unsafe { *(set as *const libc::sigset_t as *const u64) }
}

fn mask_set(bits: u64) -> libc::sigset_t {
    // SAFETY: as in mask_bits; the rest stays empty.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        *(&mut set as *mut libc::sigset_t as *mut u64) = bits;
        set
    }
}

/// The signals the agent's code may block: all but the faults.
fn async_signals() -> libc::sigset_t {
    signals::all_but(&SYNC)
}

// ---------------------------------------------------------------------------
// The real functions.

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static REAL_SYSV_SIGNAL: AtomicUsize = AtomicUsize::new(0);

type SigactionFn = unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;

/// The next definition of `name` after the agent's (glibc's), resolved
/// once (`dlsym` may allocate: first from a wrapper or at install, never
/// from a handler, which runs only once [`install`] resolved it).
fn resolve(cell: &AtomicUsize, name: &std::ffi::CStr) -> usize {
    let p = cell.load(Ordering::Acquire);
    if p != 0 {
        return p;
    }
    // SAFETY: RTLD_NEXT lookup of a NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    cell.store(p, Ordering::Release);
    p
}

/// Finds the real functions, at load: the wrappers may be called from
/// signal handlers, where `dlsym` must not run.
pub(crate) fn resolve_all() {
    resolve(&REAL_SIGACTION, c"sigaction");
    resolve(&REAL_SIGNAL, c"signal");
    resolve(&REAL_SYSV_SIGNAL, c"sysv_signal");
}

/// glibc's `sigaction`; -1 (ENOSYS) if it cannot be found.
fn real_sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    match resolve(&REAL_SIGACTION, c"sigaction") {
        0 => {
            set_errno(libc::ENOSYS);
            -1
        }
        p => {
            // SAFETY: glibc's sigaction, with the caller's arguments.
            unsafe { std::mem::transmute::<usize, SigactionFn>(p)(sig, act, old) }
        }
    }
}

use textpoke_sys::threads::{errno, set_errno};

/// The kernel's disposition the agent sets for the program's `a`.
fn kernel_action(a: Action) -> libc::sigaction {
    // SAFETY: plain data; zeroed is a valid start.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    if a.handler == libc::SIG_IGN {
        sa.sa_sigaction = libc::SIG_IGN;
        return sa;
    }
    sa.sa_sigaction = on_fatal as *const () as usize;
    let mirrored = a.flags & (libc::SA_RESTART | libc::SA_NODEFER);
    if a.is_handler() {
        sa.sa_flags = libc::SA_SIGINFO | mirrored | (a.flags & libc::SA_ONSTACK);
        sa.sa_mask = mask_set(a.mask);
    } else {
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | mirrored;
        sa.sa_mask = async_signals();
    }
    sa
}

/// The process is the agent's own (not a `vfork` child sharing its
/// memory, whose dispositions are its own).
fn own_process() -> bool {
    getpid() == AGENT_PID.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Install.

/// The flush's own stack (A5): its top, 0 if it could not be mapped; and
/// whether a thread runs on it.
static CRASH_STACK_TOP: AtomicUsize = AtomicUsize::new(0);
static CRASH_STACK_BUSY: AtomicBool = AtomicBool::new(false);
const CRASH_STACK: usize = 256 << 10;

/// Takes the five signals over, keeping what the program had as its
/// disposition (step 6 of the crate docs), and gives recording threads an
/// alternate stack. Once per process image (a forked child inherits both).
pub(crate) fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        resolve_all();
        map_crash_stack();
        crate::altstack::enable();
        for (i, &sig) in FATAL.iter().enumerate() {
            with_write_lock(|| {
                // SAFETY: plain data.
                let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
                if real_sigaction(sig, std::ptr::null(), &mut cur) != 0 {
                    return;
                }
                if cur.sa_sigaction == on_fatal as *const () as usize {
                    SLOTS[i].taken.store(true, Ordering::Release);
                    return;
                }
                let a = Action {
                    handler: cur.sa_sigaction,
                    flags: cur.sa_flags & !SA_RESTORER,
                    mask: mask_bits(&cur.sa_mask),
                };
                store(i, a);
                if a.handler == libc::SIG_IGN || real_sigaction(sig, &kernel_action(a), std::ptr::null_mut()) == 0 {
                    SLOTS[i].taken.store(true, Ordering::Release);
                }
            });
        }
    });
}

fn map_crash_stack() {
    let page = 4096;
    // The lowest page is a guard: an overflow faults instead of writing
    // below.
    if let Some(p) = anon::map_with_guard(CRASH_STACK, page) {
        CRASH_STACK_TOP.store(p as usize + CRASH_STACK + page, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------
// The wrappers.

/// `sigaction(2)`: for the five signals once taken over, reads and writes
/// the program's disposition (see the module docs); others pass through.
///
/// # Safety
///
/// The arguments of `sigaction(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let Some(i) = slot_of(sig).filter(|_| own_process()) else {
        return real_sigaction(sig, act, old);
    };
    // Copied before the lock: a bad pointer faults here, as in glibc.
    // SAFETY: the caller's contract.
    let new = (!act.is_null()).then(|| unsafe { *act });
    let mut failed = 0;
    let r = with_write_lock(|| {
        if !SLOTS[i].taken.load(Ordering::Acquire) {
            // Not (or no longer) the agent's: the kernel's, under the lock
            // so that `install` cannot read an old disposition meanwhile.
            return None;
        }
        // SAFETY: plain data.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        real_sigaction(sig, std::ptr::null(), &mut cur);
        let prev = load(i);
        let ours = if prev.handler == libc::SIG_IGN { libc::SIG_IGN } else { on_fatal as *const () as usize };
        if cur.sa_sigaction != ours {
            // Replaced around the wrappers: the program's now, for good.
            SLOTS[i].taken.store(false, Ordering::Release);
            return None;
        }
        if let Some(n) = new {
            let a = Action { handler: n.sa_sigaction, flags: n.sa_flags & !SA_RESTORER, mask: mask_bits(&n.sa_mask) };
            if real_sigaction(sig, &kernel_action(a), std::ptr::null_mut()) != 0 {
                failed = errno();
            } else {
                store(i, a);
            }
        }
        Some((prev, cur))
    });
    let Some((prev, cur)) = r else {
        let mut res = 0;
        let mut e = 0;
        with_write_lock(|| {
            res = real_sigaction(sig, new.as_ref().map_or(std::ptr::null(), |n| n as *const _), old);
            e = errno();
        });
        set_errno(e);
        return res;
    };
    if failed != 0 {
        set_errno(failed);
        return -1;
    }
    if !old.is_null() {
        // SAFETY: the caller's contract: `old` is writable.
        unsafe {
            let mut o: libc::sigaction = std::mem::zeroed();
            o.sa_sigaction = prev.handler;
            o.sa_flags = prev.flags | (cur.sa_flags & SA_RESTORER);
            o.sa_restorer = cur.sa_restorer;
            o.sa_mask = mask_set(prev.mask);
            *old = o;
        }
    }
    0
}

/// `signal` as glibc defines it (BSD semantics), through [`sigaction`].
fn emulated_signal(sig: c_int, handler: libc::sighandler_t, flags: c_int, mask_self: bool) -> libc::sighandler_t {
    // SAFETY: plain data and set manipulation.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    if mask_self {
        sa.sa_mask = signals::set_of(&[sig]); // the zeroed mask was empty
    }
    // SAFETY: plain data.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid structs.
    if unsafe { sigaction(sig, &sa, &mut old) } < 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// One of the five signals in the agent's own process: [`sigaction`]
/// decides (the agent's table, or the kernel's under its lock).
fn routed(sig: c_int) -> bool {
    slot_of(sig).is_some() && own_process()
}

fn real_signal(
    cell: &AtomicUsize,
    name: &std::ffi::CStr,
    sig: c_int,
    handler: libc::sighandler_t,
) -> libc::sighandler_t {
    match resolve(cell, name) {
        0 => {
            set_errno(libc::ENOSYS);
            libc::SIG_ERR
        }
        // SAFETY: glibc's function of that name and type.
        p => unsafe { std::mem::transmute::<usize, SignalFn>(p)(sig, handler) },
    }
}

/// `signal(3)` (glibc's BSD semantics: `SA_RESTART`, the signal blocked
/// in its handler).
///
/// # Safety
///
/// The arguments of `signal(3)`.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if routed(sig) {
        return emulated_signal(sig, handler, libc::SA_RESTART, true);
    }
    real_signal(&REAL_SIGNAL, c"signal", sig, handler)
}

/// `bsd_signal(3)`: `signal`.
///
/// # Safety
///
/// The arguments of `signal(3)`.
#[no_mangle]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: the caller's contract.
    unsafe { signal(sig, handler) }
}

/// `sysv_signal(3)`: one-shot, not blocked in its handler.
///
/// # Safety
///
/// The arguments of `sysv_signal(3)`.
#[no_mangle]
pub unsafe extern "C" fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if routed(sig) {
        return emulated_signal(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER, false);
    }
    real_signal(&REAL_SYSV_SIGNAL, c"sysv_signal", sig, handler)
}

// ---------------------------------------------------------------------------
// The handler.

/// Whether `info` is a signal this process sent itself (`raise`,
/// `abort`, `kill(getpid())`).
///
/// # Safety
///
/// `info` is the kernel's siginfo.
unsafe fn self_sent(info: *const libc::siginfo_t) -> bool {
    // SAFETY: the caller's contract; si_pid is valid for these codes.
    unsafe {
        let code = (*info).si_code;
        (code == libc::SI_TKILL || code == libc::SI_USER) && (*info).si_pid() == getpid()
    }
}

/// The agent's handler of the five signals: A1–A6 of the module docs.
extern "C" fn on_fatal(sig: c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    let Some(i) = slot_of(sig) else { return };
    // A2.
    if let Some(first) = crash::flushing_signal_here() {
        die_now(if first > 0 { first } else { sig });
    }
    let a = load(i); // A1
                     // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let from_kernel = unsafe { (*info).si_code } > 0;
    if a.is_handler() {
        if a.flags & libc::SA_RESETHAND != 0 {
            reset_to_default(i, sig);
        }
        // A3.
        if a.flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the program installed it as an SA_SIGINFO handler.
            let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = unsafe { std::mem::transmute(a.handler) };
            f(sig, info, uc);
        } else {
            // SAFETY: the program installed it as a plain handler.
            let f: extern "C" fn(c_int) = unsafe { std::mem::transmute(a.handler) };
            f(sig);
        }
        // A4.
        // SAFETY: as above.
        if sig == libc::SIGABRT && unsafe { self_sent(info) } {
            let e = errno();
            flush(sig, info);
            set_errno(e);
        }
        return;
    }
    if a.handler == libc::SIG_IGN && !from_kernel {
        return; // set while the signal was on its way
    }
    // A5, A6.
    let e = errno();
    flush(sig, info);
    requeue_default(sig, info, uc);
    set_errno(e);
}

/// `SA_RESETHAND`: the program's disposition becomes `SIG_DFL` as the
/// handler is called.
fn reset_to_default(i: usize, sig: c_int) {
    let e = errno();
    let dfl = Action { handler: libc::SIG_DFL, flags: 0, mask: 0 };
    with_write_lock(|| {
        store(i, dfl);
        real_sigaction(sig, &kernel_action(dfl), std::ptr::null_mut());
    });
    set_errno(e);
}

/// A5: the crash flush, with asynchronous signals blocked (restored by
/// the kernel from the context when the handler returns), on the flush's
/// own stack; a note on stderr when the trace could not be written.
fn flush(sig: c_int, info: *const libc::siginfo_t) {
    if !own_process() {
        return; // a vfork child: the recorder is its parent's
    }
    let set = async_signals();
    signals::set_mask(libc::SIG_BLOCK, &set);
    // SAFETY: the kernel's siginfo for `sig`.
    let mut job = Job { sig: unsafe { FatalSignal::from_siginfo(sig, info) }, out: CrashFlush::NotRecording };
    let top = CRASH_STACK_TOP.load(Ordering::Acquire);
    // Only one thread at a time on the flush's stack; another crashing
    // meanwhile only waits inside the flush, on its own stack.
    if top != 0 && !CRASH_STACK_BUSY.swap(true, Ordering::Acquire) {
        // SAFETY: `top` is the 16-aligned top of a mapping of our own that
        // no other thread uses (CRASH_STACK_BUSY); run_job takes `job`.
        unsafe { call_on_stack((&mut job as *mut Job).cast(), run_job, top as *mut u8) };
        CRASH_STACK_BUSY.store(false, Ordering::Release);
    } else {
        run_job((&mut job as *mut Job).cast());
    }
    match job.out {
        CrashFlush::Busy => note(
            sig,
            b" arrived while the recorder was busy (its writer crashed, or held the trace for more than 2 s): \
              the trace was not flushed; it is left as last written, incomplete",
            None,
            b"",
        ),
        CrashFlush::Failed { errno, .. } => note(
            sig,
            b": writing the trace failed (errno ",
            Some(errno),
            b"); it holds what could be written, incomplete",
        ),
        _ => {}
    }
}

/// The flush to run, and what it did.
struct Job {
    sig: FatalSignal,
    out: CrashFlush,
}

extern "C" fn run_job(p: *mut c_void) {
    // SAFETY: `flush` passes its own Job, alive across the call.
    let job = unsafe { &mut *(p as *mut Job) };
    let sig = job.sig;
    // A panic must not unwind through call_on_stack's frame.
    job.out = std::panic::catch_unwind(move || crash::flush_for_signal(&sig)).unwrap_or(CrashFlush::Busy);
}

/// Calls `f(arg)` with the stack pointer at `top`, and comes back.
///
/// # Safety
///
/// `top` is the 16-byte aligned top of writable memory large enough for
/// `f`, that nothing else uses meanwhile.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
unsafe extern "C" fn call_on_stack(arg: *mut c_void, f: extern "C" fn(*mut c_void), top: *mut u8) {
    // Entry: rsp = 8 mod 16; after the push, 0. `top` is 16-aligned, so
    // the call leaves f's entry at 8 mod 16, as the ABI wants. rdi (arg)
    // is f's argument as it stands.
    core::arch::naked_asm!("push rbp", "mov rbp, rsp", "mov rsp, rdx", "call rsi", "mov rsp, rbp", "pop rbp", "ret",)
}

/// Calls `f(arg)` with the stack pointer at `top`, and comes back.
///
/// # Safety
///
/// As the x86-64 version.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
unsafe extern "C" fn call_on_stack(arg: *mut c_void, f: extern "C" fn(*mut c_void), top: *mut u8) {
    // A frame record on the old stack, x29 keeping its address across the
    // call (callee-saved); x0 (arg) is f's argument as it stands.
    core::arch::naked_asm!(
        "stp x29, x30, [sp, #-16]!",
        "mov x29, sp",
        "mov sp, x2",
        "blr x1",
        "mov sp, x29",
        "ldp x29, x30, [sp], #16",
        "ret",
    )
}

/// A6: `SIG_DFL`, then `sig` queued again to this thread with its
/// siginfo and unblocked in the context the handler returns to: delivered
/// as the handler returns, it kills the process.
fn requeue_default(sig: c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    signals::set_default_raw(sig);
    if !uc.is_null() {
        // SAFETY: the kernel's ucontext for this handler; its mask is the
        // one sigreturn restores.
        signals::remove(unsafe { &mut (*(uc as *mut libc::ucontext_t)).uc_sigmask }, sig);
    }
    // SAFETY: the kernel's siginfo for `sig`.
    if unsafe { threads::requeue_to_self(sig, info) }.is_err() {
        let _ = threads::kill_thread(gettid(), sig);
    }
}

/// A2: the flush faulted: the process dies now, of `first`.
fn die_now(first: c_int) -> ! {
    signals::set_default_raw(first);
    // Unblocked and sent to this thread: delivered at once, with the
    // default action.
    signals::set_mask(libc::SIG_UNBLOCK, &mask_set(1u64 << (first - 1)));
    let _ = threads::kill_thread(gettid(), first);
    process::exit_group(128 + first) // if the signal somehow did not end it
}

/// `textpoke: SIGNAME{before}{errno}{after}` on a line of stderr, with
/// `write(2)`.
fn note(sig: c_int, before: &[u8], err: Option<i32>, after: &[u8]) {
    let name = textpoke_record::format::SignalEnd::signal_name(sig).as_bytes();
    let mut line = [0u8; 320];
    let mut at = 0;
    let mut put = |b: &[u8]| {
        let n = b.len().min(line.len() - 1 - at);
        line[at..at + n].copy_from_slice(&b[..n]);
        at += n;
    };
    put(b"textpoke: ");
    put(name);
    put(before);
    if let Some(e) = err {
        let mut d = [0u8; 12];
        let mut n = e.unsigned_abs();
        let mut k = d.len();
        loop {
            k -= 1;
            d[k] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        put(&d[k..]);
    }
    put(after);
    line[at] = b'\n';
    textpoke_sys::write_stderr(&line[..at + 1]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_round_trip_and_exclude_the_faults() {
        let set = mask_set(1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGTERM - 1));
        assert!(signals::contains(&set, libc::SIGUSR1));
        assert!(signals::contains(&set, libc::SIGTERM));
        assert!(!signals::contains(&set, libc::SIGINT));
        assert_eq!(mask_bits(&set), 1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGTERM - 1));
        let a = async_signals();
        assert!(!signals::contains(&a, libc::SIGSEGV));
        assert!(!signals::contains(&a, libc::SIGTRAP));
        assert!(signals::contains(&a, libc::SIGABRT));
    }

    #[test]
    fn the_kernel_disposition_mirrors_the_programs_flags() {
        let h = Action { handler: 0x1234, flags: libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_RESETHAND, mask: 4 };
        let k = kernel_action(h);
        assert_eq!(k.sa_flags, libc::SA_SIGINFO | libc::SA_RESTART, "no SA_ONSTACK unless asked; no SA_RESETHAND");
        assert_eq!(mask_bits(&k.sa_mask), 4);
        let k = kernel_action(Action { handler: 0x1234, flags: libc::SA_ONSTACK | libc::SA_NODEFER, mask: 0 });
        assert_eq!(k.sa_flags, libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER);
        let k = kernel_action(Action { handler: libc::SIG_DFL, flags: 0, mask: 0 });
        assert_eq!(k.sa_flags, libc::SA_SIGINFO | libc::SA_ONSTACK, "SIG_DFL: on the alternate stack");
        assert_eq!(k.sa_sigaction, on_fatal as *const () as usize);
        assert_eq!(kernel_action(Action { handler: libc::SIG_IGN, flags: 0, mask: 0 }).sa_sigaction, libc::SIG_IGN);
    }
}
