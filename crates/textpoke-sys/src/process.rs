//! Whole processes: signalling one (`kill`), a descriptor for one
//! (`pidfd_open`), replacing this one (`execveat`) and ending it
//! (`exit_group`), as raw system calls where the C library's wrapper may
//! be interposed (by textpoke's own agent) or may run exit handlers.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Sends `sig` to process `pid` (`kill(2)`); `sig == 0` only checks that
/// the process exists (a zombie included). Errors: `ESRCH` when no process
/// has that pid, `EPERM` when one exists that may not be signalled.
/// Async-signal-safe.
pub fn kill_process(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes integers only.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor for process `pid` (`pidfd_open(pid, 0)`, close-on-exec):
/// it becomes readable when the process exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1.
    let fd = super::cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: a new descriptor, owned by the result.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The `execveat(2)` system call itself (not the C library's wrapper,
/// which textpoke's agent interposes): returns only on failure, -1 with
/// `errno` set.
///
/// # Safety
///
/// `path` is a NUL-terminated string and `argv` and `envp` are
/// null-terminated arrays of them, as `execveat(2)` wants; `dirfd` is a
/// descriptor or `AT_FDCWD`.
pub unsafe fn execveat(
    dirfd: libc::c_int,
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    flags: libc::c_int,
) -> libc::c_int {
    // SAFETY: the caller's guarantee.
    unsafe { libc::syscall(libc::SYS_execveat, dirfd, path, argv, envp, flags) as libc::c_int }
}

/// Ends the process with `status` at once (`exit_group(2)`): no exit
/// handler, no flush of stdio. Async-signal-safe.
pub fn exit_group(status: libc::c_int) -> ! {
    loop {
        // SAFETY: ends the process; the loop only satisfies the type.
        unsafe { libc::syscall(libc::SYS_exit_group, status) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_with_signal_zero_tells_whether_a_process_exists() {
        kill_process(super::super::threads::getpid(), 0).unwrap();
        // Above pid_max (at most 2^22): no such process.
        let err = kill_process(1 << 30, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn a_pidfd_of_an_exited_child_is_readable() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let opened = pidfd_open(child.id() as i32);
        child.wait().unwrap();
        let pidfd = match opened {
            Ok(fd) => fd,
            // Linux before 5.3, or a seccomp filter: nothing to check.
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return,
            Err(e) => panic!("pidfd_open: {e}"),
        };
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        assert_ne!(pfd.revents & libc::POLLIN, 0);
    }
}
