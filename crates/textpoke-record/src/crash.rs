//! The crash flush: when a fatal signal (`SIGSEGV`, `SIGBUS`, `SIGILL`,
//! `SIGFPE`, `SIGABRT`) is about to kill the process, the thread it hit
//! writes everything the buffers hold, from its signal handler, so that
//! the trace ends where the program did: the crashing thread's last event
//! is the entry of the function it crashed in. The agent calls
//! [`flush_for_signal`] from its handler when the default action is about
//! to apply (see the agent's `fatal` module); a program that recovers from
//! its faults never gets here.
//!
//! # Who writes, and why
//!
//! The crashing thread itself, holding the recorder's lock, with
//! `pwrite(2)`, allocating nothing. The other way — have the writer
//! thread do its normal drain while the crashing thread waits, as `_exit`
//! has the agent thread stop the recorder — fails when it matters most:
//! a crash inside `malloc` or `free` (heap corruption; glibc's
//! `malloc_printerr` calls `abort()` with the arena's lock held) holds the
//! heap's lock, which the writer needs for a new thread's file, a symbol
//! line, the JSON; and a crash *on* the writer thread leaves nobody to
//! write. Here the crashing thread needs nothing it may hold but the
//! recorder's own lock, which it only tries to take (F2).
//!
//! # Algorithm (F1–F8)
//!
//! - **F1** claims the flush: `PHASE` goes from idle to flushing by this
//!   thread. One flush per crash: a fatal signal on another thread
//!   meanwhile waits for it (at most [`WAIT_OTHER`]) and then lets its own
//!   signal kill the process; one on this thread (the flush itself
//!   faulted: the recorder's memory was trampled) returns
//!   [`CrashFlush::Reentered`]: die at once, of the first signal.
//! - **F2** takes the recorder's lock with `pthread_mutex_trylock`, again
//!   every millisecond for at most [`LOCK_WAIT`]: the writer holds it for
//!   a drain pass (milliseconds), and takes no more while a flush waits
//!   (busy threads would have it take the lock again at once), the
//!   control path holds it for a stop. On the writer thread it tries once:
//!   a writer that crashed in a pass holds it itself. Not had: nothing is
//!   written, the trace stays as the writer last wrote it
//!   ([`CrashFlush::Busy`]).
//! - **F3** maps scratch memory for what the flush computes (`mmap`).
//! - **F4** for every buffer of the session (adopted, or still on the
//!   stack of new buffers), takes the words from the writer's cursor to
//!   the producer's published position (read once: the end of that
//!   thread's trace, which goes on recording), following the segment chain as
//!   the writer does (D1/D2, without moving the cursor; acquire pairs
//!   with H7 and G2), and writes them to the thread's file with `pwrite`
//!   at the offsets the writer would use: after what it wrote and what it
//!   still buffers (written first, the same way). The writer's state is
//!   not changed: should the process live on, the writer writes the same
//!   bytes at the same places. A thread without a file gets one, named as
//!   the writer would name it, header first. The words go through a copy
//!   of the writer's scan of the thread (counts, checksum, times, the
//!   functions seen).
//! - **F5** sums the calls — the exited threads' totals and every live
//!   buffer's counters (the pages it touched, `mincore`) — for
//!   `counts.json` and each thread's `calls`.
//! - **F6** appends to the symbol file the functions seen in F4 and F5
//!   that it lacks, and those the writer saw but had not appended yet
//!   (after flushing the writer's buffered lines); they are marked
//!   written, so that a writer that lives on does not write them twice.
//! - **F7** writes `counts.json`, then `meta.json` last: `complete` false,
//!   every thread's counts as F4 left them, and `ended_by` (the signal,
//!   its code, address or sender, the thread, the time, the events this
//!   flush wrote). Each through `NAME.tmp` renamed over `NAME`.
//! - **F8** marks the flush done and lets the writer rest (its passes
//!   return at once) for [`REST`] before it releases the lock: the process
//!   is about to die, and a pass would rewrite `meta.json` without
//!   `ended_by`. A process alive after that (a `raise(SIGABRT)` whose
//!   handler returned) gets its writer back, and a later crash may flush
//!   again; a normal stop ends the rest at once and writes a complete
//!   trace without `ended_by`.
//!
//! # Async-signal-safe
//!
//! Atomics, `pthread_mutex_trylock`/`unlock`, `nanosleep`,
//! `clock_gettime`, `gettid`, `mmap`/`munmap`/`mincore`,
//! `open`/`read`/`readlink`/`lseek`/`pwrite`/`write`/`close`/`rename`/
//! `mkdir`: all async-signal-safe. No allocation: the JSON goes through
//! serde_json's serializer straight into a fixed buffer (`FdOut`, which
//! never reports an error — serde_json would box it), from borrowed
//! mirrors of the metadata types; paths, names and numbers are formatted
//! into scratch memory; sorting is in place (`sort_unstable_by`). The
//! session's structures are read, not changed, except the symbol file's
//! written bits and pending list (F6), which were sized beforehand
//! (`SymbolsOut::with_room`). No lock but the recorder's, tried. Every
//! wait is bounded. A test runs the flush on a thread whose allocations
//! are counted.

use super::buffer::{self, ThreadBuf, MODE_MASK, MODE_RECORD};
use super::format::{
    self, BufferInfo, ClockInfo, FullPolicy, Mode, SignalEnd, ThreadMeta, UnattributedDrops, THREAD_HEADER_LEN,
};
use super::session::{self, BufPtr, State};
use super::writer::Scan;
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;
use textpoke::clock::Clock;

/// What a fatal signal was, from the siginfo its handler got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatalSignal {
    /// The signal number.
    pub signal: i32,
    /// `si_code`.
    pub code: i32,
    /// The faulting address, for a fault the kernel reported.
    pub addr: Option<u64>,
    /// The sender, for a signal sent with `kill`, `raise`, `abort`.
    pub sender_pid: Option<i32>,
}

impl FatalSignal {
    /// Reads what matters of `info`. Async-signal-safe.
    ///
    /// # Safety
    ///
    /// `info` is null or the siginfo the kernel passed to an `SA_SIGINFO`
    /// handler of `signal`.
    pub unsafe fn from_siginfo(signal: i32, info: *const libc::siginfo_t) -> FatalSignal {
        let mut f = FatalSignal { signal, code: 0, addr: None, sender_pid: None };
        if info.is_null() {
            return f;
        }
        // SAFETY: the caller's contract.
        let i = unsafe { &*info };
        f.code = i.si_code;
        let fault = matches!(signal, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP);
        // SI_KERNEL: a general protection fault, which has no address.
        if f.code > 0 && f.code != SI_KERNEL && fault {
            // SAFETY: a kernel-reported fault carries si_addr.
            f.addr = Some(unsafe { i.si_addr() } as u64);
        } else if f.code <= 0 {
            // SAFETY: signals sent from user space carry si_pid.
            f.sender_pid = Some(unsafe { i.si_pid() });
        }
        f
    }
}

/// `si_code` of a fault the kernel reports without an address (a general
/// protection fault: a non-canonical address, some privileged
/// instructions).
pub const SI_KERNEL: i32 = 0x80;

/// What [`flush_for_signal`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashFlush {
    /// The trace now holds everything recorded up to the signal; `events`
    /// of them were written by this flush.
    Written { events: u64 },
    /// As `Written`, but writing some of it failed (`errno`); the trace
    /// holds what could be written.
    Failed { events: u64, errno: i32 },
    /// No recording session runs.
    NotRecording,
    /// Another thread flushed for its own fatal signal (this one waited
    /// for it, at most [`WAIT_OTHER`]).
    AlreadyFlushed,
    /// A fatal signal hit this thread while it was flushing (the flush
    /// faulted): let the process die at once, of `first`, the signal the
    /// flush was for.
    Reentered { first: i32 },
    /// The recorder's lock could not be had (F2): nothing was written.
    Busy,
}

// ---------------------------------------------------------------------------
// F1 and F8: the phase.

/// `phase << 32 | tid`: idle, flushing by thread `tid`, done.
static PHASE: AtomicU64 = AtomicU64::new(IDLE);
const IDLE: u64 = 0;
const FLUSHING: u64 = 1;
const DONE: u64 = 2;

/// The signal being (or last) flushed for.
static FIRST: AtomicI32 = AtomicI32::new(0);

/// Until when (monotonic ns) the writer rests after a flush that wrote
/// (F8); 0: no rest.
static REST_UNTIL: AtomicU64 = AtomicU64::new(0);

/// How long F2 waits for the recorder's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// How long a thread hit by a fatal signal while another flushes waits
/// for that flush (F1): the lock wait and a flush of large buffers.
pub const WAIT_OTHER: Duration = Duration::from_secs(5);

/// How long the writer rests after a flush (F8): far longer than a dying
/// process takes, even descheduled on a loaded machine.
pub const REST: Duration = Duration::from_secs(5);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec (async-signal-safe).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

fn sleep_ms() {
    let ms = libc::timespec { tv_sec: 0, tv_nsec: 1_000_000 };
    // SAFETY: a valid timespec; an early return only makes the caller
    // look again.
    unsafe { libc::nanosleep(&ms, std::ptr::null_mut()) };
}

/// Whether the writer must skip its pass: a flush wants the lock (F2) or
/// has just written the trace (F8). A rest that is over means the process
/// outlived its crash flush: the phase goes back to idle.
pub(crate) fn writer_rests() -> bool {
    // Acquire pairs with F8's release store of DONE: REST_UNTIL is set.
    let p = PHASE.load(Ordering::Acquire);
    match p >> 32 {
        FLUSHING => true,
        DONE => {
            let until = REST_UNTIL.load(Ordering::Relaxed);
            if until != 0 && monotonic_ns() < until {
                return true;
            }
            REST_UNTIL.store(0, Ordering::Relaxed);
            let _ = PHASE.compare_exchange(p, IDLE, Ordering::AcqRel, Ordering::Relaxed);
            false
        }
        _ => false,
    }
}

/// A normal stop: whatever flush happened, the process lives on and ends
/// the trace itself.
pub(crate) fn reset() {
    let p = PHASE.load(Ordering::Acquire);
    if p >> 32 == DONE {
        REST_UNTIL.store(0, Ordering::Relaxed);
        let _ = PHASE.compare_exchange(p, IDLE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// The signal the calling thread is flushing for, if it is inside
/// [`flush_for_signal`]: a fatal signal now is a fault of the flush itself
/// (A2 in the agent). Async-signal-safe.
pub fn flushing_signal_here() -> Option<i32> {
    let mine = FLUSHING << 32 | textpoke_sys::gettid() as u32 as u64;
    (PHASE.load(Ordering::Acquire) == mine).then(|| FIRST.load(Ordering::Relaxed))
}

/// Writes everything the recorder's buffers hold to the trace, for the
/// fatal signal `sig` that hit the calling thread (F1–F8 of the module
/// docs). Async-signal-safe, allocation-free, bounded; call it from a
/// fatal signal's handler when the process is about to die, on a stack
/// with some room (the agent switches to one of its own: the JSON
/// serializer nests a few kilobytes deep).
pub fn flush_for_signal(sig: &FatalSignal) -> CrashFlush {
    let tid = textpoke_sys::gettid();
    let mine = FLUSHING << 32 | tid as u32 as u64;
    // F1. Acquire pairs with the release of DONE by another flusher.
    match PHASE.compare_exchange(IDLE, mine, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(cur) if cur == mine => return CrashFlush::Reentered { first: FIRST.load(Ordering::Relaxed) },
        Err(cur) => {
            if cur >> 32 == FLUSHING {
                let deadline = monotonic_ns().saturating_add(WAIT_OTHER.as_nanos() as u64);
                while PHASE.load(Ordering::Acquire) >> 32 == FLUSHING && monotonic_ns() < deadline {
                    sleep_ms();
                }
            }
            return CrashFlush::AlreadyFlushed;
        }
    }
    FIRST.store(sig.signal, Ordering::Relaxed);
    // F2.
    let guard = if buffer::is_writer_thread() {
        session::STATE.try_lock()
    } else {
        let deadline = monotonic_ns().saturating_add(LOCK_WAIT.as_nanos() as u64);
        loop {
            if let Some(g) = session::STATE.try_lock() {
                break Some(g);
            }
            if monotonic_ns() >= deadline {
                break None;
            }
            sleep_ms();
        }
    };
    let Some(mut st) = guard else {
        PHASE.store(DONE << 32, Ordering::Release);
        return CrashFlush::Busy;
    };
    let r = flush_locked(&mut st, sig, tid);
    // F8, before the lock goes: a writer that takes it next rests.
    // Release pairs with writer_rests' acquire load.
    match r {
        CrashFlush::Written { .. } | CrashFlush::Failed { .. } => {
            REST_UNTIL.store(monotonic_ns().saturating_add(REST.as_nanos() as u64), Ordering::Relaxed);
            PHASE.store(DONE << 32, Ordering::Release);
        }
        _ => PHASE.store(IDLE, Ordering::Release), // nothing to flush
    }
    drop(st);
    r
}

// ---------------------------------------------------------------------------
// F3: scratch memory.

/// An anonymous mapping carved into slices, freed on drop.
struct Scratch {
    base: *mut u8,
    len: usize,
    used: std::cell::Cell<usize>,
}

impl Scratch {
    fn map(len: usize) -> Option<Scratch> {
        let len = len.next_multiple_of(textpoke_sys::anon::PAGE);
        let base = textpoke_sys::anon::map(len)?;
        Some(Scratch { base, len, used: std::cell::Cell::new(0) })
    }

    /// `n` zeroed `T`s (plain data whose all-zero bytes are valid: the
    /// callers use integers and bytes), `None` if the mapping is full.
    /// Each call hands out fresh room, so the slices never overlap.
    #[allow(clippy::mut_from_ref)]
    fn zeroed<T: Copy>(&self, n: usize) -> Option<&mut [T]> {
        let at = self.used.get().next_multiple_of(std::mem::align_of::<T>().max(8));
        let end = at.checked_add(n.checked_mul(std::mem::size_of::<T>())?)?;
        if end > self.len {
            return None;
        }
        self.used.set(end);
        // SAFETY: [at, end) lies in our mapping, aligned for T, handed out
        // once (the cursor moved past it); zeroed by mmap, valid for the
        // integer types callers use.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.add(at) as *mut T, n) })
    }

    /// Room for up to `n` `T`s, filled with [`Slots::push`].
    fn slots<T: Copy>(&self, n: usize) -> Option<Slots<'_, T>> {
        let at = self.used.get().next_multiple_of(std::mem::align_of::<T>().max(8));
        let end = at.checked_add(n.checked_mul(std::mem::size_of::<T>())?)?;
        if end > self.len {
            return None;
        }
        self.used.set(end);
        // SAFETY: as in `zeroed`; the slots are written before being read.
        Some(Slots { ptr: unsafe { self.base.add(at) } as *mut T, cap: n, len: 0, _m: std::marker::PhantomData })
    }

    /// `parts` concatenated, NUL-terminated: a C path.
    fn cstr(&self, parts: &[&[u8]]) -> Option<*const libc::c_char> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        let buf = self.zeroed::<u8>(n + 1)?;
        let mut at = 0;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Some(buf.as_ptr().cast())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the slices handed out do not outlive
        // the flush that owns `self`.
        unsafe { textpoke_sys::anon::unmap(self.base, self.len) };
    }
}

/// A fixed-capacity array in scratch memory (no drop: `T: Copy`).
struct Slots<'a, T: Copy> {
    ptr: *mut T,
    cap: usize,
    len: usize,
    _m: std::marker::PhantomData<&'a mut [T]>,
}

impl<'a, T: Copy> Slots<'a, T> {
    fn push(&mut self, v: T) -> bool {
        if self.len == self.cap {
            return false;
        }
        // SAFETY: len < cap: inside the reserved room.
        unsafe { self.ptr.add(self.len).write(v) };
        self.len += 1;
        true
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: the first `len` slots were written by `push`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// A bitmap of function ids in scratch memory.
struct Ids<'a>(&'a mut [u64]);

impl Ids<'_> {
    fn set(&mut self, id: usize) {
        if let Some(w) = self.0.get_mut(id / 64) {
            *w |= 1 << (id % 64);
        }
    }
}

// ---------------------------------------------------------------------------
// Files.

/// Writes all of `bytes` at `at` (`pwrite`), or at the file position
/// when `None` (`write`), retrying short writes and EINTR; the errno.
fn write_all(fd: i32, mut bytes: &[u8], mut at: Option<u64>) -> Result<(), i32> {
    while !bytes.is_empty() {
        // SAFETY: writing from a valid slice to a descriptor.
        let n = unsafe {
            match at {
                Some(off) => libc::pwrite(fd, bytes.as_ptr().cast(), bytes.len(), off as libc::off_t),
                None => libc::write(fd, bytes.as_ptr().cast(), bytes.len()),
            }
        };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(libc::EIO);
        }
        bytes = &bytes[n as usize..];
        if let Some(off) = at.as_mut() {
            *off += n as u64;
        }
    }
    Ok(())
}

use textpoke_sys::threads::errno;

/// Opens `path` for writing, created or truncated; the descriptor.
fn create(path: *const libc::c_char) -> Result<i32, i32> {
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC, 0o666) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

fn close(fd: i32) {
    // SAFETY: a descriptor this flush opened.
    unsafe { libc::close(fd) };
}

/// A buffered writer over a descriptor for serde_json and the symbol
/// lines: flushes its fixed buffer with [`write_all`], never fails (the
/// first errno is kept in `errno` and later data is dropped), so that
/// serde_json never boxes an error.
struct FdOut<'b> {
    fd: i32,
    buf: &'b mut [u8],
    n: usize,
    at: Option<u64>,
    errno: i32,
}

impl<'b> FdOut<'b> {
    fn new(fd: i32, buf: &'b mut [u8], at: Option<u64>) -> FdOut<'b> {
        FdOut { fd, buf, n: 0, at, errno: 0 }
    }

    fn drain(&mut self) {
        if self.n > 0 && self.errno == 0 {
            match write_all(self.fd, &self.buf[..self.n], self.at) {
                Ok(()) => {
                    if let Some(a) = self.at.as_mut() {
                        *a += self.n as u64;
                    }
                }
                Err(e) => self.errno = e,
            }
        }
        self.n = 0;
    }

    /// Flushes; the first error, if any.
    fn finish(mut self) -> Result<(), i32> {
        self.drain();
        if self.errno == 0 {
            Ok(())
        } else {
            Err(self.errno)
        }
    }
}

impl Write for FdOut<'_> {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let len = data.len();
        while !data.is_empty() {
            if self.n == self.buf.len() {
                self.drain();
            }
            let k = data.len().min(self.buf.len() - self.n);
            self.buf[self.n..self.n + k].copy_from_slice(&data[..k]);
            self.n += k;
            data = &data[k..];
        }
        Ok(len)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.drain();
        Ok(())
    }
}

/// Writes `value` as one JSON line to `dir/name` through `name.tmp`
/// renamed over it (F7).
fn write_json_file(sc: &Scratch, buf: &mut [u8], dir: &[u8], name: &str, value: &impl Serialize) -> Result<(), i32> {
    let tmp = sc.cstr(&[dir, b"/", name.as_bytes(), b".tmp"]).ok_or(libc::ENOMEM)?;
    let path = sc.cstr(&[dir, b"/", name.as_bytes()]).ok_or(libc::ENOMEM)?;
    let fd = create(tmp)?;
    let mut out = FdOut::new(fd, buf, None);
    // Cannot fail: FdOut never reports an error, and the values' own
    // Serialize impls report none.
    let _ = serde_json::to_writer(&mut out, value);
    let _ = out.write(b"\n");
    let r = out.finish();
    close(fd);
    r?;
    // SAFETY: two NUL-terminated paths.
    if unsafe { libc::rename(tmp, path) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Decimal digits of `v` into `buf`.
fn decimal(v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = v;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Reads a small file (`/proc/self/comm`) into `buf`; its bytes.
fn read_small<'b>(path: &std::ffi::CStr, buf: &'b mut [u8]) -> &'b [u8] {
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return &[];
    }
    // SAFETY: reading into a valid buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    close(fd);
    &buf[..n.max(0) as usize]
}

// ---------------------------------------------------------------------------
// What F4 and F5 produce per live thread, and the metadata's mirrors.

/// A live thread's metadata as F4/F5 leave it.
#[derive(Clone, Copy)]
struct Live<'a> {
    tid: i32,
    file: Option<&'a str>,
    words: u64,
    entries: u64,
    exits: u64,
    lost: u64,
    dropped_nested: u64,
    dropped_range: u64,
    calls: u64,
    first_ts: u64,
    last_ts: u64,
    checksum: [u8; 16],
    exited: bool,
}

/// One thread of the metadata: exited (final) or live.
#[derive(Clone, Copy)]
enum Row<'a> {
    Finished(&'a ThreadMeta),
    Live(Live<'a>),
}

impl Row<'_> {
    fn key(&self) -> (i32, Option<&str>) {
        match self {
            Row::Finished(t) => (t.tid, t.file.as_deref()),
            Row::Live(l) => (l.tid, l.file),
        }
    }
    fn totals(&self) -> (u64, u64, u64) {
        match self {
            Row::Finished(t) => (t.entries + t.exits, t.dropped(), t.calls),
            Row::Live(l) => (l.entries + l.exits, l.lost + l.dropped_nested, l.calls),
        }
    }
}

/// [`ThreadMeta`], borrowed (same field names: see the test that checks).
#[derive(Serialize)]
struct ThreadMetaOut<'a> {
    tid: i32,
    file: Option<&'a str>,
    words: u64,
    entries: u64,
    exits: u64,
    lost: u64,
    dropped_nested: u64,
    dropped_range: u64,
    calls: u64,
    first_ts: u64,
    last_ts: u64,
    checksum: &'a str,
    exited: bool,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Row::Finished(t) => t.serialize(s),
            Row::Live(l) => ThreadMetaOut {
                tid: l.tid,
                file: l.file,
                words: l.words,
                entries: l.entries,
                exits: l.exits,
                lost: l.lost,
                dropped_nested: l.dropped_nested,
                dropped_range: l.dropped_range,
                calls: l.calls,
                first_ts: l.first_ts,
                last_ts: l.last_ts,
                checksum: std::str::from_utf8(&l.checksum).unwrap_or("0000000000000000"),
                exited: l.exited,
            }
            .serialize(s),
        }
    }
}

/// The rows as a JSON array.
struct Rows<'a>(&'a [Row<'a>]);

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for r in self.0 {
            seq.serialize_element(r)?;
        }
        seq.end()
    }
}

/// [`SignalEnd`], borrowed.
#[derive(Serialize)]
struct SignalEndOut<'a> {
    signal: i32,
    name: &'a str,
    tid: i32,
    code: i32,
    addr: Option<u64>,
    sender_pid: Option<i32>,
    ts: u64,
    flushed_events: u64,
}

/// [`format::Meta`], borrowed (same field names: see the test).
#[derive(Serialize)]
struct MetaOut<'a> {
    format: &'a str,
    version: u32,
    complete: bool,
    mode: Mode,
    pid: i32,
    parent_pid: Option<i32>,
    process_name: &'a str,
    exe: Option<&'a str>,
    #[serde(with = "format::ClockInfoDef")]
    clock: ClockInfo,
    start_unix_ns: u64,
    start_ts: u64,
    end_ts: Option<u64>,
    buffers: BufferInfo,
    max_functions: u32,
    threads: Rows<'a>,
    unattributed_drops: UnattributedDrops,
    unattributed_calls: u64,
    total_events: u64,
    total_dropped: u64,
    total_calls: u64,
    ended_by: Option<SignalEndOut<'a>>,
}

/// `{"calls": [[id, n], …]}` from the nonzero totals (touched pages only).
struct CountsOut<'a> {
    totals: &'a [u64],
    resident: &'a [u8],
}

impl Serialize for CountsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Calls<'b>(&'b CountsOut<'b>);
        impl Serialize for Calls<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(None)?;
                let per_page = textpoke_sys::anon::PAGE / 8;
                for (page, &r) in self.0.resident.iter().enumerate() {
                    if r & 1 == 0 {
                        continue;
                    }
                    let end = ((page + 1) * per_page).min(self.0.totals.len());
                    for id in page * per_page..end {
                        let n = self.0.totals[id];
                        if n != 0 {
                            seq.serialize_element(&(id as u32, n))?;
                        }
                    }
                }
                seq.end()
            }
        }
        let mut st = s.serialize_struct("CountsFile", 1)?;
        st.serialize_field("calls", &Calls(self))?;
        st.end()
    }
}

/// [`format::Symbol`], borrowed.
#[derive(Serialize)]
struct SymbolOut<'a> {
    id: u32,
    addr: u64,
    name: &'a str,
}

// ---------------------------------------------------------------------------
// F3–F7.

/// Buffers of session `id`: the adopted ones (`registry`), then those on
/// the incoming stack from `incoming` (walked, not taken).
fn for_each_buffer(registry: &[BufPtr], id: u64, incoming: *mut ThreadBuf, mut f: impl FnMut(BufPtr, &ThreadBuf)) {
    for bp in registry {
        let b = bp.get();
        // Acquire pairs with C5's release of `session`.
        if b.p.session.load(Ordering::Acquire) == id {
            f(*bp, b);
        }
    }
    let mut p = incoming;
    while !p.is_null() {
        // SAFETY: pushed buffers stay mapped until adopted and freed under
        // the session lock, which the caller holds.
        let b = unsafe { &*p };
        if b.p.session.load(Ordering::Acquire) == id {
            f(BufPtr(p), b);
        }
        p = b.cold.next.load(Ordering::Relaxed);
    }
}

/// F4's walk: calls `f` with each run of words from the writer's cursor
/// to the producer's position as this walk starts (D1/D2, read-only): the
/// end of the thread's trace, however far it records meanwhile.
fn for_each_unwritten(b: &ThreadBuf, max_hops: usize, mut f: impl FnMut(&[u64])) {
    let mut seg = b.cons.drain_seg.load(Ordering::Relaxed);
    let mut from = b.cons.drain_pos.load(Ordering::Relaxed);
    // D1: acquire pairs with H7's (and G2's) release of `pos`: the words
    // below it, and the links and lengths of the segments before it.
    let end = b.p.pos.load(Ordering::Acquire);
    let mut emit = |from: u64, to: u64| {
        if to > from {
            // SAFETY: [from, to) lies in a segment's data below the
            // published position (or its final `used`), written before the
            // release we acquired; not reused before the writer gives the
            // segment back, which it cannot while we hold the lock.
            f(unsafe { std::slice::from_raw_parts(from as *const u64, ((to - from) / 8) as usize) });
        }
    };
    for _ in 0..max_hops {
        if seg.is_null() {
            return; // count mode
        }
        // SAFETY: the cursor's segment and the ones linked after it are
        // mapped until the writer gives them back (not while we hold the
        // lock).
        let sr = unsafe { &*seg };
        if end >= sr.data() as u64 && end <= sr.data_end() as u64 {
            emit(from, end);
            return;
        }
        // D2: the producer had moved past this segment; acquire pairs with
        // G2's release of `next`, after which `used` is final.
        let next = sr.next.load(Ordering::Acquire);
        if next.is_null() {
            return;
        }
        emit(from, sr.data() as u64 + sr.used.load(Ordering::Relaxed));
        seg = next;
        // SAFETY: a linked segment is mapped (as above).
        from = unsafe { &*next }.data() as u64;
    }
}

/// F5 for one buffer: `f(id, calls)` for every nonzero counter, reading
/// only the pages the thread touched (`resident` is scratch room).
fn for_each_counter(b: &ThreadBuf, resident: &mut [u8], mut f: impl FnMut(usize, u64)) {
    let p = b.p.counters.load(Ordering::Relaxed);
    if p.is_null() {
        return;
    }
    let n = b.p.ncounters.load(Ordering::Relaxed) as usize;
    let per_page = textpoke_sys::anon::PAGE / 8;
    let pages = n.div_ceil(per_page);
    // SAFETY: the counter array's own mapping, `n` words long.
    let known = unsafe { textpoke_sys::anon::resident_into(p as *mut u8, n * 8, resident) };
    for page in 0..pages {
        if known && resident.get(page).is_some_and(|r| r & 1 == 0) {
            continue;
        }
        for i in page * per_page..((page + 1) * per_page).min(n) {
            // SAFETY: i < ncounters; aligned 8-byte stores by the owner
            // (K3) read atomically.
            let v = unsafe { &*(p.add(i) as *const AtomicU64) }.load(Ordering::Relaxed);
            if v != 0 {
                f(i, v);
            }
        }
    }
}

/// Adds the process-wide counts of calls that had no buffer (the touched
/// pages of `buffer::ORPHANS`) to `totals` and `need`; their sum.
fn add_orphans(sc: &Scratch, totals: &mut [u64], need: &mut Ids<'_>) -> u64 {
    let Some(p) = buffer::orphans(false) else { return 0 };
    let n = buffer::ORPHANS_LEN;
    let per_page = textpoke_sys::anon::PAGE / 8;
    let Some(resident) = sc.zeroed::<u8>(n.div_ceil(per_page)) else { return 0 };
    // SAFETY: the array's own mapping, `n` words long, never unmapped.
    if !unsafe { textpoke_sys::anon::resident_into(p as *mut u8, n * 8, resident) } {
        return 0; // cannot tell which pages to read; reading all 32 MiB would map them
    }
    let mut sum = 0;
    for (page, _) in resident.iter().enumerate().filter(|(_, r)| *r & 1 != 0) {
        for i in page * per_page..((page + 1) * per_page).min(n) {
            // SAFETY: i < n; updated with atomic adds.
            let v = unsafe { &*p.add(i) }.load(Ordering::Relaxed);
            if v != 0 {
                if let Some(t) = totals.get_mut(i) {
                    *t += v;
                }
                need.set(i);
                sum += v;
            }
        }
    }
    sum
}

/// The file name the writer gives thread `tid`'s file: `tid-T.bin`, or
/// `tid-T-K.bin` when taken (by the session or by this flush).
fn file_name<'a>(sc: &'a Scratch, tid: i32, names: &BTreeSet<String>, made: &[Row<'_>]) -> Option<&'a str> {
    let buf = sc.zeroed::<u8>(48)?;
    let mut dt = [0u8; 20];
    let t = decimal(tid.unsigned_abs() as u64, &mut dt);
    let sign: &[u8] = if tid < 0 { b"-" } else { b"" };
    for k in 1..1000u64 {
        let mut dk = [0u8; 20];
        let kk: &[u8] = if k > 1 { decimal(k, &mut dk) } else { b"" };
        let dash: &[u8] = if k > 1 { b"-" } else { b"" };
        let mut at = 0;
        for part in [b"tid-".as_slice(), sign, t, dash, kk, b".bin"] {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let name = std::str::from_utf8(&buf[..at]).ok()?;
        if !names.contains(name) && !made.iter().any(|r| r.key().1 == Some(name)) {
            // SAFETY: `buf` lives in the scratch mapping for `'a`; the
            // loop ends here, so no later iteration rewrites it.
            return Some(unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(buf.as_ptr(), at)) });
        }
    }
    None
}

/// The hex of a checksum, as the writer formats it (`{:016x}`).
fn hex16(v: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let d = (v >> (60 - 4 * i)) & 0xf;
        *o = if d < 10 { b'0' + d as u8 } else { b'a' + d as u8 - 10 };
    }
    out
}

/// F3–F7 with the session lock held.
fn flush_locked(st: &mut State, sig: &FatalSignal, tid: i32) -> CrashFlush {
    let incoming = buffer::incoming_head();
    let State { session, registry, .. } = st;
    let Some(s) = session.as_mut() else {
        return CrashFlush::NotRecording;
    };
    let registry: &[BufPtr] = registry;
    let id = s.id;
    let record = id & MODE_MASK == MODE_RECORD;
    let (threads, names, finished, count_totals, c) = (&s.threads, &s.names, &s.finished, &s.count_totals, &s.config);
    // F3: sizes, then the scratch memory.
    let mut live_count = 0usize;
    for_each_buffer(registry, id, incoming, |_, _| live_count += 1);
    let ids = (c.max_functions as usize).max(textpoke::funcs::count()).max(count_totals.len());
    let nrows = live_count + finished.len();
    let page = textpoke_sys::anon::PAGE;
    let io_len = 64 << 10;
    let dir = s.dir.as_os_str().as_bytes();
    let scratch_len = 2 * nrows * std::mem::size_of::<Row>()
        + live_count * 64
        + 2 * (ids * 8).div_ceil(page)
        + ids.div_ceil(64) * 8
        + io_len
        + (live_count + 16) * (dir.len() + 64)
        + 4096
        + 64 * 16;
    let (Some(sc), Some(tot)) = (Scratch::map(scratch_len), Scratch::map(ids * 8)) else {
        return CrashFlush::Failed { events: 0, errno: libc::ENOMEM };
    };
    let (Some(totals), Some(resident), Some(need), Some(mut rows), Some(mut made), Some(io)) = (
        tot.zeroed::<u64>(ids),
        sc.zeroed::<u8>((ids * 8).div_ceil(page)),
        sc.zeroed::<u64>(ids.div_ceil(64)),
        sc.slots::<Row>(nrows),
        sc.slots::<Row>(live_count),
        sc.zeroed::<u8>(io_len),
    ) else {
        return CrashFlush::Failed { events: 0, errno: libc::ENOMEM };
    };
    let mut need = Ids(need);
    let mut first_errno = 0;
    let mut note = |r: Result<(), i32>| match r {
        Ok(()) => true,
        Err(e) => {
            if first_errno == 0 {
                first_errno = e;
            }
            false
        }
    };
    if !s.dir_ready {
        // A forked child's directory is made on its first data.
        if let Some(p) = sc.cstr(&[dir]) {
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::mkdir(p, 0o777) } != 0 && errno() != libc::EEXIST {
                note(Err(errno()));
            }
        }
    }
    // F4 and F5, buffer by buffer.
    // A thread inside a record call now publishes its event after this
    // snapshot, which is the end of its trace like all it records later:
    // not counted as lost.
    let (mut flushed, mut io_lost) = (0u64, 0u64);
    let max_hops = (c.thread_limit / c.segment_bytes.max(1)).saturating_add(4);
    for_each_buffer(registry, id, incoming, |bp, b| {
        let out = threads.get(&bp);
        let btid = out.map_or_else(|| b.p.tid.load(Ordering::Relaxed), |o| o.tid);
        let mut scan: Scan = out.map(|o| o.scan.clone()).unwrap_or_default();
        let before = scan.entries + scan.exits;
        let mut file: Option<&str> = out.and_then(|o| o.name.as_deref());
        if record {
            let mut dest = match out.and_then(|o| o.file.as_ref()) {
                Some(w) => {
                    // After what the writer wrote, and what it buffers
                    // (written first, at its place).
                    let fd = w.get_ref().as_raw_fd();
                    // SAFETY: the writer's descriptor, open while we hold
                    // the lock; lseek(0, SEEK_CUR) only reads its position.
                    let at = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
                    let pending = w.buffer();
                    if at < 0 {
                        note(Err(errno()));
                        Dest::Lost
                    } else if note(write_all(fd, pending, Some(at as u64))) {
                        Dest::At(fd, at as u64 + pending.len() as u64, false)
                    } else {
                        Dest::Lost
                    }
                }
                // Scanned words but no file: creating or writing it failed.
                None if out.is_some_and(|o| o.scan.words > 0 || o.name.is_some()) => Dest::Lost,
                None => Dest::New,
            };
            let mut seen = |f: u32| need.set(f as usize);
            for_each_unwritten(b, max_hops, |words| {
                let events_before = scan.entries + scan.exits;
                scan.words(words, &mut seen);
                if let Dest::New = dest {
                    dest = match file_name(&sc, btid, names, made.as_mut_slice()) {
                        Some(name) => match new_thread_file(&sc, dir, name, btid) {
                            Ok(fd) => {
                                file = Some(name);
                                Dest::At(fd, THREAD_HEADER_LEN as u64, true)
                            }
                            Err(e) => {
                                note(Err(e));
                                Dest::Lost
                            }
                        },
                        None => {
                            note(Err(libc::ENOMEM));
                            Dest::Lost
                        }
                    };
                }
                // SAFETY: u64 has no padding; the bytes live as the words.
                let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) };
                let ok = match &mut dest {
                    Dest::At(fd, at, _) => {
                        let ok = note(write_all(*fd, bytes, Some(*at)));
                        *at += bytes.len() as u64;
                        ok
                    }
                    _ => false,
                };
                if !ok {
                    io_lost += scan.entries + scan.exits - events_before;
                }
            });
            if let Dest::At(fd, _, true) = dest {
                close(fd);
            }
        }
        flushed += scan.entries + scan.exits - before;
        let mut calls = 0;
        for_each_counter(b, resident, |i, v| {
            if let Some(t) = totals.get_mut(i) {
                *t += v;
            }
            need.set(i);
            calls += v;
        });
        made.push(Row::Live(Live {
            tid: btid,
            file,
            words: scan.words,
            entries: scan.entries,
            exits: scan.exits,
            lost: b.s.dropped_full.load(Ordering::Relaxed),
            dropped_nested: b.s.dropped_nested.load(Ordering::Relaxed),
            dropped_range: b.s.dropped_range.load(Ordering::Relaxed),
            calls,
            first_ts: scan.first_ts,
            last_ts: scan.last_ts,
            checksum: hex16(scan.checksum),
            exited: b.cold.exited.load(Ordering::Acquire) != 0,
        }));
    });
    for (i, &v) in count_totals.iter().enumerate() {
        if v != 0 {
            if let Some(t) = totals.get_mut(i) {
                *t += v;
            }
            need.set(i);
        }
    }
    // F5: the calls that had no buffer to be counted in (buffer::count_orphan).
    let orphan_calls = add_orphans(&sc, totals, &mut need);
    // F6: the symbols the file lacks.
    let (written, pending, symfile) = s.symbols.parts();
    note(append_symbols(&sc, dir, io, &need, written, pending, symfile));
    // F7: counts.json.
    let resident_totals = sc.zeroed::<u8>((ids * 8).div_ceil(page)).unwrap_or_default();
    // SAFETY: `tot` is a page-aligned mapping that starts with `totals`.
    if !unsafe { textpoke_sys::anon::resident_into(tot.base, ids * 8, resident_totals) } {
        resident_totals.fill(1); // read every page, then
    }
    let counts = CountsOut { totals, resident: resident_totals };
    note(write_json_file(&sc, io, dir, format::COUNTS_FILE, &counts));
    // F7: meta.json, last.
    for r in made.as_mut_slice() {
        rows.push(*r);
    }
    for t in finished {
        rows.push(Row::Finished(t));
    }
    let rows = rows.as_mut_slice();
    rows.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
    let now = session::global_drops();
    let unattributed = UnattributedDrops {
        creating: now[0] - s.drops_base[0],
        exiting: now[1] - s.drops_base[1],
        no_memory: now[2] - s.drops_base[2],
        writer_thread: now[3] - s.drops_base[3],
        io: s.io_drops + io_lost,
        in_flight_at_stop: s.in_flight,
    };
    let (mut events, mut dropped, mut calls) = (0, unattributed.total(), orphan_calls);
    for r in rows.iter() {
        let (e, d, n) = r.totals();
        events += e;
        dropped += d;
        calls += n;
    }
    let mut comm = [0u8; 64];
    let comm = read_small(c"/proc/self/comm", &mut comm);
    let comm = comm.strip_suffix(b"\n").unwrap_or(comm);
    let comm = match std::str::from_utf8(comm) {
        Ok(c) => c,
        Err(e) => std::str::from_utf8(&comm[..e.valid_up_to()]).unwrap_or(""),
    };
    let exe = sc.zeroed::<u8>(4096).and_then(|buf| {
        // SAFETY: readlink into a valid buffer of its length.
        let n = unsafe { libc::readlink(c"/proc/self/exe".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = usize::try_from(n).ok()?;
        std::str::from_utf8(&buf[..n]).ok()
    });
    let meta = MetaOut {
        format: format::FORMAT_NAME,
        version: format::FORMAT_VERSION,
        complete: false,
        mode: c.mode,
        pid: textpoke_sys::threads::getpid(),
        parent_pid: s.parent_pid,
        process_name: c.process_name.as_deref().unwrap_or(comm),
        exe,
        clock: s.calibration.info(),
        start_unix_ns: s.start_unix_ns,
        start_ts: s.start_ts,
        end_ts: None,
        buffers: BufferInfo {
            segment_bytes: c.segment_bytes as u64,
            thread_limit: c.thread_limit as u64,
            memory_limit: c.memory_limit as u64,
            policy: FullPolicy::Discard,
            peak_bytes: buffer::MEM_PEAK.load(Ordering::Relaxed),
        },
        max_functions: c.max_functions,
        threads: Rows(rows),
        unattributed_drops: unattributed,
        unattributed_calls: orphan_calls,
        total_events: events,
        total_dropped: dropped,
        total_calls: calls,
        ended_by: Some(SignalEndOut {
            signal: sig.signal,
            name: SignalEnd::signal_name(sig.signal),
            tid,
            code: sig.code,
            addr: sig.addr,
            sender_pid: sig.sender_pid,
            ts: Clock::now(),
            flushed_events: flushed,
        }),
    };
    note(write_json_file(&sc, io, dir, format::META_FILE, &meta));
    if first_errno != 0 {
        CrashFlush::Failed { events: flushed, errno: first_errno }
    } else {
        CrashFlush::Written { events: flushed }
    }
}

/// Where F4 writes a thread's words.
enum Dest {
    /// Not decided: no file yet; made with the first words.
    New,
    /// This descriptor at this offset (and whether the flush opened it).
    At(i32, u64, bool),
    /// Nowhere: the words are counted as lost to I/O.
    Lost,
}

/// Creates a thread's file `dir/name` and writes its header.
fn new_thread_file(sc: &Scratch, dir: &[u8], name: &str, tid: i32) -> Result<i32, i32> {
    let path = sc.cstr(&[dir, b"/", name.as_bytes()]).ok_or(libc::ENOMEM)?;
    let fd = create(path)?;
    if let Err(e) = write_all(fd, &format::thread_header(tid), Some(0)) {
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// F6: appends the symbol lines the file lacks: the ids the writer saw
/// but had not appended (`pending`), and the ids in `need` not marked in
/// `written`. With the writer's file: after its buffered lines, marking
/// what it writes (a writer that lives on goes on from there). Without:
/// a new file, nothing marked (a writer that lives on makes it again).
fn append_symbols(
    sc: &Scratch,
    dir: &[u8],
    io: &mut [u8],
    need: &Ids<'_>,
    written: &mut [u64],
    pending: &mut Vec<u32>,
    file: Option<&mut std::io::BufWriter<std::fs::File>>,
) -> Result<(), i32> {
    let (fd, ours) = match file {
        Some(w) => {
            w.flush().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            (w.get_ref().as_raw_fd(), false)
        }
        None if pending.is_empty() && need.0.iter().all(|&w| w == 0) => return Ok(()),
        None => (create(sc.cstr(&[dir, b"/", format::SYMBOLS_FILE.as_bytes()]).ok_or(libc::ENOMEM)?)?, true),
    };
    let mut out = FdOut::new(fd, io, None);
    let mut line = |id: u32| {
        let (addr, name) = match textpoke::funcs::get(textpoke::funcs::FuncId(id)) {
            Some(f) => (f.addr, &*f.name),
            None => (0, ""),
        };
        let _ = serde_json::to_writer(&mut out, &SymbolOut { id, addr, name });
        let _ = out.write(b"\n");
    };
    for &id in pending.iter() {
        line(id);
    }
    for (w, &bits) in need.0.iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let id = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let mark = written.get_mut(id / 64);
            let done = mark.as_ref().is_some_and(|x| **x & (1 << (id % 64)) != 0);
            if done || id > u32::MAX as usize {
                continue;
            }
            line(id as u32);
            if let (false, Some(x)) = (ours, mark) {
                *x |= 1 << (id % 64);
            }
        }
    }
    let r = out.finish();
    if ours {
        close(fd);
    } else if r.is_ok() {
        pending.clear(); // written above; keeps its allocation
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Meta;

    /// The borrowed mirrors serialize to what the metadata types read, and
    /// name every field they have: the destructuring below stops compiling
    /// when a field is added to `Meta`, `ThreadMeta` or `SignalEnd`.
    #[test]
    fn mirrors_match_the_metadata_types() {
        let t = ThreadMeta {
            tid: 7,
            file: Some("tid-7.bin".into()),
            words: 10,
            entries: 3,
            exits: 2,
            lost: 1,
            dropped_nested: 4,
            dropped_range: 5,
            calls: 6,
            first_ts: 11,
            last_ts: 12,
            checksum: "00000000deadbeef".into(),
            exited: true,
        };
        let ThreadMeta {
            tid,
            file,
            words,
            entries,
            exits,
            lost,
            dropped_nested,
            dropped_range,
            calls,
            first_ts,
            last_ts,
            checksum,
            exited,
        } = &t;
        let live = Live {
            tid: *tid,
            file: file.as_deref(),
            words: *words,
            entries: *entries,
            exits: *exits,
            lost: *lost,
            dropped_nested: *dropped_nested,
            dropped_range: *dropped_range,
            calls: *calls,
            first_ts: *first_ts,
            last_ts: *last_ts,
            checksum: hex16(0xdead_beef),
            exited: *exited,
        };
        assert_eq!(checksum, std::str::from_utf8(&live.checksum).unwrap());
        let back: ThreadMeta = serde_json::from_str(&serde_json::to_string(&Row::Live(live)).unwrap()).unwrap();
        assert_eq!(back, t);

        let end = SignalEnd {
            signal: 11,
            name: "SIGSEGV".into(),
            tid: 7,
            code: 1,
            addr: Some(0x10),
            sender_pid: None,
            ts: 99,
            flushed_events: 3,
        };
        let SignalEnd { signal, name, tid: etid, code, addr, sender_pid, ts, flushed_events } = &end;
        let end_out = SignalEndOut {
            signal: *signal,
            name,
            tid: *etid,
            code: *code,
            addr: *addr,
            sender_pid: *sender_pid,
            ts: *ts,
            flushed_events: *flushed_events,
        };
        let meta = Meta {
            format: format::FORMAT_NAME.into(),
            version: format::FORMAT_VERSION,
            complete: false,
            mode: Mode::Record,
            pid: 1,
            parent_pid: Some(2),
            process_name: "p".into(),
            exe: Some("/bin/p".into()),
            clock: ClockInfo::identity(format::ClockSource::Monotonic),
            start_unix_ns: 3,
            start_ts: 4,
            end_ts: None,
            buffers: BufferInfo {
                segment_bytes: 8192,
                thread_limit: 1 << 20,
                memory_limit: 1 << 20,
                policy: FullPolicy::Discard,
                peak_bytes: 5,
            },
            max_functions: 64,
            threads: vec![t.clone()],
            unattributed_drops: UnattributedDrops { creating: 1, ..Default::default() },
            unattributed_calls: 2,
            total_events: 5,
            total_dropped: 6,
            total_calls: 8,
            ended_by: Some(end.clone()),
        };
        let Meta {
            format,
            version,
            complete,
            mode,
            pid,
            parent_pid,
            process_name,
            exe,
            clock,
            start_unix_ns,
            start_ts,
            end_ts,
            buffers,
            max_functions,
            threads,
            unattributed_drops,
            unattributed_calls,
            total_events,
            total_dropped,
            total_calls,
            ended_by: _,
        } = &meta;
        let rows: Vec<Row> = threads.iter().map(Row::Finished).collect();
        let out = MetaOut {
            format,
            version: *version,
            complete: *complete,
            mode: *mode,
            pid: *pid,
            parent_pid: *parent_pid,
            process_name,
            exe: exe.as_deref(),
            clock: *clock,
            start_unix_ns: *start_unix_ns,
            start_ts: *start_ts,
            end_ts: *end_ts,
            buffers: buffers.clone(),
            max_functions: *max_functions,
            threads: Rows(&rows),
            unattributed_drops: unattributed_drops.clone(),
            unattributed_calls: *unattributed_calls,
            total_events: *total_events,
            total_dropped: *total_dropped,
            total_calls: *total_calls,
            ended_by: Some(end_out),
        };
        let back: Meta = serde_json::from_str(&serde_json::to_string(&out).unwrap()).unwrap();
        assert_eq!(back, meta);
    }

    #[test]
    fn counts_and_symbols_serialize_as_the_writer_writes_them() {
        let mut totals = vec![0u64; 1024];
        totals[3] = 7;
        totals[600] = 1;
        let out = CountsOut { totals: &totals, resident: &[1, 1] };
        let back: format::CountsFile = serde_json::from_str(&serde_json::to_string(&out).unwrap()).unwrap();
        assert_eq!(back.calls, vec![(3, 7), (600, 1)]);
        let skipped = CountsOut { totals: &totals, resident: &[1, 0] };
        let back: format::CountsFile = serde_json::from_str(&serde_json::to_string(&skipped).unwrap()).unwrap();
        assert_eq!(back.calls, vec![(3, 7)], "untouched pages are not read");
        let s: format::Symbol =
            serde_json::from_str(&serde_json::to_string(&SymbolOut { id: 4, addr: 5, name: "a\"b" }).unwrap()).unwrap();
        assert_eq!(s, format::Symbol { id: 4, addr: 5, name: "a\"b".into() });
        assert_eq!(&hex16(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(u64::MAX, &mut d), b"18446744073709551615");
    }
}
