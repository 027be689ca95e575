//! The control path: sessions, the background writer thread, the stop
//! protocol, fork and exit hooks. See the [crate documentation](crate),
//! sections "Writer" (steps D0–D5), "Stop" (S1–S5) and "Fork".
//!
//! This file holds the state every part shares (the one [`STATE`] lock,
//! the running [`Session`], the registry of buffers); each part has a file
//! of its own:
//!
//! | file | job |
//! |---|---|
//! | `session/start.rs` | starting a session: the directory, the clock, publishing it to the hot path |
//! | `session/writer_thread.rs` | the writer thread: a drain every flush interval, or when woken |
//! | `session/drain.rs` | draining buffers into the thread files (D0–D5), retiring exited threads' buffers |
//! | `session/meta.rs` | the counts and the metadata (`meta.json`), written whole |
//! | `session/stop.rs` | flushing, and the stop protocol (S1–S5), also at exit |
//! | `session/fork.rs` | the fork hooks: the child's own session in `DIR/child-<pid>/` |

mod drain;
mod fork;
mod meta;
mod start;
mod stop;
mod writer_thread;

pub(crate) use start::start;
pub(crate) use stop::{flush, install_exit_flush, stop};

use crate::buffer::{self, ThreadBuf};
use crate::format::{self, ThreadMeta};
use crate::writer::{SymbolsOut, ThreadOut};
use crate::RecorderConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;
use textpoke::clock::Calibration;
use textpoke::sync::ForkLock;

/// A buffer pointer owned by the registry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct BufPtr(pub(super) *mut ThreadBuf);
// SAFETY: buffers are shared between their thread and the control path by
// design; the protocol in buffer.rs governs every access.
unsafe impl Send for BufPtr {}

impl BufPtr {
    pub(super) fn get(&self) -> &ThreadBuf {
        // SAFETY: registered buffers stay mapped until freed by the
        // control path, which removes them from the registry first.
        unsafe { &*self.0 }
    }
}

pub(super) struct State {
    /// The running session, if any.
    pub(super) session: Option<Session>,
    /// Every adopted buffer, of any session, until it is freed.
    pub(super) registry: Vec<BufPtr>,
    /// Last session epoch used.
    epoch: u64,
}

pub(super) static STATE: ForkLock<State> = ForkLock::new(State { session: None, registry: Vec::new(), epoch: 0 });

pub(super) struct Session {
    /// The ACTIVE word of this session.
    pub(super) id: u64,
    pub(super) config: RecorderConfig,
    pub(super) dir: PathBuf,
    pub(super) dir_ready: bool,
    pub(super) parent_pid: Option<i32>,
    pub(super) calibration: Calibration,
    pub(super) start_unix_ns: u64,
    pub(super) start_ts: u64,
    /// Live threads' outputs, by buffer.
    pub(super) threads: BTreeMap<BufPtr, ThreadOut>,
    /// Threads that exited, final.
    pub(super) finished: Vec<ThreadMeta>,
    /// File names used.
    pub(super) names: BTreeSet<String>,
    /// Calls of exited threads, by function id.
    pub(super) count_totals: Vec<u64>,
    pub(super) symbols: SymbolsOut,
    /// Global drop counters when the session started.
    pub(super) drops_base: [u64; 4],
    pub(super) io_drops: u64,
    pub(super) in_flight: u64,
    pub(super) io_error: Option<String>,
    /// `total_dropped` of the last metadata written.
    pub(super) last_dropped: u64,
    /// Calls counted with no thread's buffer (`unattributed_calls`).
    pub(super) orphan_calls: u64,
    /// When the metadata was last written, and whether anything changed
    /// since (a thread appeared or exited).
    pub(super) last_meta: Option<Instant>,
    pub(super) meta_due: bool,
    /// Words appended to the thread files so far (a pass that adds none
    /// is idle: see [`drain::drain`]).
    pub(super) words_out: u64,
    pub(super) writer: Option<std::thread::JoinHandle<()>>,
    pub(super) stop_requested: bool,
}

pub(super) fn global_drops() -> [u64; 4] {
    [
        buffer::DROP_CREATING.load(Ordering::Relaxed),
        buffer::DROP_EXITING.load(Ordering::Relaxed),
        buffer::DROP_NOMEM.load(Ordering::Relaxed),
        buffer::DROP_WRITER.load(Ordering::Relaxed),
    ]
}

impl Session {
    /// Creates the session's directory if it is not there yet (a forked
    /// child's is made at its first write); whether it is there.
    pub(super) fn ensure_dir(&mut self) -> bool {
        if !self.dir_ready {
            match std::fs::create_dir_all(&self.dir) {
                Ok(()) => self.dir_ready = true,
                Err(e) => {
                    self.io_error.get_or_insert_with(|| format!("create directory {}: {e}", self.dir.display()));
                }
            }
        }
        self.dir_ready
    }
}

/// Whether a session is running.
pub(crate) fn is_active() -> bool {
    STATE.lock().session.is_some()
}

/// The clock source of the running session.
pub(crate) fn active_clock() -> Option<format::ClockSource> {
    STATE.lock().session.as_ref().map(|s| s.calibration.info().source)
}
