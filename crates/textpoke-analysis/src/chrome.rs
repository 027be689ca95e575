//! Chrome trace-event JSON (see the [module documentation](super)).
//!
//! The JSON object format: `{"traceEvents": [...], "displayTimeUnit":
//! "ns", "otherData": {...}}`. Each call is one complete event:
//!
//! ```json
//! {"name":"work","cat":"function","ph":"X","pid":1234,"tid":1235,"ts":12.345,"dur":3.2}
//! ```
//!
//! with `args.unfinished` or `args.exit_lost` set for calls closed without
//! their exit and `args.ret` for a recorded return value; each process and
//! thread gets a `"ph": "M"` name event.

use super::{to_json_writer, walk_thread, AnalysisError, Closed, Event, Rebuilder, TraceSet};
use serde::Serialize;
use std::io::Write;

#[derive(Serialize)]
struct Complete<'a> {
    name: &'a str,
    cat: &'static str,
    ph: &'static str,
    pid: i32,
    tid: i32,
    ts: f64,
    dur: f64,
    #[serde(skip_serializing_if = "Args::is_empty")]
    args: Args,
}

#[derive(Serialize, Default)]
struct Args {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    unfinished: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    exit_lost: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cut_by_gap: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ret: Option<u64>,
}

impl Args {
    fn is_empty(&self) -> bool {
        !self.unfinished && !self.exit_lost && !self.cut_by_gap && self.ret.is_none()
    }
}

/// An instant event: where events were lost.
#[derive(Serialize)]
struct Instant<'a> {
    name: &'a str,
    cat: &'static str,
    ph: &'static str,
    s: &'static str,
    pid: i32,
    tid: i32,
    ts: f64,
    args: GapArgs,
}

#[derive(Serialize)]
struct GapArgs {
    lost: u64,
}

#[derive(Serialize)]
struct NameArgs<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'static str,
    ph: &'static str,
    pid: i32,
    tid: i32,
    args: NameArgs<'a>,
}

#[derive(Serialize)]
struct SortArgs {
    sort_index: i64,
}

#[derive(Serialize)]
struct SortMetadata {
    name: &'static str,
    ph: &'static str,
    pid: i32,
    tid: i32,
    args: SortArgs,
}

/// Microseconds of `ns` nanoseconds, exact to the nanosecond for any
/// trace shorter than about 100 days (f64 has 53 bits).
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Writes the Chrome trace-event JSON of every process of `set` to `w`.
/// Returns the number of call events written.
pub fn chrome<W: Write>(set: &TraceSet, w: &mut W, progress: &mut dyn FnMut(u64)) -> Result<u64, AnalysisError> {
    let root = set.root();
    for p in &set.processes {
        if p.trace.mode() == textpoke_record::Mode::Count {
            return Err(AnalysisError::CountOnly {
                dir: p.trace.dir().to_path_buf(),
                what: "timeline for a trace-event file",
            });
        }
    }
    let base_ns = root.to_ns(root.meta().start_ts);
    let write = AnalysisError::Write;
    let json = |e: serde_json::Error| AnalysisError::Write(e.into());
    write!(w, "{{\"traceEvents\":[").map_err(write)?;
    let mut first = true;
    let mut sep = |w: &mut W| -> Result<(), AnalysisError> {
        if !std::mem::take(&mut first) {
            w.write_all(b",").map_err(AnalysisError::Write)?;
        }
        w.write_all(b"\n").map_err(AnalysisError::Write)
    };
    let mut events = 0u64;
    for (index, p) in set.processes.iter().enumerate() {
        let trace = &p.trace;
        let pid = p.pid();
        let pname = p.label();
        sep(w)?;
        to_json_writer(
            &mut *w,
            &Metadata { name: "process_name", ph: "M", pid, tid: pid, args: NameArgs { name: &pname } },
        )
        .map_err(json)?;
        sep(w)?;
        to_json_writer(
            &mut *w,
            &SortMetadata {
                name: "process_sort_index",
                ph: "M",
                pid,
                tid: pid,
                args: SortArgs { sort_index: index as i64 },
            },
        )
        .map_err(json)?;
        let mut rb = Rebuilder::new(trace.clock());
        for t in trace.threads() {
            let tid = t.tid();
            let tname =
                if tid == pid { format!("{} (main)", trace.meta().process_name) } else { format!("thread {tid}") };
            sep(w)?;
            to_json_writer(
                &mut *w,
                &Metadata { name: "thread_name", ph: "M", pid, tid, args: NameArgs { name: &tname } },
            )
            .map_err(json)?;
            let mut err = None;
            walk_thread(trace, t, &mut rb, progress, &mut |e| {
                if err.is_some() {
                    return;
                }
                let r = match e {
                    Event::Leave(c) => {
                        let start_ns = trace.to_ns(c.start).saturating_sub(base_ns);
                        // A call cut by a gap is shown up to the last event
                        // before it: what is known, and marked.
                        let dur = match c.closed {
                            Closed::Gap => trace.delta_ns(c.start, c.end),
                            _ => c.total_ns,
                        };
                        let ev = Complete {
                            name: trace.name(c.func),
                            cat: "function",
                            ph: "X",
                            pid,
                            tid,
                            ts: us(start_ns),
                            dur: us(dur),
                            args: Args {
                                unfinished: c.closed == Closed::Unfinished,
                                exit_lost: c.closed == Closed::ExitLost,
                                cut_by_gap: c.closed == Closed::Gap,
                                ret: c.value,
                            },
                        };
                        sep(w).and_then(|_| to_json_writer(&mut *w, &ev).map_err(json))
                    }
                    Event::Gap { lost, ts, .. } | Event::Cut { count: lost, ts } => {
                        let name = if matches!(e, Event::Gap { .. }) {
                            "events lost"
                        } else {
                            "signal handler's events not recorded"
                        };
                        let ev = Instant {
                            name,
                            cat: "textpoke",
                            ph: "i",
                            s: "t",
                            pid,
                            tid,
                            ts: us(trace.to_ns(ts).saturating_sub(base_ns)),
                            args: GapArgs { lost },
                        };
                        sep(w).and_then(|_| to_json_writer(&mut *w, &ev).map_err(json))
                    }
                    _ => return,
                };
                match r {
                    Ok(()) => events += 1,
                    Err(e) => err = Some(e),
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
    }
    let other = serde_json::json!({
        "tool": "textpoke",
        "version": env!("CARGO_PKG_VERSION"),
        "trace": root.dir().display().to_string(),
        "clock": root.clock().source.to_string(),
        "dropped": set.processes.iter().map(|p| p.trace.dropped()).sum::<u64>(),
        "complete": set.processes.iter().all(|p| p.trace.is_complete()),
    });
    write!(w, "\n],\"displayTimeUnit\":\"ns\",\"otherData\":").map_err(write)?;
    to_json_writer(&mut *w, &other).map_err(json)?;
    writeln!(w, "}}").map_err(write)?;
    Ok(events)
}
