//! `textpoke patch PID PATCH.so`: replaces functions of a running process
//! with the kernel's consistency model, lists, reverts and forces
//! (issue 12).
//!
//! # Steps
//!
//! 1. **Check** the patch file against the process, touching nothing
//!    (`textpoke::live::object::PatchFile::check_process`): every object
//!    the patch names is mapped there, with the build-id the patch
//!    expects. A mismatch is refused, both ids shown.
//! 2. **Reach the agent.** A program under `textpoke record` (or attached
//!    by `textpoke record -p`) has a control socket: the `patch-*` verbs
//!    go there. Otherwise the agent is injected (`textpoke_inject`, as
//!    `textpoke record -p` does; an agent injected earlier is the same
//!    image, `dlopen` returns it and its entry runs again) and asked for a
//!    patch session (`textpoke_control::PATCH_SESSION`): no recorder, no
//!    control socket, no signal handler of its own.
//! 3. **Load and apply**: `patch-load PATH`. The agent `dlopen`s the path
//!    as the *target* sees it (its mount namespace: the path given here,
//!    made absolute), resolves the targets, and starts the transition;
//!    its live-patch thread drives it.
//! 4. **Wait** (`patch-done`, polled) until every thread has switched:
//!    `patched outer(), inner() in 3.1 ms: 9 threads switched`, exit 0. At
//!    `--timeout` (30 s) the pending threads are printed (the kernel's
//!    transition report: each thread, the function it holds, what it is
//!    doing), the transition stays pending (the agent drives it on) and
//!    the exit code is 2; `--force` completes it then instead.
//!
//! `--nudge[=S]` (before step 3, `patch-nudge`) opts in to the nudge for
//! the transition started: threads running user code and still pending
//! after S seconds get a signal that makes them check themselves
//! (`textpoke::live::Patcher::set_nudge`).
//!
//! `--list`, `--revert [ID]` (waits as an apply does), `--report` and
//! `--force` alone act on the patches the process has. The agent stays
//! loaded while patches exist (and after: an injected object is never
//! unloaded); this command may end at any time, the program runs on with
//! its patches.

use crate::cmdutil::{environ, lookup};
use crate::cmdutil::{eprint_line, CliError};
use crate::record::{agent_path, AGENT_FILE_NAME};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use textpoke_analysis::escape;
use textpoke_control::{self as control, PatchVerb, Reply, Request};
use textpoke_inject::{InjectOptions, SoImage};

/// The agent's entry symbol.
const ENTRY: &str = "textpoke_agent_attach";
/// How long one request may take (a `patch-load` resolves symbols of big
/// objects).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest pause between two `patch-done` polls.
const POLL_MAX: Duration = Duration::from_millis(5);

#[derive(clap::Args)]
#[command(
    group = clap::ArgGroup::new("action").args(["patch", "list", "revert", "report"]).multiple(false),
    after_help = "Exit status: 0 complete, 1 refused or failed, 2 the transition is still pending \
                  (the agent drives it on: see it with --report, complete it with --force, undo it with --revert).\n\
                  The patch's path is opened by the target process: it must exist in the target's mount namespace."
)]
pub struct Args {
    /// The process to patch
    #[arg(value_name = "PID")]
    pub pid: i32,
    /// The patch object (a shared object with textpoke.h's TEXTPOKE_LIVEPATCH records)
    #[arg(value_name = "PATCH.so")]
    pub patch: Option<PathBuf>,
    /// Seconds to wait for every thread to switch before reporting the pending ones (exit 2)
    #[arg(long, value_name = "S", default_value = "30", value_parser = crate::attach::parse_secs)]
    pub timeout: Duration,
    /// Complete the transition by force if it is still pending after --timeout (alone: complete the
    /// pending transition now); the consistency model may be broken for the threads forced, and
    /// the patch's code is never unloaded
    #[arg(long)]
    pub force: bool,
    /// List the applied patches: id, name, state, functions, forced, replace
    #[arg(long)]
    pub list: bool,
    /// Revert the newest patch, or patch ID, with the same consistency (waits as an apply does)
    #[arg(long, value_name = "ID", num_args = 0..=1)]
    pub revert: Option<Option<u64>>,
    /// Print the transition in progress: the threads that have not switched and what they hold
    #[arg(long)]
    pub report: bool,
    /// Opt in to the nudge for this transition: threads still pending after S seconds (default 1)
    /// while running user code, never one the kernel shows in a system call, get a signal whose
    /// handler checks and switches them (a thread in a loop that calls no patched or traced
    /// function switches no other way than --force). A thread entering a system call just as the
    /// signal arrives may see it fail with EINTR: the one exception to textpoke's "no EINTR"
    #[arg(long, value_name = "S", num_args = 0..=1, require_equals = true, default_missing_value = "1",
          value_parser = crate::attach::parse_secs)]
    pub nudge: Option<Duration>,
    /// Print timings (the injection, the load, from the agent being loaded to complete)
    #[arg(short, long)]
    pub verbose: bool,
}

fn failed(message: impl Into<String>) -> CliError {
    CliError::new(1, message)
}

pub fn run(args: &Args) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => e.report("textpoke patch"),
    }
}

fn run_inner(args: &Args) -> Result<ExitCode, CliError> {
    let t0 = Instant::now();
    let who = check_process(args.pid)?;
    if let Some(patch) = &args.patch {
        return apply(args, &who, patch, t0);
    }
    // No agent loaded: nothing to list, revert or force; none is injected.
    let Some(mut agent) = Agent::find(args.pid, &who, true)? else {
        if args.list || args.report {
            println!("no patch is applied to {who} (no textpoke agent is loaded in it)");
            return Ok(ExitCode::SUCCESS);
        }
        return Err(failed(format!("no patch is applied to {who} (no textpoke agent is loaded in it)")));
    };
    let code = if args.list {
        list(&mut agent, &who)?
    } else if args.report {
        report(&mut agent, &who)?
    } else if let Some(id) = args.revert {
        revert(args, &mut agent, id)?
    } else if args.force {
        force(&mut agent)?
    } else {
        return Err(CliError::new(2, "give a PATCH.so, or one of --list, --revert [ID], --report, --force"));
    };
    agent.close();
    Ok(code)
}

/// The process as named in messages; refuses what is no process.
fn check_process(pid: i32) -> Result<String, CliError> {
    if pid <= 0 {
        return Err(CliError::new(2, format!("{pid} is not a process id")));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| failed(format!("process {pid} does not exist")))?;
    let tgid = status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse::<i32>().ok());
    if let Some(t) = tgid.filter(|&t| t != pid) {
        return Err(failed(format!("{pid} is a thread of process {t}: give the process id")));
    }
    if pid as u32 == std::process::id() {
        return Err(failed(format!("process {pid} is this textpoke: it cannot patch itself this way")));
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim_end().to_owned());
    Ok(format!("process {pid} ({})", escape(&comm.unwrap_or_default())))
}

// ---------------------------------------------------------------------------
// The agent.

/// A connection to the agent in the target: its control socket, or a
/// patch session with an injected agent.
struct Agent {
    reader: BufReader<UnixStream>,
    session: bool,
    /// When the agent was ready to take requests.
    ready: Instant,
}

impl Agent {
    /// The agent of `pid`: its control socket if it has one, else an
    /// injected agent's patch session (`quiet`: only if an agent is
    /// loaded already; `None` if there is none).
    fn find(pid: i32, who: &str, quiet: bool) -> Result<Option<Agent>, CliError> {
        if let Some(a) = Agent::control_socket(pid) {
            return Ok(Some(a));
        }
        if quiet && !agent_loaded(pid) {
            return Ok(None);
        }
        Agent::inject(pid, who).map(Some)
    }

    fn control_socket(pid: i32) -> Option<Agent> {
        let env = environ(pid);
        let dir = control::socket_dir(|k| lookup(&env, k));
        let path = control::socket_path(&dir, pid);
        control::check_socket(&path).ok()?;
        let s = UnixStream::connect(&path).ok()?;
        Some(Agent { reader: BufReader::new(s), session: false, ready: Instant::now() })
    }

    fn inject(pid: i32, who: &str) -> Result<Agent, CliError> {
        let agent = agent_path()?;
        let agent = std::fs::canonicalize(&agent).unwrap_or(agent);
        check_same_agent(pid, who, &agent)?;
        let injected = textpoke_inject::inject(pid, &InjectOptions::new(SoImage::TargetPath(&agent), ENTRY))
            .map_err(|e| failed(format!("cannot attach to {who}: {e}")))?;
        let mut s = injected.socket;
        s.write_all(control::PATCH_SESSION.as_bytes())
            .map_err(|e| failed(format!("cannot start a patch session in {who}: {e}")))?;
        Ok(Agent { reader: BufReader::new(s), session: true, ready: Instant::now() })
    }

    /// Sends `verb`, reads its reply; an `error` reply is an `Err`.
    fn ask(&mut self, verb: PatchVerb) -> Result<Reply, CliError> {
        let line = Request::Patch(verb).to_line();
        let s = self.reader.get_mut();
        s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| failed(e.to_string()))?;
        s.write_all(line.as_bytes()).map_err(|e| failed(format!("cannot reach the agent: {e}")))?;
        let reply = Reply::read(&mut self.reader).map_err(|e| failed(format!("the agent did not answer: {e}")))?;
        match &reply.error {
            Some(m) => Err(failed(m.clone())),
            None => Ok(reply),
        }
    }

    /// Ends a patch session (its thread in the target exits); a control
    /// connection just closes.
    fn close(mut self) {
        if self.session {
            let _ = self.reader.get_mut().write_all(b"detach\n");
        }
    }
}

/// Refuses a process holding an agent of another textpoke build: two
/// agents would fight over its sites (the same file is the same image:
/// `dlopen` returns the one loaded).
fn check_same_agent(pid: i32, who: &str, agent: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Some(loaded) = maps
        .lines()
        .filter_map(|l| l.splitn(6, ' ').nth(5).map(str::trim_start))
        .find(|p| p.starts_with('/') && Path::new(p).file_name().is_some_and(|n| n == AGENT_FILE_NAME))
    else {
        return Ok(());
    };
    let ours =
        std::fs::metadata(agent).map_err(|e| failed(format!("cannot read the agent {}: {e}", agent.display())))?;
    let theirs = std::fs::metadata(format!("/proc/{pid}/root{loaded}"));
    if theirs.is_ok_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino())) {
        return Ok(());
    }
    Err(failed(format!(
        "{who} has another textpoke agent loaded ({}) and its control socket was not found: patch it with the \
         textpoke that loaded it (with the same TEXTPOKE_SOCKET_DIR)",
        escape(loaded)
    )))
}

/// Whether the agent's object is mapped in `pid`.
fn agent_loaded(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| {
        m.lines().any(|l| l.rsplit('/').next().is_some_and(|n| n.trim_end_matches(" (deleted)") == AGENT_FILE_NAME))
    })
}

// ---------------------------------------------------------------------------
// Apply, revert: start, then wait.

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 10_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn apply(args: &Args, who: &str, patch: &Path, t0: Instant) -> Result<ExitCode, CliError> {
    if args.list || args.report || args.revert.is_some() {
        return Err(CliError::new(2, "a PATCH.so is applied alone: --list, --revert and --report take none"));
    }
    let path = std::fs::canonicalize(patch)
        .map_err(|e| failed(format!("cannot read the patch {}: {e}", escape(&patch.display().to_string()))))?;
    let text = path.to_str().ok_or_else(|| failed("the patch's path is not UTF-8; rename it"))?.to_owned();
    // Step 1: nothing in the process is touched before this passes.
    let file = textpoke::live::object::PatchFile::open(&path).map_err(|e| failed(e.to_string()))?;
    let targets = file.check_process(args.pid).map_err(|e| failed(format!("{e}")))?;
    if args.verbose {
        for t in &targets {
            let id: String =
                t.build_id.as_ref().map_or("none".into(), |b| b.iter().map(|x| format!("{x:02x}")).collect());
            eprint_line(&format!("textpoke patch: target {} (build-id {id}) matches", t.path.display()));
        }
    }
    let checked = t0.elapsed();
    let mut agent = Agent::find(args.pid, who, false)?.expect("found or injected");
    let loaded = agent.ready;
    agent.ask(nudge(args))?;
    let started = agent.ask(PatchVerb::Load(text))?;
    let functions = functions_of(&started);
    let id = number(&started, "id")?;
    let name = started.get("name").unwrap_or("").to_owned();
    let seq = number(&started, "seq")?;
    let outcome = wait(&mut agent, id, seq, args.timeout)?;
    let to_complete = loaded.elapsed();
    if args.verbose {
        eprint_line(&format!(
            "textpoke patch: checked in {}, agent {} at {}, patch loaded and applied in {} (dlopen, resolution, \
             stubs), complete {} after the agent was loaded",
            ms(checked),
            if agent.session { "injected" } else { "reached" },
            ms(loaded - t0),
            started.get("load-us").and_then(|v| v.parse().ok()).map_or("?".into(), |us| ms(Duration::from_micros(us))),
            ms(to_complete),
        ));
    }
    let code = finish(args, &mut agent, outcome, &format!("patched {functions}"), &name, id)?;
    agent.close();
    Ok(code)
}

fn revert(args: &Args, agent: &mut Agent, id: Option<u64>) -> Result<ExitCode, CliError> {
    let patches = agent.ask(PatchVerb::List)?;
    agent.ask(nudge(args))?;
    let started = agent.ask(PatchVerb::Revert(id))?;
    let id = number(&started, "id")?;
    let seq = number(&started, "seq")?;
    let name = started.get("name").unwrap_or("").to_owned();
    let functions = patches
        .all("patch")
        .filter_map(ListLine::parse)
        .find(|p| p.id == id)
        .map_or_else(String::new, |p| format!(": {}", calls(p.functions.split(','))));
    let outcome = wait(agent, id, seq, args.timeout)?;
    let what = if started.get("reversal") == Some("yes") { "reversed the transition of" } else { "reverted" };
    finish(args, agent, outcome, &format!("{what} patch {id} ({}){functions}", escape(&name)), &name, id)
}

/// The agent's nudge setting for the transition this command starts
/// (`--nudge`; off without it, whatever an earlier command asked).
fn nudge(args: &Args) -> PatchVerb {
    PatchVerb::Nudge(args.nudge.map(|d| d.as_millis().max(1) as u64))
}

/// The functions of a start reply, `outer(), inner()`.
fn functions_of(r: &Reply) -> String {
    calls(r.all("function"))
}

fn calls<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.map(|f| format!("{}()", escape(f))).collect::<Vec<_>>().join(", ")
}

fn number(r: &Reply, key: &str) -> Result<u64, CliError> {
    r.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| failed(format!("the agent's reply has no {key}")))
}

/// How a wait ended.
enum Outcome {
    Complete { reverted: bool, took: Duration, forced: bool },
    Pending,
}

/// Polls `patch-done` until the transition completes or `timeout`.
fn wait(agent: &mut Agent, id: u64, seq: u64, timeout: Duration) -> Result<Outcome, CliError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(100);
    loop {
        let r = agent.ask(PatchVerb::Done { id, seq })?;
        if r.get("state") == Some("complete") {
            return Ok(Outcome::Complete {
                reverted: r.get("direction") == Some("reverted"),
                took: Duration::from_micros(number(&r, "took-us")?),
                forced: r.get("forced") == Some("yes"),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Outcome::Pending);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Threads of `pid` that are the program's (textpoke's own are named
/// `textpoke-*`).
fn program_threads(pid: i32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| !c.starts_with("textpoke-")))
        .count()
}

/// Prints how a wait ended; the exit code.
fn finish(
    args: &Args,
    agent: &mut Agent,
    outcome: Outcome,
    what: &str,
    name: &str,
    id: u64,
) -> Result<ExitCode, CliError> {
    match outcome {
        Outcome::Complete { reverted, took, forced } => {
            let threads = program_threads(args.pid);
            let s = if threads == 1 { "" } else { "s" };
            let how = if forced { " (forced)" } else { "" };
            // A patching reversed meanwhile (another `--revert`) ends reverted.
            let what = if reverted && what.starts_with("patched") {
                format!("{what} — reverted before it completed")
            } else {
                what.to_owned()
            };
            println!("{what} in {}{how}: {threads} thread{s} switched", ms(took));
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Pending if args.force => {
            let r = agent.ask(PatchVerb::Force)?;
            print_forced(&r);
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Pending => {
            let r = agent.ask(PatchVerb::Report)?;
            print_report(&r);
            eprint_line(&format!(
                "textpoke patch: patch {id} ({}) is not complete after {}: the transition stays pending and the \
                 agent drives it on; follow it with `textpoke patch {pid} --report`, complete it with \
                 `textpoke patch {pid} --force` (the threads above may then run old and new code mixed), or undo \
                 it with `textpoke patch {pid} --revert`",
                escape(name),
                ms(args.timeout),
                pid = args.pid
            ));
            Ok(ExitCode::from(2))
        }
    }
}

/// Prints a `patch-report` reply; whether a transition is pending.
fn print_report(r: &Reply) -> bool {
    if r.get("transition") != Some("pending") {
        println!("no transition is in progress");
        return false;
    }
    let threads: Vec<&str> = r.all("thread").collect();
    let elapsed = r.get("elapsed-ms").and_then(|v| v.parse().ok()).map(Duration::from_millis).unwrap_or_default();
    let reversals = r.get("reversals").filter(|&n| n != "0").map_or(String::new(), |n| format!(", reversed {n}×"));
    println!(
        "{} patch {} ({}) pending for {}{reversals}: {} thread{} not switched",
        r.get("direction").unwrap_or("?"),
        r.get("patch").unwrap_or("?"),
        escape(r.get("name").unwrap_or("")),
        ms(elapsed),
        threads.len(),
        if threads.len() == 1 { "" } else { "s" }
    );
    for t in threads {
        println!("  {}", escape(t));
    }
    true
}

fn print_forced(r: &Reply) {
    let forced: Vec<&str> = r.all("forced").collect();
    let done = if r.get("direction") == Some("patching") { "patched" } else { "reverted" };
    println!(
        "{done} patch {} by force after {}: {} thread{} switched without a check",
        r.get("patch").unwrap_or("?"),
        r.get("took-us").and_then(|v| v.parse().ok()).map_or("?".into(), |us| ms(Duration::from_micros(us))),
        forced.len(),
        if forced.len() == 1 { "" } else { "s" }
    );
    for t in forced {
        println!("  {}", escape(t));
    }
}

// ---------------------------------------------------------------------------
// List, report, force.

/// One `patch` line of `patch-list`.
struct ListLine<'a> {
    id: u64,
    state: &'a str,
    forced: &'a str,
    replace: &'a str,
    functions: &'a str,
    name: &'a str,
}

impl<'a> ListLine<'a> {
    fn parse(line: &'a str) -> Option<ListLine<'a>> {
        let mut f = line.splitn(6, ' ');
        Some(ListLine {
            id: f.next()?.parse().ok()?,
            state: f.next()?,
            forced: f.next()?,
            replace: f.next()?,
            functions: f.next()?,
            name: f.next().unwrap_or(""),
        })
    }
}

fn list(agent: &mut Agent, who: &str) -> Result<ExitCode, CliError> {
    let r = agent.ask(PatchVerb::List)?;
    let lines: Vec<ListLine> = r.all("patch").filter_map(ListLine::parse).collect();
    if lines.is_empty() {
        println!("no patch is applied to {who}");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 6]> = lines
        .iter()
        .map(|p| {
            [
                p.id.to_string(),
                escape(p.name).into_owned(),
                p.state.to_owned(),
                calls(p.functions.split(',')),
                p.forced.to_owned(),
                p.replace.to_owned(),
            ]
        })
        .collect();
    let head = ["ID", "NAME", "STATE", "FUNCTIONS", "FORCED", "REPLACE"];
    let mut width = head.map(str::len);
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(head.map(str::to_owned)).chain(rows) {
        let cells: Vec<String> = row.iter().zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(ExitCode::SUCCESS)
}

fn report(agent: &mut Agent, _who: &str) -> Result<ExitCode, CliError> {
    let r = agent.ask(PatchVerb::Report)?;
    Ok(if print_report(&r) { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn force(agent: &mut Agent) -> Result<ExitCode, CliError> {
    let r = agent.ask(PatchVerb::Force)?;
    print_forced(&r);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_lines_parse_names_with_spaces() {
        let r = Reply::read(&mut std::io::Cursor::new("ok\npatch 3 enabled no yes outer,inner fix one\n\n")).unwrap();
        let l = ListLine::parse(r.get("patch").unwrap()).unwrap();
        assert_eq!((l.id, l.state, l.forced, l.replace), (3, "enabled", "no", "yes"));
        assert_eq!((l.functions, l.name), ("outer,inner", "fix one"));
        assert_eq!(calls(l.functions.split(',')), "outer(), inner()");
        assert!(ListLine::parse("x enabled").is_none());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(ms(Duration::from_micros(3140)), "3.1 ms");
        assert_eq!(ms(Duration::from_millis(250)), "250 ms");
        assert_eq!(ms(Duration::from_secs(30)), "30.0 s");
    }
}
