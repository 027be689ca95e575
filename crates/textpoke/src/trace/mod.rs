//! The function tracer: ftrace and function_graph for user space.
//!
//! # Pieces
//!
//! - **Sites** come from [`crate::sites`]: patchable entries and mcount
//!   NOPs of every loaded object, each with its function's name. Each gets
//!   an index into a lock-free site table ([`hot`]) that trampolines read.
//! - **Ops** ([`TraceOp`]) are callbacks with a [`Filter`]; up to
//!   [`MAX_OPS`] at once. A site's ops are a bit mask.
//! - **Stubs**: a traced site calls (or for a graph trampoline jumps to)
//!   its own stub (`arch::tramp::call_stub`, `graph_stub`), made on first
//!   need in a stub block mapped within ±2 GiB of the site's object and
//!   never freed or given to another site while that object is loaded.
//!   A stub raises its thread's quiescence count (see [`grace`]), then
//!   goes through its *word*, a data slot holding its trampoline's
//!   address, and lowers the count once the trampoline returned. A site
//!   has up to three stubs, one per kind: a call stub pushing its index
//!   (direct and list trampolines), one pushing its function's id (count
//!   trampolines), a graph stub.
//! - **Trampolines** live in blocks of executable memory shared by every
//!   site: the *direct* trampoline of a site's one op, or the *list*
//!   trampoline when the site has several. They save every caller-saved
//!   register and call the hot path. A block is retired once no stub's
//!   word points into it.
//! - **Inline code**: an op may bring code of its own for the tracer to
//!   run in its trampolines instead of calling it ([`InlineCode`]: the
//!   recorder does, `textpoke_record::RecordOp`; the tracer knows nothing
//!   of what the code does). A site whose only op has such code gets a
//!   trampoline that runs it, with the hot path as its fallback: the *count*
//!   trampoline, or at a function entry the *graph* trampoline. A graph
//!   site *jumps* to its stub, and the trampoline calls the function
//!   through a thunk in the graph return block
//!   (`arch::tramp::graph_trampoline`), so calls and returns pair up for
//!   the CPU's return predictor. [`Tracer::set_inline_recording`] turns
//!   both off (tests and benchmarks).
//! - **function_graph**: ops that want exits get them through return
//!   address replacement and a per-thread shadow stack ([`hot`]); the
//!   graph return block runs a graph op's inline exit code itself.
//!
//! # Changing what is traced
//!
//! Registering, re-filtering or unregistering an op recomputes each site's
//! mask, and only sites whose mask changes are touched:
//!
//! 1. the stubs and trampolines the new targets need are made, their code
//!    written together when the step ends (one `pwrite` per run, see
//!    `text::codemem::WriteSession`); if new trampoline code was written,
//!    cores are synced (a stub's word may lead a core there without any
//!    site changing); the words of stubs the sites do not call yet are
//!    pointed at their trampolines;
//! 2. the new masks are published (Release);
//! 3. one batch turns every site that changes stub kind into `call stub`,
//!    `jmp graph stub` or a NOP (a site that keeps its stub is not
//!    written): by the breakpoint protocol, or, when a site still in gcc's
//!    five-one-byte-NOP form gets its branch, the whole batch by the
//!    stop-machine strategy, which writes the branch over the five NOPs at
//!    once with every other thread parked and none of them between two of
//!    the NOPs (rule 1: the only way to make one instruction of several;
//!    see `text::stop_machine` for what that costs a thread in a system
//!    call). A pad written so is one instruction from then on, for the
//!    breakpoint protocol. One batch, not a stop-machine rewrite of the
//!    pads followed by a breakpoint batch: the threads are parked once and
//!    nothing is half done if it is refused. With
//!    [`Tracer::set_prepare_pads`] (the agent's choice), the threads being
//!    parked anyway, such a batch also turns every other pad of a live
//!    site into one 5-byte NOP, so that tracing it later takes the
//!    breakpoint protocol and signals nobody. A program's first
//!    registration (the agent's, from a constructor: usually no thread but
//!    textpoke's own) so prepares every pad of the objects loaded at start;
//! 4. the words of stubs the sites keep are pointed at their new
//!    trampolines, those of stubs no site calls any more at their null
//!    paths (the *unpublish*); blocks no word points into any more, stub
//!    blocks of unloaded objects and unregistered ops are retired, and
//!    freed after a grace period ([`grace`]) by a background reclaimer
//!    thread: a grace period waits for every thread in tracer code to
//!    leave it, and nobody should wait for that (as the kernel frees
//!    ftrace trampolines from an RCU-tasks callback). [`Tracer::reclaim`]
//!    waits for it explicitly. Grace periods send no signal (where the
//!    kernel has `membarrier`): tracing changes never make a system call of
//!    the program fail with EINTR.
//!
//! If the batch is refused (a site's bytes changed under us), nothing is
//! written and the masks and words are put back.

mod filter;
mod grace;
pub mod hot;
mod registry;
mod unwind;

pub use filter::{Filter, FilterError};

/// Waits up to `patience` until every other thread of the process has been
/// seen outside tracer code (stubs past their first instruction,
/// trampolines, callbacks) at least once since the call: the tracer's
/// grace period ([`grace`]), usable on its own like synchronize_rcu. It
/// sends no signal where the kernel has `membarrier`. `Ok(false)` if some
/// thread was not seen so in time.
pub fn wait_for_grace(patience: Duration) -> Result<bool, TraceError> {
    if hot::in_tracer() != 0 {
        return Err(TraceError::InCallback);
    }
    Ok(grace::wait(patience)?)
}
pub use hot::{
    now, slow_calls_of_this_thread, EmitFn, Entry, Exit, InlineCode, SitePlace, TraceOp, MAX_DEPTH, MAX_OPS,
};

use crate::arch::{self, tramp, NOP5};
use crate::error::PokeError;
use crate::sites::{MarkedPoint, NopForm, ObjectId, SiteKind, SiteTable};
use crate::text::codemem::{CodeBlock, DataBlock};
use crate::{Batch, CommitOptions, Poke, Strategy};
use hot::{OpBox, OPS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Why a tracing change failed. Nothing was changed when it fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    #[error(transparent)]
    Poke(#[from] PokeError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("at most {MAX_OPS} tracing ops may be registered at once")]
    TooManyOps,
    #[error("op {0} is not registered")]
    UnknownOp(usize),
    #[error("tracing cannot be changed from inside a tracing callback")]
    InCallback,
    #[error("cannot map trampoline memory within ±2 GiB of {near:#x}: {source}")]
    TrampolineMemory { near: usize, source: std::io::Error },
    #[error("cannot generate trampoline code: {0}")]
    CodeGen(String),
}

/// A registered op.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct OpHandle(usize);

impl OpHandle {
    pub fn id(&self) -> usize {
        self.0
    }
}

/// A traceable function, as listed by [`Tracer::functions`].
#[derive(Debug, Clone)]
pub struct FunctionInfo {
    pub site: u32,
    pub function: Arc<str>,
    /// The patched NOP.
    pub addr: usize,
    pub place: SitePlace,
    /// Bit mask of the ops tracing it now.
    pub ops: u64,
    /// How its ops are called now.
    pub trampoline: TrampolineKind,
}

/// How a site's ops are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrampolineKind {
    /// Not traced: the site is a NOP.
    None,
    /// One op, called through the hot path.
    Direct,
    /// Several ops, called through the hot path.
    List,
    /// A count-only op alone, counted inline.
    Count,
    /// A graph-recording op alone at a function entry, recorded inline.
    Graph,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Off,
    Direct(usize),
    List,
    /// A count-only op alone: the count trampoline, no callback.
    Count(usize),
    /// A graph-recording op alone at a function entry: the graph
    /// trampoline, which records entry and exit without a callback.
    Graph(usize),
}

struct SiteInfo {
    addr: usize,
    function: Arc<str>,
    object: ObjectId,
    place: SitePlace,
    /// Is the site one 5-byte NOP (or a call)? gcc pads need rewriting once.
    prepared: bool,
    mask: u64,
    target: Target,
    /// The site's stubs by kind ([`StubKind`]), made on first need and
    /// kept: never freed or given to another site while its object is
    /// loaded (a thread may sit on a stub's first instruction for as long
    /// as the scheduler likes).
    stubs: [Option<Stub>; 3],
    alive: bool,
}

/// Which stub a target is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StubKind {
    /// A call stub pushing the site index: direct and list trampolines.
    Call = 0,
    /// A call stub pushing the function id: count trampolines.
    Count = 1,
    /// A graph stub (the site jumps to it): graph trampolines.
    Graph = 2,
}

impl Target {
    fn stub_kind(self) -> Option<StubKind> {
        match self {
            Target::Off => None,
            Target::Direct(_) | Target::List => Some(StubKind::Call),
            Target::Count(_) => Some(StubKind::Count),
            Target::Graph(_) => Some(StubKind::Graph),
        }
    }
}

/// One stub of a site.
#[derive(Debug, Clone, Copy)]
struct Stub {
    code: usize,
    /// Address of its word (in its stub block's data).
    word: usize,
    /// What the word holds while the stub has no trampoline.
    null: usize,
    /// The trampoline block the word points into, if any.
    block: Option<usize>,
}

/// Where the words of a change's stub must point: a trampoline in block
/// `block`, reached from the site through the stub at `stub`.
#[derive(Debug, Clone, Copy)]
struct Wire {
    block: usize,
    tramp: usize,
    stub: usize,
}

/// Stubs of one object: code within rel32 reach of its sites, data (the
/// words) within reach of the code. Never freed while the object is
/// loaded.
struct StubBlock {
    code: CodeBlock,
    data: DataBlock,
    object: ObjectId,
    /// Slots handed out (slot 0 of the data is the header).
    used: usize,
}

/// Trampolines shared by every site. Retired once no stub's word points
/// into it.
struct TrampBlock {
    code: CodeBlock,
    used: usize,
    /// Trampolines for function-entry sites [0] and body sites [1].
    list: [Option<usize>; 2],
    direct: [[Option<usize>; MAX_OPS]; 2],
    /// Count trampolines, per op (each with its slow path).
    count: [Option<usize>; MAX_OPS],
    /// Graph trampolines, per op (their slow paths are `direct[0][op]`).
    graph: [Option<usize>; MAX_OPS],
    /// Stub words pointing into the block.
    users: usize,
}

/// Trampoline blocks: 64 KiB of address space each, two or three pages
/// touched.
const BLOCK_BYTES: usize = 64 << 10;
/// Room for a graph trampoline.
const GRAPH_TRAMP_BYTES: usize = 512;
/// Stub blocks: code and data for this many stubs (slot 0 is the header).
const STUBS_PER_BLOCK: usize = 1024;

/// The never-freed routines stubs call through their block's header.
struct Routines {
    /// `arch::tramp::HDR_CALL`, `HDR_GRAPH`, `HDR_LEAVE`.
    header: [usize; 3],
    _code: CodeBlock,
}

struct OpInfo {
    filter: Filter,
    boxed: *mut OpBox,
}

// SAFETY: the raw OpBox pointer is owned by the tracer and only shared with
// the hot path through OPS.
unsafe impl Send for OpInfo {}

/// Something waiting for a grace period before it is freed.
enum Retired {
    /// A trampoline block (munmapped when dropped).
    Block(#[allow(dead_code)] CodeBlock),
    /// The stubs of an unloaded object (munmapped when dropped).
    Stubs(#[allow(dead_code)] CodeBlock, #[allow(dead_code)] DataBlock),
    /// An unregistered op's data; its id becomes reusable.
    Op { id: usize, boxed: *mut OpBox },
}

// SAFETY: as OpInfo.
unsafe impl Send for Retired {}

/// The graph code the graph return block was made with, and the block.
struct GraphCode {
    entry: EmitFn,
    exit: EmitFn,
    shadow: tramp::ShadowOffsets,
    /// Starts with the thunk graph trampolines jump to; never freed.
    block: CodeBlock,
}

struct Inner {
    table: SiteTable,
    sites: Vec<SiteInfo>,
    by_addr: HashMap<usize, u32>,
    ops: Vec<Option<OpInfo>>,
    /// Op ids retired but not yet reusable.
    ids_pending: u64,
    next_id: usize,
    /// Trampoline blocks; a retired block's index is reused.
    blocks: Vec<Option<TrampBlock>>,
    /// Stub blocks; those of unloaded objects become `None`.
    stub_blocks: Vec<Option<StubBlock>>,
    /// Where threads' quiescence counts are (`arch::tramp::Counter`).
    counter: tramp::Counter,
    routines: Option<Routines>,
    /// Trampoline code was written since cores were last synced.
    fresh_code: bool,
    return_block: Option<CodeBlock>,
    retired: Vec<Retired>,
    grace_enabled: bool,
    /// Whether a stop-machine batch also prepares every other gcc pad
    /// ([`Tracer::set_prepare_pads`]).
    prepare_pads: bool,
    avx: bool,
    /// Unwinder hooks, installed once an op wants exits.
    unwind: Option<unwind::UnwindHooks>,
    /// The graph code whose exits the graph return block runs inline (the
    /// first op with graph code registered), and that block: never freed,
    /// like the plain return block.
    graph_code: Option<GraphCode>,
    /// Whether count and graph trampolines may be used (a test and
    /// benchmark switch: off, every site calls its op through the hot path).
    inline_recording: bool,
}

/// The process's tracer.
pub struct Tracer {
    inner: Mutex<Inner>,
    /// Serialises reclaim steps (background and explicit).
    reclaiming: Mutex<()>,
    /// Pid whose reclaimer thread runs (it does not survive fork).
    reclaimer_pid: std::sync::atomic::AtomicI32,
}

/// How long the background reclaimer waits for one grace period.
const PATIENCE: Duration = Duration::from_millis(500);

impl Tracer {
    /// The tracer of this process (sites are found on first use).
    pub fn global() -> &'static Tracer {
        static T: OnceLock<Tracer> = OnceLock::new();
        T.get_or_init(|| {
            let mut key: libc::pthread_key_t = 0;
            // SAFETY: creating keys with valid destructors; registering a
            // fork handler that only touches this thread's state.
            unsafe {
                if libc::pthread_key_create(&mut key, Some(hot::thread_exit)) == 0 {
                    hot::REGISTRY_KEY.store(key as usize, Ordering::Relaxed);
                }
                if libc::pthread_key_create(&mut key, Some(hot::drop_shadow)) == 0 {
                    hot::SHADOW_KEY.store(key as usize, Ordering::Relaxed);
                }
                libc::pthread_atfork(None, None, Some(hot::after_fork_child));
                hot::PROCESS.store(libc::getpid(), Ordering::Relaxed);
            }
            // Stubs raise the count in place when it is in static TLS; a
            // test switch makes them call the helpers, as with dynamic TLS.
            let dynamic = std::env::var_os("TEXTPOKE_TEST_DYNAMIC_TLS").is_some_and(|v| v == "1");
            let counter = match hot::count_offset() {
                Some(off) if !dynamic => tramp::Counter::Tls(off),
                _ => tramp::Counter::Calls,
            };
            let mut inner = Inner {
                table: SiteTable::new(),
                sites: Vec::new(),
                by_addr: HashMap::new(),
                ops: (0..MAX_OPS).map(|_| None).collect(),
                ids_pending: 0,
                next_id: 0,
                blocks: Vec::new(),
                stub_blocks: Vec::new(),
                counter,
                routines: None,
                fresh_code: false,
                return_block: None,
                retired: Vec::new(),
                grace_enabled: true,
                prepare_pads: false,
                avx: tramp::has_avx(),
                graph_code: None,
                inline_recording: true,
                unwind: None,
            };
            inner.refresh();
            Tracer { inner: Mutex::new(inner), reclaiming: Mutex::new(()), reclaimer_pid: 0.into() }
        })
    }

    /// Starts the background reclaimer of this process if needed.
    fn wake_reclaimer(&'static self) {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        if self.reclaimer_pid.swap(pid, Ordering::AcqRel) == pid {
            return;
        }
        let spawned = std::thread::Builder::new().name("textpoke-reclaim".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(5));
            let pending = self.inner.lock().unwrap_or_else(|e| e.into_inner()).retired.len();
            if pending > 0 {
                let _ = self.reclaim_step(PATIENCE);
            }
        });
        if spawned.is_err() {
            self.reclaimer_pid.store(0, Ordering::Release); // try again next time
        }
    }

    /// One grace period over everything retired now; frees it if it ends
    /// within `patience`. Returns how many items were freed.
    fn reclaim_step(&self, patience: Duration) -> Result<usize, TraceError> {
        let _one = self.reclaiming.lock().unwrap_or_else(|e| e.into_inner());
        let (n, grace) = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            (g.retired.len(), g.grace_enabled)
        };
        // Everything counted in `n` was unpublished before the grace period.
        if n == 0 || (grace && !grace::wait(patience)?) {
            return Ok(0);
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let items: Vec<Retired> = g.retired.drain(..n).collect();
        g.free(items);
        Ok(n)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, TraceError> {
        if hot::in_tracer() != 0 {
            return Err(TraceError::InCallback);
        }
        Ok(self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Rescans loaded objects: sites of new objects (dlopen) join and get
    /// the ops whose filters match; sites of unloaded ones are forgotten.
    pub fn refresh(&'static self) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        g.refresh();
        let r = g.apply(Vec::new());
        self.after_change(g);
        r
    }

    /// Frees at once without grace period (test switch), or hands retired
    /// items to the reclaimer.
    fn after_change(&'static self, mut g: std::sync::MutexGuard<'_, Inner>) {
        if g.retired.is_empty() {
            return;
        }
        if !g.grace_enabled {
            let items = std::mem::take(&mut g.retired);
            g.free(items);
            return;
        }
        drop(g);
        self.wake_reclaimer();
    }

    /// Every traceable function found.
    pub fn functions(&self) -> Vec<FunctionInfo> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sites.iter().enumerate().filter(|(_, s)| s.alive).map(|(i, _)| g.info(i)).collect()
    }

    /// The function of site `site`.
    pub fn function(&self, site: u32) -> Option<FunctionInfo> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.sites.get(site as usize)?.alive).then(|| g.info(site as usize))
    }

    /// The site patched at `addr`.
    pub fn site_at(&self, addr: usize) -> Option<u32> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).by_addr.get(&addr).copied()
    }

    /// Registers an op tracing the functions `filter` matches.
    pub fn register(&'static self, op: Arc<dyn TraceOp>, filter: Filter) -> Result<OpHandle, TraceError> {
        let mut g = self.lock()?;
        if g.free_id_peek().is_none() && g.ids_pending != 0 {
            // Every free id still waits for its grace period: wait for one
            // here rather than fail.
            drop(g);
            self.reclaim_step(Duration::from_secs(5))?;
            g = self.lock()?;
        }
        let id = g.free_id().ok_or(TraceError::TooManyOps)?;
        if op.wants_exit() {
            g.ensure_return_trampoline()?;
        }
        if let Some(InlineCode::Graph { entry, exit }) = op.inline() {
            g.ensure_graph_block(entry, exit)?;
        }
        let (wants_exit, wants_time) = (op.wants_exit(), op.wants_time());
        let boxed = Box::into_raw(Box::new(OpBox { wants_exit, op }));
        OPS[id].store(boxed, Ordering::Release); // before any site can call it
        if wants_exit {
            hot::EXIT_OPS.fetch_or(1 << id, Ordering::Release);
        }
        if wants_time {
            hot::TIME_OPS.fetch_or(1 << id, Ordering::Release);
        }
        g.ops[id] = Some(OpInfo { filter, boxed });
        // SAFETY: just boxed above, alive while registered.
        unsafe { &(*boxed).op }.functions_added(0..crate::funcs::count() as u32);
        g.update_fast_exit();
        if let Err(e) = g.apply(Vec::new()) {
            g.ops[id] = None;
            g.update_fast_exit();
            OPS[id].store(std::ptr::null_mut(), Ordering::Release);
            hot::EXIT_OPS.fetch_and(!(1 << id), Ordering::Release);
            hot::TIME_OPS.fetch_and(!(1 << id), Ordering::Release);
            g.ids_pending |= 1 << id;
            g.forget_op_trampolines(id);
            g.retire(vec![Retired::Op { id, boxed }]);
            self.after_change(g);
            return Err(e);
        }
        self.after_change(g);
        Ok(OpHandle(id))
    }

    /// Changes what an op traces; only sites whose op set changes are patched.
    pub fn set_filter(&'static self, h: &OpHandle, filter: Filter) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        let info = g.ops[h.0].as_mut().ok_or(TraceError::UnknownOp(h.0))?;
        let old = std::mem::replace(&mut info.filter, filter);
        let r = g.apply(Vec::new());
        if r.is_err() {
            g.ops[h.0].as_mut().expect("still registered").filter = old;
        }
        self.after_change(g);
        r
    }

    /// Unregisters an op: its sites are unpatched (or keep other ops), and
    /// its trampolines and data are freed after a grace period.
    pub fn unregister(&'static self, h: OpHandle) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        let info = g.ops[h.0].take().ok_or(TraceError::UnknownOp(h.0))?;
        OPS[h.0].store(std::ptr::null_mut(), Ordering::Release); // no new callbacks
        hot::EXIT_OPS.fetch_and(!(1 << h.0), Ordering::Release);
        hot::TIME_OPS.fetch_and(!(1 << h.0), Ordering::Release);
        g.update_fast_exit();
        let retire = vec![Retired::Op { id: h.0, boxed: info.boxed }];
        g.ids_pending |= 1 << h.0;
        let r = g.apply(retire);
        // Its count and graph trampolines hold its code: the next op with
        // its id gets new ones (the old go with their blocks).
        g.forget_op_trampolines(h.0);
        self.after_change(g);
        r
    }

    /// Waits up to `patience` for a grace period and frees what was
    /// retired before the call. Returns how many items were freed.
    pub fn reclaim(&self, patience: Duration) -> Result<usize, TraceError> {
        if hot::in_tracer() != 0 {
            return Err(TraceError::InCallback);
        }
        self.reclaim_step(patience)
    }

    /// Items retired and not yet freed.
    pub fn retired(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).retired.len()
    }

    /// Whether a batch that parks every thread anyway (stop-machine: a gcc
    /// pad of five one-byte NOPs gets its branch) also turns every other
    /// pad into one 5-byte NOP, so that tracing those later takes the
    /// breakpoint protocol and sends no signal (a thread waiting in
    /// `nanosleep` or `poll` would get `EINTR`). Off by default: functions
    /// never traced keep their bytes. The agent turns it on (it starts
    /// before the program's threads, and owns the process's tracing).
    pub fn set_prepare_pads(&self, on: bool) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).prepare_pads = on;
    }

    /// Test-only switch: free retired memory at once, without a grace
    /// period — shows what the grace period prevents.
    #[doc(hidden)]
    pub fn set_grace_period_for_tests(&self, enabled: bool) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).grace_enabled = enabled;
    }

    /// Test-only switch: run grace periods as on a kernel without
    /// `membarrier(PRIVATE_EXPEDITED)` (see [`grace`], "Without
    /// membarrier").
    #[doc(hidden)]
    pub fn set_grace_fallback_for_tests(&self, on: bool) {
        grace::force_fallback_for_tests(on);
    }

    /// How threads' quiescence counts are kept: `"tls"` (stubs raise them
    /// in place) or `"calls"` (dynamic TLS: stubs call helpers).
    #[doc(hidden)]
    pub fn counter_mode(&self) -> &'static str {
        match self.inner.lock().unwrap_or_else(|e| e.into_inner()).counter {
            tramp::Counter::Tls(_) => "tls",
            tramp::Counter::Calls => "calls",
        }
    }

    /// Test and benchmark switch: whether ops that count or record the
    /// function graph get the inline count and graph trampolines (default)
    /// or are called through the hot path like any op. Takes effect for
    /// ops registered afterwards.
    #[doc(hidden)]
    pub fn set_inline_recording(&self, enabled: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.inline_recording = enabled;
        g.update_fast_exit();
    }

    /// Exits lost (frames skipped by longjmp or unwinding, or restored).
    pub fn lost_exits(&self) -> u64 {
        hot::LOST_EXITS.load(Ordering::Relaxed)
    }
}

/// What a traced site becomes: a call to its stub, or for a graph
/// trampoline a jump (its stub and trampoline call the function instead,
/// see `tramp::graph_trampoline`).
fn site_branch(site: usize, target: Target, stub: usize) -> [u8; 5] {
    let b = match target {
        Target::Graph(_) => arch::encode_jmp(site, stub),
        _ => arch::encode_call(site, stub),
    };
    b.expect("stub in reach")
}

impl Inner {
    fn info(&self, i: usize) -> FunctionInfo {
        let s = &self.sites[i];
        let trampoline = match s.target {
            Target::Off => TrampolineKind::None,
            Target::Direct(_) => TrampolineKind::Direct,
            Target::List => TrampolineKind::List,
            Target::Count(_) => TrampolineKind::Count,
            Target::Graph(_) => TrampolineKind::Graph,
        };
        FunctionInfo {
            site: i as u32,
            function: s.function.clone(),
            addr: s.addr,
            place: s.place,
            ops: s.mask,
            trampoline,
        }
    }

    /// The inline code of op `op`, if it is registered and inline code
    /// is allowed.
    fn inline_code(&self, op: usize) -> Option<InlineCode> {
        // SAFETY: `boxed` stays valid while the op is registered.
        let o = unsafe { &(*self.ops[op].as_ref()?.boxed).op };
        // Count and graph stubs raise the count in place (static TLS).
        let tls = matches!(self.counter, tramp::Counter::Tls(_));
        (self.inline_recording && tls).then(|| o.inline()).flatten()
    }

    /// Op `op`'s count code, if it may use the count trampoline.
    fn count_code(&self, op: usize) -> Option<EmitFn> {
        match self.inline_code(op)? {
            InlineCode::Count { count } => Some(count),
            InlineCode::Graph { .. } => None,
        }
    }

    /// Op `op`'s entry code, if it may use graph trampolines (its exits
    /// are then handled inline by the graph return block).
    fn graph_entry_code(&self, op: usize) -> Option<EmitFn> {
        let InlineCode::Graph { entry, exit } = self.inline_code(op)? else { return None };
        // SAFETY: `boxed` stays valid while the op is registered.
        let o = unsafe { &(*self.ops[op].as_ref()?.boxed).op };
        // The same code (two functions merged by the linker would be the
        // same code too).
        let same = self
            .graph_code
            .as_ref()
            .is_some_and(|g| std::ptr::fn_addr_eq(g.exit, exit) && std::ptr::fn_addr_eq(g.entry, entry));
        (same && o.wants_exit() && !o.wants_time()).then_some(entry)
    }

    /// Whether op `op` may use graph trampolines.
    fn records_graph(&self, op: usize) -> bool {
        self.graph_entry_code(op).is_some()
    }

    /// Publishes [`hot::FAST_EXIT`]: the bit of the one registered op whose
    /// exits the return trampoline records itself, or 0.
    fn update_fast_exit(&self) {
        let mut graph = (0..MAX_OPS).filter(|&id| self.records_graph(id));
        let bit = match (graph.next(), graph.next()) {
            (Some(id), None) => 1u64 << id,
            _ => 0,
        };
        hot::FAST_EXIT.store(bit, Ordering::Release);
    }

    fn free_id_peek(&self) -> Option<usize> {
        (0..MAX_OPS).find(|&i| self.ops[i].is_none() && self.ids_pending & (1 << i) == 0)
    }

    fn free_id(&mut self) -> Option<usize> {
        (0..MAX_OPS)
            .map(|k| (self.next_id + k) % MAX_OPS)
            .find(|&i| self.ops[i].is_none() && self.ids_pending & (1 << i) == 0)
            .inspect(|&i| self.next_id = i + 1)
    }

    fn refresh(&mut self) {
        let before = crate::funcs::count() as u32;
        self.scan_objects();
        let after = crate::funcs::count() as u32;
        if after > before {
            for o in self.ops.iter().flatten() {
                // SAFETY: `boxed` stays valid while the op is registered.
                unsafe { &(*o.boxed).op }.functions_added(before..after);
            }
        }
    }

    /// Forgets the sites of unloaded objects and adds those of new ones.
    fn scan_objects(&mut self) {
        let changes = self.table.rescan();
        if let Some(h) = self.unwind.as_mut() {
            h.install(); // objects loaded since import the unwinder too
        }
        for gone in &changes.removed {
            for s in self.sites.iter_mut().filter(|s| s.alive && s.object == gone.id) {
                s.alive = false; // its code is gone; its stub is retired by apply
                self.by_addr.remove(&s.addr);
            }
        }
        for id in &changes.added {
            // The sites move here: the table keeps what else the scan found.
            let Some(sites) = self.table.take_sites(*id) else { continue };
            self.sites.reserve(sites.len());
            self.by_addr.reserve(sites.len());
            let mut funcs = crate::funcs::registrar();
            funcs.reserve(sites.len());
            for site in sites {
                if self.by_addr.contains_key(&site.nop_addr) || self.sites.len() >= hot::MAX_SITES {
                    continue;
                }
                // A #[traced] function's sites (entry and exit points, in every
                // monomorphization and inlined copy) share its descriptor: it
                // pairs exits with entries and names the function once.
                let (place, identity) = match &site.kind {
                    SiteKind::Marked(m) if m.point == MarkedPoint::Entry => (SitePlace::BodyEntry, m.descriptor),
                    SiteKind::Marked(m) => (SitePlace::BodyExit, m.descriptor),
                    _ => (SitePlace::FunctionEntry, site.entry),
                };
                let function: Arc<str> = Arc::from(site.function);
                let i = self.sites.len() as u32;
                let slot = hot::ensure_site(i);
                slot.mask.store(0, Ordering::Relaxed);
                let func = funcs.register(identity, &function);
                slot.func.store(func.0, Ordering::Relaxed);
                slot.pair.store(identity, Ordering::Relaxed);
                slot.place.store(place as u8, Ordering::Relaxed);
                self.by_addr.insert(site.nop_addr, i);
                self.sites.push(SiteInfo {
                    addr: site.nop_addr,
                    function,
                    object: site.object,
                    place,
                    prepared: matches!(site.nop_form, NopForm::Single),
                    mask: 0,
                    target: Target::Off,
                    stubs: [None; 3],
                    alive: true,
                });
            }
        }
    }

    /// The registered ops, as [`Inner::desired_mask`] needs them: (id,
    /// filter, wants exits).
    fn live_ops(&self) -> Vec<(usize, &Filter, bool)> {
        let ops = self.ops.iter().enumerate();
        // SAFETY: `boxed` stays valid while the op is registered.
        ops.filter_map(|(id, op)| op.as_ref().map(|o| (id, &o.filter, unsafe { (*o.boxed).wants_exit }))).collect()
    }

    fn desired_mask(s: &SiteInfo, ops: &[(usize, &Filter, bool)]) -> u64 {
        if !s.alive {
            return 0;
        }
        let mut m = 0;
        for &(id, filter, wants_exit) in ops {
            // An exit site only matters to ops that want exits.
            let wants = s.place != SitePlace::BodyExit || wants_exit;
            if wants && filter.matches(&s.function) {
                m |= 1 << id;
            }
        }
        m
    }

    fn ensure_return_trampoline(&mut self) -> Result<(), TraceError> {
        if self.return_block.is_some() {
            return Ok(());
        }
        let here = Self::ensure_return_trampoline as *const () as usize;
        let block =
            CodeBlock::near(here, here, 4096).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        let code = tramp::return_block(block.addr(), hot::on_return as *const () as usize, self.avx, None)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        block.write(0, &code).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        // Exceptions must unwind through replaced return addresses.
        let mut hooks = unwind::UnwindHooks::default();
        hooks.install();
        self.unwind = Some(hooks);
        hot::RETURN_TRAMPOLINE.store(block.addr() + tramp::RETURN_OFFSET, Ordering::Release);
        self.return_block = Some(block); // never freed: shadow stacks point into it
        Ok(())
    }

    /// Makes the graph return block for the first graph code registered:
    /// a return trampoline whose fast path runs `exit`, preceded by the
    /// thunk graph trampolines jump to. Nothing if the shadow stack's
    /// layout is not known (its thread-local is not in static TLS) or a
    /// block exists already (for other code, the op is then called).
    fn ensure_graph_block(&mut self, entry: EmitFn, exit: EmitFn) -> Result<(), TraceError> {
        let Some(sh) = hot::shadow_offsets() else { return Ok(()) };
        if self.graph_code.is_some() {
            return Ok(());
        }
        let here = Self::ensure_graph_block as *const () as usize;
        let block =
            CodeBlock::near(here, here, 4096).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        let fast: tramp::Emit<'_> = &exit;
        let code = tramp::return_block(block.addr(), hot::on_return as *const () as usize, self.avx, Some((&sh, fast)))
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        block.write(0, &code).map_err(|source| TraceError::TrampolineMemory { near: here, source })?;
        // Its return trampoline handles any shadow entry (the fast path
        // checks the entry's op, else calls the handler): the hot path's
        // entries return through it too from now on, so that a call the
        // graph trampoline handed to the hot path (the thread's first, a
        // segment change) still returns inline. The plain block stays for
        // the entries made before.
        hot::RETURN_TRAMPOLINE.store(block.addr() + tramp::RETURN_OFFSET, Ordering::Release);
        self.graph_code = Some(GraphCode { entry, exit, shadow: sh, block });
        Ok(())
    }

    /// Bump-allocates `len` bytes of code in block `b`.
    fn alloc_in(&mut self, b: usize, len: usize) -> Option<usize> {
        let blk = self.blocks[b].as_mut()?;
        let off = blk.used.next_multiple_of(16);
        (off + len <= blk.code.len()).then(|| {
            blk.used = off + len;
            blk.code.addr() + off
        })
    }

    /// A new trampoline block; its index (a retired block's is reused).
    fn new_block(&mut self) -> Result<usize, TraceError> {
        // Near the graph return block, whose thunk graph trampolines jump to
        // (rel32; iced makes it an indirect jump when out of reach), else
        // near the tracer's code.
        let near = match &self.graph_code {
            Some(g) => g.block.addr(),
            None => Self::new_block as *const () as usize,
        };
        let code =
            CodeBlock::near(near, near, BLOCK_BYTES).map_err(|source| TraceError::TrampolineMemory { near, source })?;
        let blk = TrampBlock {
            code,
            used: 0,
            list: [None; 2],
            direct: [[None; MAX_OPS]; 2],
            count: [None; MAX_OPS],
            graph: [None; MAX_OPS],
            users: 0,
        };
        match self.blocks.iter().position(Option::is_none) {
            Some(b) => {
                self.blocks[b] = Some(blk);
                Ok(b)
            }
            None => {
                self.blocks.push(Some(blk));
                Ok(self.blocks.len() - 1)
            }
        }
    }

    /// Writes `code` made for address `at` into block `b`.
    fn put_code(&mut self, b: usize, at: usize, code: &[u8]) -> Result<(), TraceError> {
        let cb = &self.blocks[b].as_ref().expect("live block").code;
        cb.write(at - cb.addr(), code).map_err(|source| TraceError::TrampolineMemory { near: at, source })?;
        self.fresh_code = true;
        Ok(())
    }

    /// Op `op`'s count trampoline in block `b` (and its slow path).
    fn count_trampoline_in(&mut self, b: usize, op: usize) -> Result<Option<usize>, TraceError> {
        if let Some(t) = self.blocks[b].as_ref().expect("live block").count[op] {
            return Ok(Some(t));
        }
        let count = self.count_code(op).expect("Target::Count only for an op with count code");
        let (Some(slow), Some(at)) = (self.alloc_in(b, 1024), self.alloc_in(b, 256)) else { return Ok(None) };
        let handler = hot::on_count_slow as *const () as usize;
        let code = tramp::entry_trampoline(slow, handler, op, self.avx, tramp::Live::Body)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, slow, &code)?;
        let emit: tramp::Emit<'_> = &count;
        let code = tramp::count_trampoline(at, emit, slow).map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, at, &code)?;
        self.blocks[b].as_mut().expect("live block").count[op] = Some(at);
        Ok(Some(at))
    }

    /// The graph trampoline of op `op` in block `b` (and its slow path,
    /// the op's direct trampoline for function entries).
    fn graph_trampoline_in(&mut self, b: usize, op: usize) -> Result<Option<usize>, TraceError> {
        if let Some(t) = self.blocks[b].as_ref().expect("live block").graph[op] {
            return Ok(Some(t));
        }
        let entry = self.graph_entry_code(op).expect("Target::Graph only for an op with graph code");
        let g = self.graph_code.as_ref().expect("graph code implies its block");
        let (sh, thunk) = (g.shadow, g.block.addr());
        let Some(slow) = self.trampoline_in(b, Target::Direct(op), SitePlace::FunctionEntry)? else { return Ok(None) };
        let Some(at) = self.alloc_in(b, GRAPH_TRAMP_BYTES) else { return Ok(None) };
        let emit: tramp::Emit<'_> = &entry;
        let code = tramp::graph_trampoline(at, &sh, op, (thunk, slow), emit)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, at, &code)?;
        self.blocks[b].as_mut().expect("live block").graph[op] = Some(at);
        Ok(Some(at))
    }

    /// The trampoline for `target` and sites at `place` in block `b`,
    /// generating it if needed; `None` if the block is full.
    fn trampoline_in(&mut self, b: usize, target: Target, place: SitePlace) -> Result<Option<usize>, TraceError> {
        match target {
            Target::Count(op) => return self.count_trampoline_in(b, op),
            Target::Graph(op) => return self.graph_trampoline_in(b, op),
            _ => {}
        }
        if let Some(t) = Self::cached(self.blocks[b].as_ref().expect("live block"), target, place) {
            return Ok(Some(t));
        }
        let (k, live) = match place {
            SitePlace::FunctionEntry => (0, tramp::Live::FunctionEntry),
            _ => (1, tramp::Live::Body),
        };
        let Some(at) = self.alloc_in(b, 1024) else { return Ok(None) };
        let (handler, ctx) = match target {
            Target::List => (hot::on_entry_list as *const () as usize, 0),
            Target::Direct(op) => (hot::on_entry_direct as *const () as usize, op),
            Target::Off | Target::Count(_) | Target::Graph(_) => unreachable!("handled above"),
        };
        let code = tramp::entry_trampoline(at, handler, ctx, self.avx, live)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        self.put_code(b, at, &code)?;
        let blk = self.blocks[b].as_mut().expect("live block");
        match target {
            Target::List => blk.list[k] = Some(at),
            Target::Direct(op) => blk.direct[k][op] = Some(at),
            Target::Off | Target::Count(_) | Target::Graph(_) => {}
        }
        Ok(Some(at))
    }

    /// The trampoline for `target` at `place` block `blk` has already.
    fn cached(blk: &TrampBlock, target: Target, place: SitePlace) -> Option<usize> {
        let k = if place == SitePlace::FunctionEntry { 0 } else { 1 };
        match target {
            Target::Off => None,
            Target::List => blk.list[k],
            Target::Direct(op) => blk.direct[k][op],
            Target::Count(op) => blk.count[op],
            Target::Graph(op) => blk.graph[op],
        }
    }

    /// The trampoline for `target` at `place`: an existing one, else new
    /// code in the newest block with room, else in a new block.
    fn trampoline_for(&mut self, target: Target, place: SitePlace) -> Result<(usize, usize), TraceError> {
        // A poisoned block's newest code may never have been written.
        let live = || {
            self.blocks
                .iter()
                .enumerate()
                .filter_map(|(b, x)| x.as_ref().filter(|x| !x.code.is_poisoned()).map(|x| (b, x)))
        };
        if let Some(found) = live().find_map(|(b, blk)| Self::cached(blk, target, place).map(|t| (b, t))) {
            return Ok(found);
        }
        let newest = live().map(|(b, _)| b).next_back();
        if let Some(b) = newest {
            if let Some(t) = self.trampoline_in(b, target, place)? {
                return Ok((b, t));
            }
        }
        let b = self.new_block()?;
        let t = self.trampoline_in(b, target, place)?.expect("a fresh block has room for any trampoline");
        Ok((b, t))
    }

    /// An op's count and graph trampolines hold its own code: forgotten
    /// when the op goes, so that the next op with its id gets its own.
    /// (The code stays until its block is retired; nothing points there.)
    fn forget_op_trampolines(&mut self, op: usize) {
        for blk in self.blocks.iter_mut().flatten() {
            blk.count[op] = None;
            blk.graph[op] = None;
        }
    }

    /// The never-freed routines stubs call (`arch::tramp::register_routine`
    /// and, for `Counter::Calls`, `leave_routine`), made once.
    fn routines(&mut self) -> Result<[usize; 3], TraceError> {
        if let Some(r) = &self.routines {
            return Ok(r.header);
        }
        let here = Self::routines as *const () as usize;
        let mem = |source| TraceError::TrampolineMemory { near: here, source };
        let gen = |e: crate::arch::asm::AsmError| TraceError::CodeGen(e.to_string());
        let code = CodeBlock::anywhere(4096).map_err(mem)?;
        let (call_at, graph_at, leave_at) = (code.addr(), code.addr() + 1024, code.addr() + 2048);
        let (call, graph, leave) = match self.counter {
            tramp::Counter::Tls(_) => {
                let handler = hot::stub_register as *const () as usize;
                (
                    tramp::register_routine(call_at, handler, self.avx, tramp::Skip::ToSite).map_err(gen)?,
                    tramp::register_routine(graph_at, handler, self.avx, tramp::Skip::ToResume).map_err(gen)?,
                    Vec::new(),
                )
            }
            tramp::Counter::Calls => {
                let (enter, leave) = (hot::stub_enter as *const () as usize, hot::stub_leave as *const () as usize);
                (
                    tramp::register_routine(call_at, enter, self.avx, tramp::Skip::ToSite).map_err(gen)?,
                    Vec::new(),
                    tramp::leave_routine(leave_at, leave, self.avx).map_err(gen)?,
                )
            }
        };
        assert!(call.len() <= 1024 && graph.len() <= 1024 && leave.len() <= 1024);
        code.write(0, &call).map_err(mem)?;
        code.write(1024, &graph).map_err(mem)?;
        code.write(2048, &leave).map_err(mem)?;
        let header = [call_at, graph_at, leave_at];
        self.routines = Some(Routines { header, _code: code });
        Ok(header)
    }

    /// A stub block for `object` within reach of site `addr`.
    fn new_stub_block(&mut self, addr: usize, object: ObjectId) -> Result<usize, TraceError> {
        let header = self.routines()?;
        let mem = |source| TraceError::TrampolineMemory { near: addr, source };
        let code = CodeBlock::near(addr, addr, STUBS_PER_BLOCK * tramp::STUB_CODE).map_err(mem)?;
        let data =
            DataBlock::near(code.addr(), code.addr() + code.len(), STUBS_PER_BLOCK * tramp::STUB_DATA).map_err(mem)?;
        let words = [(tramp::HDR_CALL, header[0]), (tramp::HDR_GRAPH, header[1]), (tramp::HDR_LEAVE, header[2])];
        for (off, value) in words {
            // SAFETY: the header slot of our fresh, writable data block, not
            // yet reachable by any thread.
            unsafe { ((data.addr() + off) as *mut usize).write(value) };
        }
        self.stub_blocks.push(Some(StubBlock { code, data, object, used: 1 }));
        Ok(self.stub_blocks.len() - 1)
    }

    /// Makes site `i`'s stub of `kind` (its word at the null path).
    fn new_stub(&mut self, i: usize, kind: StubKind) -> Result<Stub, TraceError> {
        let (addr, object) = (self.sites[i].addr, self.sites[i].object);
        let has_room = |sb: &StubBlock| {
            sb.object == object
                && !sb.code.is_poisoned()
                && sb.used < STUBS_PER_BLOCK
                && arch::encode_call(addr, sb.code.addr() + sb.used * tramp::STUB_CODE).is_some()
        };
        let sb = match self.stub_blocks.iter().position(|x| x.as_ref().is_some_and(has_room)) {
            Some(sb) => sb,
            None => self.new_stub_block(addr, object)?,
        };
        let blk = self.stub_blocks[sb].as_mut().expect("live stub block");
        let slot = blk.used;
        let (at, data, header) =
            (blk.code.addr() + slot * tramp::STUB_CODE, blk.data.addr() + slot * tramp::STUB_DATA, blk.data.addr());
        let slot_info = hot::site_slot(i as u32).expect("site slot");
        let func = slot_info.func.load(Ordering::Relaxed);
        let code = match (kind, self.counter) {
            (StubKind::Call, c) => tramp::call_stub(at, data, header, i as u32, c),
            (StubKind::Count, c) => tramp::call_stub(at, data, header, func, c),
            (StubKind::Graph, tramp::Counter::Tls(off)) => {
                tramp::graph_stub(at, data, header, off, (addr + arch::REL32_LEN, i as u32, func))
            }
            (StubKind::Graph, tramp::Counter::Calls) => unreachable!("graph targets need Counter::Tls"),
        };
        let code = code.ok_or(TraceError::CodeGen("stub data out of reach".into()))?;
        // SAFETY: a slot of our writable data block no thread can reach yet
        // (no site calls this stub before the batch that patches it, which
        // orders these stores before it).
        unsafe { std::ptr::copy_nonoverlapping(code.data.as_ptr(), data as *mut u8, tramp::STUB_DATA) };
        blk.code
            .write(slot * tramp::STUB_CODE, &code.code)
            .map_err(|source| TraceError::TrampolineMemory { near: at, source })?;
        blk.used += 1;
        Ok(Stub { code: at, word: data + code.word, null: code.null, block: None })
    }

    /// Makes sure site `i` has its stub for `target` and that `target`'s
    /// trampoline exists; where the stub's word must point.
    fn make_stub(&mut self, i: usize, target: Target) -> Result<Wire, TraceError> {
        let kind = target.stub_kind().expect("a target with a trampoline");
        let stub = match self.sites[i].stubs[kind as usize] {
            Some(s) => s,
            None => {
                let s = self.new_stub(i, kind)?;
                self.sites[i].stubs[kind as usize] = Some(s);
                s
            }
        };
        let (block, tramp) = self.trampoline_for(target, self.sites[i].place)?;
        Ok(Wire { block, tramp, stub: stub.code })
    }

    /// Points site `i`'s stub of `kind` at trampoline `to` (block, address),
    /// or at its null path; the block it leaves is retired if no word
    /// points into it any more.
    fn point_word(&mut self, i: usize, kind: StubKind, to: Option<(usize, usize)>) {
        let Some(stub) = self.sites[i].stubs[kind as usize].as_mut() else { return };
        let value = to.map_or(stub.null, |(_, t)| t);
        // SAFETY: the word is an aligned usize in a data block of ours that
        // lives as long as the stub.
        let word = unsafe { &*(stub.word as *const AtomicUsize) };
        // Release: the trampoline's code (written before, and synced) is
        // there before a thread can read its address; pairs with the
        // stub's load of the word (`call [word]`, an x86 load: acquire).
        word.store(value, Ordering::Release);
        let old = std::mem::replace(&mut stub.block, to.map(|(b, _)| b));
        if let Some((b, _)) = to {
            self.blocks[b].as_mut().expect("live block").users += 1;
        }
        if let Some(b) = old {
            let blk = self.blocks[b].as_mut().expect("live block");
            blk.users -= 1;
            if blk.users == 0 {
                let blk = self.blocks[b].take().expect("live block");
                self.retired.push(Retired::Block(blk.code));
            }
        }
    }

    /// The words of the stubs `changes` made point at new trampolines in
    /// step 1 (stubs their sites did not call yet) back at their null paths:
    /// the change failed. A straggler (a thread on the first instruction
    /// of such a stub since an earlier use) may have followed them, so the
    /// blocks they leave go through a grace period like any.
    fn unwire(&mut self, changes: impl Iterator<Item = (usize, Target)>) {
        for (i, target) in changes {
            let kind = target.stub_kind();
            if let Some(k) = kind.filter(|&k| Some(k) != self.sites[i].target.stub_kind()) {
                self.point_word(i, k, None);
            }
        }
    }

    fn site_bytes(&self, s: &SiteInfo) -> [u8; 5] {
        match s.target.stub_kind().and_then(|k| s.stubs[k as usize]) {
            Some(stub) => site_branch(s.addr, s.target, stub.code),
            None if s.prepared => NOP5,
            None => [0x90; 5],
        }
    }

    /// Brings every site to its desired op mask (see module docs).
    fn apply(&mut self, retire: Vec<Retired>) -> Result<(), TraceError> {
        struct Change {
            i: usize,
            mask: u64,
            target: Target,
            stub: Option<Wire>,
        }
        // Pin every object whose sites may be written, until the commit is
        // over: a dlclose on another thread cannot unmap code mid-batch. An
        // object that cannot be pinned is gone: forget its sites.
        let _pins = self.pin_objects();
        let mut changes = Vec::new();
        // What is the same for every site, once: the registered ops, and
        // which of them count or record the graph inline.
        let live = self.live_ops();
        let (mut counts, mut graphs) = (0u64, 0u64);
        for &(op, _, _) in &live {
            counts |= u64::from(self.count_code(op).is_some()) << op;
            graphs |= u64::from(self.records_graph(op)) << op;
        }
        let masks: Vec<u64> = self.sites.iter().map(|s| Self::desired_mask(s, &live)).collect();
        drop(live);
        changes.reserve(masks.iter().zip(&self.sites).filter(|(&m, s)| m != s.mask).count());
        for (i, mask) in masks.into_iter().enumerate() {
            let target = match mask.count_ones() {
                0 => Target::Off,
                1 => {
                    let op = mask.trailing_zeros() as usize;
                    if counts & mask != 0 {
                        Target::Count(op)
                    } else if self.sites[i].place == SitePlace::FunctionEntry && graphs & mask != 0 {
                        Target::Graph(op)
                    } else {
                        Target::Direct(op)
                    }
                }
                _ => Target::List,
            };
            let s = &self.sites[i];
            if mask == s.mask && target == s.target {
                continue;
            }
            if target == s.target && target == Target::List {
                // Same trampoline: publishing the mask is enough.
                self.sites[i].mask = mask;
                hot::site_slot(i as u32).expect("site slot").mask.store(mask, Ordering::Release);
                continue;
            }
            changes.push(Change { i, mask, target, stub: None });
        }
        if changes.is_empty() {
            self.retire(retire);
            return Ok(());
        }
        // 1. Stubs and trampolines for the new targets, their code written
        // together when the session finishes (nothing reaches it before).
        let writes = crate::text::codemem::WriteSession::open();
        let mut made = Ok(());
        for c in changes.iter_mut().filter(|c| c.target != Target::Off) {
            match self.make_stub(c.i, c.target) {
                Ok(w) => c.stub = Some(w),
                Err(e) => {
                    made = Err(e);
                    break;
                }
            }
        }
        if let Err(source) = writes.finish() {
            self.forget_unwritten_code();
            self.retire(retire);
            return Err(TraceError::TrampolineMemory { near: self.sites[changes[0].i].addr, source });
        }
        if let Err(e) = made {
            self.retire(retire);
            return Err(e);
        }
        if std::mem::take(&mut self.fresh_code) {
            // New trampoline code may be reached through a word without any
            // site being written (which would sync): serialise every core
            // first (cross-modifying code, as for a site).
            if let Err(e) = crate::sync::sync_cores(crate::sync::best_method()) {
                self.retire(retire);
                return Err(e.into());
            }
        }
        for c in &changes {
            // Stubs the sites do not call yet (stragglers aside) point at
            // their trampolines now; the others after the batch, in step 4.
            if let Some(w) = c.stub.filter(|_| c.target.stub_kind() != self.sites[c.i].target.stub_kind()) {
                self.point_word(c.i, c.target.stub_kind().expect("a stub kind"), Some((w.block, w.tramp)));
            }
        }
        // 2. Publish the masks, 3. one batch: by the breakpoint protocol,
        // or whole by stop-machine when a gcc pad (five 1-byte NOPs) gets
        // its branch (rule 1).
        let mut batch = Batch::with_capacity(changes.len());
        let mut split = false;
        for c in &changes {
            let s = &self.sites[c.i];
            if !s.alive {
                continue; // its object is gone: nothing to write
            }
            let old = self.site_bytes(s);
            let new = match c.stub {
                Some(w) => site_branch(s.addr, c.target, w.stub),
                None => NOP5,
            };
            if old == new {
                continue; // the site keeps its stub: its word changes in step 4
            }
            split |= !s.prepared;
            let poke = if s.prepared { Poke::new(s.addr, old, new) } else { Poke::region(s.addr, old, new) };
            batch.push(poke.named(s.function.clone()));
        }
        // Parked anyway: with `prepare_pads`, every other gcc pad becomes
        // one 5-byte NOP in the same batch, so that tracing it later needs
        // no stop-machine (and no signal: a thread waiting in `nanosleep`
        // would get EINTR).
        let padded = match split && self.prepare_pads {
            true => self.pads_to_prepare(&changes.iter().map(|c| c.i).collect::<Vec<_>>()),
            false => Vec::new(),
        };
        for &i in &padded {
            let s = &self.sites[i];
            batch.push(Poke::region(s.addr, [0x90; 5], NOP5).named(s.function.clone()));
        }
        for c in &changes {
            hot::site_slot(c.i as u32).expect("site slot").mask.store(c.mask, Ordering::Release);
        }
        let strategy = if split { Strategy::StopMachine } else { Strategy::Breakpoint };
        if let Err(e) = batch.commit_with(CommitOptions::strategy(strategy)) {
            for c in &changes {
                hot::site_slot(c.i as u32).expect("site slot").mask.store(self.sites[c.i].mask, Ordering::Release);
            }
            self.unwire(changes.iter().filter(|c| c.stub.is_some()).map(|c| (c.i, c.target)));
            self.retire(retire);
            return Err(e.into());
        }
        drop(batch);
        for i in padded {
            self.sites[i].prepared = true;
        }
        // 4. Point the words the sites keep at their new trampolines and
        // those they left at their null paths (unpublish); retire what no
        // word reaches any more.
        for c in &changes {
            let (old, new) = (self.sites[c.i].target.stub_kind(), c.target.stub_kind());
            match (old, c.stub) {
                (Some(k), Some(w)) if old == new => self.point_word(c.i, k, Some((w.block, w.tramp))),
                (Some(k), _) => self.point_word(c.i, k, None),
                (None, _) => {}
            }
            let s = &mut self.sites[c.i];
            s.prepared |= c.stub.is_some(); // a pad that was written is one instruction now
            s.mask = c.mask;
            s.target = c.target;
        }
        self.retire(retire);
        Ok(())
    }

    /// The live sites still in gcc's five-one-byte-NOP form that `changing`
    /// (site indexes, ascending) does not write.
    fn pads_to_prepare(&self, changing: &[usize]) -> Vec<usize> {
        let mut next = changing.iter().copied().peekable();
        let mut pads = Vec::new();
        for (i, s) in self.sites.iter().enumerate() {
            let changes = next.next_if_eq(&i).is_some();
            if !changes && s.alive && !s.prepared && s.target == Target::Off {
                pads.push(i);
            }
        }
        pads
    }

    /// Pins the objects that own live sites; marks the sites of objects
    /// that are gone as dead.
    fn pin_objects(&mut self) -> Vec<crate::sites::Pin> {
        let mut owners: Vec<ObjectId> = self.sites.iter().filter(|s| s.alive).map(|s| s.object).collect();
        owners.sort_unstable_by_key(|o| o.get());
        owners.dedup();
        let mut pins = Vec::with_capacity(owners.len());
        for id in owners {
            match self.table.objects().get(id).map(|o| o.pin()) {
                Some(Ok(pin)) => pins.push(pin),
                _ => {
                    for s in self.sites.iter_mut().filter(|s| s.alive && s.object == id) {
                        s.alive = false;
                        self.by_addr.remove(&s.addr);
                    }
                }
            }
        }
        pins
    }

    /// After a failed [`WriteSession`](crate::text::codemem::WriteSession):
    /// the code made in it may not be in its blocks. Stubs in a poisoned
    /// block that their site does not call are forgotten (a slot lost; one
    /// the site calls was written in an earlier change), and poisoned
    /// trampoline blocks no word points into are retired; new trampolines
    /// never go to a poisoned block (see `trampoline_for`).
    fn forget_unwritten_code(&mut self) {
        let poisoned: Vec<std::ops::Range<usize>> = self
            .stub_blocks
            .iter()
            .flatten()
            .filter(|sb| sb.code.is_poisoned())
            .map(|sb| sb.code.addr()..sb.code.addr() + sb.code.len())
            .collect();
        for s in self.sites.iter_mut() {
            let calls = s.target.stub_kind();
            for (k, stub) in s.stubs.iter_mut().enumerate() {
                let unwritten = stub.is_some_and(|st| poisoned.iter().any(|r| r.contains(&st.code)));
                if unwritten && calls.map(|c| c as usize) != Some(k) {
                    *stub = None;
                }
            }
        }
        for b in 0..self.blocks.len() {
            if self.blocks[b].as_ref().is_some_and(|blk| blk.code.is_poisoned() && blk.users == 0) {
                let blk = self.blocks[b].take().expect("live block");
                self.retired.push(Retired::Block(blk.code));
            }
        }
    }

    /// Retires the stub blocks of objects that are no longer loaded (their
    /// sites are dead and Off: step 4 pointed their words at the null
    /// paths).
    /// A thread can only be in such a stub if it ran the object's code
    /// after the object went, which the program does not do; one inside a
    /// stub past its raise is waited for like any.
    fn retire_stubs_of_unloaded_objects(&mut self) {
        if self.stub_blocks.iter().flatten().next().is_none() {
            return;
        }
        let loaded: std::collections::HashSet<ObjectId> =
            self.sites.iter().filter(|s| s.alive || s.target != Target::Off).map(|s| s.object).collect();
        let dead = |sb: &StubBlock| !loaded.contains(&sb.object);
        let gone: Vec<usize> =
            (0..self.stub_blocks.len()).filter(|&k| self.stub_blocks[k].as_ref().is_some_and(dead)).collect();
        for k in gone {
            let sb = self.stub_blocks[k].take().expect("live stub block");
            let range = sb.code.addr()..sb.code.addr() + sb.code.len();
            for s in self.sites.iter_mut().filter(|s| !s.alive) {
                for stub in s.stubs.iter_mut().filter(|x| x.is_some_and(|st| range.contains(&st.code))) {
                    debug_assert!(
                        stub.is_some_and(|st| st.block.is_none()),
                        "a dead site's word points at its null path"
                    );
                    *stub = None;
                }
            }
            self.retired.push(Retired::Stubs(sb.code, sb.data));
        }
    }

    fn retire(&mut self, items: Vec<Retired>) {
        self.retired.extend(items);
        self.retire_stubs_of_unloaded_objects();
    }

    /// Frees items whose grace period is over.
    fn free(&mut self, items: Vec<Retired>) {
        for r in items {
            match r {
                Retired::Op { id, boxed } => {
                    // SAFETY: created by Box::into_raw in register; after the
                    // grace period no thread can hold it.
                    drop(unsafe { Box::from_raw(boxed) });
                    self.ids_pending &= !(1 << id);
                }
                Retired::Block(code) => drop(code),               // munmap
                Retired::Stubs(code, data) => drop((code, data)), // munmap
            }
        }
    }
}
