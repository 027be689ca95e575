//! The stop-machine strategy: park every other thread, write, release.
//!
//! # What it costs a thread in a system call
//!
//! Every other thread is stopped by design, with a real-time signal: the
//! only way to bring a thread out of the kernel before it can run a
//! region being rewritten instruction by instruction (rule 1). A thread
//! blocked in `nanosleep`, `clock_nanosleep`, `poll`, `epoll_wait`,
//! `select`, a socket call with a timeout or a timed `futex` wait returns
//! `EINTR` when released, whatever `SA_RESTART` says (glibc's `sleep`
//! returns the seconds left); calls the kernel restarts under
//! `SA_RESTART` (`read`, `write`, `wait`...) restart unseen. Every thread
//! also waits, parked, for the slowest to answer and for the writes. The
//! breakpoint strategy has none of this (with `membarrier`); the tracer
//! parks only to turn a site's gcc pad (five one-byte NOPs) into one NOP,
//! once per site, the first time it is traced.

use super::write::{WriteMethod, Writer};
use super::{CommitStats, Plan};
use crate::error::PokeError;
use crate::sync::rendezvous::{park_others, Parked};
use crate::sync::{sync_cores, SyncMethod};
use std::time::Duration;

/// How often threads are parked before giving up on one that keeps
/// stopping strictly inside a poke.
pub const MAX_PARK_ATTEMPTS: u32 = 200;

/// Commits a validated plan with every other thread parked.
///
///  1. make the pages writable (or open /proc/self/mem), an arm64 guarded
///     page keeping `PROT_BTI` (`text/write.rs`, "Guarded pages");
///  2. block this thread's asynchronous signals: its own signal handlers
///     are the NMIs of rule 4 and must not run half-written code;
///  3. park every other thread in a signal handler with all signals
///     blocked, each reporting the PC it was stopped at;
///  4. if a PC lies strictly inside a poke (a thread between two
///     instructions of a region), release everyone, back off, retry —
///     bounded, then a clear error naming the thread;
///  5. write every poke whole; **sync** (membarrier; parked threads also
///     serialise their cores when released). If a write fails, the pokes
///     written so far (and the failed one) get their old bytes back while
///     the threads are still parked; if the sync fails, every poke does: a
///     failed commit leaves the old code (the error says so, or that
///     putting it back failed too);
///  6. release, unblock signals, restore protections (the guard included).
///
/// Between 3 and 6 nothing allocates or locks: parked threads may hold
/// malloc's lock (or the loader's). Errors are made after the release.
/// A thread stopped while running a signal handler of its own has the PC
/// it interrupted saved in an outer signal frame (rule 4): those frames
/// are found by scanning the parked thread's stack
/// (`arch::for_each_outer_pc`) and their PCs are checked too.
pub(crate) fn commit(
    plan: &Plan<'_>,
    sync: SyncMethod,
    write: Option<WriteMethod>,
    stats: &mut CommitStats,
) -> Result<(), PokeError> {
    let writer = super::prepare_writer(plan, write, stats)?;
    let mask = crate::sys::signals::block_async();
    let result = park_and_write(plan, &writer, sync, stats);
    drop(mask);
    super::finish_writer(writer, result)
}

fn park_and_write(plan: &Plan<'_>, w: &Writer, sync: SyncMethod, stats: &mut CommitStats) -> Result<(), PokeError> {
    let mut inside = None;
    for attempt in 0..MAX_PARK_ATTEMPTS {
        stats.park_attempts += 1;
        let parked = park_others()?;
        inside = thread_inside(plan, &parked);
        if inside.is_some() {
            parked.release();
            std::thread::sleep(Duration::from_micros(20 * (1 + attempt as u64).min(50)));
            continue;
        }
        let written = write_all(plan, w);
        // With signals as the sync method the parked threads, which block
        // every signal, serialise when released instead.
        let synced = match (&written, sync) {
            (Ok(()), SyncMethod::Membarrier) => sync_cores(sync),
            _ => Ok(()),
        };
        // A failed sync fails the commit: put the old code back while no
        // thread runs it (they serialise when released, before running it).
        let restored = synced.is_err().then(|| restore(&plan.pokes, w));
        parked.release();
        if let Err(failed) = written {
            return Err(failed.into_error(plan));
        }
        if let Err(e) = synced {
            return Err(match (e, restored) {
                (PokeError::Sys { source, .. }, Some(false)) => PokeError::Sys {
                    what: "sync cores (and putting the old bytes back failed: some pokes may hold the new bytes)",
                    source,
                },
                (e, _) => e,
            });
        }
        stats.sync_rounds += 1;
        return Ok(());
    }
    let (tid, pc, i) = inside.expect("loop ran at least once");
    Err(PokeError::ThreadInsideRegion { tid, pc, at: plan.pokes[i].at(), attempts: MAX_PARK_ATTEMPTS })
}

/// A parked thread stopped strictly inside a poke: (tid, pc, poke index).
/// Allocation-free.
fn thread_inside(plan: &Plan<'_>, parked: &Parked) -> Option<(i32, usize, usize)> {
    let mut hit = None;
    parked.for_each_pc(|tid, pc| {
        if hit.is_some() {
            return;
        }
        let i = plan.pokes.partition_point(|p| p.addr < pc);
        // The poke starting before pc is the only one that can contain it.
        if i > 0 {
            let p = &plan.pokes[i - 1];
            if pc > p.addr && pc < p.addr + p.old().len() {
                hit = Some((tid, pc, i - 1));
            }
        }
    });
    hit
}

/// A write that failed while threads were parked, described without
/// allocating; [`WriteFailure::into_error`] makes the error afterwards.
struct WriteFailure {
    index: usize,
    source: std::io::Error,
    /// Whether every poke up to and including `index` got its old bytes back.
    restored: bool,
}

impl WriteFailure {
    #[cold]
    fn into_error(self, plan: &Plan<'_>) -> PokeError {
        let p = &plan.pokes[self.index];
        PokeError::WriteFailed {
            at: p.at(),
            len: p.new_bytes().len(),
            source: self.source,
            rollback: if self.restored {
                "; the pokes written before it were rolled back to the old bytes, nothing of the batch is left".into()
            } else {
                "; rolling back the pokes written before it failed too: some of them may hold the new bytes".into()
            },
        }
    }
}

/// Writes every poke; on a failure, puts the old bytes back. Runs while
/// threads are parked: allocation-free (an `io::Error` from the OS holds
/// just its code).
fn write_all(plan: &Plan<'_>, w: &Writer) -> Result<(), WriteFailure> {
    for (index, p) in plan.pokes.iter().enumerate() {
        if let Err(source) = w.write(p.addr, p.new_bytes()) {
            let restored = restore(&plan.pokes[..=index], w);
            return Err(WriteFailure { index, source, restored });
        }
    }
    Ok(())
}

/// Writes the old bytes of `pokes` back (threads parked, none strictly
/// inside a poke: they can go back whole), trying every one even after a
/// failure; whether all succeeded. Allocation-free.
fn restore(pokes: &[super::Planned<'_>], w: &Writer) -> bool {
    let mut all = true;
    for q in pokes {
        all &= w.write(q.addr, q.old()).is_ok();
    }
    all
}
