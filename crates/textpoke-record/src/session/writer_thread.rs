//! The writer thread: drains the session's buffers every
//! `flush_interval`, or sooner when a producer finishes a segment (G2) or
//! the control path wakes it; ends when its session stops.
//!
//! # Signals
//!
//! The writer is born with every signal blocked but the synchronous ones
//! (a fault on it must still be a crash) and textpoke's rendezvous signal
//! (stop-machine parks it like any thread). A signal sent to the process
//! (`kill`, a terminal's Ctrl-C, a timer) goes to any one thread that
//! does not block it: on the writer, the program's handler would run on a
//! thread the program does not know, with its traced calls dropped (the
//! writer records nothing: `writer_thread` drops, seen in 21 of 150 runs
//! of a program that waits for `SIGUSR1` on a loaded machine), and a
//! program that blocks a signal in its threads to `sigwait` for it would
//! have it taken by the writer's default action instead. The mask is set
//! in the spawning thread around the spawn, so that the writer has it
//! from its first instruction.

use super::drain::drain;
use super::STATE;
use crate::buffer;
use std::sync::atomic::Ordering;
use std::time::Duration;
use textpoke_sys::signals;

pub(super) fn spawn_writer(id: u64) -> std::io::Result<std::thread::JoinHandle<()>> {
    spawn_with_signals_blocked("textpoke-writer", move || writer_main(id))
}

/// Spawns a thread that starts with [`writer_blocked_signals`] blocked
/// (see the module docs); the caller's mask is as it was afterwards.
fn spawn_with_signals_blocked<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    // The caller's mask is restored below, and a signal that came
    // meanwhile is delivered then.
    let old = signals::swap_mask(libc::SIG_BLOCK, &writer_blocked_signals());
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    signals::set_mask(libc::SIG_SETMASK, &old);
    spawned
}

/// The signals the writer thread blocks (see the module docs): those of
/// every long-lived textpoke service thread.
fn writer_blocked_signals() -> libc::sigset_t {
    signals::service_thread_mask(textpoke::sync::rendezvous_signal())
}

/// Puts the calling thread (the writer) in `SCHED_BATCH`: a producer
/// that wakes it when a segment fills is not preempted by it. Under the
/// default policy the scheduler ran the woken writer on the waker's CPU at
/// once, stalling the traced thread for the whole drain (2 ms seen here,
/// with the other CPU idle). The writer keeps its fair share of CPU time.
/// Best effort: on failure the writer just runs under the default policy.
fn batch_scheduling() {
    let _ = textpoke_sys::threads::set_batch_scheduling();
}

/// The writer thread: drains every `flush_interval`, or sooner when a
/// producer finishes a segment (G2) or the control path wakes it.
fn writer_main(id: u64) {
    buffer::mark_writer_thread();
    batch_scheduling();
    loop {
        if crate::crash::writer_rests() {
            // F2/F8: a fatal signal's flush wants the lock (a writer busy
            // with threads that fill segments would take it again at once)
            // or has just written the trace, which a pass would rewrite
            // without saying so, while the process dies.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Acquire pairs with wake_writer's release increment.
        let seen = buffer::WAKE.load(Ordering::Acquire);
        let interval = {
            let mut st = STATE.lock();
            match &st.session {
                Some(s) if s.id == id && !s.stop_requested => {}
                _ => break,
            }
            drain(&mut st, false);
            st.session.as_ref().map(|s| s.config.flush_interval).unwrap_or_default()
        };
        textpoke_sys::futex_wait(&buffer::WAKE, seen, Some(interval));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's signal mask.
    fn mask() -> libc::sigset_t {
        signals::current_mask()
    }

    fn blocked(set: &libc::sigset_t, sig: libc::c_int) -> bool {
        signals::contains(set, sig)
    }

    #[test]
    fn the_writer_is_born_with_the_programs_signals_blocked() {
        let before = mask();
        let theirs = spawn_with_signals_blocked("mask-test", mask).unwrap().join().unwrap();
        let rendezvous = textpoke::sync::rendezvous_signal();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGCHLD, libc::SIGALRM, libc::SIGRTMIN()] {
            assert!(blocked(&theirs, sig), "signal {sig} reaches the writer");
        }
        for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGSYS, rendezvous] {
            assert!(!blocked(&theirs, sig), "signal {sig} is blocked on the writer");
        }
        let after = mask();
        for sig in 1..=libc::SIGRTMAX() {
            assert_eq!(blocked(&before, sig), blocked(&after, sig), "the spawner's mask changed for {sig}");
        }
    }
}
