//! Running under a user-mode emulator (qemu-user): detecting it, its own
//! threads, and which signals a program can send there.
//!
//! qemu-user runs a guest program in one host process, and two of its
//! traits break what the rendezvous of `sync` assumes of a process
//! (`.ci/aarch64-qemu-signals.c` shows both outside textpoke):
//!
//! - **Its own threads are listed.** `/proc/self/task` is the host's: it
//!   holds qemu's `call_rcu` thread, which the program did not create,
//!   which runs no guest code and which blocks every asynchronous signal
//!   (all but `SIGSEGV`, `SIGFPE`, `SIGILL`; qemu's `qemu_thread_create`),
//!   so it never answers a signal. [`is_emulator_thread`] recognises such
//!   a thread from its host signal mask; a guest thread's host mask is
//!   empty (qemu keeps the guest's masks itself) but for microseconds
//!   while qemu delivers a signal.
//! - **Not every signal number exists.** qemu maps guest real-time signals
//!   onto the host's, minus those glibc and qemu reserve: under
//!   qemu-aarch64 7.2 on an x86-64 host, guest signals 63 and 64
//!   (`SIGRTMAX - 1` and `SIGRTMAX`) have no host signal. `sigaction` on
//!   them succeeds and does nothing; sending one fails with `EINVAL`
//!   ([`can_send_to_self`] finds out without a handler).
//!
//! [`user_mode_emulator`] tells whether the process runs under qemu-user:
//! qemu answers `/proc/self/exe` with the guest program, while the
//! kernel's own view through the thread's directory,
//! `/proc/self/task/TID/exe`, names the emulator, a `qemu-*` binary. On a
//! kernel running the program natively both are the same file. Other
//! emulators that answer `/proc/self/exe` the same way (valgrind does) are
//! not taken for qemu: their threads' host masks mean other things
//! (valgrind blocks signals in every thread waiting for its lock), and
//! leaving one of those threads out of a rendezvous would be wrong.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const NATIVE: u8 = 1;
const EMULATED: u8 = 2;
static DETECTED: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether this process runs under qemu-user (module docs).
/// The first call allocates (it reads two links); later calls are one
/// atomic load, allocation-free and async-signal-safe.
pub fn user_mode_emulator() -> bool {
    // Relaxed: the value is computed the same by every thread; nothing
    // else is published with it.
    match DETECTED.load(Ordering::Relaxed) {
        NATIVE => false,
        EMULATED => true,
        _ => {
            let emulated = detect();
            DETECTED.store(if emulated { EMULATED } else { NATIVE }, Ordering::Relaxed);
            emulated
        }
    }
}

#[cold]
fn detect() -> bool {
    let told = std::fs::read_link("/proc/self/exe");
    let kernel = std::fs::read_link(format!("/proc/self/task/{}/exe", super::gettid()));
    let is_qemu = |p: &std::path::Path| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu-"));
    matches!((told, kernel), (Ok(a), Ok(b)) if a != b && is_qemu(&b))
}

/// The signals a thread of the emulator blocks and a guest thread's host
/// mask does not: every signal but `SIGKILL`, `SIGSTOP`, the synchronous
/// ones (qemu leaves some of those open to report its own crashes) and
/// glibc's two internal ones (32 and 33, never blocked by
/// `pthread_sigmask`), as bits of `/proc`'s `SigBlk` (bit `n - 1` for
/// signal `n`).
const ASYNC_SIGNALS: u64 = {
    let mut mask = u64::MAX;
    let never = [
        libc::SIGKILL,
        libc::SIGSTOP,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
        libc::SIGSYS,
        libc::SIGABRT,
        32,
        33,
    ];
    let mut i = 0;
    while i < never.len() {
        mask &= !(1u64 << (never[i] - 1));
        i += 1;
    }
    mask
};

/// Under qemu-user, whether thread `tid` blocks every
/// asynchronous signal in its host mask: one of the emulator's own
/// threads, or a guest thread caught in the microseconds in which qemu
/// blocks everything to deliver a signal (callers look again later, after
/// the thread failed to answer). `false` when not emulated, or when the
/// thread is gone. Allocation-free: the caller may have threads parked
/// that hold malloc's lock.
pub fn is_emulator_thread(tid: i32) -> bool {
    user_mode_emulator() && host_blocked_mask(tid).is_some_and(blocks_every_async_signal)
}

/// Whether a `SigBlk` mask holds every signal of [`ASYNC_SIGNALS`].
fn blocks_every_async_signal(mask: u64) -> bool {
    mask & ASYNC_SIGNALS == ASYNC_SIGNALS
}

/// `SigBlk` of `/proc/self/task/TID/status`, read without allocating.
fn host_blocked_mask(tid: i32) -> Option<u64> {
    let mut path = [0u8; 48];
    write_task_path(&mut path, tid, b"/status")?;
    // SAFETY: `path` is NUL-terminated (write_task_path leaves the rest zero).
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: `buf[n..]` is writable for its length.
        let r = unsafe { libc::read(fd, buf[n..].as_mut_ptr().cast(), buf.len() - n) };
        if r <= 0 {
            break;
        }
        n += r as usize;
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    parse_sigblk(&buf[..n])
}

/// Writes `/proc/self/task/TID<tail>` into `out`; its length.
fn write_task_path(out: &mut [u8], tid: i32, tail: &[u8]) -> Option<usize> {
    const HEAD: &[u8] = b"/proc/self/task/";
    let mut digits = [0u8; 10];
    let (mut v, mut nd) = (u32::try_from(tid).ok()?, 0);
    loop {
        digits[nd] = b'0' + (v % 10) as u8;
        nd += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = HEAD.len() + nd + tail.len();
    if len >= out.len() {
        return None;
    }
    out[..HEAD.len()].copy_from_slice(HEAD);
    for i in 0..nd {
        out[HEAD.len() + i] = digits[nd - 1 - i];
    }
    out[HEAD.len() + nd..len].copy_from_slice(tail);
    Some(len)
}

fn parse_sigblk(status: &[u8]) -> Option<u64> {
    let at = status.windows(7).position(|w| w == b"SigBlk:")? + 7;
    let mut mask = 0u64;
    let mut seen = false;
    for &c in &status[at..] {
        let d = match c {
            b' ' | b'\t' if !seen => continue,
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => break,
        };
        mask = (mask << 4) | d as u64;
        seen = true;
    }
    seen.then_some(mask)
}

/// Whether this process can send itself signal `sig`: it is blocked on
/// the calling thread for the probe, queued to the thread
/// (`rt_tgsigqueueinfo`), taken back with `sigtimedwait`, and the mask
/// restored; no handler runs. `Err` with the kernel's (or the emulator's)
/// error, `EINVAL` for a number the emulator has no host signal for. A
/// signal already pending on the thread is left alone (and counts as one
/// that can be sent).
pub fn can_send_to_self(sig: libc::c_int) -> io::Result<()> {
    let only = crate::signals::set_of(&[sig]);
    // SAFETY: sigset_t is plain data; zeroed is a valid (empty) value.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid for the call.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &only, &mut old) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let result = probe_blocked(sig, &only);
    // SAFETY: `old` is the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

/// The probe of [`can_send_to_self`], with `sig` blocked on this thread.
fn probe_blocked(sig: libc::c_int, only: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; zeroed is a valid (empty) value.
    let mut pending: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `pending` is valid for writes; sigismember reads the set
    // sigpending filled.
    let already = unsafe { libc::sigpending(&mut pending) == 0 && libc::sigismember(&pending, sig) == 1 };
    if already {
        return Ok(()); // someone's instance: leave it for its owner
    }
    crate::threads::signal_thread(crate::gettid(), sig, 0)?;
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `only` and `zero` are valid for the call; the siginfo is not wanted.
    let taken = unsafe { libc::sigtimedwait(only, std::ptr::null_mut(), &zero) };
    if taken == sig {
        Ok(())
    } else {
        // Queued (the send succeeded) but not seen pending: not deliverable.
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_blocked_mask() {
        let status = b"Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\tfffffffe7ffbfa77\nSigIgn:\t0\n";
        assert_eq!(parse_sigblk(status), Some(0xffff_fffe_7ffb_fa77));
        assert_eq!(parse_sigblk(b"SigPnd:\t0\n"), None);
    }

    #[test]
    fn qemus_thread_mask_blocks_every_async_signal() {
        // The mask of qemu-aarch64 7.2's call_rcu thread, and a guest
        // thread's usual one.
        assert!(blocks_every_async_signal(0xffff_fffe_7ffb_fa77));
        assert!(!blocks_every_async_signal(0));
        // A thread blocking everything but SIGUSR1 is not the emulator's.
        assert!(!blocks_every_async_signal(!(1 << (libc::SIGUSR1 - 1))));
    }

    #[test]
    fn task_paths() {
        let mut out = [0u8; 48];
        let n = write_task_path(&mut out, 12345, b"/status").unwrap();
        assert_eq!(&out[..n], b"/proc/self/task/12345/status");
        assert_eq!(out[n], 0);
        assert!(write_task_path(&mut out, -1, b"/status").is_none());
    }

    #[test]
    fn own_thread_is_not_the_emulators_and_sigusr2_can_be_sent() {
        // This thread's host mask is empty natively and under qemu.
        assert!(!is_emulator_thread(crate::gettid()));
        can_send_to_self(libc::SIGUSR2).unwrap();
        // Nothing left pending.
        // SAFETY: sigset_t is plain data; zeroed is a valid value.
        let mut pending: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid for writes.
        assert_eq!(unsafe { libc::sigpending(&mut pending) }, 0);
        // SAFETY: filled above.
        assert_eq!(unsafe { libc::sigismember(&pending, libc::SIGUSR2) }, 0);
    }

    #[test]
    fn an_impossible_signal_number_cannot_be_sent() {
        assert!(can_send_to_self(200).is_err());
    }
}
