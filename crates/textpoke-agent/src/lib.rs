//! The textpoke agent: a shared object that `textpoke record` preloads
//! (`LD_PRELOAD`) into a program, so that the program traces itself into
//! a trace directory and can be steered while it runs (`textpoke ctl`).
//!
//! It is a thin front end over the library: [`textpoke::trace::Tracer`]
//! finds and patches the sites, [`textpoke_record::RecordOp`] records into
//! [`textpoke_record`], [`textpoke_control`] defines the socket.
//!
//! # Environment
//!
//! `textpoke record` passes its settings in the environment: the trace
//! directory (`TEXTPOKE_DIR`), the process that writes it itself
//! (`TEXTPOKE_PID`), the filters, the mode, the buffer sizes, the clock,
//! the socket directory, and the `textpoke record` process to watch
//! (`TEXTPOKE_RECORD_PID`, step 7). The variables, their meaning and the
//! checks of their values are [`textpoke_control::AgentConfig`]'s, which
//! the CLI uses to set them: they are written down once, there.
//!
//! # Life cycle
//!
//! 1. **Load.** A constructor (an `.init_array` entry) reads the
//!    environment, resolves the functions it wraps, registers fork
//!    handlers and asks the tracer for the traceable functions of every
//!    loaded object. None: the agent stays idle — no thread, no file, no
//!    output — and the program runs as if it were not there.
//! 2. **Record.** Otherwise it starts the recorder, registers the
//!    recording op with the filter rules (see [`rules`]), registers the
//!    exit flush (`record::flush_at_exit`), and starts the agent thread,
//!    which serves the control socket and rescans loaded objects.
//! 3. **Objects loaded later.** The agent thread compares the loader's
//!    object counters (`dl_iterate_phdr`'s `dlpi_adds`/`dlpi_subs`) every
//!    50 ms and calls `Tracer::refresh` when they move; `dlopen` is
//!    wrapped only to wake it (the wrapper jumps to the real `dlopen`, so
//!    that glibc still sees the caller's return address: the caller's
//!    `RUNPATH` and `$ORIGIN` decide where the library is found, as without
//!    the agent). `dlclose` is wrapped to refresh right after the real one
//!    returns, so that the sites of an unloaded object are forgotten before
//!    anything can be loaded at its address. A process that was idle
//!    starts recording when an object with sites appears.
//! 4. **fork.** The recorder follows the child into `DIR/child-<pid>/`; a
//!    fork handler gives the child its own agent thread and socket.
//! 5. **exec.** The `exec` family (`execve`, `execv`, `execvp`,
//!    `execvpe`, `execl`, `execlp`, `execle`, `fexecve`, `execveat`) is
//!    wrapped: the recorder is stopped first, so the trace is complete,
//!    and the new program is told where to write: `DIR/child-<pid>-exec/`
//!    if this program recorded, else this program's own directory. In a
//!    `vfork` child (detected by its pid) nothing of the parent is touched
//!    and the new program writes `DIR/child-<pid>/`. A failed exec leaves
//!    recording stopped. A program without sites runs normally (step 1).
//! 6. **Exit.** `exit` and a return from `main` stop the recorder
//!    (`flush_at_exit`); `_exit` and `_Exit` are wrapped to have the agent
//!    thread do the same while they wait (at most a few seconds: `_exit`
//!    may be called from a signal handler, where the stop's allocations
//!    could deadlock; see `interpose`).
//!    `SIGINT`, `SIGTERM` and `SIGHUP`, when their disposition is the
//!    default at load, get a handler that asks the agent thread to stop the
//!    recorder, then restores the default and raises the signal again: the
//!    process still dies of the signal, with a complete trace.
//!    `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE` and `SIGABRT` (`abort()`)
//!    get the agent's handler whatever their disposition: the program's own
//!    handlers still run as they asked (`sigaction` and `signal` are
//!    wrapped), and when the default action is about to kill the process,
//!    the thread the signal hit first writes the trace up to the crash
//!    (`textpoke_record::crash`), then dies of that signal, with its core
//!    dump (see `fatal`). Recording threads get an alternate signal stack,
//!    so that a stack overflow is flushed too (see `altstack`).
//! 7. **`textpoke record` ends.** When `TEXTPOKE_RECORD_PID` names it,
//!    the agent thread watches that process (a pidfd, see `front`). If it
//!    is gone while the program runs (killed, crashed), nobody will stop
//!    the recording: the agent unregisters its op (the sites are
//!    unpatched), stops the recorder as an exit does (the trace is
//!    complete and stops growing), and starts no recording afterwards;
//!    the program runs on untouched, and `textpoke ctl` still answers
//!    (state `stopped (textpoke record ended)`). It inherits nothing from
//!    `textpoke record` but the variable: no descriptor. A program that
//!    starts (or is executed) when `textpoke record` is already gone
//!    never starts recording.
//! 8. **Shutdown.** [`shutdown`] turns the agent off for good in a
//!    program that runs on, as a detach will (issue #11): tracing ends as
//!    in step 7 (op unregistered, sites unpatched, trace finished, the
//!    recorder's writer thread joined), then the agent thread is ended and
//!    joined (its descriptors close with it) and the socket file removed.
//!    Nothing starts again, except through a new attach session, which
//!    re-arms the agent (`rearm`). What stays: the wrappers and signal handlers,
//!    which then pass everything through to the program (the real
//!    functions, the program's own handlers, the default dispositions),
//!    and the tracer's reclaimer thread if one was started (the engine
//!    does not stop it yet: TODO(#14)).
//!
//! ## Injected into a running program (issue #11)
//!
//! Steps 1 and 2 assume a constructor that runs before `main`, alone:
//! the settings come from the environment, and `TEXTPOKE_PID` is set with
//! `setenv`. An agent loaded into a running program by `textpoke record
//! -p` starts nothing in its constructor (it tells the two cases apart by
//! `LD_PRELOAD`); its entry `textpoke_agent_attach` takes the settings as
//! a message, does step 2 without the stop-signal and fatal-signal
//! handlers, serves the session until the CLI detaches, and can be
//! attached again: see `attach`.
//!
//! # Never harm the program
//!
//! Every entry point catches panics. An error is printed once on stderr,
//! prefixed `textpoke:`, and tracing is disabled (the op unregistered, the
//! recorder stopped with what it has); the program goes on. The agent
//! thread blocks the usual asynchronous signals so they reach the
//! program's threads, keeps its descriptors above the low numbers programs
//! use, checks that they still are its own before every use (a program
//! that closes every descriptor is not confused with the agent), writes to
//! sockets with `MSG_NOSIGNAL`, and clears `dlerror` after its own loader
//! calls made on a program thread.
//!
//! # Control socket
//!
//! `<socket dir>/<pid>.sock`, mode 0600 in a 0700 directory; the protocol
//! is described in [`textpoke_control`]: `status`, `enable GLOB`,
//! `disable GLOB`. Peers of another uid (root excepted) are refused. The
//! agent thread serves every connection at once without blocking on any
//! (see `clients`), and removes the sockets that dead processes left in
//! the directory when it makes its own (see `server::socket`).

mod altstack;
mod attach;
mod clients;
mod fatal;
mod fds;
mod front;
mod interpose;
#[cfg(target_arch = "x86_64")]
mod patch;
/// Live patching's transition engine is x86-64's only for now.
#[cfg(not(target_arch = "x86_64"))]
mod patch {
    pub(crate) fn handle(_: textpoke_control::PatchVerb) -> textpoke_control::Reply {
        textpoke_control::Reply::error("live patching is implemented on x86-64 only")
    }
}
pub mod rules;
mod server;

use rules::{Rule, Rules};
use std::cell::Cell;
use std::ffi::{c_char, CString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::sync::Arc;
use textpoke::sync::ForkLock;
use textpoke::trace::{OpHandle, TraceError, Tracer};
use textpoke_control::{AgentClock, AgentConfig, ConfigWarning};
use textpoke_record::{self as record, Recorder, RecorderConfig};
use textpoke_record::{ClockChoice, ClockSource, RecordOp};

/// Why the agent cannot trace; printed once, then tracing is disabled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error("cannot record: {0}")]
    Record(#[from] record::RecordError),
    #[error("cannot trace: {0}")]
    Trace(#[from] TraceError),
    #[error("cannot trace newly loaded code: {0}")]
    Refresh(TraceError),
    #[error(transparent)]
    Filter(#[from] textpoke::trace::FilterError),
}

/// What the agent is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing to trace (yet).
    Idle,
    Recording,
    /// Recording stopped (before exec, on a fatal signal, at `_exit`).
    Stopped(&'static str),
    /// An error disabled tracing.
    Failed,
}

impl Phase {
    pub fn name(self) -> String {
        match self {
            Phase::Idle => "idle".into(),
            Phase::Recording => "recording".into(),
            Phase::Stopped(why) => format!("stopped ({why})"),
            Phase::Failed => "failed".into(),
        }
    }

    const IDLE: u8 = 0;
    const RECORDING: u8 = 1;
    const STOPPED: u8 = 2;
    const FAILED: u8 = 3;

    /// The phase without its reason, for [`PHASE`].
    fn code(self) -> u8 {
        match self {
            Phase::Idle => Phase::IDLE,
            Phase::Recording => Phase::RECORDING,
            Phase::Stopped(_) => Phase::STOPPED,
            Phase::Failed => Phase::FAILED,
        }
    }
}

/// [`Agent::phase`] as a number ([`Phase::code`]), readable without the
/// lock: the agent thread looks at it on every tick, which must not take
/// the lock when there is nothing to do, and the `_exit` wrapper, which
/// must take no lock at all (see `interpose`). Written only by
/// [`Agent::set_phase`], under the lock.
static PHASE: AtomicU8 = AtomicU8::new(Phase::IDLE);

/// The agent left [`Phase::Idle`] (it never goes back): it found something
/// to trace, or failed trying.
pub(crate) fn left_idle() -> bool {
    PHASE.load(Ordering::Acquire) != Phase::IDLE
}

/// The agent is in [`Phase::Recording`].
pub(crate) fn recording() -> bool {
    PHASE.load(Ordering::Acquire) == Phase::RECORDING
}

/// The agent's state in this process.
pub(crate) struct Agent {
    /// The settings, read from the environment at load.
    pub config: AgentConfig,
    /// Where the control socket goes: `config.socket_dir`, else the
    /// default of the environment at load.
    pub socket_dir: PathBuf,
    pub rules: Rules,
    /// The directory this program writes.
    pub dir: PathBuf,
    pub phase: Phase,
    pub recorder: Option<Recorder>,
    pub op: Option<OpHandle>,
    /// Traceable functions found (distinct names).
    pub functions: usize,
    /// Functions the op traces (distinct names).
    pub traced: usize,
}

impl Agent {
    /// Changes the phase, and its lock-free copy [`PHASE`].
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        PHASE.store(phase.code(), Ordering::Release);
    }
}

pub(crate) static AGENT: ForkLock<Option<Agent>> = ForkLock::new(None);

/// The pid the agent state belongs to (updated by the fork handler): a
/// different `getpid()` means a `vfork` child sharing our memory.
pub(crate) static AGENT_PID: AtomicI32 = AtomicI32::new(0);

/// The agent was initialised in this image.
pub(crate) static LOADED: AtomicBool = AtomicBool::new(false);

/// `Agent::dir` as a C string (leaked), readable without the lock (by a
/// `vfork` child about to exec).
static DIR_SNAPSHOT: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());

/// This image (or the parent it was forked from) started recording into
/// its directory.
pub(crate) static STARTED: AtomicBool = AtomicBool::new(false);

/// Tracing ended for good: `textpoke record` is gone (step 7) or the
/// agent was shut down (step 8). No recording starts any more.
pub(crate) static ENDED: AtomicBool = AtomicBool::new(false);

/// Why recording stopped when `textpoke record` went away.
const FRONT_GONE_WHY: &str = "textpoke record ended";

/// Why recording stopped at [`shutdown`].
const SHUTDOWN_WHY: &str = "the agent was shut down";

thread_local! {
    /// The agent's own code runs on this thread now: wrappers called from
    /// it (the library's `dlopen`/`dlclose` of `Pin`) do nothing extra.
    static IN_AGENT: Cell<bool> = const { Cell::new(false) };
}

pub(crate) fn in_agent() -> bool {
    IN_AGENT.with(|c| c.get())
}

/// Runs `f` marked as agent code, catching panics.
pub(crate) fn as_agent<R>(f: impl FnOnce() -> R) -> Option<R> {
    let outer = IN_AGENT.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_AGENT.with(|c| c.set(outer));
    match r {
        Ok(v) => Some(v),
        Err(_) => {
            // The guard unlocked while unwinding; disable what is left.
            let _ = std::panic::catch_unwind(|| match AGENT.try_lock() {
                Some(mut g) => match g.as_mut() {
                    Some(a) => fail(a, "internal error (panic)"),
                    None => warn_once("internal error (panic); tracing is disabled"),
                },
                None => warn_once("internal error (panic); tracing is disabled"),
            });
            None
        }
    }
}

pub(crate) fn set_in_agent_thread() {
    IN_AGENT.with(|c| c.set(true));
}

/// Prints `textpoke: MSG` on stderr, once per process: the error that
/// disabled tracing.
pub(crate) fn warn_once(msg: &str) {
    static ONCE: AtomicBool = AtomicBool::new(false);
    print_once(&ONCE, msg);
}

/// As [`warn_once`], for a problem that leaves tracing on (no control
/// socket): printed once too, and does not silence a later error.
pub(crate) fn note_once(msg: &str) {
    static ONCE: AtomicBool = AtomicBool::new(false);
    print_once(&ONCE, msg);
}

fn print_once(once: &AtomicBool, msg: &str) {
    if attach::divert(msg) {
        return; // an attach session's reply carries it
    }
    if !once.swap(true, Ordering::Relaxed) {
        // Messages quote function names and paths: escaped, so that they
        // cannot act on the terminal the program's stderr goes to.
        let _ = writeln!(std::io::stderr(), "textpoke: {}", textpoke_analysis::escape(msg));
    }
}

pub(crate) fn dir_snapshot() -> *const c_char {
    DIR_SNAPSHOT.load(Ordering::Acquire)
}

fn publish_dir(dir: &Path) {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // The old snapshot is leaked: a vfork child may be reading it.
        DIR_SNAPSHOT.store(c.into_raw(), Ordering::Release);
    }
}

pub(crate) use textpoke_sys::threads::getpid;

/// Says what was wrong with the settings: a value that cannot be used
/// as `warn_once` (as an error would), a front process that cannot be
/// watched as `note_once` (tracing goes on as asked).
fn report_config_warnings(warnings: &[ConfigWarning]) {
    for w in warnings {
        match w {
            ConfigWarning::BadFront { .. } => note_once(&w.to_string()),
            _ => warn_once(&w.to_string()),
        }
    }
}

/// The recorder's clock source for the one asked for.
fn clock_source(clock: AgentClock) -> ClockSource {
    match clock {
        AgentClock::Tsc => ClockSource::Tsc,
        AgentClock::TscUnordered => ClockSource::TscUnordered,
        AgentClock::Monotonic => ClockSource::Monotonic,
    }
}

/// A byte count as the recorder takes it.
fn bytes(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

// ---------------------------------------------------------------------------
// Load.

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    as_agent(|| {
        let preloaded = attach::loaded_at_start();
        attach::note_mode(preloaded);
        if preloaded {
            load();
        }
    });
}

fn load() {
    interpose::resolve();
    fatal::resolve_all();
    let pid = getpid();
    AGENT_PID.store(pid, Ordering::Relaxed);
    let (config, warnings) = AgentConfig::from_env();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let base = config.dir_from(&cwd);
    let dir = match config.owner_pid {
        None => {
            let name = CString::new(textpoke_control::agent::PID_ENV).expect("a name without NUL");
            let v = CString::new(pid.to_string()).expect("digits");
            // SAFETY: valid C strings; the program's own threads are not
            // running yet (constructors run before main).
            unsafe { libc::setenv(name.as_ptr(), v.as_ptr(), 1) };
            base
        }
        Some(p) if p == pid => base,
        Some(_) => base.join(format!("{}{pid}", record::format::CHILD_DIR_PREFIX)),
    };
    report_config_warnings(&warnings);
    let socket_dir = config.socket_dir.clone().unwrap_or_else(textpoke_control::default_socket_dir);
    let rules = match Rules::new(&config.include, &config.exclude) {
        Ok(r) => r,
        Err(e) => {
            warn_once(&format!("{e}; tracing is disabled"));
            return;
        }
    };
    if config.front.is_some_and(front::proc_says_gone) {
        ENDED.store(true, Ordering::Release); // step 7, before it started
    }
    publish_dir(&dir);
    // SAFETY: three `extern "C"` handlers without arguments.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    let mut g = AGENT.lock();
    *g = Some(Agent {
        config,
        socket_dir,
        rules,
        dir,
        phase: Phase::Idle,
        recorder: None,
        op: None,
        functions: 0,
        traced: 0,
    });
    LOADED.store(true, Ordering::Release);
    let agent = g.as_mut().expect("just set");
    server::loader::note_counters();
    let tracer = Tracer::global(); // finds the sites of every loaded object
                                   // Pads made one instruction at the first change (no program thread
                                   // yet): a later `ctl enable` then signals no thread.
    tracer.set_prepare_pads(true);
    if let Err(e) = try_start(agent, tracer) {
        fail(agent, &e.to_string());
    }
}

/// Starts recording if there is anything to trace.
fn try_start(agent: &mut Agent, tracer: &'static Tracer) -> Result<(), AgentError> {
    if agent.phase != Phase::Idle || ENDED.load(Ordering::Acquire) {
        return Ok(());
    }
    if tracer.functions().is_empty() {
        return Ok(());
    }
    if !agent.config.no_libcall {
        // Library calls (uftrace's default): a site per PLT slot of every
        // traced object, named after the import, before the filter is made.
        tracer.set_libcalls(true)?;
    }
    let functions = tracer.functions();
    // Register for membarrier's SYNC_CORE before the recorder starts its
    // thread: with one thread (at load) the kernel skips the RCU grace
    // period (10-20 ms) it waits for when there are several.
    textpoke::sync::best_method();
    let c = &agent.config;
    let mut cfg = RecorderConfig::new(&agent.dir);
    // An exec'd image of a process of this recording whose earlier image
    // recorded nothing writes the directory that image would have, where
    // the children it started may already be.
    cfg.keep_children = c.owner_pid == Some(AGENT_PID.load(Ordering::Relaxed));
    if c.count_only {
        cfg = cfg.count_only();
    }
    if let Some(n) = c.buffer_size {
        cfg.thread_limit = bytes(n);
    }
    if let Some(n) = c.memory_limit {
        cfg.memory_limit = bytes(n);
    }
    if let Some(clock) = c.clock {
        cfg.clock = ClockChoice::Force(clock_source(clock));
    }
    let recorder = record::start(cfg)?;
    record::flush_at_exit();
    agent.recorder = Some(recorder);
    agent.set_phase(Phase::Recording);
    STARTED.store(true, Ordering::Release);
    let op = if agent.config.count_only {
        RecordOp::count_only()
    } else if agent.config.retval.is_empty() {
        RecordOp::graph()
    } else {
        RecordOp::graph()
            .with_retval(textpoke_record::filter::glob_filter(agent.config.retval.clone(), Vec::<String>::new())?)
    };
    let filter = agent.rules.filter(functions.iter().map(|f| &*f.function))?;
    drop(functions);
    let handle = tracer.register(Arc::new(op), filter)?;
    agent.op = Some(handle);
    recount(agent, tracer);
    if !attach::injected() {
        // Injected: the program's dispositions stay its own (see `attach`).
        server::stop_signals::install();
        fatal::install();
    }
    server::spawn();
    Ok(())
}

/// How many distinct names (hashed with FNV-1a, not SipHash: the names
/// are the program's own; counting 100,000 twice took 83 M instructions
/// with SipHash, 48 M with this; callgrind).
fn distinct<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    #[derive(Default)]
    struct Fnv(u64);
    impl std::hash::Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            let mut h = self.0 ^ 0xcbf2_9ce4_8422_2325;
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            self.0 = h;
        }
    }
    names.collect::<std::collections::HashSet<&str, std::hash::BuildHasherDefault<Fnv>>>().len()
}

/// Updates the counts of functions found and traced, and `agent.json`.
fn recount(agent: &mut Agent, tracer: &Tracer) {
    let functions = tracer.functions();
    agent.functions = distinct(functions.iter().map(|f| &*f.function));
    agent.traced = match &agent.op {
        Some(op) => distinct(functions.iter().filter(|f| f.ops & (1u64 << op.id()) != 0).map(|f| &*f.function)),
        None => 0,
    };
    write_agent_json(agent);
}

/// `DIR/agent.json`: what the agent traced, for `textpoke record`'s
/// summary (the trace reader ignores it).
fn write_agent_json(agent: &Agent) {
    if !agent.dir.is_dir() {
        return;
    }
    let v = serde_json::json!({
        "pid": getpid(),
        "functions": agent.functions,
        "traced": agent.traced,
        "state": agent.phase.name(),
        "rules": agent.rules.iter().map(Rule::text).collect::<Vec<_>>(),
    });
    let tmp = agent.dir.join("agent.json.tmp");
    if std::fs::write(&tmp, format!("{v:#}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, agent.dir.join("agent.json"));
    }
}

/// Reports an error once and disables tracing: the op is unregistered,
/// the recorder stopped with what it has.
pub(crate) fn fail(agent: &mut Agent, msg: &str) {
    warn_once(&format!("{msg}; tracing is disabled"));
    if let Some(op) = agent.op.take() {
        let _ = Tracer::global().unregister(op);
    }
    let _ = Tracer::global().set_libcalls(false);
    if let Some(r) = agent.recorder.take() {
        let _ = r.stop();
    }
    agent.traced = 0;
    agent.set_phase(Phase::Failed);
    write_agent_json(agent);
}

/// Stops recording (complete trace), keeping the sites as they are.
pub(crate) fn stop_recording(agent: &mut Agent, why: &'static str) {
    if agent.phase != Phase::Recording {
        return;
    }
    agent.set_phase(Phase::Stopped(why));
    write_agent_json(agent);
    if let Some(r) = agent.recorder.take() {
        if let Err(e) = r.stop() {
            warn_once(&format!("the final trace flush failed: {e}"));
        }
    }
}

/// `textpoke record` is gone (step 7): stops tracing (the op is
/// unregistered, which unpatches its sites) and finishes the trace; an
/// idle agent never starts one. The program runs on.
pub(crate) fn front_ended() {
    end_tracing(FRONT_GONE_WHY);
}

/// Ends tracing for good (steps 7 and 8): the op is unregistered (its
/// sites unpatched), the recorder stopped as an exit does, and no
/// recording starts afterwards.
fn end_tracing(why: &'static str) {
    ENDED.store(true, Ordering::Release);
    let mut g = AGENT.lock();
    let Some(agent) = g.as_mut() else { return };
    if let Some(op) = agent.op.take() {
        if let Err(e) = Tracer::global().unregister(op) {
            warn_once(&format!("{why}, but tracing cannot be turned off: {e}"));
        }
    }
    // The GOT words get their real targets back (the thunks stay mapped).
    let _ = Tracer::global().set_libcalls(false);
    agent.traced = 0;
    stop_recording(agent, why);
}

/// Turns the agent off for good (step 8), for a program that runs on
/// without it: an injected agent detaching (issue #11). Tracing ends as
/// when `textpoke record` is gone (the sites unpatched, the trace
/// finished, the recorder's writer thread joined), then the agent thread
/// is ended and joined (its socket, wake pipe, pidfd and connections
/// closed with it) and the socket file removed. Nothing starts again:
/// not recording, not the agent thread.
///
/// Call it from a thread of the program (or of an injector), not from the
/// agent thread, and not from within a wrapper the agent installed.
pub fn shutdown() {
    as_agent(|| {
        end_tracing(SHUTDOWN_WHY);
        server::stop();
        server::socket::remove_socket();
    });
}

/// Makes a shut-down agent startable again (a second `textpoke record -p`
/// attaching, see `attach`): recording may start, and the agent thread.
pub(crate) fn rearm() {
    ENDED.store(false, Ordering::Release);
    server::rearm();
}

/// Rescans loaded objects and brings the op's filter up to date; a process
/// that was idle starts recording when sites appear.
pub(crate) fn refresh(agent: &mut Agent) {
    if agent.phase == Phase::Failed {
        return;
    }
    let tracer = Tracer::global();
    server::loader::note_counters();
    let r = match tracer.refresh().map_err(AgentError::Refresh) {
        Err(e) => Err(e),
        Ok(()) if agent.phase == Phase::Idle => try_start(agent, tracer),
        Ok(()) if agent.phase == Phase::Recording => update_filter(agent).map_err(AgentError::Refresh),
        Ok(()) => Ok(()),
    };
    if let Err(e) = r {
        fail(agent, &e.to_string());
    }
}

/// Sets the op's filter from the rules over the functions known now.
pub(crate) fn update_filter(agent: &mut Agent) -> Result<(), TraceError> {
    let tracer = Tracer::global();
    let Some(op) = &agent.op else { return Ok(()) };
    let functions = tracer.functions();
    let filter = agent.rules.filter(functions.iter().map(|f| &*f.function))?;
    tracer.set_filter(op, filter)?;
    recount(agent, tracer);
    Ok(())
}

// ---------------------------------------------------------------------------
// fork.

extern "C" fn fork_prepare() {
    // SAFETY: released by fork_parent, or fork_child in the child.
    unsafe { AGENT.raw_lock() };
    server::fork_prepare(); // after AGENT: the locks' order
}

extern "C" fn fork_parent() {
    server::fork_parent();
    // SAFETY: locked by fork_prepare on this thread.
    unsafe { AGENT.raw_unlock() };
}

/// In the child (one thread, the one that forked, holding the lock): the
/// child writes `DIR/child-<pid>/` (the recorder follows it there when it
/// was recording), serves its own socket from its own agent thread.
extern "C" fn fork_child() {
    let pid = getpid();
    AGENT_PID.store(pid, Ordering::Relaxed);
    // SAFETY: fork_prepare locked it; this thread forked.
    let agent = unsafe { AGENT.get_locked() };
    let mut respawn = false;
    if let Some(a) = agent.as_mut() {
        a.dir = a.dir.join(format!("{}{pid}", record::format::CHILD_DIR_PREFIX));
        publish_dir(&a.dir);
        respawn = a.phase == Phase::Recording;
    }
    attach::fork_child(respawn); // before the parent's descriptors close
    server::after_fork_in_child();
    // SAFETY: held since fork_prepare.
    unsafe { AGENT.raw_unlock() };
    if respawn {
        server::spawn();
    }
}
