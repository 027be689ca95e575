//! Grace periods: when may retired trampolines and op data be freed?
//!
//! Seed 001's "magic carpet": a thread may be preempted right after the
//! CALL into a trampoline, or be running a callback with a return address
//! into the trampoline on its stack. Memory is freed only after every
//! other thread was seen *outside* it:
//!
//! 1. every thread is sampled with a signal (the "rude" flavour of
//!    RCU-tasks): its interrupted PC, the PCs saved in outer signal frames
//!    (a handler interrupted it inside a trampoline), and its `in_tramp`
//!    count (non-zero while a callback runs, i.e. while a return into a
//!    trampoline may sit on its stack);
//! 2. a thread is quiescent if that count is zero and no PC lies in a
//!    retired range;
//! 3. a thread seen quiescent once is done: no site calls retired code
//!    any more, so it cannot enter it again, and it held no return into
//!    it. Threads are sampled again until each of them was seen quiescent
//!    at least once (or exited) — as RCU-tasks waits for each task to pass
//!    a quiescent state, not for all at the same instant. Threads created
//!    after the retirement never saw the retired code. Bounded: after the
//!    caller's patience the items stay retired for a later attempt.
//!
//! The calling thread is quiescent by construction: control operations are
//! refused from inside a callback. Returns into the return trampoline are
//! not a concern: it is never freed.

use crate::error::PokeError;
use std::time::{Duration, Instant};

extern "C" fn in_tracer_hook() -> usize {
    super::hot::in_tracer() as usize
}

/// The threads of one sample that were not quiescent w.r.t. `ranges`.
fn busy_threads(ranges: &[(usize, usize)]) -> Result<Vec<i32>, PokeError> {
    crate::sync::rendezvous::set_sample_hook(in_tracer_hook);
    let samples = crate::sync::rendezvous::sample_others()?;
    let mut busy = Vec::new();
    samples.for_each(|tid, in_tramp, pcs| {
        let mut inside = in_tramp != 0;
        for pc in pcs {
            inside |= ranges.iter().any(|&(lo, hi)| pc >= lo && pc < hi);
        }
        if inside {
            busy.push(tid);
        }
    });
    Ok(busy)
}

/// Waits up to `patience` for a grace period over `ranges`: `true` once
/// every other thread was seen quiescent at least once since the call, so
/// what was retired before the call may be freed.
pub(crate) fn wait(ranges: &[(usize, usize)], patience: Duration) -> Result<bool, PokeError> {
    let start = Instant::now();
    // Threads not yet seen quiescent: those busy in every sample so far.
    let mut pending = busy_threads(ranges)?;
    while !pending.is_empty() {
        if start.elapsed() >= patience {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(100));
        let busy = busy_threads(ranges)?;
        pending.retain(|tid| busy.contains(tid));
    }
    Ok(true)
}
