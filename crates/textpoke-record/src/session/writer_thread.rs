//! The writer thread: drains the session's buffers every
//! `flush_interval`, or sooner when a producer finishes a segment (G2) or
//! the control path wakes it; ends when its session stops.

use super::drain::drain;
use super::STATE;
use crate::buffer;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(super) fn spawn_writer(id: u64) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("textpoke-writer".into()).spawn(move || writer_main(id))
}

/// Puts the calling thread (the writer) in `SCHED_BATCH`: a producer
/// that wakes it when a segment fills is not preempted by it. Under the
/// default policy the scheduler ran the woken writer on the waker's CPU at
/// once, stalling the traced thread for the whole drain (2 ms seen here,
/// with the other CPU idle). The writer keeps its fair share of CPU time.
/// Best effort: on failure the writer just runs under the default policy.
fn batch_scheduling() {
    // SAFETY: plain syscall on the calling thread with a valid param.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
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
        textpoke::sys::futex_wait(&buffer::WAKE, seen, Some(interval));
    }
}
