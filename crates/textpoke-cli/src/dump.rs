//! `textpoke dump`: a trace converted for other tools — Chrome trace-event
//! JSON (Perfetto UI, chrome://tracing), an SVG flame graph, or folded
//! stacks.

use crate::common::{self, TraceArgs};
use std::path::PathBuf;
use std::process::ExitCode;
use textpoke::analysis::{self, FlameOptions};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("format").required(true).args(["chrome", "flamegraph", "folded"])))]
pub struct Args {
    #[command(flatten)]
    input: TraceArgs,
    /// Chrome trace-event JSON: one event per call, per process and thread;
    /// open it in Perfetto UI or chrome://tracing
    #[arg(long)]
    chrome: bool,
    /// An SVG flame graph of self time (of calls, for a count-only trace)
    #[arg(long)]
    flamegraph: bool,
    /// Folded stacks (`main;work;leaf 1234` lines, weights in ns), the input
    /// of flamegraph.pl and inferno-flamegraph
    #[arg(long)]
    folded: bool,
    /// Write to FILE instead of standard output: a regular file is replaced
    /// once the output is complete and keeps its mode; a device or a FIFO is
    /// written in place; a symbolic link is kept and what it names written
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Only this process: the traced one or a child it forked (default: all)
    #[arg(long, value_name = "PID")]
    pid: Option<i32>,
    /// Title of the flame graph
    #[arg(long, value_name = "TEXT", requires = "flamegraph")]
    title: Option<String>,
}

pub fn run(args: &Args) -> ExitCode {
    let mut set = match args.input.open() {
        Ok(s) => s,
        Err(e) => return common::fail("dump", e),
    };
    if let Err(e) = common::select_pid(&mut set, args.pid) {
        return common::fail("dump", e);
    }
    let out = args.output.as_deref();
    if args.chrome {
        common::convert("dump", &set, out, "converting", |mut w, progress| {
            analysis::chrome(&set, &mut w, progress).map(|_| ())
        })
    } else if args.flamegraph {
        let opts = FlameOptions { title: args.title.clone() };
        common::convert("dump", &set, out, "folding stacks", |mut w, progress| {
            analysis::flamegraph(&set, &opts, &mut w, progress)
        })
    } else {
        common::convert("dump", &set, out, "folding stacks", |w, progress| {
            let (folded, _unit) = analysis::folded(&set, progress)?;
            w.write_all(folded.as_bytes()).map_err(analysis::AnalysisError::Write)
        })
    }
}
