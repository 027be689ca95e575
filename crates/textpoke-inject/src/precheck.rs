//! Pre-flight: every check that can refuse an injection without
//! touching the target (§2 of the design note).
//!
//! All of it reads `/proc` or asks the kernel about itself; the only
//! calls on the target are `pidfd_open` and one `pidfd_getfd` of its
//! descriptor 0, closed at once (a probe of the kernel feature and of the
//! permission; the target cannot observe either). The checks, in order:
//!
//! 1. **Exists, not ourselves.** `/proc/PID/status`: missing → no such
//!    process; `Tgid` = ours → refused (libpulp #104: a process cannot
//!    ptrace itself). A thread id is taken as its process.
//! 2. **Not a zombie, not stopped.** Every task's state: all `Z`/`X` →
//!    exited; any `T` → stopped by job control: refused with "`kill -CONT`
//!    it first" (it is *not* continued for the user, as Frida's
//!    `was_stopped` does: Frida #305, #493).
//! 3. **Not frozen.** The cgroup v2 `cgroup.events` says `frozen 1`.
//! 4. **Not traced.** `TracerPid` of the process and of every task.
//! 5. **Allowed to ptrace.** Without `CAP_SYS_PTRACE`: same real uid and
//!    gid as all of the target's real/effective/saved ids, and the target
//!    dumpable (its `/proc/PID` is owned by its euid; a non-dumpable
//!    process's is owned by root). Yama `ptrace_scope` 3 refuses always,
//!    2 without the capability; 1 without the capability and when the
//!    target is not our descendant is *predicted* only: the target may
//!    have named us with `PR_SET_PTRACER`, so `PTRACE_SEIZE` is tried and
//!    its `EPERM` is then reported with that cause.
//! 6. **Dynamically linked.** `/proc/PID/auxv`: `AT_BASE == 0` → static
//!    (libpulp #175 lists them as unpatchable too).
//! 7. **glibc.** A mapped `ld-musl` → refused.
//! 8. **Kernel features.** `membarrier` must offer `PRIVATE_EXPEDITED`
//!    and `PRIVATE_EXPEDITED_SYNC_CORE` (the agent's code patching needs
//!    them; its signal fallback would break the program's system calls);
//!    `pidfd_open` (5.3) and `pidfd_getfd` (5.6) must exist.
//! 9. **seccomp.** A thread under a seccomp filter could have injection's
//!    calls denied or the process killed; without a filter evaluator
//!    (future work: dump with `PTRACE_SECCOMP_GET_FILTER` and run the
//!    cBPF program) it is refused unless the caller says otherwise.
//!    Strict mode (1) is always refused.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use crate::error::{InjectError, PermissionCause, Result};
use crate::linkmap::Auxv;

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED`.
const MEMBARRIER_PRIVATE_EXPEDITED: i64 = 1 << 3;
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`.
const MEMBARRIER_PRIVATE_EXPEDITED_SYNC_CORE: i64 = 1 << 5;
/// `CAP_SYS_PTRACE`.
const CAP_SYS_PTRACE: u32 = 19;

/// A process that passed the pre-flight checks.
#[derive(Debug)]
pub struct Target {
    /// Its pid (thread-group id) in our pid namespace.
    pub pid: i32,
    /// Its pid as it sees itself (last field of `NSpid`).
    pub nspid: i32,
    /// Its command name.
    pub comm: String,
    /// Its auxiliary vector.
    pub auxv: Auxv,
    /// A pidfd of it.
    pub pidfd: OwnedFd,
    /// What an `EPERM` from `PTRACE_SEIZE` would most likely mean.
    pub eperm_cause: PermissionCause,
}

/// Options of the pre-flight.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Go on although a thread runs under a seccomp filter.
    pub seccomp_unverified: bool,
}

/// Fields of a `/proc/.../status` file.
struct Status(String);

impl Status {
    fn read(path: &str) -> std::io::Result<Status> {
        std::fs::read_to_string(path).map(Status)
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.0.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(str::trim)
    }

    fn int(&self, name: &str) -> Option<i64> {
        self.field(name)?.split_whitespace().next()?.parse().ok()
    }

    fn ints(&self, name: &str) -> Vec<u32> {
        self.field(name).map(|v| v.split_whitespace().filter_map(|x| x.parse().ok()).collect()).unwrap_or_default()
    }
}

/// The state letter of `/proc/.../stat` (the field after the comm, which
/// may itself contain parentheses).
pub fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The task ids of process `pid`.
pub fn tasks(pid: i32) -> std::io::Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn my_pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

fn has_cap_sys_ptrace() -> bool {
    let Ok(st) = Status::read("/proc/self/status") else { return false };
    st.field("CapEff")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

fn yama_scope() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Is `pid` a descendant of ours (Yama scope 1 allows those)?
fn is_descendant(pid: i32) -> bool {
    let me = my_pid();
    let mut p = pid;
    for _ in 0..4096 {
        let Some(parent) = Status::read(&format!("/proc/{p}/status")).ok().and_then(|s| s.int("PPid")) else {
            return false;
        };
        if parent as i32 == me {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent as i32;
    }
    false
}

/// Runs the checks on `pid`; the target is untouched whatever the result.
pub fn check(pid: i32, opts: CheckOptions) -> Result<Target> {
    // 1. Exists, not ourselves.
    if pid <= 0 {
        return Err(InjectError::NoSuchProcess { pid });
    }
    let status = Status::read(&format!("/proc/{pid}/status")).map_err(|_| InjectError::NoSuchProcess { pid })?;
    let tgid = status.int("Tgid").map(|t| t as i32).unwrap_or(pid);
    if tgid == my_pid() {
        return Err(InjectError::IsSelf { pid });
    }
    let pid = tgid;
    let status = Status::read(&format!("/proc/{pid}/status")).map_err(|_| InjectError::NoSuchProcess { pid })?;
    let comm = status.field("Name").unwrap_or("").to_string();
    let tids = tasks(pid).map_err(|_| InjectError::NoSuchProcess { pid })?;

    // 2. Not a zombie, not stopped; 4. not traced (per task).
    let mut live = 0;
    for &tid in &tids {
        let Ok(st) = Status::read(&format!("/proc/{pid}/task/{tid}/status")) else { continue };
        let tracer = st.int("TracerPid").unwrap_or(0) as i32;
        if tracer != 0 {
            let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm")).unwrap_or_default().trim().to_string();
            return Err(InjectError::Traced { pid, tracer, comm });
        }
        let state = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok().and_then(|s| stat_state(&s));
        match state {
            Some('T') => return Err(InjectError::Stopped { pid }),
            Some('Z') | Some('X') | None => {}
            Some(_) => live += 1,
        }
    }
    if live == 0 {
        return Err(InjectError::Zombie { pid });
    }

    // 3. Not frozen.
    if let Some(cg) = frozen_cgroup(pid) {
        return Err(InjectError::Frozen { pid, cgroup: cg });
    }

    // 5. Allowed to ptrace.
    let eperm_cause = permission(pid, &status)?;

    // 6. Dynamically linked.
    let auxv = match std::fs::read(format!("/proc/{pid}/auxv")) {
        Ok(raw) => Auxv::parse(&raw),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let cause = if eperm_cause == PermissionCause::Unknown { PermissionCause::ProcDenied } else { eperm_cause };
            return Err(InjectError::NotPermitted { pid, cause });
        }
        Err(_) => return Err(InjectError::NoSuchProcess { pid }),
    };
    if auxv.base == 0 {
        return Err(InjectError::Static { pid });
    }

    // 7. glibc, not musl.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|_| InjectError::NoSuchProcess { pid })?;
    if let Some(line) = maps.lines().find(|l| l.contains("/ld-musl-")) {
        let loader = line.split_whitespace().last().unwrap_or("ld-musl").to_string();
        return Err(InjectError::Musl { pid, loader });
    }

    // 8. Kernel features.
    kernel_features()?;
    let pidfd = pidfd_probe(pid, &eperm_cause)?;

    // 9. seccomp.
    for &tid in &tids {
        let Ok(st) = Status::read(&format!("/proc/{pid}/task/{tid}/status")) else { continue };
        match st.int("Seccomp") {
            Some(1) => return Err(InjectError::Seccomp { pid, tid, mode: "strict" }),
            Some(2) if !opts.seccomp_unverified => return Err(InjectError::Seccomp { pid, tid, mode: "filter" }),
            _ => {}
        }
    }

    let nspid = status.ints("NSpid").last().map(|&n| n as i32).unwrap_or(pid);
    Ok(Target { pid, nspid, comm, auxv, pidfd, eperm_cause })
}

/// The frozen cgroup v2 directory of `pid`, if its cgroup is frozen.
fn frozen_cgroup(pid: i32) -> Option<String> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = format!("/sys/fs/cgroup{path}");
    let events = std::fs::read_to_string(format!("{dir}/cgroup.events")).ok()?;
    events.lines().any(|l| l.trim() == "frozen 1").then_some(dir)
}

/// Check 5; returns what an `EPERM` from `PTRACE_SEIZE` would mean.
fn permission(pid: i32, status: &Status) -> Result<PermissionCause> {
    let cap = has_cap_sys_ptrace();
    let uids = status.ints("Uid");
    let gids = status.ints("Gid");
    // SAFETY: getuid/getgid have no preconditions.
    let (ruid, rgid) = unsafe { (libc::getuid(), libc::getgid()) };
    if !cap && uids.len() >= 3 && gids.len() >= 3 {
        let same_user = uids[..3].iter().all(|&u| u == ruid) && gids[..3].iter().all(|&g| g == rgid);
        if !same_user {
            let cause = PermissionCause::OtherUser { ours: ruid, theirs: [uids[0], uids[1], uids[2]] };
            return Err(InjectError::NotPermitted { pid, cause });
        }
        // A non-dumpable process's /proc directory belongs to root.
        if let Ok(md) = std::fs::metadata(format!("/proc/{pid}")) {
            if md.uid() != uids[1] {
                return Err(InjectError::NotPermitted { pid, cause: PermissionCause::NotDumpable });
            }
        }
    }
    match yama_scope() {
        n @ 3.. => Err(InjectError::NotPermitted { pid, cause: PermissionCause::Yama(n) }),
        2 if !cap => Err(InjectError::NotPermitted { pid, cause: PermissionCause::Yama(2) }),
        1 if !cap && !is_descendant(pid) => Ok(PermissionCause::Yama(1)),
        _ => Ok(PermissionCause::Unknown),
    }
}

fn kernel_features() -> Result<()> {
    // SAFETY: MEMBARRIER_CMD_QUERY (0) has no side effect.
    let cmds = unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) };
    if cmds < 0 {
        return Err(InjectError::KernelLacks { what: "membarrier (Linux 4.3)" });
    }
    let need = MEMBARRIER_PRIVATE_EXPEDITED | MEMBARRIER_PRIVATE_EXPEDITED_SYNC_CORE;
    if cmds & need != need {
        return Err(InjectError::KernelLacks {
            what: "membarrier PRIVATE_EXPEDITED and PRIVATE_EXPEDITED_SYNC_CORE (Linux 4.16)",
        });
    }
    Ok(())
}

/// `pidfd_open(pid)`, and a `pidfd_getfd` of descriptor 0 to prove the
/// kernel has it and lets us use it.
fn pidfd_probe(pid: i32, eperm_cause: &PermissionCause) -> Result<OwnedFd> {
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => InjectError::KernelLacks { what: "pidfd_open (Linux 5.3)" },
        Some(libc::ESRCH) => InjectError::NoSuchProcess { pid },
        _ => InjectError::Io { what: format!("pidfd_open({pid})"), source: e },
    })?;
    match pidfd_getfd(&pidfd, 0) {
        Ok(_) => {}
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOSYS) => return Err(InjectError::KernelLacks { what: "pidfd_getfd (Linux 5.6)" }),
            Some(libc::EPERM) => return Err(InjectError::NotPermitted { pid, cause: eperm_cause.clone() }),
            // EBADF: the target has no descriptor 0, which is fine.
            _ => {}
        },
    }
    Ok(pidfd)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of the target's `fd` (same
/// open file description) in this process.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain integer arguments.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letter_survives_odd_comms() {
        assert_eq!(stat_state("123 (a) b) S 1 2 3"), Some('S'));
        assert_eq!(stat_state("123 (sleep) T 1"), Some('T'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn refuses_itself_and_nonexistent_pids() {
        let me = std::process::id() as i32;
        assert!(matches!(check(me, CheckOptions::default()), Err(InjectError::IsSelf { .. })));
        assert!(matches!(check(-5, CheckOptions::default()), Err(InjectError::NoSuchProcess { .. })));
        assert!(matches!(check(i32::MAX, CheckOptions::default()), Err(InjectError::NoSuchProcess { .. })));
    }
}
