//! The per-function report (see the [module documentation](super)).

use super::{walk_thread, AnalysisError, Closed, Event, Origin, Rebuilder, TraceSet};
use serde::Serialize;
use std::collections::HashMap;
use std::str::FromStr;
use textpoke_record::tracedata::Trace;
use textpoke_record::{FuncId, Mode};

/// What to sort the functions by (largest first; ties by name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SortKey {
    /// Number of calls.
    Calls,
    /// Total (inclusive) time.
    #[default]
    Total,
    /// Self time.
    SelfTime,
    /// Average time per call.
    Avg,
    /// Longest call.
    Max,
}

impl SortKey {
    /// The names [`FromStr`] accepts.
    pub const NAMES: &'static [&'static str] = &["calls", "total", "self", "avg", "max"];
}

impl FromStr for SortKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "calls" => SortKey::Calls,
            "total" => SortKey::Total,
            "self" => SortKey::SelfTime,
            "avg" => SortKey::Avg,
            "max" => SortKey::Max,
            _ => return Err(format!("unknown sort key {s:?}; one of {}", SortKey::NAMES.join(", "))),
        })
    }
}

/// How to make a report.
#[derive(Clone, Debug, Default)]
pub struct ReportOptions {
    /// The order of the functions.
    pub sort: SortKey,
}

/// Times of one function, nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Times {
    /// Time inside the function (recursion not counted twice).
    pub total_ns: u64,
    /// Time in the function itself, not in its traced callees.
    pub self_ns: u64,
    /// Mean inclusive time per call.
    pub avg_ns: u64,
    /// Shortest call.
    pub min_ns: u64,
    /// Longest call.
    pub max_ns: u64,
}

/// One function's line of the report. As JSON: `function`, `calls`,
/// `total_ns`, `self_ns`, `avg_ns`, `min_ns`, `max_ns` (null for a
/// count-only trace, or when no call has a time), `timed`, `unfinished`,
/// `exit_lost`, `cut_by_gap`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionStats {
    /// Its id in the trace's symbol file.
    pub func: FuncId,
    /// Its name.
    pub function: String,
    /// Calls: the recorder's exact count.
    pub calls: u64,
    /// Times, `None` for a count-only trace or when no call has one.
    pub times: Option<Times>,
    /// Calls whose times the statistics are over.
    pub timed: u64,
    /// Calls that were still open when the thread's records ended (their
    /// times are lower bounds).
    pub unfinished: u64,
    /// Calls whose exit was lost (closed at their caller's exit or the
    /// next entry at their depth: upper bounds).
    pub exit_lost: u64,
    /// Calls open where events were lost: no time.
    pub cut_by_gap: u64,
}

impl Serialize for FunctionStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let t = self.times;
        let mut st = s.serialize_struct("FunctionStats", 11)?;
        st.serialize_field("function", &self.function)?;
        st.serialize_field("calls", &self.calls)?;
        st.serialize_field("total_ns", &t.map(|t| t.total_ns))?;
        st.serialize_field("self_ns", &t.map(|t| t.self_ns))?;
        st.serialize_field("avg_ns", &t.map(|t| t.avg_ns))?;
        st.serialize_field("min_ns", &t.map(|t| t.min_ns))?;
        st.serialize_field("max_ns", &t.map(|t| t.max_ns))?;
        st.serialize_field("timed", &self.timed)?;
        st.serialize_field("unfinished", &self.unfinished)?;
        st.serialize_field("exit_lost", &self.exit_lost)?;
        st.serialize_field("cut_by_gap", &self.cut_by_gap)?;
        st.end()
    }
}

/// One thread's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThreadStats {
    /// Thread id.
    pub tid: i32,
    /// Calls counted on this thread (exact).
    pub calls: u64,
    /// Exits without an entry, ignored: the recording began inside those
    /// calls.
    pub orphan_exits: u64,
    /// Exits without an entry after a gap: their entries were lost.
    pub orphan_exits_after_gap: u64,
    /// Calls closed at the end of the records.
    pub unfinished: u64,
    /// Calls closed at their caller's exit.
    pub exit_lost: u64,
    /// Calls open where events were lost.
    pub cut_by_gap: u64,
    /// Places where events were lost.
    pub gaps: u64,
    /// Events of signal handlers' calls not recorded (they ran while the
    /// thread was inside the tracer; their calls are counted).
    pub cut_events: u64,
    /// Deepest rebuilt stack level + 1.
    pub max_level: usize,
    /// Events this thread lost while recording.
    pub dropped: u64,
    /// Wall time from its first to its last event, nanoseconds.
    pub span_ns: u64,
}

/// The report of one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessReport {
    /// Process id.
    pub pid: i32,
    /// The process that forked, started or exec'd it, when known.
    pub parent_pid: Option<i32>,
    /// How it came to be traced.
    pub origin: Origin,
    /// Process name.
    pub process_name: String,
    /// Its program's path, when it was readable.
    pub exe: Option<String>,
    /// `"record"` or `"count"`.
    pub mode: Mode,
    /// Whether the trace was complete (else salvaged).
    pub complete: bool,
    /// Events lost while recording, all causes.
    pub dropped: u64,
    /// Calls, all functions (exact).
    pub calls: u64,
    /// Entry and exit events recorded.
    pub events: u64,
    /// Per function, in the order asked for.
    pub functions: Vec<FunctionStats>,
    /// Per thread, by tid.
    pub threads: Vec<ThreadStats>,
    /// The fatal signal that ended the recording, when one did (the crash
    /// flush wrote the trace up to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<textpoke_record::format::SignalEnd>,
}

/// The report of a [`TraceSet`]: the traced process, then its forked
/// children.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// One section per process.
    pub processes: Vec<ProcessReport>,
    /// Notes about incomplete traces.
    pub notes: Vec<String>,
}

#[derive(Clone, Copy)]
struct Acc {
    /// Entries seen.
    entered: u64,
    /// Calls with a time.
    timed: u64,
    total: u64,
    sum: u64,
    self_ns: u64,
    min: u64,
    max: u64,
    unfinished: u64,
    exit_lost: u64,
    cut_by_gap: u64,
    /// Activations open on the current thread (recursion).
    active: u32,
}

impl Default for Acc {
    fn default() -> Acc {
        Acc {
            entered: 0,
            timed: 0,
            total: 0,
            sum: 0,
            self_ns: 0,
            min: u64::MAX,
            max: 0,
            unfinished: 0,
            exit_lost: 0,
            cut_by_gap: 0,
            active: 0,
        }
    }
}

/// Builds the report of every process of `set`. `progress` is told how
/// many words were read (see [`TraceSet::total_words`]).
pub fn report(set: &TraceSet, opts: &ReportOptions, progress: &mut dyn FnMut(u64)) -> Result<Report, AnalysisError> {
    let mut processes = Vec::with_capacity(set.processes.len());
    for p in &set.processes {
        let mut r = process_report(&p.trace, progress)?;
        r.parent_pid = p.parent_pid;
        r.origin = p.origin;
        sort(&mut r.functions, opts.sort);
        processes.push(r);
    }
    Ok(Report { processes, notes: set.notes.clone() })
}

fn process_report(trace: &Trace, progress: &mut dyn FnMut(u64)) -> Result<ProcessReport, AnalysisError> {
    let meta = trace.meta();
    let mut accs: HashMap<FuncId, Acc> = HashMap::new();
    let timed = meta.mode == Mode::Record;
    let mut rb = Rebuilder::new(trace.clock());
    let mut threads = Vec::with_capacity(trace.threads().len());
    for t in trace.threads() {
        let mut ts = ThreadStats {
            tid: t.tid(),
            calls: t.meta.calls,
            orphan_exits: 0,
            orphan_exits_after_gap: 0,
            unfinished: 0,
            exit_lost: 0,
            cut_by_gap: 0,
            gaps: 0,
            cut_events: 0,
            max_level: 0,
            dropped: t.dropped(),
            span_ns: trace.delta_ns(t.meta.first_ts, t.meta.last_ts),
        };
        if timed {
            walk_thread(trace, t, &mut rb, progress, &mut |e| thread_event(e, &mut accs, &mut ts))?;
        }
        threads.push(ts);
    }
    // The exact counts; a salvaged trace whose counts were never written
    // has only the entries seen (its notes say so).
    let mut calls: Vec<(FuncId, u64)> = trace.counts().to_vec();
    if calls.is_empty() && !meta.complete {
        calls = accs.iter().map(|(&f, a)| (f, a.entered)).collect();
        calls.sort();
    }
    let functions: Vec<FunctionStats> = calls
        .into_iter()
        .map(|(f, calls)| {
            let a = accs.get(&f).copied().unwrap_or_default();
            FunctionStats {
                func: f,
                function: trace.name(f).to_string(),
                calls,
                times: (timed && a.timed > 0).then(|| Times {
                    total_ns: a.total,
                    self_ns: a.self_ns,
                    avg_ns: a.sum / a.timed,
                    min_ns: a.min,
                    max_ns: a.max,
                }),
                timed: a.timed,
                unfinished: a.unfinished,
                exit_lost: a.exit_lost,
                cut_by_gap: a.cut_by_gap,
            }
        })
        .collect();
    Ok(ProcessReport {
        pid: meta.pid,
        parent_pid: meta.parent_pid,
        origin: Origin::Recorded,
        process_name: meta.process_name.clone(),
        exe: meta.exe.clone(),
        mode: meta.mode,
        complete: meta.complete,
        dropped: trace.dropped(),
        // counts.json is not checked against the threads' totals: a
        // damaged one could add up past 2^64.
        calls: functions.iter().fold(0u64, |n, f| n.saturating_add(f.calls)),
        events: meta.threads.iter().map(|t| t.entries + t.exits).sum(),
        functions,
        threads,
        ended_by: meta.ended_by.clone(),
    })
}

/// Folds one rebuilt event of a thread into the functions' and the
/// thread's statistics.
fn thread_event(e: Event, accs: &mut HashMap<FuncId, Acc>, ts: &mut ThreadStats) {
    match e {
        Event::Enter { func, level, .. } => {
            ts.max_level = ts.max_level.max(level + 1);
            let a = accs.entry(func).or_default();
            a.active += 1;
            a.entered += 1;
        }
        Event::Leave(c) => {
            let a = accs.entry(c.func).or_default();
            a.active = a.active.saturating_sub(1);
            match c.closed {
                Closed::Returned => {}
                Closed::ExitLost => {
                    a.exit_lost += 1;
                    ts.exit_lost += 1;
                }
                Closed::Unfinished => {
                    a.unfinished += 1;
                    ts.unfinished += 1;
                }
                Closed::Gap => {
                    a.cut_by_gap += 1;
                    ts.cut_by_gap += 1;
                    return; // no time
                }
            }
            if a.active == 0 {
                a.total = a.total.saturating_add(c.total_ns);
            }
            a.timed += 1;
            a.sum = a.sum.saturating_add(c.total_ns);
            a.self_ns = a.self_ns.saturating_add(c.self_ns);
            a.min = a.min.min(c.total_ns);
            a.max = a.max.max(c.total_ns);
        }
        Event::OrphanExit { after_gap, .. } => {
            if after_gap {
                ts.orphan_exits_after_gap += 1;
            } else {
                ts.orphan_exits += 1;
            }
        }
        Event::Gap { .. } => ts.gaps += 1,
        Event::Cut { count, .. } => ts.cut_events += count,
    }
}

/// Sorts largest first by `key`, then by calls, then by name.
pub(crate) fn sort(functions: &mut [FunctionStats], key: SortKey) {
    let k = |f: &FunctionStats| -> u64 {
        match (key, &f.times) {
            (SortKey::Calls, _) => f.calls,
            (_, None) => f.calls,
            (SortKey::Total, Some(t)) => t.total_ns,
            (SortKey::SelfTime, Some(t)) => t.self_ns,
            (SortKey::Avg, Some(t)) => t.avg_ns,
            (SortKey::Max, Some(t)) => t.max_ns,
        }
    };
    functions
        .sort_by(|a, b| k(b).cmp(&k(a)).then_with(|| b.calls.cmp(&a.calls)).then_with(|| a.function.cmp(&b.function)));
}
