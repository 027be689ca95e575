//! The threads of this process: their ids, listing them without
//! allocating, signalling one of them, what `/proc` says of one, and the
//! per-thread facilities of the C library (thread-specific data keys,
//! fork handlers, `errno`).
//!
//! Listing reads `/proc/self/task` with raw `getdents64` into a buffer on
//! the stack, so it can run while other threads are parked in a signal
//! handler holding who knows which lock (malloc's included).

use std::io;

/// The calling thread's id.
#[inline]
pub fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// This process's id. Async-signal-safe.
#[inline]
pub fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Sends `sig` to thread `tid` of this process (`tgkill`); `sig == 0` only
/// checks that the thread exists. Errors: `ESRCH` when it has exited.
/// Async-signal-safe.
pub fn kill_thread(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    super::cvt(unsafe { libc::syscall(libc::SYS_tgkill, getpid(), tid, sig) }).map(drop)
}

/// Queues `sig` again to the calling thread with the siginfo `info`
/// (`rt_tgsigqueueinfo(getpid(), gettid(), sig, info)`): the kernel allows
/// any `si_code` for a process's own threads, so a fault handler can hand
/// the signal it took, siginfo and all, to the default action.
/// Async-signal-safe.
///
/// # Safety
///
/// `info` points to a valid `siginfo_t` (the one the kernel passed the
/// handler, typically).
pub unsafe fn requeue_to_self(sig: i32, info: *mut libc::siginfo_t) -> io::Result<()> {
    // SAFETY: a valid siginfo (the caller's guarantee) sent to this thread.
    super::cvt(unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, getpid(), gettid(), sig, info) }).map(drop)
}

/// Puts the calling thread in `SCHED_BATCH` (`sched_setscheduler(0, ...)`,
/// priority 0): it keeps its fair share of CPU time but does not preempt
/// the thread that woke it.
pub fn set_batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the calling thread, with a valid param.
    super::cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } as libc::c_long).map(drop)
}

/// Creates a thread-specific data key whose `destructor` runs, at a
/// thread's exit, with the thread's non-null value (`pthread_key_create`).
/// Keys below 32 keep their values in the thread descriptor: setting one
/// never allocates.
pub fn key_create(destructor: unsafe extern "C" fn(*mut libc::c_void)) -> io::Result<libc::pthread_key_t> {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; the destructor has the type
    // pthread expects.
    match unsafe { libc::pthread_key_create(&mut key, Some(destructor)) } {
        0 => Ok(key),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Sets the calling thread's value of `key` (`pthread_setspecific`).
/// Async-signal-safe for a key below 32 (nothing is allocated).
///
/// # Safety
///
/// `key` was made by [`key_create`], and `value` is what its destructor
/// expects to be called with.
pub unsafe fn set_specific(key: libc::pthread_key_t, value: *const libc::c_void) {
    // SAFETY: a valid key (the caller's guarantee); pthread only stores
    // the value.
    unsafe { libc::pthread_setspecific(key, value) };
}

/// Registers `child` to run in the child of every later `fork`, on its
/// one thread (`pthread_atfork` with no prepare or parent handler).
pub fn at_fork_child(child: unsafe extern "C" fn()) -> io::Result<()> {
    // SAFETY: registering a handler of the right type.
    match unsafe { libc::pthread_atfork(None, None, Some(child)) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The calling thread's `errno`.
#[inline(always)]
pub fn errno() -> i32 {
    // SAFETY: glibc's thread-local errno location, valid in every thread.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno` (code that must leave a program's
/// `errno` as it found it puts it back with this).
#[inline(always)]
pub fn set_errno(e: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}

/// Calls `f` with the id of every thread of this process. Allocation-free.
pub fn for_each_tid(mut f: impl FnMut(i32)) -> io::Result<()> {
    const PATH: &[u8] = b"/proc/self/task\0";
    // SAFETY: PATH is NUL-terminated.
    let fd = unsafe { libc::open(PATH.as_ptr().cast(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u64; 512]; // 4 KiB, 8-aligned for linux_dirent64
    let result = loop {
        // SAFETY: buf is writable for its full size.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), std::mem::size_of_val(&buf)) };
        if n < 0 {
            break Err(io::Error::last_os_error());
        }
        if n == 0 {
            break Ok(());
        }
        // SAFETY: the kernel filled `n` bytes of `buf`.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
        parse_dirents(bytes, &mut f);
    };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    result
}

/// Parses `linux_dirent64` records: d_ino u64, d_off i64, d_reclen u16,
/// d_type u8, then the NUL-terminated name.
fn parse_dirents(bytes: &[u8], f: &mut impl FnMut(i32)) {
    let mut off = 0;
    while off + 19 < bytes.len() {
        let reclen = u16::from_ne_bytes([bytes[off + 16], bytes[off + 17]]) as usize;
        if reclen == 0 {
            break;
        }
        let name = &bytes[off + 19..(off + reclen).min(bytes.len())];
        let mut tid: i32 = 0;
        let mut digits = 0;
        for &c in name.iter().take_while(|&&c| c != 0) {
            if !c.is_ascii_digit() {
                digits = 0;
                break;
            }
            tid = tid.wrapping_mul(10).wrapping_add((c - b'0') as i32);
            digits += 1;
        }
        if digits > 0 {
            f(tid);
        }
        off += reclen;
    }
}

/// Sends `sig` to thread `tid` of this process, with `value` in `si_value`
/// (`rt_tgsigqueueinfo`, `si_code = SI_QUEUE`). `sig == 0` only checks the
/// thread exists. Errors: `ESRCH` when the thread has exited.
pub fn signal_thread(tid: i32, sig: i32, value: usize) -> io::Result<()> {
    if sig == 0 {
        return kill_thread(tid, 0);
    }
    let pid = getpid();
    // SAFETY: siginfo_t is plain data; zeroed is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    info.si_signo = sig;
    info.si_code = libc::SI_QUEUE;
    // siginfo_t for SI_QUEUE: si_pid (i32) at 16, si_uid (u32) at 20, si_value at 24.
    // SAFETY: the struct is 128 bytes; these offsets are inside it and match
    // the kernel's layout on 64-bit Linux.
    unsafe {
        let base = (&mut info as *mut libc::siginfo_t).cast::<u8>();
        base.add(16).cast::<i32>().write_unaligned(pid);
        base.add(20).cast::<u32>().write_unaligned(libc::getuid());
        base.add(24).cast::<usize>().write_unaligned(value);
    }
    // SAFETY: info is a valid siginfo_t for the duration of the call.
    super::cvt(unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, &info) }).map(drop)
}

/// The `si_value` sent by [`signal_thread`].
///
/// # Safety
/// `info` must point to the siginfo of a signal sent by [`signal_thread`].
#[inline(always)]
pub unsafe fn signal_value(info: *const libc::siginfo_t) -> usize {
    // SAFETY: a queued signal's siginfo holds `si_value` at offset 24 on
    // x86-64 Linux; the caller passes such a siginfo.
    unsafe { info.cast::<u8>().add(24).cast::<usize>().read_unaligned() }
}

/// The blocked-signal mask of thread `tid`, from `/proc/self/task/TID/status`
/// (for error messages; allocates).
pub fn blocked_mask(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("SigBlk:"))?;
    u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).ok()
}

/// Whether thread `tid` is running (or runnable: `State: R`) rather than
/// blocked in the kernel or stopped, and how many context switches it made
/// (voluntary and involuntary), from `/proc/self/task/TID/status`, read
/// without disturbing the thread. `None` if it is gone. Allocates.
pub fn sched_state(tid: i32) -> Option<(bool, u64)> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    parse_sched_state(&s)
}

fn parse_sched_state(status: &str) -> Option<(bool, u64)> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let running = field("State:")?.starts_with('R');
    let vol: u64 = field("voluntary_ctxt_switches:")?.parse().ok()?;
    let invol: u64 = field("nonvoluntary_ctxt_switches:")?.parse().ok()?;
    Some((running, vol + invol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_state_of_a_sleeping_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        let tid = rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (running, switches) = sched_state(tid).unwrap();
        assert!(!running, "asleep in nanosleep");
        assert!(switches >= 1);
        t.join().unwrap();
        assert_eq!(
            parse_sched_state("State:\tR (running)\nvoluntary_ctxt_switches:\t3\nnonvoluntary_ctxt_switches:\t4\n"),
            Some((true, 7))
        );
        assert_eq!(parse_sched_state("State:\tS (sleeping)\n"), None);
    }

    #[test]
    fn keys_errno_and_kill() {
        static DROPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        extern "C" fn count(v: *mut libc::c_void) {
            DROPPED.fetch_add(v as usize, std::sync::atomic::Ordering::Relaxed);
        }
        let key = key_create(count).unwrap();
        std::thread::spawn(move || {
            // SAFETY: a key of ours whose destructor takes any value.
            unsafe { set_specific(key, 5 as *const libc::c_void) };
        })
        .join()
        .unwrap();
        assert_eq!(DROPPED.load(std::sync::atomic::Ordering::Relaxed), 5, "the destructor ran at the thread's exit");
        let saved = errno();
        set_errno(libc::EINTR);
        assert_eq!(errno(), libc::EINTR);
        set_errno(saved);
        assert!(kill_thread(gettid(), 0).is_ok());
        assert_eq!(getpid(), std::process::id() as i32);
    }

    #[test]
    fn lists_own_threads() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tx.send(gettid()).unwrap();
            done_rx.recv().unwrap();
        });
        let other = rx.recv().unwrap();
        let mut seen = Vec::new();
        for_each_tid(|t| seen.push(t)).unwrap();
        assert!(seen.contains(&gettid()));
        assert!(seen.contains(&other));
        done_tx.send(()).unwrap();
        h.join().unwrap();
        assert_eq!(signal_thread(other, 0, 0).map_err(|e| e.raw_os_error()), Err(Some(libc::ESRCH)));
    }
}
