//! The per-function report (see the [module documentation](super)).

use super::{walk_thread, AnalysisError, Closed, Event, Rebuilder, TraceSet};
use crate::record::{FuncId, Mode};
use crate::tracedata::Trace;
use serde::Serialize;
use std::str::FromStr;

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
/// count-only trace), `unfinished`, `exit_lost`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionStats {
    /// Its id in the trace's symbol table.
    pub func: FuncId,
    /// Its name.
    pub function: String,
    /// Calls (entries seen; for a count-only trace, the counts).
    pub calls: u64,
    /// Times, `None` for a count-only trace.
    pub times: Option<Times>,
    /// Calls that were still open when the thread's records ended.
    pub unfinished: u64,
    /// Calls whose exit was lost (closed at their caller's exit).
    pub exit_lost: u64,
}

impl Serialize for FunctionStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let t = self.times;
        let mut st = s.serialize_struct("FunctionStats", 9)?;
        st.serialize_field("function", &self.function)?;
        st.serialize_field("calls", &self.calls)?;
        st.serialize_field("total_ns", &t.map(|t| t.total_ns))?;
        st.serialize_field("self_ns", &t.map(|t| t.self_ns))?;
        st.serialize_field("avg_ns", &t.map(|t| t.avg_ns))?;
        st.serialize_field("min_ns", &t.map(|t| t.min_ns))?;
        st.serialize_field("max_ns", &t.map(|t| t.max_ns))?;
        st.serialize_field("unfinished", &self.unfinished)?;
        st.serialize_field("exit_lost", &self.exit_lost)?;
        st.end()
    }
}

/// One thread's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThreadStats {
    /// Thread id.
    pub tid: i32,
    /// Calls seen (entries; count-only: calls counted).
    pub calls: u64,
    /// Exits without an entry, ignored.
    pub orphan_exits: u64,
    /// Calls closed at the end of the records.
    pub unfinished: u64,
    /// Calls closed at their caller's exit.
    pub exit_lost: u64,
    /// Deepest rebuilt stack level + 1.
    pub max_level: usize,
    /// Records this thread dropped while recording.
    pub dropped: u64,
    /// Wall time from its first to its last record, nanoseconds.
    pub span_ns: u64,
}

/// The report of one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessReport {
    /// Process id.
    pub pid: i32,
    /// Parent process id, for a forked child.
    pub parent_pid: Option<i32>,
    /// Process name.
    pub process_name: String,
    /// `"record"` or `"count"`.
    pub mode: Mode,
    /// Whether the trace was complete (else salvaged).
    pub complete: bool,
    /// Records dropped while recording, all causes.
    pub dropped: u64,
    /// Calls, all functions.
    pub calls: u64,
    /// Per function, in the order asked for.
    pub functions: Vec<FunctionStats>,
    /// Per thread, by tid.
    pub threads: Vec<ThreadStats>,
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

#[derive(Clone, Copy, Default)]
struct Acc {
    calls: u64,
    total: u64,
    sum: u64,
    self_ns: u64,
    min: u64,
    max: u64,
    unfinished: u64,
    exit_lost: u64,
    /// Activations open on the current thread (recursion).
    active: u32,
}

/// Builds the report of every process of `set`. `progress` is told how
/// many records were read (see [`TraceSet::total_records`]).
pub fn report(set: &TraceSet, opts: &ReportOptions, progress: &mut dyn FnMut(u64)) -> Result<Report, AnalysisError> {
    let mut processes = Vec::with_capacity(set.processes.len());
    for p in &set.processes {
        let parent_pid = p.parent.map(|i| set.processes[i].pid()).or(p.trace.meta().parent_pid);
        let mut r = process_report(&p.trace, progress)?;
        r.parent_pid = parent_pid;
        sort(&mut r.functions, opts.sort);
        processes.push(r);
    }
    Ok(Report { processes, notes: set.notes.clone() })
}

fn process_report(trace: &Trace, progress: &mut dyn FnMut(u64)) -> Result<ProcessReport, AnalysisError> {
    let meta = trace.meta();
    let nsyms = trace.symbols().len();
    let mut accs = vec![Acc { min: u64::MAX, ..Acc::default() }; nsyms];
    let mut threads = Vec::with_capacity(trace.threads().len());
    match trace.counts() {
        Some(counts) => {
            for &(f, n) in counts {
                if let Some(a) = accs.get_mut(f.0 as usize) {
                    a.calls += n;
                }
            }
            for t in trace.threads() {
                threads.push(ThreadStats {
                    tid: t.tid(),
                    calls: t.meta.calls,
                    orphan_exits: 0,
                    unfinished: 0,
                    exit_lost: 0,
                    max_level: 0,
                    dropped: t.dropped(),
                    span_ns: trace.delta_ns(t.meta.first_ts, t.meta.last_ts),
                });
            }
        }
        None => {
            let mut rb = Rebuilder::new(trace.clock());
            for t in trace.threads() {
                let mut ts = ThreadStats {
                    tid: t.tid(),
                    calls: 0,
                    orphan_exits: 0,
                    unfinished: 0,
                    exit_lost: 0,
                    max_level: 0,
                    dropped: t.dropped(),
                    span_ns: 0,
                };
                let (mut first, mut last) = (None, 0u64);
                walk_thread(trace, t, &mut rb, progress, &mut |e| match e {
                    Event::Enter { func, level, ts: at } => {
                        first.get_or_insert(at);
                        last = last.max(at);
                        ts.calls += 1;
                        ts.max_level = ts.max_level.max(level + 1);
                        if let Some(a) = accs.get_mut(func.0 as usize) {
                            a.active += 1;
                        }
                    }
                    Event::Leave(c) => {
                        last = last.max(c.end);
                        let Some(a) = accs.get_mut(c.func.0 as usize) else {
                            return;
                        };
                        a.calls += 1;
                        a.active = a.active.saturating_sub(1);
                        if a.active == 0 {
                            a.total = a.total.saturating_add(c.total_ns);
                        }
                        a.sum = a.sum.saturating_add(c.total_ns);
                        a.self_ns = a.self_ns.saturating_add(c.self_ns);
                        a.min = a.min.min(c.total_ns);
                        a.max = a.max.max(c.total_ns);
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
                        }
                    }
                    Event::OrphanExit { ts: at, .. } => {
                        first.get_or_insert(at);
                        last = last.max(at);
                        ts.orphan_exits += 1;
                    }
                })?;
                ts.span_ns = first.map_or(0, |f| trace.delta_ns(f, last));
                threads.push(ts);
            }
        }
    }
    let timed = trace.counts().is_none();
    let functions: Vec<FunctionStats> = accs
        .iter()
        .enumerate()
        .filter(|(_, a)| a.calls > 0)
        .map(|(i, a)| {
            let f = FuncId(i as u32);
            FunctionStats {
                func: f,
                function: trace.name(f).to_string(),
                calls: a.calls,
                times: timed.then(|| Times {
                    total_ns: a.total,
                    self_ns: a.self_ns,
                    avg_ns: a.sum / a.calls,
                    min_ns: a.min,
                    max_ns: a.max,
                }),
                unfinished: a.unfinished,
                exit_lost: a.exit_lost,
            }
        })
        .collect();
    Ok(ProcessReport {
        pid: meta.pid,
        parent_pid: meta.parent_pid,
        process_name: meta.process_name.clone(),
        mode: meta.mode,
        complete: meta.complete,
        dropped: trace.dropped(),
        calls: functions.iter().map(|f| f.calls).sum(),
        functions,
        threads,
    })
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
