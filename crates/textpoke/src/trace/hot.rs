//! The tracer's hot path: what runs on every traced call, in any thread,
//! including inside signal handlers.
//!
//! No allocation, no lock, no panic, no unbounded loop. Everything read
//! here is published by an atomic (Release on the control side, Acquire
//! here) and freed only after a grace period (see `grace.rs`): the op slots
//! ([`OPS`]), the site table segments (never freed), per-thread state in
//! TLS (const-initialised, no destructor: plain `%fs` accesses).
//!
//! # Quiescence count
//!
//! Each thread has a nesting count, `in_tramp`: how many times it is
//! inside tracer code. Grace periods read it instead of interrupting the
//! thread, so it covers every instant the thread may run or hold anything
//! that can be freed:
//!
//! - a site's stub (never freed) raises it before it jumps through its
//!   word into a trampoline, and lowers it after the trampoline returned
//!   (`arch::tramp::call_stub`); a graph stub raises it and the graph
//!   return block's thunk (never freed) lowers it;
//! - [`on_return`] (called from the never-freed return trampoline) raises
//!   it around the exit callbacks, which read op data.
//!
//! A raise is a plain increment followed by a compiler barrier (the CPU's
//! store-to-load reordering is the grace period's `membarrier`'s to
//! cover); a lowering is a Release store (x86 stores in generated code are
//! releases), after which the thread touches nothing freeable.
//!
//! The count is also the recursion guard: at [`enter`] it is 1 (the
//! stub's raise) unless the thread was already inside tracer code — a
//! callback calling a traced function, or a signal handler running one
//! while the thread was in a trampoline. Such calls are not traced.
//!
//! A thread's count starts at `UNREGISTERED` (bit 31). The first stub it
//! enters finds the bit (the sign flag after `inc`) and has the thread
//! registered ([`stub_register`]) in `registry.rs`, where grace periods
//! find its count, before it goes anywhere freeable. At exit (a pthread
//! key's destructor) the bit is set again and the slot released; stubs
//! then let the thread through untraced.
//!
//! # Entry
//!
//! A site's trampoline calls [`on_entry_list`] (or [`on_entry_direct`] for
//! a site with a single op) with the saved registers and its frame. If this
//! thread was already inside tracer code, the call is not traced (the
//! recursion guard, see "Quiescence count": a callback calling a traced
//! function, or a signal handler running one while a stub, trampoline or
//! callback is interrupted). Otherwise each op
//! of the site's mask gets `entry`; if some want the exit, the function's
//! return address is pushed on this thread's shadow stack together with the
//! mask and the entry time, and replaced by the return trampoline's address.
//!
//! The graph trampolines (`arch::tramp::graph_trampoline`) do exactly
//! this, inline, for a site whose only op has inline graph code
//! ([`InlineCode::Graph`]), and the return trampoline does what
//! [`on_return`] does for such entries ([`FAST_EXIT`]);
//! [`shadow_offsets`] tells them where everything is. Both fall back to
//! these handlers for anything unusual.
//!
//! # Exit
//!
//! The return trampoline calls [`on_return`] with the stack pointer the
//! function returned with. The shadow entry whose return slot is exactly
//! below it is the one; entries above it belong to frames that will never
//! return (a `longjmp`, `siglongjmp` or exception skipped them) and are
//! dropped and counted. Exact matching, rather than comparing addresses, is
//! what keeps this right when signal handlers run on an alternate stack.
//! The ops of the saved mask that are still registered get `exit`.

use crate::arch::tramp::{self, SavedRegs, SavedReturn, UNREGISTERED};
use crate::sys::{signals, threads};
use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

/// The most ops registered at once (a site's ops are a `u64` mask).
pub const MAX_OPS: usize = 64;

/// A tracer: callbacks run on the traced thread, maybe in a signal handler.
/// They must not allocate, lock, panic or block.
pub trait TraceOp: Send + Sync + 'static {
    /// A traced function was entered.
    fn entry(&self, e: &Entry<'_>);
    /// A traced function returned (only called if [`TraceOp::wants_exit`]).
    fn exit(&self, _x: &Exit) {}
    /// Whether to hook returns (function_graph).
    fn wants_exit(&self) -> bool {
        false
    }
    /// Whether [`Entry::time`] and [`Exit`] times are needed.
    fn wants_time(&self) -> bool {
        false
    }
    /// A call of function `func` for a count-only op's count trampoline
    /// that fell back to the hot path ([`InlineCode::Count`]): does what
    /// `entry` does, without an [`Entry`]. Same rules as `entry`.
    fn call_counted(&self, _func: u32) {}
    /// A call of function `func` the recursion guard kept from the op (a
    /// signal handler ran a traced function while its thread was inside
    /// tracer code): not traced, neither entry nor exit. An op keeping
    /// exact call counts counts it here. Same rules as `entry`:
    /// async-signal-safe, no allocation, lock or traced code.
    fn call_cut(&self, _func: u32) {}
    /// Functions `ids` of [`crate::funcs`] gained sites the op may be
    /// called for (the tracer found them, or the op was just registered:
    /// then every known function): the op prepares any per-function data
    /// before the first call. Control path, under the tracer's lock.
    fn functions_added(&self, _ids: std::ops::Range<u32>) {}
    /// Code the op runs inline in the tracer's trampolines instead of
    /// being called, if it has any (see [`InlineCode`]).
    fn inline(&self) -> Option<InlineCode> {
        None
    }
}

/// A piece of an op's inline code: appends it to the assembler, with the
/// label to jump to on failure (see `arch::tramp::Emit` for the contract,
/// and the trampoline functions there for each piece's registers).
pub type EmitFn =
    fn(&mut crate::arch::asm::Assembler, crate::arch::asm::Label) -> Result<(), crate::arch::asm::AsmError>;

/// What an op can do inline.
#[derive(Clone, Copy)]
pub enum InlineCode {
    /// The op only counts calls: its `entry` does exactly
    /// `call_counted(e.func)` and it wants no exits. A site it traces alone
    /// gets the count trampoline, which runs `count`
    /// (`arch::tramp::count_trampoline`).
    Count { count: EmitFn },
    /// The op records the function graph: it wants exits but not
    /// [`Entry::time`], and `entry` and `exit` do exactly what the code
    /// does. A function-entry site it traces alone gets a graph trampoline
    /// running `entry` (`arch::tramp::graph_trampoline`), and its exits
    /// run `exit` in the return trampoline. One op's code per process: the
    /// return block holding `exit` is never freed, so the first graph
    /// code registered is the one kept; ops with other code are called.
    Graph { entry: EmitFn, exit: EmitFn },
}

/// Where a site is in its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SitePlace {
    /// At the function's entry, before its prologue: `[frame+3]` is the
    /// function's return address.
    FunctionEntry = 0,
    /// An entry site inside a function body (`#[traced]`).
    BodyEntry = 1,
    /// An exit site inside a function body (`#[traced]`'s drop guard).
    BodyExit = 2,
}

/// What an entry callback sees.
pub struct Entry<'a> {
    /// Index of the site (see `Tracer::function`).
    pub site: u32,
    /// The function's id in [`crate::funcs`].
    pub func: u32,
    /// Traced frames of this thread below this one.
    pub depth: u32,
    /// Clock at entry (0 unless an op of the site wants time).
    pub time: u64,
    regs: &'a SavedRegs,
    frame: *const usize,
    place: SitePlace,
}

impl Entry<'_> {
    /// Integer argument `n` of a function entered at its entry site (x86-64:
    /// 0-5, rdi, rsi, rdx, rcx, r8, r9; aarch64: 0-7, x0-x7); `None` for
    /// body sites.
    pub fn arg(&self, n: usize) -> Option<u64> {
        (self.place == SitePlace::FunctionEntry).then(|| self.regs.int_arg(n)).flatten()
    }
    /// Floating-point argument `n` (xmm0-7 or d0-d7), low 8 bytes.
    pub fn float_arg(&self, n: usize) -> Option<f64> {
        (self.place == SitePlace::FunctionEntry).then(|| self.regs.float_arg(n)).flatten()
    }
    /// The traced function's return address (entry sites only).
    pub fn return_address(&self) -> Option<usize> {
        // SAFETY: the frame arch::tramp's entry trampoline passed; its
        // return slot holds the site's return address.
        (self.place == SitePlace::FunctionEntry).then(|| unsafe { *(tramp::return_slot(self.frame) as *const usize) })
    }
    /// The stack pointer at the function's entry (entry sites only).
    pub fn stack_pointer(&self) -> Option<usize> {
        // SAFETY: the frame arch::tramp's entry trampoline passed.
        (self.place == SitePlace::FunctionEntry).then(|| unsafe { tramp::entry_sp(self.frame) })
    }
}

/// What an exit callback sees.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub site: u32,
    /// The function's id in [`crate::funcs`].
    pub func: u32,
    pub depth: u32,
    pub entry_time: u64,
    pub exit_time: u64,
    /// rax (x0) as the function returned it.
    pub retval: u64,
    /// xmm0 (d0) (low 8 bytes) as the function returned it.
    pub fretval: f64,
}

// ---------------------------------------------------------------- ops

/// A registered op, as the hot path sees it.
pub(crate) struct OpBox {
    pub op: Arc<dyn TraceOp>,
    pub wants_exit: bool,
}

/// Op slots; a site's mask has bit `i` for `OPS[i]`. Set before any site
/// calls the op (Release; pairs with the Acquire in `for_each_op`), cleared
/// before its box is retired.
pub(crate) static OPS: [AtomicPtr<OpBox>; MAX_OPS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_OPS];

/// Ops (bits) that want exits, and that want time: kept by the control
/// side when ops come and go, so the hot path needs no pass over the ops
/// to learn it.
pub(crate) static EXIT_OPS: AtomicU64 = AtomicU64::new(0);
pub(crate) static TIME_OPS: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
fn for_each_op(mut mask: u64, mut f: impl FnMut(u64, &OpBox)) {
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        // Pairs with the Release store in `Tracer::register`: the box is
        // complete.
        let p = OPS[i].load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: a non-null slot points to a live OpBox; it is freed
            // only after a grace period, which waits for this thread to
            // leave the tracer (its `in_tramp` count is raised now).
            f(1 << i, unsafe { &*p });
        }
    }
}

// ---------------------------------------------------------------- sites

/// The hot-path view of a site.
#[repr(C)]
pub(crate) struct SiteSlot {
    pub mask: AtomicU64,
    /// The site's function ([`crate::funcs`] id).
    pub func: std::sync::atomic::AtomicU32,
    pub place: AtomicU8,
    /// The function's identity: its entry address, or for `#[traced]`
    /// sites the descriptor shared by its entry and exit sites.
    pub pair: AtomicUsize,
}

const SEG_BITS: u32 = 12;
const SEG_LEN: usize = 1 << SEG_BITS;
const SEGMENTS: usize = 1024;

type Segment = [SiteSlot; SEG_LEN];

/// Segments of the site table, allocated on demand and never freed, so an
/// index read by a trampoline always names valid memory.
static SITES: [AtomicPtr<Segment>; SEGMENTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SEGMENTS];

/// The most sites the table holds.
pub(crate) const MAX_SITES: usize = SEG_LEN * SEGMENTS;

#[inline(always)]
pub(crate) fn site_slot(i: u32) -> Option<&'static SiteSlot> {
    // Pairs with the Release store in `ensure_site`: the slots are
    // initialised.
    let seg = SITES.get((i >> SEG_BITS) as usize)?.load(Ordering::Acquire);
    // SAFETY: segments are leaked once published (Release in ensure_site).
    (!seg.is_null()).then(|| unsafe { &(*seg)[i as usize & (SEG_LEN - 1)] })
}

/// Makes sure slot `i` exists (control side).
pub(crate) fn ensure_site(i: u32) -> &'static SiteSlot {
    let s = &SITES[(i >> SEG_BITS) as usize];
    // Pairs with the Release store below of an earlier call (segments are
    // added under the tracer's lock only).
    if s.load(Ordering::Acquire).is_null() {
        let seg: Box<Segment> = Box::new(std::array::from_fn(|_| SiteSlot {
            mask: AtomicU64::new(0),
            func: std::sync::atomic::AtomicU32::new(0),
            place: AtomicU8::new(0),
            pair: AtomicUsize::new(0),
        }));
        // Pairs with the Acquire load in `site_slot`: a trampoline or handler
        // that sees the segment sees its slots initialised.
        s.store(Box::into_raw(seg), Ordering::Release);
    }
    site_slot(i).expect("segment just published")
}

// ---------------------------------------------------------------- threads

/// One frame on a shadow stack.
#[derive(Clone, Copy)]
#[repr(C)]
struct ShadowEntry {
    /// Address of the replaced return address (0 for body sites).
    slot: usize,
    orig: usize,
    /// The function's recorder id | its depth << 32: a record's second
    /// word but for the kind (see [`ShadowEntry::func_depth`]). One field,
    /// written and read whole: two u32 stores read back as one u64 load
    /// defeat store forwarding, which measured 2x slower on the graph path.
    func_depth: u64,
    mask: u64,
    time: u64,
    site: u32,
}

impl ShadowEntry {
    fn func_depth(func: u32, depth: u32) -> u64 {
        func as u64 | (depth as u64) << 32
    }
    fn func(&self) -> u32 {
        self.func_depth as u32
    }
    fn depth(&self) -> u32 {
        (self.func_depth >> 32) as u32
    }
}

/// A thread's shadow stack, in its own anonymous mapping (mmap is
/// async-signal-safe, malloc is not).
#[repr(C)]
struct Shadow {
    len: usize,
    cap: usize,
    entries: [ShadowEntry; 0],
}

const SHADOW_BYTES: usize = 256 << 10;

#[repr(C)]
struct ThreadState {
    /// The quiescence count (module docs): how many times this thread is
    /// inside tracer code, with `UNREGISTERED` set until it registers.
    /// Written only by this thread (its signal handlers leave it as they
    /// found it), read by grace periods.
    in_tramp: AtomicU32,
    /// This thread's registry slot + 1 (0: none).
    slot: Cell<u32>,
    /// Its exit destructor ran: it is not registered again.
    exiting: Cell<bool>,
    shadow: Cell<*mut Shadow>,
    /// Entries and returns this thread took through the hot path's
    /// handlers (not inline in a graph or count trampoline), counted in
    /// `testing` builds only. Atomic only to be one instruction: a signal
    /// handler's slow calls landing between a load and a store would be
    /// lost (a `Cell` lost 1 to 4 in a signal storm). Only this thread
    /// writes it; Relaxed.
    #[cfg(feature = "testing")]
    slow_calls: AtomicU64,
}

thread_local! {
    static STATE: ThreadState = const {
        ThreadState {
            in_tramp: AtomicU32::new(UNREGISTERED),
            slot: Cell::new(0),
            exiting: Cell::new(false),
            shadow: Cell::new(std::ptr::null_mut()),
            #[cfg(feature = "testing")]
            slow_calls: AtomicU64::new(0),
        }
    };
}

/// Where this thread's quiescence count is, as an offset from the thread
/// pointer, if the tracer's thread-local lives in the static TLS block
/// (then stubs raise it in place: `arch::tramp::Counter::Tls`).
pub(crate) fn count_offset() -> Option<i32> {
    shadow_offsets().map(|sh| sh.tls_in_tramp)
}

/// The process whose threads register (set at start and in a forked
/// child): a `vfork` child shares its parent's memory, TLS included, and
/// must not register in its parent thread's place.
pub(crate) static PROCESS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// pthread key whose destructor releases a thread's registry slot
/// ([`thread_exit`]); its value is the slot + 1.
pub(crate) static REGISTRY_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Registers the calling thread (see `registry.rs`): its count loses
/// `UNREGISTERED`, keeping its nesting. `false` if it is exiting, is a
/// `vfork` child, or no slot could be made: it must then stay out of
/// anything freeable.
/// Async-signal-safe (atomics, mmap, rt_sigprocmask, a low pthread key);
/// keeps `errno`.
fn register(st: &ThreadState) -> bool {
    if st.exiting.get() || threads::getpid() != PROCESS.load(Ordering::Relaxed) {
        return false;
    }
    // No signal handler of this thread may register it meanwhile (it would
    // take a second slot): block them all, briefly, once per thread. The
    // system call itself, not glibc's helpers: this runs at a traced site,
    // where only the registers the stub's routine saved may change (glibc's
    // memset may use vector registers it does not save), and `errno` must
    // survive (rule 9).
    let saved_errno = threads::errno();
    let old_mask = signals::block_all_raw();
    let raw = st.in_tramp.load(Ordering::Relaxed);
    // Registered already, by a signal handler that ran between the load
    // and the store of this thread's stub raise (aarch64's raise is two
    // instructions; its store put the bit back): the slot is ours, only the
    // bit goes.
    let again = raw & UNREGISTERED != 0 && st.slot.get() != 0;
    if again {
        st.in_tramp.store(raw & !UNREGISTERED, Ordering::Relaxed);
    }
    let ok = raw & UNREGISTERED == 0 || again || {
        let key = REGISTRY_KEY.load(Ordering::Relaxed);
        let low_key = key < 32; // set without allocating (registry.rs)
        let tid = crate::sys::threads::gettid();
        match super::registry::claim(tid, &st.in_tramp, low_key) {
            Some(i) => {
                st.slot.set(i + 1);
                if low_key {
                    // SAFETY: REGISTRY_KEY's key, whose destructor
                    // (`thread_exit`) takes the slot number + 1.
                    unsafe { threads::set_specific(key as libc::pthread_key_t, (i as usize + 1) as *const _) };
                }
                // After the slot is LIVE (SeqCst in claim): a scan that sees
                // the slot reads either value, with the same nesting.
                st.in_tramp.store(raw & !UNREGISTERED, Ordering::Relaxed);
                true
            }
            None => false,
        }
    };
    signals::restore_mask_raw(old_mask);
    threads::set_errno(saved_errno);
    ok
}

/// Called by a stub's cold path (`arch::tramp::register_routine`, every
/// register saved) when its `inc` left `UNREGISTERED` set: registers the
/// thread and returns 1, or undoes the stub's raise and returns 0 (the
/// call goes on untraced).
pub(crate) extern "C" fn stub_register() -> u32 {
    STATE.with(|st| {
        if register(st) {
            1
        } else {
            st.in_tramp.store(st.in_tramp.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Relaxed);
            0
        }
    })
}

/// The enter routine of `Counter::Calls` (dynamic TLS): registers the
/// thread if needed and raises its count; 0 if the call must go on
/// untraced.
pub(crate) extern "C" fn stub_enter() -> u32 {
    STATE.with(|st| {
        if st.in_tramp.load(Ordering::Relaxed) & UNREGISTERED != 0 && !register(st) {
            return 0;
        }
        st.in_tramp.store(st.in_tramp.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        // The raise before what it protects (the stub's word, read after
        // this returns: a call boundary the compiler cannot cross anyway).
        // Pairs with the grace period's membarrier (grace.rs, step 1),
        // which orders it for the CPU, and its Acquire read of the count.
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        1
    })
}

/// The leave routine of `Counter::Calls`: lowers the count.
pub(crate) extern "C" fn stub_leave() -> u32 {
    STATE.with(|st| {
        // Release: the trampoline's accesses happened before (pairs with
        // the grace period's Acquire read, registry.rs).
        st.in_tramp.store(st.in_tramp.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Release);
        1
    })
}

/// Destructor of [`REGISTRY_KEY`]: the thread is exiting. Stubs let it
/// through untraced from now on, and its slot is released (waiting for a
/// scan that may be reading its count, registry.rs step 3).
pub(crate) extern "C" fn thread_exit(_: *mut libc::c_void) {
    STATE.with(|st| {
        st.exiting.set(true);
        // SeqCst, though no load pairs with it: the bit matters to this
        // thread's own stubs and `on_return` (program order), and grace
        // periods mask it off (registry.rs); the handshake with scans is the
        // slot's release just below.
        st.in_tramp.store(st.in_tramp.load(Ordering::Relaxed) | UNREGISTERED, Ordering::SeqCst);
        if let Some(i) = st.slot.replace(0).checked_sub(1) {
            super::registry::release(i);
        }
    })
}

/// `pthread_atfork` child handler: the calling thread (the only one in
/// the child) has a new id; its slot must say so, or grace periods would
/// take it for gone.
pub(crate) extern "C" fn after_fork_child() {
    PROCESS.store(threads::getpid(), Ordering::Relaxed);
    STATE.with(|st| {
        if let Some(i) = st.slot.get().checked_sub(1) {
            super::registry::set_tid(i, crate::sys::threads::gettid());
        }
    })
}

/// The op bit whose exits the return trampoline handles inline: the one
/// registered op with the graph code the return block was made with, 0
/// when there is none or more than one. A shadow entry whose mask equals it
/// gets exactly the op's inline exit code on return, which does what
/// [`call_exits`] would.
pub(crate) static FAST_EXIT: AtomicU64 = AtomicU64::new(0);

/// Where the per-thread state and the shadow stack are, for the graph and
/// return trampolines (see `arch::tramp::graph_trampoline`), which push
/// and pop shadow entries exactly as [`function_entry`] and [`on_return`]
/// do. `None` unless the tracer's thread-local lives in the static TLS
/// block (`arch::static_tls_offset`).
pub(crate) fn shadow_offsets() -> Option<crate::arch::tramp::ShadowOffsets> {
    use std::mem::{offset_of, size_of};
    static LAYOUT: std::sync::OnceLock<Option<crate::arch::tramp::ShadowOffsets>> = std::sync::OnceLock::new();
    *LAYOUT.get_or_init(|| {
        Some(crate::arch::tramp::ShadowOffsets {
            tls_in_tramp: crate::arch::static_tls_offset(|| STATE.with(|s| s.in_tramp.as_ptr() as usize))?,
            tls_shadow: crate::arch::static_tls_offset(|| STATE.with(|s| s.shadow.as_ptr() as usize))?,
            len: offset_of!(Shadow, len),
            cap: offset_of!(Shadow, cap),
            entries: offset_of!(Shadow, entries),
            entry_size: size_of::<ShadowEntry>(),
            e_slot: offset_of!(ShadowEntry, slot),
            e_orig: offset_of!(ShadowEntry, orig),
            e_func_depth: offset_of!(ShadowEntry, func_depth),
            e_mask: offset_of!(ShadowEntry, mask),
            e_time: offset_of!(ShadowEntry, time),
            e_site: offset_of!(ShadowEntry, site),
            fast_exit: &FAST_EXIT as *const AtomicU64 as usize,
        })
    })
}

/// The deepest a shadow stack goes: depths are below it (the recorder's
/// compact events hold 14 bits of depth).
pub const MAX_DEPTH: usize = (SHADOW_BYTES - std::mem::size_of::<Shadow>()) / std::mem::size_of::<ShadowEntry>();
const _: () = assert!(MAX_DEPTH < 1 << 14);

/// Counters of things the hot path had to give up on.
pub(crate) static LOST_EXITS: AtomicU64 = AtomicU64::new(0);
pub(crate) static SHADOW_FULL: AtomicU64 = AtomicU64::new(0);

/// How many times this thread is inside tracer code (0 = quiescent).
#[inline]
pub(crate) fn in_tracer() -> u32 {
    STATE.with(|s| s.in_tramp.load(Ordering::Relaxed) & !UNREGISTERED)
}

/// Address of the return trampoline, set once before any op wants exits.
pub(crate) static RETURN_TRAMPOLINE: AtomicUsize = AtomicUsize::new(0);
/// pthread key whose destructor unmaps a thread's shadow stack.
pub(crate) static SHADOW_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);

#[cold]
fn new_shadow() -> *mut Shadow {
    let Some(p) = crate::sys::anon::map(SHADOW_BYTES) else { return std::ptr::null_mut() };
    let sh = p.cast::<Shadow>();
    let cap = (SHADOW_BYTES - std::mem::size_of::<Shadow>()) / std::mem::size_of::<ShadowEntry>();
    // SAFETY: the mapping is large enough and zeroed.
    unsafe { (*sh).cap = cap };
    let key = SHADOW_KEY.load(Ordering::Relaxed);
    if key < 32 {
        // Keys below 32 live in the thread descriptor: no allocation.
        // SAFETY: SHADOW_KEY's key, whose destructor (`drop_shadow`)
        // takes this thread's shadow stack.
        unsafe { threads::set_specific(key as libc::pthread_key_t, p.cast()) };
    }
    sh
}

/// Destructor of [`SHADOW_KEY`]: the thread is exiting.
pub(crate) extern "C" fn drop_shadow(p: *mut libc::c_void) {
    STATE.with(|s| s.shadow.set(std::ptr::null_mut()));
    // SAFETY: p is the mapping made by new_shadow for this thread; the
    // thread is exiting, no frame of it will return into the tracer.
    unsafe { crate::sys::anon::unmap(p.cast(), SHADOW_BYTES) };
}

/// Reads the clock for timestamps ([`crate::clock::Clock`]: the ordered
/// TSC where it is invariant, else CLOCK_MONOTONIC).
#[inline(always)]
pub fn now() -> u64 {
    crate::clock::Clock::now()
}

// ---------------------------------------------------------------- handlers

/// Entry handler of the list trampoline: every op of the site's mask.
pub(crate) extern "C" fn on_entry_list(regs: *mut SavedRegs, frame: *mut usize, _ctx: usize) {
    // SAFETY: the trampoline passes its frame: frame[2] is the site index.
    let site = unsafe { *frame.add(2) } as u32;
    let Some(slot) = site_slot(site) else { return };
    // Pairs with the Release stores of the mask in apply.rs.
    enter(regs, frame, site, slot, slot.mask.load(Ordering::Acquire));
}

/// Slow path of op `op`'s count trampoline (its inline code failed: no
/// buffer yet, say): `frame[1]` is the function's id.
pub(crate) extern "C" fn on_count_slow(_regs: *mut SavedRegs, frame: *mut usize, op: usize) {
    // SAFETY: the count trampoline jumped here with the id where a site
    // index would be.
    let func = unsafe { *frame.add(2) } as u32;
    STATE.with(|st| {
        count_slow_call(st);
        // The count stub's raise covers this: a grace period sees the
        // thread inside the tracer. (An op's count calls nothing traced.)
        for_each_op(1 << op, |_, o| o.op.call_counted(func));
    });
}

/// Entry handler of a direct trampoline: only op `op`.
pub(crate) extern "C" fn on_entry_direct(regs: *mut SavedRegs, frame: *mut usize, op: usize) {
    // SAFETY: as above.
    let site = unsafe { *frame.add(2) } as u32;
    let Some(slot) = site_slot(site) else { return };
    enter(regs, frame, site, slot, 1 << op);
}

/// How many entries and returns the calling thread took through the hot
/// path's handlers rather than inline (tests check that graph trampolines
/// do their work inline).
#[cfg(feature = "testing")]
pub fn slow_calls_of_this_thread() -> u64 {
    STATE.with(|s| s.slow_calls.load(Ordering::Relaxed))
}

/// Counts a call through the hot path's handlers (`testing` builds; in
/// others it is nothing).
#[inline(always)]
fn count_slow_call(_st: &ThreadState) {
    #[cfg(feature = "testing")]
    _st.slow_calls.fetch_add(1, Ordering::Relaxed);
}

#[inline(always)]
fn enter(regs: *mut SavedRegs, frame: *mut usize, site: u32, slot: &SiteSlot, mask: u64) {
    STATE.with(|st| {
        count_slow_call(st);
        // 1 is the raise of the stub that brought us here (module docs).
        if st.in_tramp.load(Ordering::Relaxed) != 1 {
            // Recursion: a callback (or a signal inside one, or inside a
            // trampoline) called a traced function. Not traced, but
            // counted by ops that count.
            let func = slot.func.load(Ordering::Relaxed);
            for_each_op(mask, |_, op| op.op.call_cut(func));
            return;
        }
        // SAFETY: the trampoline passes its save area.
        let regs = unsafe { &*regs };
        let place = match slot.place.load(Ordering::Relaxed) {
            0 => SitePlace::FunctionEntry,
            1 => SitePlace::BodyEntry,
            _ => SitePlace::BodyExit,
        };
        if place == SitePlace::BodyExit {
            body_exit(st, site, slot, regs);
        } else {
            let ids = (slot.func.load(Ordering::Relaxed), slot.pair.load(Ordering::Relaxed));
            function_entry(st, site, ids, mask, regs, frame, place);
        }
    });
}

/// This thread's shadow stack, created on first use (null if mmap failed).
fn shadow(st: &ThreadState) -> *mut Shadow {
    let mut p = st.shadow.get();
    if p.is_null() {
        p = new_shadow();
        st.shadow.set(p);
    }
    p
}

fn entries(sh: &mut Shadow) -> &mut [ShadowEntry] {
    // SAFETY: `cap` entries fit in the mapping after the header.
    unsafe { std::slice::from_raw_parts_mut(sh.entries.as_mut_ptr(), sh.cap) }
}

fn function_entry(
    st: &ThreadState,
    site: u32,
    (func, identity): (u32, usize),
    mask: u64,
    regs: &SavedRegs,
    frame: *mut usize,
    place: SitePlace,
) {
    let exit_mask = mask & EXIT_OPS.load(Ordering::Relaxed);
    let time = if mask & TIME_OPS.load(Ordering::Relaxed) != 0 { now() } else { 0 };
    let p = if exit_mask != 0 { shadow(st) } else { std::ptr::null_mut() };
    // SAFETY: this thread's own mapping, used only by this thread (its
    // signal handlers are cut off by `in_tramp`).
    let sh = unsafe { p.as_mut() };
    let depth = sh.as_ref().map_or(0, |s| s.len as u32);
    let e = Entry { site, func, depth, time, regs, frame, place };
    for_each_op(mask, |_, op| op.op.entry(&e));
    let Some(sh) = sh else { return };
    // Pairs with the Release stores in tramp_alloc.rs: the return block's
    // code is written before its address is seen.
    let ret = RETURN_TRAMPOLINE.load(Ordering::Acquire);
    if sh.len == sh.cap || ret == 0 {
        SHADOW_FULL.fetch_add(1, Ordering::Relaxed);
        return; // too deep: this call's exit is not traced, nothing breaks
    }
    // SAFETY: the frame the entry trampoline passed.
    let slot_addr = if place == SitePlace::FunctionEntry { unsafe { tramp::return_slot(frame) } } else { 0 };
    // SAFETY: for an entry site, the return slot holds the function's
    // return address (x86-64: on the stack; aarch64: in the stub's frame
    // record, whence the stub reloads x30).
    // A body entry keeps its function's identity there instead, for its exit
    // site to find.
    let orig = if slot_addr != 0 { unsafe { *(slot_addr as *const usize) } } else { identity };
    let i = sh.len;
    let func_depth = ShadowEntry::func_depth(func, depth);
    entries(sh)[i] = ShadowEntry { slot: slot_addr, orig, func_depth, mask: exit_mask, time, site };
    sh.len += 1;
    if slot_addr != 0 {
        // SAFETY: replacing the return address of the function being entered.
        unsafe { *(slot_addr as *mut usize) = ret };
    }
}

fn call_exits(mask: u64, x: &Exit) {
    for_each_op(mask, |_, op| {
        if op.wants_exit {
            op.op.exit(x)
        }
    });
}

/// A `#[traced]` function's exit site: pop its body-entry record.
fn body_exit(st: &ThreadState, site: u32, slot: &SiteSlot, regs: &SavedRegs) {
    let identity = slot.pair.load(Ordering::Relaxed);
    // SAFETY: as in function_entry.
    let Some(sh) = (unsafe { shadow(st).as_mut() }) else { return };
    let len = sh.len;
    let es = entries(sh);
    // The newest body record of this function; body records have slot 0.
    let Some(i) = (0..len).rev().take(64).find(|&i| es[i].slot == 0 && es[i].orig == identity) else { return };
    let e = es[i];
    count_lost(len - i - 1);
    sh.len = i;
    let x = Exit {
        site,
        func: slot.func.load(Ordering::Relaxed),
        depth: e.depth(),
        entry_time: e.time,
        exit_time: if e.time != 0 { now() } else { 0 },
        retval: regs.int_result(),
        fretval: 0.0,
    };
    call_exits(e.mask, &x);
}

/// Counts exits of skipped frames; no locked instruction in the common case.
#[inline(always)]
fn count_lost(n: usize) {
    if n != 0 {
        LOST_EXITS.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Called by the return trampoline; returns the original return address.
pub(crate) extern "C" fn on_return(saved: *mut SavedReturn, caller_sp: usize) -> usize {
    let slot = caller_sp - 8;
    STATE.with(|st| {
        count_slow_call(st);
        let raw = st.in_tramp.load(Ordering::Relaxed);
        // An exiting thread (its slot released, `UNREGISTERED` set again)
        // returns without exit callbacks: grace periods no longer see it.
        let guard = if raw & UNREGISTERED != 0 { u32::MAX } else { raw };
        if guard != u32::MAX {
            st.in_tramp.store(raw + 1, Ordering::Relaxed);
            // The raise before any load of op data (call_exits); the CPU's
            // store-load reordering is covered by the grace period's
            // membarrier: pairs with it (grace.rs, step 1) and with its
            // Acquire read of the count.
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        }
        let sh = st.shadow.get();
        // SAFETY: a hijacked frame implies this thread's shadow stack exists.
        let sh = unsafe { &mut *sh };
        let len = sh.len;
        let es = entries(sh);
        let Some(i) = (0..len).rev().find(|&i| es[i].slot == slot) else {
            lost_return_address(slot);
        };
        let e = es[i];
        count_lost(len - i - 1);
        sh.len = i;
        if guard == 0 {
            // SAFETY: the trampoline passes its save area.
            let r = unsafe { &*saved };
            let x = Exit {
                site: e.site,
                func: e.func(),
                depth: e.depth(),
                entry_time: e.time,
                exit_time: if e.time != 0 { now() } else { 0 },
                retval: r.int_result(),
                fretval: r.float_result(),
            };
            call_exits(e.mask, &x);
        }
        if guard != u32::MAX {
            // Release: the callbacks' reads of op data happened before
            // (pairs with the grace period's Acquire read, registry.rs).
            st.in_tramp.store(raw, Ordering::Release);
        }
        e.orig
    })
}

/// A hijacked return with no shadow record: the stack was switched under
/// us (user-level context switching). There is nowhere safe to return to.
#[cold]
fn lost_return_address(slot: usize) -> ! {
    let msg = b"textpoke: a traced function returned with no shadow-stack record (stack switched by swapcontext or a coroutine library?); aborting\n";
    crate::sys::write_stderr(msg);
    let _ = slot;
    std::process::abort()
}

/// Low bit of a shadow entry's `slot`: its return address was put back for
/// an unwinder (slots are 8-aligned, so the bit is free).
const RESTORED: usize = 1;

/// Before an unwinder walks this thread's stack: puts back every return
/// address the shadow stack replaced, marking the records (an exception may
/// be caught further up, see [`rehijack_after_catch`]). Returns how many.
pub(crate) fn restore_return_addresses() -> usize {
    STATE.with(|st| {
        let p = st.shadow.get();
        if p.is_null() {
            return 0;
        }
        // SAFETY: this thread's own shadow stack.
        let sh = unsafe { &mut *p };
        let len = sh.len;
        let mut restored = 0;
        for e in &mut entries(sh)[..len] {
            if e.slot != 0 && e.slot & RESTORED == 0 {
                // SAFETY: the slot is a live frame's return address we replaced.
                unsafe { *(e.slot as *mut usize) = e.orig };
                e.slot |= RESTORED;
                restored += 1;
            }
        }
        restored
    })
}

/// An exception was caught by the frame whose stack pointer is
/// `catch_sp`: frames below it were unwound (their records are dropped as
/// lost exits); frames at or above it are live again, and get their
/// return addresses replaced anew.
pub(crate) extern "C" fn rehijack_after_catch(catch_sp: usize) {
    STATE.with(|st| {
        let p = st.shadow.get();
        if p.is_null() {
            return;
        }
        // SAFETY: this thread's own shadow stack.
        let sh = unsafe { &mut *p };
        let len = sh.len;
        let ret = RETURN_TRAMPOLINE.load(Ordering::Acquire); // pairs as in function_entry
        let es = entries(sh);
        let mut kept = 0;
        for i in 0..len {
            let mut e = es[i];
            if e.slot & RESTORED != 0 {
                let slot = e.slot & !RESTORED;
                // SAFETY: a slot at or above the catching frame is live.
                if slot >= catch_sp && unsafe { *(slot as *const usize) } == e.orig {
                    // SAFETY: the same live slot, just read.
                    unsafe { *(slot as *mut usize) = ret };
                    e.slot = slot;
                } else {
                    LOST_EXITS.fetch_add(1, Ordering::Relaxed);
                    continue; // unwound
                }
            }
            es[kept] = e;
            kept += 1;
        }
        sh.len = kept;
    })
}

/// For an unwinder walk where a replaced return address lives wherever
/// the function saved x30 (aarch64, `unwind_aarch64.rs`), not in the
/// record's slot: the newest record of the frame whose identity (entry SP
/// − 8) is `identity`, restored or not. `f(orig, restored)` may change
/// its mark by returning the new one. Returns the frame's original return
/// address, `None` without a record.
#[cfg(target_arch = "aarch64")]
pub(crate) fn with_frame_record(identity: usize, f: impl FnOnce(usize, bool) -> Option<bool>) -> Option<usize> {
    STATE.with(|st| {
        let p = st.shadow.get();
        if p.is_null() {
            return None;
        }
        // SAFETY: this thread's own shadow stack.
        let sh = unsafe { &mut *p };
        let len = sh.len;
        let e = entries(sh)[..len].iter_mut().rev().find(|e| e.slot != 0 && e.slot & !RESTORED == identity)?;
        if let Some(restored) = f(e.orig, e.slot & RESTORED != 0) {
            e.slot = identity | if restored { RESTORED } else { 0 };
        }
        Some(e.orig)
    })
}

/// After an exception was caught and [`with_frame_record`] re-armed the
/// live frames: the records still marked restored stand for frames the
/// exception unwound; they are dropped, their exits counted as lost.
#[cfg(target_arch = "aarch64")]
pub(crate) fn drop_restored_records() {
    STATE.with(|st| {
        let p = st.shadow.get();
        if p.is_null() {
            return;
        }
        // SAFETY: this thread's own shadow stack.
        let sh = unsafe { &mut *p };
        let len = sh.len;
        let es = entries(sh);
        let mut kept = 0;
        for i in 0..len {
            if es[i].slot & RESTORED != 0 {
                LOST_EXITS.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            es[kept] = es[i];
            kept += 1;
        }
        sh.len = kept;
    })
}

// ---------------------------------------------------------------- live patching hooks
//
// What `live` (the transition engine, issue 12) needs of the function graph
// machinery: a frame entered through a live-patch stub while its thread has
// not switched is counted by a *marked* shadow entry (`func == LP_FUNC`, the
// marker's tag in the depth half, no op in its mask: its return runs no
// callback). Such entries are popped, dropped as lost (longjmp, exceptions,
// cancellation) and restored for unwinders exactly like the tracer's own, so
// counting the marked entries present is an exact count of those frames.

/// The `func` half of a live-patching shadow entry.
pub(crate) const LP_FUNC: u32 = u32::MAX;

/// Runs `f` with this thread's quiescence count raised (grace periods then
/// wait for it), passing whether the thread was already inside tracer or
/// live-patching code (the recursion guard: `f` must then push nothing).
pub(crate) fn lp_guarded<R>(f: impl FnOnce(bool) -> R) -> R {
    STATE.with(|st| {
        let raw = st.in_tramp.load(Ordering::Relaxed);
        st.in_tramp.store(raw + 1, Ordering::Relaxed);
        // The raise before any load of data a grace period protects; the
        // CPU's store-load reordering is the grace period's membarrier's
        // (grace.rs step 1, as in `on_return`).
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        let r = f(raw & !UNREGISTERED != 0);
        // Release: pairs with the grace period's Acquire read (registry.rs).
        st.in_tramp.store(raw, Ordering::Release);
        r
    })
}

/// Pushes a marked entry for the frame whose return address is at
/// `ret_slot` (a function being entered) and replaces that return address
/// by the return trampoline. `false` (nothing done) when the shadow stack
/// is full or missing, or no return trampoline exists. Only under
/// [`lp_guarded`] with no nesting.
pub(crate) fn lp_push_marked(ret_slot: usize, tag: u32) -> bool {
    STATE.with(|st| {
        // SAFETY: this thread's own mapping; its signal handlers are cut
        // off by the raised count (`lp_guarded`).
        let Some(sh) = (unsafe { shadow(st).as_mut() }) else { return false };
        // Pairs with the Release store in tramp_alloc.rs (as in function_entry).
        let ret = RETURN_TRAMPOLINE.load(Ordering::Acquire);
        if sh.len == sh.cap || ret == 0 {
            return false;
        }
        // SAFETY: `ret_slot` holds the return address of the function being
        // entered (the live slow path passes the entry stack pointer).
        let orig = unsafe { *(ret_slot as *const usize) };
        let i = sh.len;
        entries(sh)[i] = ShadowEntry {
            slot: ret_slot,
            orig,
            func_depth: ShadowEntry::func_depth(LP_FUNC, tag),
            mask: 0,
            time: 0,
            site: u32::MAX,
        };
        sh.len += 1;
        // SAFETY: as above: replacing that return address.
        unsafe { *(ret_slot as *mut usize) = ret };
        true
    })
}

/// The return trampoline's address (0 before it exists): the word a
/// marked entry's return slot holds while its frame is live.
pub(crate) fn lp_return_trampoline() -> usize {
    // Acquire pairs with the Release store in `ensure_return_trampoline`.
    RETURN_TRAMPOLINE.load(Ordering::Acquire)
}

/// The address of this thread's shadow-stack pointer (a thread-local
/// cell), for [`lp_read_shadow`] from another thread.
pub(crate) fn lp_shadow_cell() -> usize {
    STATE.with(|st| st.shadow.as_ptr() as usize)
}

/// One shadow entry as live patching reads it: the return slot (low bit:
/// restored for an unwinder), the original return address, and for a
/// marked entry its tag.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LpShadowEntry {
    pub slot: usize,
    pub orig: usize,
    pub marked: Option<u32>,
}

/// Calls `f` with each shadow entry of the thread whose shadow cell
/// ([`lp_shadow_cell`]) is at `cell`, oldest first, read with
/// `process_vm_readv` (never faults; async-signal-safe). `false` if the
/// cell or the stack could not be read.
pub(crate) fn lp_read_shadow(cell: usize, mut f: impl FnMut(LpShadowEntry)) -> bool {
    let mut word = [0u8; 8];
    if cell == 0 || crate::sys::mem::read_memory(cell, &mut word) != 8 {
        return false;
    }
    let sh = usize::from_ne_bytes(word);
    if sh == 0 {
        return true; // no shadow stack yet: no entries
    }
    let mut hdr = [0u8; 16];
    if crate::sys::mem::read_memory(sh, &mut hdr) != 16 {
        return false;
    }
    let len = usize::from_ne_bytes(hdr[..8].try_into().expect("8 bytes"));
    if len > MAX_DEPTH {
        return false;
    }
    let base = sh + std::mem::offset_of!(Shadow, entries);
    let size = std::mem::size_of::<ShadowEntry>();
    let mut buf = [0u8; 4096];
    let per = buf.len() / size;
    let mut i = 0;
    while i < len {
        let n = per.min(len - i);
        if crate::sys::mem::read_memory(base + i * size, &mut buf[..n * size]) != n * size {
            return false;
        }
        for k in 0..n {
            // SAFETY: `buf` holds `n` whole entries copied from the thread's
            // shadow stack; ShadowEntry is plain data.
            let e: ShadowEntry = unsafe { std::ptr::read_unaligned(buf.as_ptr().add(k * size).cast()) };
            let marked = (e.func() == LP_FUNC && e.mask == 0).then(|| e.depth());
            f(LpShadowEntry { slot: e.slot, orig: e.orig, marked });
        }
        i += n;
    }
    true
}

/// Calls `f` with this thread's own shadow entries (see [`lp_read_shadow`]).
pub(crate) fn lp_own_shadow(mut f: impl FnMut(LpShadowEntry)) {
    STATE.with(|st| {
        let p = st.shadow.get();
        if p.is_null() {
            return;
        }
        // SAFETY: this thread's own shadow stack, not changed while we read
        // it (the caller holds `lp_guarded`).
        let sh = unsafe { &mut *p };
        let len = sh.len;
        for e in &entries(sh)[..len] {
            let marked = (e.func() == LP_FUNC && e.mask == 0).then(|| e.depth());
            f(LpShadowEntry { slot: e.slot, orig: e.orig, marked });
        }
    })
}

impl Entry<'_> {
    /// The entered function's entry address (function-entry sites only):
    /// a live-patching check at a traced entry must count the function
    /// being entered, whose frame the caller's unwind does not show.
    pub(crate) fn lp_function_entry(&self) -> Option<usize> {
        let slot = site_slot(self.site)?;
        (self.place == SitePlace::FunctionEntry).then(|| slot.pair.load(Ordering::Relaxed))
    }

    /// The caller's `rbp` at the function's entry (the trampoline's frame
    /// saved it), for a live-patching stack check from an entry callback.
    pub(crate) fn lp_caller_rbp(&self) -> usize {
        // SAFETY: frame[0] is the trampoline's saved rbp.
        unsafe { *self.frame }
    }
}
