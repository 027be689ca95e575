//! Synchronising the threads of this process with the patcher.
//!
//! # Sync cores
//!
//! After bytes of code change, every core that may run them must execute a
//! serialising instruction before it does (Intel SDM, cross-modifying code).
//! The kernel does this with an IPI running `sync_core()`; user space has
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`, registered once.
//! Where the kernel refuses it, [`SyncMethod::Signals`] sends every other
//! thread a real-time signal whose handler serialises its core and
//! acknowledges; the patcher waits, bounded, for every thread that still
//! exists (see `rendezvous.rs`).
//!
//! That fallback signals threads blocked in system calls too, so their
//! `nanosleep`, `poll`, `epoll_wait`, `select`, timed socket and `futex`
//! waits fail with EINTR (DESIGN.md rule 9 is not met there): such a
//! thread needs no barrier, but it does need a serialising instruction
//! before it runs the changed code, and it returns to user space through
//! `sysret`, which is not one (the kernel's SYNC_CORE serialises it
//! explicitly, `sync_core_before_usermode`). Grace periods do not use this:
//! they need no serialisation (`trace::grace`).
//!
//! The calling thread needs no round: x86 detects a store into code the same
//! core is about to run (self-modifying code) by itself.
//!
//! # Parking
//!
//! The stop-machine strategy parks every other thread in a signal handler
//! with all signals blocked, reads each interrupted PC, writes, and releases
//! them; see `rendezvous::park_others`.

mod fork_lock;
pub(crate) mod rendezvous;

pub use fork_lock::{ForkLock, Guard as ForkGuard};
/// The real-time signal the rendezvous parks threads with (a textpoke
/// thread that blocks signals must leave this one open).
pub use rendezvous::rendezvous_signal;

use std::cell::Cell;

thread_local! {
    /// Times textpoke's signal handlers held this thread (a trap emulated or
    /// replayed, a sync or park rendezvous). Const-initialised and without
    /// destructor, so touching it from a signal handler is a plain TLS access.
    static HELD: Cell<u64> = const { Cell::new(0) };
}

/// Counts one hold of the current thread; called from the handlers.
#[inline(always)]
pub(crate) fn note_held() {
    HELD.with(|c| c.set(c.get().wrapping_add(1)));
}

/// How many times textpoke's handlers have held the calling thread: a
/// benchmark compares it around a unit of work to tell pauses textpoke
/// caused from pauses the scheduler caused.
#[cfg(feature = "testing")]
pub fn thread_holds() -> u64 {
    HELD.with(Cell::get)
}

use crate::error::PokeError;
use crate::sys::membarrier;
use std::sync::OnceLock;

/// How cores are synchronised after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMethod {
    /// `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`: one syscall, IPIs only to
    /// CPUs running this process.
    Membarrier,
    /// A real-time signal to every other thread; each serialises and acks.
    /// A thread blocked in an interruptible system call gets EINTR.
    Signals,
}

impl std::fmt::Display for SyncMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMethod::Membarrier => "membarrier-sync-core",
            SyncMethod::Signals => "signals",
        })
    }
}

/// The best method this kernel offers, decided (and registered) once.
pub fn best_method() -> SyncMethod {
    static METHOD: OnceLock<SyncMethod> = OnceLock::new();
    *METHOD.get_or_init(|| {
        if membarrier::sync_core_supported() && membarrier::register_sync_core().is_ok() {
            SyncMethod::Membarrier
        } else {
            SyncMethod::Signals
        }
    })
}

/// Makes every thread of this process serialise its core before it next
/// runs code written before this call. Pairs with the code writes that
/// precede it (all plain stores, ordered by x86-TSO before the syscall or
/// the signals).
pub fn sync_cores(method: SyncMethod) -> Result<(), PokeError> {
    match method {
        SyncMethod::Membarrier => membarrier::sync_core()
            .map_err(|source| PokeError::Sys { what: "membarrier(PRIVATE_EXPEDITED_SYNC_CORE)", source }),
        SyncMethod::Signals => rendezvous::sync_by_signals(),
    }
}

/// A best-effort sync for rolling back: signal answers are awaited only
/// briefly (the full wait already failed once).
pub(crate) fn sync_cores_briefly(method: SyncMethod) {
    let _ = match method {
        SyncMethod::Membarrier => sync_cores(method),
        SyncMethod::Signals => rendezvous::sync_by_signals_within(std::time::Duration::from_millis(100)),
    };
}
