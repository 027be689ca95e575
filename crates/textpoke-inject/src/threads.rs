//! Which thread to hijack, and what it was doing when it stopped (§3).
//!
//! # Why the choice matters: system calls and a ptrace stop
//!
//! `PTRACE_INTERRUPT` wakes a thread sleeping in a system call. Most
//! calls then return one of the kernel-internal `-ERESTART*` codes, and
//! when the thread is resumed without a handler to run, the kernel
//! restarts them transparently (`arch_do_signal_or_restart`,
//! arch/x86/kernel/signal.c: `ax = orig_ax; ip -= 2`, or
//! `restart_syscall` for `-ERESTART_RESTARTBLOCK`, which resumes a
//! `nanosleep` or timed `futex` at its absolute expiry: neither shortened
//! nor lengthened). But some calls return `-EINTR` to the program when
//! merely stopped — signal(7), "Interruption of system calls and library
//! functions by stop signals"; ptrace(2): "may cause a stray EINTR".
//!
//! A thread is therefore chosen only if it is
//!
//! * running or runnable (`/proc/PID/task/TID/syscall` says `running`),
//!   ranked first; or
//! * sleeping in one of these calls, which return `-ERESTART*` when
//!   interrupted by a stop (ranked by how common and cheap they are):
//!
//! | rank | calls |
//! |------|-------|
//! | 1 | `nanosleep`, `clock_nanosleep`, `futex` (any wait), `poll`, `ppoll`, `select`, `pselect6`, `restart_syscall` |
//! | 2 | `read`, `write`, `readv`, `writev`, `accept`, `accept4`, `recvfrom`, `recvmsg`, `recvmmsg`, `sendto`, `sendmsg`, `sendmmsg`, `connect` (when the descriptor is not a socket, or a socket with `SO_RCVTIMEO` and `SO_SNDTIMEO` both 0), `pause`, `rt_sigsuspend`, `wait4`, `waitid`, `flock`, `fcntl(F_SETLKW / F_OFD_SETLKW)`, `msgrcv` |
//!
//! Never chosen: `epoll_wait`, `epoll_pwait`, `epoll_pwait2`, `semop`,
//! `semtimedop`, `rt_sigtimedwait`, `io_getevents`, `io_pgetevents`,
//! `io_uring_enter`, socket calls on a socket with a timeout, any other
//! call, a thread in uninterruptible sleep (`D`), stopped or traced.
//!
//! # At the stop (§3.3)
//!
//! The state in `/proc` may be stale by the time the thread stops, so
//! the registers decide ([`Interrupted::classify`]): user code
//! (`orig_rax == -1`), a restartable call (`rax` an `-ERESTART*` code),
//! a completed call, or a call of the `-EINTR` class that our stop just
//! broke (the thread entered it after our survey): the last is rewound
//! (`rip -= 2`, `rax = orig_rax`), i.e. re-issued — a longer wait, never
//! an `EINTR` — unless a caught signal is pending for it, whose handler
//! would have caused that `EINTR` anyway.
//!
//! Then the thread itself is checked ([`inspect`]): its `fs_base` must
//! point at a glibc thread control block (a raw `clone` thread cannot
//! call `pthread_create`), and neither its `rip` nor any word of its live
//! stack (from `rsp` to the end of the stack mapping) may point into a
//! function whose locks `pthread_create` also takes (malloc and friends,
//! thread creation and exit, fork, set*id, the dl* functions, the whole
//! dynamic loader: [`crate::linkmap::DENY`]). A frame of such a function
//! always leaves its return address (or, under a signal handler, the
//! interrupted `rip` in the signal frame) on the stack, so the scan has
//! no false negatives except for tail calls; it may have false positives
//! (a stale pointer in an uninitialised local), which only make us try
//! another thread. kubo/injector #5 and #23 are the deadlocks this
//! prevents.
//!
//! Finally rseq (§3.4): a thread stopped inside an rseq critical section
//! would have been sent to its abort handler by the kernel on resume;
//! because it resumes in our loader first, the kernel would clear
//! `rseq_cs` without aborting, and the section would later complete
//! un-aborted. [`rseq_fixup`] does what `rseq_ip_fixup` does: the saved
//! `rip` becomes `abort_ip` and `rseq_cs` is cleared.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::linkmap::LibcApi;
use crate::precheck::{self, stat_state};
use crate::ptrace::Regs;
use crate::remote::Mem;

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
/// `__NR_restart_syscall`.
pub const NR_RESTART_SYSCALL: u64 = 219;
const F_SETLKW: u64 = 7;
const F_OFD_SETLKW: u64 = 38;

/// Calls that survive a ptrace stop, rank 1.
const RANK1: &[(u64, &str)] = &[
    (35, "nanosleep"),
    (230, "clock_nanosleep"),
    (202, "futex"),
    (7, "poll"),
    (271, "ppoll"),
    (23, "select"),
    (270, "pselect6"),
    (219, "restart_syscall"),
];

/// Calls on a descriptor that survive a ptrace stop unless it is a socket
/// with a timeout, rank 2.
const FD_CALLS: &[(u64, &str)] = &[
    (0, "read"),
    (1, "write"),
    (19, "readv"),
    (20, "writev"),
    (43, "accept"),
    (288, "accept4"),
    (45, "recvfrom"),
    (47, "recvmsg"),
    (299, "recvmmsg"),
    (44, "sendto"),
    (46, "sendmsg"),
    (307, "sendmmsg"),
    (42, "connect"),
];

/// Other calls that survive a ptrace stop, rank 2.
const RANK2: &[(u64, &str)] = &[
    (34, "pause"),
    (130, "rt_sigsuspend"),
    (61, "wait4"),
    (247, "waitid"),
    (73, "flock"),
    (72, "fcntl"),
    (70, "msgrcv"),
];

/// Calls that return `EINTR` when their thread is merely stopped.
pub const EINTR_CLASS: &[(u64, &str)] = &[
    (232, "epoll_wait"),
    (281, "epoll_pwait"),
    (441, "epoll_pwait2"),
    (65, "semop"),
    (220, "semtimedop"),
    (128, "rt_sigtimedwait"),
    (208, "io_getevents"),
    (333, "io_pgetevents"),
    (426, "io_uring_enter"),
];

fn lookup(table: &[(u64, &'static str)], nr: u64) -> Option<&'static str> {
    table.iter().find(|&&(n, _)| n == nr).map(|&(_, s)| s)
}

/// A readable name for system call `nr`.
pub fn syscall_name(nr: u64) -> String {
    [RANK1, FD_CALLS, RANK2, EINTR_CLASS]
        .iter()
        .find_map(|t| lookup(t, nr))
        .map(str::to_string)
        .unwrap_or_else(|| format!("system call {nr}"))
}

/// What `/proc/PID/task/TID/syscall` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// `running`: in user code or runnable.
    Running,
    /// Blocked in system call `nr`.
    Syscall {
        /// The number.
        nr: u64,
        /// Its arguments.
        args: [u64; 6],
    },
    /// Blocked, not in a system call (`-1`: a page fault, a stop).
    NotInSyscall,
}

/// Parses `/proc/PID/task/TID/syscall`.
pub fn parse_activity(s: &str) -> Option<Activity> {
    let s = s.trim();
    if s == "running" {
        return Some(Activity::Running);
    }
    let mut it = s.split_whitespace();
    let first = it.next()?;
    if first.starts_with('-') {
        return Some(Activity::NotInSyscall);
    }
    let nr: u64 = first.parse().ok()?;
    let mut args = [0u64; 6];
    for a in args.iter_mut() {
        *a = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some(Activity::Syscall { nr, args })
}

/// A thread that may be hijacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub tid: i32,
    /// What it was doing at the survey.
    pub activity: Activity,
    /// 0 (running) to 2; lower is tried first.
    pub rank: u8,
}

/// Surveys the threads of `pid` (all of them, or only `only`): the
/// acceptable ones ranked, and the refused ones with the reason.
pub fn survey(pid: i32, pidfd: &OwnedFd, only: Option<i32>) -> (Vec<Candidate>, Vec<(i32, String)>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    let tids = precheck::tasks(pid).unwrap_or_default();
    for tid in tids.into_iter().filter(|t| only.is_none_or(|o| o == *t)) {
        match judge(pid, pidfd, tid) {
            Ok(c) => ok.push(c),
            Err(why) => refused.push((tid, why)),
        }
    }
    ok.sort_by_key(|c| (c.rank, c.tid));
    (ok, refused)
}

fn judge(pid: i32, pidfd: &OwnedFd, tid: i32) -> std::result::Result<Candidate, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).map_err(|_| "gone".to_string())?;
    let state = stat_state(&stat).unwrap_or('?');
    match state {
        'R' | 'S' => {}
        'D' => return Err("in uninterruptible sleep (D)".into()),
        other => return Err(format!("in state {other}")),
    }
    let sys =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).map_err(|e| format!("syscall file: {e}"))?;
    let activity = parse_activity(&sys).ok_or_else(|| format!("unreadable syscall file {sys:?}"))?;
    let rank = match activity {
        Activity::Running => 0,
        Activity::NotInSyscall => return Err("blocked outside a system call".into()),
        Activity::Syscall { nr, args } => {
            if lookup(RANK1, nr).is_some() {
                1
            } else if let Some(name) = lookup(FD_CALLS, nr) {
                socket_without_timeout(pid, pidfd, args[0] as i32).map_err(|why| format!("in {name}: {why}"))?;
                2
            } else if nr == 72 && args[1] != F_SETLKW && args[1] != F_OFD_SETLKW {
                return Err("in fcntl (not a lock wait)".into());
            } else if lookup(RANK2, nr).is_some() {
                2
            } else if let Some(name) = lookup(EINTR_CLASS, nr) {
                return Err(format!("in {name}, which a ptrace stop would fail with EINTR"));
            } else {
                return Err(format!("in {}, not known to restart transparently after a ptrace stop", syscall_name(nr)));
            }
        }
    };
    Ok(Candidate { tid, activity, rank })
}

/// Ok when descriptor `fd` of `pid` is not a socket, or a socket with
/// no receive or send timeout (its calls then return `-ERESTARTSYS`).
fn socket_without_timeout(pid: i32, pidfd: &OwnedFd, fd: i32) -> std::result::Result<(), String> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map_err(|e| format!("descriptor {fd}: {e}"))?;
    if !link.to_string_lossy().starts_with("socket:") {
        return Ok(());
    }
    let dup = precheck::pidfd_getfd(pidfd, fd).map_err(|e| format!("socket {fd}: pidfd_getfd: {e}"))?;
    for (opt, name) in [(libc::SO_RCVTIMEO, "SO_RCVTIMEO"), (libc::SO_SNDTIMEO, "SO_SNDTIMEO")] {
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: `tv` and `len` are live and sized for the option.
        let rc = unsafe {
            libc::getsockopt(dup.as_raw_fd(), libc::SOL_SOCKET, opt, (&mut tv as *mut libc::timeval).cast(), &mut len)
        };
        if rc != 0 {
            return Err(format!("socket {fd}: getsockopt {name}: {}", std::io::Error::last_os_error()));
        }
        if tv.tv_sec != 0 || tv.tv_usec != 0 {
            return Err(format!("socket {fd} has {name} set, so a stop fails its calls with EINTR"));
        }
    }
    Ok(())
}

/// How the kernel would restart an interrupted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// `-ERESTARTSYS`, `-ERESTARTNOINTR` or `-ERESTARTNOHAND`: re-issue
    /// the same call (`rax = orig_rax`, `rip -= 2`).
    Reissue,
    /// `-ERESTART_RESTARTBLOCK`: `restart_syscall` (`rax = 219`,
    /// `rip -= 2`), which continues from the thread's `restart_block`.
    RestartBlock,
}

/// What the thread was doing at our stop, from its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// In user code (`orig_rax == -1`).
    User,
    /// In system call `nr`, which the kernel would restart.
    Restart {
        /// The call.
        nr: u64,
        /// How.
        kind: RestartKind,
    },
    /// Just returned from system call `nr`: its result is kept.
    Completed {
        /// The call.
        nr: u64,
    },
    /// In a call of the EINTR class that our stop broke: re-issued.
    Rewound {
        /// The call.
        nr: u64,
    },
}

impl Interrupted {
    /// Classifies the saved registers. `caught_pending`: a signal with a
    /// handler is pending and unblocked for the thread (then an `-EINTR`
    /// would have happened anyway and is kept).
    pub fn classify(regs: &Regs, caught_pending: bool) -> Interrupted {
        let orig = regs.orig_rax as i64;
        if orig < 0 {
            return Interrupted::User;
        }
        let nr = regs.orig_rax;
        match regs.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => Interrupted::Restart { nr, kind: RestartKind::Reissue },
            ERESTART_RESTARTBLOCK => Interrupted::Restart { nr, kind: RestartKind::RestartBlock },
            r if r == -(libc::EINTR as i64) && lookup(EINTR_CLASS, nr).is_some() && !caught_pending => {
                Interrupted::Rewound { nr }
            }
            _ => Interrupted::Completed { nr },
        }
    }

    /// Where the thread resumes and with which `rax`: the recipe the
    /// loader follows after restoring every other register.
    pub fn resume(&self, regs: &Regs) -> (u64, u64) {
        match *self {
            Interrupted::User | Interrupted::Completed { .. } => (regs.rip, regs.rax),
            Interrupted::Restart { kind: RestartKind::Reissue, .. } | Interrupted::Rewound { .. } => {
                (regs.rip - 2, regs.orig_rax)
            }
            Interrupted::Restart { kind: RestartKind::RestartBlock, .. } => (regs.rip - 2, NR_RESTART_SYSCALL),
        }
    }

    /// Was the thread inside (or just out of) a system call, so that
    /// `rip - 2` is its `syscall` instruction?
    pub fn in_syscall(&self) -> bool {
        !matches!(self, Interrupted::User)
    }
}

/// Is a signal with a handler pending and unblocked for thread `tid`?
/// (`SigPnd`/`ShdPnd` against `SigBlk` and `SigCgt` in its status.)
pub fn caught_signal_pending(pid: i32, tid: i32, blocked: u64) -> bool {
    let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else { return false };
    let hex = |name: &str| {
        st.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0)
    };
    (hex("SigPnd:") | hex("ShdPnd:")) & hex("SigCgt:") & !blocked != 0
}

/// The mappings of `pid` (start, end), for finding a stack's end.
pub fn mappings(pid: i32) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

/// Most stack scanned for the lock check.
const MAX_STACK_SCAN: u64 = 8 << 20;

/// The lock check at the stop: `Ok` or why the thread must be let go.
pub fn inspect(mem: &Mem, regs: &Regs, api: &LibcApi, maps: &[(u64, u64)]) -> Result<(), String> {
    // A glibc thread: tcbhead_t.tcb (offset 0) and .self (offset 16) both
    // point at the thread pointer.
    let fs = regs.fs_base;
    let tcb = if fs == 0 { None } else { mem.read_vec(fs, 24).ok() };
    let glibc_tcb = tcb.is_some_and(|t| {
        u64::from_le_bytes(t[0..8].try_into().unwrap()) == fs && u64::from_le_bytes(t[16..24].try_into().unwrap()) == fs
    });
    if !glibc_tcb {
        return Err(format!("fs_base {fs:#x} is not a glibc thread control block (a raw clone thread?)"));
    }
    let mut deny: Vec<&(String, u64, u64)> = api.deny.iter().collect();
    deny.sort_by_key(|d| d.1);
    let inside = |addr: u64| -> Option<&str> {
        let i = deny.partition_point(|d| d.1 <= addr);
        (i > 0 && addr < deny[i - 1].2).then(|| deny[i - 1].0.as_str())
    };
    if let Some(f) = inside(regs.rip) {
        return Err(format!("executing inside {f}"));
    }
    let sp = regs.rsp & !7;
    let end = maps
        .iter()
        .find(|&&(a, b)| a <= sp && sp < b)
        .map(|&(_, b)| b)
        .or_else(|| mappings(mem.pid()).into_iter().find(|&(a, b)| a <= sp && sp < b).map(|(_, b)| b))
        .unwrap_or(sp)
        .min(sp + MAX_STACK_SCAN);
    let mut at = sp;
    let mut buf = vec![0u8; 64 * 1024];
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        // A short read stops at the end of the mapping; a read of less
        // than a word (or none) ends the scan.
        let n = match mem.read(at, &mut buf[..want]) {
            Ok(n) if n >= 8 => n & !7,
            _ => break,
        };
        for (i, w) in buf[..n].chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            if let Some(f) = inside(v) {
                return Err(format!(
                    "its stack holds {v:#x}, inside {f} (at rsp+{:#x}): a frame of it may hold its locks",
                    at + i as u64 * 8 - sp
                ));
            }
        }
        at += n as u64;
    }
    Ok(())
}

/// §3.4: if the thread stopped inside its rseq critical section, the
/// address to resume at instead (`abort_ip`) and the `rseq_cs` word to
/// clear, as the kernel's `rseq_ip_fixup` would.
pub fn rseq_fixup(mem: &Mem, tid: i32, rip: u64) -> Option<(u64, u64)> {
    let area = crate::ptrace::rseq_area(tid)?;
    if area == 0 {
        return None;
    }
    // struct rseq: cpu_id_start u32, cpu_id u32, rseq_cs u64 (offset 8).
    let cs = mem.read_u64(area + 8).ok()?;
    if cs == 0 {
        return None;
    }
    // struct rseq_cs: version u32, flags u32, start_ip, post_commit_offset, abort_ip.
    let d = mem.read_vec(cs, 32).ok()?;
    let start = u64::from_le_bytes(d[8..16].try_into().unwrap());
    let len = u64::from_le_bytes(d[16..24].try_into().unwrap());
    let abort = u64::from_le_bytes(d[24..32].try_into().unwrap());
    (rip >= start && rip - start < len).then_some((abort, area + 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(orig: i64, rax: i64, rip: u64) -> Regs {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = orig as u64;
        r.rax = rax as u64;
        r.rip = rip;
        r
    }

    #[test]
    fn parses_the_syscall_file() {
        assert_eq!(parse_activity("running\n"), Some(Activity::Running));
        assert_eq!(parse_activity("-1 0x7ffd 0x4000\n"), Some(Activity::NotInSyscall));
        assert_eq!(
            parse_activity("230 0x0 0x0 0x7f00 0x0 0x1 0x2 0x7ffd1000 0x7f1234\n"),
            Some(Activity::Syscall { nr: 230, args: [0, 0, 0x7f00, 0, 1, 2] })
        );
    }

    #[test]
    fn classifies_and_builds_the_resume_recipe() {
        let user = regs(-1, 5, 0x1000);
        assert_eq!(Interrupted::classify(&user, false), Interrupted::User);
        assert_eq!(Interrupted::User.resume(&user), (0x1000, 5));

        let read = regs(0, ERESTARTSYS, 0x2002);
        let i = Interrupted::classify(&read, false);
        assert_eq!(i, Interrupted::Restart { nr: 0, kind: RestartKind::Reissue });
        assert_eq!(i.resume(&read), (0x2000, 0));

        let sleep = regs(230, ERESTART_RESTARTBLOCK, 0x3002);
        let i = Interrupted::classify(&sleep, false);
        assert_eq!(i.resume(&sleep), (0x3000, NR_RESTART_SYSCALL));

        let done = regs(1, 7, 0x4002);
        assert_eq!(Interrupted::classify(&done, false), Interrupted::Completed { nr: 1 });
        assert_eq!(Interrupted::Completed { nr: 1 }.resume(&done), (0x4002, 7));

        let epoll = regs(232, -4, 0x5002);
        assert_eq!(Interrupted::classify(&epoll, false), Interrupted::Rewound { nr: 232 });
        assert_eq!(Interrupted::Rewound { nr: 232 }.resume(&epoll), (0x5000, 232));
        assert_eq!(
            Interrupted::classify(&epoll, true),
            Interrupted::Completed { nr: 232 },
            "a handler would EINTR it anyway"
        );
        // A read's EINTR is not ours (reads return -ERESTARTSYS when stopped).
        assert_eq!(Interrupted::classify(&regs(0, -4, 0x6002), false), Interrupted::Completed { nr: 0 });
    }

    #[test]
    fn names_system_calls() {
        assert_eq!(syscall_name(232), "epoll_wait");
        assert_eq!(syscall_name(202), "futex");
        assert_eq!(syscall_name(9999), "system call 9999");
    }
}
