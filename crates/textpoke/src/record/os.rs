//! The few raw system calls the recorder needs, all async-signal-safe.
//!
//! They belong in [`crate::sys`] (DESIGN.md: raw syscalls in one place);
//! they live here until that layer takes them, to keep this branch inside
//! its own module.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Maps `len` bytes of zeroed, private, anonymous memory (pages are
/// touched lazily; no swap reservation). `None` on failure.
pub(crate) fn map(len: usize) -> Option<*mut u8> {
    map_with(len, 0)
}

/// As [`map`], with every page faulted in now (`MAP_POPULATE`): code that
/// writes the memory later never takes a page fault.
pub(crate) fn map_populated(len: usize) -> Option<*mut u8> {
    map_with(len, libc::MAP_POPULATE)
}

fn map_with(len: usize, flags: libc::c_int) -> Option<*mut u8> {
    // SAFETY: anonymous mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        Some(p as *mut u8)
    }
}

/// Replaces the mapping at `p` with fresh zero pages.
///
/// # Safety
///
/// `p..p+len` must be a mapping made by [`map`] that nothing else uses.
pub(crate) unsafe fn remap_zero(p: *mut u8, len: usize) -> bool {
    // SAFETY: MAP_FIXED over our own mapping (the caller's guarantee).
    let r = unsafe {
        libc::mmap(
            p as *mut libc::c_void,
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    r != libc::MAP_FAILED
}

/// Unmaps memory made by [`map`].
///
/// # Safety
///
/// `p..p+len` must be a mapping made by [`map`] that nothing uses any more.
pub(crate) unsafe fn unmap(p: *mut u8, len: usize) {
    // SAFETY: the caller's guarantee.
    unsafe { libc::munmap(p as *mut libc::c_void, len.max(1)) };
}

/// Wakes one waiter on `word`.
pub(crate) fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
    }
}

/// Waits while `word` holds `expected`, at most `timeout` (spurious
/// wake-ups allowed).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid word and timespec for the duration of the call.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, expected, &ts);
    }
}
