//! Per-thread buffers and the hot path. See the [`crate::record`] module
//! documentation for the algorithm; the numbered steps there ("Hot path",
//! "Buffer creation", "Thread exit") are referred to here as H1…, C1…,
//! X1….

use super::clock::Clock;
use super::format::{RawRecord, KIND_VALUE};
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

// ---------------------------------------------------------------------------
// Global words read by the hot path.

/// The session word: 0 when nothing records, else `epoch << 2 | mode`.
/// Stored by the control path (release; SeqCst at stop), loaded by the hot
/// path (relaxed: compared with the buffer's own copy, which the thread
/// itself wrote).
pub(crate) static ACTIVE: AtomicU64 = AtomicU64::new(0);
pub(crate) const MODE_RECORD: u64 = 1;
pub(crate) const MODE_COUNT: u64 = 2;
pub(crate) const MODE_MASK: u64 = 3;

/// Ring capacity (records, a power of two) and counter array length for
/// buffers made for the current session. Written before [`ACTIVE`] is
/// published (release), read after it is loaded with acquire (C3).
pub(crate) static CFG_RING: AtomicU64 = AtomicU64::new(0);
pub(crate) static CFG_FUNCS: AtomicU64 = AtomicU64::new(0);
/// Whether a producer crossing half-full wakes the writer.
pub(crate) static CFG_WAKE_HALF: AtomicBool = AtomicBool::new(true);
/// Whether rings are faulted in when they are mapped (see
/// `RecorderConfig::prefault_buffers`).
pub(crate) static CFG_PREFAULT: AtomicBool = AtomicBool::new(true);

/// Threads inside buffer creation (C2); the stop protocol waits for 0.
pub(crate) static CREATING: AtomicU32 = AtomicU32::new(0);

/// Buffers created but not yet adopted by the control path: a lock-free
/// stack (C6), taken whole by [`take_incoming`].
static INCOMING: AtomicPtr<ThreadBuf> = AtomicPtr::new(ptr::null_mut());

/// The writer's futex word: bumped and woken by producers crossing
/// half-full and by the control path.
pub(crate) static WAKE: AtomicU32 = AtomicU32::new(0);

/// Drops no thread buffer can count (see `format::UnattributedDrops`).
pub(crate) static DROP_CREATING: AtomicU64 = AtomicU64::new(0);
pub(crate) static DROP_EXITING: AtomicU64 = AtomicU64::new(0);
pub(crate) static DROP_NOMEM: AtomicU64 = AtomicU64::new(0);
pub(crate) static DROP_WRITER: AtomicU64 = AtomicU64::new(0);

/// Test hook: called in the middle of buffer creation (C4), so a test can
/// raise a signal there. Null when unset.
pub(crate) static CREATION_HOOK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

/// The pthread key whose destructor retires a thread's buffer (X1); valid
/// once `KEY_READY` is true.
static KEY: AtomicU32 = AtomicU32::new(0);
static KEY_READY: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------
// The per-thread buffer.

/// Fields written by the producer on every record: one cache line.
#[repr(C, align(64))]
pub(crate) struct Producer {
    /// 1 while the thread is inside a record or count call (H2).
    pub busy: AtomicU32,
    /// Kernel thread id of the owner.
    pub tid: AtomicI32,
    /// The [`ACTIVE`] value this buffer records for.
    pub session: AtomicU64,
    /// Records published: slots `[tail, head)` are readable by the writer.
    pub head: AtomicU64,
    /// The producer's last look at `tail` (producer-private).
    pub cached_tail: AtomicU64,
    /// The last timestamp recorded (producer-private; H5 clamps to it).
    pub last_ts: AtomicU64,
    /// The ring: `cap` records.
    pub ring: AtomicPtr<RawRecord>,
    /// Ring capacity, a power of two; 0 in count mode.
    pub cap: AtomicU64,
}

/// Count-mode array and drop counters, written by the producer only.
#[repr(C, align(64))]
pub(crate) struct Counters {
    pub counters: AtomicPtr<u64>,
    pub ncounters: AtomicU64,
    pub dropped_full: AtomicU64,
    pub dropped_nested: AtomicU64,
    pub dropped_range: AtomicU64,
}

/// Written by the consumer.
#[repr(C, align(64))]
pub(crate) struct Consumer {
    /// Records consumed.
    pub tail: AtomicU64,
}

/// Rarely touched.
#[repr(C, align(64))]
pub(crate) struct Cold {
    /// Set by the thread-exit destructor (X2).
    pub exited: AtomicU32,
    /// Link of the [`INCOMING`] stack.
    pub next: AtomicPtr<ThreadBuf>,
}

/// One thread's buffer. Lives in its own anonymous mapping; only the
/// owning thread creates and re-initialises it, only the control path
/// (after the thread exited, or in a forked child) frees it.
#[repr(C)]
pub(crate) struct ThreadBuf {
    pub p: Producer,
    pub c: Counters,
    pub cons: Consumer,
    pub cold: Cold,
}

/// Per-thread state. `const`-initialised and without a destructor, so
/// reading it is one `fs:`-relative load, never allocates and never fails.
struct Tls {
    buf: Cell<*mut ThreadBuf>,
    state: Cell<u8>,
}

const ST_NORMAL: u8 = 0;
const ST_CREATING: u8 = 1;
const ST_EXITED: u8 = 2;
const ST_WRITER: u8 = 3;

thread_local! {
    static TLS: Tls = const { Tls { buf: Cell::new(ptr::null_mut()), state: Cell::new(ST_NORMAL) } };
}

/// Where the hot-path state lives, for code generated at run time that
/// records or counts in a few instructions (the tracer's count and graph
/// trampolines). Such code must do exactly what [`try_count`] (K1-K4) or
/// [`try_push`] (H0-H8) do, and fall back to [`count`] or [`record`] in
/// every other case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLayout {
    /// Offset of this thread's buffer pointer from the thread pointer
    /// (`fs:0`): the same in every thread.
    pub tls_buf: i32,
    /// Address of the session word every buffer's `session` must equal.
    pub active: usize,
    /// Address of the byte that is non-zero when the clock is the TSC read
    /// as `lfence; rdtsc` (see `clock`); otherwise records take the slow path.
    pub use_tsc: usize,
    /// Offsets in a buffer: `busy` (u32), `session`, `head`, `cached_tail`,
    /// `last_ts`, `ring` (pointer to 16-byte records), `cap` (u64s),
    /// `counters` (pointer to u64s), `ncounters` (u64).
    pub busy: usize,
    pub session: usize,
    pub head: usize,
    pub cached_tail: usize,
    pub last_ts: usize,
    pub ring: usize,
    pub cap: usize,
    pub counters: usize,
    pub ncounters: usize,
}

/// The buffer layout, if this module's thread-local lives in the static
/// TLS block (see `arch::static_tls_offset`); `None` otherwise.
pub fn buffer_layout() -> Option<BufferLayout> {
    static LAYOUT: std::sync::OnceLock<Option<BufferLayout>> = std::sync::OnceLock::new();
    *LAYOUT.get_or_init(|| {
        let tls_buf = crate::arch::static_tls_offset(|| TLS.with(|t| t.buf.as_ptr() as usize))?;
        let p = std::mem::offset_of!(ThreadBuf, p);
        let c = std::mem::offset_of!(ThreadBuf, c);
        Some(BufferLayout {
            tls_buf,
            active: &ACTIVE as *const AtomicU64 as usize,
            use_tsc: super::clock::use_tsc_flag() as *const AtomicBool as usize,
            busy: p + std::mem::offset_of!(Producer, busy),
            session: p + std::mem::offset_of!(Producer, session),
            head: p + std::mem::offset_of!(Producer, head),
            cached_tail: p + std::mem::offset_of!(Producer, cached_tail),
            last_ts: p + std::mem::offset_of!(Producer, last_ts),
            ring: p + std::mem::offset_of!(Producer, ring),
            cap: p + std::mem::offset_of!(Producer, cap),
            counters: c + std::mem::offset_of!(Counters, counters),
            ncounters: c + std::mem::offset_of!(Counters, ncounters),
        })
    })
}

#[inline(always)]
fn tls_buf() -> *mut ThreadBuf {
    TLS.with(|t| t.buf.get())
}

/// The calling thread's buffer pointer (null if none). For the fork child
/// handler, which keeps the forking thread's buffer.
pub(crate) fn current_buf() -> *mut ThreadBuf {
    tls_buf()
}

/// Marks the calling thread as the writer: its records are dropped and
/// counted (the writer must not record into a buffer it drains).
pub(crate) fn mark_writer_thread() {
    TLS.with(|t| t.state.set(ST_WRITER));
}

// ---------------------------------------------------------------------------
// Hot path.

/// Records an entry or exit (H1–H8). `value` adds a [`KIND_VALUE`] record.
#[inline(always)]
pub(crate) fn record(kind: u8, func: u32, depth: u32, value: Option<u64>) -> bool {
    if ACTIVE.load(Ordering::Relaxed) == 0 {
        return false; // nothing records: skip the clock read
    }
    let now = Clock::now(); // H0
    let buf = tls_buf(); // H1
    if buf.is_null() {
        return slow_record(now, kind, func, depth, value);
    }
    // SAFETY: a non-null TLS pointer is this thread's live buffer: only
    // this thread replaces it (C5, X1) and the control path frees it only
    // after X2 (or in a forked child, for other threads' buffers).
    let b = unsafe { &*buf };
    match try_push(b, now, kind, func, depth, value) {
        Push::Done(ok) => ok,
        Push::Stale => slow_record(now, kind, func, depth, value),
    }
}

enum Push {
    Done(bool),
    Stale,
}

#[inline(always)]
fn try_push(b: &ThreadBuf, now: u64, kind: u8, func: u32, depth: u32, value: Option<u64>) -> Push {
    let p = &b.p;
    if p.busy.load(Ordering::Relaxed) != 0 {
        return Push::Done(nested_drop(b)); // H2
    }
    p.busy.store(1, Ordering::Relaxed);
    // Signal fence: a handler that interrupts us after this point sees
    // busy = 1. The stop protocol's membarrier supplies the CPU barrier
    // between this store and the load of ACTIVE below (S2).
    compiler_fence(Ordering::SeqCst);
    if ACTIVE.load(Ordering::Relaxed) != p.session.load(Ordering::Relaxed) {
        compiler_fence(Ordering::SeqCst);
        p.busy.store(0, Ordering::Release);
        return Push::Stale; // H3
    }
    let need: u64 = if value.is_some() { 2 } else { 1 };
    let head = p.head.load(Ordering::Relaxed);
    let cap = p.cap.load(Ordering::Relaxed);
    let mut tail = p.cached_tail.load(Ordering::Relaxed);
    let mut refreshed = false;
    if head + need - tail > cap {
        // H4. Acquire pairs with the writer's release store of `tail`
        // (D4): the slots it frees were read before we overwrite them.
        tail = b.cons.tail.load(Ordering::Acquire);
        refreshed = true;
        p.cached_tail.store(tail, Ordering::Relaxed);
        if head + need - tail > cap {
            let ok = full_drop(b, cap);
            compiler_fence(Ordering::SeqCst);
            p.busy.store(0, Ordering::Release);
            return Push::Done(ok);
        }
    }
    // H5: the timestamp, never below this thread's previous one.
    let mut ts = now;
    let last = p.last_ts.load(Ordering::Relaxed);
    if ts < last {
        ts = last;
    }
    p.last_ts.store(ts, Ordering::Relaxed);
    // H6: fill the slot(s).
    let ring = p.ring.load(Ordering::Relaxed);
    let mask = cap - 1;
    let rec = RawRecord { ts, func, depth: depth.min(u16::MAX as u32) as u16, kind, flags: 0 };
    // SAFETY: `head & mask < cap`, the ring holds `cap` records, and slots
    // in `[tail + cap - ...)` beyond `head` are not read by the writer
    // until `head` is published below.
    unsafe { ring.add((head & mask) as usize).write(rec) };
    if let Some(v) = value {
        let vrec = RawRecord { ts: v, func, depth: rec.depth, kind: KIND_VALUE, flags: 0 };
        // SAFETY: as above, `need` = 2 slots were checked free.
        unsafe { ring.add(((head + 1) & mask) as usize).write(vrec) };
    }
    // H7: publish. Release pairs with the writer's acquire load of `head`
    // (D1): the slot contents are visible before the new head.
    p.head.store(head + need, Ordering::Release);
    if CFG_WAKE_HALF.load(Ordering::Relaxed) {
        // Wake the writer when the ring reaches half full. Measured against
        // the cached tail, the crossing is seen once per refresh of the
        // cache; right after a refresh (the real tail) the ring may already
        // be past half with the crossing missed, so wake whenever it is.
        let half = cap / 2;
        let now_full = head + need - tail >= half;
        if now_full && (refreshed || head - tail < half) {
            wake_writer();
        }
    }
    compiler_fence(Ordering::SeqCst);
    // H8. Release pairs with the stop protocol's acquire load of `busy`
    // (S4): everything published above is visible to the final drain.
    p.busy.store(0, Ordering::Release);
    Push::Done(true)
}

/// Counts a call (K1–K4).
#[inline(always)]
pub(crate) fn count(func: u32) -> bool {
    let buf = tls_buf();
    if buf.is_null() {
        return slow_count(func);
    }
    // SAFETY: as in `record`.
    let b = unsafe { &*buf };
    match try_count(b, func) {
        Some(ok) => ok,
        None => slow_count(func),
    }
}

/// `None`: the buffer is stale or the id out of range; take the slow path.
#[inline(always)]
fn try_count(b: &ThreadBuf, func: u32) -> Option<bool> {
    let p = &b.p;
    // K1: a count nests correctly (K3 is one instruction), so save and
    // restore `busy` instead of dropping when it is already set.
    let was = p.busy.load(Ordering::Relaxed);
    p.busy.store(1, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    let ok = ACTIVE.load(Ordering::Relaxed) == p.session.load(Ordering::Relaxed)
        && (func as u64) < b.c.ncounters.load(Ordering::Relaxed);
    if ok {
        // SAFETY: func < ncounters, the array's length.
        unsafe { increment(b.c.counters.load(Ordering::Relaxed).add(func as usize)) };
    }
    compiler_fence(Ordering::SeqCst);
    p.busy.store(was, Ordering::Release); // K4, pairs with S4
    if ok {
        Some(true)
    } else {
        None
    }
}

/// K3: adds one to a counter owned by this thread, in one instruction so
/// that a signal handler counting on the same thread cannot lose an
/// update; the writer reads it with atomic loads (aligned 8-byte stores are
/// atomic on x86-64).
///
/// # Safety
///
/// `p` must point to a live, aligned counter of the calling thread's buffer.
#[inline(always)]
unsafe fn increment(p: *mut u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller guarantees `p` is valid; `add` touches only it.
    unsafe {
        core::arch::asm!("add qword ptr [{p}], 1", p = in(reg) p, options(nostack));
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Elsewhere: load + store; a same-thread signal handler counting
        // between the two loses one count.
        // SAFETY: the caller guarantees `p` is valid and aligned.
        let a = unsafe { &*(p as *const AtomicU64) };
        a.store(a.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// Wakes the writer (bumps [`WAKE`], futex wake). Async-signal-safe.
pub(crate) fn wake_writer() {
    // Release pairs with the writer's acquire load of WAKE before it waits.
    WAKE.fetch_add(1, Ordering::Release);
    crate::sys::futex_wake(&WAKE, 1);
}

// ---------------------------------------------------------------------------
// Cold paths.

/// A signal handler recorded while this thread was inside a record call.
#[cold]
#[inline(never)]
fn nested_drop(b: &ThreadBuf) -> bool {
    if ACTIVE.load(Ordering::Relaxed) == b.p.session.load(Ordering::Relaxed) {
        // fetch_add: nested handlers may themselves be interrupted.
        b.c.dropped_nested.fetch_add(1, Ordering::Relaxed);
    }
    false
}

/// The ring is full (or this is a count-only buffer with no ring).
#[cold]
#[inline(never)]
fn full_drop(b: &ThreadBuf, cap: u64) -> bool {
    if cap != 0 {
        // Only the non-nested owner gets here (busy is held): load + store.
        let d = &b.c.dropped_full;
        d.store(d.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
    false
}

/// No buffer, or a buffer made for another session.
#[cold]
#[inline(never)]
/// `now` is the time of the event, read before the slow path.
fn slow_record(now: u64, kind: u8, func: u32, depth: u32, value: Option<u64>) -> bool {
    let Some(b) = begin_acquire(MODE_RECORD) else {
        return false;
    };
    // SAFETY: begin_acquire returns this thread's live buffer.
    let ok = match try_push(unsafe { &*b }, now, kind, func, depth, value) {
        Push::Done(ok) => ok,
        Push::Stale => false, // the session changed again meanwhile
    };
    end_acquire();
    ok
}

#[cold]
#[inline(never)]
fn slow_count(func: u32) -> bool {
    let buf = tls_buf();
    if !buf.is_null() {
        // SAFETY: as in `record`.
        let b = unsafe { &*buf };
        let active = ACTIVE.load(Ordering::Relaxed);
        if active == b.p.session.load(Ordering::Relaxed) {
            // Same session: the id is out of range (or this is a record
            // session, where counting does nothing).
            if active & MODE_MASK == MODE_COUNT {
                b.c.dropped_range.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
    }
    let Some(b) = begin_acquire(MODE_COUNT) else {
        return false;
    };
    // SAFETY: begin_acquire returns this thread's live buffer.
    let b = unsafe { &*b };
    let ok = match try_count(b, func) {
        Some(ok) => ok,
        None => {
            if (func as u64) >= b.c.ncounters.load(Ordering::Relaxed) {
                b.c.dropped_range.fetch_add(1, Ordering::Relaxed);
            }
            false
        }
    };
    end_acquire();
    ok
}

/// C1–C7: makes this thread's buffer current for the active session, if
/// that session's mode is `want`. On success the caller writes its record
/// and calls [`end_acquire`]. Async-signal-safe: only mmap, munmap,
/// gettid and pthread_setspecific (a key below 32: a store into the
/// thread descriptor, no allocation), and a CAS loop that only other
/// threads' buffer creations can make retry.
#[cold]
fn begin_acquire(want: u64) -> Option<*mut ThreadBuf> {
    let state = TLS.with(|t| t.state.get());
    if state != ST_NORMAL {
        // C1: a signal handler interrupted this thread's own creation, or
        // the thread has retired its buffer, or this is the writer.
        if ACTIVE.load(Ordering::Relaxed) & MODE_MASK == want {
            match state {
                ST_CREATING => DROP_CREATING.fetch_add(1, Ordering::Relaxed),
                ST_EXITED => DROP_EXITING.fetch_add(1, Ordering::Relaxed),
                _ => DROP_WRITER.fetch_add(1, Ordering::Relaxed),
            };
        }
        return None;
    }
    if ACTIVE.load(Ordering::Relaxed) & MODE_MASK != want {
        return None; // not recording in this mode: nothing to create
    }
    TLS.with(|t| t.state.set(ST_CREATING));
    compiler_fence(Ordering::SeqCst);
    // C2. SeqCst pairs with the stop protocol's SeqCst store to ACTIVE and
    // SeqCst load of CREATING (S1/S3): either we see the session ended, or
    // the stopper waits for us to finish and push our buffer.
    CREATING.fetch_add(1, Ordering::SeqCst);
    // C3. Acquire pairs with the control path's release of ACTIVE: the
    // CFG_* words for this session are visible.
    let active = ACTIVE.load(Ordering::SeqCst);
    let mut result = None;
    if active & MODE_MASK == want {
        let old = tls_buf();
        if !old.is_null() {
            // C5: re-initialise our own stale buffer (its session's final
            // drain is over: a new session starts only after the old one
            // stopped). Hide it from nested handlers meanwhile.
            TLS.with(|t| t.buf.set(ptr::null_mut()));
            compiler_fence(Ordering::SeqCst);
            // SAFETY: `old` is this thread's buffer; no writer reads it
            // while its session differs from the active one.
            if unsafe { reinit(old, active) } {
                result = Some(old);
            }
            // On failure the buffer stays registered with a stale session
            // and is freed when the thread exits.
        } else if let Some(b) = create(active) {
            result = Some(b);
        }
        match result {
            Some(b) => TLS.with(|t| t.buf.set(b)),
            None => {
                DROP_NOMEM.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if result.is_none() {
        end_acquire();
    }
    result
}

/// C7: leaves the creation section entered by [`begin_acquire`].
fn end_acquire() {
    // Release pairs with the stop protocol's acquire load of CREATING (S3):
    // our push to INCOMING and our record are visible once it sees 0.
    CREATING.fetch_sub(1, Ordering::Release);
    compiler_fence(Ordering::SeqCst);
    TLS.with(|t| t.state.set(ST_NORMAL));
}

/// C4 + C6: maps a new buffer for session `active`, registers the
/// thread-exit destructor and pushes the buffer onto [`INCOMING`].
fn create(active: u64) -> Option<*mut ThreadBuf> {
    let size = std::mem::size_of::<ThreadBuf>();
    let mem = crate::sys::anon::map(size)?;
    let b = mem as *mut ThreadBuf;
    // SAFETY: a fresh zeroed mapping of the right size; all-zero bytes are
    // a valid ThreadBuf (atomics and null pointers).
    let bref = unsafe { &*b };
    let hook = CREATION_HOOK.load(Ordering::Relaxed);
    if !hook.is_null() {
        // SAFETY: only tests set the hook, to an `extern "C" fn()`.
        let f: extern "C" fn() = unsafe { std::mem::transmute(hook) };
        f();
    }
    // SAFETY: `b` is ours and not yet visible to anyone.
    if !unsafe { reinit(b, active) } {
        // SAFETY: mapped above with this size, never published.
        unsafe { crate::sys::anon::unmap(mem, size) };
        return None;
    }
    if KEY_READY.load(Ordering::Acquire) {
        // SAFETY: KEY is a valid key (KEY_READY); the value is our buffer.
        unsafe { libc::pthread_setspecific(KEY.load(Ordering::Relaxed), b as *const libc::c_void) };
    }
    // C6: push. Release pairs with take_incoming's acquire swap.
    let mut head = INCOMING.load(Ordering::Relaxed);
    loop {
        bref.cold.next.store(head, Ordering::Relaxed);
        match INCOMING.compare_exchange_weak(head, b, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
    Some(b)
}

/// Sets up the ring or counters for session `active` and resets the
/// positions and drop counts; publishes `session` last.
///
/// # Safety
///
/// `b` must be the calling thread's buffer (or a new one) that no writer
/// reads: its `session` differs from every running session's.
unsafe fn reinit(b: *mut ThreadBuf, active: u64) -> bool {
    // SAFETY: the caller guarantees exclusive use.
    let b = unsafe { &*b };
    let (want_cap, want_funcs) = if active & MODE_MASK == MODE_RECORD {
        (CFG_RING.load(Ordering::Relaxed), 0)
    } else {
        (0, CFG_FUNCS.load(Ordering::Relaxed))
    };
    let rec = std::mem::size_of::<RawRecord>();
    let cap = b.p.cap.load(Ordering::Relaxed);
    if cap != want_cap {
        let old = b.p.ring.swap(ptr::null_mut(), Ordering::Relaxed);
        b.p.cap.store(0, Ordering::Relaxed);
        if !old.is_null() {
            // SAFETY: mapped by us with this length.
            unsafe { crate::sys::anon::unmap(old as *mut u8, cap as usize * rec) };
        }
        if want_cap != 0 {
            let len = want_cap as usize * rec;
            let m = if CFG_PREFAULT.load(Ordering::Relaxed) {
                crate::sys::anon::map_populated(len)
            } else {
                crate::sys::anon::map(len)
            };
            let Some(m) = m else {
                return false;
            };
            b.p.ring.store(m as *mut RawRecord, Ordering::Relaxed);
            b.p.cap.store(want_cap, Ordering::Relaxed);
        }
    }
    let n = b.c.ncounters.load(Ordering::Relaxed);
    let counters = b.c.counters.load(Ordering::Relaxed);
    if n == want_funcs && !counters.is_null() {
        // Fresh zero pages over the old counts.
        // SAFETY: our own mapping of this length.
        if !unsafe { crate::sys::anon::remap_zero(counters as *mut u8, n as usize * 8) } {
            return false;
        }
    } else if n != want_funcs {
        b.c.counters.store(ptr::null_mut(), Ordering::Relaxed);
        b.c.ncounters.store(0, Ordering::Relaxed);
        if !counters.is_null() {
            // SAFETY: our own mapping of this length.
            unsafe { crate::sys::anon::unmap(counters as *mut u8, n as usize * 8) };
        }
        if want_funcs != 0 {
            let Some(m) = crate::sys::anon::map(want_funcs as usize * 8) else {
                return false;
            };
            b.c.counters.store(m as *mut u64, Ordering::Relaxed);
            b.c.ncounters.store(want_funcs, Ordering::Relaxed);
        }
    }
    b.p.tid.store(crate::sys::threads::gettid(), Ordering::Relaxed);
    b.p.head.store(0, Ordering::Relaxed);
    b.p.cached_tail.store(0, Ordering::Relaxed);
    b.p.last_ts.store(0, Ordering::Relaxed);
    b.cons.tail.store(0, Ordering::Relaxed);
    b.c.dropped_full.store(0, Ordering::Relaxed);
    b.c.dropped_nested.store(0, Ordering::Relaxed);
    b.c.dropped_range.store(0, Ordering::Relaxed);
    b.cold.exited.store(0, Ordering::Relaxed);
    // Release pairs with the writer's acquire load of `session` (D0): a
    // writer that sees this session sees the reset fields.
    b.p.session.store(active, Ordering::Release);
    true
}

// ---------------------------------------------------------------------------
// Control-path helpers.

/// Creates the thread-exit key once. Control path.
pub(crate) fn ensure_key() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: valid out-pointer and an `extern "C"` destructor.
        if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
            KEY.store(key, Ordering::Relaxed);
            KEY_READY.store(true, Ordering::Release);
        }
    });
}

/// X1–X2: the pthread key destructor, run at thread exit.
extern "C" fn thread_exit(p: *mut libc::c_void) {
    // X1: later records on this thread (other destructors) drop and count.
    TLS.with(|t| {
        if t.buf.get() == p as *mut ThreadBuf {
            t.buf.set(ptr::null_mut());
        }
        t.state.set(ST_EXITED);
    });
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the key's value is this thread's buffer, still mapped (only
    // the control path frees it, after seeing `exited`).
    let b = unsafe { &*(p as *const ThreadBuf) };
    // X2. Release pairs with the writer's acquire load of `exited` (D5):
    // every record of this thread is published before it is freed.
    b.cold.exited.store(1, Ordering::Release);
}

/// Takes every buffer pushed since the last call. Acquire pairs with the
/// release CAS of C6.
pub(crate) fn take_incoming() -> Vec<*mut ThreadBuf> {
    let mut p = INCOMING.swap(ptr::null_mut(), Ordering::Acquire);
    let mut v = Vec::new();
    while !p.is_null() {
        v.push(p);
        // SAFETY: pushed buffers stay mapped until adopted and freed by
        // the control path, which is us.
        p = unsafe { &*p }.cold.next.load(Ordering::Relaxed);
    }
    v
}

/// Unmaps a buffer.
///
/// # Safety
///
/// No thread may use `b` any more: its owner exited (`exited` seen with
/// acquire) or does not exist (forked child).
pub(crate) unsafe fn free(b: *mut ThreadBuf) {
    // SAFETY: the caller guarantees exclusive use.
    let r = unsafe { &*b };
    let rec = std::mem::size_of::<RawRecord>();
    let ring = r.p.ring.load(Ordering::Relaxed);
    if !ring.is_null() {
        // SAFETY: mapped by reinit with this length.
        unsafe { crate::sys::anon::unmap(ring as *mut u8, r.p.cap.load(Ordering::Relaxed) as usize * rec) };
    }
    let c = r.c.counters.load(Ordering::Relaxed);
    if !c.is_null() {
        // SAFETY: mapped by reinit with this length.
        unsafe { crate::sys::anon::unmap(c as *mut u8, r.c.ncounters.load(Ordering::Relaxed) as usize * 8) };
    }
    // SAFETY: mapped by create with this length.
    unsafe { crate::sys::anon::unmap(b as *mut u8, std::mem::size_of::<ThreadBuf>()) };
}

/// In a forked child: the creation counter of threads that do not exist
/// here.
pub(crate) fn reset_after_fork() {
    CREATING.store(0, Ordering::Relaxed);
}
