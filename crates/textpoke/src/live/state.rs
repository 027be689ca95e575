//! What the transition's hot path reads: the transition word, the live
//! sites' slots, the threads' records and their thread-local mirrors.
//!
//! Everything here is in memory that is never freed (statics, and tables
//! leaked once), so the hot path needs no grace period to read it; what
//! is freed (the ranges a stack check compares against, `Check`) is read
//! under the tracer's quiescence count (`trace::lp_guarded`).
//!
//! # Encodings
//!
//! - **Transition word** [`TRANS`]: `gen:32 | reversals:16 | completing:1 |
//!   armed:1 | active:1 | initial:2 | target:2` (low to high). One atomic:
//!   a reader sees one transition whole. *Armed* once every site of the
//!   transition jumps to its stub: before that no thread switches (a site
//!   still holding its old bytes would take a switched thread to a version
//!   of its old state). *Completing* while the completion is checked: a
//!   thread with no word of this generation then counts as switched (it
//!   was created after the last listing of the threads, when every site
//!   already went through a stub: it holds no frame of a version it may
//!   not leave; the kernel's `klp_copy_process` inheritance).
//! - **Thread word** (`LpThread::word`): `gen:32 | epoch:30 | state:2`.
//!   A word whose `gen` is not the transition's is UNDEF: the thread is in
//!   the transition's initial state (the kernel's `klp_init_transition`
//!   loop, for free). Every write is a CAS (note §5.4).
//! - **Tag**: `gen << 2 | state`, 16 bits in a stub's word and a thread's
//!   mirror (`tag << 48`), 32 bits in a marked shadow entry. Generations
//!   whose 16-bit tag would be below 4 are skipped, so a zero mirror never
//!   matches. The 16-bit tag repeats every 16,384 generations, and only a
//!   thread writes its mirror (a thread that takes no slow path for that
//!   long keeps an old one): so the mirror also holds the whole transition
//!   word it was set under, and stubs take the fast path only when that
//!   is [`TRANS`] now (gen, reversals and flags: any change sends the
//!   thread through the slow path once, which sets both again).
//! - **Site slot**: the stub's word (`tag << 48 | version(target)`), the
//!   versions by state, the settled version, and the generation they
//!   belong to; written by the control side inside a [`SEQ`] write
//!   section (a seqlock), read by the slow path inside a read section.

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// A thread's patch state (the kernel's `task->patch_state`).
pub(super) const UNDEF: u8 = 0;
/// Runs the versions below the patch in transition.
pub(super) const UNPATCHED: u8 = 1;
/// Runs the patch's versions.
pub(super) const PATCHED: u8 = 2;

/// The transition, as one word (module docs).
pub(super) static TRANS: AtomicU64 = AtomicU64::new(0);

/// The seqlock over the site slots' versions (module docs).
pub(super) static SEQ: AtomicU64 = AtomicU64::new(0);

/// A decoded [`TRANS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct View {
    pub gen: u32,
    pub reversals: u16,
    pub active: bool,
    pub armed: bool,
    pub completing: bool,
    pub initial: u8,
    pub target: u8,
}

impl View {
    pub(super) fn load() -> View {
        // Acquire pairs with the Release stores in `View::publish`: the
        // slots and the check data of this transition are written before.
        View::decode(TRANS.load(Ordering::Acquire))
    }
    fn decode(w: u64) -> View {
        View {
            target: (w & 3) as u8,
            initial: (w >> 2 & 3) as u8,
            active: w >> 4 & 1 != 0,
            armed: w >> 5 & 1 != 0,
            completing: w >> 6 & 1 != 0,
            reversals: (w >> 16) as u16,
            gen: (w >> 32) as u32,
        }
    }
    pub(super) fn encode(self) -> u64 {
        u64::from(self.target)
            | u64::from(self.initial) << 2
            | u64::from(self.active) << 4
            | u64::from(self.armed) << 5
            | u64::from(self.completing) << 6
            | u64::from(self.reversals) << 16
            | u64::from(self.gen) << 32
    }
    /// Publishes this transition (control side, inside a write section).
    pub(super) fn publish(self) {
        // Release pairs with the Acquire in `View::load`.
        TRANS.store(self.encode(), Ordering::Release);
    }
    /// A thread's effective state under this transition.
    pub(super) fn effective(self, word: u64) -> u8 {
        let (gen, state) = ((word >> 32) as u32, (word & 3) as u8);
        if gen == self.gen && state != UNDEF {
            state
        } else if self.completing {
            self.target // see "Completing" in the module docs
        } else {
            self.initial
        }
    }
    /// The stub tag of this transition's target state.
    pub(super) fn tag16(self) -> u64 {
        tag16(self.gen, self.target)
    }
    /// The tag of prefix checks valid for this transition (generation and
    /// reversal: a reversal voids them, note §5.2); never 0.
    pub(super) fn prefix(self) -> u64 {
        u64::from(self.gen) << 32 | u64::from(self.reversals) << 1 | 1
    }
}

/// The 16-bit tag of `state` in generation `gen`, as stubs and mirrors
/// hold it (shifted to bits 48-63).
pub(super) fn tag16(gen: u32, state: u8) -> u64 {
    (u64::from(gen) << 2 | u64::from(state)) & 0xffff
}

/// The 32-bit tag of a marked shadow entry.
pub(super) fn tag32(gen: u32, state: u8) -> u32 {
    gen << 2 | u32::from(state)
}

/// The next generation after `gen` whose 16-bit tags are all at least 4.
pub(super) fn next_gen(gen: u32) -> u32 {
    let mut g = gen.wrapping_add(1) & 0x3fff_ffff;
    while tag16(g, 0) < 4 {
        g = (g + 1) & 0x3fff_ffff;
    }
    g
}

/// A thread word: `gen:32 | epoch:30 | state:2`.
pub(super) fn word(gen: u32, epoch: u32, state: u8) -> u64 {
    u64::from(gen) << 32 | u64::from(epoch & 0x3fff_ffff) << 2 | u64::from(state)
}

/// The epoch of a thread word.
pub(super) fn epoch(w: u64) -> u32 {
    (w >> 2) as u32 & 0x3fff_ffff
}

// ---------------------------------------------------------------- seqlock

/// Begins a read section: the sequence (even) to check at its end.
pub(super) fn read_begin() -> u64 {
    loop {
        // Acquire pairs with the Release fence of `WriteSection::drop`.
        let s = SEQ.load(Ordering::Acquire);
        if s & 1 == 0 {
            return s;
        }
        // A writer is in its section: the control thread, with its
        // signals blocked, so this is never its own interrupted self.
        std::hint::spin_loop();
    }
}

/// Whether nothing was written since `read_begin` returned `s`.
pub(super) fn read_ok(s: u64) -> bool {
    // The section's Relaxed loads before the second sequence load (pairs
    // with the writer's Release fence after it made the sequence odd).
    fence(Ordering::Acquire);
    SEQ.load(Ordering::Relaxed) == s
}

/// A write section (control side): the sequence is odd while it lives,
/// and the calling thread's signals are blocked (a handler calling a
/// patched function would spin on its own section).
pub(super) struct WriteSection {
    mask: u64,
}

impl WriteSection {
    pub(super) fn open() -> WriteSection {
        let mask = crate::sys::signals::block_all_raw();
        SEQ.fetch_add(1, Ordering::Relaxed);
        // Release fence: the odd sequence is seen before any write of the
        // section (pairs with `read_ok`'s Acquire fence).
        fence(Ordering::Release);
        WriteSection { mask }
    }
}

impl Drop for WriteSection {
    fn drop(&mut self) {
        // Release: the section's writes before the even sequence (pairs
        // with `read_begin`'s Acquire load).
        SEQ.fetch_add(1, Ordering::Release);
        crate::sys::signals::restore_mask_raw(self.mask);
    }
}

// ---------------------------------------------------------------- deciding sections

/// Threads deciding a switch, by phase (an SRCU of two counters): a
/// decision reads the transition word and may CAS a thread word from it;
/// [`sync_deciders`] waits until every decision begun before it ended, so
/// that one taken on a transition word published before is over.
static DECIDING: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static PHASE: AtomicU64 = AtomicU64::new(0);

/// A decision in progress (see [`DECIDING`]).
pub(super) struct Deciding(usize);

impl Deciding {
    pub(super) fn enter() -> Deciding {
        loop {
            // SeqCst, all four: the increment and the phase check are
            // ordered against `sync_deciders`' flip and reads (the SRCU
            // argument: a decider that saw the old phase after incrementing
            // is counted in the old phase's counter, which the writer waits
            // for).
            let p = (PHASE.load(Ordering::SeqCst) & 1) as usize;
            DECIDING[p].fetch_add(1, Ordering::SeqCst);
            if (PHASE.load(Ordering::SeqCst) & 1) as usize == p {
                return Deciding(p);
            }
            DECIDING[p].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Deciding {
    fn drop(&mut self) {
        // Release: the decision's CAS before the count the writer reads
        // (SeqCst there).
        DECIDING[self.0].fetch_sub(1, Ordering::Release);
    }
}

/// Waits (up to `patience`) until every decision begun before the call has
/// ended. Control side.
pub(super) fn sync_deciders(patience: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    let old = (PHASE.fetch_add(1, Ordering::SeqCst) & 1) as usize;
    let mut spins = 0u32;
    while DECIDING[old].load(Ordering::SeqCst) != 0 {
        if start.elapsed() >= patience {
            return false;
        }
        spins += 1;
        if spins < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    true
}

// ---------------------------------------------------------------- sites

/// The most live sites (functions patched at once, over the process's life).
pub(super) const MAX_SLOTS: usize = 4096;

/// A live site's hot-path data.
pub(super) struct Slot {
    /// The stub's word: `tag16 << 48 | version(target)`.
    pub word: AtomicU64,
    /// The generation the versions below belong to.
    pub gen: AtomicU32,
    /// Version by state (index [`UNPATCHED`], [`PATCHED`]).
    pub version: [AtomicUsize; 3],
    /// The version once no transition involves the site.
    pub settled: AtomicUsize,
}

static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

/// Allocates the slot table (control side, once, before any stub exists).
pub(super) fn init_slots() {
    if SLOTS.load(Ordering::Acquire).is_null() {
        let table: Box<[Slot]> = (0..MAX_SLOTS)
            .map(|_| Slot {
                word: AtomicU64::new(0),
                gen: AtomicU32::new(0),
                version: [const { AtomicUsize::new(0) }; 3],
                settled: AtomicUsize::new(0),
            })
            .collect();
        // Release pairs with the Acquire in `slot`: initialised before seen.
        SLOTS.store(Box::leak(table).as_mut_ptr(), Ordering::Release);
    }
}

/// Slot `i` (tables are never freed).
pub(super) fn slot(i: u32) -> &'static Slot {
    let p = SLOTS.load(Ordering::Acquire); // pairs with init_slots
    assert!(!p.is_null() && (i as usize) < MAX_SLOTS, "live slot {i}");
    // SAFETY: a leaked table of MAX_SLOTS slots, index checked above.
    unsafe { &*p.add(i as usize) }
}

/// The address of slot `i`'s stub word, for its stub's code.
pub(super) fn slot_word_addr(i: u32) -> usize {
    slot(i).word.as_ptr() as usize
}

// ---------------------------------------------------------------- threads

/// The most threads with a record at once.
pub(super) const MAX_THREADS: usize = 8192;

/// One thread's live-patching record (the kernel's per-task state).
pub(super) struct LpThread {
    /// Owner (0: free).
    pub tid: AtomicI32,
    /// Claim order (records claimed after a task listing began are not
    /// pruned by it).
    pub claimed: AtomicU64,
    /// `gen:32 | epoch:30 | state:2` (module docs).
    pub word: AtomicU64,
    /// Address of the thread's mirror (0: unknown, a record the control
    /// side made for a thread that never took a slow path).
    pub mirror: AtomicUsize,
    /// Address of the thread's shadow-stack cell (`trace::lp_shadow_cell`).
    pub shadow_cell: AtomicUsize,
    /// [`View::prefix`] of the last clean self-check (0: none).
    pub prefix: AtomicU64,
    /// No self-check before this time (ns of CLOCK_MONOTONIC).
    pub retry_at: AtomicU64,
    pub backoff: AtomicU32,
    /// The stack pointer of its last self-check, and the end of the mapping
    /// holding it (filled in by the control side), for the scan fallback.
    pub last_sp: AtomicUsize,
    pub stack_hi: AtomicUsize,
    /// What its last check found: `func + 1 | state << 32 | frame << 40`.
    pub held: AtomicU64,
    /// Its last check's unwind was not reliable.
    pub unreliable: AtomicBool,
}

static THREADS: AtomicPtr<LpThread> = AtomicPtr::new(std::ptr::null_mut());
/// Serialises claims (signals blocked while held: see `claim`).
static CLAIM_LOCK: AtomicBool = AtomicBool::new(false);
/// Claims so far.
pub(super) static CLAIMS: AtomicU64 = AtomicU64::new(0);

/// Allocates the record table (control side, once).
pub(super) fn init_threads() {
    if THREADS.load(Ordering::Acquire).is_null() {
        let table: Box<[LpThread]> = (0..MAX_THREADS)
            .map(|_| LpThread {
                tid: AtomicI32::new(0),
                claimed: AtomicU64::new(0),
                word: AtomicU64::new(0),
                mirror: AtomicUsize::new(0),
                shadow_cell: AtomicUsize::new(0),
                prefix: AtomicU64::new(0),
                retry_at: AtomicU64::new(0),
                backoff: AtomicU32::new(0),
                last_sp: AtomicUsize::new(0),
                stack_hi: AtomicUsize::new(0),
                held: AtomicU64::new(0),
                unreliable: AtomicBool::new(false),
            })
            .collect();
        // Release pairs with the Acquire in `records`.
        THREADS.store(Box::leak(table).as_mut_ptr(), Ordering::Release);
    }
}

/// Every record slot (empty before `init_threads`).
pub(super) fn records() -> &'static [LpThread] {
    let p = THREADS.load(Ordering::Acquire); // pairs with init_threads
    if p.is_null() {
        return &[];
    }
    // SAFETY: a leaked table of MAX_THREADS records.
    unsafe { std::slice::from_raw_parts(p, MAX_THREADS) }
}

/// The record of thread `tid`, if it has one.
pub(super) fn find(tid: i32) -> Option<&'static LpThread> {
    records().iter().find(|r| r.tid.load(Ordering::Acquire) == tid)
}

/// The record of `tid`, claimed if it has none (`None`: table full).
/// Async-signal-safe: a spin lock taken with every signal blocked, so a
/// handler never spins on its own thread's claim.
pub(super) fn find_or_claim(tid: i32) -> Option<&'static LpThread> {
    if let Some(r) = find(tid) {
        return Some(r);
    }
    let mask = crate::sys::signals::block_all_raw();
    while CLAIM_LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        std::hint::spin_loop();
    }
    let r = find(tid).or_else(|| {
        let r = records().iter().find(|r| r.tid.load(Ordering::Relaxed) == 0)?;
        r.word.store(0, Ordering::Relaxed);
        r.mirror.store(0, Ordering::Relaxed);
        r.shadow_cell.store(0, Ordering::Relaxed);
        r.prefix.store(0, Ordering::Relaxed);
        r.retry_at.store(0, Ordering::Relaxed);
        r.backoff.store(0, Ordering::Relaxed);
        r.last_sp.store(0, Ordering::Relaxed);
        r.stack_hi.store(0, Ordering::Relaxed);
        r.held.store(0, Ordering::Relaxed);
        r.claimed.store(CLAIMS.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        // Release pairs with the Acquire in `find`: the reset record first.
        r.tid.store(tid, Ordering::Release);
        Some(r)
    });
    // Release pairs with the Acquire of the next claim.
    CLAIM_LOCK.store(false, Ordering::Release);
    crate::sys::signals::restore_mask_raw(mask);
    r
}

/// Frees a record (its thread exited).
pub(super) fn release(r: &LpThread) {
    r.tid.store(0, Ordering::Release); // pairs with find's Acquire
}

/// A thread's own live-patching state, in static TLS where possible
/// (const-initialised, no destructor). `repr(C)`: stubs read `trans` at
/// `mirror`'s offset + 8.
#[repr(C)]
pub(super) struct LpTls {
    /// `tag16 << 48` of the transition state this thread is in, when that
    /// is the transition's target (what stubs compare with their word).
    pub mirror: AtomicU64,
    /// The transition word (`TRANS`) `mirror` was set under: stubs take
    /// the fast path only while it is the current one, so a mirror set
    /// 16,384 generations ago (same 16-bit tag) never matches.
    pub trans: AtomicU64,
    /// Its record (null until its first slow path).
    pub rec: Cell<*const LpThread>,
    /// Its tid (0 until known).
    pub tid: Cell<i32>,
}

thread_local! {
    pub(super) static TLS: LpTls = const {
        LpTls {
            mirror: AtomicU64::new(0),
            trans: AtomicU64::new(0),
            rec: Cell::new(std::ptr::null()),
            tid: Cell::new(0),
        }
    };
}

/// The offset of [`LpTls::mirror`] from the thread pointer, if it is in
/// the static TLS block (stubs then compare it in place).
pub(super) fn mirror_offset() -> Option<i32> {
    static OFF: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| crate::arch::static_tls_offset(|| TLS.with(|t| t.mirror.as_ptr() as usize)))
}

/// pthread key whose destructor frees a thread's record.
pub(super) static RECORD_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Destructor of [`RECORD_KEY`].
pub(super) unsafe extern "C" fn thread_exit(p: *mut libc::c_void) {
    TLS.with(|t| t.rec.set(std::ptr::null()));
    // SAFETY: the value set is this thread's record, in the leaked table.
    release(unsafe { &*(p as *const LpThread) });
}

/// Registers the fork handlers ([`before_fork`], [`after_fork_child`]);
/// control side, once.
pub(super) fn register_fork_handlers() {
    // SAFETY: registering handlers of the right type; they touch only this
    // module's statics and the forking thread's own thread-local.
    // pthread_atfork fails only without memory for the entry: then a fork
    // during a transition keeps the parent's records in the child.
    unsafe { libc::pthread_atfork(Some(before_fork), None, Some(after_fork_child)) };
}

/// `pthread_atfork` prepare handler: the forking thread's tid is cached
/// in its thread-local (the child's handler finds its record by it).
unsafe extern "C" fn before_fork() {
    TLS.with(|t| {
        if t.tid.get() == 0 {
            t.tid.set(crate::sys::threads::gettid());
        }
    });
}

/// `pthread_atfork` child handler, on the child's one thread. The child
/// inherits its parent thread's patch state (the kernel's
/// `klp_copy_process`): the forking thread's record becomes the child's
/// (its word, mirror and shadow cell are the child's thread-locals at the
/// same addresses); every other record belonged to a thread the child does
/// not have, and is freed; the claim lock and the deciding counts, which
/// such a thread may have held, are reset. Without this the child's
/// thread kept its parent's tid cached, switched a record nobody looks
/// at, and a transition never completed in the child. With a transition
/// in progress its inherited state gets a word of this generation (see
/// the end).
unsafe extern "C" fn after_fork_child() {
    let tid = crate::sys::threads::gettid();
    let parent = TLS.with(|t| t.tid.replace(tid));
    for r in records() {
        match r.tid.load(Ordering::Relaxed) {
            0 => {}
            // Release pairs with `find`'s Acquire (the record as it was).
            p if p == parent => r.tid.store(tid, Ordering::Release),
            _ => release(r),
        }
    }
    // The only thread is this one, in none of these sections (fork is not
    // called from the slow path or a self-check).
    CLAIM_LOCK.store(false, Ordering::Release);
    for d in &DECIDING {
        d.store(0, Ordering::SeqCst);
    }
    // Its state made explicit: a word of this generation. The thread is
    // a copy of its parent thread, stack included, though created after
    // the transition was armed: without a word it would be taken for a
    // thread born since, holding nothing (`patcher.rs` `switch_newborn`).
    let t = View::load();
    if t.active {
        if let Some(r) = own_record() {
            let w = r.word.load(Ordering::Relaxed);
            if (w >> 32) as u32 != t.gen {
                let inherited = word(t.gen, epoch(w).wrapping_add(1), t.effective(w));
                // Release pairs with the driver's Acquire loads (one thread
                // here: no CAS can race).
                r.word.store(inherited, Ordering::Release);
            }
        }
    }
}

/// The calling thread's record, claimed on first use (`None`: no room).
/// Async-signal-safe.
pub(super) fn own_record() -> Option<&'static LpThread> {
    TLS.with(|t| {
        let mut tid = t.tid.get();
        if tid == 0 {
            tid = crate::sys::threads::gettid();
            t.tid.set(tid);
        }
        let p = t.rec.get();
        // SAFETY: records live in the leaked table.
        if let Some(r) = unsafe { p.as_ref() } {
            if r.tid.load(Ordering::Relaxed) == tid {
                return Some(r);
            }
        }
        let r = find_or_claim(tid)?;
        let mirror = t.mirror.as_ptr() as usize;
        let owner = r.mirror.load(Ordering::Relaxed);
        if owner != 0 && owner != mirror {
            // A record left by an exited thread whose tid we got: not ours.
            r.word.store(0, Ordering::Relaxed);
            r.prefix.store(0, Ordering::Relaxed);
        }
        r.mirror.store(mirror, Ordering::Relaxed);
        r.shadow_cell.store(crate::trace::lp_shadow_cell(), Ordering::Relaxed);
        t.rec.set(r);
        let key = RECORD_KEY.load(Ordering::Relaxed);
        if key < 32 {
            // SAFETY: RECORD_KEY's key; keys below 32 are set without
            // allocating. Its destructor frees this record.
            unsafe { crate::sys::threads::set_specific(key as libc::pthread_key_t, (r as *const LpThread).cast()) };
        }
        Some(r)
    })
}

/// Sets the calling thread's mirror to transition `t`'s target (it is at
/// the target): its tag, and the transition word it holds for (stubs
/// compare both). Only the thread itself writes its mirror: a thread
/// switched from outside takes the slow path once more and sets it there.
pub(super) fn set_own_mirror(t: View) {
    // Relaxed: only this thread's stubs read them. A signal handler's stub
    // between the two stores sees a pair that does not match, and takes
    // the slow path.
    TLS.with(|m| {
        m.trans.store(t.encode(), Ordering::Relaxed);
        m.mirror.store(t.tag16() << 48, Ordering::Relaxed);
    });
}

/// The address of [`TRANS`], for the stubs' code.
pub(super) fn trans_addr() -> usize {
    TRANS.as_ptr() as usize
}

/// CLOCK_MONOTONIC in ns (async-signal-safe: the vDSO).
pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
