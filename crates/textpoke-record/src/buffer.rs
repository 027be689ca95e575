//! Per-thread buffers (chains of segments) and the hot path. See the
//! [crate documentation](crate) for the algorithm; the numbered
//! steps there ("Hot path", "Segments", "Buffer creation", "Thread exit")
//! are referred to here as H1…, G1…, C1…, X1….

use super::format::{self, KIND_ENTRY, KIND_EXIT_VALUE, SPECIAL_CUT, SPECIAL_LONG, SPECIAL_SYNC};
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use textpoke::clock::Clock;

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

/// Configuration of the buffers made for the current session. Written
/// before [`ACTIVE`] is published (release), read after it is loaded with
/// acquire (C3).
pub(crate) static CFG_SEGMENT: AtomicU64 = AtomicU64::new(0);
pub(crate) static CFG_FUNCS: AtomicU64 = AtomicU64::new(0);
pub(crate) static CFG_THREAD_LIMIT: AtomicU64 = AtomicU64::new(0);
/// Whether segments are faulted in when they are mapped (see
/// `RecorderConfig::prefault_buffers`).
pub(crate) static CFG_PREFAULT: AtomicBool = AtomicBool::new(true);

/// The overall memory limit of all segments, and what they use now (G3):
/// the producers add when they map, the writer subtracts when it unmaps.
pub(crate) static MEM_LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);
pub(crate) static MEM_USED: AtomicU64 = AtomicU64::new(0);
/// The most [`MEM_USED`] was since the session started.
pub(crate) static MEM_PEAK: AtomicU64 = AtomicU64::new(0);

/// Threads inside buffer creation (C2); the stop protocol waits for 0.
pub(crate) static CREATING: AtomicU32 = AtomicU32::new(0);

/// Buffers created but not yet adopted by the control path: a lock-free
/// stack (C6), taken whole by [`take_incoming`].
static INCOMING: AtomicPtr<ThreadBuf> = AtomicPtr::new(ptr::null_mut());

/// The writer's futex word: bumped and woken by producers finishing a
/// segment (G2) and by the control path.
pub(crate) static WAKE: AtomicU32 = AtomicU32::new(0);

/// Drops no thread buffer can count (see `format::UnattributedDrops`).
pub(crate) static DROP_CREATING: AtomicU64 = AtomicU64::new(0);
pub(crate) static DROP_EXITING: AtomicU64 = AtomicU64::new(0);
pub(crate) static DROP_NOMEM: AtomicU64 = AtomicU64::new(0);
pub(crate) static DROP_WRITER: AtomicU64 = AtomicU64::new(0);

/// Calls counted while their thread had no buffer to count them in (C1':
/// a signal handler during the buffer's creation, a destructor after its
/// retirement, the writer thread, a buffer that could not be mapped), by
/// function id: a process-wide array of [`ORPHANS_LEN`] counters, mapped
/// on first use (pages touched lazily) and never unmapped.
static ORPHANS: AtomicPtr<AtomicU64> = AtomicPtr::new(ptr::null_mut());
/// Length of [`ORPHANS`]: every id a compact event can hold.
pub(crate) const ORPHANS_LEN: usize = 1 << format::FUNC_BITS;

/// Test hook: called in the middle of buffer creation (C4), so a test can
/// raise a signal there. Null when unset.
#[cfg(feature = "testing")]
pub(crate) static CREATION_HOOK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

/// Called on a thread when it makes its buffer (C4) and when it retires
/// it (X1), if set (`record::set_thread_hooks`): the agent gives recording
/// threads an alternate signal stack there. Async-signal-safe functions
/// (C4 may run in a signal handler). Null when unset.
pub(crate) static THREAD_START_HOOK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());
pub(crate) static THREAD_EXIT_HOOK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

/// Calls the hook in `slot`, if any.
fn call_hook(slot: &AtomicPtr<()>) {
    let h = slot.load(Ordering::Acquire);
    if !h.is_null() {
        // SAFETY: only `record::set_thread_hooks` stores here, an
        // `extern "C" fn()`.
        let f: extern "C" fn() = unsafe { std::mem::transmute(h) };
        f();
    }
}

/// The pthread key whose destructor retires a thread's buffer (X1); valid
/// once `KEY_READY` is true.
static KEY: AtomicU32 = AtomicU32::new(0);
static KEY_READY: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------
// Segments.

/// The header of a segment: a mapping of `SEG_HEADER + cap` bytes whose
/// data (event words) follows the header.
#[repr(C, align(64))]
pub(crate) struct Segment {
    /// The next segment of the thread's stream: set by the producer when
    /// it moves on (G2, release), after `used`; null while it writes here.
    pub next: AtomicPtr<Segment>,
    /// Bytes of data written; final once `next` is set.
    pub used: AtomicU64,
    /// Bytes of data room (the mapping's length minus the header).
    pub cap: u64,
    /// Link in a free list.
    pub link: AtomicPtr<Segment>,
}

/// Bytes before a segment's data.
pub(crate) const SEG_HEADER: usize = 64;
const _: () = assert!(std::mem::size_of::<Segment>() == SEG_HEADER);

impl Segment {
    /// Address of the first data byte.
    pub fn data(&self) -> usize {
        self as *const Segment as usize + SEG_HEADER
    }
    /// Address after the last data byte.
    pub fn data_end(&self) -> usize {
        self.data() + self.cap as usize
    }
    /// Bytes of the mapping.
    pub fn mapping_len(&self) -> usize {
        SEG_HEADER + self.cap as usize
    }
}

/// Maps a segment of `len` bytes (G3); `None` if a limit or the kernel
/// says no. Async-signal-safe.
fn map_segment(len: u64, owned: &AtomicU64) -> Option<*mut Segment> {
    let limit = CFG_THREAD_LIMIT.load(Ordering::Relaxed);
    if owned.load(Ordering::Relaxed) + len > limit {
        return None;
    }
    let used = MEM_USED.fetch_add(len, Ordering::Relaxed) + len;
    if used > MEM_LIMIT.load(Ordering::Relaxed) {
        MEM_USED.fetch_sub(len, Ordering::Relaxed);
        return None;
    }
    let m = if CFG_PREFAULT.load(Ordering::Relaxed) {
        textpoke_sys::anon::map_populated(len as usize)
    } else {
        textpoke_sys::anon::map(len as usize)
    };
    let Some(m) = m else {
        MEM_USED.fetch_sub(len, Ordering::Relaxed);
        return None;
    };
    MEM_PEAK.fetch_max(used, Ordering::Relaxed);
    owned.fetch_add(len, Ordering::Relaxed);
    let s = m as *mut Segment;
    // SAFETY: a fresh zeroed mapping of `len` bytes, not yet shared.
    unsafe { (*s).cap = len - SEG_HEADER as u64 };
    Some(s)
}

/// Unmaps a segment and gives its bytes back to the limits.
///
/// # Safety
///
/// Nobody may use `s` any more (the owner's buffer was drained past it).
pub(crate) unsafe fn unmap_segment(s: *mut Segment, owned: &AtomicU64) {
    // SAFETY: the caller guarantees `s` is a live segment nobody uses.
    let len = unsafe { &*s }.mapping_len();
    owned.fetch_sub(len as u64, Ordering::Relaxed);
    MEM_USED.fetch_sub(len as u64, Ordering::Relaxed);
    // SAFETY: mapped by map_segment with this length.
    unsafe { textpoke_sys::anon::unmap(s as *mut u8, len) };
}

// ---------------------------------------------------------------------------
// The per-thread buffer.

/// Fields the producer reads or writes on every event: one cache line.
/// Generated code uses them too ([`BufferLayout`]).
#[repr(C, align(64))]
pub(crate) struct Producer {
    /// 1 while the thread is inside a record call (H2).
    pub busy: AtomicU32,
    /// Kernel thread id of the owner.
    pub tid: AtomicI32,
    /// The [`ACTIVE`] value this buffer records for.
    pub session: AtomicU64,
    /// Address where the next word goes; bytes of the current segment
    /// below it are published (H7, release).
    pub pos: AtomicU64,
    /// End of the current segment's data: an event goes in only if it
    /// ends at or below it.
    pub end: AtomicU64,
    /// Time of the thread's last event (H5: deltas count from it).
    pub last_ts: AtomicU64,
    /// Calls per function id (K3).
    pub counters: AtomicPtr<u64>,
    /// Length of `counters`.
    pub ncounters: AtomicU64,
}

/// The producer's stream state, touched only on a segment change, and its
/// drop counters.
#[repr(C, align(64))]
pub(crate) struct Stream {
    /// The segment `pos` points into.
    pub seg: AtomicPtr<Segment>,
    /// Free segments only the producer uses (taken from `free`, G1).
    pub spare: AtomicPtr<Segment>,
    /// Events lost since the last sync record (G4).
    pub lost: AtomicU64,
    /// Sync records written.
    pub seq: AtomicU64,
    /// Events lost to the limits, in all.
    pub dropped_full: AtomicU64,
    pub dropped_nested: AtomicU64,
    pub dropped_range: AtomicU64,
    /// Bytes of segments mapped for this buffer (the producer adds, the
    /// writer subtracts when it unmaps).
    pub owned: AtomicU64,
    /// Events cut (not recorded because of the recursion guard) and not
    /// yet marked in the stream (see [`mark_cut`]).
    pub cut_pending: AtomicU64,
}

/// The consumer's side.
#[repr(C, align(64))]
pub(crate) struct Consumer {
    /// Drained segments given back to the producer: a stack the writer
    /// pushes onto and the producer takes whole (no ABA: nobody pops one).
    pub free: AtomicPtr<Segment>,
    /// How many segments `free` holds, about (the writer unmaps rather
    /// than give back more than a few).
    pub free_count: AtomicU64,
    /// The writer's cursor: the segment it drains and the address up to
    /// which it took the data (writer-only while the session runs; set by
    /// the producer in C5 before the session is published).
    pub drain_seg: AtomicPtr<Segment>,
    pub drain_pos: AtomicU64,
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
    pub s: Stream,
    pub cons: Consumer,
    pub cold: Cold,
}

/// Per-thread state. `const`-initialised and without a destructor, so
/// reading it is one `fs:`-relative load, never allocates and never fails.
struct Tls {
    buf: Cell<*mut ThreadBuf>,
    state: Cell<u8>,
    /// Events this thread wrote through [`slow_push`] (see
    /// `slow_events_of_this_thread`), counted in `testing` builds only.
    /// Atomic only to be one instruction, safe against this thread's
    /// signal handlers; Relaxed.
    #[cfg(feature = "testing")]
    slow: AtomicU64,
}

const ST_NORMAL: u8 = 0;
const ST_CREATING: u8 = 1;
const ST_EXITED: u8 = 2;
const ST_WRITER: u8 = 3;

thread_local! {
    static TLS: Tls = const {
        Tls {
            buf: Cell::new(ptr::null_mut()),
            state: Cell::new(ST_NORMAL),
            #[cfg(feature = "testing")]
            slow: AtomicU64::new(0),
        }
    };
}

/// Where the hot-path state lives, for the recorder's code generated at
/// run time (`super::codegen`), which must do exactly what [`try_count`]
/// (K1-K4) or [`try_push`] (H1-H8) do and fall back to the slow paths in
/// every other case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufferLayout {
    /// Offset of this thread's buffer pointer from the thread pointer
    /// (`fs:0` on x86-64, `TPIDR_EL0` on aarch64): the same in every thread.
    pub tls_buf: i32,
    /// Address of the session word every buffer's `session` must equal.
    pub active: usize,
    /// Address of the clock's mode byte (`clock::mode_byte`).
    pub clock_mode: usize,
    /// Offsets in a buffer: `busy` (u32), `session`, `pos`, `end`,
    /// `last_ts` (u64s), `counters` (pointer to u64s), `ncounters` (u64).
    pub busy: usize,
    pub session: usize,
    pub pos: usize,
    pub end: usize,
    pub last_ts: usize,
    pub counters: usize,
    pub ncounters: usize,
}

/// The buffer layout, if this module's thread-local lives in the static
/// TLS block (see `arch::static_tls_offset`); `None` otherwise.
pub(crate) fn buffer_layout() -> Option<BufferLayout> {
    static LAYOUT: std::sync::OnceLock<Option<BufferLayout>> = std::sync::OnceLock::new();
    *LAYOUT.get_or_init(|| {
        let tls_buf = textpoke::arch::static_tls_offset(|| TLS.with(|t| t.buf.as_ptr() as usize))?;
        let p = std::mem::offset_of!(ThreadBuf, p);
        Some(BufferLayout {
            tls_buf,
            active: &ACTIVE as *const AtomicU64 as usize,
            clock_mode: textpoke::clock::mode_byte(),
            busy: p + std::mem::offset_of!(Producer, busy),
            session: p + std::mem::offset_of!(Producer, session),
            pos: p + std::mem::offset_of!(Producer, pos),
            end: p + std::mem::offset_of!(Producer, end),
            last_ts: p + std::mem::offset_of!(Producer, last_ts),
            counters: p + std::mem::offset_of!(Producer, counters),
            ncounters: p + std::mem::offset_of!(Producer, ncounters),
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

/// Events the calling thread wrote through the slow path of H4 (a segment
/// to start or change, an event too far in time from the previous one or
/// with too large an id for a compact word): inline code hands such events
/// over to the hot path, so tests that count the tracer's slow calls
/// subtract these.
#[cfg(feature = "testing")]
pub(crate) fn slow_events_of_this_thread() -> u64 {
    TLS.with(|t| t.slow.load(Ordering::Relaxed))
}

/// Marks the calling thread as the writer: its events are dropped and
/// counted (the writer must not record into a buffer it drains).
pub(crate) fn mark_writer_thread() {
    TLS.with(|t| t.state.set(ST_WRITER));
}

/// Whether the calling thread is a writer thread. Async-signal-safe.
pub(crate) fn is_writer_thread() -> bool {
    TLS.with(|t| t.state.get()) == ST_WRITER
}

// ---------------------------------------------------------------------------
// Hot path.

/// Records an entry or exit (H0–H8); an entry also counts the call (K3).
/// `value` makes an exit a [`KIND_EXIT_VALUE`].
#[inline(always)]
pub(crate) fn record(kind: u8, func: u32, depth: u32, value: Option<u64>) -> bool {
    if ACTIVE.load(Ordering::Relaxed) & MODE_MASK != MODE_RECORD {
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
        return Push::Done(nested_drop(b, kind, func)); // H2
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
    if kind == KIND_ENTRY {
        count_call(b, func); // K3
    }
    // H5: the time, never below this thread's previous one.
    let last = p.last_ts.load(Ordering::Relaxed);
    let ts = now.max(last);
    let kind = if value.is_some() { KIND_EXIT_VALUE } else { kind };
    let pos = p.pos.load(Ordering::Relaxed);
    let need = if value.is_some() { 16 } else { 8 };
    let ok = match format::compact(kind, func, depth, ts - last) {
        // H4: room in the current segment.
        Some(w) if pos + need <= p.end.load(Ordering::Relaxed) => {
            // SAFETY: [pos, pos + need) lies in the current segment's
            // data, beyond what was published: only we write it.
            unsafe {
                (pos as *mut u64).write(w); // H6
                if let Some(v) = value {
                    (pos as *mut u64).add(1).write(v);
                }
            }
            // H7. Release pairs with the writer's acquire load of `pos`
            // (D1): the words are visible before the new position.
            p.pos.store(pos + need, Ordering::Release);
            p.last_ts.store(ts, Ordering::Relaxed);
            true
        }
        _ => slow_push(b, ts, kind, func, depth, value),
    };
    compiler_fence(Ordering::SeqCst);
    // H8. Release pairs with the stop protocol's acquire load of `busy`
    // (S4): everything published above is visible to the final drain.
    p.busy.store(0, Ordering::Release);
    Push::Done(ok)
}

/// K3: counts a call of `func` on this thread's buffer.
#[inline(always)]
fn count_call(b: &ThreadBuf, func: u32) {
    if (func as u64) < b.p.ncounters.load(Ordering::Relaxed) {
        // SAFETY: func < ncounters, the array's length.
        unsafe { increment(b.p.counters.load(Ordering::Relaxed).add(func as usize)) };
    } else {
        b.s.dropped_range.fetch_add(1, Ordering::Relaxed);
    }
}

/// H4 failed: the event does not fit a compact word, or the segment is
/// full, or a cut is to be marked. Writes the event, switching segments if
/// needed (G1-G4). `busy` is held. Returns whether the event was kept.
#[cold]
#[inline(never)]
fn slow_push(b: &ThreadBuf, ts: u64, kind: u8, func: u32, depth: u32, value: Option<u64>) -> bool {
    #[cfg(feature = "testing")]
    TLS.with(|t| t.slow.fetch_add(1, Ordering::Relaxed));
    let p = &b.p;
    let seg = b.s.seg.load(Ordering::Relaxed);
    if seg.is_null() {
        return false; // a count-only buffer has no stream
    }
    // SAFETY: the current segment is mapped while the buffer lives.
    let seg = unsafe { &*seg };
    if p.pos.load(Ordering::Relaxed) == seg.data() as u64 {
        // A new buffer's first event: its segment starts with a sync record
        // at this event's time, so that the event is a compact word.
        p.last_ts.store(ts, Ordering::Relaxed);
        if !next_segment(b, depth) {
            return lose(b);
        }
    } else {
        // `mark_cut` lowers `end` to send the next event here: put it back.
        p.end.store(seg.data_end() as u64, Ordering::Relaxed);
    }
    let cut = b.s.cut_pending.load(Ordering::Relaxed);
    let mut words = [0u64; 5];
    let mut n = 0;
    if cut > 0 {
        words[0] = format::special(SPECIAL_CUT, 0, cut);
        n = 1;
    }
    n += encode(&mut words[n..], (kind, func, depth), (ts, p.last_ts.load(Ordering::Relaxed)), value);
    let need = n as u64 * 8;
    if p.pos.load(Ordering::Relaxed) + need > p.end.load(Ordering::Relaxed) && !next_segment(b, depth) {
        return lose(b); // G4
    }
    // next_segment wrote a sync record whose time is the last event's:
    // the words above still count from it.
    let pos = p.pos.load(Ordering::Relaxed);
    for (i, w) in words[..n].iter().enumerate() {
        // SAFETY: room for `n` words was checked (or made) above.
        unsafe { (pos as *mut u64).add(i).write(*w) };
    }
    p.pos.store(pos + need, Ordering::Release); // H7, as in try_push
    p.last_ts.store(ts, Ordering::Relaxed);
    if cut > 0 {
        // Not a store of 0: a handler may have cut more meanwhile.
        b.s.cut_pending.fetch_sub(cut, Ordering::Relaxed);
    }
    true
}

/// The words of one event into `out`: a compact word (and the value), or
/// a long record; returns how many.
fn encode(out: &mut [u64], (kind, func, depth): (u8, u32, u32), (ts, last): (u64, u64), value: Option<u64>) -> usize {
    match format::compact(kind, func, depth, ts - last) {
        Some(w) => {
            out[0] = w;
            out[1] = value.unwrap_or(0);
            1 + value.is_some() as usize
        }
        None => {
            let payload = 2 + value.is_some() as u8;
            out[0] = format::special(SPECIAL_LONG, payload, kind as u64);
            out[1] = ts;
            out[2] = func as u64 | (depth as u64) << 32;
            out[3] = value.unwrap_or(0);
            1 + payload as usize
        }
    }
}

/// G4: an event lost for want of a segment.
fn lose(b: &ThreadBuf) -> bool {
    b.s.lost.fetch_add(1, Ordering::Relaxed);
    b.s.dropped_full.fetch_add(1, Ordering::Relaxed);
    false
}

/// `n` events of a signal handler's calls were not recorded (the handler
/// ran while this thread was inside a record call, or inside tracer code):
/// counts them, and lowers `end` so that the thread's next event takes
/// the slow path, which marks them in the stream ([`SPECIAL_CUT`]) where
/// they happened. Async-signal-safe; may interrupt the owner anywhere.
fn mark_cut(b: &ThreadBuf, n: u64) {
    // fetch_add: nested handlers may themselves be interrupted.
    b.s.dropped_nested.fetch_add(n, Ordering::Relaxed);
    b.s.cut_pending.fetch_add(n, Ordering::Relaxed);
    b.p.end.store(0, Ordering::Relaxed);
}

/// A call the tracer's recursion guard kept from the recorder (a signal
/// handler's call while its thread was inside tracer code): counted (K3),
/// its entry and exit marked as cut.
pub(crate) fn count_cut(func: u32) {
    count(func);
    let buf = tls_buf();
    if buf.is_null() {
        return;
    }
    // SAFETY: as in `record`.
    let b = unsafe { &*buf };
    if ACTIVE.load(Ordering::Relaxed) == b.p.session.load(Ordering::Relaxed)
        && !b.s.seg.load(Ordering::Relaxed).is_null()
    {
        mark_cut(b, 2);
    }
}

/// G1-G2: moves the stream to a segment with room, starting it with a sync
/// record for an event at `depth`. A segment nothing was written to yet
/// (a new buffer's first) is started in place. `false`: no segment to be
/// had (G4).
fn next_segment(b: &ThreadBuf, depth: u32) -> bool {
    let (p, s) = (&b.p, &b.s);
    let cur = s.seg.load(Ordering::Relaxed);
    // SAFETY: the current segment is mapped while the buffer lives.
    let cur_ref = unsafe { &*cur };
    let fresh = p.pos.load(Ordering::Relaxed) == cur_ref.data() as u64;
    let seg = if fresh {
        cur
    } else {
        match take_segment(b) {
            Some(n) => n,
            None => return false,
        }
    };
    // SAFETY: `seg` is ours: fresh, or just taken from a free list.
    let sr = unsafe { &*seg };
    let sync = [
        format::special(SPECIAL_SYNC, 3, depth as u64),
        p.last_ts.load(Ordering::Relaxed),
        s.lost.swap(0, Ordering::Relaxed),
        s.seq.fetch_add(1, Ordering::Relaxed),
    ];
    let data = sr.data() as *mut u64;
    for (i, w) in sync.iter().enumerate() {
        // SAFETY: a segment holds far more than the sync record's words.
        unsafe { data.add(i).write(*w) };
    }
    if !fresh {
        // G2: the old segment's final length, then the link (release,
        // pairs with the writer's acquire load of `next` in D2), then the
        // position in the new one (release, pairs with D1).
        cur_ref.used.store(p.pos.load(Ordering::Relaxed) - cur_ref.data() as u64, Ordering::Relaxed);
        cur_ref.next.store(seg, Ordering::Release);
        s.seg.store(seg, Ordering::Relaxed);
    }
    p.end.store(sr.data_end() as u64, Ordering::Relaxed);
    p.pos.store((sr.data() + format::SYNC_WORDS * 8) as u64, Ordering::Release);
    if !fresh {
        wake_writer();
    }
    true
}

/// G1: a free segment: the producer's spares, else what the writer gave
/// back, else a new mapping within the limits (G3).
fn take_segment(b: &ThreadBuf) -> Option<*mut Segment> {
    let s = &b.s;
    let mut head = s.spare.load(Ordering::Relaxed);
    if head.is_null() {
        // Acquire pairs with the writer's release push in `give_back`.
        head = b.cons.free.swap(ptr::null_mut(), Ordering::Acquire);
        let mut n = 0;
        let mut q = head;
        while !q.is_null() {
            n += 1;
            // SAFETY: segments on the free list are mapped and ours.
            q = unsafe { &*q }.link.load(Ordering::Relaxed);
        }
        b.cons.free_count.fetch_sub(n, Ordering::Relaxed);
    }
    if head.is_null() {
        return map_segment(CFG_SEGMENT.load(Ordering::Relaxed), &s.owned);
    }
    // SAFETY: as above.
    let h = unsafe { &*head };
    s.spare.store(h.link.load(Ordering::Relaxed), Ordering::Relaxed);
    h.next.store(ptr::null_mut(), Ordering::Relaxed);
    h.used.store(0, Ordering::Relaxed);
    Some(head)
}

/// Gives a drained segment back to its producer (D4), or unmaps it when
/// the producer holds enough spares already. Writer side.
///
/// # Safety
///
/// `seg` must be a segment of `b` the writer drained and the producer has
/// moved past (its `next` was set).
pub(crate) unsafe fn give_back(b: &ThreadBuf, seg: *mut Segment) {
    const KEEP: u64 = 2;
    if b.cons.free_count.load(Ordering::Relaxed) >= KEEP {
        // SAFETY: the caller's guarantee: nobody uses it any more.
        unsafe { unmap_segment(seg, &b.s.owned) };
        return;
    }
    b.cons.free_count.fetch_add(1, Ordering::Relaxed);
    // SAFETY: as above.
    let sr = unsafe { &*seg };
    let mut head = b.cons.free.load(Ordering::Relaxed);
    loop {
        sr.link.store(head, Ordering::Relaxed);
        // Release pairs with take_segment's acquire swap.
        match b.cons.free.compare_exchange_weak(head, seg, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
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
        && (func as u64) < p.ncounters.load(Ordering::Relaxed);
    if ok {
        // SAFETY: func < ncounters, the array's length.
        unsafe { increment(p.counters.load(Ordering::Relaxed).add(func as usize)) };
    }
    compiler_fence(Ordering::SeqCst);
    p.busy.store(was, Ordering::Release); // K4, pairs with S4
    ok.then_some(true)
}

/// K3: adds one to a counter owned by this thread, in one instruction
/// (x86-64) or atomically (elsewhere) so that a signal handler counting on
/// the same thread cannot lose an update; the writer reads it with atomic
/// loads (aligned 8-byte stores are single-copy atomic).
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
        // Elsewhere (aarch64) no single instruction adds to memory without
        // LSE: an atomic add (an LSE `ldadd`, or a load/store-exclusive
        // loop, whose store-exclusive fails and retries when a signal handler
        // ran in between), so a
        // same-thread signal handler counting meanwhile loses nothing.
        // Relaxed: only the count matters; the writer reads it with atomic
        // loads, and the final drain after S4's acquire of `busy`.
        // SAFETY: the caller guarantees `p` is valid and aligned.
        let a = unsafe { &*(p as *const AtomicU64) };
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// Wakes the writer (bumps [`WAKE`], futex wake). Async-signal-safe.
pub(crate) fn wake_writer() {
    // Release pairs with the writer's acquire load of WAKE before it waits.
    WAKE.fetch_add(1, Ordering::Release);
    textpoke_sys::futex_wake(&WAKE, 1);
}

// ---------------------------------------------------------------------------
// Cold paths.

/// A signal handler recorded while this thread was inside a record call.
#[cold]
#[inline(never)]
fn nested_drop(b: &ThreadBuf, kind: u8, func: u32) -> bool {
    if ACTIVE.load(Ordering::Relaxed) == b.p.session.load(Ordering::Relaxed) {
        if kind == KIND_ENTRY {
            count_call(b, func); // the call still counts (K3 nests)
        }
        mark_cut(b, 1);
    }
    false
}

/// No buffer, or a buffer made for another session.
#[cold]
#[inline(never)]
fn slow_record(now: u64, kind: u8, func: u32, depth: u32, value: Option<u64>) -> bool {
    let counted = (kind == KIND_ENTRY).then_some(func);
    let Some(b) = begin_acquire(MODE_RECORD, Some((now, depth)), counted) else {
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
        if ACTIVE.load(Ordering::Relaxed) == b.p.session.load(Ordering::Relaxed) {
            // Same session: the id is out of range.
            b.s.dropped_range.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
    let want = ACTIVE.load(Ordering::Relaxed) & MODE_MASK;
    if want == 0 {
        return false;
    }
    let Some(b) = begin_acquire(want, None, Some(func)) else {
        return false;
    };
    // SAFETY: begin_acquire returns this thread's live buffer.
    let b = unsafe { &*b };
    let ok = match try_count(b, func) {
        Some(ok) => ok,
        None => {
            if (func as u64) >= b.p.ncounters.load(Ordering::Relaxed) {
                b.s.dropped_range.fetch_add(1, Ordering::Relaxed);
            }
            false
        }
    };
    end_acquire();
    ok
}

/// C1–C7: makes this thread's buffer current for the active session, if
/// that session's mode is `want`. On success the caller writes its event
/// and calls [`end_acquire`]; on failure a call of `counted` is counted
/// in the process-wide array (C1'). Async-signal-safe: only mmap, munmap,
/// gettid and pthread_setspecific (a key below 32: a store into the
/// thread descriptor, no allocation), and a CAS loop that only other
/// threads' buffer creations can make retry.
#[cold]
fn begin_acquire(want: u64, first: Option<(u64, u32)>, counted: Option<u32>) -> Option<*mut ThreadBuf> {
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
            if let Some(f) = counted {
                count_orphan(f);
            }
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
            if unsafe { reinit(old, active, first) } {
                result = Some(old);
            }
            // On failure the buffer stays registered with a stale session
            // and is freed when the thread exits.
        } else if let Some(b) = create(active, first) {
            result = Some(b);
        }
        match result {
            Some(b) => TLS.with(|t| t.buf.set(b)),
            None => {
                DROP_NOMEM.fetch_add(1, Ordering::Relaxed);
                if let Some(f) = counted {
                    count_orphan(f);
                }
            }
        }
    }
    if result.is_none() {
        end_acquire();
    }
    result
}

/// C1': counts a call of `func` in the process-wide array, inside the
/// creation section (C2/C7's `CREATING` protocol), so that the stop
/// protocol's final sum (after S3) sees it or the session had ended.
fn count_orphan(func: u32) {
    if func as usize >= ORPHANS_LEN {
        return;
    }
    // SeqCst pairs with S1/S3 as in C2.
    CREATING.fetch_add(1, Ordering::SeqCst);
    if ACTIVE.load(Ordering::SeqCst) != 0 {
        if let Some(a) = orphans(true) {
            // SAFETY: func < ORPHANS_LEN, the array's length.
            unsafe { &*a.add(func as usize) }.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Release pairs with S3's acquire load of CREATING.
    CREATING.fetch_sub(1, Ordering::Release);
}

/// The process-wide array of [`ORPHANS`], mapped on first use when `make`.
pub(crate) fn orphans(make: bool) -> Option<*mut AtomicU64> {
    let p = ORPHANS.load(Ordering::Acquire);
    if !p.is_null() || !make {
        return (!p.is_null()).then_some(p);
    }
    let m = textpoke_sys::anon::map(ORPHANS_LEN * 8)? as *mut AtomicU64;
    // Release pairs with the acquire load above: the zeroed mapping is
    // visible before the pointer.
    match ORPHANS.compare_exchange(ptr::null_mut(), m, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(m),
        Err(other) => {
            // SAFETY: ours, never published.
            unsafe { textpoke_sys::anon::unmap(m as *mut u8, ORPHANS_LEN * 8) };
            Some(other)
        }
    }
}

/// Zeroes the process-wide counts for a new session. Control path, no
/// session running (S3 of the last one waited for every `count_orphan`).
pub(crate) fn reset_orphans() {
    if let Some(p) = orphans(false) {
        // SAFETY: our mapping of this length; no counting runs (see above).
        unsafe { textpoke_sys::anon::remap_zero(p as *mut u8, ORPHANS_LEN * 8) };
    }
}

/// C7: leaves the creation section entered by [`begin_acquire`].
fn end_acquire() {
    // Release pairs with the stop protocol's acquire load of CREATING (S3):
    // our push to INCOMING and our event are visible once it sees 0.
    CREATING.fetch_sub(1, Ordering::Release);
    compiler_fence(Ordering::SeqCst);
    TLS.with(|t| t.state.set(ST_NORMAL));
}

/// C4 + C6: maps a new buffer for session `active`, registers the
/// thread-exit destructor and pushes the buffer onto [`INCOMING`].
fn create(active: u64, first: Option<(u64, u32)>) -> Option<*mut ThreadBuf> {
    let size = std::mem::size_of::<ThreadBuf>();
    let mem = textpoke_sys::anon::map(size)?;
    let b = mem as *mut ThreadBuf;
    // SAFETY: a fresh zeroed mapping of the right size; all-zero bytes are
    // a valid ThreadBuf (atomics and null pointers).
    let bref = unsafe { &*b };
    #[cfg(feature = "testing")]
    {
        let hook = CREATION_HOOK.load(Ordering::Relaxed);
        if !hook.is_null() {
            // SAFETY: only tests set the hook, to an `extern "C" fn()`.
            let f: extern "C" fn() = unsafe { std::mem::transmute(hook) };
            f();
        }
    }
    // SAFETY: `b` is ours and not yet visible to anyone.
    if !unsafe { reinit(b, active, first) } {
        // SAFETY: mapped above with this size, never published.
        unsafe { textpoke_sys::anon::unmap(mem, size) };
        return None;
    }
    if KEY_READY.load(Ordering::Acquire) {
        // SAFETY: KEY is a valid key (KEY_READY); the value is our buffer,
        // what thread_exit takes.
        unsafe { textpoke_sys::threads::set_specific(KEY.load(Ordering::Relaxed), b as *const libc::c_void) };
        call_hook(&THREAD_START_HOOK);
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

/// Unmaps every segment of `b`: its stream (from the writer's cursor to
/// the producer's segment), its spares and what the writer gave back.
///
/// # Safety
///
/// Nobody else may use `b`'s segments: its session is over and drained
/// (or its owner is gone), and the caller is the owner or the control
/// path after the owner exited.
unsafe fn free_segments(b: &ThreadBuf) {
    let mut seg = b.cons.drain_seg.swap(ptr::null_mut(), Ordering::Relaxed);
    while !seg.is_null() {
        // SAFETY: segments of the stream are mapped until freed here.
        let next = unsafe { &*seg }.next.load(Ordering::Acquire);
        // SAFETY: the caller's guarantee.
        unsafe { unmap_segment(seg, &b.s.owned) };
        seg = next;
    }
    for list in [&b.s.spare, &b.cons.free] {
        let mut seg = list.swap(ptr::null_mut(), Ordering::Acquire);
        while !seg.is_null() {
            // SAFETY: as above.
            let next = unsafe { &*seg }.link.load(Ordering::Relaxed);
            // SAFETY: the caller's guarantee.
            unsafe { unmap_segment(seg, &b.s.owned) };
            seg = next;
        }
    }
    b.cons.free_count.store(0, Ordering::Relaxed);
    b.s.seg.store(ptr::null_mut(), Ordering::Relaxed);
}

/// Sets up the stream or counters for session `active` and resets the
/// positions and drop counts; publishes `session` last. With `first` (the
/// time and depth of the event about to be written), the first segment is
/// started for it, so that it is a compact word; else by the first event.
///
/// # Safety
///
/// `b` must be the calling thread's buffer (or a new one) that no writer
/// reads: its `session` differs from every running session's.
unsafe fn reinit(b: *mut ThreadBuf, active: u64, first: Option<(u64, u32)>) -> bool {
    // SAFETY: the caller guarantees exclusive use.
    let b = unsafe { &*b };
    // SAFETY: the old session's final drain is over (the caller's
    // guarantee): nobody reads these segments.
    unsafe { free_segments(b) };
    if active & MODE_MASK == MODE_RECORD {
        // The first segment, empty: the first event starts it (G1, fresh).
        let Some(seg) = map_segment(CFG_SEGMENT.load(Ordering::Relaxed), &b.s.owned) else {
            return false;
        };
        // SAFETY: just mapped.
        let data = unsafe { &*seg }.data() as u64;
        b.s.seg.store(seg, Ordering::Relaxed);
        b.cons.drain_seg.store(seg, Ordering::Relaxed);
        b.cons.drain_pos.store(data, Ordering::Relaxed);
        b.p.pos.store(data, Ordering::Relaxed);
        b.p.end.store(data, Ordering::Relaxed); // no room until started
    } else {
        b.p.pos.store(0, Ordering::Relaxed);
        b.p.end.store(0, Ordering::Relaxed);
    }
    let want_funcs = CFG_FUNCS.load(Ordering::Relaxed);
    let n = b.p.ncounters.load(Ordering::Relaxed);
    let counters = b.p.counters.load(Ordering::Relaxed);
    if n == want_funcs && !counters.is_null() {
        // Fresh zero pages over the old counts.
        // SAFETY: our own mapping of this length.
        if !unsafe { textpoke_sys::anon::remap_zero(counters as *mut u8, n as usize * 8) } {
            return false;
        }
    } else {
        b.p.counters.store(ptr::null_mut(), Ordering::Relaxed);
        b.p.ncounters.store(0, Ordering::Relaxed);
        if !counters.is_null() {
            // SAFETY: our own mapping of this length.
            unsafe { textpoke_sys::anon::unmap(counters as *mut u8, n as usize * 8) };
        }
        if want_funcs != 0 {
            let Some(m) = textpoke_sys::anon::map(want_funcs as usize * 8) else {
                return false;
            };
            b.p.counters.store(m as *mut u64, Ordering::Relaxed);
            b.p.ncounters.store(want_funcs, Ordering::Relaxed);
        }
    }
    b.p.tid.store(textpoke_sys::gettid(), Ordering::Relaxed);
    b.p.last_ts.store(0, Ordering::Relaxed);
    b.s.lost.store(0, Ordering::Relaxed);
    b.s.seq.store(0, Ordering::Relaxed);
    if let (Some((ts, depth)), false) = (first, b.s.seg.load(Ordering::Relaxed).is_null()) {
        b.p.last_ts.store(ts, Ordering::Relaxed);
        if !next_segment(b, depth) {
            return false;
        }
    }
    b.s.dropped_full.store(0, Ordering::Relaxed);
    b.s.dropped_nested.store(0, Ordering::Relaxed);
    b.s.dropped_range.store(0, Ordering::Relaxed);
    b.s.cut_pending.store(0, Ordering::Relaxed);
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
        if let Ok(key) = textpoke_sys::threads::key_create(thread_exit) {
            KEY.store(key, Ordering::Relaxed);
            KEY_READY.store(true, Ordering::Release);
        }
    });
}

/// X1–X2: the pthread key destructor, run at thread exit.
extern "C" fn thread_exit(p: *mut libc::c_void) {
    // X1: later events on this thread (other destructors) drop and count.
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
    // every event of this thread is published before it is freed.
    b.cold.exited.store(1, Ordering::Release);
    wake_writer();
    call_hook(&THREAD_EXIT_HOOK);
}

/// The top of the stack of buffers not yet adopted (C6), to walk through
/// `cold.next` without taking them (the crash flush, which holds the
/// session lock, so that nobody takes or frees them meanwhile). Acquire
/// pairs with the release CAS of C6.
pub(crate) fn incoming_head() -> *mut ThreadBuf {
    INCOMING.load(Ordering::Acquire)
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

/// Unmaps a buffer and its segments.
///
/// # Safety
///
/// No thread may use `b` any more: its owner exited (`exited` seen with
/// acquire) or does not exist (forked child).
pub(crate) unsafe fn free(b: *mut ThreadBuf) {
    // SAFETY: the caller guarantees exclusive use.
    let r = unsafe { &*b };
    // SAFETY: as above.
    unsafe { free_segments(r) };
    let c = r.p.counters.load(Ordering::Relaxed);
    if !c.is_null() {
        // SAFETY: mapped by reinit with this length.
        unsafe { textpoke_sys::anon::unmap(c as *mut u8, r.p.ncounters.load(Ordering::Relaxed) as usize * 8) };
    }
    // SAFETY: mapped by create with this length.
    unsafe { textpoke_sys::anon::unmap(b as *mut u8, std::mem::size_of::<ThreadBuf>()) };
}

/// In a forked child: the creation counter of threads that do not exist
/// here.
pub(crate) fn reset_after_fork() {
    CREATING.store(0, Ordering::Relaxed);
}
