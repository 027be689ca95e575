//! `membarrier(2)`.
//!
//! - `PRIVATE_EXPEDITED_SYNC_CORE` (sync cores): after it returns, every
//!   other running thread of this process has executed a core-serialising
//!   instruction, and every thread that was not running will execute one
//!   before it next runs user code.
//! - `PRIVATE_EXPEDITED` (grace periods): after it returns, every other
//!   thread of this process has passed a full memory barrier between the
//!   call's start and its return — running threads by an IPI, the others
//!   in the scheduler before they next run user code. Memory accesses of
//!   the caller before the call are ordered before that barrier, and a
//!   thread's accesses before its barrier are ordered before the caller's
//!   accesses after the call (userspace RCU's `urcu-memb` flavour is built
//!   on this). No signal is sent: no system call of another thread is
//!   interrupted.
//!
//! Each command needs its registration once per process.

use std::io;

const CMD_QUERY: libc::c_int = 0;
const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;
const CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

fn membarrier(cmd: libc::c_int) -> io::Result<libc::c_long> {
    // SAFETY: membarrier takes integer arguments only.
    super::cvt(unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) })
}

fn supported(cmd: libc::c_int) -> bool {
    membarrier(CMD_QUERY).is_ok_and(|mask| mask & cmd as libc::c_long != 0)
}

/// Whether the kernel offers the private expedited SYNC_CORE command.
pub fn sync_core_supported() -> bool {
    supported(CMD_PRIVATE_EXPEDITED_SYNC_CORE)
}

/// Registers this process for SYNC_CORE (once per process; idempotent).
pub fn register_sync_core() -> io::Result<()> {
    membarrier(CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE).map(drop)
}

/// Makes every thread of this process serialise its core.
pub fn sync_core() -> io::Result<()> {
    membarrier(CMD_PRIVATE_EXPEDITED_SYNC_CORE).map(drop)
}

/// Whether the kernel offers the private expedited command (Linux 4.14).
pub fn expedited_supported() -> bool {
    supported(CMD_PRIVATE_EXPEDITED)
}

/// Registers this process for the private expedited command (once per
/// process; idempotent).
pub fn register_expedited() -> io::Result<()> {
    membarrier(CMD_REGISTER_PRIVATE_EXPEDITED).map(drop)
}

/// A full memory barrier in every thread of this process (see the module
/// docs); needs [`register_expedited`] first.
pub fn expedited() -> io::Result<()> {
    membarrier(CMD_PRIVATE_EXPEDITED).map(drop)
}
