//! The target's memory, and system calls run on its stopped thread.
//!
//! # Memory
//!
//! [`Mem`] reads and writes with `process_vm_readv`/`process_vm_writev`
//! (one system call, no stop needed), falling back to `/proc/PID/mem`
//! where those are refused. Reads of link maps, symbol tables and stacks
//! go through it; nothing is ever written into memory the program uses:
//! only into the scratch mapping this crate created.
//!
//! # Remote system calls
//!
//! A remote system call needs no code and no stack in the target (§4 of
//! the design note; Frida's `RemoteCallBuilder` for the `orig_rax` rule):
//!
//! 1. Registers = the saved ones with `rip` = an existing `syscall`
//!    instruction (the *gadget*: `rip - 2` of the interrupted call,
//!    checked to hold `0f 05`, else the one inside libc's `syscall()`),
//!    `rax` = number, `rdi, rsi, rdx, r10, r8, r9` = arguments and
//!    `orig_rax = -1`, so that the kernel's restart logic never fires on
//!    these modified registers.
//! 2. `PTRACE_SYSCALL` → syscall-enter stop; checked with
//!    `PTRACE_GET_SYSCALL_INFO` to be the call we asked for.
//! 3. `PTRACE_SYSCALL` → syscall-exit stop; `rax` is the result.
//!
//! Nothing is written into code other threads run (kubo/injector's
//! `kick_then_wait_sigtrap` overwrites libc's entry point instead).
//!
//! Events met while waiting: our own interrupt again (ignored), a
//! group-stop (noted; the thread is resumed, it rejoins the stop when
//! detached), a signal-delivery-stop (only `SIGSTOP` can get through the
//! all-blocked mask of step 1 of the protocol: it is held back and
//! re-sent to the process after the detach), exec and exit (the
//! injection is over).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::error::{InjectError, Result};
use crate::ptrace::{self, Event, Regs};

/// The memory of process `pid`.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    pid: i32,
}

impl Mem {
    /// The memory of `pid`.
    pub fn new(pid: i32) -> Mem {
        Mem { pid }
    }

    /// Whose memory this is.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn mem_file(&self, write: bool) -> io::Result<File> {
        std::fs::OpenOptions::new().read(true).write(write).open(format!("/proc/{}/mem", self.pid))
    }

    /// Reads up to `buf.len()` bytes at `addr`; stops early at an unmapped
    /// page. Returns the count read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` describes our live, writable buffer; `remote` is
        // only an address in the other process, checked by the kernel.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) => self.mem_file(false)?.read_at(buf, addr),
            _ => Err(e),
        }
    }

    /// Reads exactly `buf.len()` bytes at `addr`.
    pub fn read_exact(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read(addr + done as u64, &mut buf[done..]) {
                Ok(0) => return Err(self.fault(addr + done as u64, io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) => return Err(self.fault(addr + done as u64, e)),
            }
        }
        Ok(())
    }

    /// `len` bytes at `addr`.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_exact(addr, &mut v)?;
        Ok(v)
    }

    /// The little-endian `u64` at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The little-endian `u32` at `addr`.
    pub fn read_u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The NUL-terminated string at `addr`, at most `max` bytes.
    pub fn read_cstr(&self, addr: u64, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        while out.len() < max {
            let n = self.read(addr + out.len() as u64, &mut chunk).map_err(|e| self.fault(addr, e))?;
            if n == 0 {
                return Err(self.fault(addr + out.len() as u64, io::ErrorKind::UnexpectedEof.into()));
            }
            if let Some(end) = chunk[..n].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..end]);
                out.truncate(max);
                return Ok(out);
            }
            out.extend_from_slice(&chunk[..n]);
        }
        out.truncate(max);
        Ok(out)
    }

    /// Writes all of `bytes` at `addr` (only ever into our own scratch).
    pub fn write_all(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        let local = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: bytes.len() };
        // SAFETY: `local` describes our live buffer (only read); `remote`
        // is checked by the kernel.
        let n = unsafe { libc::process_vm_writev(self.pid, &local, 1, &remote, 1, 0) };
        if n == bytes.len() as isize {
            return Ok(());
        }
        // Short or refused: /proc/PID/mem (also writes through to a
        // read-only page, which we never need but do not mind).
        let f = self.mem_file(true).map_err(|e| self.fault(addr, e))?;
        f.write_all_at(bytes, addr).map_err(|e| self.fault(addr, e))
    }

    fn fault(&self, addr: u64, source: io::Error) -> InjectError {
        if source.raw_os_error() == Some(libc::ESRCH) {
            return InjectError::ExitedDuringInjection {
                pid: self.pid,
                tid: self.pid,
                how: "gone while its memory was read".into(),
            };
        }
        InjectError::Memory { pid: self.pid, addr, source }
    }
}

/// What happened around the remote calls that the caller must act on
/// after the detach.
#[derive(Debug, Default, Clone)]
pub struct Noted {
    /// The process entered a group-stop meanwhile (the thread rejoins it
    /// when detached; the loader then runs only after `SIGCONT`).
    pub group_stop: bool,
    /// Signals that reached a signal-delivery-stop and were held back;
    /// sent again to the process after the detach.
    pub held_signals: Vec<i32>,
}

/// System calls run on the stopped thread `tid`.
pub struct Remote {
    pid: i32,
    tid: i32,
    gadget: u64,
    base: Regs,
    /// System calls run so far.
    pub count: u32,
    /// Events to act on after the detach.
    pub noted: Noted,
}

impl Remote {
    /// Remote calls on `tid` of `pid`, stepping over the `syscall`
    /// instruction at `gadget`; `base` gives the registers not used by a
    /// call (the saved ones: segment and TLS registers stay as they are).
    pub fn new(pid: i32, tid: i32, gadget: u64, base: Regs) -> Remote {
        Remote { pid, tid, gadget, base, count: 0, noted: Noted::default() }
    }

    /// Runs system call `nr` with `args`; the result, or the target's
    /// error number as [`InjectError::RemoteSyscall`].
    pub fn syscall(&mut self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let mut regs = self.base;
        regs.rip = self.gadget;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        ptrace::set_regs(self.tid, &regs).map_err(|e| self.perr("SETREGS", e))?;
        self.step_to(ptrace::SYSCALL_INFO_ENTRY, nr)?;
        self.step_to(ptrace::SYSCALL_INFO_EXIT, nr)?;
        let out = ptrace::get_regs(self.tid).map_err(|e| self.perr("GETREGS", e))?;
        self.count += 1;
        let rax = out.rax as i64;
        if (-4095..0).contains(&rax) {
            return Err(InjectError::RemoteSyscall {
                pid: self.pid,
                name,
                source: io::Error::from_raw_os_error(-rax as i32),
            });
        }
        Ok(out.rax)
    }

    /// `PTRACE_SYSCALL` until the syscall stop of kind `want`.
    fn step_to(&mut self, want: u8, nr: i64) -> Result<()> {
        let mut sig = 0;
        loop {
            ptrace::resume_syscall(self.tid, sig).map_err(|e| self.perr("SYSCALL", e))?;
            sig = 0;
            match ptrace::wait_event(self.tid).map_err(|e| self.perr("waitid", e))? {
                Event::Syscall => {
                    let (kind, at_nr) =
                        ptrace::syscall_stop_kind(self.tid).map_err(|e| self.perr("GET_SYSCALL_INFO", e))?;
                    if kind == want && (want != ptrace::SYSCALL_INFO_ENTRY || at_nr == nr as u64) {
                        return Ok(());
                    }
                    return Err(InjectError::Io {
                        what: format!(
                            "thread {}: expected a syscall-{} stop of call {nr}, got kind {kind} of call {at_nr}",
                            self.tid,
                            if want == ptrace::SYSCALL_INFO_ENTRY { "enter" } else { "exit" }
                        ),
                        source: io::ErrorKind::InvalidData.into(),
                    });
                }
                Event::Interrupted | Event::OtherEvent(_) => {}
                Event::GroupStop(_) => self.noted.group_stop = true,
                Event::Signal(s) => {
                    // Everything but SIGKILL/SIGSTOP is blocked: hold the
                    // signal back and re-send it after the detach, so that
                    // no handler runs on this thread in the middle of our
                    // calls (its rt_sigreturn would reset restart_block).
                    self.noted.held_signals.push(s);
                }
                Event::Exec => return Err(InjectError::ExecDuringInjection { pid: self.pid }),
                ev @ (Event::Exited(_) | Event::Killed(_)) => return Err(exited(self.pid, self.tid, ev)),
            }
        }
    }

    fn perr(&self, op: &'static str, source: io::Error) -> InjectError {
        ptrace_error(self.pid, self.tid, op, source)
    }
}

/// A ptrace failure. `ESRCH` on a thread we hold stopped means it was
/// killed (`SIGKILL` ends a ptrace stop): reported as an exit once its
/// `/proc` entry shows it dying, which takes a moment.
pub(crate) fn ptrace_error(pid: i32, tid: i32, op: &'static str, source: io::Error) -> InjectError {
    if source.raw_os_error() == Some(libc::ESRCH) {
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"));
            let dying = match &stat {
                Err(_) => true,
                Ok(s) => matches!(crate::precheck::stat_state(s), Some('Z') | Some('X') | None),
            };
            if dying {
                return InjectError::ExitedDuringInjection {
                    pid,
                    tid,
                    how: format!("killed or exited (ptrace {op}: ESRCH)"),
                };
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    InjectError::Ptrace { op, tid, source }
}

/// The error for an exit event.
pub(crate) fn exited(pid: i32, tid: i32, ev: Event) -> InjectError {
    let how = match ev {
        Event::Exited(c) => format!("exited with status {c}"),
        Event::Killed(s) => format!("killed by signal {s}"),
        other => format!("{other:?}"),
    };
    InjectError::ExitedDuringInjection { pid, tid, how }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_memory() {
        static DATA: [u8; 9] = *b"textpoke\0";
        let mem = Mem::new(std::process::id() as i32);
        let addr = DATA.as_ptr() as u64;
        assert_eq!(mem.read_vec(addr, 8).unwrap(), b"textpoke");
        assert_eq!(mem.read_cstr(addr, 100).unwrap(), b"textpoke");
        assert_eq!(mem.read_cstr(addr, 4).unwrap(), b"text");
        assert!(mem.read_u64(8).is_err(), "page 0 is never mapped");
    }
}
