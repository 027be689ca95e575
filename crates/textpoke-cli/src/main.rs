//! The `textpoke` command: a thin front end over the textpoke library.

mod cmdutil;
mod ctl;
mod list_prog;
mod record;
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
    /// List the patchable functions of a program, without running it
    List(list_prog::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Selftest(args) => selftest::run(&args),
        Command::Record(args) => record::run(&args),
        Command::Ctl(args) => ctl::run(&args),
        Command::List(args) => list_prog::run(&args),
    }
}
