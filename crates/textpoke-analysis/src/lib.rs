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
//! the directories of the processes it forked or started (`child-<pid>/`,
//! written when the recorder follows forks and execs; `child-<pid>-exec/`
//! for the program a traced process exec'd). Each process is analysed
//! apart — its own report section, its own replay section, its own `pid`
//! in the Chrome trace, its own tower in the flame graph — as `uftrace`
//! does; [`Process::origin`] says how it came to be traced. A program that
//! ran no traced code itself but started programs that did (a shell
//! script) leaves a directory of children and no trace: its children are
//! shown in its place, and so are those of a child directory without a
//! trace (a subshell's commands). A child's trace is opened even if it is
//! incomplete (a child that calls `exec` or `_exit` never runs the final
//! flush: that is normal, not damage), and what salvaging cut is listed in
//! [`TraceSet::notes`]; a child trace that is corrupt is an error like the
//! parent's.
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
pub mod color;
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

use serde::Serialize;
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

/// How a process of a [`TraceSet`] came to be traced, as the place of its
/// trace directory says (the agent writes a forked child's trace, and
/// that of a program a traced process started, in `child-<pid>/` inside
/// its parent's directory; that of the program a traced process exec'd in
/// `child-<pid>-exec/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The program `textpoke record` ran.
    Recorded,
    /// A child forked by a traced process, running on in the same program
    /// (its trace names its parent).
    Forked,
    /// A program another process started (fork and exec, `posix_spawn`,
    /// `vfork`): the commands of a shell script, say.
    Started,
    /// The program a traced process exec'd: the same pid, a new program.
    Exec,
}

impl Origin {
    /// Where a process came from, for people: `forked from pid 12`,
    /// `started by pid 12`, `pid 12 after exec`; empty for the recorded
    /// program.
    pub fn describe(self, parent_pid: Option<i32>) -> String {
        match (self, parent_pid) {
            (Origin::Recorded, _) => String::new(),
            (Origin::Forked, Some(p)) => format!("forked from pid {p}"),
            (Origin::Forked, None) => "forked".into(),
            (Origin::Started, Some(p)) => format!("started by pid {p}"),
            (Origin::Started, None) => "started by the recorded program".into(),
            (Origin::Exec, Some(p)) => format!("pid {p} after exec"),
            (Origin::Exec, None) => "after exec".into(),
        }
    }
}

/// One process of a [`TraceSet`].
#[derive(Debug)]
pub struct Process {
    /// Its trace.
    pub trace: Trace,
    /// How it came to be traced.
    pub origin: Origin,
    /// The process that forked, started or exec'd it, when known (a
    /// program started by a recorded program that traced nothing itself
    /// has none).
    pub parent_pid: Option<i32>,
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

    /// Where it came from, for people (see [`Origin::describe`]).
    pub fn origin_text(&self) -> String {
        self.origin.describe(self.parent_pid)
    }
}

/// A trace directory and the traces of the processes it forked or started.
#[derive(Debug)]
pub struct TraceSet {
    /// The traced process first, then depth first the processes each
    /// process forked or started, in the order they started.
    pub processes: Vec<Process>,
    /// What salvaging incomplete traces cut, one note each, and which
    /// processes left no trace of their own.
    pub notes: Vec<String>,
    /// The pids of the `child-<pid>` directories without a trace (see
    /// [`TraceSet::open`]).
    silent: Vec<i32>,
}

/// How deep `child-<pid>/child-<pid>/…` is followed.
const MAX_FORK_DEPTH: usize = 32;

impl TraceSet {
    /// Opens the trace directory `dir` with `opts`, and those of the
    /// processes it forked or started (`child-*`, recursively).
    ///
    /// A directory without a trace of its own (no `meta.json`) that holds
    /// children is no error: the program ran no traced code, but programs
    /// it started did (a shell script running traced programs, each
    /// command in its own `child-<pid>/`; a subshell's commands one level
    /// down). Its children are shown in its place, and a note says so.
    pub fn open(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<TraceSet, AnalysisError> {
        let dir = dir.as_ref();
        let mut set = TraceSet::empty();
        match Trace::open_with(dir, opts) {
            Ok(trace) => set.add(trace, Origin::Recorded, None, 0)?,
            Err(e) if is_missing_meta(&e, dir) && !child_dirs(dir).is_empty() => {
                set.add_children(dir, None, 1)?;
                if set.processes.is_empty() {
                    return Err(e.into());
                }
                set.notes.insert(
                    0,
                    format!(
                        "{} holds no trace of its own (the program ran no traced code); showing the {} process(es) \
                         it started",
                        dir.display(),
                        set.processes.len()
                    ),
                );
            }
            Err(e) => return Err(e.into()),
        }
        set.note_silent();
        Ok(set)
    }

    /// A set from an open trace; its children are opened here.
    pub fn from_trace(trace: Trace) -> Result<TraceSet, AnalysisError> {
        let mut set = TraceSet::empty();
        set.add(trace, Origin::Recorded, None, 0)?;
        set.note_silent();
        Ok(set)
    }

    fn empty() -> TraceSet {
        TraceSet { processes: Vec::new(), notes: Vec::new(), silent: Vec::new() }
    }

    /// Adds `trace` (at fork depth `level`) and the processes under it.
    fn add(
        &mut self,
        trace: Trace,
        origin: Origin,
        parent_pid: Option<i32>,
        level: usize,
    ) -> Result<(), AnalysisError> {
        if !trace.is_complete() {
            let what = match origin {
                Origin::Recorded => "the trace".to_string(),
                _ => format!("the trace of pid {}", trace.meta().pid),
            };
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
        let (dir, pid) = (trace.dir().to_path_buf(), trace.meta().pid);
        self.processes.push(Process { trace, origin, parent_pid });
        self.add_children(&dir, Some(pid), level + 1)
    }

    /// Adds the processes whose directories are in `dir` (the process
    /// `pid`'s, when known), at fork depth `level`, each with the processes
    /// under it, in the order they started: a directory without a trace
    /// (a subshell's) where the first process under it started.
    fn add_children(&mut self, dir: &Path, pid: Option<i32>, level: usize) -> Result<(), AnalysisError> {
        let dirs = child_dirs(dir);
        if level > MAX_FORK_DEPTH {
            if !dirs.is_empty() {
                self.notes.push(format!("forks nested deeper than {MAX_FORK_DEPTH} levels are not shown"));
            }
            return Ok(());
        }
        let mut blocks: Vec<Vec<Process>> = Vec::with_capacity(dirs.len());
        for d in dirs {
            let before = self.processes.len();
            match Trace::open_with(&d, OpenOptions { allow_incomplete: true }) {
                Ok(t) => {
                    let (origin, parent) = match t.meta().parent_pid {
                        _ if is_exec_dir(&d) => (Origin::Exec, pid),
                        Some(p) => (Origin::Forked, Some(p)),
                        None => (Origin::Started, pid),
                    };
                    self.add(t, origin, parent, level)?;
                }
                Err(e) if is_missing_meta(&e, &d) => {
                    let child_pid = dir_pid(&d);
                    self.silent.extend(child_pid);
                    self.add_children(&d, child_pid.or(pid), level + 1)?;
                }
                Err(source) => return Err(AnalysisError::Child { dir: d, source }),
            }
            blocks.push(self.processes.split_off(before));
        }
        // A process starts before those under it: a block's earliest start
        // is its first process's, or for a directory without a trace its
        // first child's.
        blocks.sort_by_cached_key(|b| b.iter().map(|p| (p.trace.meta().start_unix_ns, p.pid())).min());
        self.processes.extend(blocks.into_iter().flatten());
        Ok(())
    }

    /// One note for the directories without a trace.
    fn note_silent(&mut self) {
        if self.silent.is_empty() {
            return;
        }
        let pids: Vec<String> = self.silent.iter().map(|p| p.to_string()).collect();
        self.notes.push(format!(
            "{} process(es) left a directory but no trace of their own (pid {}): they ran no traced code (a shell \
             running commands, say) or ended before their first flush; the processes they started are shown",
            pids.len(),
            pids.join(", ")
        ));
    }

    /// The traced process's trace (the first process's, when the program
    /// recorded nothing itself).
    pub fn root(&self) -> &Trace {
        &self.processes[0].trace
    }

    /// Words to read in all processes (for progress bars).
    pub fn total_words(&self) -> u64 {
        self.processes.iter().flat_map(|p| p.trace.threads()).map(|t| t.words).sum()
    }

    /// Keeps only the process `pid` (its programs before and after an
    /// exec, if it exec'd); `false` if no process has it.
    pub fn retain_pid(&mut self, pid: i32) -> bool {
        if !self.processes.iter().any(|p| p.pid() == pid) {
            return false;
        }
        self.processes.retain(|p| p.pid() == pid);
        true
    }

    /// The pids of the processes, in order (a pid twice when its process
    /// exec'd a traced program).
    pub fn pids(&self) -> Vec<i32> {
        self.processes.iter().map(Process::pid).collect()
    }
}

/// Whether `e` says that `dir` has no `meta.json`.
fn is_missing_meta(e: &TraceReadError, dir: &Path) -> bool {
    matches!(e, TraceReadError::MissingFile { path, .. } if *path == dir.join(format::META_FILE))
}

/// The trace directories of the processes `dir`'s program forked or
/// started (`child-<pid>`, `child-<pid>-exec`), sorted by name.
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| is_child_dir(p));
    v.sort();
    v
}

/// Whether `dir` is `child-<pid>-exec`: the program a process exec'd.
fn is_exec_dir(dir: &Path) -> bool {
    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("-exec"))
}

/// The pid in a `child-<pid>` or `child-<pid>-exec` directory's name.
fn dir_pid(dir: &Path) -> Option<i32> {
    let name = dir.file_name()?.to_str()?.strip_prefix(CHILD_DIR_PREFIX)?;
    name.strip_suffix("-exec").unwrap_or(name).parse().ok()
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
