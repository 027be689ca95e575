//! The `textpoke` command: a thin front end over the textpoke library.

mod agent_file;
// `record -p` injects the agent with textpoke-inject, x86-64 ptrace code;
// elsewhere it refuses (attach_other.rs).
#[cfg(target_arch = "x86_64")]
mod attach;
#[cfg(not(target_arch = "x86_64"))]
#[path = "attach_other.rs"]
mod attach;
mod cmdutil;
mod common;
mod ctl;
mod dump;
mod list;
mod output;
// Live patching (textpoke::live, textpoke-inject) is x86-64 only for now;
// elsewhere `patch` refuses (patch_other.rs).
#[cfg(target_arch = "x86_64")]
mod patch;
#[cfg(not(target_arch = "x86_64"))]
#[path = "patch_other.rs"]
mod patch;
mod perfetto;
mod record;
mod replay;
mod report;
mod selftest;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use cmdutil::ColorChoice;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "textpoke",
    version,
    about = "Live code patching for running multithreaded programs",
    after_help = "Shell completions: `textpoke completions bash|zsh|fish|elvish|powershell`; \
                  manual pages: `textpoke man | man -l -`, or `textpoke man DIR` for one page per command."
)]
struct Cli {
    /// When to colour the output: auto colours a terminal unless NO_COLOR
    /// is set; always colours pipes and files too
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto, display_order = 900)]
    color: ColorChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check what this kernel offers and run a short stress of both patching strategies
    Selftest(selftest::Args),
    /// Run a program traced, or attach to a running one (-p PID), and write its trace directory (no program: a bundled demo)
    Record(record::Args),
    /// See and change what a program running under `textpoke record` traces
    Ctl(ctl::Args),
    /// Replace functions of a running process (live patching), list, revert or force patches
    Patch(patch::Args),
    /// Per-function calls, total, self, average, min and max time of a trace
    Report(report::Args),
    /// The function graph of a trace per thread, with durations (like uftrace replay)
    Replay(replay::Args),
    /// Convert a trace: Perfetto (--perfetto), Chrome JSON (--chrome), a flame graph (--flamegraph), folded stacks
    Dump(dump::Args),
    /// The functions of a trace (-i DIR) or the patchable functions of a program (PROG)
    List(list::Args),
    /// Print a shell completion script
    #[command(after_help = "Install it where your shell looks, for example:\n  \
        bash: textpoke completions bash > ~/.local/share/bash-completion/completions/textpoke\n  \
        zsh:  textpoke completions zsh > ~/.zfunc/_textpoke   (with fpath+=~/.zfunc before compinit)\n  \
        fish: textpoke completions fish > ~/.config/fish/completions/textpoke.fish")]
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into DIR
    #[command(after_help = "Read it with `textpoke man | man -l -`; install the pages with \
        `textpoke man /usr/local/share/man/man1` (or ~/.local/share/man/man1).")]
    Man {
        /// Write textpoke.1, textpoke-record.1, textpoke-report.1... into
        /// this directory (created if missing) instead of printing textpoke.1
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Writes `textpoke.1` and a page per subcommand (`textpoke-record.1`...)
/// into `dir`, made from the command-line definitions.
fn write_man_pages(dir: &Path) -> Result<usize, String> {
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

/// Writes `bytes` to standard output; a reader that left is not an error.
fn print(cmd: &str, bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            common::fail(cmd, format!("cannot write to standard output: {e}"))
        }
        _ => ExitCode::SUCCESS,
    }
}

/// The command line, parsed with clap's own messages (help, errors)
/// coloured as `--color` says.
fn parse() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let clap_color = match ColorChoice::from_args(&args) {
        // clap's auto follows NO_COLOR, CLICOLOR_FORCE and the terminal too.
        ColorChoice::Auto => clap::ColorChoice::Auto,
        ColorChoice::Always => clap::ColorChoice::Always,
        ColorChoice::Never => clap::ColorChoice::Never,
    };
    let mut cmd = Cli::command().color(clap_color);
    let matches = cmd.clone().get_matches_from(&args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

fn main() -> ExitCode {
    let cli = parse();
    cmdutil::set_colors(cli.color);
    match cli.command {
        Command::Selftest(args) => selftest::run(&args),
        Command::Record(args) => record::run(&args),
        Command::Ctl(args) => ctl::run(&args),
        Command::Patch(args) => patch::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Dump(args) => dump::run(&args),
        Command::List(args) => list::run(&args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "textpoke", &mut script);
            print("completions", &script)
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => print("man", &page),
                Err(e) => common::fail("man", e),
            }
        }
        Command::Man { dir: Some(dir) } => match write_man_pages(&dir) {
            Ok(n) => {
                eprintln!("textpoke: {n} manual pages written to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => common::fail("man", e),
        },
    }
}
