//! The `_exit` handshake (see `interpose`, "_exit"): a program thread in
//! `_exit` cannot stop the recorder itself (that allocates and locks, and
//! `_exit` may be called from a signal handler), so it asks the agent
//! thread to, and waits for the answer, at most [`EXIT_STOP_TIMEOUT`].
//!
//! [`EXIT_STOP`] goes from NONE to ASKED (the first program thread in
//! `_exit`, which wakes the agent thread), then to DONE (the agent thread,
//! once the recorder is stopped). It stays DONE: the recorder is stopped
//! for good, so a later `_exit` need not wait.

use crate::AGENT;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use textpoke::clock::monotonic_ns;
use textpoke_sys::threads::gettid;

/// The state of the handshake: [`EXIT_NONE`], [`EXIT_ASKED`] or
/// [`EXIT_DONE`].
static EXIT_STOP: AtomicU32 = AtomicU32::new(EXIT_NONE);
const EXIT_NONE: u32 = 0;
const EXIT_ASKED: u32 = 1;
const EXIT_DONE: u32 = 2;

/// How long `_exit` waits for the agent thread to stop the recorder. The
/// stop waits up to 2 s for threads stuck in a record call, then writes
/// and `fsync`s every file; past this the agent thread is taken to be
/// blocked on a lock that the thread in `_exit` holds (a signal handler
/// that interrupted `malloc`), and the program is let go.
pub(crate) const EXIT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Called by the `_exit` wrapper while recording: has the agent thread
/// stop the recorder and waits for it, at most [`EXIT_STOP_TIMEOUT`].
/// Whether the recorder was stopped.
///
/// Async-signal-safe (the caller may be a signal handler that interrupted
/// anything): atomics, `getpid`, `gettid`, `fstat` and `write` (in
/// `wake`), `clock_gettime`, `nanosleep`; no allocation, no lock, no
/// thread-local, nothing that can panic.
pub(crate) fn stop_for_exit() -> bool {
    if !super::running() {
        return false; // no agent thread in this process
    }
    if super::is_agent_thread(gettid()) {
        return false; // the agent thread itself: it cannot wait for itself
    }
    // Only the first caller asks; a second thread in `_exit` waits too.
    let _ = EXIT_STOP.compare_exchange(EXIT_NONE, EXIT_ASKED, Ordering::AcqRel, Ordering::Acquire);
    // A thread that has not made its wake pipe yet sees ASKED when it
    // enters its loop.
    super::wake::wake();
    let deadline = monotonic_ns().saturating_add(EXIT_STOP_TIMEOUT.as_nanos() as u64);
    // Acquire pairs with the agent thread's release of DONE: the trace's
    // files are written before this thread ends the process.
    while EXIT_STOP.load(Ordering::Acquire) != EXIT_DONE {
        if monotonic_ns() >= deadline {
            return false;
        }
        let ms = libc::timespec { tv_sec: 0, tv_nsec: 1_000_000 };
        // SAFETY: a valid timespec; an early return (a signal) only
        // makes this loop look again.
        unsafe { libc::nanosleep(&ms, std::ptr::null_mut()) };
    }
    true
}

/// Whether a program thread in `_exit` asked and waits.
pub(super) fn asked() -> bool {
    EXIT_STOP.load(Ordering::Acquire) == EXIT_ASKED
}

/// The agent thread's half of the handshake: if a thread in `_exit`
/// asked, stops the recorder and answers.
pub(super) fn act_on_request() {
    if !asked() {
        return;
    }
    if let Some(a) = AGENT.lock().as_mut() {
        crate::stop_recording(a, "_exit");
    }
    EXIT_STOP.store(EXIT_DONE, Ordering::Release);
}

/// In a forked child: an `_exit` of a parent's thread is the parent's.
pub(super) fn after_fork_in_child() {
    EXIT_STOP.store(EXIT_NONE, Ordering::Release);
}
