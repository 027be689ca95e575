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
//! 3. when all are, everything retired *before* the sample may be freed;
//!    otherwise sample again, bounded, and keep the rest for later.
//!
//! The calling thread is quiescent by construction: control operations are
//! refused from inside a callback. Returns into the return trampoline are
//! not a concern: it is never freed.

use crate::error::PokeError;
use std::time::{Duration, Instant};

extern "C" fn in_tracer_hook() -> usize {
    super::hot::in_tracer() as usize
}

/// Whether every other thread is quiescent with respect to `ranges`.
fn quiescent(ranges: &[(usize, usize)]) -> Result<bool, PokeError> {
    crate::sync::rendezvous::set_sample_hook(in_tracer_hook);
    let _lock = crate::text::commit_lock(); // the rendezvous table is shared with commits
    let samples = crate::sync::rendezvous::sample_others()?;
    let mut clear = true;
    samples.for_each(|_tid, in_tramp, pcs| {
        if in_tramp != 0 {
            clear = false;
        }
        for pc in pcs {
            if ranges.iter().any(|&(lo, hi)| pc >= lo && pc < hi) {
                clear = false;
            }
        }
    });
    Ok(clear)
}

/// Waits up to `patience` for a grace period over `ranges`: `true` once
/// every other thread was seen quiescent, so what was retired before the
/// call may be freed.
pub(crate) fn wait(ranges: &[(usize, usize)], patience: Duration) -> Result<bool, PokeError> {
    let start = Instant::now();
    loop {
        if quiescent(ranges)? {
            return Ok(true);
        }
        if start.elapsed() >= patience {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
