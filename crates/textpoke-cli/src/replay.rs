//! `textpoke replay`: the function graph of a trace, per thread.

use crate::cmdutil::stdout_colors;
use crate::common::{self, TraceArgs};
use std::process::ExitCode;
use textpoke_analysis::{self as analysis, ReplayOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: TraceArgs,
    /// Show only this thread (of the recorded program or of a process it
    /// forked or started)
    #[arg(long, value_name = "N")]
    tid: Option<i32>,
}

pub fn run(args: &Args) -> ExitCode {
    let set = match args.input.open() {
        Ok(s) => s,
        Err(e) => return common::fail("replay", e),
    };
    if args.tid.is_none() {
        common::note_processes(&set, "each is replayed in its section, one after the other");
    }
    let opts = ReplayOptions { tid: args.tid, colors: stdout_colors() };
    common::convert("replay", &set, None, "replaying", |mut w, progress| {
        analysis::replay(&set, &opts, &mut w, progress)
    })
}
