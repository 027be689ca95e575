//! textpoke's one place for raw system calls and libc's kernel
//! facilities: thin wrappers, safe where they can be and documented
//! `unsafe` where the caller must promise something, one file per facility
//! (the manner of rustix). The bottom layer of textpoke: the engine
//! (`textpoke`, which uses it as `crate::sys`), the recorder and the agent
//! call these instead of `libc`; they may still use `libc`'s types and
//! constants. A crate of its own so that each of them can, without the
//! wrappers becoming part of the engine's public API.
//!
//! | file | facility | used by |
//! |------|----------|---------|
//! | [`anon`] | `mmap`/`munmap`/`mincore`: buffers, stacks with a guard page, and code and data blocks at a chosen place | the recorder's buffers, the tracer's shadow stacks, the agent's signal stacks, `text::codemem` |
//! | [`mem`] | `mprotect`, `/proc/self/mem` ([`mem::ProcMem`]), faultless copies (`process_vm_readv`), the page size and physical memory, MDWE | the engine's `text::write` and `text::codemem`, the frame scan of `sync::rendezvous` |
//! | [`signals`] | `sigaction` (and a raw `rt_sigaction` to `SIG_DFL`), signal masks (one set for every handler textpoke installs, one for service threads), the default action of a signal, raw `sigaltstack` | `text::trap`, `sync::rendezvous`, `text::stop_machine`, the recorder's writer, the agent's threads and fatal-signal handlers |
//! | [`threads`] | thread and process ids, listing threads without allocating (`getdents64`), `tgkill`, `rt_tgsigqueueinfo`, `/proc/self/task`, `SCHED_BATCH`; thread-specific keys, fork handlers, `errno` | `sync`, the tracer |
//! | [`process`] | `kill`, `pidfd_open`, raw `execveat` and `exit_group` | the agent's exec interposition, fatal-signal handling and watch on the front process |
//! | [`membarrier`] | `membarrier(2)`: sync cores, grace-period barriers | `sync`, `trace::grace` |
//! | [`futex`] | `futex(2)` wait and wake | parked threads, the recorder's writer |
//! | [`loader`] | `dl_iterate_phdr` (with the load/unload counters), `dladdr1`, `dlopen(RTLD_NOLOAD)` pins, the vdso | `sites::objects`, `text::dynsym`, `text::validate`, `keys` |
//! | [`mutex`] | a pthread mutex taken and released without a guard | `sync::ForkLock` |
//! | [`time`] | `CLOCK_MONOTONIC`, one `nanosleep` | `clock`, `sync::rendezvous` |
//! | [`maps`] | `/proc/self/maps` | validation, `text::codemem` |
//! | [`bti`] | arm64 guarded pages (`PROT_BTI`): `HWCAP2_BTI`, `/proc/self/smaps` `VmFlags`, objects' BTI property notes | `text::write` |
//! | [`fs`] | where an output path leads (symbolic links, procfs) | the command line's `-o` |
//! | [`emulation`] | a user-mode emulator (qemu-user): detecting it, its own threads, the signals it can carry | `sync::rendezvous` |
//!
//! And [`write_stderr`], one `write(2)` for messages from places that may
//! not allocate.

pub mod anon;
pub mod bti;
pub mod emulation;
pub mod fs;
pub mod futex;
pub mod loader;
pub mod maps;
pub mod mem;
pub mod membarrier;
pub mod mutex;
pub mod process;
pub mod signals;
pub mod threads;
pub mod time;

pub use futex::{futex_wait, futex_wake};
pub use mem::{mdwe_refuses_exec_gain, read_memory};
pub use threads::gettid;

use std::io;

/// Writes `msg` to standard error with one `write(2)`, for messages from
/// places that may not allocate or lock (a signal handler, a traced
/// site about to abort). Async-signal-safe; a short write is not retried.
pub fn write_stderr(msg: &[u8]) {
    // SAFETY: `msg` is valid for reads of its length.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// `Err(last OS error)` when `ret` is -1.
pub fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
