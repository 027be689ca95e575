//! The recorder: per-thread lock-free ring buffers of entry/exit records,
//! a background writer, and the trace directory it writes.
//!
//! # Use
//!
//! ```no_run
//! use textpoke::record::{self, FuncId, Mode, RecorderConfig};
//!
//! // Control path: name the functions, start a session.
//! let f: FuncId = record::register_function(0x401000, "main");
//! let rec = record::start(RecorderConfig::new("textpoke.data"))?;
//!
//! // Hot path (a trampoline's callback, any thread, signal handlers too):
//! record::entry(f, 0);
//! record::exit(f, 0);
//!
//! let summary = rec.stop()?; // final flush; writes "complete": true last
//! # Ok::<(), textpoke::record::RecordError>(())
//! ```
//!
//! Function ids come from [`register_function`] (dense from 0, stable for
//! the process; the tracer registers each site's function from
//! [`crate::sites`] once and keeps the id in its per-site data). The hot
//! path functions [`entry`], [`exit`], [`exit_value`] and [`count`] take
//! that id and return whether the event was recorded; when no session of
//! their kind runs they return `false` (after one load when none runs).
//!
//! # Hot path (H1–H8)
//!
//! Each thread owns one [`buffer`] (a ring of 16-byte records plus
//! counters), reached through a `const`-initialised thread-local pointer.
//! A record call:
//!
//! - **H1** loads the thread's buffer pointer; none → buffer creation (C).
//! - **H2** per-thread recursion guard: if the buffer's `busy` flag is set,
//!   a signal handler interrupted this thread inside a record call — the
//!   record is dropped and counted (`dropped_nested`); else sets `busy`.
//!   No lock, no retry: the outer call's slot reservation is never shared.
//! - **H3** compares the global session word with the buffer's own: a
//!   buffer made for an earlier session (or no session running) goes to the
//!   cold path.
//! - **H4** checks space against a cached copy of the writer's `tail`,
//!   re-reading the real one only when the cache says full; still full →
//!   dropped and counted (`dropped_full`), never overwriting unread data.
//! - **H5** takes the timestamp read first thing (**H0**, after a check
//!   that any session runs: the ordered clock read then waits for as little
//!   earlier work as possible — 39 ns per entry+exit pair instead of 43
//!   measured), clamped to the thread's previous timestamp (a signal
//!   handler that records between H0 and H2 could otherwise leave a later
//!   time before an earlier one).
//! - **H6** writes the slot (two for [`exit_value`]).
//! - **H7** publishes `head` (release); crossing half-full wakes the writer
//!   (a futex wake, once per half buffer).
//! - **H8** clears `busy` (release).
//!
//! No allocation, lock, panic or loop; async-signal-safe. Single producer
//! (the thread, and its signal handlers, serialised by H2), single consumer
//! (the writer, serialised by the session lock).
//!
//! # Count-only mode (K1–K4)
//!
//! [`count`] increments `counters[id]` of the thread's buffer: **K1** saves
//! and sets `busy`, **K2** checks the session and `id < max_functions`,
//! **K3** adds one with a single `add [mem], 1` (no lock prefix: only this
//! thread writes it, and a signal handler counting on the same thread runs
//! between instructions, so counts nest without loss), **K4** restores
//! `busy`. The writer sums the arrays. Ids out of range are counted as
//! `dropped_range`.
//!
//! # Buffer creation (C1–C7)
//!
//! The first record of a thread in a session (cold, `#[cold]`):
//!
//! - **C1** if the thread is already creating its buffer (a signal handler
//!   interrupted C2–C7), has retired it (thread exit) or is the writer, the
//!   record is dropped and counted in `unattributed_drops`.
//! - **C2** marks the thread as creating and increments a global
//!   `CREATING` counter (SeqCst; see S3).
//! - **C3** re-reads the session word and the ring/counter sizes.
//! - **C4** maps a new buffer with `mmap` (not malloc: the thread may be a
//!   signal handler that interrupted malloc) and sets the thread-exit
//!   destructor with `pthread_setspecific`, or
//! - **C5** re-initialises the thread's stale buffer from an earlier
//!   session (that session's final drain is over), publishing its new
//!   `session` last (release, paired with the writer's acquire D0).
//! - **C6** pushes a new buffer on a lock-free stack the writer adopts.
//! - **C7** writes the record, then decrements `CREATING` (release).
//!
//! Every step is async-signal-safe; mapping failures are counted
//! (`no_memory`).
//!
//! # Thread exit (X1–X2)
//!
//! A pthread key destructor runs at thread exit: **X1** clears the
//! thread-local pointer and marks the thread exited (later records, from
//! other destructors, are dropped and counted as `exiting`); **X2** sets the
//! buffer's `exited` flag (release). The writer (D5) drains the buffer a
//! last time, keeps its final counts and unmaps it. (The main thread never
//! runs key destructors: [`flush_at_exit`] covers it.)
//!
//! # Writer (D0–D5)
//!
//! A background thread wakes every `flush_interval` (or when woken) and,
//! holding the session lock, for every buffer: **D5** loads `exited`
//! (acquire) first, **D0** loads `session` (acquire) and skips buffers of
//! other sessions; **D1** loads `head` (acquire, paired with H7); **D2**
//! copies `[tail, head)` out; **D4** stores `tail = head` (release, paired
//! with H4); **D3** appends the records to the thread's file. Then it
//! rewrites `symbols.json` (when functions were added), `counts.json`
//! (count mode, at most once a second) and `meta.json` with `complete:
//! false`, each via a temporary file and `rename`.
//!
//! # Stop (S1–S5)
//!
//! [`Recorder::stop`] (or [`stop_active`], or the exit hook) stops the
//! writer thread, then:
//!
//! - **S1** stores 0 into the session word (SeqCst);
//! - **S2** runs a membarrier (`crate::sync::sync_cores`), a full barrier
//!   on every thread: a thread whose H2 store of `busy` precedes its
//!   barrier is seen busy by S4, and one whose H3 load follows it sees the
//!   session ended — the hot path itself needs no fence for this;
//! - **S3** waits for `CREATING` to reach 0, so every buffer being created
//!   has been pushed (C2's SeqCst increment against S1's SeqCst store);
//! - **S4** waits until no buffer of the session is `busy` (acquire, paired
//!   with H8);
//! - **S5** drains every buffer, syncs the files, and writes `meta.json`
//!   with `complete: true` last.
//!
//! The waits are bounded (2 s); a thread still inside a record call then
//! (stopped in a debugger, say) is reported as `in_flight_at_stop`.
//!
//! # Fork
//!
//! `pthread_atfork` handlers hold the session lock across `fork`. In the
//! child (one thread), every other thread's buffer is unmapped; when the
//! session has `follow_fork`, the child starts its own session writing
//! `DIR/child-<pid>/` (a full trace directory, `parent_pid` set, created on
//! its first data) with a new writer thread; the forking thread's buffer is
//! re-initialised on its next record (C5), so the parent's unwritten
//! records are not duplicated into the child. A child that calls `exec` or
//! `_exit` before stopping leaves that directory without `complete`.
//!
//! # Clock
//!
//! See [`clock`]: the invariant TSC read with `lfence; rdtsc` when the CPU
//! and kernel say it is one timebase (plain `rdtsc` was measured to
//! reverse the order of synchronised events across threads), else
//! `CLOCK_MONOTONIC`; calibrated against `CLOCK_MONOTONIC`, the conversion
//! stored in `meta.json`.
//!
//! # Costs
//!
//! `cargo bench -p textpoke --bench record-bench` (2-vCPU VM, 2.6 GHz
//! Xeon): entry+exit recorded 41 ns against 26 ns for two `lfence; rdtsc`
//! reads in the same run (1.57×; issue 4 asks ≤ 1.3×, not met yet); with
//! `CLOCK_MONOTONIC` 40 ns against 32 ns (1.23×); count-only 0.7 ns per
//! call above the bare loop; an idle call (no session) 0.4 ns.
//!
//! # On-disk format (version 1)
//!
//! A trace directory holds:
//!
//! - `meta.json` ([`format::Meta`]): `format` = `"textpoke-trace"`,
//!   `version` = 1, `complete` (written `true` only by the final flush,
//!   after every other file was written and synced — a crashed or
//!   truncated trace has `false`), `mode` (`record`|`count`), `pid`,
//!   `parent_pid`, `process_name`, `exe`, `clock` (source `tsc` or
//!   `monotonic`, `mult`, `shift`, `base_ticks`, `base_ns`: `ns = base_ns +
//!   ((ticks - base_ticks) * mult >> shift)`, in `CLOCK_MONOTONIC` ns),
//!   `start_unix_ns`, `start_ts`, `end_ts`, `buffer_records`,
//!   `max_functions`, and per thread ([`format::ThreadMeta`]): `tid`,
//!   `file`, `records`, `entries`, `exits`, `dropped_full`,
//!   `dropped_nested`, `dropped_range`, `calls`, `first_ts`, `last_ts`,
//!   `checksum`, `exited`; plus `unattributed_drops` (`creating`,
//!   `exiting`, `no_memory`, `writer_thread`, `io`, `in_flight_at_stop`),
//!   `total_records` and `total_dropped`.
//! - `symbols.json` ([`format::SymbolsFile`]): `{"symbols": [{"id",
//!   "addr", "name"}, …]}`, ids dense from 0.
//! - `tid-<tid>.bin` (record mode; `tid-<tid>-<n>.bin` if a tid was
//!   reused): a 32-byte header — magic `TPKTHRD\0`, `u32` version (1),
//!   `u32` record length (16), `i32` tid, 12 reserved zero bytes — then
//!   16-byte little-endian records in the thread's program order:
//!   `u64 ts` (clock ticks, non-decreasing), `u32 func`, `u16 depth`
//!   (saturated), `u8 kind` (1 entry, 2 exit, 3 value: the return value of
//!   the exit record before it, in the `ts` field), `u8 flags` (0). The
//!   file has exactly `records` records, whose checksum
//!   ([`format::checksum_step`]) is `checksum`.
//! - `counts.json` (count mode): `{"calls": [[id, calls], …]}`, summed
//!   over threads.
//! - `child-<pid>/`: the trace of a forked child, same layout.
//!
//! [`crate::tracedata`] reads and validates it.

mod buffer;
pub mod clock;
pub mod dir;
pub mod format;
mod session;

pub use buffer::{buffer_layout, BufferLayout};
pub use clock::Clock;
pub use format::{ClockSource, Mode};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A function id: an index into the trace's symbol table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncId(pub u32);

// ---------------------------------------------------------------------------
// Hot path.

/// Records entry into `func` at call depth `depth` on the calling thread.
/// Returns whether it was recorded (false: no recording session, or
/// dropped and counted). Async-signal-safe; no allocation, lock or panic.
#[inline(always)]
pub fn entry(func: FuncId, depth: u32) -> bool {
    buffer::record(format::KIND_ENTRY, func.0, depth, None)
}

/// Records the return from `func` at call depth `depth`. See [`entry`].
#[inline(always)]
pub fn exit(func: FuncId, depth: u32) -> bool {
    buffer::record(format::KIND_EXIT, func.0, depth, None)
}

/// Records the return from `func` with its return value (two slots,
/// recorded or dropped together). See [`entry`].
#[inline(always)]
pub fn exit_value(func: FuncId, depth: u32, value: u64) -> bool {
    buffer::record(format::KIND_EXIT, func.0, depth, Some(value))
}

/// Counts one call of `func` (count-only sessions). Returns whether it was
/// counted. Async-signal-safe; no allocation, lock or panic.
#[inline(always)]
pub fn count(func: FuncId) -> bool {
    buffer::count(func.0)
}

// ---------------------------------------------------------------------------
// Control path.

/// Which clock to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockChoice {
    /// The TSC when it is invariant and the kernel's clocksource, else
    /// `CLOCK_MONOTONIC` ([`clock::detect`]).
    Auto,
    /// This source, whatever the machine says.
    Force(ClockSource),
}

/// How to record.
#[derive(Clone, Debug)]
pub struct RecorderConfig {
    /// The trace directory.
    pub dir: PathBuf,
    /// Records or counts.
    pub mode: Mode,
    /// Ring capacity per thread, in 16-byte records (rounded up to a power
    /// of two). See `prefault_buffers`.
    pub buffer_records: usize,
    /// Count mode: counter array length per thread (function ids must be
    /// below it).
    pub max_functions: u32,
    /// How often the writer drains.
    pub flush_interval: Duration,
    /// Clock selection.
    pub clock: ClockChoice,
    /// How long the initial TSC calibration measures.
    pub calibration: Duration,
    /// Process name for the metadata (default `/proc/self/comm`).
    pub process_name: Option<String>,
    /// Record forked children into `DIR/child-<pid>/`.
    pub follow_fork: bool,
    /// If `dir` holds a textpoke trace, move it to `DIR.old` (otherwise a
    /// non-empty `dir` is refused).
    pub replace_existing: bool,
    /// Wake the writer when a thread's buffer crosses half-full.
    pub wake_writer_at_half: bool,
    /// Fault a thread's ring in when it is made (on the thread's first
    /// record), so that recording never takes a page fault, as ftrace
    /// allocates its ring pages up front. The memory is then committed:
    /// `buffer_records` x 16 bytes per recording thread. Off: pages are
    /// faulted in as records first reach them (about a microsecond per 256
    /// records, on the traced thread).
    pub prefault_buffers: bool,
}

impl RecorderConfig {
    /// Defaults: record mode, 256 Ki records (4 MiB) per thread, 2^18
    /// functions, 20 ms flush interval, automatic clock, 20 ms calibration,
    /// follow fork, replace an old trace.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        RecorderConfig {
            dir: dir.as_ref().to_path_buf(),
            mode: Mode::Record,
            buffer_records: 1 << 18,
            max_functions: 1 << 18,
            flush_interval: Duration::from_millis(20),
            clock: ClockChoice::Auto,
            calibration: Duration::from_millis(20),
            process_name: None,
            follow_fork: true,
            replace_existing: true,
            wake_writer_at_half: true,
            prefault_buffers: true,
        }
    }

    /// The same configuration in count-only mode.
    pub fn count_only(mut self) -> Self {
        self.mode = Mode::Count;
        self
    }
}

/// Why a control-path call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("a recording session is already running (trace directory {dir}); stop it first")]
    AlreadyActive { dir: PathBuf },

    #[error("no recording session is running")]
    NotActive,

    #[error("{dir} is not empty and holds no textpoke trace (no meta.json); refusing to write into it — choose another directory")]
    DirNotEmpty { dir: PathBuf },

    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },

    #[error("invalid recorder configuration: {0}")]
    Config(String),

    #[error("cannot start the writer thread: {0}")]
    Spawn(std::io::Error),

    #[error("writing the trace failed: {0}; records drained meanwhile are counted as dropped (unattributed_drops.io)")]
    Write(String),
}

/// What a flush or stop wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSummary {
    /// The trace directory.
    pub dir: PathBuf,
    /// Threads that recorded.
    pub threads: usize,
    /// Records written.
    pub records: u64,
    /// Records dropped (all causes).
    pub dropped: u64,
    /// Whether `meta.json` now says complete.
    pub complete: bool,
}

/// Registers a function (its address and name; the tracer passes a site's
/// function from [`crate::sites`]) and returns its id. The same address
/// always gets the same id. Control path (takes the session lock).
pub fn register_function(addr: usize, name: &str) -> FuncId {
    FuncId(session::register_function(addr, name))
}

/// How many functions are registered.
pub fn function_count() -> usize {
    session::function_count()
}

/// Starts recording into `config.dir` (one session per process at a
/// time). Creates the directory, calibrates the clock, starts the writer.
pub fn start(config: RecorderConfig) -> Result<Recorder, RecordError> {
    session::start(config)?;
    Ok(Recorder { stopped: false })
}

/// The running session. Dropping it stops the session (errors ignored);
/// call [`Recorder::stop`] to see them. In a forked child, the copy of the
/// handle refers to the child's own session.
#[derive(Debug)]
#[must_use = "dropping the Recorder stops recording"]
pub struct Recorder {
    stopped: bool,
}

impl Recorder {
    /// Drains every buffer now and rewrites the metadata (not complete).
    pub fn flush(&self) -> Result<TraceSummary, RecordError> {
        session::flush()
    }

    /// Stops recording: final drain, then `complete: true`.
    pub fn stop(mut self) -> Result<TraceSummary, RecordError> {
        self.stopped = true;
        session::stop()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = session::stop();
        }
    }
}

/// Stops the running session, if any (for the agent: before `exec`, at
/// unload). `Ok(None)` when nothing was running.
pub fn stop_active() -> Result<Option<TraceSummary>, RecordError> {
    match session::stop() {
        Ok(s) => Ok(Some(s)),
        Err(RecordError::NotActive) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Flushes the running session, if any.
pub fn flush_active() -> Result<Option<TraceSummary>, RecordError> {
    match session::flush() {
        Ok(s) => Ok(Some(s)),
        Err(RecordError::NotActive) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Registers (once per process) an `atexit` handler that stops the running
/// session, so `exit` and a return from `main` leave a complete trace. The
/// agent calls it at load.
pub fn flush_at_exit() {
    session::install_exit_flush();
}

/// Whether a session is running.
pub fn is_active() -> bool {
    session::is_active()
}

/// The clock source of the running session.
pub fn active_clock() -> Option<ClockSource> {
    session::active_clock()
}

/// Test support: calls `hook` in the middle of buffer creation (step C4),
/// e.g. to raise a signal whose handler records; `None` clears it.
#[doc(hidden)]
pub fn set_creation_hook(hook: Option<extern "C" fn()>) {
    let p = hook.map_or(std::ptr::null_mut(), |f| f as *mut ());
    buffer::CREATION_HOOK.store(p, std::sync::atomic::Ordering::Relaxed);
}
