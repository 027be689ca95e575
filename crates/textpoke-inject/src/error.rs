//! Why an injection was refused or failed.
//!
//! Every variant names the cause and, where there is one, what the user
//! can do about it: the messages are shown to the user as they are. The
//! variants before [`InjectError::NoSafeThread`] are found by the
//! read-only pre-flight checks ([`crate::precheck`]); when one of them is
//! returned the target was never touched.

use std::fmt;
use std::io;

/// The result of this crate's operations.
pub type Result<T, E = InjectError> = std::result::Result<T, E>;

/// Why `ptrace` is (or was) not permitted, as predicted from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PermissionCause {
    /// The target runs as another user and we lack `CAP_SYS_PTRACE`.
    OtherUser {
        /// Our real uid.
        ours: u32,
        /// The target's real, effective and saved uids.
        theirs: [u32; 3],
    },
    /// The target is not dumpable (setuid/setgid program, or it called
    /// `prctl(PR_SET_DUMPABLE, 0)`) and we lack `CAP_SYS_PTRACE`.
    NotDumpable,
    /// `/proc/sys/kernel/yama/ptrace_scope` forbids it.
    Yama(u32),
    /// `/proc/PID/...` cannot be read (`EACCES`) for another reason.
    ProcDenied,
    /// The kernel said `EPERM` and nothing in `/proc` explains it: an LSM
    /// (SELinux, AppArmor) or a container without `CAP_SYS_PTRACE`.
    Unknown,
}

impl fmt::Display for PermissionCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermissionCause::OtherUser { ours, theirs } => write!(
                f,
                "it runs as uid {}/{}/{} (real/effective/saved) and we are uid {ours} without CAP_SYS_PTRACE; \
                 run textpoke as that user or with sudo",
                theirs[0], theirs[1], theirs[2]
            ),
            PermissionCause::NotDumpable => f.write_str(
                "it is not dumpable (a setuid/setgid program, or it called prctl(PR_SET_DUMPABLE, 0)); \
                 only a tracer with CAP_SYS_PTRACE (sudo) may attach",
            ),
            PermissionCause::Yama(1) => f.write_str(
                "kernel.yama.ptrace_scope is 1: only a parent may attach to its descendants; \
                 run textpoke with sudo, set the sysctl to 0, or have the program call prctl(PR_SET_PTRACER, ...)",
            ),
            PermissionCause::Yama(2) => f.write_str(
                "kernel.yama.ptrace_scope is 2: only a tracer with CAP_SYS_PTRACE may attach; run textpoke with sudo",
            ),
            PermissionCause::Yama(n) => write!(
                f,
                "kernel.yama.ptrace_scope is {n}: ptrace attach is disabled until reboot; \
                 start the program under `textpoke record` instead"
            ),
            PermissionCause::ProcDenied => {
                f.write_str("its /proc entries cannot be read (EACCES); run textpoke as the same user or with sudo")
            }
            PermissionCause::Unknown => f.write_str(
                "the kernel refused (EPERM) for no reason visible in /proc: an LSM policy (SELinux, AppArmor) \
                 or a container without CAP_SYS_PTRACE",
            ),
        }
    }
}

/// What the loader thread in the target could not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderStage {
    /// `pthread_create` on the hijacked thread failed (its error number
    /// is in the message).
    PthreadCreate,
    /// `dlopen` of the shared object failed (`dlerror` text).
    Dlopen,
    /// The entry symbol was not found (`dlerror` text).
    Dlsym,
    /// The loader thread could not read the start byte from its socket.
    Start,
}

impl fmt::Display for LoaderStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoaderStage::PthreadCreate => "pthread_create",
            LoaderStage::Dlopen => "dlopen",
            LoaderStage::Dlsym => "dlsym",
            LoaderStage::Start => "start",
        })
    }
}

/// Why an injection was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    // ---- pre-flight: the target was not touched ----
    /// No such process.
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// The pid is this process (or one of its threads).
    #[error("process {pid} is this process: a process cannot ptrace itself")]
    IsSelf {
        /// The pid asked for.
        pid: i32,
    },
    /// The process is a zombie.
    #[error("process {pid} has exited (zombie); nothing to attach to")]
    Zombie {
        /// The pid asked for.
        pid: i32,
    },
    /// The process is stopped by a job-control signal.
    #[error(
        "process {pid} is stopped (state T: SIGSTOP, SIGTSTP, or SIGTTIN/SIGTTOU from a terminal); \
         resume it with `kill -CONT {pid}` first"
    )]
    Stopped {
        /// The pid asked for.
        pid: i32,
    },
    /// Its cgroup is frozen.
    #[error("process {pid} is frozen by its cgroup {cgroup}; thaw it first (`echo 0 > {cgroup}/cgroup.freeze`)")]
    Frozen {
        /// The pid asked for.
        pid: i32,
        /// The cgroup directory.
        cgroup: String,
    },
    /// A thread of the process is already traced.
    #[error(
        "process {pid} is already traced by process {tracer} ({comm}); a thread has one tracer at a time: \
         detach that debugger, strace or textpoke first"
    )]
    Traced {
        /// The pid asked for.
        pid: i32,
        /// The tracer's pid (`TracerPid`).
        tracer: i32,
        /// The tracer's command name, if readable.
        comm: String,
    },
    /// ptrace is not permitted.
    #[error("not permitted to ptrace process {pid}: {cause}")]
    NotPermitted {
        /// The pid asked for.
        pid: i32,
        /// The cause.
        cause: PermissionCause,
    },
    /// The process has no dynamic loader (`AT_BASE == 0`).
    #[error(
        "process {pid} is statically linked (no dynamic loader, AT_BASE is 0): nothing can load a shared \
         object into it; start the program under `textpoke record` instead"
    )]
    Static {
        /// The pid asked for.
        pid: i32,
    },
    /// The process uses musl.
    #[error("process {pid} uses musl libc ({loader}); only glibc programs can be injected")]
    Musl {
        /// The pid asked for.
        pid: i32,
        /// The musl loader's path as mapped.
        loader: String,
    },
    /// The kernel lacks a facility injection or the agent needs.
    #[error("this kernel lacks {what}; attaching needs it (start the program under `textpoke record` instead)")]
    KernelLacks {
        /// The missing facility.
        what: &'static str,
    },
    /// A thread runs under a seccomp filter that was not verified.
    #[error(
        "thread {tid} of process {pid} runs under seccomp {mode}: the filter could forbid (or kill the process for) \
         the calls injection makes (mmap, memfd_create, socketpair, clone3, restart_syscall); \
         pass seccomp_unverified to try anyway"
    )]
    Seccomp {
        /// The pid asked for.
        pid: i32,
        /// The thread under the filter.
        tid: i32,
        /// "filter" or "strict".
        mode: &'static str,
    },
    /// The thread asked for does not belong to the process.
    #[error("thread {tid} is not a thread of process {pid}")]
    NotAThread {
        /// The pid asked for.
        pid: i32,
        /// The thread asked for.
        tid: i32,
    },
    /// No usable C library was found in the target's link map.
    #[error("process {pid}: {what}")]
    LinkMap {
        /// The pid asked for.
        pid: i32,
        /// What was missing or inconsistent.
        what: String,
    },
    /// The dynamic loader stayed busy (`r_state != RT_CONSISTENT`).
    #[error("process {pid}: its dynamic loader stayed busy (a dlopen/dlclose in progress); try again")]
    LoaderBusy {
        /// The pid asked for.
        pid: i32,
    },

    // ---- choosing and stopping a thread ----
    /// No thread can be interrupted without an EINTR or a deadlock risk.
    #[error("no thread of process {pid} can be interrupted safely: {}", describe_tried(.tried))]
    NoSafeThread {
        /// The pid asked for.
        pid: i32,
        /// Each thread tried or considered, and why it was refused.
        tried: Vec<(i32, String)>,
    },
    /// The process exited while we worked on it.
    #[error("process {pid} exited during the injection (thread {tid}: {how})")]
    ExitedDuringInjection {
        /// The pid.
        pid: i32,
        /// The hijacked thread.
        tid: i32,
        /// Exit code or signal.
        how: String,
    },
    /// The process called execve while we worked on it.
    #[error("process {pid} called execve during the injection; nothing was loaded")]
    ExecDuringInjection {
        /// The pid.
        pid: i32,
    },
    /// A ptrace request failed.
    #[error("ptrace {op} on thread {tid} failed: {source}")]
    Ptrace {
        /// The request.
        op: &'static str,
        /// The thread.
        tid: i32,
        /// The kernel's error.
        source: io::Error,
    },
    /// A system call run in the target failed.
    #[error("{name} in process {pid} failed: {source}")]
    RemoteSyscall {
        /// The pid.
        pid: i32,
        /// The system call.
        name: &'static str,
        /// The target's error number.
        source: io::Error,
    },
    /// Reading or writing the target's memory failed.
    #[error("cannot access memory of process {pid} at {addr:#x}: {source}")]
    Memory {
        /// The pid.
        pid: i32,
        /// Where.
        addr: u64,
        /// The error.
        source: io::Error,
    },
    /// Some other operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        source: io::Error,
    },

    // ---- after the thread was let go ----
    /// The loader in the target reported a failure.
    #[error("the loader in process {pid} failed at {stage}: {message}")]
    LoaderFailed {
        /// The pid.
        pid: i32,
        /// Which step failed.
        stage: LoaderStage,
        /// `dlerror()` text, or the error number of `pthread_create`.
        message: String,
    },
    /// The loader did not report in time.
    #[error("the loader in process {pid} did not report within {secs} s ({why})")]
    Timeout {
        /// The pid.
        pid: i32,
        /// The timeout.
        secs: f64,
        /// What we saw meanwhile.
        why: String,
    },
    /// The loader's report on the socket was not understood.
    #[error("process {pid}: malformed loader report ({what})")]
    Protocol {
        /// The pid.
        pid: i32,
        /// What was wrong.
        what: String,
    },
}

fn describe_tried(tried: &[(i32, String)]) -> String {
    if tried.is_empty() {
        return "it has no threads".into();
    }
    tried.iter().map(|(tid, why)| format!("thread {tid}: {why}")).collect::<Vec<_>>().join("; ")
}
