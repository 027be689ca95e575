//! What the trace-reading commands share: the input options (the trace
//! directory, `--salvage`, `--pid`), the progress bar, errors, and running
//! a conversion into an [`Output`].

use crate::cmdutil::{eprint_prefixed, stderr_colors};
pub use crate::output::Output;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use textpoke_analysis::color::Style;
use textpoke_analysis::{escape, AnalysisError, TraceSet};
use textpoke_record::tracedata::{OpenOptions, TraceReadError};

/// The trace directory to read.
#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// Trace directory written by `textpoke record`
    #[arg(short = 'i', long = "input", value_name = "DIR", default_value = "textpoke.data")]
    pub input: PathBuf,
    /// Read a trace whose recording did not finish (the program crashed, was
    /// killed or called exec before the final flush): show what was written
    /// and say what was cut
    #[arg(long)]
    pub salvage: bool,
    /// Only this process: the recorded program, or one it forked or started
    /// (a trace of a program that starts others holds one per process; the
    /// commands list their pids)
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
}

impl TraceArgs {
    /// Opens the trace and those of the processes its program forked or
    /// started, keeps the process `--pid` asks for; prints the notes
    /// (salvaging, directories without a trace).
    pub fn open(&self) -> Result<TraceSet, String> {
        let mut set =
            TraceSet::open(&self.input, OpenOptions { allow_incomplete: self.salvage }).map_err(|e| match e {
                AnalysisError::Trace(t) => trace_error(&t),
                e => e.to_string(),
            })?;
        for n in &set.notes {
            note(n);
        }
        select_pid(&mut set, self.pid)?;
        Ok(set)
    }
}

/// Prints `textpoke: note: TEXT` on stderr.
pub fn note(text: &str) {
    eprint_prefixed("textpoke: note", Style::Cyan, text);
}

/// Prints `textpoke CMD: warning: TEXT` on stderr.
pub fn warn(cmd: &str, text: &str) {
    eprint_prefixed(&format!("textpoke {cmd}: warning"), Style::Yellow, text);
}

/// When `set` holds several processes, says on stderr which, that `what`
/// (`shown one after the other`, `all in the output`), and how to pick
/// one.
pub fn note_processes(set: &TraceSet, what: &str) {
    if set.processes.len() < 2 {
        return;
    }
    let mut seen = Vec::new();
    let list: Vec<String> = set
        .processes
        .iter()
        .filter(|p| {
            // A process that exec'd is listed once, by its last program.
            let first = !seen.contains(&p.pid());
            seen.push(p.pid());
            first
        })
        .map(|p| escape(&p.label()).into_owned())
        .collect();
    note(&format!("{} processes in this trace: {}; {what} (--pid PID for one)", list.len(), list.join(", ")));
}

/// A trace error for people: the reader's message, and for an incomplete
/// trace the option that reads it anyway.
pub fn trace_error(e: &TraceReadError) -> String {
    match e {
        TraceReadError::Incomplete { dir } => format!(
            "trace {} is incomplete: the recording did not finish (the process crashed, was killed, or called exec \
             before the final flush); rerun with --salvage to read what was written",
            dir.display()
        ),
        e => e.to_string(),
    }
}

/// Keeps only process `pid` of `set`, or says which pids there are.
pub fn select_pid(set: &mut TraceSet, pid: Option<i32>) -> Result<(), String> {
    let Some(pid) = pid else {
        return Ok(());
    };
    let mut pids = set.pids();
    if set.retain_pid(pid) {
        Ok(())
    } else {
        pids.dedup();
        let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
        Err(format!("no process {pid} in this trace; its processes are: {}", list.join(", ")))
    }
}

/// How long a command runs before its progress bar appears: shorter work
/// is over before a bar would help.
const PROGRESS_DELAY: Duration = Duration::from_secs(1);

/// A progress bar over the records of a trace, drawn on stderr once the
/// work has taken [`PROGRESS_DELAY`] and only when stderr is a terminal;
/// hidden otherwise (piped, in scripts and tests).
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    /// Whether it may be drawn: stderr is a terminal.
    terminal: bool,
    /// Whether it is drawn.
    shown: bool,
}

impl Progress {
    /// A bar over `total` records, saying `what` is being done.
    pub fn new(total: u64, what: &str) -> Progress {
        Progress::with_terminal(total, what, io::stderr().is_terminal())
    }

    fn with_terminal(total: u64, what: &str, terminal: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        let template = if stderr_colors().on {
            "{msg} [{bar:40.cyan/blue}] {human_pos}/{human_len} records ({eta})"
        } else {
            "{msg} [{bar:40}] {human_pos}/{human_len} records ({eta})"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Progress { bar, start: Instant::now(), terminal, shown: false }
    }

    /// `n` more records done; draws the bar once the work has been long.
    pub fn inc(&mut self, n: u64) {
        self.bar.inc(n);
        if self.terminal && !self.shown && self.start.elapsed() >= PROGRESS_DELAY {
            self.shown = true;
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    /// Removes the bar from the screen.
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// Prints `textpoke CMD: error` (see [`eprint_prefixed`]) and returns the
/// failure exit code.
pub fn fail(cmd: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprint_prefixed(&format!("textpoke {cmd}"), Style::Red, &msg.to_string());
    ExitCode::FAILURE
}

/// Runs `produce` into the output at `path` (stdout when `None`) with a
/// progress bar over the trace's records; publishes the output only if it
/// succeeded.
pub fn convert(
    cmd: &str,
    set: &TraceSet,
    path: Option<&Path>,
    what: &str,
    produce: impl FnOnce(&mut dyn Write, &mut dyn FnMut(u64)) -> Result<(), AnalysisError>,
) -> ExitCode {
    let mut out = match Output::create(path) {
        Ok(o) => o,
        Err(e) => return fail(cmd, e),
    };
    let mut bar = Progress::new(set.total_words(), what);
    let r = produce(out.writer(), &mut |n| bar.inc(n));
    bar.finish();
    match r {
        // The reader left (`| head`): not an error.
        Err(AnalysisError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
        Err(e) => {
            out.abandon();
            return fail(cmd, e);
        }
        Ok(()) => {}
    }
    match out.commit() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(cmd, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_bar_waits_a_second_and_for_a_terminal() {
        let mut p = Progress::with_terminal(100, "reading", true);
        p.inc(10);
        assert!(!p.shown, "not in the first second");
        p.start = p.start.checked_sub(PROGRESS_DELAY).unwrap();
        p.inc(10);
        assert!(p.shown, "after a second on a terminal");
        p.finish();
        let mut p = Progress::with_terminal(100, "reading", false);
        p.start = p.start.checked_sub(PROGRESS_DELAY).unwrap();
        p.inc(10);
        assert!(!p.shown, "never when stderr is not a terminal");
    }
}
