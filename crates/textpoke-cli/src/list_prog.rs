//! `textpoke list PROG`: the patchable functions of a program or shared
//! library, read from its file ([`textpoke::sites::scan_file`]); nothing
//! is run. One line per site on stdout (`ADDRESS KIND FUNCTION`, the
//! link-time address of the 5-byte NOP); a summary, and the records that
//! are not usable sites, on stderr.

use crate::cmdutil::CliError;
use crate::record::{resolve_program, HOW_TO_ADD_SITES};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use textpoke::sites::{FileSite, MarkedPoint};

#[derive(clap::Args)]
pub struct Args {
    /// An ELF executable or shared library (found in PATH if it has no '/')
    prog: PathBuf,
}

fn kind(s: &FileSite) -> &'static str {
    match (s.section, s.marked) {
        (_, Some(MarkedPoint::Entry)) => "traced-entry",
        (_, Some(MarkedPoint::Exit)) => "traced-exit",
        ("__mcount_loc", _) => "mcount",
        _ => "patchable",
    }
}

pub fn run(args: &Args) -> ExitCode {
    match list(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report("textpoke list"),
    }
}

fn list(args: &Args) -> Result<(), CliError> {
    let shown = args.prog.display().to_string();
    let path = if args.prog.is_file() { args.prog.clone() } else { resolve_program(args.prog.as_os_str())? };
    let found = textpoke::sites::scan_file(&path).map_err(|e| CliError::new(2, e.to_string()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in &found.sites {
        let name = if s.function.is_empty() { "?" } else { &s.function };
        if writeln!(out, "{:#010x}  {:<12}  {name}", s.nop_addr, kind(s)).is_err() {
            return Ok(()); // stdout closed (`| head`)
        }
    }
    let _ = out.flush();
    drop(out);
    for s in &found.skipped {
        let name = if s.function.is_empty() { String::new() } else { format!(" ({})", s.function) };
        eprintln!("textpoke list: skipped {} record {:#x}{name}: {}", s.section, s.record, s.reason);
    }
    if found.sites.is_empty() {
        return Err(CliError::new(1, format!("{shown} has no patchable function entries;\n{HOW_TO_ADD_SITES}")));
    }
    let sections: Vec<String> = found.sections.iter().map(|(n, c)| format!("{n}: {c}")).collect();
    eprintln!(
        "textpoke list: {} functions, {} sites in {shown} ({})",
        found.function_names().len(),
        found.sites.len(),
        sections.join(", ")
    );
    Ok(())
}
