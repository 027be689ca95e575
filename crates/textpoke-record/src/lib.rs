//! The recorder: per-thread buffers that grow as chains of segments, a
//! background writer, and the trace directory it writes. A client of the
//! tracer like any op ([`RecordOp`]), bringing its own inline code for
//! the tracer's trampolines.
//!
//! # The crate
//!
//! It was the engine's `textpoke::record` and `textpoke::tracedata`
//! modules; it sits above the engine (`textpoke`) and uses it as any
//! client would: the tracer's ops and inline-code hook ([`RecordOp`]),
//! the assembler and trampoline frames of `textpoke::arch` for its
//! generated code, the clock, the function table, `sys`. The engine knows
//! nothing of it. One crate holds the writer, the on-disk [`format`](mod@format) and
//! its reader ([`tracedata`]): the three change together (the format's
//! version), a round trip is tested in one place, and they need the same
//! serde and serde_json, which the engine does not. Glob filters for the
//! tracer ([`filter`], with globset) live here too: the engine's
//! `trace::Filter` takes any matcher, and the agent and the CLI, which
//! turn `-F`/`-N` globs into filters, both use this crate.
//!
//! # Use
//!
//! ```no_run
//! use textpoke_record::{self as record, FuncId, RecorderConfig};
//!
//! // Control path: name the functions, start a session.
//! let f: FuncId = record::register_function(0x401000, "main");
//! let rec = record::start(RecorderConfig::new("textpoke.data"))?;
//!
//! // Hot path (a trampoline's callback, any thread, signal handlers too):
//! record::entry(f, 0);
//! record::exit(f, 0);
//!
//! let summary = rec.stop()?; // final drain; writes "complete": true last
//! # Ok::<(), textpoke_record::RecordError>(())
//! ```
//!
//! Function ids come from [`textpoke::funcs`] (the tracer registers each
//! site's function there; [`register_function`] does for callers of
//! their own). The hot path functions [`entry`], [`exit`], [`exit_value`]
//! and [`count`] take that id and return whether the event was kept; when
//! no session of their kind runs they return `false` (after one load).
//!
//! # Nothing lost while memory allows
//!
//! Each thread writes into a chain of *segments* (128 KiB by default).
//! When one fills, the thread takes a free one — one the writer gave back
//! after writing it out, or a new mapping — and goes on: a buffer grows
//! while the writer is behind, up to the thread's limit
//! ([`RecorderConfig::thread_limit`]) and the overall one
//! ([`RecorderConfig::memory_limit`]). Only past a limit are events
//! dropped: counted per thread, and marked in the thread's stream where
//! recording resumes (a sync record carrying the number lost and the depth
//! to resume at), so readers show the gap where it happened and never nest
//! across it. That is LTTng's *discard* mode, chosen as the default
//! because the traced program never waits for the tracer and what was
//! kept is exact; LTTng's blocking mode would make the program wait for
//! the disk (and can deadlock a program whose signal handlers record),
//! and ftrace's overwrite mode loses the beginning of a run silently
//! unless asked for. Calls are counted whatever happens to the events
//! (K3), so call counts are exact even past a limit.
//!
//! # Hot path (H0–H8)
//!
//! Each thread owns one `buffer`, reached through a `const`-initialised
//! thread-local pointer. An event:
//!
//! - **H0** reads the clock first (after a check that a recording session
//!   runs), so that the ordered read waits for as little earlier work as
//!   possible.
//! - **H1** loads the thread's buffer pointer; none → buffer creation (C).
//! - **H2** per-thread recursion guard: if the buffer's `busy` flag is set,
//!   a signal handler interrupted this thread inside a record call — the
//!   event is dropped and counted (`dropped_nested`; an entry's call is
//!   still counted); else sets `busy`. No lock, no retry.
//! - **H3** compares the global session word with the buffer's own: a
//!   buffer made for an earlier session (or no session running) goes to
//!   the cold path.
//! - **K3** (entries) counts the call in the thread's counter array.
//! - **H4** checks that the event fits the current segment (`pos` plus its
//!   size at most `end`) and a compact word (see [`format`](mod@format)); else the
//!   segment steps below (G).
//! - **H5** clamps the time to the thread's previous one (a signal handler
//!   that records between H0 and H2 could otherwise leave a later time
//!   before an earlier one) and takes the delta from it.
//! - **H6** writes the word (and the return value after it).
//! - **H7** publishes the new `pos` (release).
//! - **H8** clears `busy` (release).
//!
//! No allocation, lock, panic or loop; async-signal-safe. Single producer
//! (the thread, and its signal handlers, serialised by H2), single consumer
//! (the writer, serialised by the session lock).
//!
//! # Segments (G1–G4)
//!
//! With `busy` held, when an event does not fit:
//!
//! - **G1** takes a segment: the thread's spares, else the whole list the
//!   writer gave back (one atomic swap: the producer never pops a single
//!   one, so there is no ABA), else a new mapping (`mmap`,
//!   async-signal-safe).
//! - **G2** starts it with a sync record (the time the next delta counts
//!   from, the depth of the next event, the events lost just before) and
//!   links it: the old segment's final `used`, then its `next` (release),
//!   then `pos` in the new one (release); wakes the writer.
//! - **G3** a new mapping must fit the thread's limit and the overall one
//!   (an atomic add to the memory in use, undone if over).
//! - **G4** no segment to be had: the event is dropped and counted; the
//!   next sync record carries the count.
//!
//! A new buffer's first segment is started by its first event (a sync
//! record at its depth).
//!
//! # Count-only mode (K1–K4)
//!
//! [`count`] increments `counters[id]` of the thread's buffer: **K1** saves
//! and sets `busy`, **K2** checks the session and `id < max_functions`,
//! **K3** adds one with a single `add [mem], 1` (no lock prefix: only this
//! thread writes it, and a signal handler counting on the same thread runs
//! between instructions, so counts nest without loss; on aarch64, where no
//! instruction adds to memory without LSE, an atomic add: `stadd`, or a
//! load/store-exclusive loop), **K4** restores
//! `busy`. The writer sums the arrays. Ids out of range are counted as
//! `dropped_range`. Record mode keeps the same arrays (K3 at every entry).
//!
//! # Buffer creation (C1–C7)
//!
//! The first event of a thread in a session (cold, `#[cold]`):
//!
//! - **C1** if the thread is already creating its buffer (a signal handler
//!   interrupted C2–C7), has retired it (thread exit) or is the writer, the
//!   event is dropped and counted in `unattributed_drops`.
//! - **C2** marks the thread as creating and increments a global
//!   `CREATING` counter (SeqCst; see S3).
//! - **C3** re-reads the session word and the configuration.
//! - **C4** maps a new buffer with `mmap` (not malloc: the thread may be a
//!   signal handler that interrupted malloc), its first segment and its
//!   counters, and sets the thread-exit destructor with
//!   `pthread_setspecific`, or
//! - **C5** re-initialises the thread's stale buffer from an earlier
//!   session (that session's final drain is over: its segments are
//!   unmapped), publishing its new `session` last (release, paired with the
//!   writer's acquire D0).
//! - **C6** pushes a new buffer on a lock-free stack the writer adopts.
//! - **C7** writes the event, then decrements `CREATING` (release).
//!
//! # Thread exit (X1–X2)
//!
//! A pthread key destructor runs at thread exit: **X1** clears the
//! thread-local pointer and marks the thread exited (later events, from
//! other destructors, are dropped and counted as `exiting`); **X2** sets the
//! buffer's `exited` flag (release) and wakes the writer, which drains the
//! buffer a last time, keeps its final counts and unmaps it (D5). (The main
//! thread never runs key destructors: [`flush_at_exit`] covers it.)
//!
//! # Writer (D0–D5)
//!
//! A background thread (`SCHED_BATCH`) wakes every `flush_interval`, or
//! when a segment fills or a thread exits, and, holding the session lock,
//! for every buffer: **D5** loads `exited` (acquire) first; **D0** loads
//! `session` (acquire) and skips buffers of other sessions; **D1** loads
//! `pos` (acquire, paired with H7): if it lies in the segment the writer's
//! cursor is in, the words up to it are taken; **D2** otherwise the
//! producer moved on: `next` (acquire, paired with G2) and the final
//! `used` give the rest of the segment; **D3** the words are scanned
//! (counts, checksum, the functions that appear) and appended to the
//! thread's file (buffered), straight from the segment; **D4** a finished
//! segment goes back to its producer's free list (or is unmapped when the
//! producer holds spares already, so memory shrinks after a burst). The
//! symbols of newly seen functions are appended to the symbol file; the
//! metadata is rewritten at most once a second (for a salvage).
//!
//! # Stop (S1–S5)
//!
//! [`Recorder::stop`] (or [`stop_active`], or the exit hook) stops the
//! writer thread, then:
//!
//! - **S1** stores 0 into the session word (SeqCst);
//! - **S2** runs a membarrier (`textpoke::sync::sync_cores`), a full barrier
//!   on every thread: a thread whose H2 store of `busy` precedes its
//!   barrier is seen busy by S4, and one whose H3 load follows it sees the
//!   session ended — the hot path itself needs no fence for this;
//! - **S3** waits for `CREATING` to reach 0, so every buffer being created
//!   has been pushed (C2's SeqCst increment against S1's SeqCst store);
//! - **S4** waits until no buffer of the session is `busy` (acquire, paired
//!   with H8);
//! - **S5** drains every buffer, flushes the files, writes the counts, the
//!   symbols and `meta.json` with `complete: true` last.
//!
//! The waits are bounded (2 s); a thread still inside a record call then
//! (stopped in a debugger, say) is reported as `in_flight_at_stop`.
//!
//! # Crash (F1–F8)
//!
//! When a fatal signal is about to kill the process, the thread it hit
//! writes what the buffers hold — from its signal handler, holding the
//! session lock it only tries to take, allocating nothing — with the
//! counts, the missing symbols and `meta.json` (`complete: false`,
//! `ended_by`: the signal and the thread), so that the trace ends where
//! the program did; the writer yields the lock to it and rests after it.
//! See [`crash`] (the agent calls it from its handler).
//!
//! # Fork
//!
//! `pthread_atfork` handlers hold the session lock across `fork`. In the
//! child (one thread), every other thread's buffer is unmapped; when the
//! session has `follow_fork`, the child starts its own session writing
//! `DIR/child-<pid>/` (a full trace directory, `parent_pid` set, created on
//! its first data) with a new writer thread; the forking thread's buffer is
//! re-initialised on its next event (C5), so the parent's unwritten
//! events are not duplicated into the child. A child that calls `exec` or
//! `_exit` before stopping leaves that directory without `complete`.
//!
//! # Clock
//!
//! See [`textpoke::clock`]: the invariant TSC read with `lfence; rdtsc` when
//! the CPU and kernel say it is one timebase (plain `rdtsc` was measured to
//! reverse the order of synchronised events across threads; it is offered
//! as [`ClockSource::TscUnordered`]), else `CLOCK_MONOTONIC`; calibrated
//! against `CLOCK_MONOTONIC`, the conversion stored in `meta.json`.
//!
//! # On-disk format (version 2)
//!
//! A trace directory holds:
//!
//! - `meta.json` ([`format::Meta`]): `format` = `"textpoke-trace"`,
//!   `version` = 2, `complete` (written `true` only by the final flush,
//!   after every other file was written — a crashed or truncated trace has
//!   `false`), `mode` (`record`|`count`), `pid`, `parent_pid`,
//!   `process_name`, `exe`, `clock` (source, `mult`, `shift`,
//!   `base_ticks`, `base_ns`: `ns = base_ns + ((ticks - base_ticks) * mult
//!   >> shift)`, in `CLOCK_MONOTONIC` ns), `start_unix_ns`, `start_ts`,
//!   `end_ts`, `buffers` (segment size, limits, policy, peak memory),
//!   `max_functions`, and per thread ([`format::ThreadMeta`]): `tid`,
//!   `file`, `words`, `entries`, `exits`, `lost`, `dropped_nested`,
//!   `dropped_range`, `calls`, `first_ts`, `last_ts`, `checksum`,
//!   `exited`; plus `unattributed_drops` (`creating`, `exiting`,
//!   `no_memory`, `writer_thread`, `io`, `in_flight_at_stop`),
//!   `total_events`, `total_dropped` (events) and `total_calls`.
//!   When a fatal signal ended the recording, `ended_by` too
//!   ([`format::SignalEnd`]: what the crash flush saw).
//! - `symbols.jsonl`: one `{"id", "addr", "name"}` per line, for the
//!   functions that appear in events or counts (and no other).
//! - `counts.json` ([`format::CountsFile`]): `{"calls": [[id, calls],
//!   …]}`: exact calls per function, summed over threads (both modes).
//! - `tid-<tid>.bin` (record mode; `tid-<tid>-<n>.bin` if a tid was
//!   reused): a 32-byte header — magic `TPKTHRD\0`, `u32` version (2),
//!   `u32` word length (8), `i32` tid, 12 reserved zero bytes — then the
//!   thread's event stream ([`format`](mod@format): 8-byte compact events, sync and
//!   long records). The file has exactly `words` words, whose checksum
//!   ([`format::checksum_step`]) is `checksum`.
//! - `child-<pid>/`: the trace of a forked child, same layout.
//!
//! [`crate::tracedata`] reads and validates it.

mod buffer;
// The inline fast paths (`RecordOp::inline`), one file per architecture.
#[cfg(target_arch = "x86_64")]
#[path = "codegen/x86_64.rs"]
mod codegen;
#[cfg(target_arch = "aarch64")]
#[path = "codegen/aarch64.rs"]
mod codegen;
pub mod crash;
pub mod dir;
pub mod filter;
pub mod format;
mod op;
mod session;
pub mod tracedata;
mod writer;

pub use format::{ClockSource, FullPolicy, Mode};
pub use op::RecordOp;
pub use textpoke::clock::{self, Clock};
pub use textpoke::funcs::FuncId;

use std::path::{Path, PathBuf};
use std::time::Duration;

// ---------------------------------------------------------------------------
// Hot path.

/// Records entry into `func` at call depth `depth` on the calling thread,
/// and counts the call. Returns whether the event was kept (false: no
/// recording session, or dropped and counted). Async-signal-safe; no
/// allocation, lock or panic.
#[inline(always)]
pub fn entry(func: FuncId, depth: u32) -> bool {
    buffer::record(format::KIND_ENTRY, func.0, depth, None)
}

/// Records the return from `func` at call depth `depth`. See [`entry`].
#[inline(always)]
pub fn exit(func: FuncId, depth: u32) -> bool {
    buffer::record(format::KIND_EXIT, func.0, depth, None)
}

/// Records the return from `func` with its return value (two words,
/// kept or dropped together). See [`entry`].
#[inline(always)]
pub fn exit_value(func: FuncId, depth: u32, value: u64) -> bool {
    buffer::record(format::KIND_EXIT, func.0, depth, Some(value))
}

/// Counts one call of `func` without an event (count-only sessions, and
/// calls a record session must count but cannot record). Returns whether
/// it was counted. Async-signal-safe; no allocation, lock or panic.
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
    /// Bytes of one segment of a thread's buffer (a multiple of 4096, at
    /// least 8192). A thread's buffer starts with one and grows by more
    /// while the writer is behind.
    pub segment_bytes: usize,
    /// The most one thread's buffer may hold, bytes (`-b/--buffer-size`;
    /// at least two segments).
    pub thread_limit: usize,
    /// The most all threads' buffers together may hold, bytes
    /// (`--memory-limit`). See [`default_memory_limit`].
    pub memory_limit: usize,
    /// Counter array length per thread (function ids must be below it, at
    /// most 2^22).
    pub max_functions: u32,
    /// How often the writer drains when no segment fills.
    pub flush_interval: Duration,
    /// Clock selection.
    pub clock: ClockChoice,
    /// How long the initial TSC calibration waits before a first rate (0:
    /// the rate is measured over the whole recording, refined at the end).
    pub calibration: Duration,
    /// Process name for the metadata (default `/proc/self/comm`).
    pub process_name: Option<String>,
    /// Record forked children into `DIR/child-<pid>/`.
    pub follow_fork: bool,
    /// If `dir` holds a textpoke trace, move it to `DIR.old` (otherwise a
    /// non-empty `dir` is refused).
    pub replace_existing: bool,
    /// `dir` may already hold the `child-*` directories of processes this
    /// process started before it exec'd the traced program (its earlier
    /// image recorded nothing): they are kept and the trace written beside
    /// them (`dir` module, rule 6).
    pub keep_children: bool,
    /// Fault a segment in when it is mapped, so that recording never takes
    /// a page fault, as ftrace allocates its ring pages up front. Off:
    /// pages are faulted in as events first reach them (about a
    /// microsecond per 4 KiB, on the traced thread).
    pub prefault_buffers: bool,
    /// `fsync` the files before `complete: true` is written (off: the
    /// trace survives the process, not a power cut).
    pub sync_files: bool,
}

/// The default overall memory limit: a quarter of the machine's memory, at
/// most 4 GiB, at least 64 MiB.
pub fn default_memory_limit() -> usize {
    let total = textpoke_sys::mem::physical_memory();
    (total / 4).clamp(64 << 20, 4 << 30) as usize
}

impl RecorderConfig {
    /// Defaults: record mode, 128 KiB segments, 1 GiB per thread, the
    /// [`default_memory_limit`], 2^20 functions, 50 ms flush interval,
    /// automatic clock calibrated over the run, follow fork, replace an old
    /// trace, prefaulted segments, no fsync.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        RecorderConfig {
            dir: dir.as_ref().to_path_buf(),
            mode: Mode::Record,
            segment_bytes: 128 << 10,
            thread_limit: 1 << 30,
            memory_limit: default_memory_limit(),
            max_functions: 1 << 20,
            flush_interval: Duration::from_millis(50),
            clock: ClockChoice::Auto,
            calibration: Duration::ZERO,
            process_name: None,
            follow_fork: true,
            replace_existing: true,
            keep_children: false,
            prefault_buffers: true,
            sync_files: false,
        }
    }

    /// The same configuration in count-only mode.
    pub fn count_only(mut self) -> Self {
        self.mode = Mode::Count;
        self
    }

    /// Checks the sizes; says what is wrong.
    fn validate(&self) -> Result<(), RecordError> {
        let bad = |m: String| Err(RecordError::Config(m));
        if self.segment_bytes < 8192 || !self.segment_bytes.is_multiple_of(4096) {
            return bad(format!("segment_bytes {} must be a multiple of 4096, at least 8192", self.segment_bytes));
        }
        if self.mode == Mode::Record && self.thread_limit < 2 * self.segment_bytes {
            // One segment being written and one being drained: with less,
            // a thread could never record again once its segment filled.
            return bad(format!(
                "the per-thread buffer limit ({} bytes) must hold at least two segments ({} bytes each)",
                self.thread_limit, self.segment_bytes
            ));
        }
        if self.mode == Mode::Record && self.memory_limit < self.segment_bytes {
            return bad(format!(
                "the memory limit ({} bytes) must hold at least one segment ({} bytes)",
                self.memory_limit, self.segment_bytes
            ));
        }
        if self.max_functions == 0 || self.max_functions > 1 << format::FUNC_BITS {
            return bad(format!(
                "max_functions {} must be between 1 and {}",
                self.max_functions,
                1u32 << format::FUNC_BITS
            ));
        }
        Ok(())
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

    #[error("writing the trace failed: {0}; events drained meanwhile are counted as lost (unattributed_drops.io)")]
    Write(String),
}

/// What a flush or stop wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSummary {
    /// The trace directory.
    pub dir: PathBuf,
    /// Threads that recorded.
    pub threads: usize,
    /// Entry and exit events written.
    pub events: u64,
    /// Calls counted (exact).
    pub calls: u64,
    /// Events lost (all causes).
    pub dropped: u64,
    /// Whether `meta.json` now says complete.
    pub complete: bool,
}

/// Registers a function (its address and name) in [`textpoke::funcs`] and
/// returns its id. The same address always gets the same id. Control path.
pub fn register_function(addr: usize, name: &str) -> FuncId {
    textpoke::funcs::register(addr, name)
}

/// How many functions are registered.
pub fn function_count() -> usize {
    textpoke::funcs::count()
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

/// Events the calling thread wrote through the recorder's slow path (a
/// segment to start or change, a time gap too long for a compact event):
/// the tracer's inline code hands those over to the hot path. For tests
/// that count slow calls (counted in `testing` builds only).
#[cfg(feature = "testing")]
pub fn slow_events_of_this_thread() -> u64 {
    buffer::slow_events_of_this_thread()
}

/// Bytes of segments the threads' buffers hold now (all sessions).
pub fn memory_in_use() -> u64 {
    buffer::MEM_USED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether a session is running.
pub fn is_active() -> bool {
    session::is_active()
}

/// The clock source of the running session.
pub fn active_clock() -> Option<ClockSource> {
    session::active_clock()
}

/// Sets functions called on a thread when it makes its buffer (step C4:
/// its first event in a session) and when it retires it (X1: thread exit);
/// `None` clears one. Both must be async-signal-safe (C4 may run in a
/// signal handler) and must not record. The agent gives recording threads
/// an alternate signal stack there, for the crash flush.
pub fn set_thread_hooks(start: Option<extern "C" fn()>, exit: Option<extern "C" fn()>) {
    let p = |h: Option<extern "C" fn()>| h.map_or(std::ptr::null_mut(), |f| f as *mut ());
    // Release pairs with the acquire load in buffer::call_hook.
    buffer::THREAD_START_HOOK.store(p(start), std::sync::atomic::Ordering::Release);
    buffer::THREAD_EXIT_HOOK.store(p(exit), std::sync::atomic::Ordering::Release);
}

/// Test switch: calls `hook` in the middle of buffer creation (step C4),
/// e.g. to raise a signal whose handler records; `None` clears it.
#[cfg(feature = "testing")]
pub fn set_creation_hook(hook: Option<extern "C" fn()>) {
    let p = hook.map_or(std::ptr::null_mut(), |f| f as *mut ());
    buffer::CREATION_HOOK.store(p, std::sync::atomic::Ordering::Relaxed);
}
