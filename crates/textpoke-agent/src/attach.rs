//! The agent loaded into a running program (`textpoke record -p PID`,
//! issue #11): the session with `textpoke record -p` over a socket, from
//! attach to detach, and again at the next attach.
//!
//! # Preloaded or injected
//!
//! The constructor (an `.init_array` entry) runs in both cases, but only a
//! preloaded agent may start anything there: it runs before `main`, alone.
//! An injected one runs inside `dlopen`, on a thread of the injector's,
//! with the loader's lock held and the program's threads running; it must
//! start nothing, read no environment and change none. So the constructor
//! asks [`loaded_at_start`]: the agent is preloaded iff an `LD_PRELOAD`
//! entry names this object (the same device and inode as the file
//! `dladdr` reports for it), or it is linked into the program itself (the
//! crate's own tests); otherwise it only notes the mode. (An object listed
//! in `/etc/ld.so.preload` counts as injected: no textpoke puts it there.)
//!
//! # The session
//!
//! `textpoke record -p` injects the agent with `textpoke_inject`, by path:
//! a second attach `dlopen`s the same file, which returns the object
//! loaded the first time, and its entry [`textpoke_agent_attach`] runs
//! again in the same image. The entry gets one end of a socketpair (the
//! CLI holds the other) and serves it on the loader's thread, which the
//! injector made for it; when the entry returns the thread exits.
//!
//! 1. The CLI sends the settings, an [`AgentConfig`] message (never the
//!    environment: it is the program's). (`textpoke patch` sends
//!    `textpoke_control::PATCH_SESSION` instead: a live-patching session,
//!    see [`patch_session`]; what follows is a recording session's.)
//! 2. The agent starts as a preloaded one does at load (step 2 of the
//!    crate docs): finds the sites, starts the recorder in `config.dir` (a
//!    path in the target's mount namespace), registers the recording op,
//!    starts the agent thread, which makes the control socket (so that
//!    `textpoke ctl PID` works) and follows `dlopen`. No handler is
//!    installed for `SIGINT`, `SIGTERM`, `SIGHUP` (the CLI handles Ctrl-C)
//!    nor for the fatal signals (the program's `sigaction` calls are not
//!    wrapped, see below), and no alternate signal stack is given to any
//!    thread: the program's dispositions and stacks stay its own.
//! 3. It answers with a [`Reply`]: `ok` and the fields `functions`,
//!    `traced`, `sites`, `inline`, `dir`, `socket`, `live-ns` (the
//!    `CLOCK_MONOTONIC` time at which the sites were live), `scan-us` and
//!    `start-us` (finding the sites; starting the recorder, patching and
//!    starting the agent thread), `left-out` (how many functions the
//!    filters match but the tracer left untraced: gcc pads whose mirror
//!    cannot be placed, see below) with one `left-out-why` line per cause
//!    (`NAME, NAME... (and N more): why`, at most [`LEFT_OUT_SHOWN`] names),
//!    or `error TEXT` (after undoing what it started).
//! 4. It waits for `detach` (or for the end of the socket: the CLI died),
//!    then detaches ([`detach`]): the op is unregistered (every site gets
//!    its original bytes back, by the breakpoint protocol), the recorder
//!    stopped (the trace's `meta.json` says complete), the agent thread
//!    ended and joined, the socket file removed, the retired trampolines
//!    freed after their grace period and the tracer's reclaimer thread
//!    stopped and joined (the next attach starts it again), and the
//!    `SIGTRAP` disposition given back to the program once no trap can be
//!    pending (see below).
//! 5. It answers with a [`Reply`]: `ok` and the trace's `calls`,
//!    `events`, `dropped`, `threads`, `complete`, `sites-changed` (sites
//!    that do not hold the bytes they had before the first attach: none,
//!    unless some code changed them meanwhile), `unpatch-us`,
//!    `detach-us`, `rendezvous-signal` (the signal, when its handler was
//!    installed during the session and stays), `sigtrap`
//!    (`restored`, `untouched`, or why it was kept), and one `warning`
//!    line per message the agent would have printed; then closes.
//!
//! Messages the agent prints on the program's stderr when preloaded are
//! sent in the replies instead while a session runs ([`divert`]): the
//! program's stderr is not textpoke's to write to.
//!
//! A child the program forks during a session records into
//! `DIR/child-<pid>/` (the recorder follows it) and keeps a duplicate of
//! the session socket; when the CLI closes its end (after the parent's
//! detach, or because it died), the child's agent thread ends tracing in
//! the child the same way (see [`fork_child`]). Grandchildren do not
//! watch: they record until they exit.
//!
//! One session at a time: an entry called while one runs (a concurrent
//! `textpoke record -p`) answers `error` at once, as does one in a
//! preloaded agent (`textpoke record` owns that process).
//!
//! # What an injected agent does not do
//!
//! A `dlopen`ed object (`RTLD_LOCAL`) interposes nothing: the program's
//! calls to `execve`, `_exit`, `dlopen`, `sigaction` reach the C library
//! as before. So there is no flush at `_exit` nor on a crash (the trace
//! of a program that dies so while attached is incomplete, which the
//! trace says); `exit` and a return from `main` still flush it (`atexit`).
//! `dlopen` is followed by the agent thread's 50 ms poll of the loader's
//! counters.
//!
//! # SIGTRAP
//!
//! The breakpoint protocol installs the engine's `SIGTRAP` handler (at the
//! first change of a site), chaining to the program's disposition. At
//! detach, once the last trap byte is gone, a trap taken before may still
//! be on its way to the handler: a thread that executed an `int3` has the
//! signal queued until it next returns to user mode, and may be
//! descheduled in between. Giving the program its disposition back then
//! (`SIG_DFL`: a core dump) would kill it. So the disposition is restored
//! only after every other thread was seen, since the last trap byte was
//! removed, with no `SIGTRAP` pending (`SigPnd`) and one of: asleep in the
//! kernel (`S` or `D`: to get there it ran user code, which a queued signal
//! precedes), switched out since the first look (it ran after the trap
//! bytes were gone: a trap it took before was queued within nanoseconds
//! of running again, and shows in `SigPnd` until it is delivered), or
//! running on a CPU without any switch between two looks (`schedstat`'s
//! run time grew, the switch counts did not). The one trap this cannot
//! see is one whose thread was switched out between its `int3` and the
//! kernel queueing the signal (a few instructions), ran again after our
//! first look, and was switched out again before those instructions. A thread
//! not seen so within [`TRAP_QUIESCENCE`] keeps the handler installed (it
//! chains every trap that is not textpoke's to the program's disposition),
//! and the summary says so. The next attach installs the handler again
//! (`reinstall_trap_handler`) before it changes a site.
//!
//! # gcc's pads
//!
//! A pad of five one-byte NOPs (`-fpatchable-function-entry=5`) is traced
//! by its first byte alone ([`PadMode::OneByteOnly`]: `90` becomes a jump
//! to the site's mirror, 1.74 GiB below, and back; see the engine's
//! `trace::mirror`): no thread is stopped or signalled, and detach gives
//! every pad its exact bytes back. A pad whose mirror cannot be placed (a
//! program linked at a fixed address, not position-independent; another
//! mapping where the mirror must go) is left untraced, and the start
//! reply names it (`left-out-why`): making it one instruction would take
//! the stop-machine strategy, whose signal interrupts the program's
//! waits. (A function traced through several sites is named once per
//! cause.)
//!
//! The rendezvous signal's handler (installed only when a batch parks
//! threads, which an attached session never does) cannot be given back:
//! the engine installs it once per process. The summary names it when it
//! is there.

use crate::fds::Fd;
use crate::rules::Rules;
use crate::{as_agent, getpid, publish_dir, set_in_agent_thread, Agent, Phase, AGENT, AGENT_PID, ENDED, LOADED};
use std::ffi::c_int;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use textpoke::clock::monotonic_ns;
use textpoke::trace::{PadMode, Tracer};
use textpoke_control::{AgentConfig, Reply, Request, SessionStart};
use textpoke_record as record;

/// How long detach waits for every thread to be past any trap before it
/// gives `SIGTRAP` back to the program (see the module docs).
pub(crate) const TRAP_QUIESCENCE: Duration = Duration::from_millis(300);
/// How long the start waits for the agent thread's control socket.
const SOCKET_WAIT: Duration = Duration::from_secs(2);
/// How long detach waits for retired trampolines' grace period.
const RECLAIM_PATIENCE: Duration = Duration::from_millis(200);
/// Why recording stopped at a detach.
const DETACH_WHY: &str = "detached";
/// How many functions left out the start reply names per cause.
const LEFT_OUT_SHOWN: usize = 8;

const MODE_UNKNOWN: u8 = 0;
const MODE_PRELOADED: u8 = 1;
const MODE_INJECTED: u8 = 2;

/// How this image was loaded, set by the constructor.
static MODE: AtomicU8 = AtomicU8::new(MODE_UNKNOWN);

/// A session runs (one at a time).
static SESSION: AtomicBool = AtomicBool::new(false);

/// The running session's socket (-1: none), for a forked child to watch.
static SESSION_FD: AtomicI32 = AtomicI32::new(-1);

/// The session socket's identity (device, inode), checked by a forked
/// child before it keeps its duplicate.
static SESSION_ID: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// In a child forked during a session: its duplicate of the session
/// socket, for its agent thread to watch (-1: none).
static INHERITED: AtomicI32 = AtomicI32::new(-1);

/// The messages of the running session (`Some` while one runs).
static MESSAGES: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// The engine's `SIGTRAP` handler, learned when it first appeared (0:
/// not yet): no engine function says where it is.
static ENGINE_TRAP: AtomicUsize = AtomicUsize::new(0);

/// The program's `SIGTRAP` disposition before the engine's handler took
/// it, for detach to give back.
static PROGRAM_TRAP: Mutex<Option<SigAction>> = Mutex::new(None);

/// Each site's bytes before any session changed it (address → its five
/// bytes), for detach to say which did not get them back.
static SITE_BYTES: Mutex<Option<std::collections::HashMap<usize, [u8; 5]>>> = Mutex::new(None);

/// The rendezvous signal's handler when the session started.
static RENDEZVOUS_BEFORE: AtomicUsize = AtomicUsize::new(0);

/// A `libc::sigaction` that may sit in a static.
#[derive(Clone, Copy)]
struct SigAction(libc::sigaction);

// SAFETY: plain data (a handler address, flags, a mask); the pointers in
// it are code addresses, never dereferenced as data.
unsafe impl Send for SigAction {}

// ---------------------------------------------------------------------------
// The mode.

/// Whether the agent was loaded with the program (preloaded, or linked in):
/// see the module docs. Called by the constructor.
pub(crate) fn loaded_at_start() -> bool {
    let here = loaded_at_start as *const () as usize;
    if in_main_program(here) {
        return true;
    }
    let Some(me) = object_identity(here) else { return false };
    // Read only: the environment is the program's.
    let Some(preload) = std::env::var_os("LD_PRELOAD") else { return false };
    let preload = preload.into_encoded_bytes();
    preload
        .split(|&b| b == b':' || b == b' ')
        .filter(|e| !e.is_empty())
        .any(|entry| std::fs::metadata(std::ffi::OsStr::from_bytes(entry)).is_ok_and(|m| (m.dev(), m.ino()) == me))
}

/// Notes the mode the constructor found.
pub(crate) fn note_mode(preloaded: bool) {
    MODE.store(if preloaded { MODE_PRELOADED } else { MODE_INJECTED }, Ordering::Release);
}

/// The agent was injected (`dlopen`ed into a running program).
pub(crate) fn injected() -> bool {
    MODE.load(Ordering::Acquire) == MODE_INJECTED
}

/// The device and inode of the object holding `addr` (`dladdr`).
fn object_identity(addr: usize) -> Option<(u64, u64)> {
    // SAFETY: Dl_info is plain data; dladdr fills it or returns 0.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer; `addr` is an address of this object.
    if unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr gives a NUL-terminated name owned by the loader.
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    std::fs::metadata(std::ffi::OsStr::from_bytes(name.to_bytes())).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `addr` lies in a loaded segment of the main program.
fn in_main_program(addr: usize) -> bool {
    struct Search {
        addr: usize,
        found: bool,
    }
    unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> c_int {
        // SAFETY: `data` is the `Search` passed below; `info` is valid
        // during the callback, its phdrs array has `dlpi_phnum` entries.
        unsafe {
            let s = &mut *data.cast::<Search>();
            let i = &*info;
            for k in 0..i.dlpi_phnum as usize {
                let ph = &*i.dlpi_phdr.add(k);
                let start = i.dlpi_addr as usize + ph.p_vaddr as usize;
                if ph.p_type == libc::PT_LOAD && (start..start + ph.p_memsz as usize).contains(&s.addr) {
                    s.found = true;
                }
            }
        }
        1 // the first object is the main program: stop there
    }
    let mut s = Search { addr, found: false };
    // SAFETY: a valid callback and the data it expects.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut s as *mut Search).cast()) };
    s.found
}

// ---------------------------------------------------------------------------
// Messages.

/// While a session runs: keeps `msg` for its next reply instead of printing
/// it on the program's stderr. Whether it was kept.
pub(crate) fn divert(msg: &str) -> bool {
    if !SESSION.load(Ordering::Acquire) {
        return false;
    }
    // try_lock: this may run while a panic unwinds through a holder.
    match MESSAGES.try_lock() {
        Ok(mut g) => match g.as_mut() {
            Some(v) => {
                if v.len() < 64 {
                    v.push(msg.to_owned());
                }
                true
            }
            None => false,
        },
        Err(_) => true, // dropped rather than written to the program's stderr
    }
}

fn take_messages() -> Vec<String> {
    MESSAGES.lock().unwrap_or_else(|e| e.into_inner()).as_mut().map(std::mem::take).unwrap_or_default()
}

fn with_warnings(mut r: Reply) -> Reply {
    for m in take_messages() {
        r = r.field("warning", m);
    }
    r
}

/// Marks the session as running; ends it when dropped.
struct SessionGuard;

impl SessionGuard {
    fn begin() -> Option<SessionGuard> {
        if SESSION.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return None;
        }
        *MESSAGES.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        Some(SessionGuard)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        *MESSAGES.lock().unwrap_or_else(|e| e.into_inner()) = None;
        SESSION.store(false, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------
// The connection.

/// The session socket: the agent's descriptor (moved high, checked before
/// every use, see `fds`).
struct Conn {
    fd: Fd,
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.fd.ours() {
            return Ok(0); // the program closed it: as if the CLI had gone
        }
        loop {
            // SAFETY: reading into a live buffer of its length.
            let n = unsafe { libc::recv(self.fd.raw(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Conn {
    /// Sends `reply`; false if the CLI is gone.
    fn send(&self, reply: &Reply) -> bool {
        let text = reply.to_text();
        let mut rest = text.as_bytes();
        while !rest.is_empty() {
            if !self.fd.ours() {
                return false;
            }
            // SAFETY: sending from a live buffer; MSG_NOSIGNAL: a CLI gone
            // is an error here, not a SIGPIPE for the program.
            let n = unsafe { libc::send(self.fd.raw(), rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return false;
            }
            rest = &rest[n as usize..];
        }
        true
    }
}

// ---------------------------------------------------------------------------
// The entry.

/// The injected agent's entry (see the module docs): serves the session on
/// `fd`, one end of a socketpair, which it owns; returns when the session
/// is over (the calling thread then exits).
#[no_mangle]
pub extern "C" fn textpoke_agent_attach(fd: c_int) {
    if fd < 0 {
        return;
    }
    // SAFETY: the injector's loader hands the descriptor over to us.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if as_agent(move || serve(owned)).is_none() {
        // A panic (caught: the socket closed while unwinding, so the CLI
        // says the agent failed): leave nothing running.
        as_agent(|| {
            let _ = detach();
        });
    }
}

fn serve(owned: OwnedFd) {
    set_in_agent_thread();
    name_thread();
    set_thread_mask();
    let Some(fd) = Fd::adopt(owned) else { return };
    let conn = Conn { fd };
    let mut reader = BufReader::new(&conn);
    match SessionStart::read(&mut reader) {
        Ok(SessionStart::Record(config)) => record_session(&conn, reader, config),
        Ok(SessionStart::Patch) => {
            // Served from a thread of our own: a live-patch check of the
            // thread answering (it is running then) must unwind its stack
            // reliably, which this thread's, made by the injector, does
            // not. This one waits, blocked, until the session ends.
            let conn = &conn;
            std::thread::scope(|s| {
                let served = std::thread::Builder::new()
                    .name("textpoke-patch".into())
                    .spawn_scoped(s, move || as_agent(|| patch_session(conn, reader)));
                if served.is_err() {
                    conn.send(&Reply::error("cannot start the patch session's thread"));
                }
            });
        }
        Err(e) => {
            conn.send(&Reply::error(format!("bad first message from textpoke: {e}")));
        }
    }
}

/// A `textpoke patch` session (see `patch`): answers `patch-*` requests
/// until `detach` or the end of the socket. It records nothing, makes no
/// control socket and installs no signal handler of its own (the engine's
/// `SIGTRAP` handler comes with the first site change, as for any
/// change, and stays: it passes every trap that is not textpoke's to the
/// program's disposition). It runs beside a recording session, and in a
/// preloaded agent too.
fn patch_session(conn: &Conn, mut reader: BufReader<&Conn>) {
    set_in_agent_thread();
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte past the limit: enough to tell a line too long.
        let limit = (textpoke_control::MAX_REQUEST_LINE + 2) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return, // the CLI is gone
            Ok(_) => {}
        }
        if line.strip_suffix(b"\n").unwrap_or(&line) == b"detach" {
            return;
        }
        let too_long = !line.ends_with(b"\n");
        let reply = match Request::parse_bytes(&line) {
            Ok(Request::Patch(verb)) if !too_long => crate::patch::handle(verb),
            Ok(_) if !too_long => Reply::error("a patch session serves only the patch-* requests"),
            Ok(_) => Reply::error("the request ended without its newline"),
            Err(e) => Reply::error(e.to_string()),
        };
        if !conn.send(&reply) || too_long {
            return; // the rest cannot be read as requests
        }
    }
}

/// A `textpoke record -p` session (module docs, "The session").
fn record_session(conn: &Conn, mut reader: BufReader<&Conn>, config: AgentConfig) {
    if !injected() {
        conn.send(&Reply::error(format!(
            "process {} runs under `textpoke record` (the agent was preloaded): use `textpoke ctl {}`",
            getpid(),
            getpid()
        )));
        return;
    }
    let Some(_session) = SessionGuard::begin() else {
        conn.send(&Reply::error(format!(
            "process {} is being recorded by textpoke: another `textpoke record -p` is attached",
            getpid()
        )));
        return;
    };
    SESSION_ID[0].store(conn.fd.id().0, Ordering::Relaxed);
    SESSION_ID[1].store(conn.fd.id().1, Ordering::Relaxed);
    // Release pairs with `fork_child`'s Acquire: the identity is set.
    SESSION_FD.store(conn.fd.raw(), Ordering::Release);
    let _published = Published;
    let started = match start(config) {
        Ok(s) => s,
        Err(why) => {
            let _ = detach();
            conn.send(&with_warnings(Reply::error(why)));
            return;
        }
    };
    if conn.send(&with_warnings(started)) {
        wait_for_detach(&mut reader);
    }
    let summary = detach();
    conn.send(&with_warnings(summary));
}

/// Clears [`SESSION_FD`] when the session ends (before its socket closes).
struct Published;

impl Drop for Published {
    fn drop(&mut self) {
        SESSION_FD.store(-1, Ordering::Release);
    }
}

/// Reads requests until `detach` or the end of the socket.
fn wait_for_detach(reader: &mut BufReader<&Conn>) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return, // the CLI is gone: detach
            Ok(_) if line.trim_end() == "detach" => return,
            Ok(_) => {} // nothing else is asked on this socket
        }
    }
}

/// `textpoke-attach`, so that the thread is told apart from the program's.
fn name_thread() {
    // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"textpoke-attach".as_ptr()) };
}

/// Every signal blocked but the synchronous ones, the CPU-time ones and
/// textpoke's rendezvous signal, as on the recorder's writer
/// (`service_thread_mask`): a signal sent to the process goes to a thread
/// of the program's, never to this one, nor to the threads it starts (the
/// agent thread, the writer, the reclaimer, the live-patch thread), which
/// inherit the mask; a CPU-time signal (`SIGPROF`...) goes to the thread
/// that used the time, this one included, rather than to a program thread
/// sleeping in `nanosleep` (DESIGN.md rule 9). (The injector's loader left
/// every signal but glibc's two and the CPU-time ones blocked, `SIGTRAP`
/// and `SIGSEGV` included.)
fn set_thread_mask() {
    let set = textpoke_sys::signals::service_thread_mask(textpoke::sync::rendezvous_signal());
    textpoke_sys::signals::set_mask(libc::SIG_SETMASK, &set);
}

// ---------------------------------------------------------------------------
// fork.

/// In a child forked during a session (one thread, in the fork handler,
/// before the parent's descriptors are closed): a child that records
/// keeps a duplicate of the session socket, whose end (the CLI closing it
/// after the parent's detach, or dying) its agent thread sees and then
/// ends tracing in the child as a detach does (see
/// [`inherited_session_ended`]). A child that does not record is no part
/// of the session. Async-signal-safe (atomics, `fcntl`).
pub(crate) fn fork_child(recording: bool) {
    let fd = SESSION_FD.swap(-1, Ordering::AcqRel);
    let id = (SESSION_ID[0].load(Ordering::Relaxed), SESSION_ID[1].load(Ordering::Relaxed));
    // The session's thread may have closed it while the process forked
    // (memory and descriptors are copied one after the other): the
    // descriptor must still be the session's.
    if fd >= 0 && recording && crate::fds::identity(fd) == Some(id) {
        // SAFETY: duplicating a descriptor of this (child) process.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, crate::fds::high_floor()) };
        INHERITED.store(high, Ordering::Release);
    } else {
        SESSION.store(false, Ordering::Release);
    }
}

/// The inherited session socket, for this child's agent thread (once).
pub(crate) fn take_inherited() -> Option<Fd> {
    let fd = INHERITED.swap(-1, Ordering::AcqRel);
    // SAFETY: the duplicate made by `fork_child`, owned by nobody else.
    (fd >= 0).then(|| Fd::adopt(unsafe { OwnedFd::from_raw_fd(fd) })).flatten()
}

/// The session a forked child inherited is over: tracing ends in the
/// child (its sites unpatched, its trace finished), its agent thread
/// stops, its socket file goes. Called on that agent thread.
pub(crate) fn inherited_session_ended() {
    crate::end_tracing(DETACH_WHY);
    *MESSAGES.lock().unwrap_or_else(|e| e.into_inner()) = None;
    SESSION.store(false, Ordering::Release);
    crate::server::stop(); // on the agent thread: asks its loop to end
    crate::server::socket::remove_socket();
}

// ---------------------------------------------------------------------------
// Start.

/// Once per process image: fork handlers, the pid.
fn prepare_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: three `extern "C"` handlers without arguments.
        unsafe { libc::pthread_atfork(Some(crate::fork_prepare), Some(crate::fork_parent), Some(crate::fork_child)) };
    });
    AGENT_PID.store(getpid(), Ordering::Relaxed);
    LOADED.store(true, Ordering::Release);
}

/// Step 2 of the module docs: the reply to send, or why it failed.
fn start(config: AgentConfig) -> Result<Reply, String> {
    prepare_process();
    let dir = match &config.dir {
        Some(d) if d.is_absolute() => d.clone(),
        _ => return Err("textpoke record -p sent no absolute trace directory".into()),
    };
    let rules = Rules::new(&config.include, &config.exclude).map_err(|e| e.to_string())?;
    let socket_dir = config.socket_dir.clone().unwrap_or_else(textpoke_control::default_socket_dir);
    publish_dir(&dir);
    crate::rearm();
    prepare_sigtrap();
    RENDEZVOUS_BEFORE.store(rendezvous_handler(), Ordering::Release);
    let mut g = AGENT.lock();
    *g = Some(Agent {
        config,
        socket_dir,
        rules,
        dir: dir.clone(),
        phase: Phase::Idle,
        recorder: None,
        op: None,
        functions: 0,
        traced: 0,
    });
    let agent = g.as_mut().expect("just set");
    crate::server::loader::note_counters();
    let t_scan = Instant::now();
    let tracer = scan_sites()?;
    let scan = t_scan.elapsed();
    if tracer.functions().is_empty() {
        return Err(format!("process {} has no patchable function entries in its program or libraries", getpid()));
    }
    note_site_bytes(tracer);
    // gcc's pads by their first byte, or not at all: no thread of the
    // program may get a signal (see the module docs).
    tracer.set_pad_mode(PadMode::OneByteOnly);
    let t_start = Instant::now();
    if let Err(e) = crate::try_start(agent, tracer) {
        crate::fail(agent, &e.to_string());
    }
    let started = t_start.elapsed();
    if agent.phase != Phase::Recording {
        let why = take_messages().join("; ");
        return Err(if why.is_empty() { format!("the agent did not start ({})", agent.phase.name()) } else { why });
    }
    let live_ns = monotonic_ns();
    note_engine_trap();
    let (functions, traced) = (agent.functions, agent.traced);
    drop(g);
    let (sites, inline) = crate::server::inline_sites();
    let socket = wait_for_socket();
    let mut r = Reply::ok()
        .field("pid", getpid())
        .field("functions", functions)
        .field("traced", traced)
        .field("sites", sites)
        .field("inline", inline)
        .field("dir", dir.display())
        .field("live-ns", live_ns)
        .field("scan-us", scan.as_micros())
        .field("start-us", started.as_micros());
    if let Some(s) = socket {
        r = r.field("socket", s.display());
    }
    Ok(with_left_out(r, tracer))
}

/// The start reply with the functions the filters match that are left
/// untraced: `left-out` (how many), and per cause a `left-out-why` line,
/// `NAME, NAME... (and N more): why`.
fn with_left_out(mut r: Reply, tracer: &Tracer) -> Reply {
    let mut by_reason: std::collections::BTreeMap<String, std::collections::BTreeSet<std::sync::Arc<str>>> =
        Default::default();
    for p in tracer.refused_pads() {
        by_reason.entry(p.reason).or_default().insert(p.function);
    }
    let all: std::collections::BTreeSet<&std::sync::Arc<str>> = by_reason.values().flatten().collect();
    r = r.field("left-out", all.len());
    for (why, functions) in by_reason {
        let shown: Vec<&str> = functions.iter().take(LEFT_OUT_SHOWN).map(|f| &**f).collect();
        let more = match functions.len() - shown.len() {
            0 => String::new(),
            n => format!(" (and {n} more)"),
        };
        r = r.field("left-out-why", format!("{}{more}: {why}", shown.join(", ")));
    }
    r
}

/// The tracer with the sites of every object loaded now: found when it is
/// made (the first session), found again by the next ones (objects may
/// have been loaded or unloaded between two sessions).
fn scan_sites() -> Result<&'static Tracer, String> {
    static MADE: AtomicBool = AtomicBool::new(false);
    let tracer = Tracer::global();
    if MADE.swap(true, Ordering::AcqRel) {
        tracer.refresh().map_err(|e| format!("cannot find the sites of the objects loaded now: {e}"))?;
    }
    Ok(tracer)
}

/// The control socket, once the agent thread has made it.
fn wait_for_socket() -> Option<PathBuf> {
    let deadline = Instant::now() + SOCKET_WAIT;
    loop {
        if let Some(p) = crate::server::socket::bound_path() {
            return Some(p);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bytes at `addr`, a site of a loaded object (code is readable).
fn read5(addr: usize) -> [u8; 5] {
    // SAFETY: `addr` is a site the tracer found in a loaded object's code,
    // mapped readable; a volatile read, as other threads may change it.
    unsafe { std::ptr::read_volatile(addr as *const [u8; 5]) }
}

/// Notes the bytes of each site not seen by an earlier session, before
/// anything is patched: the bytes the program had (the sites of objects
/// unloaded since are forgotten).
fn note_site_bytes(tracer: &Tracer) {
    let mut g = SITE_BYTES.lock().unwrap_or_else(|e| e.into_inner());
    let known = g.get_or_insert_with(Default::default);
    let live: std::collections::HashSet<usize> = tracer.functions().iter().map(|f| f.addr).collect();
    known.retain(|a, _| live.contains(a));
    for a in live {
        known.entry(a).or_insert_with(|| read5(a));
    }
}

/// After the op is gone: how many sites (of objects still loaded) do not
/// hold the bytes the program had before the first session (gcc's pads
/// too: enabled by their first byte, they get their five NOPs back).
fn sites_changed(tracer: &Tracer) -> usize {
    let g = SITE_BYTES.lock().unwrap_or_else(|e| e.into_inner());
    let Some(known) = g.as_ref() else { return 0 };
    tracer.functions().iter().filter(|f| known.get(&f.addr).is_some_and(|b| read5(f.addr) != *b)).count()
}

// ---------------------------------------------------------------------------
// SIGTRAP.

/// The handler of textpoke's rendezvous signal now.
fn rendezvous_handler() -> usize {
    // SAFETY: querying only, into a zeroed struct.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(textpoke::sync::rendezvous_signal(), std::ptr::null(), &mut cur);
        cur.sa_sigaction
    }
}

fn current_sigtrap() -> libc::sigaction {
    // SAFETY: querying only, into a zeroed struct.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur);
        cur
    }
}

/// Before the first site changes: the program's disposition is noted;
/// when the engine's handler was given back at an earlier detach, it is
/// installed again (chaining to what the program has now), since the
/// engine still believes it installed.
fn prepare_sigtrap() {
    let engine = ENGINE_TRAP.load(Ordering::Acquire);
    let cur = current_sigtrap();
    if engine != 0 && cur.sa_sigaction == engine {
        return; // kept at the last detach: the program's is still noted
    }
    *PROGRAM_TRAP.lock().unwrap_or_else(|e| e.into_inner()) = Some(SigAction(cur));
    if engine != 0 {
        if let Err(e) = textpoke::text::reinstall_trap_handler() {
            crate::warn_once(&format!("cannot install the SIGTRAP handler again: {e}"));
        }
    }
}

/// After the first change: learns the engine's handler (the disposition
/// that replaced the program's).
fn note_engine_trap() {
    if ENGINE_TRAP.load(Ordering::Acquire) != 0 {
        return;
    }
    let program = PROGRAM_TRAP.lock().unwrap_or_else(|e| e.into_inner()).map(|a| a.0.sa_sigaction);
    let cur = current_sigtrap().sa_sigaction;
    if program.is_some_and(|p| p != cur) {
        ENGINE_TRAP.store(cur, Ordering::Release);
    }
}

/// What detach did with `SIGTRAP`, for the summary.
fn restore_sigtrap() -> String {
    let engine = ENGINE_TRAP.load(Ordering::Acquire);
    if engine == 0 {
        return "untouched".into();
    }
    if current_sigtrap().sa_sigaction != engine {
        return "the program's own (it installed a handler while attached)".into();
    }
    let Some(program) = *PROGRAM_TRAP.lock().unwrap_or_else(|e| e.into_inner()) else {
        return "kept: the program's disposition is unknown".into();
    };
    let busy = wait_trap_quiescence(TRAP_QUIESCENCE);
    if !busy.is_empty() {
        let shown: Vec<String> = busy.iter().take(8).map(|t| t.to_string()).collect();
        return format!(
            "kept: thread(s) {} never seen past a possible trap within {} ms (textpoke's handler stays; it \
             passes every other trap to the program's disposition)",
            shown.join(", "),
            TRAP_QUIESCENCE.as_millis()
        );
    }
    // SAFETY: setting back a disposition the kernel gave us.
    if unsafe { libc::sigaction(libc::SIGTRAP, &program.0, std::ptr::null_mut()) } != 0 {
        return format!("kept: sigaction failed: {}", std::io::Error::last_os_error());
    }
    "restored".into()
}

/// One look at a thread (see the module docs, "SIGTRAP").
#[derive(Clone, Copy)]
struct Look {
    state: u8,
    trap_pending: bool,
    switches: u64,
    runtime: Option<u64>,
}

fn look(tid: i32) -> Option<Look> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let state = field("State:")?.bytes().next()?;
    let pending = u64::from_str_radix(field("SigPnd:")?, 16).ok()?;
    let voluntary: u64 = field("voluntary_ctxt_switches:")?.parse().ok()?;
    let involuntary: u64 = field("nonvoluntary_ctxt_switches:")?.parse().ok()?;
    let runtime = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    Some(Look {
        state,
        trap_pending: pending & (1 << (libc::SIGTRAP - 1)) != 0,
        switches: voluntary + involuntary,
        runtime,
    })
}

/// Waits until every other thread was seen past any trap it may have
/// taken before the call (module docs); the threads not seen so within
/// `patience`.
fn wait_trap_quiescence(patience: Duration) -> Vec<i32> {
    let me = textpoke_sys::threads::gettid();
    let mut tids = Vec::new();
    let _ = textpoke_sys::threads::for_each_tid(|t| {
        if t != me {
            tids.push(t)
        }
    });
    // (tid, first look, previous look)
    let mut pending: Vec<(i32, Option<Look>, Option<Look>)> = tids.into_iter().map(|t| (t, None, None)).collect();
    let deadline = Instant::now() + patience;
    loop {
        pending.retain_mut(|(tid, first, prev)| {
            let Some(now) = look(*tid) else { return false }; // gone
            let done = !now.trap_pending
                && (matches!(now.state, b'S' | b'D' | b'Z' | b'X')
                    || first.is_some_and(|f| now.switches > f.switches)
                    || prev.is_some_and(|p| {
                        !p.trap_pending
                            && p.switches == now.switches
                            && matches!((p.runtime, now.runtime), (Some(a), Some(b)) if b > a)
                    }));
            first.get_or_insert(now);
            *prev = Some(now);
            !done
        });
        if pending.is_empty() || Instant::now() >= deadline {
            return pending.into_iter().map(|(t, _, _)| t).collect();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

// ---------------------------------------------------------------------------
// Detach.

/// Step 4 of the module docs; the summary to send.
fn detach() -> Reply {
    let t0 = Instant::now();
    ENDED.store(true, Ordering::Release); // no rescan restarts anything
    let mut summary = None;
    {
        let mut g = AGENT.lock();
        if let Some(agent) = g.as_mut() {
            summary = end_session(agent);
        }
    }
    let unpatched = t0.elapsed();
    let changed = sites_changed(Tracer::global());
    crate::server::stop();
    crate::server::socket::remove_socket();
    if let Err(e) = Tracer::global().reclaim(RECLAIM_PATIENCE) {
        crate::note_once(&format!("retired trampolines are left for the next attach: {e}"));
    }
    // No thread of textpoke's stays; the next change starts it again.
    if let Err(e) = Tracer::global().stop_reclaimer() {
        crate::note_once(&format!("the tracer's reclaimer thread keeps running: {e}"));
    }
    note_engine_trap(); // also when only the unregister put traps
    let sigtrap = restore_sigtrap();
    let rendezvous = rendezvous_handler() != RENDEZVOUS_BEFORE.load(Ordering::Acquire);
    let mut r = Reply::ok();
    if let Some(s) = summary {
        r = r
            .field("calls", s.calls)
            .field("events", s.events)
            .field("dropped", s.dropped)
            .field("threads", s.threads)
            .field("complete", s.complete);
    }
    if rendezvous {
        r = r.field("rendezvous-signal", textpoke::sync::rendezvous_signal());
    }
    r.field("sites-changed", changed)
        .field("unpatch-us", unpatched.as_micros())
        .field("detach-us", t0.elapsed().as_micros())
        .field("sigtrap", sigtrap)
}

/// Unregisters the op (every site back to its original bytes) and stops
/// the recorder; `agent.json` keeps the count of functions traced.
fn end_session(agent: &mut Agent) -> Option<record::TraceSummary> {
    if let Some(op) = agent.op.take() {
        if let Err(e) = Tracer::global().unregister(op) {
            crate::warn_once(&format!("detaching, but tracing cannot be turned off: {e}"));
        }
    }
    let mut summary = None;
    if agent.phase == Phase::Recording {
        agent.set_phase(Phase::Stopped(DETACH_WHY));
        crate::write_agent_json(agent);
        if let Some(r) = agent.recorder.take() {
            match r.stop() {
                Ok(s) => summary = Some(s),
                Err(e) => crate::warn_once(&format!("the final trace flush failed: {e}")),
            }
        }
    }
    agent.traced = 0;
    summary
}
