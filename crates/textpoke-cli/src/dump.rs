//! `textpoke dump`: a trace converted for other tools — a Perfetto
//! protobuf trace, Chrome trace-event JSON (Perfetto UI, chrome://tracing),
//! an SVG flame graph, or folded stacks. Every output is streamed; the
//! folded stacks and the flame graph hold the tree of call paths (a node
//! per distinct path) and are bounded (see `textpoke_analysis`).

use crate::common::{self, TraceArgs};
use std::path::PathBuf;
use std::process::ExitCode;
use textpoke_analysis::{self as analysis, FlameOptions};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("format").required(true).args(["perfetto", "chrome", "flamegraph", "folded"])))]
pub struct Args {
    #[command(flatten)]
    input: TraceArgs,
    /// A Perfetto protobuf trace: a slice per call on a track per thread;
    /// open it in ui.perfetto.dev (any size) or trace_processor
    #[arg(long)]
    perfetto: bool,
    /// Chrome trace-event JSON: one event per call, per process and thread;
    /// browsers load it whole, so prefer --perfetto for big traces
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
    /// Title of the flame graph
    #[arg(long, value_name = "TEXT", requires = "flamegraph")]
    title: Option<String>,
}

pub fn run(args: &Args) -> ExitCode {
    let set = match args.input.open() {
        Ok(s) => s,
        Err(e) => return common::fail("dump", e),
    };
    common::note_processes(
        &set,
        if args.perfetto || args.chrome {
            "each is a process of its own in the output"
        } else {
            "each is a tower of its own, under a frame naming it"
        },
    );
    let out = args.output.as_deref();
    if args.perfetto {
        common::convert("dump", &set, out, "converting", |w, progress| {
            crate::perfetto::perfetto(&set, w, progress).map(|_| ())
        })
    } else if args.chrome {
        warn_if_too_big_for_a_browser(&set);
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
            analysis::folded_to(&set, w, progress).map(drop)
        })
    }
}

/// About what a call costs in Chrome JSON (one complete event, ~100 bytes).
const JSON_BYTES_PER_CALL: u64 = 110;
/// Browsers and the Perfetto UI's JSON importer hold the whole text in one
/// string: beyond about this, they fail.
const JSON_BROWSER_LIMIT: u64 = 500 << 20;

/// Says so on stderr when the Chrome JSON of `set` will likely be too big
/// for a browser to open.
fn warn_if_too_big_for_a_browser(set: &textpoke_analysis::TraceSet) {
    let events: u64 = set.processes.iter().map(|p| p.trace.meta().total_events).sum();
    let bytes = events / 2 * JSON_BYTES_PER_CALL;
    if bytes > JSON_BROWSER_LIMIT {
        common::warn(
            "dump",
            &format!(
                "this Chrome JSON will be about {} MB, more than a browser or the Perfetto UI's JSON importer can load \
                 (about {} MB); `textpoke dump --perfetto` writes a protobuf trace the Perfetto UI opens at any size",
                bytes >> 20,
                JSON_BROWSER_LIMIT >> 20
            ),
        );
    }
}
