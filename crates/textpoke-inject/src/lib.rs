//! Loading a shared object into a running multithreaded process, without
//! the process noticing (x86-64 Linux, glibc targets).
//!
//! [`inject`] stops **one** thread of the target, once, for a fraction of
//! a millisecond; no other thread is stopped. That thread starts a new
//! thread and then restores itself; the new thread `dlopen`s the object
//! (from a memfd, as `/proc/<pid>/fd/<n>`) and calls its entry with one
//! end of a UNIX socketpair; the caller gets the other end, taken out of
//! the target with `pidfd_getfd`. The design, the references it learns
//! from (Frida's Linux injector, kubo/injector, SUSE libpulp) and the
//! kernel rules it relies on are in the design note for issue #11
//! (`notes/attach.md`); the section numbers below are its.
//!
//! # The protocol
//!
//! Pre-flight, nothing touched ([`precheck`], §2):
//!
//! 1. Checks: exists and is not us; not a zombie, not stopped (`T`), not
//!    frozen; not traced; ptrace permitted (uid, dumpable, Yama); dynamic
//!    (`AT_BASE != 0`); glibc, not musl; `membarrier` and `pidfd_getfd`
//!    available; no unverified seccomp filter. Each refusal names its
//!    cause and what to do.
//! 2. The target's libc, from its memory ([`linkmap`], §5.1): auxv →
//!    `DT_DEBUG` → `r_debug` (must be `RT_CONSISTENT`, retried for 50 ms)
//!    → link map → libc by `DT_SONAME` → GNU-hash lookups of
//!    `pthread_create`, `dlopen`, … and the `syscall` instruction of
//!    libc's `syscall()`.
//! 3. The threads, ranked ([`threads`], §3.1): running ones first, then
//!    those sleeping in a call the kernel restarts transparently after a
//!    ptrace stop; never one in `epoll_wait` and the other calls that
//!    return `EINTR` when merely stopped.
//!
//! The stop, one candidate at a time ([`ptrace`], §3.2–3.4):
//!
//! 4. `PTRACE_SEIZE` (no `EXITKILL`), `PTRACE_INTERRUPT`; `waitid(__WALL)`
//!    until our `PTRACE_EVENT_STOP`. A real signal met first is passed on;
//!    a group-stop means the user stopped the process: detach, refuse;
//!    exit or exec: over.
//! 5. Save the general registers, the XSAVE area (`NT_X86_XSTATE`) and
//!    the signal mask (`PTRACE_GETSIGMASK`: the real one even inside
//!    `ppoll`). Classify: user code, restartable call, completed call, or
//!    an `EINTR`-class call our stop broke (rewound).
//! 6. Lock check: a glibc thread (`fs_base` is its TCB), neither `rip`
//!    nor any live stack word inside malloc, pthread_create/exit, fork,
//!    set*id, dl* or the dynamic loader. Refused: detach untouched (a
//!    rewound call is re-issued), try the next candidate; when every
//!    candidate was refused here, survey again 1 ms later (up to 50
//!    rounds: the thread was inside malloc, or still in a previous
//!    loader).
//! 7. rseq: stopped inside a critical section → resume at its abort
//!    handler, `rseq_cs` cleared (what the kernel would have done).
//!
//! The remote calls (§4; [`remote`]: registers set on an existing
//! `syscall` instruction, `orig_rax = -1`, two `PTRACE_SYSCALL` stops):
//!
//! 8. `PTRACE_SETSIGMASK` = all blocked, so no program handler runs on
//!    the thread while we use it (its `rt_sigreturn` would reset the
//!    `restart_block` of an interrupted `nanosleep`, turning its restart
//!    into `EINTR`). Signals that arrive meanwhile stay pending, or go to
//!    other threads.
//! 9. `mmap` a 64 KiB scratch (stack, and the names for the next calls,
//!    written with `process_vm_writev`); `memfd_create` the loader's and
//!    the object's memfds; `socketpair(AF_UNIX, SOCK_STREAM |
//!    SOCK_CLOEXEC)` into scratch.
//! 10. Here: `pidfd_getfd` both memfds and the socket's first end; fill
//!     the loader template ([`loader`], assembled before the stop: code,
//!     libc pointers, entry name) with the saved registers, mask and
//!     xstate, the resume recipe, the descriptors and the path, and write
//!     it into its memfd.
//! 11. `mmap` the loader `PROT_READ | PROT_EXEC` from its memfd. (Its
//!     memfd and the socket's first end stay open in the target: the
//!     loader thread closes them, two remote calls fewer here.)
//! 12. `PTRACE_SETSIGMASK` = all blocked but glibc's 32 (`SIGCANCEL`) and
//!     33 (`SIGSETXID`): the new thread inherits this mask, and a thread
//!     blocking `SIGSETXID` would hang every later `setuid` of the
//!     program. And but the CPU-time signals (`SIGPROF`, `SIGVTALRM`,
//!     `SIGXCPU`), unless the thread must restart a call from its
//!     `restart_block`: blocked on the thread using the CPU, the kernel
//!     would give one to another thread, perhaps one in `nanosleep`
//!     ([`loader::CPU_TIME_SIGNALS`]).
//! 13. Registers: `rip` = loader, `rsp` = scratch top − 8, `orig_rax =
//!     −1`, `DF` and `TF` cleared. `PTRACE_DETACH`. The stop time is
//!     measured (`CLOCK_MONOTONIC`) from the interrupt to here.
//!
//! [`start`] ends here with a [`Pending`]; [`Pending::finish`] does the
//! rest ([`inject`] is both).
//!
//! After the detach, the thread runs the loader untraced (`loader` doc):
//! `pthread_create`, then it restores its own errno, xstate, mask, flags
//! and registers and jumps back — re-issuing an interrupted call with the
//! kernel's restart recipe. If we die from here on the target is unharmed
//! (tested: dropping a [`Pending`]). If we die *during* steps 8–13, the
//! kernel detaches the thread with the registers of our current remote
//! call and it resumes there, which the program will not survive: that
//! window is the stop itself (about 0.3 ms on an idle machine).
//!
//! 14. Signals held back during the remote calls (only `SIGSTOP` can get
//!     through the mask) are sent again to the process.
//! 15. Write the object into its memfd, send the start byte; the loader
//!     thread `dlopen`s it, looks the entry up and reports (OK, or the
//!     `dlerror()` text) before calling `entry(sock)`.
//!     ([`SoImage::TargetPath`]: the memfd stays empty, `dlopen` opens
//!     the path, so a second injection of it finds the loaded object.)
//! 16. Wait for the report (watching the pidfd for the target's exit).
//!
//! On an error between 8 and 13 the remote objects are closed and
//! unmapped again, the saved state is written back with ptrace (the
//! restart recipe applied) and the thread is detached.
//!
//! # What stays in the target
//!
//! The loader image (code + its saved-state data, ~16 KiB, mapped from
//! the deleted memfd `textpoke-loader`) and the 64 KiB scratch mapping
//! stay mapped: the hijacked thread may still be executing the last
//! instructions of the restore when the loader thread runs, and the
//! entry returns into the loader code. The loaded object stays loaded.
//! Nothing else: both memfds and the target's socket end are closed by
//! the loader (the entry owns its socket), and the loader thread exits
//! when the entry returns.
//!
//! # Limits
//!
//! x86-64 only; glibc ≥ 2.34, or an older one with `libdl.so.2` and
//! `libpthread.so.0` already loaded; `/proc` mounted in the target's mount
//! namespace (for the memfd path); seccomp filters are not evaluated
//! (refused unless `seccomp_unverified`); the lock check scans the stack
//! conservatively (no unwinder), so a stale pointer can make a thread be
//! passed over; a tail call out of a lock holder is not seen. The wait
//! for the interrupt stop has no timeout (the survey refuses threads in
//! `D` state, the only ones that could delay it); the note's fallback for
//! a process whose every thread sits in `epoll_wait` (catch one at its
//! next syscall entry) is not implemented: such a process is refused.

pub mod error;
pub mod linkmap;
pub mod loader;
pub mod precheck;
pub mod ptrace;
pub mod remote;
pub mod threads;

use std::borrow::Cow;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub use error::{InjectError, LoaderStage, PermissionCause, Result};
pub use threads::Interrupted;

use linkmap::{LibcApi, LinkMap};
use precheck::Target;
use ptrace::{Event, FpState, Regs};
use remote::{Mem, Remote};

/// Size of the scratch mapping: the hijacked thread's stack while it runs
/// `pthread_create` (and any signal handler of 32/33), and the names.
pub const SCRATCH_LEN: u64 = 64 * 1024;
/// Attempts at a consistent `r_debug` (1 ms apart).
const LINKMAP_ATTEMPTS: u32 = 50;
/// Rounds of survey and attempts (1 ms apart) while the only refusals
/// are at the stop (§3.3: a thread inside malloc or a previous loader).
const THREAD_ROUNDS: u32 = 50;
/// Rounds while every thread is refused by the survey alone.
const SURVEY_ONLY_ROUNDS: u32 = 3;
/// glibc's `SIGCANCEL` and `SIGSETXID`, left unblocked (bits 31, 32).
const GLIBC_INTERNAL_SIGNALS: u64 = (1 << 31) | (1 << 32);

/// The mask the hijacked thread runs the loader with (step 12): every
/// signal blocked but glibc's two and, unless the thread must still
/// restart an interrupted call from its `restart_block`, the CPU-time
/// signals ([`loader::CPU_TIME_SIGNALS`]: the loader's CPU time is the
/// process's, and a CPU-time signal the thread that used it blocks goes
/// to another thread, a sleeping one included, whose `nanosleep` then
/// fails with `EINTR`). With a `restart_block` pending they stay blocked:
/// a handler's `rt_sigreturn` would reset it (`do_no_restart_syscall`),
/// turning the thread's own restart into `EINTR`.
fn loader_mask(interrupted: Interrupted) -> u64 {
    use threads::RestartKind;
    match interrupted {
        Interrupted::Restart { kind: RestartKind::RestartBlock, .. } => !GLIBC_INTERNAL_SIGNALS,
        _ => !(GLIBC_INTERNAL_SIGNALS | loader::CPU_TIME_SIGNALS),
    }
}
const DF: u64 = 1 << 10;
const TF: u64 = 1 << 8;
const MFD_CLOEXEC: u64 = 1;
const MFD_EXEC: u64 = 0x10;

/// The shared object to load.
#[derive(Debug, Clone, Copy)]
pub enum SoImage<'a> {
    /// A file in our mount namespace; its bytes are copied into a memfd.
    Path(&'a Path),
    /// The object's bytes.
    Bytes(&'a [u8]),
    /// A file the target `dlopen`s by this absolute path itself, as the
    /// target sees it (its mount namespace): nothing is copied. `dlopen`
    /// finds an object already loaded from the same file (same device and
    /// inode), so injecting the same path again runs the entry again in
    /// the image the first injection loaded, with its state (a memfd is a
    /// new file each time: each injection would load another copy).
    TargetPath(&'a Path),
}

/// What to inject and how.
#[derive(Debug, Clone)]
pub struct InjectOptions<'a> {
    /// The object.
    pub so: SoImage<'a>,
    /// The entry symbol, called as `void entry(int sock)`.
    pub entry: &'a str,
    /// Hijack this thread (still subject to every check), or choose.
    pub thread: Option<i32>,
    /// How long to wait for the loader's report after the detach.
    pub ready_timeout: Duration,
    /// Go on although a thread runs under a seccomp filter.
    pub seccomp_unverified: bool,
}

impl<'a> InjectOptions<'a> {
    /// Inject `so`, calling `entry`; any thread; 5 s for the report.
    pub fn new(so: SoImage<'a>, entry: &'a str) -> InjectOptions<'a> {
        InjectOptions { so, entry, thread: None, ready_timeout: Duration::from_secs(5), seccomp_unverified: false }
    }
}

/// How long things took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// The hijacked thread's stop: from `PTRACE_INTERRUPT` to
    /// `PTRACE_DETACH` (`CLOCK_MONOTONIC`). No other thread was stopped.
    pub stop: Duration,
    /// From the call to the detach (pre-flight, link map, survey included).
    pub until_detached: Duration,
    /// From the call to the loader's OK report.
    pub until_ready: Duration,
    /// System calls run in the target during the stop.
    pub remote_syscalls: u32,
    /// Threads seized before one passed the checks.
    pub attempts: u32,
}

/// A mapping left in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leftover {
    /// Its address.
    pub addr: u64,
    /// Its length.
    pub len: u64,
}

/// A successful injection.
#[derive(Debug)]
pub struct Injected {
    /// Our end of the socketpair; the entry got the other end.
    pub socket: UnixStream,
    /// The target's pid.
    pub pid: i32,
    /// The hijacked thread.
    pub tid: i32,
    /// What that thread was doing.
    pub interrupted: Interrupted,
    /// Timings.
    pub timing: Timing,
    /// Mappings left in the target: the loader image, the scratch.
    pub left_mapped: Vec<Leftover>,
    /// Threads passed over, and why.
    pub passed_over: Vec<(i32, String)>,
}

/// Loads `opts.so` into process `pid` and calls its `opts.entry` on a new
/// thread with a socket whose other end is returned: [`start`] then
/// [`Pending::finish`].
pub fn inject(pid: i32, opts: &InjectOptions<'_>) -> Result<Injected> {
    start(pid, opts)?.finish()
}

/// An injection whose hijacked thread was let go (steps 1–13): the
/// target is running its loader, whose new thread waits for the object.
/// [`Pending::finish`] hands it over. Dropping a `Pending` is what the
/// injector dying at this point amounts to: the hijacked thread has
/// restored itself already, and the loader thread sees its socket close,
/// closes its descriptors and exits; nothing is loaded.
#[derive(Debug)]
pub struct Pending<'a> {
    pid: i32,
    tid: i32,
    pidfd: OwnedFd,
    so: Cow<'a, [u8]>,
    local: Local,
    interrupted: Interrupted,
    timing: Timing,
    started: Instant,
    ready_timeout: Duration,
    group_stop: bool,
    left_mapped: Vec<Leftover>,
    passed_over: Vec<(i32, String)>,
}

impl Pending<'_> {
    /// The hijacked thread.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// What it was doing.
    pub fn interrupted(&self) -> Interrupted {
        self.interrupted
    }

    /// Timings so far (`stop` and `until_detached` are final).
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Steps 14–16: writes the object into its memfd, lets the loader
    /// thread `dlopen` it, and waits for its report.
    pub fn finish(self) -> Result<Injected> {
        let pid = self.pid;
        let socket = finish(pid, &self.so, self.local)?;
        let socket = wait_report(pid, &self.pidfd, socket, self.ready_timeout, self.group_stop)?;
        let mut timing = self.timing;
        timing.until_ready = self.started.elapsed();
        Ok(Injected {
            socket,
            pid,
            tid: self.tid,
            interrupted: self.interrupted,
            timing,
            left_mapped: self.left_mapped,
            passed_over: self.passed_over,
        })
    }
}

/// Steps 1–13: checks, chooses and hijacks a thread, and lets it go into
/// the loader.
pub fn start<'a>(pid: i32, opts: &InjectOptions<'a>) -> Result<Pending<'a>> {
    let t0 = Instant::now();
    // Step 1.
    let target = precheck::check(pid, precheck::CheckOptions { seccomp_unverified: opts.seccomp_unverified })?;
    let pid = target.pid;
    if opts.entry.contains('\0') || opts.entry.is_empty() {
        return Err(InjectError::Io {
            what: format!("entry symbol {:?}", opts.entry),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    let so: Cow<'a, [u8]> = match opts.so {
        SoImage::Path(p) => Cow::Owned(
            std::fs::read(p).map_err(|e| InjectError::Io { what: format!("reading {}", p.display()), source: e })?,
        ),
        SoImage::Bytes(b) => Cow::Borrowed(b),
        SoImage::TargetPath(_) => Cow::Borrowed(&[]),
    };
    let dlopen_path = match opts.so {
        SoImage::TargetPath(p) => Some(target_path(p)?),
        _ => None,
    };
    // Step 2.
    let api = libc_api(&target)?;
    // The loader, assembled now: too slow to do during the stop.
    let template =
        loader::Template::build(&api.calls, opts.entry, std::arch::is_x86_feature_detected!("xsave")).map_err(|e| {
            InjectError::Io { what: format!("assembling the loader: {e}"), source: std::io::ErrorKind::Other.into() }
        })?;
    // Step 3.
    if let Some(tid) = opts.thread {
        if !precheck::tasks(pid).unwrap_or_default().contains(&tid) {
            return Err(InjectError::NotAThread { pid, tid });
        }
    }
    let maps = threads::mappings(pid);
    let mut attempts = 0;
    let mut passed_over = Vec::new();
    for round in 0..THREAD_ROUNDS {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (candidates, refused) = threads::survey(pid, &target.pidfd, opts.thread);
        passed_over = refused;
        let mut transient = false;
        for cand in candidates {
            attempts += 1;
            match hijack(&target, &api, cand.tid, &maps, &template, dlopen_path.as_deref())? {
                Hijack::PassedOver(why) => {
                    transient = true;
                    passed_over.push((cand.tid, why));
                }
                Hijack::Done(done) => {
                    return Ok(Pending {
                        pid,
                        tid: cand.tid,
                        pidfd: target.pidfd,
                        so,
                        local: done.local,
                        interrupted: done.interrupted,
                        timing: Timing {
                            stop: done.stop,
                            until_detached: t0.elapsed(),
                            until_ready: Duration::ZERO,
                            remote_syscalls: done.remote_syscalls,
                            attempts,
                        },
                        started: t0,
                        ready_timeout: opts.ready_timeout,
                        group_stop: done.noted.group_stop,
                        left_mapped: done.left_mapped,
                        passed_over,
                    });
                }
            }
        }
        // Refusals by the survey (epoll_wait, D state, ...) are about
        // what the threads are doing and can be retried as well; but a
        // thread refused at the stop (lock check) is the common transient
        // case: it was inside malloc, or still in a previous loader.
        if !transient && round >= SURVEY_ONLY_ROUNDS {
            break;
        }
    }
    if let Some(gone) = exited(pid) {
        return Err(gone);
    }
    Err(InjectError::NoSafeThread { pid, tried: passed_over })
}

/// The error to report if the pidfd says process `pid` has exited. Its
/// socket is reset a moment before the pidfd turns readable (descriptors
/// are closed early in `do_exit`), so this waits up to 200 ms.
fn exit_seen(pid: i32, pidfd: &OwnedFd) -> Option<InjectError> {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 200) };
    (n == 1).then(|| InjectError::ExitedDuringInjection {
        pid,
        tid: pid,
        how: "exited before the loader reported".into(),
    })
}

/// The error to report if process `pid` has exited meanwhile.
fn exited(pid: i32) -> Option<InjectError> {
    let tids = precheck::tasks(pid).unwrap_or_default();
    let live = tids.iter().any(|t| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/stat")).unwrap_or_default();
        !matches!(precheck::stat_state(&stat), None | Some('Z') | Some('X'))
    });
    (!live).then(|| InjectError::ExitedDuringInjection { pid, tid: pid, how: "no live thread left".into() })
}

/// The path of [`SoImage::TargetPath`] as the loader holds it: absolute,
/// text without NUL, short enough for its slot.
fn target_path(p: &Path) -> Result<String> {
    let bad = |why: &str| InjectError::Io {
        what: format!("the object's path {} {why}", p.display()),
        source: std::io::ErrorKind::InvalidInput.into(),
    };
    let s = p.to_str().ok_or_else(|| bad("is not UTF-8"))?;
    if !p.is_absolute() || s.contains('\0') {
        return Err(bad("must be absolute, without NUL"));
    }
    if s.len() >= loader::PATH_ROOM {
        return Err(bad(&format!("is too long (at most {} bytes)", loader::PATH_ROOM - 1)));
    }
    Ok(s.to_owned())
}

/// Step 2, retried while the loader is busy.
fn libc_api(target: &Target) -> Result<LibcApi> {
    let mut tries = 0;
    loop {
        match LinkMap::read(target.pid, target.auxv).and_then(|lm| lm.libc_api()) {
            Err(InjectError::LoaderBusy { .. }) if tries < LINKMAP_ATTEMPTS => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// Our duplicates of the target's descriptors, for after the detach.
#[derive(Debug)]
struct Local {
    so_memfd: OwnedFd,
    socket: OwnedFd,
    held_signals: Vec<i32>,
}

struct Done {
    local: Local,
    interrupted: Interrupted,
    stop: Duration,
    remote_syscalls: u32,
    left_mapped: Vec<Leftover>,
    noted: remote::Noted,
}

enum Hijack {
    PassedOver(String),
    Done(Done),
}

/// Steps 4–13 on thread `tid`.
fn hijack(
    target: &Target,
    api: &LibcApi,
    tid: i32,
    maps: &[(u64, u64)],
    template: &loader::Template,
    dlopen_path: Option<&str>,
) -> Result<Hijack> {
    let pid = target.pid;
    // Step 4.
    if let Err(e) = ptrace::seize(tid) {
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(Hijack::PassedOver("exited before it could be seized".into())),
            Some(libc::EPERM) => Err(seize_eperm(target, tid)),
            _ => Err(InjectError::Ptrace { op: "SEIZE", tid, source: e }),
        };
    }
    let stop_start = Instant::now();
    let perr = |op: &'static str| move |e: std::io::Error| remote::ptrace_error(pid, tid, op, e);
    ptrace::interrupt(tid).map_err(perr("INTERRUPT"))?;
    loop {
        match ptrace::wait_event(tid).map_err(perr("waitid"))? {
            Event::Interrupted => break,
            Event::Signal(sig) => {
                // Not ours: deliver it, and ask again for our stop.
                ptrace::resume(tid, sig).map_err(perr("CONT"))?;
                ptrace::interrupt(tid).map_err(perr("INTERRUPT"))?;
            }
            Event::GroupStop(_) => {
                let _ = ptrace::detach(tid, 0);
                return Err(InjectError::Stopped { pid });
            }
            Event::Exec => {
                let _ = ptrace::detach(tid, 0);
                return Err(InjectError::ExecDuringInjection { pid });
            }
            ev @ (Event::Exited(_) | Event::Killed(_)) => return Err(remote::exited(pid, tid, ev)),
            Event::Syscall | Event::OtherEvent(_) => ptrace::resume(tid, 0).map_err(perr("CONT"))?,
        }
    }
    // From here until the session owns the thread, an error must not
    // leave it stopped under us.
    let detach_on_error = |e: InjectError| {
        let _ = ptrace::detach(tid, 0);
        e
    };
    // Step 5.
    let saved = ptrace::get_regs(tid).map_err(perr("GETREGS")).map_err(detach_on_error)?;
    let fp = ptrace::get_fpstate(tid).map_err(perr("GETREGSET")).map_err(detach_on_error)?;
    let mask = ptrace::get_sigmask(tid).map_err(perr("GETSIGMASK")).map_err(detach_on_error)?;
    let eintr = saved.orig_rax as i64 >= 0 && saved.rax as i64 == -(libc::EINTR as i64);
    let caught = eintr && threads::caught_signal_pending(pid, tid, mask);
    let interrupted = Interrupted::classify(&saved, caught);
    let (mut resume_rip, resume_rax) = interrupted.resume(&saved);
    // Step 6.
    let mem = Mem::new(pid);
    if let Err(why) = threads::inspect(&mem, &saved, api, maps) {
        let mut back = saved;
        if let Interrupted::Rewound { .. } = interrupted {
            // Re-issue the call our stop broke (rax is no -ERESTART code,
            // so the kernel leaves these registers alone).
            back.rip = resume_rip;
            back.rax = resume_rax;
            ptrace::set_regs(tid, &back).map_err(perr("SETREGS")).map_err(detach_on_error)?;
        }
        ptrace::detach(tid, 0).map_err(perr("DETACH"))?;
        return Ok(Hijack::PassedOver(why));
    }
    // Step 7.
    let rseq = threads::rseq_fixup(&mem, tid, saved.rip);
    if let Some((abort_ip, _)) = rseq {
        resume_rip = abort_ip;
    }
    let gadget = syscall_gadget(&mem, &saved, interrupted, api);

    let mut session = Session { pid, tid, mem, remote: Remote::new(pid, tid, gadget, saved), undo: Vec::new() };
    let committed = (|| {
        if let Some((_, word)) = rseq {
            session.mem.write_all(word, &0u64.to_le_bytes())?;
        }
        let run_mask = loader_mask(interrupted);
        session.inject_loader(target, template, &saved, &fp, (mask, run_mask), resume_rip, resume_rax, dlopen_path)
    })();
    match committed {
        Ok((local, left_mapped)) => {
            let stop = stop_start.elapsed();
            let remote_syscalls = session.remote.count;
            let mut local = local;
            local.held_signals = session.remote.noted.held_signals.clone();
            Ok(Hijack::Done(Done {
                local,
                interrupted,
                stop,
                remote_syscalls,
                left_mapped,
                noted: session.remote.noted,
            }))
        }
        Err(e) => {
            if !matches!(e, InjectError::ExitedDuringInjection { .. }) {
                session.roll_back(&saved, &fp, mask, resume_rip, resume_rax);
            }
            Err(e)
        }
    }
}

/// `EPERM` from `PTRACE_SEIZE`: the thread is exiting (the kernel
/// refuses to attach to those), a tracer arrived after the pre-flight, or
/// the predicted permission cause.
fn seize_eperm(target: &Target, tid: i32) -> InjectError {
    let pid = target.pid;
    if let InjectError::ExitedDuringInjection { how, .. } =
        remote::ptrace_error(pid, tid, "SEIZE", std::io::Error::from_raw_os_error(libc::ESRCH))
    {
        return InjectError::ExitedDuringInjection { pid, tid, how };
    }
    for tid in precheck::tasks(pid).unwrap_or_default() {
        let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let tracer = st
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok())
            .unwrap_or(0);
        if tracer != 0 {
            let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm")).unwrap_or_default().trim().to_string();
            return InjectError::Traced { pid, tracer, comm };
        }
    }
    InjectError::NotPermitted { pid, cause: target.eperm_cause.clone() }
}

/// The `syscall` instruction to step over: `rip - 2` of the interrupted
/// call if it holds `0f 05`, else the one in libc's `syscall()`.
fn syscall_gadget(mem: &Mem, regs: &Regs, interrupted: Interrupted, api: &LibcApi) -> u64 {
    if interrupted.in_syscall() {
        let mut b = [0u8; 2];
        if mem.read(regs.rip - 2, &mut b).ok() == Some(2) && b == [0x0f, 0x05] {
            return regs.rip - 2;
        }
    }
    api.syscall_insn
}

/// Something created in the target, undone if the injection fails.
enum Undo {
    Close(u64),
    Unmap(u64, u64),
}

/// The thread while we use it (steps 8–13).
struct Session {
    pid: i32,
    tid: i32,
    mem: Mem,
    remote: Remote,
    undo: Vec<Undo>,
}

impl Session {
    fn perr(&self, op: &'static str) -> impl Fn(std::io::Error) -> InjectError {
        let (pid, tid) = (self.pid, self.tid);
        move |e| remote::ptrace_error(pid, tid, op, e)
    }

    fn memfd(&mut self, name_at: u64) -> Result<u64> {
        let fd = match self.remote.syscall(
            "memfd_create",
            libc::SYS_memfd_create,
            [name_at, MFD_CLOEXEC | MFD_EXEC, 0, 0, 0, 0],
        ) {
            // Before Linux 6.3 MFD_EXEC is unknown (and executable is the default).
            Err(InjectError::RemoteSyscall { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                self.remote.syscall("memfd_create", libc::SYS_memfd_create, [name_at, MFD_CLOEXEC, 0, 0, 0, 0])?
            }
            other => other?,
        };
        self.undo.push(Undo::Close(fd));
        Ok(fd)
    }

    fn getfd(&self, target: &Target, fd: u64) -> Result<OwnedFd> {
        precheck::pidfd_getfd(&target.pidfd, fd as i32).map_err(|e| InjectError::Io {
            what: format!("pidfd_getfd of descriptor {fd} of process {}", self.pid),
            source: e,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn inject_loader(
        &mut self,
        target: &Target,
        template: &loader::Template,
        saved: &Regs,
        fp: &FpState,
        (mask, run_mask): (u64, u64),
        resume_rip: u64,
        resume_rax: u64,
        dlopen_path: Option<&str>,
    ) -> Result<(Local, Vec<Leftover>)> {
        let tid = self.tid;
        // Step 8.
        ptrace::set_sigmask(tid, !0).map_err(self.perr("SETSIGMASK"))?;
        // Step 9.
        let prot_rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE) as u64;
        let scratch = self.remote.syscall("mmap", libc::SYS_mmap, [0, SCRATCH_LEN, prot_rw, anon, u64::MAX, 0])?;
        self.undo.push(Undo::Unmap(scratch, SCRATCH_LEN));
        self.mem.write_all(scratch, b"textpoke-loader\0textpoke-so\0")?;
        let loader_fd = self.memfd(scratch)?;
        let so_fd = self.memfd(scratch + 16)?;
        let sv_at = scratch + 32;
        let stream = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
        self.remote.syscall("socketpair", libc::SYS_socketpair, [libc::AF_UNIX as u64, stream, 0, sv_at, 0, 0])?;
        let sv = self.mem.read_vec(sv_at, 8)?;
        let sv0 = u32::from_le_bytes(sv[0..4].try_into().unwrap()) as u64;
        let sv1 = u32::from_le_bytes(sv[4..8].try_into().unwrap()) as u64;
        self.undo.push(Undo::Close(sv0));
        self.undo.push(Undo::Close(sv1));
        // Step 10.
        let loader_local = self.getfd(target, loader_fd)?;
        let so_local = self.getfd(target, so_fd)?;
        let socket_local = self.getfd(target, sv0)?;
        let path = dlopen_path.map_or_else(|| format!("/proc/{}/fd/{so_fd}", target.nspid), str::to_owned);
        let input = loader::LoaderInput {
            sock_fd: sv1 as i32,
            so_fd: so_fd as i32,
            loader_fd: loader_fd as i32,
            peer_fd: sv0 as i32,
            path: &path,
            regs: saved,
            resume_rip,
            resume_rax,
            fpstate: fp,
            sigmask: mask,
        };
        let image = if template.xsave() == matches!(fp, FpState::Xsave(_)) {
            template.fill(&input)
        } else {
            // The kernel exported the other kind of state than the CPU
            // flags suggested: assemble again (slower, still correct).
            template
                .rebuilt(!template.xsave())
                .map_err(|e| InjectError::Io {
                    what: format!("assembling the loader: {e}"),
                    source: std::io::ErrorKind::Other.into(),
                })?
                .fill(&input)
        };
        std::fs::File::from(loader_local)
            .write_all_at(&image, 0)
            .map_err(|e| InjectError::Io { what: "writing the loader into its memfd".into(), source: e })?;
        // Step 11.
        let prot_rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        let code_len = image.len() as u64;
        let code = self.remote.syscall(
            "mmap",
            libc::SYS_mmap,
            [0, code_len, prot_rx, libc::MAP_PRIVATE as u64, loader_fd, 0],
        )?;
        self.undo.push(Undo::Unmap(code, code_len));
        // Step 12.
        ptrace::set_sigmask(tid, run_mask).map_err(self.perr("SETSIGMASK"))?;
        // Step 13.
        let mut regs = *saved;
        regs.rip = code;
        regs.rsp = scratch + SCRATCH_LEN - 8;
        regs.rax = 0;
        regs.orig_rax = u64::MAX;
        regs.eflags &= !(DF | TF);
        ptrace::set_regs(tid, &regs).map_err(self.perr("SETREGS"))?;
        ptrace::detach(tid, 0).map_err(self.perr("DETACH"))?;
        self.undo.clear();
        let local = Local { so_memfd: so_local, socket: socket_local, held_signals: Vec::new() };
        Ok((local, vec![Leftover { addr: code, len: code_len }, Leftover { addr: scratch, len: SCRATCH_LEN }]))
    }

    /// Undoes what was created and gives the thread back as it was.
    fn roll_back(&mut self, saved: &Regs, fp: &FpState, mask: u64, resume_rip: u64, resume_rax: u64) {
        while let Some(u) = self.undo.pop() {
            let _ = match u {
                Undo::Close(fd) => self.remote.syscall("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0]),
                Undo::Unmap(a, len) => self.remote.syscall("munmap", libc::SYS_munmap, [a, len, 0, 0, 0, 0]),
            };
        }
        let mut back = *saved;
        back.rip = resume_rip;
        back.rax = resume_rax;
        back.orig_rax = u64::MAX;
        let _ = ptrace::set_fpstate(self.tid, fp);
        let _ = ptrace::set_sigmask(self.tid, mask);
        let _ = ptrace::set_regs(self.tid, &back);
        let _ = ptrace::detach(self.tid, 0);
    }
}

/// Steps 14–15, after the detach: re-send held signals, write the object
/// into its memfd, send the start byte.
fn finish(pid: i32, so: &[u8], local: Local) -> Result<OwnedFd> {
    for sig in &local.held_signals {
        // SAFETY: plain integer arguments.
        unsafe { libc::kill(pid, *sig) };
    }
    std::fs::File::from(local.so_memfd)
        .write_all_at(so, 0)
        .map_err(|e| InjectError::Io { what: "writing the shared object into its memfd".into(), source: e })?;
    let start = [loader::START_BYTE];
    // SAFETY: a live one-byte buffer. MSG_NOSIGNAL: a loader that already
    // gave up (pthread_create failed) closed its end; its report is read next.
    unsafe { libc::send(local.socket.as_raw_fd(), start.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
    Ok(local.socket)
}

/// Step 16: the loader's report, within `timeout`.
/// `group_stop`: the process was stopped during the remote calls (named
/// in a timeout's message).
fn wait_report(pid: i32, pidfd: &OwnedFd, socket: OwnedFd, timeout: Duration, group_stop: bool) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut header = [0u8; 16];
    read_full(pid, pidfd, &socket, &mut header, deadline, timeout).map_err(|e| match e {
        InjectError::Timeout { pid, secs, why } if group_stop => {
            InjectError::Timeout { pid, secs, why: format!("{why}; it was stopped by a signal during the injection") }
        }
        other => other,
    })?;
    let word = |i: usize| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
    if word(0) != loader::REPORT_MAGIC {
        return Err(InjectError::Protocol { pid, what: format!("bad magic {:#x}", word(0)) });
    }
    let (status, code, len) = (word(1), word(2) as i32, word(3));
    if status == loader::STATUS_OK {
        return Ok(UnixStream::from(socket));
    }
    if len > loader::MAX_MESSAGE {
        return Err(InjectError::Protocol { pid, what: format!("message length {len}") });
    }
    let mut msg = vec![0u8; len as usize];
    read_full(pid, pidfd, &socket, &mut msg, deadline, timeout)?;
    let message = if status == loader::STATUS_PTHREAD_CREATE {
        std::io::Error::from_raw_os_error(code).to_string()
    } else {
        String::from_utf8_lossy(&msg).into_owned()
    };
    Err(InjectError::LoaderFailed { pid, stage: loader::stage_of(status), message })
}

/// Reads exactly `buf.len()` bytes from `socket` before `deadline`,
/// watching `pidfd` for the target's exit.
fn read_full(
    pid: i32,
    pidfd: &OwnedFd,
    socket: &OwnedFd,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [
            libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(InjectError::Io { what: "poll on the loader socket".into(), source: e });
        }
        if fds[0].revents != 0 {
            // SAFETY: writing into the live unread part of `buf`.
            let r = unsafe { libc::recv(socket.as_raw_fd(), buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
            if r > 0 {
                done += r as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if r < 0 && e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // EOF or ECONNRESET: most likely the process died.
            if let Some(gone) = exit_seen(pid, pidfd) {
                return Err(gone);
            }
            if r == 0 {
                return Err(InjectError::Protocol {
                    pid,
                    what: format!("the loader closed its socket after {done} bytes of its report"),
                });
            }
            return Err(InjectError::Io { what: "reading the loader's report".into(), source: e });
        }
        if fds[1].revents != 0 {
            return Err(InjectError::ExitedDuringInjection {
                pid,
                tid: pid,
                how: "exited before the loader reported".into(),
            });
        }
        if n == 0 {
            let state =
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| precheck::stat_state(&s));
            let why = match state {
                Some('T') => "the process is stopped (SIGSTOP?); it loads the object once continued".to_string(),
                Some(c) => format!("process state {c}"),
                None => "process state unknown".to_string(),
            };
            return Err(InjectError::Timeout { pid, secs: timeout.as_secs_f64(), why });
        }
    }
    Ok(())
}
