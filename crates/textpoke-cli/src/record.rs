//! `textpoke record`: runs a program with the agent preloaded and writes
//! its trace directory.
//!
//! # Before the run
//!
//! The program is found (`PATH` when the name has no `/`), checked to be
//! an executable file, and, when it is an ELF file, read without running
//! it: it must be dynamically linked (the agent is preloaded), and it or a
//! library it loads at start (listed by its interpreter, `ld.so --list`,
//! which runs nothing; asked only when the program has no sites of its
//! own) must have patchable entries. That needs the headers only
//! ([`textpoke::sites::probe_file`]: a site section with records); the
//! sites themselves are read ([`textpoke::sites::scan_file`]) only to
//! check `-F`/`-N` globs, each of which must match one of their functions
//! (a mistyped one is answered with the close names). The agent reads the
//! sites again in the process anyway. A script (`#!`) is run as it is:
//! the agent follows it into the programs it executes. A directory that is
//! not a textpoke trace is not written over.
//!
//! # The agent
//!
//! `libtextpoke_agent.so` is preloaded into the program. It is found by
//! [`agent_path`]: `TEXTPOKE_AGENT`, beside `textpoke` (a workspace
//! build), in `../lib/textpoke/` (an installed layout), or else the copy
//! built into `textpoke`, written once to a private file (see
//! [`crate::agent_file`] for the search and why a file).
//!
//! # The run
//!
//! The program inherits stdin, stdout and stderr. `SIGHUP`, `SIGINT`,
//! `SIGQUIT`, `SIGTERM`, `SIGUSR1`, `SIGUSR2` and `SIGALRM` sent to
//! `textpoke` by a process are forwarded to the program; those the
//! terminal sends (Ctrl-C) reach the program directly, as it is in the
//! same process group, and are not sent twice. `textpoke` exits with the
//! program's code, or dies of the program's signal (after printing the
//! summary), as a shell would see it.
//!
//! # If `textpoke` goes away first
//!
//! The program is told who runs it: `TEXTPOKE_RECORD_PID` holds this
//! process's pid and start time ([`textpoke_control::FrontProcess`]).
//! If `textpoke` is killed (or crashes) while the program runs, the agent
//! of every traced process of the run sees it (a pidfd), stops tracing and
//! finishes its trace, which is then complete; the programs run on. No
//! descriptor is passed for this, so the program's descriptor table is the
//! same as without `textpoke`.

use crate::cmdutil::{self as util, CliError};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use textpoke_control::{AgentClock, AgentConfig, FrontProcess};
use textpoke_record::format::{self, Mode, META_FILE};

/// The demo workload (empty when no C compiler was found at build time).
static DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/textpoke-demo"));

#[derive(clap::Args)]
pub struct Args {
    /// Trace only the functions matching GLOB (repeatable; default: all)
    #[arg(short = 'F', long = "filter", value_name = "GLOB")]
    include: Vec<String>,
    /// Do not trace the functions matching GLOB (repeatable)
    #[arg(short = 'N', long = "notrace", value_name = "GLOB")]
    exclude: Vec<String>,
    /// The trace directory to write (an older trace there moves to DIR.old)
    #[arg(short = 'o', long = "output", value_name = "DIR", default_value = "textpoke.data")]
    pub(crate) output: PathBuf,
    /// Count calls per function instead of recording each entry and exit
    #[arg(long)]
    pub(crate) count_only: bool,
    /// Do not trace calls into shared libraries through the PLT (traced by
    /// default, named after the library function, matched by -F/-N)
    #[arg(long)]
    no_libcall: bool,
    /// Record the return values of the functions matching GLOB (repeatable)
    #[arg(short = 'R', long = "retval", value_name = "GLOB")]
    retval: Vec<String>,
    /// The most one thread's buffer may grow to while the writer is behind
    /// (e.g. 64M, 1G); past it, events are lost and counted [default: 1G]
    #[arg(short = 'b', long = "buffer-size", value_name = "SIZE", value_parser = parse_size)]
    buffer_size: Option<u64>,
    /// The most all threads' buffers may hold together [default: a quarter
    /// of the memory, at most 4G]
    #[arg(long = "memory-limit", value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// The timestamp clock: tsc (ordered across threads), tsc-unordered
    /// (cheaper; timestamps of different threads may be out of order by
    /// up to ~100 ns), monotonic [default: tsc when it is invariant]
    #[arg(long, value_name = "CLOCK", value_parser = AgentClock::NAMES)]
    clock: Option<String>,
    /// Attach to the running process PID instead of starting a program;
    /// detach on Ctrl-C, after --duration, or when it exits, leaving it as
    /// it was
    #[arg(short = 'p', long = "pid", value_name = "PID", conflicts_with = "command")]
    pub(crate) pid: Option<i32>,
    /// With -p: detach after SECS seconds (e.g. 0.5)
    #[arg(long, value_name = "SECS", requires = "pid", value_parser = crate::attach::parse_secs)]
    pub(crate) duration: Option<std::time::Duration>,
    /// With -p: also print how long the attach and the detach took
    #[arg(short = 'v', long, requires = "pid")]
    pub(crate) verbose: bool,
    /// The program to run, and its arguments; none: a bundled multithreaded demo
    #[arg(value_name = "PROG [ARGS]", trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// A size in bytes: a number with an optional K, M or G suffix (powers of
/// 1024; `B`/`iB` accepted after it).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 =
        num.trim().parse().map_err(|_| format!("{s:?} is not a size (a number of bytes, or with K, M or G)"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("{s} is too large"))?;
    if bytes < 64 << 10 {
        return Err(format!("{s} is too small: at least 64K"));
    }
    Ok(bytes)
}

/// Finds `name` as a shell would (`PATH` when it has no `/`) and checks
/// that it is an executable file.
pub fn resolve_program(name: &OsStr) -> Result<PathBuf, CliError> {
    let shown = Path::new(name).display().to_string();
    let candidates: Vec<PathBuf> = if name.as_bytes().contains(&b'/') {
        vec![PathBuf::from(name)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path).map(|d| d.join(name)).collect()
    };
    let mut not_executable = None;
    for c in &candidates {
        let Ok(meta) = std::fs::metadata(c) else { continue };
        if meta.is_dir() {
            not_executable.get_or_insert((c.clone(), "is a directory"));
            continue;
        }
        if meta.permissions().mode() & 0o111 == 0 || !util::access_x(c) {
            not_executable.get_or_insert((c.clone(), "is not executable (no execute permission)"));
            continue;
        }
        return Ok(c.clone());
    }
    if let Some((p, why)) = not_executable {
        return Err(CliError::new(126, format!("{} {why}", p.display())));
    }
    let where_ = if candidates.len() == 1 { "no such file".to_owned() } else { "not found in PATH".to_owned() };
    Err(CliError::new(127, format!("{shown}: {where_}")))
}

#[cfg(target_arch = "x86_64")]
pub const HOW_TO_ADD_SITES: &str = "\
  build it with patchable function entries, one of:
    gcc or clang:  -fpatchable-function-entry=5
    gcc:           -pg -mfentry -mnop-mcount -mrecord-mcount when compiling (not linking),
                   with -fno-pie (executables) or -fno-pic (libraries)
    Rust:          #[textpoke::traced] on the functions to trace";
/// On aarch64 the tracer's entry sites are two NOPs (mcount sites and
/// `#[traced]` are x86-64 only so far).
#[cfg(not(target_arch = "x86_64"))]
pub const HOW_TO_ADD_SITES: &str = "\
  build it with patchable function entries:
    gcc or clang:  -fpatchable-function-entry=2";

/// The libraries `prog` loads at start, as its interpreter lists them
/// (`ld.so --list`, which maps them without running anything).
fn startup_libraries(interp: &Path, prog: &Path) -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new(interp).arg("--list").arg(prog).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("=> ")?;
            let path = rest.rsplit_once(" (").map_or(rest, |(p, _)| p).trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// What is known of the program before it runs.
struct Checked {
    /// Function names with sites in the program and its startup libraries;
    /// `None` for a script, or when no name was asked for.
    names: Option<Vec<String>>,
}

/// Checks that `prog` can be traced (see the module docs); with
/// `want_names`, reads the names of its functions (and its startup
/// libraries') too.
fn check_program(prog: &Path, shown: &str, want_names: bool) -> Result<Checked, CliError> {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(prog)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| CliError::new(126, format!("cannot read {shown}: {e}")))?;
    if head[..n].starts_with(b"#!") {
        return Ok(Checked { names: None });
    }
    let cannot = |e: textpoke::sites::SitesError| CliError::new(2, format!("cannot trace {shown}: {e}"));
    let probe = textpoke::sites::probe_file(prog).map_err(cannot)?;
    let Some(interp) = probe.interpreter.clone() else {
        return Err(CliError::new(
            2,
            format!(
                "{shown} has no program interpreter: it is statically linked (or a shared library); \
                 textpoke loads its agent into the program with LD_PRELOAD, which needs a dynamically linked program"
            ),
        ));
    };
    let no_sites = || {
        CliError::new(2, format!("{shown} has no patchable function entries, nor do the libraries it loads at start;"))
            .with_help(HOW_TO_ADD_SITES)
    };
    if !want_names {
        let has_records = |p: &Path| textpoke::sites::probe_file(p).is_ok_and(|f| f.has_records());
        if probe.has_records() || startup_libraries(&interp, prog).iter().any(|l| has_records(l)) {
            return Ok(Checked { names: None });
        }
        return Err(no_sites());
    }
    let sites = textpoke::sites::scan_file(prog).map_err(cannot)?;
    let mut names = sites.function_names();
    for lib in startup_libraries(&interp, prog) {
        if let Ok(s) = textpoke::sites::scan_file(&lib) {
            names.extend(s.function_names());
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() && sites.sites.is_empty() {
        return Err(no_sites());
    }
    Ok(Checked { names: Some(names) })
}

/// Every glob must match some function.
pub(crate) fn check_globs(args: &Args, names: &[String]) -> Result<(), CliError> {
    for (flag, globs) in [("-F", &args.include), ("-N", &args.exclude)] {
        for g in globs {
            let m = globset::Glob::new(g)
                .map_err(|e| CliError::new(2, format!("bad glob {flag} {g:?}: {}", e.kind())))?
                .compile_matcher();
            if names.iter().any(|n| m.is_match(n)) {
                continue;
            }
            let close = textpoke_control::close_names(g, names.iter().map(String::as_str), 5);
            let hint = if close.is_empty() {
                format!(" ({} traceable functions; list them with `textpoke list PROG`)", names.len())
            } else {
                format!("; did you mean: {}", close.join(", "))
            };
            return Err(CliError::new(2, format!("{flag} {g:?} matches no traceable function{hint}")));
        }
    }
    Ok(())
}

/// `DIR` must be what the agent's recorder accepts (absent, empty, or an
/// earlier trace whose `DIR.old` may be replaced: see
/// [`textpoke_record::dir`]), checked before the program runs.
pub(crate) fn check_output(dir: &Path) -> Result<(), CliError> {
    textpoke_record::dir::check(dir, true).map_err(|e| CliError::new(2, e.to_string()))
}

/// The agent library's file name, as cargo builds it and as it is
/// installed (`ctl` recognises a process's agent by it).
pub const AGENT_FILE_NAME: &str = "libtextpoke_agent.so";

/// The agent shared object: `TEXTPOKE_AGENT`, beside this executable, in
/// `../lib/textpoke/`, or the copy `textpoke` carries (see
/// [`crate::agent_file`]).
pub fn agent_path() -> Result<PathBuf, CliError> {
    crate::agent_file::find()
}

// ---------------------------------------------------------------------------
// Signals.

/// The program's pid (0 before it starts, -1 after it ended).
static CHILD: AtomicI32 = AtomicI32::new(0);
/// A signal that came before the program started.
static PENDING: AtomicI32 = AtomicI32::new(0);

const FORWARDED: [libc::c_int; 7] =
    [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM];

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code > 0 {
        return; // sent by the kernel (the terminal): the program got it too
    }
    match CHILD.load(Ordering::Acquire) {
        0 => PENDING.store(sig, Ordering::Release),
        pid if pid > 0 => {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(pid, sig) };
        }
        _ => {}
    }
}

fn install_forwarding() {
    for sig in FORWARDED {
        // SAFETY: installing a handler with a valid, zero-initialised struct.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = forward as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Dies of `sig` as the program did (no core file of `textpoke`).
fn die_of(sig: libc::c_int) -> ExitCode {
    // SAFETY: setting the default disposition, unblocking and raising;
    // RLIMIT_CORE 0 keeps a core-dumping signal from dumping textpoke.
    unsafe {
        let lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &lim);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    ExitCode::from((128 + sig).min(255) as u8)
}

// ---------------------------------------------------------------------------
// The demo.

/// A private temporary directory holding the demo, removed on drop.
struct DemoFile {
    dir: PathBuf,
    exe: PathBuf,
}

impl DemoFile {
    fn write() -> Result<DemoFile, CliError> {
        if DEMO.is_empty() {
            return Err(CliError::new(
                1,
                "the bundled demo was not built (no C compiler when textpoke was built); \
                 give a program: textpoke record [OPTIONS] -- PROG [ARGS]",
            ));
        }
        let dir = util::private_temp_dir("textpoke-demo")
            .map_err(|e| CliError::new(1, format!("cannot make a temporary directory for the demo: {e}")))?;
        let exe = dir.join("textpoke-demo");
        let written = std::fs::write(&exe, DEMO)
            .and_then(|()| std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(CliError::new(1, format!("cannot write the demo to {}: {e}", exe.display())));
        }
        Ok(DemoFile { dir, exe })
    }
}

impl Drop for DemoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Summary.

/// What the processes a program started recorded (`child-*` directories,
/// recursively): their metadata, read alone.
#[derive(Default)]
struct Children {
    traces: usize,
    calls: u64,
    events: u64,
    lost: u64,
    incomplete: usize,
}

impl Children {
    fn add_under(&mut self, dir: &Path, depth: usize) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !e.file_name().to_string_lossy().starts_with(format::CHILD_DIR_PREFIX) || !p.is_dir() || depth > 32 {
                continue;
            }
            if let Some(m) = read_meta(&p) {
                self.traces += 1;
                self.calls += m.total_calls;
                self.events += m.total_events;
                self.lost += m.total_dropped;
                self.incomplete += !m.complete as usize;
            }
            self.add_under(&p, depth + 1);
        }
    }

    /// `, 3 child traces (1200 calls, 2400 events, 0 lost)`, or nothing.
    fn clause(&self) -> String {
        if self.traces == 0 {
            return String::new();
        }
        let incomplete = match self.incomplete {
            0 => String::new(),
            n => format!(", {n} incomplete"),
        };
        format!(
            ", {} child trace{} ({} calls, {} events, {} lost{incomplete})",
            self.traces,
            if self.traces == 1 { "" } else { "s" },
            self.calls,
            self.events,
            self.lost
        )
    }
}

fn read_meta(dir: &Path) -> Option<format::Meta> {
    std::fs::read(dir.join(META_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// The one-line summary of what was recorded in `dir` (shown as `shown`)
/// and by the processes the program started, from the metadata alone (the
/// events are not read: a big trace's summary costs nothing), and a loud
/// second line when events were lost.
pub(crate) fn summary(dir: &Path, shown: &str, prog: &str) -> Vec<String> {
    let mut children = Children::default();
    children.add_under(dir, 0);
    if !dir.join(META_FILE).exists() {
        if children.traces > 0 {
            let c = &children;
            let mut lines = vec![format!(
                "textpoke: {prog} ran no traced code itself; the {} process{} it started recorded {} calls, {} events, \
                 {} lost -> {shown}/child-*; `textpoke report -i {shown}` shows them",
                c.traces,
                if c.traces == 1 { "" } else { "es" },
                c.calls,
                c.events,
                c.lost
            )];
            if c.lost > 0 {
                lines.push(format!(
                    "textpoke: WARNING: {} events were LOST: the buffers reached their limit. Call counts are exact; \
                     `replay` marks each gap. Raise -b/--buffer-size or --memory-limit.",
                    c.lost
                ));
            }
            return lines;
        }
        return vec![format!("textpoke: nothing recorded: {prog} ran no traced code ({shown} was not written)")];
    }
    let Some(meta) = read_meta(dir) else {
        return vec![format!("textpoke: the trace in {shown} cannot be read: its meta.json is not valid")];
    };
    let agent: Option<serde_json::Value> =
        std::fs::read(dir.join("agent.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let count = |k: &str| agent.as_ref().and_then(|a| a.get(k)).and_then(|v| v.as_u64()).unwrap_or(0);
    let what = match meta.mode {
        Mode::Record => format!("{} calls, {} events", meta.total_calls, meta.total_events),
        Mode::Count => format!("{} calls counted", meta.total_calls),
    };
    let threads = meta.threads.len();
    let incomplete = match (&meta.ended_by, meta.complete) {
        (_, true) => String::new(),
        (Some(e), false) => format!(
            " (incomplete: {}; the trace holds everything recorded up to it: read it with --salvage)",
            e.describe(meta.pid)
        ),
        (None, false) => " (incomplete: the recording did not finish; the program was killed, or its exit could not \
                          wait for the final flush)"
            .into(),
    };
    let traced = count("traced");
    let mut lines = vec![format!(
        "textpoke: {traced} function{} traced (of {}), {what}, {} lost, {threads} thread{}{} -> {shown}{incomplete}",
        if traced == 1 { "" } else { "s" },
        count("functions"),
        meta.total_dropped,
        if threads == 1 { "" } else { "s" },
        children.clause(),
    )];
    let lost = meta.total_dropped + children.lost;
    if lost > 0 {
        let b = &meta.buffers;
        lines.push(format!(
            "textpoke: WARNING: {lost} events were LOST: the buffers reached their limit (per thread {}, in all {}; \
             peak {}). Call counts are exact; `replay` marks each gap. Raise -b/--buffer-size or --memory-limit, \
             or trace fewer functions (-F/-N).",
            human_bytes(b.thread_limit),
            human_bytes(b.memory_limit),
            human_bytes(b.peak_bytes),
        ));
    }
    lines
}

/// `512 KiB`, `16 MiB`, `4 GiB`.
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n => format!("{} KiB", n >> 10),
    }
}

// ---------------------------------------------------------------------------

/// What the agent is told (see [`textpoke_control::agent`]): the trace
/// directory `dir`, written by the program itself (the agent takes the
/// program's pid), the options, and this process to watch.
pub(crate) fn agent_config(args: &Args, dir: PathBuf) -> AgentConfig {
    AgentConfig {
        dir: Some(dir),
        owner_pid: None,
        include: args.include.clone(),
        exclude: args.exclude.clone(),
        count_only: args.count_only,
        no_libcall: args.no_libcall,
        retval: args.retval.clone(),
        buffer_size: args.buffer_size,
        memory_limit: args.memory_limit,
        clock: args.clock.as_deref().and_then(AgentClock::parse),
        socket_dir: None, // as this process's environment says
        front: Some(this_front()),
    }
}

/// This process as its agent will check it ([`FrontProcess`]), with the
/// start time read through `/proc/PID/task/PID/stat` (the main thread's,
/// which is the process's). qemu-user answers `/proc/self/stat` and
/// `/proc/PID/stat` of its own process with a start time it computes
/// itself, a few ticks off the kernel's that the agent reads (seen in
/// `.ci/aarch64`): the agent would take this process for gone and not
/// record. The task path is the kernel's everywhere.
fn this_front() -> FrontProcess {
    let f = FrontProcess::this();
    let stat = std::fs::read_to_string(format!("/proc/{0}/task/{0}/stat", f.pid)).ok();
    // Field 22 is the start time; the fields after the command name's
    // last `)` start at field 3.
    let start = stat.and_then(|t| t[t.rfind(')')? + 1..].split_ascii_whitespace().nth(22 - 3)?.parse().ok());
    FrontProcess { start: start.unwrap_or(f.start), ..f }
}

pub fn run(args: &Args) -> ExitCode {
    match record(args) {
        Ok(code) => code,
        Err(e) => e.report("textpoke record"),
    }
}

fn record(args: &Args) -> Result<ExitCode, CliError> {
    for g in args.include.iter().chain(&args.exclude).chain(&args.retval) {
        globset::Glob::new(g).map_err(|e| CliError::new(2, format!("bad glob {g:?}: {}", e.kind())))?;
    }
    if let Some(pid) = args.pid {
        return crate::attach::record_pid(args, pid);
    }
    let demo = if args.command.is_empty() { Some(DemoFile::write()?) } else { None };
    let (prog, arg0, rest): (PathBuf, OsString, &[OsString]) = match &demo {
        Some(d) => (d.exe.clone(), "textpoke-demo".into(), &[]),
        None => (resolve_program(&args.command[0])?, args.command[0].clone(), &args.command[1..]),
    };
    let shown = Path::new(&arg0).display().to_string();
    let checked = check_program(&prog, &shown, !(args.include.is_empty() && args.exclude.is_empty()))?;
    if let Some(names) = &checked.names {
        check_globs(args, names)?;
    }
    let cwd = std::env::current_dir().map_err(|e| CliError::new(1, format!("no working directory: {e}")))?;
    let dir = cwd.join(&args.output);
    check_output(&dir)?;
    let agent = agent_path()?;
    if agent.as_os_str().as_bytes().iter().any(|&b| b == b' ' || b == b':') {
        return Err(CliError::new(
            1,
            format!(
                "the agent path {} has a space or colon, which LD_PRELOAD cannot hold; set TEXTPOKE_AGENT",
                agent.display()
            ),
        ));
    }
    let mut preload = agent.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = std::process::Command::new(&prog);
    cmd.arg0(&arg0).args(rest).env("LD_PRELOAD", preload);
    agent_config(args, dir.clone()).apply_to(&mut cmd);
    install_forwarding();
    let mut child = cmd.spawn().map_err(|e| CliError::new(126, format!("cannot run {shown}: {e}")))?;
    CHILD.store(child.id() as i32, Ordering::Release);
    let early = PENDING.swap(0, Ordering::AcqRel);
    if early != 0 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, early) };
    }
    let status = child.wait().map_err(|e| CliError::new(1, format!("waiting for {shown}: {e}")));
    CHILD.store(-1, Ordering::Release);
    let status = status?;
    drop(demo);
    for line in summary(&dir, &args.output.display().to_string(), &shown) {
        util::eprint_line(&line);
    }
    if args.command.is_empty() {
        let o = args.output.display();
        util::eprint_line(&format!("textpoke: look at it with `textpoke report -i {o}` or `textpoke replay -i {o}`"));
    }
    match (status.code(), status.signal()) {
        (Some(c), _) => Ok(ExitCode::from(c as u8)),
        (None, Some(sig)) => Ok(die_of(sig)),
        _ => Ok(ExitCode::FAILURE),
    }
}
