//! The calling process and thread themselves, as the tracer needs them:
//! the process id, the thread's signal mask through the raw system call,
//! libc's `errno`, pthread keys (per-thread values with an exit
//! destructor), a fork handler, and a message on stderr.
//!
//! Everything here but [`key_create`] and [`at_fork_child`] is
//! async-signal-safe: the tracer calls it at traced sites, maybe inside a
//! signal handler, where only the registers its routine saved may change
//! (so raw system calls, not glibc helpers that may use vector registers).

use std::ffi::c_void;

/// This process's id.
#[inline]
pub(crate) fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Blocks every signal on the calling thread with the raw system call and
/// returns the kernel mask it had (8 bytes on x86-64), for
/// [`restore_mask_raw`]. Async-signal-safe; leaves `errno` alone on
/// success.
#[inline(always)]
pub(crate) fn block_all_raw() -> u64 {
    let (all, mut old) = (!0u64, 0u64);
    // SAFETY: rt_sigprocmask with valid pointers to kernel sigsets (8 bytes
    // on x86-64); async-signal-safe.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_BLOCK, &all, &mut old, 8) };
    old
}

/// Sets the calling thread's kernel signal mask back to `old`, as
/// [`block_all_raw`] returned it. Async-signal-safe.
#[inline(always)]
pub(crate) fn restore_mask_raw(old: u64) {
    // SAFETY: rt_sigprocmask with a valid pointer to a kernel sigset.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &old, std::ptr::null_mut::<u64>(), 8) };
}

/// The calling thread's `errno`.
#[inline]
pub(crate) fn errno() -> i32 {
    // SAFETY: glibc's thread-local errno location, valid for the thread.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno` (to give back what it was).
#[inline]
pub(crate) fn set_errno(e: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}

/// A new pthread key whose `destructor` runs at thread exit for each
/// thread that set a non-null value; `None` when none is left.
pub(crate) fn key_create(destructor: extern "C" fn(*mut c_void)) -> Option<usize> {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a valid out-pointer and a destructor with the C signature.
    let r = unsafe { libc::pthread_key_create(&mut key, Some(destructor)) };
    (r == 0).then_some(key as usize)
}

/// Sets the calling thread's value of `key`. glibc keeps the values of
/// keys below 32 in the thread descriptor: setting one never allocates
/// and is async-signal-safe (higher keys may call malloc).
#[inline]
pub(crate) fn set_specific(key: usize, value: *const c_void) {
    // SAFETY: the value is stored, not dereferenced; an invalid key is
    // refused with EINVAL.
    unsafe { libc::pthread_setspecific(key as libc::pthread_key_t, value) };
}

/// Has `child` run in the child of every `fork` of this process, in the
/// thread that forked (the only one there).
pub(crate) fn at_fork_child(child: unsafe extern "C" fn()) {
    // SAFETY: registering a handler with the C signature; glibc copies it.
    unsafe { libc::pthread_atfork(None, None, Some(child)) };
}

/// Writes `msg` on stderr with one `write(2)`, for a message from where
/// nothing else may run (a signal handler, a process about to abort).
pub(crate) fn write_stderr(msg: &[u8]) {
    // SAFETY: write(2) on fd 2 with a valid buffer of `msg.len()` bytes.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}
