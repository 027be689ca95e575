//! Waking the agent thread: a pipe whose read end the agent thread polls
//! and whose write end signal handlers and wrappers write a byte to (the
//! stop-signal handler, the `_exit` wrapper, the `dlopen` wrapper).
//!
//! The write end is published in [`WAKE_FD`] with its identity, so that
//! [`wake`] is async-signal-safe (atomics, `fstat`, `write`) and never
//! writes to a descriptor the program reused at the same number (see
//! `fds`).

use crate::fds::{identity, Fd};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// Write end of the wake pipe (-1: none) and its identity, for signal
/// handlers.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static WAKE_DEV: AtomicU64 = AtomicU64::new(0);
static WAKE_INO: AtomicU64 = AtomicU64::new(0);

/// Wakes the agent thread (async-signal-safe).
pub(crate) fn wake() {
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let id = (WAKE_DEV.load(Ordering::Relaxed), WAKE_INO.load(Ordering::Relaxed));
    if identity(fd) == Some(id) {
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        unsafe { libc::write(fd, b"w".as_ptr().cast(), 1) };
    }
}

/// Whether there is a pipe to wake the agent thread through.
pub(super) fn is_open() -> bool {
    WAKE_FD.load(Ordering::Acquire) >= 0
}

/// Stops [`wake`] from writing: the pipe is closed, or no longer ours.
pub(super) fn forget() {
    WAKE_FD.store(-1, Ordering::Release);
}

/// In a forked child: the parent's pipe is not ours to wake.
pub(super) fn after_fork_in_child() {
    forget();
}

/// The wake pipe: the agent thread polls the read end; signal handlers
/// and wrappers write a byte to the write end (through [`WAKE_FD`]).
pub(super) struct WakePipe {
    pub read: Fd,
    /// Kept so that it stays open (and is closed with the loop).
    _write: Fd,
}

impl WakePipe {
    pub fn new() -> Option<WakePipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return None;
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let read = Fd::adopt(r)?;
        let write = Fd::adopt(w)?;
        WAKE_DEV.store(write.id().0, Ordering::Relaxed);
        WAKE_INO.store(write.id().1, Ordering::Relaxed);
        // Release pairs with the Acquire load in `wake`: whoever sees the
        // descriptor sees its identity too.
        WAKE_FD.store(write.raw(), Ordering::Release);
        Some(WakePipe { read, _write: write })
    }

    /// Empties the pipe; false if the program took the read end over.
    pub fn drain(&self) -> bool {
        if !self.read.ours() {
            return false;
        }
        let mut buf = [0u8; 64];
        // SAFETY: reading into a local buffer from our own pipe.
        while unsafe { libc::read(self.read.raw(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        true
    }
}
