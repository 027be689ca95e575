//! The agent's descriptors: kept out of the program's way, checked before
//! every use, and closed in a forked child.
//!
//! # High numbers
//!
//! Programs expect `open` to return the lowest free number, and some rely
//! on it (`close(0); open("/dev/null")`). So every descriptor the agent
//! keeps (the listening socket, the wake pipe, the pidfd of `textpoke
//! record`, the control connections) is moved above the numbers programs
//! use: `F_DUPFD_CLOEXEC` from 900, or from half of `RLIMIT_NOFILE` when
//! that is lower ([`high_floor`]). All are close-on-exec, so no program
//! the traced one executes inherits them.
//!
//! # Identity
//!
//! Before every use the descriptor's identity (device and inode, saved
//! when it was made) is checked with `fstat`: a program that closes every
//! descriptor and opens its own at the same number is never read from,
//! written to or closed by the agent. Once a descriptor is no longer the
//! agent's, the agent forgets it without closing it.
//!
//! # fork
//!
//! A forked child inherits the parent's descriptors, and its agent makes
//! its own. The parent's are listed in [`OWN_FDS`], a fixed table of
//! atomics (the child's fork handler may not allocate), which the child
//! closes ([`close_inherited`]).

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many descriptors the agent may hold at once: the client
/// connections and a few of its own.
const SLOTS: usize = crate::clients::MAX_CLIENTS + 8;

/// One entry of [`OWN_FDS`]: the descriptor (`FREE`: none) and its
/// identity.
struct Slot {
    fd: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
}

const FREE: u64 = u64::MAX;
#[allow(clippy::declare_interior_mutable_const)] // only to initialise OWN_FDS
const FREE_SLOT: Slot = Slot { fd: AtomicU64::new(FREE), dev: AtomicU64::new(0), ino: AtomicU64::new(0) };

/// Every descriptor the agent holds in this process, for a forked child
/// to close the parent's.
static OWN_FDS: [Slot; SLOTS] = [FREE_SLOT; SLOTS];

fn remember(fd: &Fd) {
    for slot in &OWN_FDS {
        if slot.fd.compare_exchange(FREE, fd.fd as u64, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            slot.dev.store(fd.id.0, Ordering::Relaxed);
            slot.ino.store(fd.id.1, Ordering::Relaxed);
            return;
        }
    }
}

fn forget(fd: RawFd) {
    for slot in &OWN_FDS {
        let _ = slot.fd.compare_exchange(fd as u64, FREE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Closes the descriptors the agent held before a fork (in the child).
pub(crate) fn close_inherited() {
    for slot in &OWN_FDS {
        let fd = slot.fd.swap(FREE, Ordering::AcqRel);
        if fd != FREE {
            let id = (slot.dev.load(Ordering::Relaxed), slot.ino.load(Ordering::Relaxed));
            drop(Fd { fd: fd as RawFd, id });
        }
    }
}

/// The device and inode of `fd`, if open.
pub(crate) fn identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: fstat writes one struct stat; zeroed is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer; fstat is async-signal-safe.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// This process's soft `RLIMIT_NOFILE`.
pub(crate) fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// The lowest number the agent moves its descriptors to.
pub(crate) fn high_floor() -> RawFd {
    (nofile_limit() / 2).clamp(10, 900) as RawFd
}

/// Duplicates `fd` at or above [`high_floor`], close-on-exec.
fn dup_high(fd: &OwnedFd) -> Option<RawFd> {
    // SAFETY: duplicating a descriptor we own.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, high_floor()) };
    (high >= 0).then_some(high)
}

/// A descriptor of the agent's, with the identity it had when made.
/// Dropping it closes it, if it is still the agent's.
pub(crate) struct Fd {
    fd: RawFd,
    id: (u64, u64),
}

impl Fd {
    /// Moves `fd` to a high number (close-on-exec) if there is room up
    /// there, else keeps it where it is.
    pub fn adopt(fd: OwnedFd) -> Option<Fd> {
        let raw = match dup_high(&fd) {
            Some(high) => high, // the original closes on drop
            None => fd.into_raw_fd(),
        };
        Fd::keep(raw)
    }

    /// Moves `fd` to a high number (close-on-exec), or gives it back when
    /// there is no room up there: for what the agent can refuse (a client
    /// connection) rather than take a low number.
    pub fn adopt_high(fd: OwnedFd) -> Result<Fd, OwnedFd> {
        match dup_high(&fd) {
            Some(high) => Fd::keep(high).ok_or(fd),
            None => Err(fd),
        }
    }

    fn keep(raw: RawFd) -> Option<Fd> {
        let Some(id) = identity(raw) else {
            // SAFETY: `raw` was just made here and is not used again.
            unsafe { libc::close(raw) };
            return None;
        };
        let fd = Fd { fd: raw, id };
        remember(&fd);
        Some(fd)
    }

    pub fn raw(&self) -> RawFd {
        self.fd
    }

    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Still ours?
    pub fn ours(&self) -> bool {
        identity(self.fd) == Some(self.id)
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        forget(self.fd);
        if self.ours() {
            // SAFETY: the descriptor is ours (checked just now).
            unsafe { libc::close(self.fd) };
        }
    }
}
