//! ptrace, one thread at a time: seize, interrupt, decode `waitid`
//! events, registers, extended state, signal mask, rseq configuration,
//! detach.
//!
//! Thin wrappers over the raw requests (rustix style: one facility, raw
//! calls kept here). Every wrapper takes the thread id; nothing here
//! keeps state. The policy (what to do with each event) is the caller's:
//! [`crate::remote`] and the protocol in `lib.rs`.
//!
//! # Events
//!
//! With `PTRACE_SEIZE`, `waitid(P_PID, tid, WSTOPPED | WEXITED | __WALL)`
//! reports (`si_code`, `si_status`; see ptrace(2)):
//!
//! | `si_status`                          | meaning                                   |
//! |--------------------------------------|-------------------------------------------|
//! | `SIGTRAP \| PTRACE_EVENT_STOP << 8`  | our `PTRACE_INTERRUPT` (or a ptrace trap) |
//! | `SIGSTOP…SIGTTOU \| EVENT_STOP << 8` | group-stop: the process was stopped      |
//! | `SIGTRAP \| 0x80`                    | syscall-enter or -exit stop (`TRACESYSGOOD`) |
//! | `SIGTRAP \| PTRACE_EVENT_EXEC << 8`  | the process called `execve`              |
//! | any other signal number              | signal-delivery-stop: a real signal       |
//! | `CLD_EXITED` / `CLD_KILLED`          | the thread is gone                        |
//!
//! `__WALL` is needed because non-leader threads are "clone" children.
//! Exits are peeked with `WNOWAIT` first: a thread that is our own child
//! (a test harness injecting into the program it spawned) is left for its
//! parent code to reap; any other traced thread is reaped here, or its
//! thread group could not finish exiting.

use std::io;
use std::mem::MaybeUninit;

/// `PTRACE_GETREGSET` note type of the XSAVE area.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// `PTRACE_GETREGSET` note type of the FXSAVE area (no XSAVE on the CPU).
const NT_PRFPREG: libc::c_int = 2;
/// `PTRACE_GET_SYSCALL_INFO` (Linux 5.3).
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// `PTRACE_SYSCALL_INFO_ENTRY`.
pub const SYSCALL_INFO_ENTRY: u8 = 1;
/// `PTRACE_SYSCALL_INFO_EXIT`.
pub const SYSCALL_INFO_EXIT: u8 = 2;
/// Room for the XSAVE area: the kernel tells the real size (x87, SSE,
/// AVX, AVX-512, PKRU, AMX tile data: about 11 KiB today).
const XSTATE_ROOM: usize = 32 * 1024;

/// The general-purpose registers (`struct user_regs_struct`).
pub type Regs = libc::user_regs_struct;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// One raw request.
fn request(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes, for its request, either integers or a
    // pointer to a live buffer of the size the kernel writes or reads.
    check(unsafe { libc::ptrace(req, tid, addr as *mut libc::c_void, data as *mut libc::c_void) })
}

/// `PTRACE_SEIZE` with `TRACESYSGOOD | TRACEEXEC` (never `EXITKILL`: the
/// target must survive our death). The thread keeps running.
pub fn seize(tid: i32) -> io::Result<()> {
    let opts = (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACEEXEC) as usize;
    request(libc::PTRACE_SEIZE, tid, 0, opts).map(drop)
}

/// `PTRACE_INTERRUPT`: stop the seized thread at its next chance
/// (reported as `PTRACE_EVENT_STOP` with `SIGTRAP`).
pub fn interrupt(tid: i32) -> io::Result<()> {
    request(libc::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

/// `PTRACE_DETACH`, delivering `sig` (0: none).
pub fn detach(tid: i32, sig: i32) -> io::Result<()> {
    request(libc::PTRACE_DETACH, tid, 0, sig as usize).map(drop)
}

/// `PTRACE_SYSCALL`: run to the next syscall-enter/-exit stop.
pub fn resume_syscall(tid: i32, sig: i32) -> io::Result<()> {
    request(libc::PTRACE_SYSCALL, tid, 0, sig as usize).map(drop)
}

/// `PTRACE_CONT`.
pub fn resume(tid: i32, sig: i32) -> io::Result<()> {
    request(libc::PTRACE_CONT, tid, 0, sig as usize).map(drop)
}

/// `PTRACE_GETREGS`.
pub fn get_regs(tid: i32) -> io::Result<Regs> {
    let mut regs = MaybeUninit::<Regs>::zeroed();
    request(libc::PTRACE_GETREGS, tid, 0, regs.as_mut_ptr() as usize)?;
    // SAFETY: zero-initialised plain integers, filled by the kernel.
    Ok(unsafe { regs.assume_init() })
}

/// `PTRACE_SETREGS`.
pub fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    request(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as usize).map(drop)
}

/// The thread's extended state as the kernel exports it.
#[derive(Clone)]
pub enum FpState {
    /// `NT_X86_XSTATE`: the standard (non-compacted) XSAVE layout, 64-bit
    /// form, as `XRSTOR64` reads it; the header's `XSTATE_BV` says which
    /// components are not in their initial state.
    Xsave(Vec<u8>),
    /// `NT_PRFPREG`: the 512-byte FXSAVE64 area (CPU without XSAVE).
    Fxsave(Vec<u8>),
}

impl FpState {
    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            FpState::Xsave(b) | FpState::Fxsave(b) => b,
        }
    }

    /// `XSTATE_BV` (bytes 512..520 of an XSAVE area).
    pub fn xstate_bv(&self) -> u64 {
        match self {
            FpState::Xsave(b) if b.len() >= 520 => u64::from_le_bytes(b[512..520].try_into().unwrap()),
            _ => 0,
        }
    }
}

fn get_regset(tid: i32, note: libc::c_int, room: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; room];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    request(libc::PTRACE_GETREGSET, tid, note as usize, &mut iov as *mut libc::iovec as usize)?;
    // The kernel shrinks iov_len to what it wrote.
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// The extended state (XSAVE area, or FXSAVE where the CPU has no XSAVE).
pub fn get_fpstate(tid: i32) -> io::Result<FpState> {
    match get_regset(tid, NT_X86_XSTATE, XSTATE_ROOM) {
        Ok(b) => Ok(FpState::Xsave(b)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) || e.raw_os_error() == Some(libc::EINVAL) => {
            get_regset(tid, NT_PRFPREG, 512).map(FpState::Fxsave)
        }
        Err(e) => Err(e),
    }
}

/// Writes back what [`get_fpstate`] returned.
pub fn set_fpstate(tid: i32, st: &FpState) -> io::Result<()> {
    let (note, bytes) = match st {
        FpState::Xsave(b) => (NT_X86_XSTATE, b),
        FpState::Fxsave(b) => (NT_PRFPREG, b),
    };
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    request(libc::PTRACE_SETREGSET, tid, note as usize, &mut iov as *mut libc::iovec as usize).map(drop)
}

/// `PTRACE_GETSIGMASK`: the thread's real blocked set, even inside
/// `ppoll`/`pselect6`/`rt_sigsuspend` (the kernel returns
/// `saved_sigmask` while `TIF_RESTORE_SIGMASK` is set).
pub fn get_sigmask(tid: i32) -> io::Result<u64> {
    let mut mask = 0u64;
    request(libc::PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize)?;
    Ok(mask)
}

/// `PTRACE_SETSIGMASK` (also clears `TIF_RESTORE_SIGMASK`; `SIGKILL`
/// and `SIGSTOP` are silently kept unblocked by the kernel).
pub fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
    request(libc::PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as usize).map(drop)
}

/// At a syscall stop: `PTRACE_SYSCALL_INFO_ENTRY` or `_EXIT`, and the
/// system call number at entry.
pub fn syscall_stop_kind(tid: i32) -> io::Result<(u8, u64)> {
    // struct ptrace_syscall_info: op u8, pad[3], arch u32,
    // instruction_pointer u64, stack_pointer u64, then the union whose
    // `entry.nr` is the first u64.
    let mut buf = [0u8; 88];
    request(PTRACE_GET_SYSCALL_INFO, tid, buf.len(), buf.as_mut_ptr() as usize)?;
    Ok((buf[0], u64::from_le_bytes(buf[24..32].try_into().unwrap())))
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`: the thread's registered `struct rseq`
/// address, if any (`None` when the kernel lacks the request, 0 when the
/// thread registered none).
pub fn rseq_area(tid: i32) -> Option<u64> {
    // struct ptrace_rseq_configuration: rseq_abi_pointer u64,
    // rseq_abi_size u32, signature u32, flags u32, pad u32.
    let mut buf = [0u8; 24];
    request(PTRACE_GET_RSEQ_CONFIGURATION, tid, buf.len(), buf.as_mut_ptr() as usize).ok()?;
    Some(u64::from_le_bytes(buf[0..8].try_into().unwrap()))
}

/// A decoded `waitid` event of one traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `PTRACE_EVENT_STOP` with `SIGTRAP`: our interrupt.
    Interrupted,
    /// `PTRACE_EVENT_STOP` with a stop signal: group-stop.
    GroupStop(i32),
    /// A syscall-enter or -exit stop.
    Syscall,
    /// `PTRACE_EVENT_EXEC`.
    Exec,
    /// Another `PTRACE_EVENT_*` (not requested; reported for completeness).
    OtherEvent(i32),
    /// Signal-delivery-stop of a real signal, not yet delivered.
    Signal(i32),
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

fn waitid_raw(tid: i32, flags: libc::c_int) -> io::Result<libc::siginfo_t> {
    loop {
        let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: `info` is a writable siginfo_t.
        let rc = unsafe { libc::waitid(libc::P_PID, tid as libc::id_t, info.as_mut_ptr(), flags) };
        if rc == 0 {
            // SAFETY: zero-initialised and filled by the kernel.
            return Ok(unsafe { info.assume_init() });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Is `tid` a child process of ours (its real parent is us)? Such a
/// process is reaped by whoever spawned it, not here.
fn is_our_child(tid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<i32>().ok());
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    field("PPid:") == Some(me) && field("Tgid:") == Some(tid)
}

/// Waits for the next event of the traced thread `tid` (blocking).
pub fn wait_event(tid: i32) -> io::Result<Event> {
    let flags = libc::WSTOPPED | libc::WEXITED | libc::__WALL;
    loop {
        let info = waitid_raw(tid, flags | libc::WNOWAIT)?;
        // SAFETY: the kernel filled the SIGCHLD fields of siginfo.
        let status = unsafe { info.si_status() };
        match info.si_code {
            libc::CLD_EXITED | libc::CLD_KILLED | libc::CLD_DUMPED => {
                if !is_our_child(tid) {
                    waitid_raw(tid, flags)?;
                }
                return Ok(if info.si_code == libc::CLD_EXITED {
                    Event::Exited(status)
                } else {
                    Event::Killed(status)
                });
            }
            _ => {
                // Consume the stop. Without WEXITED a racing exit is not
                // reaped here; with WNOHANG a stop that turned into an
                // exit (SIGKILL) meanwhile sends us round again.
                let consumed = waitid_raw(tid, libc::WSTOPPED | libc::__WALL | libc::WNOHANG)?;
                // SAFETY: as above; si_pid is 0 when nothing was consumed.
                if unsafe { consumed.si_pid() } != 0 {
                    return Ok(decode_stop(status));
                }
            }
        }
    }
}

/// Decodes the `si_status` of a ptrace stop (`signal | event << 8`).
pub fn decode_stop(status: i32) -> Event {
    let sig = status & 0xff;
    let event = (status >> 8) & 0xff;
    if sig == (libc::SIGTRAP | 0x80) {
        return Event::Syscall;
    }
    match event {
        0 => Event::Signal(sig),
        e if e == libc::PTRACE_EVENT_STOP => {
            if sig == libc::SIGTRAP {
                Event::Interrupted
            } else {
                Event::GroupStop(sig)
            }
        }
        e if e == libc::PTRACE_EVENT_EXEC => Event::Exec,
        e => Event::OtherEvent(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_stop_kinds() {
        let ev_stop = libc::PTRACE_EVENT_STOP << 8;
        assert_eq!(decode_stop(libc::SIGTRAP | ev_stop), Event::Interrupted);
        assert_eq!(decode_stop(libc::SIGSTOP | ev_stop), Event::GroupStop(libc::SIGSTOP));
        assert_eq!(decode_stop(libc::SIGTTIN | ev_stop), Event::GroupStop(libc::SIGTTIN));
        assert_eq!(decode_stop(libc::SIGTRAP | 0x80), Event::Syscall);
        assert_eq!(decode_stop(libc::SIGTRAP | (libc::PTRACE_EVENT_EXEC << 8)), Event::Exec);
        assert_eq!(decode_stop(libc::SIGALRM), Event::Signal(libc::SIGALRM));
        assert_eq!(
            decode_stop(libc::SIGTRAP | (libc::PTRACE_EVENT_CLONE << 8)),
            Event::OtherEvent(libc::PTRACE_EVENT_CLONE)
        );
    }
}
