//! The agent thread: serves the control socket, rescans loaded objects
//! when the loader's counters move, stops the recorder when a stop signal
//! arrives or a program thread is in `_exit`, and stops tracing when
//! `textpoke record` is gone (see the crate docs, steps 3, 6 and 7,
//! `interpose`, `front`).
//!
//! # The loop
//!
//! One thread, one `poll` over everything it waits for: the wake pipe
//! (written by the stop-signal handler, the `_exit` wrapper and the
//! `dlopen` wrapper), the listening socket, the pidfd of `textpoke record`,
//! and every control connection (see `clients`). It never blocks anywhere
//! else, so a client that connects and says nothing, or half a line,
//! delays neither other clients nor a thread waiting in `_exit`. Each
//! round handles, in this order: an `_exit` waiting for the trace, a stop
//! signal, the end of `textpoke record`, the connections, a rescan of the
//! loaded objects. `poll` returns at least every tick (50 ms; every
//! millisecond for a while after a `dlopen`), at once when a connection
//! has a request buffered, and at the connections' deadlines.
//!
//! The descriptors it keeps are the agent's own, checked before every use
//! (see `fds`).
//!
//! # The socket file
//!
//! `<socket dir>/<pid>.sock`, made when the agent leaves the idle phase;
//! removed at exit, before an exec (made again if the exec fails), and by
//! the next agent to make its socket in the same directory if this process
//! died without removing it (see [`remove_stale_sockets`]).

use crate::clients::Clients;
use crate::fds::{close_inherited, identity, Fd};
use crate::front;
use crate::{as_agent, fail, getpid, note_once, refresh, set_in_agent_thread, update_filter, Agent, Phase, AGENT};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use textpoke::trace::Tracer;
use textpoke_control::{self as control, Reply, Request};
use textpoke_record as record;

/// How often the agent thread wakes without a reason.
const TICK_MS: i32 = 50;

/// How long the agent thread leaves the listener alone after accepting
/// failed for want of descriptors (the program is at its limit).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// After a `dlopen` starts, how long the agent thread looks every
/// millisecond for the object to appear.
const DLOPEN_WATCH: Duration = Duration::from_millis(250);

/// The pid whose agent thread runs (threads do not survive fork).
static THREAD_PID: AtomicI32 = AtomicI32::new(0);

/// The agent thread's tid (0 until it runs).
static THREAD_TID: AtomicI32 = AtomicI32::new(0);

/// A stop signal caught by [`on_stop_signal`], for the agent thread.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// `dlopen` was called: rescan soon.
static NUDGED: AtomicBool = AtomicBool::new(false);

/// The socket was removed (before an exec, which failed): make it again.
static REBIND: AtomicBool = AtomicBool::new(false);

/// Write end of the wake pipe and its identity, for signal handlers.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static WAKE_DEV: AtomicU64 = AtomicU64::new(0);
static WAKE_INO: AtomicU64 = AtomicU64::new(0);

/// Our socket file (a leaked C string) and the pid it belongs to, to
/// remove at exit and before exec without a lock.
static SOCKET_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static SOCKET_PID: AtomicI32 = AtomicI32::new(0);

/// Starts the agent thread of this process if it is not running.
pub(crate) fn spawn() {
    let pid = getpid();
    if THREAD_PID.swap(pid, Ordering::AcqRel) == pid {
        return;
    }
    let r = std::thread::Builder::new().name("textpoke-agent".into()).spawn(|| {
        as_agent(main_loop);
    });
    if r.is_err() {
        THREAD_PID.store(0, Ordering::Release);
        note_once("cannot start the agent thread: no control socket, libraries loaded later are not traced");
    }
}

/// Called by the `dlopen` wrapper: rescan soon (starting the agent thread
/// in a process that was idle).
pub(crate) fn nudge() {
    NUDGED.store(true, Ordering::Release);
    if THREAD_PID.load(Ordering::Acquire) == getpid() {
        wake();
    } else {
        spawn();
    }
}

/// Wakes the agent thread (async-signal-safe).
fn wake() {
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let id = (WAKE_DEV.load(Ordering::Relaxed), WAKE_INO.load(Ordering::Relaxed));
    if identity(fd) == Some(id) {
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(fd, b"w".as_ptr().cast(), 1) };
    }
}

fn block_async_signals() {
    // SAFETY: plain signal set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
            libc::SIGCHLD,
            libc::SIGPIPE,
            libc::SIGWINCH,
            libc::SIGIO,
            libc::SIGURG,
            libc::SIGPROF,
            libc::SIGVTALRM,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The wake pipe: the agent thread polls the read end; signal handlers
/// and wrappers write a byte to the write end (through [`WAKE_FD`]).
struct WakePipe {
    read: Fd,
    /// Kept so that it stays open (and is closed with the loop).
    _write: Fd,
}

impl WakePipe {
    fn new() -> Option<WakePipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return None;
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let read = Fd::adopt(r)?;
        let write = Fd::adopt(w)?;
        WAKE_DEV.store(write.id().0, Ordering::Relaxed);
        WAKE_INO.store(write.id().1, Ordering::Relaxed);
        WAKE_FD.store(write.raw(), Ordering::Release);
        Some(WakePipe { read, _write: write })
    }

    /// Empties the pipe; false if the program took the read end over.
    fn drain(&self) -> bool {
        if !self.read.ours() {
            return false;
        }
        let mut buf = [0u8; 64];
        // SAFETY: reading into a local buffer from our own pipe.
        while unsafe { libc::read(self.read.raw(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        true
    }
}

/// The loader's counters as of the last rescan (set just before it).
static SEEN_ADDS: AtomicU64 = AtomicU64::new(0);
static SEEN_SUBS: AtomicU64 = AtomicU64::new(0);

/// Notes the loader's counters before a rescan, so that the agent thread
/// rescans again when they move past them.
pub(crate) fn note_counters() {
    let (adds, subs) = dl_counters();
    SEEN_ADDS.store(adds, Ordering::Relaxed);
    SEEN_SUBS.store(subs, Ordering::Relaxed);
}

fn counters_moved() -> bool {
    dl_counters() != (SEEN_ADDS.load(Ordering::Relaxed), SEEN_SUBS.load(Ordering::Relaxed))
}

/// The loader's (objects added, objects removed) counters.
fn dl_counters() -> (u64, u64) {
    unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, size: usize, out: *mut libc::c_void) -> libc::c_int {
        let end = std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8;
        if size >= end {
            // SAFETY: the loader passes a valid info of `size` bytes, which
            // covers both counters; `out` is the pair passed below.
            unsafe { *(out as *mut (u64, u64)) = ((*info).dlpi_adds, (*info).dlpi_subs) };
        }
        1 // the first object is enough
    }
    let mut out = (0u64, 0u64);
    // SAFETY: the callback only writes `out`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut out as *mut (u64, u64)).cast()) };
    out
}

/// Waits until no `dlopen` or `dlclose` is in progress: the counters move
/// when an object joins the loader's list, before it is relocated and
/// initialised, all under the loader's lock, which a `dlopen` of the main
/// program (a no-op that loads nothing) takes and releases.
fn wait_for_loader() {
    // SAFETY: dlopen(NULL) returns the main program's handle, loading
    // nothing; it is closed at once.
    unsafe {
        let h = libc::dlopen(std::ptr::null(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if !h.is_null() {
            libc::dlclose(h);
        }
    }
}

fn main_loop() {
    set_in_agent_thread();
    THREAD_TID.store(gettid(), Ordering::Release);
    block_async_signals();
    let front = AGENT.lock().as_ref().and_then(|a| a.config.front);
    let mut state = LoopState {
        me: getpid(),
        wake: WakePipe::new(),
        listener: None,
        socket_failed: false,
        clients: Clients::default(),
        front: front.map(front::Watch::start),
        watch_until: None,
        accept_paused_until: None,
    };
    while THREAD_PID.load(Ordering::Acquire) == state.me {
        state.round();
    }
    WAKE_FD.store(-1, Ordering::Release); // the pipe closes with `state`
}

/// What the agent thread holds between rounds.
struct LoopState {
    me: i32,
    wake: Option<WakePipe>,
    listener: Option<Fd>,
    /// The socket could not be made: do not try again every tick.
    socket_failed: bool,
    clients: Clients,
    /// `textpoke record`, while it runs.
    front: Option<front::Watch>,
    /// Until when to look every millisecond for an object being loaded.
    watch_until: Option<Instant>,
    /// Until when not to poll the listener: accepting failed for want of
    /// descriptors (the connection waits in the backlog).
    accept_paused_until: Option<Instant>,
}

/// Appends `p` to `fds` if there is one; its index.
fn push_poll(fds: &mut Vec<libc::pollfd>, p: Option<libc::pollfd>) -> Option<usize> {
    let p = p?;
    fds.push(p);
    Some(fds.len() - 1)
}

fn poll_in(fd: &Fd) -> Option<libc::pollfd> {
    fd.ours().then_some(libc::pollfd { fd: fd.raw(), events: libc::POLLIN, revents: 0 })
}

impl LoopState {
    /// One round of the loop (see the module docs).
    fn round(&mut self) {
        self.make_socket();
        let mut fds = Vec::with_capacity(3 + self.clients.len());
        push_poll(&mut fds, self.wake.as_ref().and_then(|w| poll_in(&w.read)));
        let listening = self.accept_paused_until.is_none_or(|t| Instant::now() >= t);
        let listen_at = push_poll(&mut fds, self.listener.as_ref().filter(|_| listening).and_then(poll_in));
        let front_at = push_poll(&mut fds, self.front.as_ref().and_then(front::Watch::poll_fd));
        let clients_at = fds.len();
        self.clients.poll_fds(&mut fds);
        let timeout = self.timeout_ms();
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let revents = |at: Option<usize>| at.map_or(0, |i| fds[i].revents);
        // The urgent first: a program thread waits in `_exit`; a signal
        // is to kill the process.
        if EXIT_STOP.load(Ordering::Acquire) == EXIT_ASKED {
            stop_for_exit_on_agent_thread();
        }
        let sig = PENDING_SIGNAL.swap(0, Ordering::AcqRel);
        if sig != 0 {
            stop_and_reraise(sig);
        }
        if self.wake.as_ref().is_some_and(|w| !w.drain()) {
            self.wake = None; // the program took it over: no more waking
            WAKE_FD.store(-1, Ordering::Release);
        }
        if self.front.as_mut().is_some_and(|w| w.gone(revents(front_at))) {
            self.front = None;
            crate::front_ended();
        }
        self.clients.note_polled(&fds[clients_at..]);
        self.serve_clients(revents(listen_at));
        self.follow_loader();
    }

    /// Makes the socket once the agent left the idle phase (again after a
    /// failed exec removed it).
    fn make_socket(&mut self) {
        if REBIND.swap(false, Ordering::AcqRel) {
            self.listener = None;
        }
        // A tick with nothing to do reads atomics only: the lock is taken
        // for work (binding once, a request, a rescan, a stop), so that a
        // tick never waits for (or delays) a program thread in the dlclose
        // wrapper or a fork.
        if self.listener.is_some() || self.socket_failed || !crate::left_idle() {
            return;
        }
        match bind() {
            Ok(l) => self.listener = Some(l),
            Err(e) => {
                self.socket_failed = true;
                note_once(&format!("no control socket ({e}); textpoke ctl cannot reach this process"));
            }
        }
    }

    /// How long `poll` may wait, in milliseconds.
    fn timeout_ms(&self) -> i32 {
        // No wait when an `_exit` already asked: in a forked child it may
        // have asked before this thread made its wake pipe (nobody to
        // wake), and waited a whole tick for nothing (50 ms per child).
        if EXIT_STOP.load(Ordering::Acquire) == EXIT_ASKED {
            return 0;
        }
        let now = Instant::now();
        let tick = if self.watch_until.is_some_and(|t| now < t) { 1 } else { TICK_MS };
        match self.clients.timeout(now) {
            Some(d) => (d.as_nanos().div_ceil(1_000_000) as i32).min(tick),
            None => tick,
        }
    }

    /// Accepts new connections and serves every connection once.
    fn serve_clients(&mut self, listener_revents: i16) {
        let now = Instant::now();
        if let Some(l) = &self.listener {
            if !l.ours() {
                self.listener = None; // the program closed it: no more control
            } else if listener_revents & libc::POLLIN != 0 && !self.clients.accept(l, now) {
                self.accept_paused_until = Some(now + ACCEPT_PAUSE);
            }
        }
        if self.clients.len() > 0 {
            self.clients.serve(now, &mut handle);
        }
    }

    /// Rescans the loaded objects when the loader's counters moved; after
    /// a `dlopen` started, looks every millisecond for a while.
    fn follow_loader(&mut self) {
        if NUDGED.swap(false, Ordering::AcqRel) {
            self.watch_until = Some(Instant::now() + DLOPEN_WATCH);
        }
        if counters_moved() {
            self.watch_until = None;
            wait_for_loader();
            if let Some(a) = AGENT.lock().as_mut() {
                refresh(a); // notes the counters first
            }
        }
    }
}

/// Creates `<dir>/<pid>.sock` (0600, in a 0700 directory), after
/// removing the sockets that dead processes left there.
fn bind() -> Result<Fd, String> {
    let dir = AGENT.lock().as_ref().map(|a| a.socket_dir.clone()).ok_or("agent not loaded")?;
    control::prepare_private_dir(&dir).map_err(|e| e.to_string())?;
    remove_stale_sockets(&dir);
    let path = control::socket_path(&dir, getpid());
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if !m.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        let _ = std::fs::remove_file(&path); // stale: a process of an earlier pid
    }
    let l = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    control::restrict_socket(&path).map_err(|e| e.to_string())?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let fd = Fd::adopt(OwnedFd::from(l)).ok_or("cannot keep the socket")?;
    let c = CString::new(path.into_os_string().into_vec()).map_err(|e| e.to_string())?;
    SOCKET_PID.store(getpid(), Ordering::Release);
    SOCKET_PATH.store(c.into_raw(), Ordering::Release);
    register_unlink_at_exit();
    Ok(fd)
}

/// Removes from `dir` the sockets of processes that are gone: entries
/// named `<pid>.sock` (the pid written as the agent writes it) that are
/// sockets themselves (a symbolic link is never followed, nor removed),
/// owned by the effective uid, whose pid does not exist, and on which a
/// connection is refused. The last check keeps the socket of a live agent
/// whose pid this process cannot see (another pid namespace sharing the
/// directory); it also keeps a socket whose pid was reused by a process
/// that listens on it. The directory is private (0700, checked), so
/// nobody else can swap an entry between the checks and the removal.
pub(crate) fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let me = getpid();
    for entry in entries.flatten() {
        let Some(pid) = socket_pid(&entry.file_name()) else { continue };
        let path = entry.path();
        if pid != me && is_stale(&path, pid) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The pid of a socket file name `<pid>.sock`, written without sign or
/// leading zeros.
fn socket_pid(name: &OsStr) -> Option<i32> {
    let digits = name.as_bytes().strip_suffix(b".sock")?;
    let pid: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (pid > 0 && pid.to_string().as_bytes() == digits).then_some(pid)
}

fn is_stale(path: &Path, pid: i32) -> bool {
    let Ok(m) = std::fs::symlink_metadata(path) else { return false };
    // SAFETY: no preconditions.
    let uid = unsafe { libc::geteuid() };
    m.file_type().is_socket() && m.uid() == uid && !front::exists(pid) && connection_refused(path)
}

/// Whether connecting to the socket at `path` is refused (nobody listens).
/// The attempt does not block: a live listener with a full backlog counts
/// as listening.
fn connection_refused(path: &Path) -> bool {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return false;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: creates a socket; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new descriptor, owned here (closed on drop).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNREFUSED)
}

fn register_unlink_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn at_exit() {
        remove_socket();
    }
    ONCE.call_once(|| {
        // SAFETY: an `extern "C"` handler without arguments.
        unsafe { libc::atexit(at_exit) };
    });
}

/// Removes this process's socket file (exit, exec, `_exit`).
pub(crate) fn remove_socket() {
    if SOCKET_PID.load(Ordering::Acquire) != getpid() {
        return; // a vfork child: the socket is the parent's
    }
    let p = SOCKET_PATH.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !p.is_null() {
        // SAFETY: a NUL-terminated path made by `bind` (leaked, never freed).
        unsafe { libc::unlink(p) };
    }
}

/// An exec failed after [`remove_socket`]: make the socket again.
pub(crate) fn exec_failed() {
    REBIND.store(true, Ordering::Release);
}

/// In a forked child: the parent's descriptors and socket are not ours.
pub(crate) fn after_fork_in_child() {
    THREAD_PID.store(0, Ordering::Release);
    THREAD_TID.store(0, Ordering::Release);
    EXIT_STOP.store(EXIT_NONE, Ordering::Release); // a parent thread's _exit
    PENDING_SIGNAL.store(0, Ordering::Release);
    WAKE_FD.store(-1, Ordering::Release);
    SOCKET_PATH.store(std::ptr::null_mut(), Ordering::Release); // the parent's
    close_inherited(); // the parent's listener, wake pipe, pidfd, connections
}

fn handle(req: Request) -> Reply {
    let mut g = AGENT.lock();
    let Some(agent) = g.as_mut() else {
        return Reply::error("the agent is not loaded");
    };
    match req {
        Request::Status => status(agent),
        Request::Enable(glob) => change(agent, true, &glob),
        Request::Disable(glob) => change(agent, false, &glob),
    }
}

fn status(agent: &mut Agent) -> Reply {
    let meta_path = agent.dir.join(record::format::META_FILE);
    if agent.phase == Phase::Recording {
        let _ = record::flush_active(); // writes the metadata read below
    }
    let meta: Option<record::format::Meta> =
        std::fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let process = std::fs::read_to_string("/proc/self/comm").map(|s| s.trim_end().to_owned()).unwrap_or_default();
    let mode = if agent.config.count_only { "count" } else { "record" };
    let traced_sites = inline_sites();
    let mut r = Reply::ok()
        .field("pid", getpid())
        .field("process", process)
        .field("state", agent.phase.name())
        .field("mode", mode)
        .field("dir", agent.dir.display())
        .field("functions", agent.functions)
        .field("traced", agent.traced)
        .field("sites", traced_sites.0)
        .field("inline", traced_sites.1)
        .field("calls", meta.as_ref().map_or(0, |m| m.total_calls))
        .field("events", meta.as_ref().map_or(0, |m| m.total_events))
        .field("dropped", meta.as_ref().map_or(0, |m| m.total_dropped));
    for rule in agent.rules.iter() {
        r = r.field("rule", rule.text());
    }
    r
}

/// Sites traced now, and how many of them record in generated code (the
/// count and graph trampolines) rather than through a callback: fewer
/// than all means the cheap path is off for some (a body site, an agent
/// loaded with dynamic TLS).
fn inline_sites() -> (usize, usize) {
    use textpoke::trace::TrampolineKind;
    let functions = Tracer::global().functions();
    let traced = functions.iter().filter(|f| f.trampoline != TrampolineKind::None);
    let inline =
        |f: &&textpoke::trace::FunctionInfo| matches!(f.trampoline, TrampolineKind::Count | TrampolineKind::Graph);
    (traced.clone().count(), traced.filter(inline).count())
}

fn change(agent: &mut Agent, enable: bool, glob: &str) -> Reply {
    if agent.phase != Phase::Recording {
        return Reply::error(format!("not recording ({}): nothing to change", agent.phase.name()));
    }
    let rule = match crate::rules::Rule::new(enable, glob) {
        Ok(r) => r,
        Err(e) => return Reply::error(e.to_string()),
    };
    let names: std::collections::BTreeSet<String> =
        Tracer::global().functions().iter().map(|f| f.function.to_string()).collect();
    if !names.iter().any(|n| rule.matches(n)) {
        let mut r = Reply::error(format!("no traceable function matches {glob:?}"));
        for n in control::close_names(glob, names.iter().map(String::as_str), 5) {
            r = r.field("hint", n);
        }
        return r;
    }
    agent.rules.push(rule);
    if let Err(e) = update_filter(agent) {
        let msg = format!("cannot change what is traced: {e}");
        fail(agent, &msg);
        return Reply::error(msg);
    }
    Reply::ok().field("traced", agent.traced).field("functions", agent.functions)
}

// ---------------------------------------------------------------------------
// Stop signals.

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_stop_signal(sig: libc::c_int) {
    let running = THREAD_PID.load(Ordering::Acquire) == getpid() && WAKE_FD.load(Ordering::Acquire) >= 0;
    if running && PENDING_SIGNAL.compare_exchange(0, sig, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
        wake();
        return;
    }
    // No agent thread to flush, or a second signal while the first is being
    // handled (the user insists): behave as the default disposition now.
    reraise_default(sig);
}

/// Gives the default disposition back to `sig` (if the handler is still
/// ours) and raises it process-wide.
fn reraise_default(sig: libc::c_int) {
    // SAFETY: querying and setting a disposition with valid structs;
    // sigaction and kill are async-signal-safe.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old);
        if old.sa_sigaction == on_stop_signal as *const () as usize {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        libc::kill(libc::getpid(), sig);
    }
}

/// On `SIGINT`, `SIGTERM`, `SIGHUP` whose disposition is the default: a
/// handler that has the agent thread stop the recorder first.
pub(crate) fn install_stop_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in STOP_SIGNALS {
            // SAFETY: querying and installing dispositions with valid structs.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction != libc::SIG_DFL {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_stop_signal as *const () as usize;
                act.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    });
}

fn stop_and_reraise(sig: libc::c_int) {
    if let Some(a) = AGENT.lock().as_mut() {
        crate::stop_recording(a, "signal");
    }
    remove_socket();
    reraise_default(sig);
}

// ---------------------------------------------------------------------------
// _exit.

/// The `_exit` handshake (see `interpose`, "_exit"): a program thread in
/// `_exit` moves it from NONE to ASKED and wakes the agent thread, which
/// stops the recorder and moves it to DONE. It stays DONE: the recorder is
/// stopped for good, so a later `_exit` need not wait.
static EXIT_STOP: AtomicU32 = AtomicU32::new(EXIT_NONE);
const EXIT_NONE: u32 = 0;
const EXIT_ASKED: u32 = 1;
const EXIT_DONE: u32 = 2;

/// How long `_exit` waits for the agent thread to stop the recorder. The
/// stop waits up to 2 s for threads stuck in a record call, then writes
/// and `fsync`s every file; past this the agent thread is taken to be
/// blocked on a lock that the thread in `_exit` holds (a signal handler
/// that interrupted `malloc`), and the program is let go.
pub(crate) const EXIT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

fn gettid() -> i32 {
    // SAFETY: no preconditions; a plain system call.
    unsafe { libc::gettid() }
}

/// CLOCK_MONOTONIC in nanoseconds (`clock_gettime` is async-signal-safe).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Called by the `_exit` wrapper while recording: has the agent thread
/// stop the recorder and waits for it, at most [`EXIT_STOP_TIMEOUT`].
/// Whether the recorder was stopped.
///
/// Async-signal-safe (the caller may be a signal handler that interrupted
/// anything): atomics, `getpid`, `gettid`, `fstat` and `write` (in
/// [`wake`]), `clock_gettime`, `nanosleep`; no allocation, no lock, no
/// thread-local, nothing that can panic.
pub(crate) fn stop_for_exit() -> bool {
    if THREAD_PID.load(Ordering::Acquire) != getpid() {
        return false; // no agent thread in this process
    }
    if THREAD_TID.load(Ordering::Acquire) == gettid() {
        return false; // the agent thread itself: it cannot wait for itself
    }
    // Only the first caller asks; a second thread in `_exit` waits too.
    let _ = EXIT_STOP.compare_exchange(EXIT_NONE, EXIT_ASKED, Ordering::AcqRel, Ordering::Acquire);
    // A thread that has not made its wake pipe yet sees ASKED when it
    // enters its loop.
    wake();
    let deadline = monotonic_ns().saturating_add(EXIT_STOP_TIMEOUT.as_nanos() as u64);
    // Acquire pairs with the agent thread's release of DONE: the trace's
    // files are written before this thread ends the process.
    while EXIT_STOP.load(Ordering::Acquire) != EXIT_DONE {
        if monotonic_ns() >= deadline {
            return false;
        }
        let ms = libc::timespec { tv_sec: 0, tv_nsec: 1_000_000 };
        // SAFETY: a valid timespec; an early return (a signal) only
        // makes this loop look again.
        unsafe { libc::nanosleep(&ms, std::ptr::null_mut()) };
    }
    true
}

/// The agent thread's half of the handshake.
fn stop_for_exit_on_agent_thread() {
    if let Some(a) = AGENT.lock().as_mut() {
        crate::stop_recording(a, "_exit");
    }
    EXIT_STOP.store(EXIT_DONE, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Instant;

    /// The pid of a process that ran and was reaped.
    fn dead_pid() -> i32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id() as i32
    }

    /// A socket file at `path` on which nobody listens.
    fn dead_socket(path: &Path) {
        drop(UnixListener::bind(path).unwrap());
    }

    /// Only the sockets of dead pids on which nobody listens are removed.
    #[test]
    fn stale_sockets_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("textpoke-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = |pid: i32| dir.join(format!("{pid}.sock"));
        let stale = sock(dead_pid());
        dead_socket(&stale);
        // SAFETY: no preconditions.
        let alive = sock(unsafe { libc::getppid() });
        dead_socket(&alive);
        let listened = sock(dead_pid());
        let _listener = UnixListener::bind(&listened).unwrap();
        let file = sock(dead_pid());
        std::fs::write(&file, "x").unwrap();
        let elsewhere = dir.join("elsewhere");
        dead_socket(&elsewhere);
        let link = sock(dead_pid());
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let odd: Vec<PathBuf> = ["0001.sock", "+5.sock", "x.sock", ".sock"].iter().map(|n| dir.join(n)).collect();
        for p in &odd {
            dead_socket(p);
        }
        remove_stale_sockets(&dir);
        assert!(std::fs::symlink_metadata(&stale).is_err(), "the dead process's socket is removed");
        for kept in [&alive, &listened, &file, &elsewhere, &link].into_iter().chain(&odd) {
            assert!(std::fs::symlink_metadata(kept).is_ok(), "{} is kept", kept.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The agent thread of an idle agent (this test binary has no
    /// patchable functions: the constructor left the agent idle) ticks
    /// without taking the agent's lock, also while it watches for a
    /// `dlopen` after a nudge.
    #[test]
    fn idle_ticks_take_no_lock() {
        assert!(crate::LOADED.load(Ordering::Acquire), "the constructor ran");
        assert_eq!(AGENT.lock().as_ref().map(|a| a.phase), Some(Phase::Idle));
        spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while WAKE_FD.load(Ordering::Acquire) < 0 {
            assert!(Instant::now() < deadline, "the agent thread did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        let ticks = Duration::from_millis(6 * TICK_MS as u64);
        let before = AGENT.times_taken();
        std::thread::sleep(ticks);
        nudge(); // a dlopen that loads nothing: 250 ms of 1 ms ticks
        std::thread::sleep(DLOPEN_WATCH + ticks);
        assert_eq!(AGENT.times_taken(), before, "the agent thread took the lock with nothing to do");
        // Ends the thread (the loop runs while THREAD_PID is this pid).
        THREAD_PID.store(0, Ordering::Release);
        wake();
    }
}
