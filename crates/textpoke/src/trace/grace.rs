//! Grace periods: when may retired trampolines and op data be freed?
//!
//! Seed 001's "magic carpet": a thread may be preempted right after the
//! CALL into a trampoline, or be running a callback with a return address
//! into the trampoline on its stack. Memory is freed only after every
//! other thread was seen outside it — without interrupting any thread: a
//! signal would make its `nanosleep`, `poll`, `epoll_wait`, `select` or
//! timed socket and futex waits fail with EINTR whatever `SA_RESTART` says
//! (DESIGN.md rule 9). This is userspace RCU's membarrier flavour
//! (`urcu-memb`): per-thread counts ordered by
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`.
//!
//! # What a thread's count covers
//!
//! Each thread has a nesting count (`hot.rs`, "Quiescence count") that is
//! non-zero whenever the thread may execute or hold anything freeable:
//! trampolines, and op data. It is raised by code that is never freed
//! before the thread enters freeable code — the site's own stub, which is
//! never freed nor given to another site — and lowered by never-freed code
//! after the thread left it (the stub's tail, the graph thunk). The window
//! between a site's CALL and the raise is the stub's first instruction,
//! which stays. The stub reaches its trampoline through a data word; the
//! retired trampoline's words were pointed at the stubs' null paths before
//! the grace period began (the *unpublish*), as every site calling it was
//! turned into a NOP or another call, and ops' data out of `OPS`.
//!
//! # Algorithm
//!
//! The caller has unpublished what it retires (stores, program order).
//!
//! 1. **Barrier**: `membarrier(PRIVATE_EXPEDITED)` (registered once): every
//!    other thread passes a full memory barrier *B* inside the call.
//! 2. **Scan**: read the count of every registered thread
//!    (`registry.rs`). Threads at 0 are done.
//! 3. **Wait**: read the others' counts again, sleeping in between, until
//!    each was seen at 0 once, or its thread is gone; bounded by the
//!    caller's patience (then the items stay retired for a later try).
//!
//! Why a thread *T* seen at 0 after step 1 holds nothing retired: either
//! *T*'s raise came after its barrier *B*, and then so did its read of
//! the stub's word or of `OPS` (the raise precedes them in program order,
//! a compiler barrier and a never-freed instruction boundary keep them
//! there): that read sees the unpublish, which came before the membarrier.
//! Or the raise came before *B*: then the membarrier makes it visible to
//! the scan, and a 0 read afterwards is the lowering of that very nesting
//! (the count is one thread's, so coherence orders its values: 0 cannot be
//! read again before the raise's lowering), which *T* stores only after
//! leaving freeable code — as a Release, after its last access there
//! (plain x86 stores in the stubs; Release stores in Rust), read with
//! Acquire here. x86's only reordering, a store (the raise) passing a later
//! load (of the word), is what the membarrier's barrier on *T*'s CPU
//! closes; threads not running during the call pass the scheduler's
//! barrier before they run again. Threads that registered after the scan
//! registered after their barrier and read new words; threads that never
//! registered never passed a stub's raise (the raise's sign flag sends
//! them to register before they go further). A thread is seen once, not
//! all at the same instant, as RCU waits for each task to pass a quiescent
//! state.
//!
//! A thread blocked in a system call is quiescent without being touched:
//! its count is read like any other (0 unless it blocked inside a
//! callback, which is then rightly waited for).
//!
//! # Without membarrier
//!
//! Where the kernel lacks `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (before 4.14,
//! or a seccomp filter refuses it), step 1 is done per thread, by finding
//! for each registered thread *T* a point *B* after the unpublish where
//! *T* passed a full barrier, from `/proc/self/task/T/status` (after a
//! SeqCst fence here):
//!
//! - *T* is not running (`State` other than `R`: blocked in a system
//!   call, or stopped). It entered the kernel, whose scheduling path
//!   (`set_current_state`, the run-queue lock) has full barriers, and it
//!   must pass them again (wake-up, switch-in) before its next user-mode
//!   instruction: its stores before are visible to us, its loads after see
//!   the unpublish. No signal: its system call goes on undisturbed.
//! - Its context switch count (voluntary + involuntary) changed since the
//!   first look: it went through the scheduler since.
//! - Otherwise, after [`SIGNAL_AFTER`] running without a switch (a thread
//!   computing in user space), it is sampled with the rendezvous signal:
//!   its handler reads its count. A thread that enters a blocking call in
//!   the microseconds between our look and the signal's arrival gets
//!   EINTR; nothing in user space can close that window, so it is the
//!   fallback's documented cost, and never the case with membarrier.
//!
//! Then its count is read as in steps 2 and 3.
//!
//! The calling thread is quiescent by construction: control operations are
//! refused from inside tracer code. Returns into the return trampoline are
//! not a concern: it is never freed.

use super::registry::{Count, Scan};
use crate::error::PokeError;
use crate::sync::rendezvous;
use crate::sys::membarrier;
use crate::sys::threads::{gettid, signal_thread};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a running thread that passed no barrier by itself is left
/// alone before the fallback signals it.
pub(crate) const SIGNAL_AFTER: Duration = Duration::from_millis(20);

/// Test switch: behave as on a kernel without membarrier.
#[cfg(feature = "testing")]
static FORCE_FALLBACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(feature = "testing")]
pub(crate) fn force_fallback_for_tests(on: bool) {
    FORCE_FALLBACK.store(on, Ordering::Relaxed);
}

/// Whether a test forced the fallback (never outside `testing` builds).
fn fallback_forced() -> bool {
    #[cfg(feature = "testing")]
    if FORCE_FALLBACK.load(Ordering::Relaxed) {
        return true;
    }
    false
}

/// Whether `membarrier(PRIVATE_EXPEDITED)` is available (registered once).
fn membarrier_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| membarrier::expedited_supported() && membarrier::register_expedited().is_ok())
}

extern "C" fn in_tracer_hook() -> usize {
    super::hot::in_tracer() as usize
}

/// A thread not yet seen quiescent.
struct Pending {
    slot: u32,
    tid: i32,
    /// Its barrier point was seen (step 1 done for it).
    barrier: bool,
    /// Its context switch count at the first look (fallback).
    switches: Option<u64>,
    /// Seen at 0 by a signal sample (fallback).
    done: bool,
}

/// Waits up to `patience` for a grace period: `true` once every other
/// registered thread was seen outside tracer code at least once since the
/// call, so what the caller unpublished before the call may be freed.
pub(crate) fn wait(patience: Duration) -> Result<bool, PokeError> {
    let start = Instant::now();
    let me = gettid();
    // 1. Barrier.
    let memb = !fallback_forced() && membarrier_ready() && membarrier::expedited().is_ok();
    if !memb {
        // Our unpublishing stores are visible before any look at a thread:
        // pairs with the full barrier each thread then passes by itself
        // (a switch, a kernel entry) or in the sampling signal's handler
        // (see "Without membarrier").
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    // 2. Scan.
    let mut pending: Vec<Pending> = Scan::start()
        .live()
        .into_iter()
        .filter(|&(_, tid)| tid != me)
        .map(|(slot, tid)| Pending { slot, tid, barrier: memb, switches: None, done: false })
        .collect();
    let mut round = 0u32;
    loop {
        if !memb {
            find_barriers(&mut pending, start)?;
        }
        let scan = Scan::start();
        pending.retain(|p| !p.done && keep(&scan, p));
        drop(scan);
        if pending.is_empty() {
            return Ok(true);
        }
        // 3. Wait. Threads busy in traced code leave it within nanoseconds:
        // look again at once a few times, then sleep.
        round += 1;
        if round.is_multiple_of(16) {
            reap_gone(&mut pending);
        }
        if start.elapsed() >= patience {
            return Ok(false);
        }
        if round < 32 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(if round < 64 { 100 } else { 1000 }));
        }
    }
}

/// Whether `p` must still be waited for.
fn keep(scan: &Scan, p: &Pending) -> bool {
    if !p.barrier {
        return true;
    }
    match scan.count(p.slot, p.tid) {
        Count::Nesting(0) | Count::Gone => false,
        Count::Nesting(_) | Count::Unknown => true,
    }
}

/// Drops the threads that no longer exist (their slots are reaped).
fn reap_gone(pending: &mut Vec<Pending>) {
    let gone: Vec<(u32, i32)> = pending
        .iter()
        .filter(|p| signal_thread(p.tid, 0, 0).is_err_and(|e| e.raw_os_error() == Some(libc::ESRCH)))
        .map(|p| (p.slot, p.tid))
        .collect();
    if gone.is_empty() {
        return;
    }
    let scan = Scan::start();
    for &(slot, tid) in &gone {
        scan.reap(slot, tid);
    }
    pending.retain(|p| !gone.contains(&(p.slot, p.tid)));
}

/// The fallback's step 1 for each pending thread (module docs).
fn find_barriers(pending: &mut [Pending], start: Instant) -> Result<(), PokeError> {
    let mut to_sample = Vec::new();
    for p in pending.iter_mut().filter(|p| !p.barrier) {
        let Some((running, switches)) = crate::sys::threads::sched_state(p.tid) else {
            p.barrier = true; // gone: its slot reads as gone or is reaped
            continue;
        };
        match p.switches {
            _ if !running => p.barrier = true,
            Some(s) if s != switches => p.barrier = true,
            None => p.switches = Some(switches),
            Some(_) if start.elapsed() >= SIGNAL_AFTER => to_sample.push(p.tid),
            Some(_) => {}
        }
    }
    if to_sample.is_empty() {
        return Ok(());
    }
    rendezvous::set_sample_hook(in_tracer_hook);
    for (tid, count) in rendezvous::sample_threads(&to_sample, Duration::from_millis(50))? {
        if let Some(p) = pending.iter_mut().find(|p| p.tid == tid) {
            // The handler ran on the thread: a barrier, and its count then.
            p.barrier = true;
            p.done = count == 0;
        }
    }
    Ok(())
}
