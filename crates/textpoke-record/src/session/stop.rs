//! Flushing a running session, and stopping it: the stop protocol (the
//! crate docs' S1–S5), also run at exit by an `atexit` handler.

use super::drain::{drain, mark_pending_cut, sweep};
use super::meta::write_meta;
use super::{BufPtr, Session, STATE};
use crate::buffer::{self, ACTIVE};
use crate::{RecordError, TraceSummary};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Drains the running session and writes its side files now; what it
/// holds so far.
pub(crate) fn flush() -> Result<TraceSummary, RecordError> {
    let mut st = STATE.lock();
    if st.session.is_none() {
        return Err(RecordError::NotActive);
    }
    if !crate::crash::writer_rests() {
        drain(&mut st, true); // not over a crash flush's metadata (F8)
    }
    flush_files(st.session.as_mut().expect("checked above"));
    let s = st.session.as_ref().expect("checked above");
    if let Some(e) = &s.io_error {
        return Err(RecordError::Write(e.clone()));
    }
    Ok(summary(s, false))
}

/// Pushes the threads' buffered file writes to the kernel.
fn flush_files(s: &mut Session) {
    for out in s.threads.values_mut() {
        if let Some(f) = out.file.as_mut() {
            if let Err(e) = f.flush() {
                s.io_error.get_or_insert_with(|| format!("write {}: {e}", out.name.as_deref().unwrap_or("?")));
            }
        }
    }
}

fn summary(s: &Session, complete: bool) -> TraceSummary {
    let live = s.threads.values().map(|t| (t.scan.entries + t.scan.exits, t.calls));
    let done = s.finished.iter().map(|t| (t.entries + t.exits, t.calls));
    let (events, calls) = live.chain(done).fold((0, 0), |(e, c), (te, tc)| (e + te, c + tc));
    let threads = s.finished.len() + s.threads.len();
    TraceSummary { dir: s.dir.clone(), threads, events, calls, dropped: s.last_dropped, complete }
}

/// Stops the active session: S1–S5 of the module docs.
pub(crate) fn stop() -> Result<TraceSummary, RecordError> {
    // A process that stops normally outlived any crash flush (F8).
    crate::crash::reset();
    // Ask the writer to finish and wait for it, without holding the lock.
    let writer = {
        let mut st = STATE.lock();
        let Some(s) = st.session.as_mut() else {
            return Err(RecordError::NotActive);
        };
        s.stop_requested = true;
        s.writer.take()
    };
    buffer::wake_writer();
    if let Some(h) = writer {
        let _ = h.join();
    }
    let mut st = STATE.lock();
    let Some(id) = st.session.as_ref().map(|s| s.id) else {
        return Err(RecordError::NotActive);
    };
    // S1. SeqCst pairs with C2's SeqCst increment of CREATING.
    ACTIVE.store(0, Ordering::SeqCst);
    // S2: a full barrier on every thread, so a thread that set `busy` (H2)
    // before it is visible to S4, and one that did not sees ACTIVE = 0.
    if textpoke::sync::sync_cores(textpoke::sync::best_method()).is_err() {
        std::thread::sleep(Duration::from_millis(10)); // best effort
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    // S3: buffers being created are pushed before CREATING drops to 0.
    // Acquire pairs with C7's release decrement.
    while buffer::CREATING.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    let stuck_creating = buffer::CREATING.load(Ordering::Acquire) as u64;
    for b in buffer::take_incoming() {
        st.registry.push(BufPtr(b));
    }
    // S4: wait until no thread is inside a record call on a buffer of this
    // session. Acquire pairs with H8/K4's release store of `busy`.
    let mut stuck = stuck_creating;
    for bp in &st.registry {
        let b = bp.get();
        if b.p.session.load(Ordering::Acquire) != id {
            continue;
        }
        while b.p.busy.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        if b.p.busy.load(Ordering::Acquire) != 0 {
            stuck += 1;
        }
    }
    // S5: the final drain, then every file, then `complete` last.
    if let Some(s) = st.session.as_mut() {
        s.in_flight = stuck;
    }
    drain(&mut st, false);
    let st = &mut *st;
    let mut s = st.session.take().expect("checked above");
    let live: Vec<BufPtr> = s.threads.keys().copied().collect();
    for bp in live {
        mark_pending_cut(&mut s, bp);
    }
    let live: Vec<BufPtr> =
        st.registry.iter().copied().filter(|bp| bp.get().p.session.load(Ordering::Acquire) == s.id).collect();
    flush_files(&mut s);
    if s.config.sync_files {
        for out in s.threads.values() {
            if let Some(Err(e)) = out.file.as_ref().map(|f| f.get_ref().sync_data()) {
                s.io_error.get_or_insert_with(|| format!("sync {}: {e}", out.name.as_deref().unwrap_or("?")));
            }
        }
    }
    write_meta(&mut s, &live, true);
    let result = match &s.io_error {
        Some(e) => Err(RecordError::Write(e.clone())),
        None => Ok(summary(&s, true)),
    };
    sweep(st);
    result
}

/// Registers (once) an `atexit` handler that stops the active session, so
/// a program that returns from `main` or calls `exit` leaves a complete
/// trace.
pub(crate) fn install_exit_flush() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: an `extern "C"` handler with no arguments.
        unsafe { libc::atexit(at_exit) };
    });
}

extern "C" fn at_exit() {
    let active = STATE.lock().session.is_some();
    if active {
        if let Err(e) = stop() {
            eprintln!("textpoke: final trace flush at exit failed: {e}");
        }
    }
}
