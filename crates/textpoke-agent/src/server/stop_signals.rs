//! `SIGINT`, `SIGTERM` and `SIGHUP` (see the crate docs, step 6): when
//! their disposition is the default at the start of recording, the agent's
//! handler asks the agent thread to stop the recorder; the agent thread
//! then gives the default disposition back and raises the signal again,
//! so the process still dies of it, with a complete trace.
//!
//! The handler only stores the signal in [`PENDING_SIGNAL`] and wakes the
//! agent thread (async-signal-safe). Without an agent thread, or for a
//! second signal while the first is handled (the user insists), it acts
//! as the default disposition at once.

use crate::AGENT;
use std::sync::atomic::{AtomicI32, Ordering};
use textpoke_sys::{process, signals, threads};

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A stop signal caught by [`on_stop_signal`], for the agent thread.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    let running = super::running() && super::wake::is_open();
    if running && PENDING_SIGNAL.compare_exchange(0, sig, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
        super::wake::wake();
        return;
    }
    // No agent thread to flush, or a second signal while the first is being
    // handled (the user insists): behave as the default disposition now.
    reraise_default(sig);
}

/// Gives the default disposition back to `sig` (if the handler is still
/// ours) and raises it process-wide.
fn reraise_default(sig: libc::c_int) {
    // sigaction and kill are async-signal-safe.
    if signals::action(sig).sa_sigaction == on_stop_signal as *const () as usize {
        // SAFETY: sigaction is plain data; SIG_DFL is a valid disposition.
        let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        dfl.sa_sigaction = libc::SIG_DFL;
        // SAFETY: as above.
        let _ = unsafe { signals::set_action(sig, &dfl) };
    }
    let _ = process::kill_process(threads::getpid(), sig);
}

/// On `SIGINT`, `SIGTERM`, `SIGHUP` whose disposition is the default: a
/// handler that has the agent thread stop the recorder first.
pub(crate) fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in STOP_SIGNALS {
            // (A stop signal is a valid number: reading its action
            // cannot fail.)
            if signals::action(sig).sa_sigaction != libc::SIG_DFL {
                continue;
            }
            // SAFETY: sigaction is plain data; the fields used are set below.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = on_stop_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            act.sa_mask = signals::set_of(&[]);
            // SAFETY: on_stop_signal is an `extern "C" fn(c_int)`, as the
            // flags (no SA_SIGINFO) say, and lives as long as the process.
            let _ = unsafe { signals::set_action(sig, &act) };
        }
    });
}

/// On the agent thread: if a stop signal came, stops the recorder, removes
/// the socket and dies of the signal.
pub(super) fn act_on_pending() {
    let sig = PENDING_SIGNAL.swap(0, Ordering::AcqRel);
    if sig != 0 {
        stop_and_reraise(sig);
    }
}

fn stop_and_reraise(sig: libc::c_int) {
    if let Some(a) = AGENT.lock().as_mut() {
        crate::stop_recording(a, "signal");
    }
    super::socket::remove_socket();
    reraise_default(sig);
}

/// In a forked child: a signal the parent caught is the parent's.
pub(super) fn after_fork_in_child() {
    PENDING_SIGNAL.store(0, Ordering::Release);
}
