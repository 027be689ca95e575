//! `textpoke list`: the functions of a trace's symbol table (`-i DIR`), or
//! the patchable functions of a program's ELF file (`PROG`, read from the
//! file without running it).

use crate::cmdutil::{eprint_line, CliError};
use crate::common;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use textpoke::sites::file::{scan_file, FileSites};
use textpoke::sites::NopForm;
use textpoke_analysis::escape;

/// The compiler flags that add patchable entries, for error messages.
use crate::record::HOW_TO_ADD_SITES;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Trace directory whose functions (its symbol table) to list
    /// [default: textpoke.data when no PROG is given]
    #[arg(short = 'i', long = "input", value_name = "DIR", conflicts_with = "prog")]
    input: Option<PathBuf>,
    /// Read an incomplete trace directory (-i) anyway
    #[arg(long, conflicts_with = "prog")]
    salvage: bool,
    /// Only this process of the trace (-i): the recorded program, or one it
    /// forked or started (default: all, each under a `# process` line when
    /// there are several)
    #[arg(long, value_name = "PID", conflicts_with = "prog")]
    pid: Option<i32>,
    /// Program or shared library whose patchable functions to list, read
    /// from its ELF file without running it (a bare name is looked up in
    /// PATH)
    #[arg(value_name = "PROG")]
    prog: Option<PathBuf>,
    /// With PROG: also list the records that are not patchable sites, and why
    #[arg(long, requires = "prog")]
    skipped: bool,
}

pub fn run(args: &Args) -> ExitCode {
    // Made whole before it is written: a refusal prints nothing else.
    let mut listing = Vec::new();
    let r = match &args.prog {
        Some(prog) => list_prog(prog, args.skipped, &mut listing),
        None => {
            let dir = args.input.clone().unwrap_or_else(|| PathBuf::from("textpoke.data"));
            list_trace(&dir, args.salvage, args.pid, &mut listing)
        }
    };
    if let Err(e) = r {
        // `--skipped` asked why records are not sites: the answer is the
        // listing, printed even when none is a site.
        if args.skipped && !listing.is_empty() {
            let _ = std::io::stdout().write_all(&listing);
        }
        return e.report("textpoke list");
    }
    let mut out = match common::Output::create(None) {
        Ok(o) => o,
        Err(e) => return common::fail("list", e),
    };
    if let Err(e) = out.writer().write_all(&listing) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return common::fail("list", format!("cannot write to standard output: {e}"));
        }
    }
    match out.commit() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => common::fail("list", e),
    }
}

/// A failure of `list`: exit code 1.
fn failed(message: impl Into<String>) -> CliError {
    CliError::new(1, message)
}

fn write_failed(e: std::io::Error) -> CliError {
    failed(e.to_string())
}

/// The symbol table of the trace in `dir`, or of each of its processes.
fn list_trace(dir: &Path, salvage: bool, pid: Option<i32>, w: &mut dyn Write) -> Result<(), CliError> {
    let input = common::TraceArgs { input: dir.to_path_buf(), salvage, pid };
    let set = input.open().map_err(failed)?;
    let several = set.processes.len() > 1;
    for p in &set.processes {
        let t = &p.trace;
        if several {
            let origin = p.origin_text();
            let origin = if origin.is_empty() { origin } else { format!(" ({origin})") };
            writeln!(w, "# process {}{origin}", escape(&p.label())).map_err(write_failed)?;
        }
        for s in t.symbols() {
            writeln!(w, "{:#014x}  {}", s.addr, escape(&s.name)).map_err(write_failed)?;
        }
        if t.symbols().is_empty() {
            eprint_line(&format!(
                "textpoke list: {}: the trace's symbol table is empty (nothing was traced)",
                t.dir().display()
            ));
        }
    }
    Ok(())
}

/// Finds PROG: a path as given, or a bare name in PATH.
fn resolve(prog: &Path) -> Result<PathBuf, String> {
    let bare = prog.components().count() == 1 && !prog.as_os_str().as_encoded_bytes().contains(&b'/');
    if !bare {
        return match std::fs::metadata(prog) {
            Ok(m) if m.is_dir() => Err(format!("{} is a directory, not a program", prog.display())),
            Ok(_) => Ok(prog.to_path_buf()),
            Err(e) => Err(format!("{}: {e}", prog.display())),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(prog);
        if let Ok(m) = std::fs::metadata(&cand) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(format!(
        "{} not found: no such executable in PATH (for a file in the current directory, give ./{})",
        prog.display(),
        prog.display()
    ))
}

/// The NOP column: x86-64's 5-byte NOP or gcc's five 1-byte NOPs;
/// aarch64's `nop; nop` pad or the kernel-style `mov x9, x30; nop`.
fn nop_form_name(form: NopForm) -> &'static str {
    match (form.is_single(), cfg!(target_arch = "x86_64")) {
        (true, true) => "nop5",
        (false, true) => "nop1x5",
        (true, false) => "movnop",
        (false, false) => "nopx2",
    }
}

fn list_prog(prog: &Path, skipped: bool, w: &mut dyn Write) -> Result<(), CliError> {
    let path = resolve(prog).map_err(failed)?;
    let found = scan_file(&path).map_err(|e| failed(e.to_string()))?;
    if found.sections.is_empty() {
        return Err(failed(format!(
            "{} has no patchable function entries (no __patchable_function_entries, __mcount_loc or textpoke_sites section);",
            path.display()
        ))
        .with_help(HOW_TO_ADD_SITES));
    }
    for s in &found.sites {
        let form = nop_form_name(s.nop_form);
        let name = if s.function.is_empty() { "?".into() } else { escape(&s.function) };
        writeln!(w, "{:#014x}  {:<12}  {form:<6}  {name}", s.entry, kind(s)).map_err(write_failed)?;
    }
    if skipped {
        for s in &found.skipped {
            let name = if s.function.is_empty() { "?".into() } else { escape(&s.function) };
            // Descriptor errors may quote bytes of the file.
            let reason = s.reason.to_string();
            let reason = escape(&reason);
            writeln!(w, "# skipped {} record {:#x} ({name}): {reason}", s.section, s.record).map_err(write_failed)?;
        }
    }
    summary(&path, &found);
    if found.sites.is_empty() {
        return Err(failed(format!(
            "{}: none of its {} site record(s) is a patchable site (rerun with --skipped to see why)",
            path.display(),
            found.sections.iter().map(|s| s.1).sum::<usize>()
        )));
    }
    Ok(())
}

/// `patchable`, `mcount`, `traced-entry` or `traced-exit`.
fn kind(s: &textpoke::sites::FileSite) -> &'static str {
    use textpoke::sites::MarkedPoint;
    match (s.section, s.marked) {
        (_, Some(MarkedPoint::Entry)) => "traced-entry",
        (_, Some(MarkedPoint::Exit)) => "traced-exit",
        ("__mcount_loc", _) => "mcount",
        _ => "patchable",
    }
}

fn summary(path: &Path, f: &FileSites) {
    let mut funcs: Vec<&str> = f.sites.iter().map(|s| s.function.as_str()).collect();
    funcs.sort_unstable();
    funcs.dedup();
    let sections: Vec<String> = f.sections.iter().map(|(n, c)| format!("{n}: {c}")).collect();
    eprint_line(&format!(
        "textpoke list: {}: {} site(s) in {} function(s), {} record(s) skipped ({})",
        path.display(),
        f.sites.len(),
        funcs.len(),
        f.skipped.len(),
        sections.join(", ")
    ));
    if f.dynsym_only {
        eprintln!("textpoke list: the file is stripped: static functions have no name ('?')");
    }
}
