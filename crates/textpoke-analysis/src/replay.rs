//! The function-graph replay (see the [module documentation](super)).
//!
//! ```text
//! #     DURATION | FUNCTION
//!                | main() {
//!                |   work() {
//!       0.412 us |     leaf();
//!      12.093 us |   } /* work */
//!      15.220 us | } /* main */
//! ```
//!
//! A `>` before a duration marks a call still open when the thread's
//! records ended (its time is a lower bound), a `<` one whose exit was lost
//! and that was closed at its caller's exit (an upper bound). Where events
//! were lost, a line says how many; the calls open there are left without
//! a closing line or a time, and the calls after it are indented at the
//! depth recording resumed at, under callers that are not known.

use super::color::{Colors, Style};
use super::{escape, walk_thread, AnalysisError, Call, Closed, Event, Rebuilder, TraceSet};
use std::io::{self, Write};
use textpoke_record::tracedata::Trace;
use textpoke_record::{FuncId, Mode};

/// How to replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// Only this thread (of whichever process has it).
    pub tid: Option<i32>,
    /// Colour the headings, the long durations and where events were lost
    /// (see [`color`](super::color)).
    pub colors: Colors,
}

/// A duration for people: `0.412 us`, `12.093 ms`, `1.200 s`.
pub fn human_ns(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{}.{:03} us", ns / 1000, ns % 1000)
    } else if ns < 1_000_000_000 {
        format!("{}.{:03} ms", ns / 1_000_000, ns / 1000 % 1000)
    } else {
        format!("{}.{:03} s", ns / 1_000_000_000, ns / 1_000_000 % 1000)
    }
}

/// A return value: decimal when it looks like a small signed integer,
/// else hexadecimal.
fn value_text(v: u64) -> String {
    let s = v as i64;
    if (-65536..=u32::MAX as i64).contains(&s) {
        s.to_string()
    } else {
        format!("{v:#x}")
    }
}

const DUR_WIDTH: usize = 13;

struct Printer<'a, W: Write> {
    w: &'a mut W,
    trace: &'a Trace,
    colors: Colors,
    /// An entry not printed yet: a leaf if its exit comes next.
    pending: Option<(FuncId, usize)>,
    err: Option<io::Error>,
    marks: bool,
    gaps: u64,
    /// The level the next line would be at.
    level: usize,
}

impl<W: Write> Printer<'_, W> {
    /// Writes a line: `dur` (the duration of a call of `ns`, or nothing)
    /// in the left column, `text` indented by `level`.
    fn line(&mut self, dur: &str, ns: Option<u64>, level: usize, text: std::fmt::Arguments<'_>) {
        if self.err.is_some() {
            return;
        }
        let indent = level * 2;
        let r = match ns.filter(|_| self.colors.on) {
            Some(ns) => {
                let dur = self.colors.duration(ns, &format!("{dur:>DUR_WIDTH$}"));
                writeln!(self.w, "{dur} | {:indent$}{text}", "")
            }
            None => writeln!(self.w, "{dur:>DUR_WIDTH$} | {:indent$}{text}", ""),
        };
        if let Err(e) = r {
            self.err = Some(e);
        }
    }

    fn flush_pending(&mut self) {
        if let Some((f, level)) = self.pending.take() {
            let name = escape(self.trace.name(f));
            self.line("", None, level, format_args!("{name}() {{"));
        }
    }

    fn duration(&mut self, c: &Call) -> String {
        let mark = match c.closed {
            Closed::Returned => "",
            Closed::Unfinished => ">",
            Closed::ExitLost => "<",
            Closed::Gap => "?",
        };
        self.marks |= !mark.is_empty();
        format!("{mark}{}", human_ns(c.total_ns))
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Enter { func, level, .. } => {
                self.flush_pending();
                self.pending = Some((func, level));
                self.level = level + 1;
            }
            Event::Leave(c) if c.closed == Closed::Gap => self.flush_pending(),
            Event::Cut { count, .. } => {
                self.flush_pending();
                let level = self.level;
                self.line(
                    "",
                    None,
                    level,
                    format_args!("/* {count} event(s) of a signal handler's calls not recorded here */"),
                );
            }
            Event::Gap { lost, level, .. } => {
                self.flush_pending();
                self.gaps += 1;
                self.level = level;
                let text = format_args!("========== {lost} event(s) lost here; resuming at depth {level} ==========");
                if self.colors.on {
                    let text = self.colors.paint(Style::Red, &text.to_string());
                    self.line("", None, 0, format_args!("{text}"));
                } else {
                    self.line("", None, 0, text);
                }
            }
            Event::Leave(c) => {
                self.level = c.level;
                let dur = self.duration(&c);
                let name = escape(self.trace.name(c.func));
                let value = c.value.map(|v| format!(" = {}", value_text(v))).unwrap_or_default();
                if self.pending.take().is_some() {
                    // Enter directly followed by its Leave: a leaf.
                    self.line(&dur, Some(c.total_ns), c.level, format_args!("{name}(){value};"));
                } else {
                    let value = if value.is_empty() { value } else { format!("{value};") };
                    self.line(&dur, Some(c.total_ns), c.level, format_args!("}}{value} /* {name} */"));
                }
            }
            Event::OrphanExit { .. } => {}
        }
    }
}

/// Writes the function graph of every thread of every process of `set`
/// (or of the thread `opts.tid`) to `w`.
pub fn replay<W: Write>(
    set: &TraceSet,
    opts: &ReplayOptions,
    w: &mut W,
    progress: &mut dyn FnMut(u64),
) -> Result<(), AnalysisError> {
    let root = set.root();
    if let Some(tid) = opts.tid {
        let found = set.processes.iter().any(|p| p.trace.threads().iter().any(|t| t.tid() == tid));
        if !found {
            let known: Vec<String> =
                set.processes.iter().flat_map(|p| p.trace.threads().iter().map(|t| t.tid().to_string())).collect();
            return Err(AnalysisError::NoSuchThread { dir: root.dir().to_path_buf(), tid, known: known.join(", ") });
        }
    }
    let write = AnalysisError::Write;
    let colors = opts.colors;
    // A comment line, in `style`.
    let comment = |w: &mut W, style: Style, text: String| writeln!(w, "{}", colors.paint(style, &text)).map_err(write);
    let mut marks = false;
    for p in &set.processes {
        let trace = &p.trace;
        if trace.mode() == Mode::Count {
            return Err(AnalysisError::CountOnly { dir: trace.dir().to_path_buf(), what: "function graph to replay" });
        }
        let threads: Vec<_> = trace.threads().iter().filter(|t| opts.tid.is_none_or(|tid| t.tid() == tid)).collect();
        if threads.is_empty() {
            continue;
        }
        let origin = p.origin_text();
        let origin = if origin.is_empty() { origin } else { format!(", {origin}") };
        comment(w, Style::Bold, format!("# process {}{origin}", escape(&p.label())))?;
        let mut rb = Rebuilder::new(trace.clock());
        for t in threads {
            writeln!(w, "#").map_err(write)?;
            comment(w, Style::Bold, format!("# thread {}", t.tid()))?;
            writeln!(w, "# {:>w$} | FUNCTION", "DURATION", w = DUR_WIDTH - 2).map_err(write)?;
            let mut pr =
                Printer { w: &mut *w, trace, colors, pending: None, err: None, marks: false, gaps: 0, level: 0 };
            let (mut orphans, mut after_gap) = (0u64, 0u64);
            walk_thread(trace, t, &mut rb, progress, &mut |e| {
                if let Event::OrphanExit { after_gap: g, .. } = e {
                    *(if g { &mut after_gap } else { &mut orphans }) += 1;
                }
                pr.event(e)
            })?;
            pr.flush_pending();
            marks |= pr.marks;
            let gaps = pr.gaps;
            if let Some(e) = pr.err {
                return Err(write(e));
            }
            if t.words == 0 {
                writeln!(w, "# (no events)").map_err(write)?;
            }
            if orphans > 0 {
                writeln!(w, "# {orphans} exit(s) without an entry ignored: the recording began inside those calls")
                    .map_err(write)?;
            }
            if after_gap > 0 {
                writeln!(w, "# {after_gap} exit(s) without an entry ignored: their entries were lost in a gap")
                    .map_err(write)?;
            }
            if t.dropped() > 0 {
                comment(
                    w,
                    Style::Red,
                    format!(
                        "# {} event(s) lost on this thread ({gaps} gap(s) above; the buffer limit was reached); call \
                         counts in `textpoke report` are exact",
                        t.dropped()
                    ),
                )?;
            }
            if let Some(end) = trace.meta().ended_by.as_ref().filter(|e| e.tid == t.tid()) {
                comment(
                    w,
                    Style::Red,
                    format!(
                        "# the recording ends here: {} crashed the process inside the calls left open above",
                        escape(&end.describe(trace.meta().pid))
                    ),
                )?;
            }
        }
        writeln!(w, "#").map_err(write)?;
    }
    if marks {
        writeln!(
            w,
            "# '>': the call had not returned when the recording ended (a lower bound); \
             '<': its exit was lost, closed at its caller's exit (an upper bound)"
        )
        .map_err(write)?;
    }
    Ok(())
}
