//! Turning a recorded trace into what people read: a per-function report,
//! a function-graph replay, Chrome trace-event JSON and a flame graph.
//!
//! A crate above the engine and the trace format (it was the engine's
//! `textpoke_analysis` module): it reads traces and patches nothing, and
//! what it needs to write JSON and draw flame graphs (serde_json,
//! inferno) is nothing the engine, static keys or the recorder need.
//!
//! ```no_run
//! use textpoke_analysis::{self as analysis, ReportOptions, SortKey, TraceSet};
//! use textpoke_record::tracedata::OpenOptions;
//!
//! let set = TraceSet::open("textpoke.data", OpenOptions::default())?;
//! let report = analysis::report(&set, &ReportOptions { sort: SortKey::Total }, &mut |_| {})?;
//! for f in &report.processes[0].functions {
//!     println!("{} {} calls", f.function, f.calls);
//! }
//! # Ok::<(), textpoke_analysis::AnalysisError>(())
//! ```
//!
//! # Processes
//!
//! A [`TraceSet`] is the traced process's trace directory and, recursively,
//! the directories of the children it forked (`child-<pid>/`, written when
//! the recorder follows forks). Each process is analysed apart — its own
//! report section, its own replay section, its own `pid` in the Chrome
//! trace, its own tower in the flame graph — as `uftrace` does. A child's
//! trace is opened even if it is incomplete (a child that calls `exec` or
//! `_exit` never runs the final flush: that is normal, not damage), and
//! what salvaging cut is listed in [`TraceSet::notes`]; a child trace that
//! is corrupt is an error like the parent's.
//!
//! # Rebuilding the stacks
//!
//! The records of one thread are that thread's entries, exits and gaps in
//! program order; each entry and exit carries the depth the tracer saw (its
//! shadow stack's length, exact). [`Rebuilder`] replays them against a
//! stack of open calls:
//!
//! 1. an **entry** at depth `d` first closes the open frames at depth `d`
//!    or deeper: their exits were lost (a `longjmp`, an exception that
//!    unwound them, a full shadow stack), they ended no later than this
//!    entry, so they are closed at its timestamp and marked
//!    [`Closed::ExitLost`] (an upper bound); then it pushes a frame;
//! 2. an **exit** of function `f` at depth `d` closes the innermost open
//!    frame of `f` at depth `d`, or failing that the innermost open frame of
//!    `f`; frames above it lost their exits and are closed as in 1;
//! 3. an exit that matches no open frame is an **orphan**: the trace began
//!    inside that call (attached to a running program), or its entry was
//!    lost in a gap. It is counted and otherwise ignored;
//! 4. a **gap** (events lost where the thread's buffer could not grow) is a
//!    hard break: every open frame is closed as [`Closed::Gap`] with *no*
//!    time (whether it returned during the gap is not known), and the calls
//!    after it start at the depth recording resumed at, under callers that
//!    are not known: nothing is nested across a gap, no duration spans one;
//! 5. at the end of the thread's records, the frames still open are closed
//!    at the thread's last timestamp and marked [`Closed::Unfinished`]
//!    (the recording stopped inside them): their times are lower bounds.
//!
//! When a frame closes, its inclusive time is `exit - entry` converted to
//! nanoseconds, its **self** time is that minus the inclusive times of the
//! frames it directly contained, and its inclusive time is added to its
//! caller's children time. So `Enter`/`Leave` [`Event`]s always nest, even
//! for damaged input, and every consumer below is written against that
//! invariant. Memory is one frame per open call, at most [`MAX_LEVEL`];
//! records are streamed. Time is amortised O(log depth) per record, however
//! damaged the input: recorded depths strictly increase up the stack (step
//! 1), so the call at an exit's depth is found by binary search; a deep
//! stack counts its open calls per function, so an orphan exit is known
//! without looking through it; and the calls looked through in step 2 are
//! closed at once.
//!
//! # Report
//!
//! Per function ([`FunctionStats`]): calls, total, self, average, minimum
//! and maximum time.
//!
//! - **calls** are the recorder's exact counts, kept whatever happened to
//!   the events (a count-only trace has only them);
//! - **total** is the time spent inside the function: for a recursive
//!   function the time of an activation nested in another activation of
//!   the same function on the same thread is not counted twice, so total
//!   never exceeds the thread's time;
//! - **self** adds up each call's self time;
//! - **average**, **minimum** and **maximum** are over the inclusive times
//!   of the calls that have one (every call but those cut by a gap);
//!   [`FunctionStats::timed`] says how many.
//!
//! A count-only trace ([`Mode::Count`](textpoke_record::Mode::Count)) has
//! calls and no times ([`FunctionStats::times`] is `None`).
//!
//! # Replay
//!
//! [`replay`] prints the function graph of every thread like ftrace's
//! `function_graph` tracer and `uftrace replay`: one line per entry
//! (`func() {`), one per exit (`} /* func */`), a call without traced
//! callees on one line (`func();`), the duration in the left column,
//! indented by stack level. A call is known to be a leaf when its `Leave`
//! event directly follows its `Enter`, so the printer holds back exactly
//! one `Enter` event.
//!
//! # Chrome trace-event JSON
//!
//! [`chrome`] writes the JSON object format of the Trace Event Format that
//! Perfetto UI and `chrome://tracing` open: one complete (`"ph": "X"`)
//! event per call with `pid`, `tid`, `ts` and `dur` in microseconds (from
//! the first process's start, so forked children line up in time), plus
//! `process_name` and `thread_name` metadata events. Events are written as
//! calls close, one at a time.
//!
//! # Flame graph
//!
//! [`flamegraph`] folds the rebuilt stacks into a prefix tree of call paths
//! (one node per distinct path, per process), adds each call's self time to
//! its path's node, writes the nodes as folded stack lines
//! (`main;parse;lex 1234`, see [`folded_to`]) and renders them with
//! `inferno` — the lines that can be seen, so that deep or numerous stacks
//! cost bounded memory (see the `flame` module's "Bounds").
//! A count-only trace has no stacks: each function is a one-frame stack
//! weighted by its calls. With forked children, each process's stacks sit
//! under a root frame naming it.

mod chrome;
mod escape;
mod flame;
mod replay;
mod report;
mod stacks;
#[cfg(test)]
mod tests;

pub use chrome::chrome;
pub use escape::{escape, to_json_writer, to_json_writer_pretty};
pub use flame::{flamegraph, folded, folded_to, FlameOptions, MAX_FLAME_TEXT, MAX_FOLDED_BYTES};
pub use replay::{human_ns, replay, ReplayOptions};
pub use report::{report, FunctionStats, ProcessReport, Report, ReportOptions, SortKey, ThreadStats, Times};
pub use stacks::{Call, Closed, Event, Rebuilder, MAX_LEVEL};

use std::path::{Path, PathBuf};
use textpoke_record::format::{self, CHILD_DIR_PREFIX};
use textpoke_record::tracedata::{OpenOptions, RecordKind, ThreadTrace, Trace, TraceReadError};

/// Why an analysis could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnalysisError {
    /// The trace directory is missing, truncated, corrupt, ...
    #[error(transparent)]
    Trace(#[from] TraceReadError),

    /// A forked child's trace directory is damaged.
    #[error("the trace of a forked child, {dir}, cannot be read: {source}")]
    Child {
        /// The child's trace directory.
        dir: PathBuf,
        /// What is wrong with it.
        #[source]
        source: TraceReadError,
    },

    /// The analysis needs timestamps and the trace only counted calls.
    #[error("{dir} is a count-only trace: it holds call counts but no timestamps, so it has no {what}; `textpoke report` shows its counts (record without --count-only for timings)")]
    CountOnly {
        /// The trace directory.
        dir: PathBuf,
        /// What cannot be made ("function graph", ...).
        what: &'static str,
    },

    /// Nothing to draw or show.
    #[error("trace {dir} holds no calls{detail}")]
    Empty {
        /// The trace directory.
        dir: PathBuf,
        /// More about why (may be empty).
        detail: String,
    },

    /// A `--tid` that no thread of the trace has.
    #[error("no thread {tid} in trace {dir}; its threads are: {known}")]
    NoSuchThread {
        /// The trace directory.
        dir: PathBuf,
        /// The thread asked for.
        tid: i32,
        /// The threads it has.
        known: String,
    },

    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Write(#[source] std::io::Error),

    /// The output would be too big to be of use (see
    /// [`MAX_FOLDED_BYTES`]).
    #[error("trace {dir}: {what}")]
    TooBig {
        /// The trace directory.
        dir: PathBuf,
        /// What would be too big, and what to do instead.
        what: String,
    },
}

/// One process of a [`TraceSet`].
#[derive(Debug)]
pub struct Process {
    /// Its trace.
    pub trace: Trace,
    /// Index of its parent in [`TraceSet::processes`] (`None` for the
    /// traced process itself).
    pub parent: Option<usize>,
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.trace.meta().pid
    }

    /// A short label: `name [pid N]`.
    pub fn label(&self) -> String {
        format!("{} [pid {}]", self.trace.meta().process_name, self.pid())
    }
}

/// A trace directory and the traces of the processes it forked.
#[derive(Debug)]
pub struct TraceSet {
    /// The traced process first, then its children depth-first in
    /// directory order.
    pub processes: Vec<Process>,
    /// What salvaging incomplete traces cut, one note each.
    pub notes: Vec<String>,
}

/// How deep `child-<pid>/child-<pid>/…` is followed.
const MAX_FORK_DEPTH: usize = 32;

impl TraceSet {
    /// Opens the trace directory `dir` with `opts`, and its children's.
    pub fn open(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<TraceSet, AnalysisError> {
        let dir = dir.as_ref();
        match Trace::open_with(dir, opts) {
            Ok(trace) => Self::from_trace(trace),
            // The program itself ran no traced code, but processes it
            // started did (a shell script running traced programs): their
            // traces, side by side.
            Err(TraceReadError::MissingFile { path, .. })
                if path.file_name().is_some_and(|n| n == format::META_FILE) && has_children(dir) =>
            {
                Self::children_only(dir)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The traces of the processes `dir`'s program started, each a process
    /// of its own (with its own children).
    fn children_only(dir: &Path) -> Result<TraceSet, AnalysisError> {
        let mut set = TraceSet { processes: Vec::new(), notes: Vec::new() };
        let children = child_dirs(dir);
        set.notes.push(format!(
            "{} holds no trace of its own (the program ran no traced code); showing the {} process(es) it started",
            dir.display(),
            children.len()
        ));
        for child in children {
            let trace = Trace::open_with(&child, OpenOptions { allow_incomplete: true })
                .map_err(|source| AnalysisError::Child { dir: child.clone(), source })?;
            set.add(trace, None, 1)?;
        }
        Ok(set)
    }

    /// A set from an open trace; its children are opened here.
    pub fn from_trace(trace: Trace) -> Result<TraceSet, AnalysisError> {
        let mut set = TraceSet { processes: Vec::new(), notes: Vec::new() };
        set.add(trace, None, 0)?;
        Ok(set)
    }

    fn add(&mut self, trace: Trace, parent: Option<usize>, level: usize) -> Result<(), AnalysisError> {
        if !trace.is_complete() {
            let what = if parent.is_none() { "the trace" } else { "a forked child's trace" };
            self.notes.push(match ending(&trace) {
                Some(end) => format!(
                    "{what} {} is incomplete: {end}; everything recorded up to then was written; events lost: {}",
                    trace.dir().display(),
                    losses(&trace)
                ),
                None => format!(
                    "{what} {} is incomplete (the process exited without the final flush); showing what was written",
                    trace.dir().display()
                ),
            });
        }
        self.notes.extend(trace.salvage_notes().iter().cloned());
        let children: Vec<PathBuf> = trace.children().to_vec();
        let me = self.processes.len();
        self.processes.push(Process { trace, parent });
        if level >= MAX_FORK_DEPTH {
            if !children.is_empty() {
                self.notes.push(format!("forks nested deeper than {MAX_FORK_DEPTH} levels are not shown"));
            }
            return Ok(());
        }
        for dir in children {
            let child = Trace::open_with(&dir, OpenOptions { allow_incomplete: true })
                .map_err(|source| AnalysisError::Child { dir: dir.clone(), source })?;
            self.add(child, Some(me), level + 1)?;
        }
        Ok(())
    }

    /// The traced process's trace.
    pub fn root(&self) -> &Trace {
        &self.processes[0].trace
    }

    /// Words to read in all processes (for progress bars).
    pub fn total_words(&self) -> u64 {
        self.processes.iter().flat_map(|p| p.trace.threads()).map(|t| t.words).sum()
    }

    /// Keeps only the process `pid`; `false` if no process has it.
    pub fn retain_pid(&mut self, pid: i32) -> bool {
        let Some(i) = self.processes.iter().position(|p| p.pid() == pid) else {
            return false;
        };
        let p = self.processes.swap_remove(i);
        self.processes.clear();
        self.processes.push(Process { parent: None, ..p });
        true
    }

    /// The pids of the processes.
    pub fn pids(&self) -> Vec<i32> {
        self.processes.iter().map(Process::pid).collect()
    }
}

/// The trace directories of the processes `dir`'s program started
/// (`child-<pid>`, `child-<pid>-exec`), sorted.
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| is_child_dir(p) && p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn has_children(dir: &Path) -> bool {
    !child_dirs(dir).is_empty()
}

/// Who lost events while `trace` was recorded, for people: `none`, or
/// `thread 12: 3, thread 14: 1, 2 more on no one thread` (events lost to
/// the buffer limits or to signal handlers inside the recorder; see
/// [`ThreadTrace::dropped`]).
pub fn losses(trace: &Trace) -> String {
    let mut parts: Vec<String> = trace
        .threads()
        .iter()
        .filter(|t| t.dropped() > 0)
        .map(|t| format!("thread {}: {}", t.tid(), t.dropped()))
        .collect();
    let unattributed = trace.meta().unattributed_drops.total();
    if unattributed > 0 {
        parts.push(format!("{unattributed} more on no one thread"));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// For a trace that a fatal signal ended (the crash flush, see
/// [`textpoke_record::crash`]): `the recording ended with SIGSEGV (address
/// not mapped, at 0x0) on thread 12, which crashed the process`.
pub fn ending(trace: &Trace) -> Option<String> {
    let end = trace.meta().ended_by.as_ref()?;
    Some(format!("the recording ended with {}, which crashed the process", end.describe(trace.meta().pid)))
}

/// Whether a path names a forked child's trace directory.
pub fn is_child_dir(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(CHILD_DIR_PREFIX))
}

/// How often (in words) the progress callback is called.
const PROGRESS_STEP: u64 = 1 << 14;

/// Runs one thread's records through `rb`, calling `sink` for each event,
/// then closes what is left open. `progress` is told of words read (about:
/// a record's words).
pub fn walk_thread(
    trace: &Trace,
    thread: &ThreadTrace,
    rb: &mut Rebuilder<'_>,
    progress: &mut dyn FnMut(u64),
    sink: &mut impl FnMut(Event),
) -> Result<(), TraceReadError> {
    let (mut n, mut told) = (0u64, 0u64);
    for r in trace.records(thread)? {
        let r = r?;
        rb.push(&r, sink);
        n += match r.kind {
            RecordKind::Gap => format::SYNC_WORDS as u64,
            _ => 1 + r.value.is_some() as u64,
        };
        if n - told >= PROGRESS_STEP && n <= thread.words {
            progress(n - told);
            told = n;
        }
    }
    rb.finish(sink);
    progress(thread.words.saturating_sub(told));
    Ok(())
}
