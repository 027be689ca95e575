//! `textpoke report`: per-function calls and times of a trace.

use crate::cmdutil::stdout_colors;
use crate::common::{self, TraceArgs};
use std::io::Write;
use std::process::ExitCode;
use textpoke_analysis::color::{Colors, Style};
use textpoke_analysis::{self as analysis, escape, human_ns, Origin, ProcessReport, Report, ReportOptions, SortKey};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: TraceArgs,
    /// Order of the functions, largest first
    #[arg(long, value_enum, default_value_t = Sort::Total)]
    sort: Sort,
    /// Output format: an aligned table, CSV (header
    /// function,calls,total_ns,self_ns,avg_ns,min_ns,max_ns), or JSON
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Sort {
    /// Number of calls
    Calls,
    /// Total time inside the function
    Total,
    /// Time in the function itself, not in traced callees
    #[value(name = "self")]
    SelfTime,
    /// Average time per call
    Avg,
    /// Longest call
    Max,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Aligned columns for people
    Table,
    /// Comma-separated values, one line per function
    Csv,
    /// One JSON document
    Json,
}

/// The CSV header.
pub const CSV_HEADER: &str = "function,calls,total_ns,self_ns,avg_ns,min_ns,max_ns";

pub fn run(args: &Args) -> ExitCode {
    let set = match args.input.open() {
        Ok(s) => s,
        Err(e) => return common::fail("report", e),
    };
    let sort = match args.sort {
        Sort::Calls => SortKey::Calls,
        Sort::Total => SortKey::Total,
        Sort::SelfTime => SortKey::SelfTime,
        Sort::Avg => SortKey::Avg,
        Sort::Max => SortKey::Max,
    };
    let format = args.format;
    let colors = stdout_colors();
    common::convert("report", &set, None, "reading", |w, progress| {
        let r = analysis::report(&set, &ReportOptions { sort }, progress)?;
        let res = match format {
            Format::Table => table(&r, w, colors),
            Format::Csv => csv(&r, w),
            Format::Json => {
                analysis::to_json_writer_pretty(&mut *w, &r).map_err(std::io::Error::from).and_then(|_| writeln!(w))
            }
        };
        res.map_err(analysis::AnalysisError::Write)
    })
}

/// A CSV field: escaped like every text output ([`escape`]: CSV is read
/// on terminals too; the JSON format has the exact names), then quoted
/// when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    let s = escape(s);
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

fn csv(r: &Report, w: &mut dyn Write) -> std::io::Result<()> {
    for (i, p) in r.processes.iter().enumerate() {
        if i > 0 {
            writeln!(w)?;
            writeln!(w, "# pid {}{}", p.pid, origin(p))?;
        }
        writeln!(w, "{CSV_HEADER}")?;
        for f in &p.functions {
            let t = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            let times = f.times;
            writeln!(
                w,
                "{},{},{},{},{},{},{}",
                csv_field(&f.function),
                f.calls,
                t(times.map(|t| t.total_ns)),
                t(times.map(|t| t.self_ns)),
                t(times.map(|t| t.avg_ns)),
                t(times.map(|t| t.min_ns)),
                t(times.map(|t| t.max_ns)),
            )?;
        }
    }
    Ok(())
}

/// Who lost events, for people: `none`, or `thread 12: 3, thread 14: 1,
/// 2 more on no one thread` (as [`textpoke_analysis::losses`] says it).
fn losses(p: &ProcessReport) -> String {
    let mut parts: Vec<String> =
        p.threads.iter().filter(|t| t.dropped > 0).map(|t| format!("thread {}: {}", t.tid, t.dropped)).collect();
    let rest = p.dropped.saturating_sub(p.threads.iter().map(|t| t.dropped).sum());
    if rest > 0 {
        parts.push(format!("{rest} more on no one thread"));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// ` (forked from pid 12)`, ` (started by pid 12)`... or nothing for the
/// recorded program.
fn origin(p: &ProcessReport) -> String {
    let text = p.origin.describe(p.parent_pid);
    if text.is_empty() {
        text
    } else {
        format!(" ({text})")
    }
}

/// The processes of a report with several, one line each, with their
/// totals; the sections follow.
fn overview(r: &Report, w: &mut dyn Write, colors: Colors) -> std::io::Result<()> {
    let n = r.processes.len();
    writeln!(
        w,
        "{}",
        colors.paint(Style::Bold, &format!("# {n} processes, each in its section below (--pid PID for one):"))
    )?;
    writeln!(w, "#  {:>8}  {:>8}  {:>7}  {:>12}  Process", "PID", "Parent", "Threads", "Calls")?;
    for p in &r.processes {
        let parent = p.parent_pid.map(|pp| pp.to_string()).unwrap_or_else(|| "-".into());
        let exe = p.exe.as_deref().map(|e| format!(" {}", escape(e))).unwrap_or_default();
        let exec = if p.origin == Origin::Exec { " (after exec)" } else { "" };
        writeln!(
            w,
            "#  {:>8}  {parent:>8}  {:>7}  {:>12}  {}{exe}{exec}",
            p.pid,
            p.threads.len(),
            p.calls,
            escape(&p.process_name)
        )?;
    }
    let calls = r.processes.iter().fold(0u64, |t, p| t.saturating_add(p.calls));
    let threads: usize = r.processes.iter().map(|p| p.threads.len()).sum();
    writeln!(w, "#  {:>8}  {:>8}  {threads:>7}  {calls:>12}", "total", "")?;
    writeln!(w)
}

fn table(r: &Report, w: &mut dyn Write, colors: Colors) -> std::io::Result<()> {
    if r.processes.len() > 1 {
        overview(r, w, colors)?;
    }
    for (i, p) in r.processes.iter().enumerate() {
        if i > 0 {
            writeln!(w)?;
        }
        let kind = if p.origin == Origin::Forked { "forked child" } else { "process" };
        let heading = format!(
            "# {kind} {} [pid {}]{}: {} thread(s), {} call(s){}",
            escape(&p.process_name),
            p.pid,
            origin(p),
            p.threads.len(),
            p.calls,
            match (&p.ended_by, p.complete) {
                (_, true) => String::new(),
                (Some(e), false) => format!(", incomplete trace (salvaged: {} on thread {})", e.name, e.tid),
                (None, false) => ", incomplete trace (salvaged)".into(),
            }
        );
        writeln!(w, "{}", colors.paint(Style::Bold, &heading))?;
        let counts_only = p.functions.iter().all(|f| f.times.is_none()) && !p.functions.is_empty();
        let columns = format!(
            "{:>12}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  Function",
            "Calls", "Total", "Self", "Avg", "Min", "Max"
        );
        writeln!(w, "{}", colors.paint(Style::Bold, &columns))?;
        writeln!(w, "{}  ========", ["  =========="; 6].join("  "))?;
        for f in &p.functions {
            // Padded, then coloured: the escape sequences take no room.
            let d = |v: Option<u64>| match v {
                Some(ns) => colors.duration(ns, &format!("{:>12}", human_ns(ns))),
                None => format!("{:>12}", "-"),
            };
            let t = f.times;
            let mut notes = Vec::new();
            if f.unfinished > 0 {
                notes.push(format!("{} unfinished", f.unfinished));
            }
            if f.exit_lost > 0 {
                notes.push(format!("{} exit(s) lost", f.exit_lost));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                colors.paint(Style::Yellow, &format!("  ({})", notes.join(", ")))
            };
            writeln!(
                w,
                "{:>12}  {}  {}  {}  {}  {}  {}{notes}",
                f.calls,
                d(t.map(|t| t.total_ns)),
                d(t.map(|t| t.self_ns)),
                d(t.map(|t| t.avg_ns)),
                d(t.map(|t| t.min_ns)),
                d(t.map(|t| t.max_ns)),
                escape(&f.function),
            )?;
        }
        if p.functions.is_empty() {
            writeln!(w, "# no calls recorded")?;
        }
        if counts_only {
            writeln!(w, "# count-only trace: calls only, no times")?;
        }
        let orphans: u64 = p.threads.iter().map(|t| t.orphan_exits).sum();
        let unfinished: u64 = p.threads.iter().map(|t| t.unfinished).sum();
        if unfinished > 0 {
            writeln!(
                w,
                "# {unfinished} call(s) had not returned when the recording ended: timed up to their thread's last record"
            )?;
        }
        if orphans > 0 {
            writeln!(w, "# {orphans} exit(s) without an entry ignored: the recording began inside those calls")?;
        }
        if p.dropped > 0 {
            let text =
                format!("# {} record(s) were dropped while recording: counts and times are lower bounds", p.dropped);
            writeln!(w, "{}", colors.paint(Style::Red, &text))?;
        }
        if let Some(e) = p.ended_by.as_ref().filter(|_| !p.complete) {
            let text = format!(
                "# the recording ended with {}, which crashed the process; events lost: {}",
                escape(&e.describe(p.pid)),
                losses(p)
            );
            writeln!(w, "{}", colors.paint(Style::Red, &text))?;
        }
    }
    Ok(())
}
