//! The `textpoke` command: a thin front end over the textpoke library.

mod cmdutil;
mod common;
mod ctl;
mod dump;
mod list;
mod output;
mod perfetto;
mod record;
mod replay;
mod report;
mod selftest;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "textpoke", version, about = "Live code patching for running multithreaded programs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check what this kernel offers and run a short stress of both patching strategies
    Selftest(selftest::Args),
    /// Run a program traced and write its trace directory (no program: a bundled demo)
    Record(record::Args),
    /// See and change what a program running under `textpoke record` traces
    Ctl(ctl::Args),
    /// Per-function calls, total, self, average, min and max time of a trace
    Report(report::Args),
    /// The function graph of a trace per thread, with durations (like uftrace replay)
    Replay(replay::Args),
    /// Convert a trace: Chrome trace-event JSON (--chrome) or an SVG flame graph (--flamegraph)
    Dump(dump::Args),
    /// The functions of a trace (-i DIR) or the patchable functions of a program (PROG)
    List(list::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Selftest(args) => selftest::run(&args),
        Command::Record(args) => record::run(&args),
        Command::Ctl(args) => ctl::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Dump(args) => dump::run(&args),
        Command::List(args) => list::run(&args),
    }
}
