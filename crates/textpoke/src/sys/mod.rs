//! Thin wrappers over the kernel facilities textpoke uses, one module each;
//! raw syscalls live here and nowhere else.

pub mod anon;
pub mod fs;
pub mod maps;
pub(crate) mod membarrier;
pub(crate) mod process;
pub(crate) mod threads;

// What the crates above the engine use (the recorder's buffers and
// writer, the agent, the command line): `anon`, `fs`, the futex calls and
// this thread's id. The rest is the engine's own.
pub use threads::gettid;

use std::io;

/// `Err(last OS error)` when `ret` is -1.
pub(crate) fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Whether `prctl(PR_GET_MDWE)` reports `PR_MDWE_REFUSE_EXEC_GAIN`: no page
/// of this process may become writable and executable.
pub(crate) fn mdwe_refuses_exec_gain() -> bool {
    // SAFETY: PR_GET_MDWE takes no pointers; unused arguments must be 0.
    let r = unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) };
    r > 0 && (r as libc::c_uint & libc::PR_MDWE_REFUSE_EXEC_GAIN) != 0
}

/// Waits on a futex word while it holds `expected`, at most `timeout`
/// when one is given (spurious wake-ups allowed). Async-signal-safe.
pub fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, timeout: Option<std::time::Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 and `ts_ptr` null or a valid
    // timespec for the duration of the call.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, expected, ts_ptr);
    }
}

/// Wakes up to `n` waiters on a futex word. Async-signal-safe.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32, n: i32) {
    // SAFETY: `word` is a valid, aligned u32.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, n);
    }
}

/// Copies memory of this process at `addr` into `buf` without faulting
/// (`process_vm_readv` on ourselves); returns how many bytes it could copy
/// (0 if `addr` is unmapped). Allocation-free, async-signal-safe.
pub(crate) fn read_memory(addr: usize, buf: &mut [u8]) -> usize {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: buf.len() };
    // SAFETY: `local` describes our writable buffer; the kernel checks
    // `remote` and stops at the first unmapped page instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    n.max(0) as usize
}
