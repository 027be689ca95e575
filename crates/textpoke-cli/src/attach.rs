//! `textpoke record -p PID`: attaches to a running process, records it, and
//! detaches leaving it as it was (issue #11).
//!
//! # Steps
//!
//! 1. **Pre-flight**, read-only: the process exists and is not this one;
//!    its maps are readable; no textpoke agent records it already (one
//!    preloaded by `textpoke record`, one attached by another `textpoke
//!    record -p` whose control socket says it records, or an agent of
//!    another build); its program or libraries have patchable entries
//!    (each mapped file is read through `/proc/PID/map_files/` or
//!    `/proc/PID/root/`, never by a path of our own mount namespace, with
//!    the site scanner `textpoke list` uses), and every `-F`/`-N` glob
//!    matches one of their functions; the output directory is one
//!    `textpoke record` would write. The injector adds its own checks
//!    (ptrace permission, static, seccomp... see `textpoke_inject`).
//! 2. **Inject** the agent by its path (`textpoke_inject`,
//!    `SoImage::TargetPath`): one thread of the target is stopped for a
//!    fraction of a millisecond; a new thread `dlopen`s the agent and
//!    calls `textpoke_agent_attach` with one end of a socketpair. The path
//!    must exist in the target's mount namespace (the output directory
//!    too). A second attach opens the same file, which `dlopen` finds
//!    already loaded: the same agent image runs again.
//! 3. **Start**: the settings are sent (`textpoke_control::AgentConfig` as a message), and
//!    the agent answers once it records (or why it cannot). The start line
//!    is printed: what `textpoke record`'s agent would trace, where.
//! 4. **Wait** for `SIGINT`, `SIGTERM` or `SIGHUP`, `--duration`, the
//!    target's exit (a pidfd), or the end of the session (the target
//!    exec'd).
//! 5. **Detach**: `detach` is sent; the agent puts every site back to its
//!    original bytes, stops the recorder (the trace is complete), ends its
//!    threads and answers with the run's summary, which is printed as
//!    `textpoke record` prints its last lines (lost events included), with
//!    the agent's warnings. Children the target forked while attached
//!    end their tracing when the session socket closes (they hold a
//!    duplicate): their traces are waited for (2 s at most). Exit 0.
//!
//! If this command dies at any point after the injection, the agent sees
//! its socket close and detaches by itself: the trace is complete and the
//! target runs on untouched. Every refusal names its cause and what to do,
//! exits non-zero, and leaves the target as it was.
//!
//! # What stays in the target
//!
//! The agent's code (threads may still return through its return
//! trampoline), the injector's loader image and scratch, the tracer's
//! never-freed blocks (with the mirror slots of gcc's pads, 1.74 GiB below
//! their objects), the agent's fork handlers, and, when some thread could
//! not be seen past a possible trap, textpoke's `SIGTRAP` handler (which
//! passes every other trap to the program's disposition; the summary says
//! so). No thread of textpoke's stays.
//!
//! `--verbose` prints the timings: the hijacked thread's stop, the time to
//! the agent's first live site, and the detach.

use crate::cmdutil::{self as util, CliError};
use crate::cmdutil::{environ, lookup};
use crate::record::{self, Args, AGENT_FILE_NAME, HOW_TO_ADD_SITES};
use std::collections::BTreeSet;
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};
use textpoke_control::{self as control, Reply, Request};
use textpoke_inject::{InjectError, InjectOptions, SoImage};

/// The agent's entry symbol.
const ENTRY: &str = "textpoke_agent_attach";
/// How long the agent may take to start recording (finding the sites of
/// every object, patching them).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to detach (the final flush writes the
/// whole trace).
const DETACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the traces of children forked while attached.
const CHILDREN_WAIT: Duration = Duration::from_secs(2);

pub(crate) use crate::cmdutil::parse_secs;

/// A failure before or during the attach: exit code 1.
fn failed(message: impl Into<String>) -> CliError {
    CliError::new(1, message)
}

// ---------------------------------------------------------------------------
// Pre-flight.

/// A mapped file of the target.
struct Mapped {
    /// Its path as the target sees it.
    path: String,
    dev: (u32, u32),
    ino: u64,
    /// The first mapping's address range, for `/proc/PID/map_files/`.
    range: String,
}

/// The files `/proc/PID/maps` maps, once each.
fn mapped_files(pid: i32) -> Result<Vec<Mapped>, CliError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| {
        failed(format!(
            "cannot read /proc/{pid}/maps: {e}; run textpoke as the process's user (or with sudo) to attach to it"
        ))
    })?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.splitn(6, ' ');
        let (Some(range), _, _, Some(dev), Some(ino)) = (f.next(), f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = f.next().unwrap_or("").trim_start();
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        let Ok(ino) = ino.parse::<u64>() else { continue };
        let Some((maj, min)) = dev.split_once(':') else { continue };
        let (Ok(maj), Ok(min)) = (u32::from_str_radix(maj, 16), u32::from_str_radix(min, 16)) else { continue };
        if ino == 0 || !path.starts_with('/') || !seen.insert((maj, min, ino)) {
            continue;
        }
        out.push(Mapped { path: path.to_owned(), dev: (maj, min), ino, range: range.to_owned() });
    }
    Ok(out)
}

/// A path to read `m` from: its `map_files` link (the very file mapped),
/// else the path in the target's root, else the path as given.
fn readable_path(pid: i32, m: &Mapped) -> PathBuf {
    let by_map = PathBuf::from(format!("/proc/{pid}/map_files/{}", m.range));
    if std::fs::File::open(&by_map).is_ok() {
        return by_map;
    }
    let in_root = PathBuf::from(format!("/proc/{pid}/root{}", m.path));
    if std::fs::metadata(&in_root).is_ok_and(|md| md.ino() == m.ino) {
        return in_root;
    }
    PathBuf::from(&m.path)
}

/// What the pre-flight found.
struct Target {
    comm: String,
    /// Traceable function names of the program and its libraries.
    names: Vec<String>,
    sites: usize,
    /// The socket directory the agent puts its control socket in (the one
    /// `textpoke ctl` looks in first).
    socket_dir: PathBuf,
}

fn device_of(m: &std::fs::Metadata) -> (u32, u32) {
    let dev = m.dev();
    (libc::major(dev), libc::minor(dev))
}

fn preflight(pid: i32, agent: &Path) -> Result<Target, CliError> {
    if pid <= 0 {
        return Err(CliError::new(2, format!("{pid} is not a process id")));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| failed(format!("process {pid} does not exist")))?;
    let tgid = status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse::<i32>().ok());
    if tgid.is_some_and(|t| t != pid) {
        return Err(failed(format!("{pid} is a thread of process {}: give the process id", tgid.unwrap_or(0))));
    }
    if pid as u32 == std::process::id() {
        return Err(failed(format!("process {pid} is this textpoke: it cannot attach to itself")));
    }
    let comm =
        std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim_end().to_owned()).unwrap_or_default();
    let shown = format!("process {pid} ({})", textpoke_analysis::escape(&comm));
    let env = environ(pid);
    let socket_dir = control::socket_dir(|k| lookup(&env, k));
    let files = mapped_files(pid)?;
    check_no_agent(pid, &shown, agent, &files, &env, &socket_dir)?;
    let mut names = Vec::new();
    let mut sites = 0;
    for m in files.iter().filter(|m| Path::new(&m.path).file_name().is_none_or(|n| n != AGENT_FILE_NAME)) {
        let p = readable_path(pid, m);
        if !textpoke::sites::probe_file(&p).is_ok_and(|f| f.has_records()) {
            continue;
        }
        if let Ok(found) = textpoke::sites::scan_file(&p) {
            sites += found.sites.len();
            names.extend(found.function_names());
        }
    }
    names.sort();
    names.dedup();
    if sites == 0 {
        return Err(failed(format!(
            "{shown} has no patchable function entries in its program or the libraries it has loaded;"
        ))
        .with_help(HOW_TO_ADD_SITES));
    }
    Ok(Target { comm, names, sites, socket_dir })
}

/// Refuses a process a textpoke agent records already (see the module
/// docs); an agent left idle by an earlier attach is fine.
fn check_no_agent(
    pid: i32,
    shown: &str,
    agent: &Path,
    files: &[Mapped],
    env: &[(Vec<u8>, Vec<u8>)],
    socket_dir: &Path,
) -> Result<(), CliError> {
    let Some(loaded) = files.iter().find(|m| Path::new(&m.path).file_name().is_some_and(|n| n == AGENT_FILE_NAME))
    else {
        return Ok(());
    };
    let preloaded = lookup(env, "LD_PRELOAD").is_some_and(|v| {
        v.into_vec()
            .split(|&b| b == b':' || b == b' ')
            .any(|e| Path::new(std::ffi::OsStr::from_bytes(e)).file_name().is_some_and(|n| n == AGENT_FILE_NAME))
    });
    if preloaded {
        return Err(failed(format!(
            "{shown} runs under `textpoke record` (its agent was preloaded): see and change what it records \
             with `textpoke ctl {pid} status`"
        )));
    }
    let ours =
        std::fs::metadata(agent).map_err(|e| failed(format!("cannot read the agent {}: {e}", agent.display())))?;
    if (device_of(&ours), ours.ino()) != (loaded.dev, loaded.ino) {
        return Err(failed(format!(
            "{shown} has another build of the textpoke agent loaded ({}): two agents would fight over its \
             sites; attach with the textpoke that loaded it, or restart the program",
            loaded.path
        )));
    }
    if let Some(state) = agent_state(pid, socket_dir) {
        if state.starts_with("recording") {
            return Err(failed(format!(
                "{shown} is being recorded by textpoke (another `textpoke record -p {pid}` is attached; \
                 `textpoke ctl {pid} status` shows it): detach that one first"
            )));
        }
    }
    Ok(())
}

/// The state an agent's control socket reports, if one answers.
fn agent_state(pid: i32, socket_dir: &Path) -> Option<String> {
    let path = control::socket_path(socket_dir, pid);
    control::check_socket(&path).ok()?;
    let mut s = UnixStream::connect(&path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(Request::Status.to_line().as_bytes()).ok()?;
    let reply = Reply::read(&mut BufReader::new(s)).ok()?;
    reply.get("state").map(str::to_owned)
}

// ---------------------------------------------------------------------------
// Signals.

/// The write end of the self-pipe the handler writes to (-1: none).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Acquire);
    if fd >= 0 {
        // SAFETY: write is async-signal-safe; one byte from a static buffer.
        unsafe { libc::write(fd, b"s".as_ptr().cast(), 1) };
    }
}

/// `SIGINT`, `SIGTERM` and `SIGHUP` detach: the read end of the pipe
/// their handler writes to.
fn catch_stop_signals() -> Result<OwnedFd, CliError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(failed(format!("cannot make a pipe: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: both were just made; the write end lives for the process.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::Release);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler with a valid, zero-initialised struct.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
    Ok(read)
}

// ---------------------------------------------------------------------------
// The session.

/// Why recording ends.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Signal,
    Duration,
    /// The target exited.
    Exited,
    /// The session socket closed without a detach (the target exec'd).
    SessionClosed,
}

/// Reads one reply within `timeout`.
fn read_reply(reader: &mut BufReader<UnixStream>, timeout: Duration) -> Result<Reply, String> {
    reader.get_ref().set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    Reply::read(reader).map_err(|e| {
        let text = e.to_string();
        if text.contains("timed out") || text.contains("would block") || text.contains("temporarily unavailable") {
            format!("the agent did not answer within {} s", timeout.as_secs())
        } else {
            text
        }
    })
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor, owned here.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Step 4: waits for the end of the recording.
fn wait_end(signals: &OwnedFd, pidfd: Option<&OwnedFd>, session: &UnixStream, duration: Option<Duration>) -> End {
    let deadline = duration.map(|d| Instant::now() + d);
    loop {
        let mut fds = vec![
            libc::pollfd { fd: signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: session.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if let Some(p) = pidfd {
            fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return End::Duration;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            None => -1,
        };
        // SAFETY: `fds` is a live array of its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue; // EINTR: our own signal handler; the pipe says which
        }
        if fds[0].revents != 0 {
            return End::Signal;
        }
        if fds.get(2).is_some_and(|p| p.revents != 0) {
            return End::Exited;
        }
        if fds[1].revents != 0 {
            return End::SessionClosed;
        }
    }
}

/// The injector's refusal, in this command's words.
fn inject_error(pid: i32, e: InjectError) -> CliError {
    match e {
        InjectError::Traced { tracer, comm, .. } if comm == "textpoke" => failed(format!(
            "process {pid} is being attached to by textpoke (pid {tracer}): another `textpoke record -p` is \
             attaching; wait for it, or detach it"
        )),
        e => failed(format!("cannot attach to process {pid}: {e}")),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// `textpoke record -p PID` (see the module docs).
pub(crate) fn record_pid(args: &Args, pid: i32) -> Result<ExitCode, CliError> {
    let t0 = Instant::now();
    let t0_ns = textpoke::clock::monotonic_ns();
    let agent = record::agent_path()?;
    let agent = std::fs::canonicalize(&agent).unwrap_or(agent);
    // Step 1.
    let target = preflight(pid, &agent)?;
    record::check_globs(args, &target.names)?;
    let cwd = std::env::current_dir().map_err(|e| failed(format!("no working directory: {e}")))?;
    let dir = cwd.join(&args.output);
    record::check_output(&dir)?;
    let shown_dir = args.output.display().to_string();
    let who = format!("process {pid} ({})", textpoke_analysis::escape(&target.comm));
    let signals = catch_stop_signals()?;
    let pidfd = pidfd_open(pid);
    // Step 2.
    let preflight_done = t0.elapsed();
    let injected = textpoke_inject::inject(pid, &InjectOptions::new(SoImage::TargetPath(&agent), ENTRY))
        .map_err(|e| inject_error(pid, e))?;
    let timing = injected.timing;
    // Step 3.
    let mut config = record::agent_config(args, dir.clone());
    config.front = None; // the session socket is the watch
    config.socket_dir = Some(target.socket_dir.clone());
    let mut session = injected.socket;
    session
        .write_all(config.to_message().as_bytes())
        .map_err(|e| failed(format!("cannot send the settings to the agent in {who}: {e}")))?;
    let mut reader = BufReader::new(session.try_clone().map_err(|e| failed(e.to_string()))?);
    let started = match read_reply(&mut reader, START_TIMEOUT) {
        Ok(r) => r,
        Err(why) => return Err(start_failed(pid, &who, &why)),
    };
    let ready = t0.elapsed();
    if let Some(why) = &started.error {
        for w in started.all("warning") {
            util::eprint_line(&format!("textpoke: agent: {}", textpoke_analysis::escape(w)));
        }
        return Err(failed(format!("cannot record {who}: {}", textpoke_analysis::escape(why))));
    }
    print_start(args, &target, &who, &started, &shown_dir);
    if args.verbose {
        let us = |k: &str| {
            started.get(k).and_then(|v| v.parse::<u64>().ok()).map_or("?".into(), |v| ms(Duration::from_micros(v)))
        };
        let live = started.get("live-ns").and_then(|v| v.parse::<u64>().ok()).map(|ns| ns.saturating_sub(t0_ns));
        util::eprint_line(&format!(
            "textpoke: attach: pre-flight {}, thread {} stopped {} ({} remote calls), agent loaded at {}, \
             sites live at {} (the agent found them in {}, recorded from {} later), recording confirmed at {} \
             (from the start of the command)",
            ms(preflight_done),
            injected.tid,
            ms(timing.stop),
            timing.remote_syscalls,
            ms(timing.until_ready + preflight_done),
            live.map_or("?".into(), |ns| ms(Duration::from_nanos(ns))),
            us("scan-us"),
            us("start-us"),
            ms(ready),
        ));
    }
    for w in started.all("warning") {
        util::eprint_line(&format!("textpoke: agent: {}", textpoke_analysis::escape(w)));
    }
    // Step 4.
    let end = wait_end(&signals, pidfd.as_ref(), &session, args.duration);
    // Step 5.
    let summary = match end {
        End::Exited | End::SessionClosed => None,
        End::Signal | End::Duration => {
            let t = Instant::now();
            let sent = session.write_all(b"detach\n");
            let reply = sent.map_err(|e| e.to_string()).and_then(|()| read_reply(&mut reader, DETACH_TIMEOUT));
            Some((reply, t.elapsed()))
        }
    };
    drop(reader);
    drop(session); // children forked while attached end their tracing now
    wait_for_children(&dir, CHILDREN_WAIT);
    for line in record::summary(&dir, &shown_dir, &target.comm) {
        util::eprint_line(&line);
    }
    report_end(args, pid, &who, end, summary)
}

/// Whether every `child-*` trace under `dir` (recursively) is complete.
fn children_complete(dir: &Path, depth: usize) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return true };
    rd.flatten().all(|e| {
        let p = e.path();
        if depth > 32 || !e.file_name().to_string_lossy().starts_with("child-") || !p.is_dir() {
            return true;
        }
        let meta: Option<serde_json::Value> =
            std::fs::read(p.join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let complete = meta.is_none_or(|m| m.get("complete").and_then(|c| c.as_bool()) == Some(true));
        complete && children_complete(&p, depth + 1)
    })
}

/// Children forked while attached finish their traces once the session
/// socket closes: waits a moment for them, so that the summary counts
/// them complete (one that exec'd or died stays incomplete, and is shown so).
fn wait_for_children(dir: &Path, patience: Duration) {
    let deadline = Instant::now() + patience;
    while !children_complete(dir, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The agent did not answer the settings.
fn start_failed(pid: i32, who: &str, why: &str) -> CliError {
    let gone = std::fs::metadata(format!("/proc/{pid}")).is_err();
    if gone {
        return failed(format!("{who} exited during the attach"));
    }
    failed(format!(
        "the agent in {who} did not start recording: {why}; it detaches by itself now that this command gives up"
    ))
}

/// The line printed once recording runs.
fn print_start(args: &Args, target: &Target, who: &str, started: &Reply, shown_dir: &str) {
    let get = |k: &str| started.get(k).unwrap_or("?").to_owned();
    let mode = if args.count_only { "counting calls of" } else { "recording" };
    let until = match args.duration {
        Some(d) => format!("for {} s (or Ctrl-C)", d.as_secs_f64()),
        None => "until Ctrl-C".into(),
    };
    util::eprint_line(&format!(
        "textpoke: attached to {who}: {mode} {} of {} functions ({} sites) -> {shown_dir}; detaching {until}",
        get("traced"),
        get("functions"),
        started.get("sites").map_or(target.sites.to_string(), str::to_owned),
    ));
    print_left_out(started);
    if let (Some(sites), Some(inline)) = (started.get("sites"), started.get("inline")) {
        if args.verbose && sites != inline {
            util::eprint_line(&format!(
                "textpoke: attach: {inline} of {sites} sites record inline; the others take the generic hot path \
                 (an injected agent's thread-locals are in dynamic TLS)"
            ));
        }
    }
}

/// The functions the filters match that the agent left untraced (gcc
/// pads whose jump target cannot be mapped: tracing them would signal the
/// program's threads), with why.
fn print_left_out(started: &Reply) {
    let n = started.get("left-out").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    if n == 0 {
        return;
    }
    util::eprint_line(&format!(
        "textpoke: {n} function(s) left out: gcc's pads (five one-byte NOPs) are traced by changing their first byte \
         into a jump to a slot textpoke maps 1.74 GiB below them, and theirs cannot be mapped (making them one \
         instruction instead would signal every thread of the process):"
    ));
    for why in started.all("left-out-why") {
        util::eprint_line(&format!("  {}", textpoke_analysis::escape(why)));
    }
}

/// The last lines: how the recording ended and what detach did.
fn report_end(
    args: &Args,
    pid: i32,
    who: &str,
    end: End,
    summary: Option<(Result<Reply, String>, Duration)>,
) -> Result<ExitCode, CliError> {
    match (end, summary) {
        (End::Exited, _) => {
            util::eprint_line(&format!("textpoke: {who} exited while recording"));
            Ok(ExitCode::SUCCESS)
        }
        (End::SessionClosed, _) => {
            let gone = std::fs::metadata(format!("/proc/{pid}")).is_err();
            let why = if gone { "exited" } else { "closed the session (it exec'd another program?)" };
            util::eprint_line(&format!("textpoke: {who} {why} while recording"));
            Ok(ExitCode::SUCCESS)
        }
        (_, Some((Ok(reply), took))) => {
            for w in reply.all("warning") {
                util::eprint_line(&format!("textpoke: agent: {}", textpoke_analysis::escape(w)));
            }
            let sigtrap = reply.get("sigtrap").unwrap_or("?");
            let trap_note = match sigtrap {
                "restored" | "untouched" => String::new(),
                other => format!("; SIGTRAP: {}", textpoke_analysis::escape(other)),
            };
            let sites = match reply.get("sites-changed").and_then(|v| v.parse::<u64>().ok()) {
                Some(0) => "every site has its original bytes again".to_string(),
                Some(n) => format!(
                    "{n} site(s) do not hold the bytes they had before the first attach (changed by other code?), \
                     the others have their original bytes again"
                ),
                None => "the agent did not say whether every site has its original bytes again".to_string(),
            };
            let rendezvous = match reply.get("rendezvous-signal") {
                Some(sig) => format!(
                    "; signal {sig} keeps textpoke's rendezvous handler (installed to park the threads while the \
                     pads were rewritten; it ignores signals textpoke did not queue)"
                ),
                None => String::new(),
            };
            util::eprint_line(&format!("textpoke: detached from {who}: {sites}{trap_note}{rendezvous}"));
            if args.verbose {
                let us = |k: &str| reply.get(k).and_then(|v| v.parse::<u64>().ok()).map(Duration::from_micros);
                util::eprint_line(&format!(
                    "textpoke: detach: sites restored in {}, agent done in {}, answered in {} (SIGTRAP {sigtrap})",
                    us("unpatch-us").map_or("?".into(), ms),
                    us("detach-us").map_or("?".into(), ms),
                    ms(took),
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        (_, Some((Err(why), _))) => {
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                util::eprint_line(&format!("textpoke: {who} exited while detaching"));
                return Ok(ExitCode::SUCCESS);
            }
            Err(failed(format!(
                "detaching from {who}: {why}; the agent detaches by itself when this command exits (its session closes)"
            )))
        }
        (_, None) => Ok(ExitCode::SUCCESS),
    }
}
