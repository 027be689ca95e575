//! A signal rendezvous with every other thread of this process.
//!
//! # Algorithm
//!
//! The patcher (commits are serialised, so there is one) fills a slot table
//! with the ids of the threads it signals and starts a new request
//! generation `gen`. Each thread is sent one real-time signal carrying
//! `gen` and the request kind in `si_value`:
//!
//! - **sync**: the handler serialises its core, then stores `gen` into its
//!   slot's `acked` (Release; pairs with the patcher's Acquire load).
//! - **sample**: the handler stores the value of the sample hook (the
//!   tracer's "am I inside tracer code" count), then acks. Used only by
//!   grace periods on kernels without `membarrier`, and only for threads
//!   seen running user code (see `trace::grace`).
//! - **park**: the handler stores its interrupted PC, then `acked = gen`
//!   (Release), then sleeps on the `RELEASED` futex until the patcher
//!   releases `gen`, serialises its core, and returns. All signals are
//!   blocked in the handler, so nothing else runs on that thread meanwhile.
//!
//! The patcher waits until every slot acked `gen` or its thread is gone
//! (`tgkill(tid, 0)` says `ESRCH`), bounded by a deadline. Parking re-lists
//! the threads after everyone acked, and parks newcomers, until a listing
//! shows no thread that is not parked: only unparked threads can create
//! threads, and the patcher creates none.
//!
//! Nothing between "park" and "release" allocates or takes a lock: the
//! parked threads may hold any lock of the process, malloc's included. The
//! slot table is sized before parking and never freed (a late handler may
//! still read it); a stale handler of an earlier request sees its `gen`
//! already released, or acks a `gen` nobody waits for.
//!
//! # Memory ordering
//!
//! Four pairs of barriers; every other access is Relaxed because one of
//! them orders it, or because only the patcher touches it:
//!
//! - a new table: `TABLES` stored with Release in `reserve`, loaded with
//!   Acquire by `table` and the handler (the slots' initial values);
//! - a slot: filled (`tid`, `acked`) with Relaxed stores, published by the
//!   Release store of `used` in `enlist`, which the handler loads with
//!   Acquire before it looks for its `tid` (the signal, a system call, is
//!   sent after that store anyway);
//! - an answer: the handler's Relaxed stores of `pc`/`sp`/`restorer` or
//!   `aux`, published by its Release store of `acked`, which `wait_all`,
//!   `Parked::for_each_pc` and `sample_threads` load with Acquire before
//!   they read them;
//! - the release: the patcher's code writes, then its Release store of
//!   `RELEASED` in `Parked::do_release`, which a parked handler loads with
//!   Acquire before it serialises its core and returns to the code.
//!
//! `GEN` is a counter (Relaxed `fetch_add`: unique values, nothing
//! published through it; a generation travels in the signal's value).
//!
//! # Under a user-mode emulator (qemu-user)
//!
//! Two things differ there, both shown outside textpoke by
//! `.ci/aarch64-qemu-signals.c` (see `sys::emulation`):
//!
//! - `SIGRTMAX - 1` may have no host signal behind it: sending it fails
//!   with `EINVAL` (qemu-aarch64 7.2 carries guest signals up to 62 of
//!   64). [`rendezvous_signal`] probes the number once and, when it cannot
//!   be sent, takes the highest lower real-time signal that can and that
//!   nobody handles; when none can, installing fails with an error saying
//!   so. Any failure to send other than "the thread is gone" fails the
//!   request: it used to be taken for a full slot table and retried
//!   forever, which was the stop-machine hang under qemu.
//! - `/proc/self/task` lists the emulator's own threads (qemu's
//!   `call_rcu`), which run no program code and block every signal, so
//!   they never answer. A thread that has not answered after
//!   [`EMULATOR_GRACE`] while the process runs under qemu-user and whose
//!   host mask blocks every asynchronous signal is taken for one: it is left out of
//!   the request (nothing to park: it runs no program code) and
//!   remembered, so later requests do not signal it at all. A remembered
//!   thread is looked at again each time (its mask read from `/proc`,
//!   allocation-free), in case its id was reused by a program thread. On a
//!   kernel running the program natively, or under another emulator
//!   (valgrind), none of this applies: no thread is ever left out, and one
//!   blocking the signal fails the request.

use crate::arch;
use crate::error::PokeError;
use crate::sys::emulation;
use crate::sys::signals;
use crate::sys::threads::{self, for_each_tid, gettid, signal_thread};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How long a thread may take to answer before the request fails.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);

/// [`RESPONSE_DEADLINE`] under a user-mode emulator: there a guest thread
/// takes a signal only when the emulator's thread for it gets back to its
/// execution loop, behind the emulator's own locks (translation, exclusive
/// sections for atomics), and on a loaded host that took more than 5 s
/// (stress.rs's stop-machine test under qemu-aarch64 at load 25, a few
/// runs in ten). Natively the deadline stays 5 s.
pub const EMULATED_RESPONSE_DEADLINE: Duration = Duration::from_secs(30);

/// The deadline for this process ([`RESPONSE_DEADLINE`], or
/// [`EMULATED_RESPONSE_DEADLINE`] under a user-mode emulator).
pub fn response_deadline() -> Duration {
    if emulation::user_mode_emulator() {
        EMULATED_RESPONSE_DEADLINE
    } else {
        RESPONSE_DEADLINE
    }
}

/// Under a user-mode emulator, how long a thread that blocks every signal
/// in its host mask may take to answer before it is taken for one of the
/// emulator's own threads (module docs). A program thread caught while
/// qemu delivers it a signal unblocks within microseconds.
pub const EMULATOR_GRACE: Duration = Duration::from_millis(50);

/// The emulator's own threads found so far (0: a free entry): a cache,
/// filled and emptied with compare-and-swap by the patcher and the grace
/// periods' sampler alike. Relaxed throughout: no other data is published
/// with an entry, and a lost or doubled entry only costs a wait.
static EMULATOR_THREADS: [AtomicI32; 4] = [const { AtomicI32::new(0) }; 4];

struct Slot {
    tid: AtomicI32,
    acked: AtomicU32,
    pc: AtomicUsize,
    sp: AtomicUsize,
    restorer: AtomicUsize,
    aux: AtomicUsize,
}

struct Table {
    slots: Box<[Slot]>,
    used: AtomicUsize,
}

/// Slot tables: one for sync and park rounds (run under the engine's
/// commit lock), one for sample rounds (run by grace periods, which must
/// not hold up commits).
static TABLES: [AtomicPtr<Table>; 2] = [AtomicPtr::new(std::ptr::null_mut()), AtomicPtr::new(std::ptr::null_mut())];
const COMMIT_TABLE: usize = 0;
const SAMPLE_TABLE: usize = 1;
static GEN: AtomicU32 = AtomicU32::new(0);
/// Highest park generation released (futex word of parked threads).
static RELEASED: AtomicU32 = AtomicU32::new(0);
static INSTALLED: Once = Once::new();
/// The OS error installing the handler failed with, or 0.
static INSTALL_ERROR: AtomicI32 = AtomicI32::new(0);

const KIND_SYNC: usize = 0;
const KIND_PARK: usize = 1;
const KIND_SAMPLE: usize = 2;
const KIND_BITS: u32 = 2;

/// A function the sample handler calls on each thread, whose result it
/// reports (set once by the tracer).
static SAMPLE_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Sets the sample hook (an async-signal-safe function).
pub fn set_sample_hook(f: extern "C" fn() -> usize) {
    // Release: pairs with the Acquire load in `on_rendezvous`, which then
    // calls the function.
    SAMPLE_HOOK.store(f as *const () as usize, Ordering::Release);
}

/// The chosen rendezvous signal, 0 before the first choice.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The real-time signal textpoke uses for rendezvous: `SIGRTMAX - 1`,
/// away from glibc's reserved low ones and the `SIGRTMIN + n` applications
/// usually pick. Under a user-mode emulator that cannot carry it, the
/// highest lower one that can and that nobody handles (module docs). The
/// first call probes (a few system calls, no handler runs); later calls
/// return the same number.
pub fn rendezvous_signal() -> i32 {
    // Relaxed: the number is the only data; every caller uses the first
    // one stored.
    match SIGNAL.load(Ordering::Relaxed) {
        0 => {
            let chosen = choose_signal();
            match SIGNAL.compare_exchange(0, chosen, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => chosen,
                Err(first) => first,
            }
        }
        s => s,
    }
}

#[cold]
fn choose_signal() -> i32 {
    let preferred = signals::realtime_max() - 1;
    if emulation::can_send_to_self(preferred).is_ok() {
        return preferred;
    }
    // Leave the lowest few to the program (glibc's are below SIGRTMIN).
    let nobody_handles = |s: i32| signals::action(s).sa_sigaction == libc::SIG_DFL;
    ((libc::SIGRTMIN() + 4)..preferred)
        .rev()
        .find(|&s| nobody_handles(s) && emulation::can_send_to_self(s).is_ok())
        .unwrap_or(preferred) // install() reports that it cannot be sent
}

/// `a` is at or past `b` in wrapping generation order.
fn reached(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

fn table(which: usize) -> &'static Table {
    // SAFETY: once set, a table pointer names a leaked Table that lives
    // forever; `reserve` runs before any use. Acquire: pairs with the
    // Release store in `reserve` (the table's initial slots).
    unsafe { &*TABLES[which].load(Ordering::Acquire) }
}

/// Makes sure the table has room for `n` threads (allocates; call before
/// parking). An old table is leaked, never freed: late handlers may read it.
fn reserve(which: usize, n: usize) {
    let cur = TABLES[which].load(Ordering::Acquire); // pairs with the store below (an earlier reserve)
                                                     // SAFETY: as in `table`.
    if !cur.is_null() && unsafe { &*cur }.slots.len() >= n {
        return;
    }
    let cap = n.next_power_of_two().max(64);
    let slots = (0..cap)
        .map(|_| Slot {
            tid: AtomicI32::new(0),
            acked: AtomicU32::new(0),
            pc: AtomicUsize::new(0),
            sp: AtomicUsize::new(0),
            restorer: AtomicUsize::new(0),
            aux: AtomicUsize::new(0),
        })
        .collect();
    let t = Box::into_raw(Box::new(Table { slots, used: AtomicUsize::new(0) }));
    // Release: publishes the table's initial slots; pairs with the Acquire
    // loads in `table`, `reserve` and `on_rendezvous`.
    TABLES[which].store(t, Ordering::Release);
}

/// Installing failed because no real-time signal can be sent (module docs).
const NO_SIGNAL: i32 = -1;

fn install() -> Result<(), PokeError> {
    INSTALLED.call_once(|| {
        reserve(COMMIT_TABLE, 64);
        reserve(SAMPLE_TABLE, 64);
        // Allocates on its first call: here, never while threads are parked.
        emulation::user_mode_emulator();
        let sig = rendezvous_signal();
        if emulation::can_send_to_self(sig).is_err() {
            // Relaxed: `call_once` orders it before every later load.
            INSTALL_ERROR.store(NO_SIGNAL, Ordering::Relaxed);
            return;
        }
        // Everything but the synchronous signals blocked while the handler
        // runs (see `sys::signals`).
        let flags = libc::SA_RESTART | libc::SA_ONSTACK;
        if let Err(e) = signals::install(sig, on_rendezvous, flags) {
            // Relaxed: as above.
            INSTALL_ERROR.store(e.raw_os_error().unwrap_or(libc::EINVAL), Ordering::Relaxed);
        }
    });
    match INSTALL_ERROR.load(Ordering::Relaxed) {
        0 => Ok(()),
        NO_SIGNAL => Err(PokeError::Sys {
            what: "find a real-time signal this process can send its threads (SIGRTMAX-1 and every lower one \
                   nobody handles were refused; qemu-user carries only part of them): threads cannot be \
                   parked or synced by signals",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }),
        e => Err(PokeError::Sys {
            what: "install the rendezvous signal handler",
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// The signal handler. Async-signal-safe: atomics, futex, no allocation.
extern "C" fn on_rendezvous(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } != libc::SI_QUEUE {
        return; // not ours (someone else sent this signal number)
    }
    // SAFETY: SI_QUEUE signals of this number are sent by `signal_thread`.
    let value = unsafe { threads::signal_value(info) };
    let gen = (value >> KIND_BITS) as u32;
    let kind = value & ((1 << KIND_BITS) - 1);
    let which = if kind == KIND_SAMPLE { SAMPLE_TABLE } else { COMMIT_TABLE };
    let t = TABLES[which].load(Ordering::Acquire); // pairs with reserve's Release
    if t.is_null() {
        return;
    }
    // SAFETY: tables are leaked, never freed.
    let t = unsafe { &*t };
    super::note_held();
    let me = gettid();
    // Acquire: pairs with enlist's Release store of `used`, so the Relaxed
    // `tid` loads below see the slots filled before it.
    let used = t.used.load(Ordering::Acquire).min(t.slots.len());
    let Some(slot) = t.slots[..used].iter().find(|s| s.tid.load(Ordering::Relaxed) == me) else {
        arch::serialize_core();
        return;
    };
    if kind == KIND_SAMPLE {
        let hook = SAMPLE_HOOK.load(Ordering::Acquire); // pairs with set_sample_hook's Release
        let aux = if hook == 0 {
            0
        } else {
            // SAFETY: set_sample_hook stored an `extern "C" fn() -> usize`.
            unsafe { std::mem::transmute::<usize, extern "C" fn() -> usize>(hook)() }
        };
        slot.aux.store(aux, Ordering::Relaxed); // published by the Release below
                                                // Release: publishes `aux`; pairs with the Acquire loads of `acked`
                                                // in `wait_all` and `sample_threads`.
        slot.acked.store(gen, Ordering::Release);
        return;
    }
    if kind != KIND_PARK {
        arch::serialize_core();
        slot.acked.store(gen, Ordering::Release); // after the serialisation; pairs with wait_all's Acquire
        return;
    }
    // Acquire: pairs with do_release's Release (a late signal returns to
    // code the patcher has finished writing).
    if reached(RELEASED.load(Ordering::Acquire), gen) {
        return; // a late signal of a request already over
    }
    // SAFETY: ctx is the ucontext_t the kernel passed to this handler.
    unsafe { record_context(slot, ctx.cast()) };
    // Release: publishes pc/sp/restorer; pairs with the Acquire loads of
    // `acked` in `wait_all` and `Parked::for_each_pc`.
    slot.acked.store(gen, Ordering::Release);
    loop {
        let r = RELEASED.load(Ordering::Acquire); // pairs with do_release's Release: the writes are done
        if reached(r, gen) {
            break;
        }
        crate::sys::futex_wait(&RELEASED, r, None);
    }
    // The code changed while we were parked: serialise before returning to it.
    arch::serialize_core();
}

impl Slot {
    /// Every PC the thread will resume at: the one it was interrupted at,
    /// then those saved in the signal frames of handlers it was running
    /// (DESIGN.md rule 4). Allocation-free.
    fn for_each_resume_pc(&self, mut f: impl FnMut(usize)) {
        // Relaxed: the caller loaded `acked` with Acquire first (pairs with
        // the handler's Release after record_context).
        f(self.pc.load(Ordering::Relaxed));
        let (sp, restorer) = (self.sp.load(Ordering::Relaxed), self.restorer.load(Ordering::Relaxed));
        arch::for_each_outer_pc(sp, restorer, crate::sys::read_memory, f);
    }
}

/// Stores where the interrupted thread was.
///
/// # Safety
/// `ctx` is the ucontext the kernel passed to the running handler.
unsafe fn record_context(slot: &Slot, ctx: *const libc::ucontext_t) {
    // SAFETY: `ctx` is the running handler's ucontext (this fn's contract).
    let (pc, sp, restorer) = unsafe { (arch::context_pc(ctx), arch::context_sp(ctx), arch::frame_restorer(ctx)) };
    // Relaxed: published by the handler's Release store of `acked`.
    slot.pc.store(pc, Ordering::Relaxed);
    slot.sp.store(sp, Ordering::Relaxed);
    slot.restorer.store(restorer, Ordering::Relaxed);
}

/// Why a thread could not be enlisted.
enum EnlistError {
    /// The slot table is full (threads appeared since it was sized).
    Full,
    /// Sending the signal failed other than with ESRCH: the OS error.
    Signal(i32),
}

impl EnlistError {
    /// The error of a request that could not signal a thread.
    #[cold]
    fn into_error(self, what: &'static str) -> PokeError {
        let code = match self {
            EnlistError::Full => libc::EAGAIN,
            EnlistError::Signal(e) => e,
        };
        PokeError::Sys { what, source: std::io::Error::from_raw_os_error(code) }
    }
}

/// Adds `tid` to the table and signals it. `Ok(false)` if the thread is gone.
fn enlist(t: &Table, tid: i32, gen: u32, kind: usize) -> Result<bool, EnlistError> {
    let i = t.used.load(Ordering::Relaxed); // only the patcher (one per table) writes `used`
    if i >= t.slots.len() {
        return Err(EnlistError::Full);
    }
    // Relaxed: published by the Release store of `used` below.
    t.slots[i].tid.store(tid, Ordering::Relaxed);
    t.slots[i].acked.store(gen.wrapping_sub(1), Ordering::Relaxed);
    // Release: the slot is visible before the signal; pairs with the
    // handler's Acquire load of `used`.
    t.used.store(i + 1, Ordering::Release);
    let value = ((gen as usize) << KIND_BITS) | kind;
    match signal_thread(tid, rendezvous_signal(), value) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            // Gone: nothing to wait for. Relaxed: read back by this thread;
            // no handler of that thread will look.
            t.slots[i].tid.store(0, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => {
            // Not signalled: nobody to wait for. Relaxed: as above.
            t.slots[i].tid.store(0, Ordering::Relaxed);
            Err(EnlistError::Signal(e.raw_os_error().unwrap_or(libc::EINVAL)))
        }
    }
}

/// Whether `tid` is a thread of the emulator found earlier (module docs,
/// "Under a user-mode emulator"), looked at again: an entry whose thread
/// no longer blocks every signal is forgotten. Allocation-free.
fn known_emulator_thread(tid: i32) -> bool {
    // Relaxed: see EMULATOR_THREADS.
    let Some(e) = EMULATOR_THREADS.iter().find(|e| e.load(Ordering::Relaxed) == tid) else {
        return false;
    };
    if emulation::is_emulator_thread(tid) {
        return true;
    }
    // Its id now names another thread.
    let _ = e.compare_exchange(tid, 0, Ordering::Relaxed, Ordering::Relaxed);
    false
}

/// Remembers `tid` as one of the emulator's threads (if there is room;
/// without it the thread is only found again, after the grace, next time).
fn remember_emulator_thread(tid: i32) {
    // Relaxed: see EMULATOR_THREADS.
    if EMULATOR_THREADS.iter().any(|e| e.load(Ordering::Relaxed) == tid) {
        return;
    }
    let _ = EMULATOR_THREADS.iter().find(|e| e.compare_exchange(0, tid, Ordering::Relaxed, Ordering::Relaxed).is_ok());
}

fn is_enlisted(t: &Table, tid: i32) -> bool {
    // Relaxed: the patcher reads back its own stores.
    let used = t.used.load(Ordering::Relaxed);
    t.slots[..used].iter().any(|s| s.tid.load(Ordering::Relaxed) == tid)
}

/// Waits until every enlisted thread acked `gen` or is gone (or, under a
/// user-mode emulator, turned out to be one of its own threads: module
/// docs). `start` is when the signals were sent. On timeout, the id of a
/// thread that never answered. Allocation-free.
fn wait_all(t: &Table, gen: u32, start: Instant, deadline: Instant) -> Result<(), i32> {
    let mut spins = 0u32;
    loop {
        // Relaxed: `used` and `tid` are the patcher's own stores.
        let used = t.used.load(Ordering::Relaxed);
        let mut pending = None;
        for s in &t.slots[..used] {
            let tid = s.tid.load(Ordering::Relaxed);
            // Acquire: pairs with the handler's Release store of `acked`
            // (what it published is visible once it acked).
            if tid != 0 && s.acked.load(Ordering::Acquire) != gen {
                pending = Some(s);
                break;
            }
        }
        let Some(s) = pending else { return Ok(()) };
        spins += 1;
        if spins.is_multiple_of(64) {
            let tid = s.tid.load(Ordering::Relaxed); // the patcher's own store
            if signal_thread(tid, 0, 0).is_err() {
                s.tid.store(0, Ordering::Relaxed); // exited before answering (the patcher's own)
                continue;
            }
            if start.elapsed() > EMULATOR_GRACE && emulation::is_emulator_thread(tid) {
                // Runs no program code: nothing to park or sync (module docs).
                s.tid.store(0, Ordering::Relaxed); // the patcher's own
                remember_emulator_thread(tid);
                continue;
            }
            if Instant::now() > deadline {
                return Err(tid);
            }
            sleep_briefly();
        } else {
            std::thread::yield_now();
        }
    }
}

fn sleep_briefly() {
    crate::sys::time::sleep_once(Duration::from_micros(20));
}

fn count_threads() -> usize {
    let mut n = 0;
    let _ = for_each_tid(|_| n += 1);
    n
}

fn unresponsive(tid: i32, deadline_start: Instant) -> PokeError {
    let sig = rendezvous_signal();
    let hint = match threads::blocked_mask(tid) {
        // Under qemu-user /proc shows the host's mask, numbered otherwise.
        Some(_) if emulation::user_mode_emulator() => " (under a user-mode emulator: is it stopped?)".to_string(),
        Some(mask) if mask & (1u64 << (sig - 1)) != 0 => format!(" (it blocks signal {sig})"),
        Some(_) => " (is it stopped or traced?)".to_string(),
        None => String::new(),
    };
    PokeError::ThreadUnresponsive { tid, signal: sig, waited_ms: deadline_start.elapsed().as_millis() as u64, hint }
}

/// Sync cores by signalling every other thread (see module docs).
pub fn sync_by_signals() -> Result<(), PokeError> {
    sync_by_signals_within(response_deadline())
}

/// As [`sync_by_signals`], waiting at most `deadline` for answers.
pub fn sync_by_signals_within(deadline: Duration) -> Result<(), PokeError> {
    signal_round(KIND_SYNC, deadline)?;
    arch::serialize_core();
    Ok(())
}

/// One sample round at a time (grace periods of several callers).
static SAMPLER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Samples threads `tids` (each answers a signal with the sample hook's
/// value on that thread) and returns the answers that came within
/// `deadline`: a thread that blocks the signal, is stopped, or exited is
/// simply not in the result. Rounds are serialised among samplers, and
/// independent of the engine's commit lock. Every signalled thread's
/// interruptible system call, if it entered one meanwhile, fails with
/// EINTR: callers signal only threads seen running user code.
pub fn sample_threads(tids: &[i32], deadline: Duration) -> Result<Vec<(i32, usize)>, PokeError> {
    install()?;
    let _one = SAMPLER.lock().unwrap_or_else(|e| e.into_inner());
    reserve(SAMPLE_TABLE, tids.len() * 2 + 16);
    let t = table(SAMPLE_TABLE);
    let gen = GEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1); // a counter (module docs)
                                                                   // Relaxed: a late handler of an earlier round that still sees the old
                                                                   // count acks its own, older `gen`, which nobody waits for.
    t.used.store(0, Ordering::Relaxed);
    let start = Instant::now();
    for &tid in tids {
        if let Err(e) = enlist(t, tid, gen, KIND_SAMPLE) {
            return Err(e.into_error("signal a thread for a grace period sample"));
        }
    }
    let _ = wait_all(t, gen, start, start + deadline); // late answers are left out
    let used = t.used.load(Ordering::Relaxed); // the patcher's own store
                                               // Acquire on `acked` pairs with the handler's Release: the Relaxed
                                               // load of `aux` after it sees the sample.
    Ok(t.slots[..used]
        .iter()
        .filter(|s| s.tid.load(Ordering::Relaxed) != 0 && s.acked.load(Ordering::Acquire) == gen)
        .map(|s| (s.tid.load(Ordering::Relaxed), s.aux.load(Ordering::Relaxed)))
        .collect())
}

/// Signals every other thread with a request of `kind`, waits for answers.
fn signal_round(kind: usize, deadline: Duration) -> Result<u32, PokeError> {
    install()?;
    reserve(COMMIT_TABLE, count_threads() * 2 + 16);
    let t = table(COMMIT_TABLE);
    let gen = GEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1); // a counter (module docs)
    t.used.store(0, Ordering::Relaxed); // as in sample_threads
    let me = gettid();
    let start = Instant::now();
    let mut failed = None;
    for_each_tid(|tid| {
        if tid == me || failed.is_some() || known_emulator_thread(tid) {
            return;
        }
        if let Err(e) = enlist(t, tid, gen, kind) {
            failed = Some(e);
        }
    })
    .map_err(|source| PokeError::Sys { what: "list /proc/self/task", source })?;
    if let Some(e) = failed {
        return Err(e.into_error("signal every thread"));
    }
    wait_all(t, gen, start, start + deadline).map_err(|tid| unresponsive(tid, start))?;
    Ok(gen)
}

/// Every other thread parked; dropping it releases them.
pub struct Parked {
    gen: u32,
    released: bool,
}

impl Parked {
    /// Each parked thread with every PC it will resume at: the one it was
    /// stopped at, then those saved in the signal frames of handlers it was
    /// running (DESIGN.md rule 4: signal handlers are the NMIs of user
    /// space). Allocation-free.
    pub fn for_each_pc(&self, mut f: impl FnMut(i32, usize)) {
        let t = table(COMMIT_TABLE);
        // Relaxed `used` and `tid`: the patcher's own stores.
        for s in &t.slots[..t.used.load(Ordering::Relaxed)] {
            let tid = s.tid.load(Ordering::Relaxed);
            // Acquire: pairs with the handler's Release store of `acked`,
            // after its Relaxed stores of pc/sp/restorer.
            if tid == 0 || s.acked.load(Ordering::Acquire) != self.gen {
                continue;
            }
            s.for_each_resume_pc(|pc| f(tid, pc));
        }
    }

    /// Releases every parked thread (each serialises its core first).
    pub fn release(mut self) {
        self.do_release();
    }

    fn do_release(&mut self) {
        if !self.released {
            self.released = true;
            // Release: the code writes before it are visible to a parked
            // handler that sees it; pairs with its Acquire loads.
            RELEASED.store(self.gen, Ordering::Release);
            crate::sys::futex_wake(&RELEASED, i32::MAX);
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.do_release();
    }
}

/// Parks every other thread of the process (see module docs). Between the
/// return of this function and the release of [`Parked`], the caller must
/// not allocate or take a lock another thread could hold.
pub fn park_others() -> Result<Parked, PokeError> {
    install()?;
    loop {
        reserve(COMMIT_TABLE, count_threads() * 2 + 16);
        match try_park() {
            Ok(p) => return Ok(p),
            Err(None) => continue, // table full: threads appeared; grow and retry
            Err(Some(e)) => return Err(e),
        }
        // Only a full table loops: every other failure (a signal that cannot
        // be sent, a thread that does not answer) is returned above.
    }
}

fn try_park() -> Result<Parked, Option<PokeError>> {
    let t = table(COMMIT_TABLE);
    let gen = GEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1); // a counter (module docs)
    t.used.store(0, Ordering::Relaxed); // as in sample_threads
    let mut parked = Parked { gen, released: false };
    let me = gettid();
    let start = Instant::now();
    loop {
        let mut added = 0;
        let mut failed = None;
        let listed = for_each_tid(|tid| {
            if tid == me || failed.is_some() || is_enlisted(t, tid) || known_emulator_thread(tid) {
                return;
            }
            match enlist(t, tid, gen, KIND_PARK) {
                Ok(true) => added += 1,
                Ok(false) => {}
                Err(e) => failed = Some(e),
            }
        });
        if let Err(source) = listed {
            parked.do_release();
            return Err(Some(PokeError::Sys { what: "list /proc/self/task", source }));
        }
        match failed {
            None => {}
            Some(EnlistError::Full) => {
                parked.do_release();
                return Err(None);
            }
            Some(e) => {
                parked.do_release();
                return Err(Some(e.into_error("signal a thread to park it")));
            }
        }
        if let Err(tid) = wait_all(t, gen, start, start + response_deadline()) {
            parked.do_release();
            return Err(Some(unresponsive(tid, start)));
        }
        if added == 0 {
            return Ok(parked);
        }
    }
}
