//! What the trace-reading commands share: the input options, the progress
//! bar, errors, and running a conversion into an [`Output`].

use crate::cmdutil::eprint_line;
pub use crate::output::Output;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use textpoke_analysis::{AnalysisError, TraceSet};
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
}

impl TraceArgs {
    /// Opens the trace and its forked children's; prints salvage notes.
    pub fn open(&self) -> Result<TraceSet, String> {
        let set = TraceSet::open(&self.input, OpenOptions { allow_incomplete: self.salvage }).map_err(|e| match e {
            AnalysisError::Trace(t) => trace_error(&t),
            e => e.to_string(),
        })?;
        for n in &set.notes {
            eprint_line(&format!("textpoke: note: {n}"));
        }
        Ok(set)
    }
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
    let pids = set.pids();
    if set.retain_pid(pid) {
        Ok(())
    } else {
        let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
        Err(format!("no process {pid} in this trace; its processes are: {}", list.join(", ")))
    }
}

/// Fewer records than this convert too fast for a progress bar to help.
const PROGRESS_MIN_RECORDS: u64 = 1 << 18;

/// A progress bar over `total` records on stderr when stderr is a
/// terminal and the conversion is long; hidden otherwise (piped, in
/// scripts and tests).
pub fn progress(total: u64, what: &str) -> ProgressBar {
    if !io::stderr().is_terminal() || total < PROGRESS_MIN_RECORDS {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {human_pos}/{human_len} records ({eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Prints `textpoke CMD: error` ([`eprint_line`]) and returns the failure
/// exit code.
pub fn fail(cmd: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprint_line(&format!("textpoke {cmd}: {msg}"));
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
    let bar = progress(set.total_words(), what);
    let r = produce(out.writer(), &mut |n| bar.inc(n));
    bar.finish_and_clear();
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
