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

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
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
    /// Convert a trace: Perfetto (--perfetto), Chrome JSON (--chrome), a flame graph (--flamegraph), folded stacks
    Dump(dump::Args),
    /// The functions of a trace (-i DIR) or the patchable functions of a program (PROG)
    List(list::Args),
    /// Print a shell completion script (e.g. `textpoke completions bash > /etc/bash_completion.d/textpoke`)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (textpoke.1, textpoke-record.1, ...) into DIR
    Man {
        /// The directory (created if missing)
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Writes `textpoke.1` and a page per subcommand (`textpoke-record.1`...)
/// into `dir`, made from the command-line definitions.
fn write_man_pages(dir: &std::path::Path) -> Result<usize, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![("textpoke".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        let name = format!("textpoke-{}", sub.get_name());
        // The page's title is the command's name: leaked, one per page.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(title)));
    }
    for (name, page) in &pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page.clone()).render(&mut out).map_err(|e| e.to_string())?;
        std::fs::write(&path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(pages.len())
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
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "textpoke", &mut script);
            use std::io::Write;
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    common::fail("completions", format!("cannot write to standard output: {e}"))
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Command::Man { dir } => match write_man_pages(&dir) {
            Ok(n) => {
                eprintln!("textpoke: {n} manual pages written to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => common::fail("man", e),
        },
    }
}
