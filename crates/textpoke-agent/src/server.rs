//! The agent thread: serves the control socket, rescans loaded objects
//! when the loader's counters move, and stops the recorder when a stop
//! signal arrives or a program thread is in `_exit` (see the crate docs,
//! steps 3 and 6, and `interpose`).
//!
//! # Descriptors
//!
//! The listening socket and the wake pipe are moved above the descriptor
//! numbers programs use (`F_DUPFD_CLOEXEC` from 900, or half the limit),
//! and before every use their identity (device and inode, saved when they
//! were made) is checked with `fstat`: a program that closes every
//! descriptor and opens its own at the same number is never read from or
//! written to by the agent. Once a descriptor is no longer the agent's,
//! the agent forgets it without closing it.

use crate::{as_agent, fail, getpid, note_once, refresh, set_in_agent_thread, update_filter, Agent, Phase, AGENT};
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use textpoke::control::{self, Reply, Request};
use textpoke::record;
use textpoke::trace::Tracer;

/// How often the agent thread wakes without a reason.
const TICK_MS: i32 = 50;

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

/// Every descriptor the agent made in this process (fd, device, inode;
/// fd -1: free), for a forked child to close the parent's.
static OWN_FDS: [[AtomicU64; 3]; 3] =
    [const { [const { AtomicU64::new(u64::MAX) }, const { AtomicU64::new(0) }, const { AtomicU64::new(0) }] }; 3];

fn remember(fd: &Fd) {
    for slot in &OWN_FDS {
        if slot[0].compare_exchange(u64::MAX, fd.fd as u64, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            slot[1].store(fd.id.0, Ordering::Relaxed);
            slot[2].store(fd.id.1, Ordering::Relaxed);
            return;
        }
    }
}

/// Closes the descriptors the agent made before a fork (in the child).
fn close_inherited() {
    for slot in &OWN_FDS {
        let fd = slot[0].swap(u64::MAX, Ordering::AcqRel);
        if fd != u64::MAX {
            let fd = Fd { fd: fd as RawFd, id: (slot[1].load(Ordering::Relaxed), slot[2].load(Ordering::Relaxed)) };
            fd.close();
        }
    }
}

/// The device and inode of `fd`, if open.
fn identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: fstat writes one struct stat; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer; fstat is async-signal-safe.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// A descriptor of the agent's, with the identity it had when made.
struct Fd {
    fd: RawFd,
    id: (u64, u64),
}

impl Fd {
    /// Moves `fd` to a high number (close-on-exec) and records its identity.
    fn adopt(fd: OwnedFd) -> Option<Fd> {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        let floor = (lim.rlim_cur / 2).clamp(10, 900) as RawFd;
        // SAFETY: duplicating a descriptor we own.
        let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
        let fd = if high >= 0 { high } else { fd.into_raw_fd() }; // the original closes on drop
        let fd = Fd { fd, id: identity(fd)? };
        remember(&fd);
        Some(fd)
    }

    /// Still ours?
    fn ours(&self) -> bool {
        identity(self.fd) == Some(self.id)
    }

    /// Closes it if it is still ours.
    fn close(self) {
        for slot in &OWN_FDS {
            let _ = slot[0].compare_exchange(self.fd as u64, u64::MAX, Ordering::AcqRel, Ordering::Relaxed);
        }
        if self.ours() {
            // SAFETY: the descriptor is ours (checked just now).
            unsafe { libc::close(self.fd) };
        }
    }
}

struct Listener {
    fd: Fd,
}

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

fn make_wake_pipe() -> Option<Fd> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let r = Fd::adopt(r)?;
    let w = Fd::adopt(w)?;
    WAKE_DEV.store(w.id.0, Ordering::Relaxed);
    WAKE_INO.store(w.id.1, Ordering::Relaxed);
    WAKE_FD.store(w.fd, Ordering::Release);
    Some(r)
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
    let me = getpid();
    let mut wake_rd = make_wake_pipe();
    let mut listener: Option<Listener> = None;
    let mut socket_failed = false;
    let mut watch_until: Option<std::time::Instant> = None;
    while THREAD_PID.load(Ordering::Acquire) == me {
        if REBIND.swap(false, Ordering::AcqRel) {
            if let Some(l) = listener.take() {
                l.fd.close();
            }
        }
        // The lock is taken only for work: binding (once), a stop signal, a
        // request on the socket, a rescan. A tick with nothing to do reads
        // atomics only, so it never waits for (or delays) a program thread
        // in the dlclose wrapper or a fork.
        if listener.is_none() && !socket_failed && crate::left_idle() {
            match bind() {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    socket_failed = true;
                    note_once(&format!("no control socket ({e}); textpoke ctl cannot reach this process"));
                }
            }
        }
        let mut fds = Vec::with_capacity(2);
        if let Some(w) = wake_rd.as_ref().filter(|w| w.ours()) {
            fds.push(libc::pollfd { fd: w.fd, events: libc::POLLIN, revents: 0 });
        }
        if let Some(l) = listener.as_ref().filter(|l| l.fd.ours()) {
            fds.push(libc::pollfd { fd: l.fd.fd, events: libc::POLLIN, revents: 0 });
        }
        // No wait when an `_exit` already asked: in a forked child it may
        // have asked before this thread made its wake pipe (nobody to
        // wake), and waited a whole tick for nothing (50 ms per child).
        let timeout = if EXIT_STOP.load(Ordering::Acquire) == EXIT_ASKED {
            0
        } else if watch_until.is_some_and(|t| std::time::Instant::now() < t) {
            1
        } else {
            TICK_MS
        };
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if EXIT_STOP.load(Ordering::Acquire) == EXIT_ASKED {
            stop_for_exit_on_agent_thread();
        }
        let sig = PENDING_SIGNAL.swap(0, Ordering::AcqRel);
        if sig != 0 {
            stop_and_reraise(sig);
        }
        if let Some(w) = wake_rd.as_ref() {
            if w.ours() {
                let mut buf = [0u8; 64];
                // SAFETY: reading into a local buffer from our own pipe.
                while unsafe { libc::read(w.fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            } else {
                wake_rd = None;
                WAKE_FD.store(-1, Ordering::Release);
            }
        }
        if let Some(l) = listener.as_ref() {
            if !l.fd.ours() {
                listener = None; // the program closed it: no more control
            } else if fds.iter().any(|p| p.fd == l.fd.fd && p.revents & libc::POLLIN != 0) {
                accept_one(l);
            }
        }
        if NUDGED.swap(false, Ordering::AcqRel) {
            watch_until = Some(std::time::Instant::now() + DLOPEN_WATCH);
        }
        if counters_moved() {
            watch_until = None;
            wait_for_loader();
            if let Some(a) = AGENT.lock().as_mut() {
                refresh(a); // notes the counters first
            }
        }
    }
}

/// Creates `<dir>/<pid>.sock` (0600, in a 0700 directory).
fn bind() -> Result<Listener, String> {
    let dir = AGENT.lock().as_ref().map(|a| a.config.socket_dir.clone()).ok_or("agent not loaded")?;
    control::prepare_private_dir(&dir).map_err(|e| e.to_string())?;
    let path = control::socket_path(&dir, getpid());
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
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
    Ok(Listener { fd })
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
    close_inherited();
}

fn accept_one(l: &Listener) {
    // SAFETY: accept4 on our listening socket; no address wanted.
    let fd = unsafe { libc::accept4(l.fd.fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: a new descriptor owned here.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if !peer_allowed(&stream) {
        let _ = send(&stream, &Reply::error("refused: you are not this process's user").to_text());
        return;
    }
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        match reader.by_ref().take(4096).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match Request::parse(&line) {
            Ok(req) => handle(req),
            Err(e) => Reply::error(e.to_string()),
        };
        if send(&stream, &reply.to_text()).is_err() {
            return;
        }
    }
}

fn peer_allowed(s: &UnixStream) -> bool {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one struct ucred of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: no preconditions.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == me || cred.uid == 0)
}

/// Writes all of `text` without raising SIGPIPE in the program.
fn send(s: &UnixStream, text: &str) -> std::io::Result<()> {
    let mut buf = text.as_bytes();
    while !buf.is_empty() {
        // SAFETY: sending from a valid buffer on our connected socket.
        let n = unsafe { libc::send(s.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
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
    use std::time::Instant;

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
