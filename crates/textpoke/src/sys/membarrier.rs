//! `membarrier(2)` with the SYNC_CORE commands: after
//! `PRIVATE_EXPEDITED_SYNC_CORE` returns, every other running thread of
//! this process has executed a core-serialising instruction, and every
//! thread that was not running will execute one before it next runs user
//! code.

use std::io;

const CMD_QUERY: libc::c_int = 0;
const CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

fn membarrier(cmd: libc::c_int) -> io::Result<libc::c_long> {
    // SAFETY: membarrier takes integer arguments only.
    super::cvt(unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) })
}

/// Whether the kernel offers the private expedited SYNC_CORE command.
pub fn sync_core_supported() -> bool {
    membarrier(CMD_QUERY).is_ok_and(|mask| mask & CMD_PRIVATE_EXPEDITED_SYNC_CORE as libc::c_long != 0)
}

/// Registers this process for SYNC_CORE (once per process; idempotent).
pub fn register_sync_core() -> io::Result<()> {
    membarrier(CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE).map(drop)
}

/// Makes every thread of this process serialise its core.
pub fn sync_core() -> io::Result<()> {
    membarrier(CMD_PRIVATE_EXPEDITED_SYNC_CORE).map(drop)
}
