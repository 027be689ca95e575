//! The one place for raw system calls and libc's kernel facilities:
//! thin wrappers, safe where they can be and documented `unsafe` where the
//! caller must promise something, one file per facility (the manner of
//! rustix). Every other module of the engine (and the crates above it)
//! calls these instead of `libc`; it may still use `libc`'s types and
//! constants.
//!
//! | file | facility | used by |
//! |------|----------|---------|
//! | [`anon`] | `mmap`/`munmap`/`mincore`: buffers, and code and data blocks at a chosen place | the recorder's buffers, the tracer's shadow stacks, `text::codemem` |
//! | [`mem`] | `mprotect`, `/proc/self/mem` ([`mem::ProcMem`]), faultless copies (`process_vm_readv`), the page size, MDWE | `text::write`, `text::codemem`, the frame scan of `sync::rendezvous` |
//! | [`signals`] | `sigaction`, signal masks (one set for every handler textpoke installs), the default action of a signal | `text::trap`, `sync::rendezvous`, `text::stop_machine` |
//! | [`threads`] | thread and process ids, listing threads without allocating (`getdents64`), `tgkill`, `rt_tgsigqueueinfo`, `/proc/self/task`; thread-specific keys, fork handlers, `errno` | `sync`, the tracer |
//! | [`membarrier`] | `membarrier(2)`: sync cores, grace-period barriers | `sync`, `trace::grace` |
//! | [`futex`] | `futex(2)` wait and wake | parked threads, the recorder's writer |
//! | [`loader`] | `dl_iterate_phdr` (with the load/unload counters), `dladdr1`, `dlopen(RTLD_NOLOAD)` pins, the vdso | `sites::objects`, `text::dynsym`, `text::validate`, `keys` |
//! | [`mutex`] | a pthread mutex taken and released without a guard | `sync::ForkLock` |
//! | [`time`] | `CLOCK_MONOTONIC`, one `nanosleep` | `clock`, `sync::rendezvous` |
//! | [`maps`] | `/proc/self/maps` | validation, `text::codemem` |
//! | [`fs`] | where an output path leads (symbolic links, procfs) | the command line's `-o` |
//!
//! And [`write_stderr`], one `write(2)` for messages from places that may
//! not allocate.

// Public: what the crates above the engine use (the recorder's buffers
// and writer, the agent, the command line). The rest is the engine's own.
pub mod anon;
pub mod fs;
pub mod futex;
pub mod loader;
pub(crate) mod maps;
pub(crate) mod mem;
pub(crate) mod membarrier;
pub(crate) mod mutex;
pub(crate) mod signals;
pub mod threads;
pub mod time;

pub use futex::{futex_wait, futex_wake};
pub(crate) use mem::{mdwe_refuses_exec_gain, read_memory};
pub use threads::gettid;

use std::io;

/// Writes `msg` to standard error with one `write(2)`, for messages from
/// places that may not allocate or lock (a signal handler, a traced
/// site about to abort). Async-signal-safe; a short write is not retried.
pub(crate) fn write_stderr(msg: &[u8]) {
    // SAFETY: `msg` is valid for reads of its length.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// `Err(last OS error)` when `ret` is -1.
pub(crate) fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
