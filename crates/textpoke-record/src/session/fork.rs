//! Fork (the crate docs' "Fork"): the recorder's lock is held across
//! `fork`; in the child, only the forking thread exists, so every other
//! thread's buffer is freed, and a session with `follow_fork` goes on in
//! `DIR/child-<pid>/` with a writer thread of its own.

use super::start::{new_session, publish};
use super::writer_thread::spawn_writer;
use super::{BufPtr, STATE};
use crate::buffer::{self, ACTIVE, MODE_MASK};
use crate::format;
use std::sync::atomic::Ordering;

pub(super) fn install_fork_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: three `extern "C"` handlers with no arguments.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    });
}

extern "C" fn fork_prepare() {
    // SAFETY: released by fork_parent or fork_child on this thread.
    unsafe { STATE.raw_lock() };
}

extern "C" fn fork_parent() {
    // SAFETY: locked by fork_prepare.
    unsafe { STATE.raw_unlock() };
}

/// In the child: only the forking thread exists. Frees every other
/// thread's buffer, and when a session with `follow_fork` was running,
/// starts a session of its own in `DIR/child-<pid>` with a new writer.
extern "C" fn fork_child() {
    // SAFETY: fork_prepare locked STATE in the parent; this child has the
    // only thread, which holds it.
    let st = unsafe { STATE.get_locked() };
    buffer::reset_after_fork();
    let me = BufPtr(buffer::current_buf());
    let mut all: Vec<BufPtr> = std::mem::take(&mut st.registry);
    all.extend(buffer::take_incoming().into_iter().map(BufPtr));
    all.sort();
    all.dedup();
    for bp in all {
        if bp == me {
            st.registry.push(bp);
        } else {
            // SAFETY: its thread does not exist in this process.
            unsafe { buffer::free(bp.0) };
        }
    }
    let mut spawn = None;
    if let Some(mut s) = st.session.take() {
        // The parent's writer does not exist here: forget its handle
        // (joining or detaching it would touch a thread of the parent).
        if let Some(h) = s.writer.take() {
            std::mem::forget(h);
        }
        if s.config.follow_fork {
            let pid = textpoke_sys::threads::getpid();
            // SAFETY: no preconditions.
            let ppid = unsafe { libc::getppid() };
            st.epoch += 1;
            let id = st.epoch << 2 | (s.id & MODE_MASK);
            let dir = s.dir.join(format!("{}{pid}", format::CHILD_DIR_PREFIX));
            let mut config = s.config.clone();
            config.process_name = None;
            let calibration = s.calibration;
            let child = new_session(id, dir, Some(ppid), config, calibration, false);
            publish(id, &child.config);
            st.session = Some(child);
            spawn = Some(id);
        } else {
            ACTIVE.store(0, Ordering::SeqCst);
        }
        // The parent's files: their buffers hold the parent's unwritten
        // data, which the parent writes; close without flushing.
        for out in s.threads.values_mut() {
            if let Some(f) = out.file.take() {
                let (f, _) = f.into_parts();
                drop(f);
            }
        }
        drop(s);
    }
    if let Some(id) = spawn {
        match spawn_writer(id) {
            Ok(h) => {
                if let Some(s) = st.session.as_mut() {
                    s.writer = Some(h);
                }
            }
            Err(e) => {
                if let Some(s) = st.session.as_mut() {
                    s.io_error = Some(format!("cannot start the writer in the child: {e}"));
                }
            }
        }
    }
    // SAFETY: held since fork_prepare.
    unsafe { STATE.raw_unlock() };
}
