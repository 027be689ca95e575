//! The `textpoke` command: a thin front end over the textpoke library.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Selftest(args) => selftest::run(&args),
    }
}
