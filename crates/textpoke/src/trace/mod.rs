//! The function tracer: ftrace and function_graph for user space.
//!
//! # Pieces
//!
//! - **Sites** come from [`crate::sites`]: patchable entries and mcount
//!   NOPs of every loaded object, each with its function's name. Each gets
//!   an index into a lock-free site table ([`hot`]) that trampolines read.
//! - **Ops** ([`TraceOp`]) are callbacks with a [`Filter`]; up to
//!   [`MAX_OPS`] at once. A site's ops are a bit mask.
//! - **Trampolines** live in blocks of executable memory mapped within
//!   ±2 GiB of the object whose sites they serve. A traced site calls its
//!   own 10-byte stub (`push index; jmp`), which jumps to the block's
//!   *direct* trampoline for the site's one op, or to its *list*
//!   trampoline when the site has several. Trampolines save every
//!   caller-saved register and call the hot path.
//! - **Inline code**: an op may bring code of its own for the tracer to
//!   run in its trampolines instead of calling it ([`InlineCode`]: the
//!   recorder does, `record::RecordOp`; the tracer knows nothing of what
//!   the code does). A site whose only op has such code gets a trampoline
//!   that runs it, with the hot path as its fallback: the *count*
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
//! 1. stubs (and trampolines they need) are written for the new targets;
//! 2. the new masks are published (Release);
//! 3. one batch turns every changed site into `call new stub` (`jmp` for
//!    a graph trampoline) or back into a NOP: by the breakpoint protocol,
//!    or, when a site still in gcc's five-one-byte-NOP form gets its
//!    branch, the whole batch by the stop-machine strategy, which writes
//!    the branch over the five NOPs at once with every other thread
//!    parked and none of them between two of the NOPs (rule 1: the only
//!    way to make one instruction of several). A pad written so is one
//!    instruction from then on, for the breakpoint protocol. One batch,
//!    not a stop-machine rewrite of the pads followed by a breakpoint
//!    batch: the threads are parked once and nothing is half done if it
//!    is refused. A program's first registration (the agent's, from a
//!    constructor: usually no thread but textpoke's own) parks at most
//!    those;
//! 4. the old stubs, emptied blocks and unregistered ops are retired and
//!    freed after a grace period ([`grace`]), by a background reclaimer
//!    thread: a grace period needs every thread to run once, which on a
//!    busy machine takes scheduler periods, and nobody should wait for it
//!    (as the kernel frees ftrace trampolines from an RCU-tasks callback).
//!    [`Tracer::reclaim`] waits for it explicitly.
//!
//! If the batch is refused (a site's bytes changed under us), nothing is
//! written and the masks and stubs are put back.

mod filter;
mod grace;
pub mod hot;
mod unwind;

pub use filter::{Filter, FilterError};

/// Waits up to `patience` until every other thread of the process has been
/// seen outside the code `ranges` and outside tracer callbacks (the
/// tracer's grace period, usable on its own like synchronize_rcu_tasks).
/// `Ok(false)` if some thread was not seen so in time.
pub fn wait_for_grace(ranges: &[(usize, usize)], patience: Duration) -> Result<bool, TraceError> {
    Ok(grace::wait(ranges, patience)?)
}
pub use hot::{
    now, slow_calls_of_this_thread, EmitFn, Entry, Exit, InlineCode, SitePlace, TraceOp, MAX_DEPTH, MAX_OPS,
};

use crate::arch::{self, tramp, NOP5};
use crate::error::PokeError;
use crate::sites::{MarkedPoint, NopForm, ObjectId, SiteKind, SiteTable};
use crate::text::codemem::CodeBlock;
use crate::{Batch, CommitOptions, Poke, Strategy};
use hot::{OpBox, OPS};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
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
    /// (block index, stub address) while the site calls a stub.
    stub: Option<(usize, usize)>,
    alive: bool,
}

struct TrampBlock {
    code: Option<CodeBlock>,
    object: ObjectId,
    used: usize,
    /// Trampolines for function-entry sites [0] and body sites [1].
    list: [Option<usize>; 2],
    direct: [[Option<usize>; MAX_OPS]; 2],
    /// Count trampolines, per op (each with its slow path).
    count: [Option<usize>; MAX_OPS],
    /// Graph trampolines, per op (their slow paths are `direct[0][op]`).
    graph: [Option<usize>; MAX_OPS],
    live_stubs: usize,
    free_stubs: Vec<usize>,
}

const BLOCK_BYTES: usize = 64 << 10;
/// Room for a graph trampoline.
const GRAPH_TRAMP_BYTES: usize = 512;
/// Room for one stub of either kind.
const STUB_SLOT: usize = 32;
const _: () = assert!(tramp::STUB_LEN <= STUB_SLOT && tramp::GRAPH_STUB_LEN <= STUB_SLOT);

struct OpInfo {
    filter: Filter,
    boxed: *mut OpBox,
}

// SAFETY: the raw OpBox pointer is owned by the tracer and only shared with
// the hot path through OPS.
unsafe impl Send for OpInfo {}

/// Something waiting for a grace period before it is freed.
struct Retired {
    /// Code no thread may be executing.
    ranges: Vec<(usize, usize)>,
    what: RetiredKind,
}

enum RetiredKind {
    /// A whole trampoline block (munmapped when dropped).
    Block(#[allow(dead_code)] CodeBlock),
    /// A stub slot, back to its block's free list.
    Stub { block: usize, addr: usize },
    /// An unregistered op's data; its id becomes reusable.
    Op { id: usize, boxed: *mut OpBox },
}

// SAFETY: as OpInfo.
unsafe impl Send for RetiredKind {}

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
    blocks: Vec<TrampBlock>,
    return_block: Option<CodeBlock>,
    retired: Vec<Retired>,
    grace_enabled: bool,
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
            // SAFETY: creating a key with a valid destructor.
            if unsafe { libc::pthread_key_create(&mut key, Some(hot::drop_shadow)) } == 0 {
                hot::SHADOW_KEY.store(key as usize, Ordering::Relaxed);
            }
            let mut inner = Inner {
                table: SiteTable::new(),
                sites: Vec::new(),
                by_addr: HashMap::new(),
                ops: (0..MAX_OPS).map(|_| None).collect(),
                ids_pending: 0,
                next_id: 0,
                blocks: Vec::new(),
                return_block: None,
                retired: Vec::new(),
                grace_enabled: true,
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
        let (ranges, n, grace) = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let ranges: Vec<(usize, usize)> = g.retired.iter().flat_map(|r| r.ranges.iter().copied()).collect();
            (ranges, g.retired.len(), g.grace_enabled)
        };
        if n == 0 || (grace && !grace::wait(&ranges, patience)?) {
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
            g.retire(vec![Retired { ranges: Vec::new(), what: RetiredKind::Op { id, boxed } }]);
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
        let retire = vec![Retired { ranges: Vec::new(), what: RetiredKind::Op { id: h.0, boxed: info.boxed } }];
        g.ids_pending |= 1 << h.0;
        let r = g.apply(retire);
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

    /// Test-only switch: free retired memory at once, without a grace
    /// period — shows what the grace period prevents.
    #[doc(hidden)]
    pub fn set_grace_period_for_tests(&self, enabled: bool) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).grace_enabled = enabled;
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
        self.inline_recording.then(|| o.inline()).flatten()
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
                    stub: None,
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
        let blk = &mut self.blocks[b];
        let code = blk.code.as_ref()?;
        let off = blk.used.next_multiple_of(16);
        (off + len <= code.len()).then(|| {
            blk.used = off + len;
            code.addr() + off
        })
    }

    fn new_block(&mut self, site: usize, object: ObjectId) -> Result<usize, TraceError> {
        let code = CodeBlock::near(site, site, BLOCK_BYTES)
            .map_err(|source| TraceError::TrampolineMemory { near: site, source })?;
        self.blocks.push(TrampBlock {
            code: Some(code),
            object,
            used: 0,
            list: [None; 2],
            direct: [[None; MAX_OPS]; 2],
            count: [None; MAX_OPS],
            graph: [None; MAX_OPS],
            live_stubs: 0,
            free_stubs: Vec::new(),
        });
        Ok(self.blocks.len() - 1)
    }

    /// Writes `code` made for address `at` into block `b`.
    fn put_code(&self, b: usize, at: usize, code: &[u8]) -> Result<(), TraceError> {
        let cb = self.blocks[b].code.as_ref().expect("live block");
        cb.write(at - cb.addr(), code).map_err(|source| TraceError::TrampolineMemory { near: at, source })
    }

    /// Op `op`'s count trampoline in block `b` (and its slow path).
    fn count_trampoline_in(&mut self, b: usize, op: usize) -> Result<Option<usize>, TraceError> {
        if let Some(t) = self.blocks[b].count[op] {
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
        self.blocks[b].count[op] = Some(at);
        Ok(Some(at))
    }

    /// The graph trampoline of op `op` in block `b` (and its slow path,
    /// the op's direct trampoline for function entries).
    fn graph_trampoline_in(&mut self, b: usize, op: usize) -> Result<Option<usize>, TraceError> {
        if let Some(t) = self.blocks[b].graph[op] {
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
        self.blocks[b].graph[op] = Some(at);
        Ok(Some(at))
    }

    /// The trampoline for `target` and sites at `place` in block `b`,
    /// generating it if needed.
    fn trampoline_in(&mut self, b: usize, target: Target, place: SitePlace) -> Result<Option<usize>, TraceError> {
        match target {
            Target::Count(op) => return self.count_trampoline_in(b, op),
            Target::Graph(op) => return self.graph_trampoline_in(b, op),
            _ => {}
        }
        let (k, live) = match place {
            SitePlace::FunctionEntry => (0, tramp::Live::FunctionEntry),
            _ => (1, tramp::Live::Body),
        };
        let existing = match target {
            Target::List => self.blocks[b].list[k],
            Target::Direct(op) => self.blocks[b].direct[k][op],
            Target::Off | Target::Count(_) | Target::Graph(_) => unreachable!("handled above"),
        };
        if existing.is_some() {
            return Ok(existing);
        }
        let Some(at) = self.alloc_in(b, 1024) else { return Ok(None) };
        let (handler, ctx) = match target {
            Target::List => (hot::on_entry_list as *const () as usize, 0),
            Target::Direct(op) => (hot::on_entry_direct as *const () as usize, op),
            Target::Off | Target::Count(_) | Target::Graph(_) => unreachable!(),
        };
        let code = tramp::entry_trampoline(at, handler, ctx, self.avx, live)
            .map_err(|e| TraceError::CodeGen(e.to_string()))?;
        let blk = &self.blocks[b];
        let code_block = blk.code.as_ref().expect("live block");
        code_block
            .write(at - code_block.addr(), &code)
            .map_err(|source| TraceError::TrampolineMemory { near: at, source })?;
        match target {
            Target::List => self.blocks[b].list[k] = Some(at),
            Target::Direct(op) => self.blocks[b].direct[k][op] = Some(at),
            Target::Off | Target::Count(_) | Target::Graph(_) => {}
        }
        Ok(Some(at))
    }

    /// Writes a stub for site `i` jumping to its `target` trampoline.
    fn make_stub(&mut self, i: usize, target: Target) -> Result<(usize, usize), TraceError> {
        let (addr, object, place) = (self.sites[i].addr, self.sites[i].object, self.sites[i].place);
        let candidates: Vec<usize> = (0..self.blocks.len())
            .filter(|&b| {
                let blk = &self.blocks[b];
                blk.object == object && blk.code.as_ref().is_some_and(|c| arch::encode_call(addr, c.addr()).is_some())
            })
            .collect();
        for b in candidates.into_iter().chain(std::iter::once(usize::MAX)) {
            let b = if b == usize::MAX { self.new_block(addr, object)? } else { b };
            let Some(tramp_at) = self.trampoline_in(b, target, place)? else { continue };
            let stub_at = match self.blocks[b].free_stubs.pop() {
                Some(s) => s,
                None => match self.alloc_in(b, STUB_SLOT) {
                    Some(s) => s,
                    None => continue,
                },
            };
            let stub = match target {
                Target::Graph(_) => {
                    let func = hot::site_slot(i as u32).expect("site slot").func.load(Ordering::Relaxed);
                    tramp::graph_stub(stub_at, addr + arch::REL32_LEN, i as u32, func, tramp_at).map(|s| s.to_vec())
                }
                _ => tramp::stub(stub_at, i as u32, tramp_at).map(|s| s.to_vec()),
            };
            let stub = stub.ok_or(TraceError::CodeGen("stub out of reach".into()))?;
            let code = self.blocks[b].code.as_ref().expect("live block");
            code.write(stub_at - code.addr(), &stub)
                .map_err(|source| TraceError::TrampolineMemory { near: stub_at, source })?;
            self.blocks[b].live_stubs += 1;
            return Ok((b, stub_at));
        }
        unreachable!("a fresh block always has room")
    }

    fn site_bytes(&self, s: &SiteInfo) -> [u8; 5] {
        match s.stub {
            Some((_, stub)) => site_branch(s.addr, s.target, stub),
            None if s.prepared => NOP5,
            None => [0x90; 5],
        }
    }

    /// Brings every site to its desired op mask (see module docs).
    fn apply(&mut self, mut retire: Vec<Retired>) -> Result<(), TraceError> {
        struct Change {
            i: usize,
            mask: u64,
            target: Target,
            stub: Option<(usize, usize)>,
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
        // 1. Stubs for the new targets, written together when the session
        // finishes (nothing reaches them before the batch).
        let writes = crate::text::codemem::WriteSession::open();
        for c in changes.iter_mut() {
            if c.target != Target::Off {
                c.stub = Some(self.make_stub(c.i, c.target)?);
            }
        }
        if let Err(source) = writes.finish() {
            self.drop_new_stubs(changes.iter().filter_map(|c| c.stub));
            return Err(TraceError::TrampolineMemory { near: self.sites[changes[0].i].addr, source });
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
                Some((_, stub)) => site_branch(s.addr, c.target, stub),
                None => NOP5,
            };
            split |= !s.prepared;
            let poke = if s.prepared { Poke::new(s.addr, old, new) } else { Poke::region(s.addr, old, new) };
            batch.push(poke.named(s.function.clone()));
        }
        for c in &changes {
            hot::site_slot(c.i as u32).expect("site slot").mask.store(c.mask, Ordering::Release);
        }
        let strategy = if split { Strategy::StopMachine } else { Strategy::Breakpoint };
        if let Err(e) = batch.commit_with(CommitOptions::strategy(strategy)) {
            for c in &changes {
                hot::site_slot(c.i as u32).expect("site slot").mask.store(self.sites[c.i].mask, Ordering::Release);
            }
            self.drop_new_stubs(changes.iter().filter_map(|c| c.stub));
            return Err(e.into());
        }
        drop(batch);
        // 4. Retire what the sites no longer use.
        for c in &changes {
            let s = &mut self.sites[c.i];
            if let Some((b, addr)) = s.stub.take() {
                let mut ranges = vec![(addr, addr + STUB_SLOT)];
                if let Target::Graph(op) = s.target {
                    // A graph trampoline reads its stub's data (through
                    // r11) until it jumps on: a thread still in it must
                    // not find the slot reused by another site.
                    let t = self.blocks[b].graph[op].expect("the site's graph trampoline");
                    ranges.push((t, t + GRAPH_TRAMP_BYTES));
                }
                retire.push(Retired { ranges, what: RetiredKind::Stub { block: b, addr } });
            }
            s.prepared |= c.stub.is_some(); // a pad that was written is one instruction now
            s.stub = c.stub;
            s.mask = c.mask;
            s.target = c.target;
        }
        self.retire(retire);
        Ok(())
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

    /// Undoes `make_stub` for stubs no site was patched to call: they were
    /// never reachable, so they go back to their blocks at once.
    fn drop_new_stubs(&mut self, stubs: impl Iterator<Item = (usize, usize)>) {
        for (b, addr) in stubs {
            self.blocks[b].live_stubs -= 1;
            self.blocks[b].free_stubs.push(addr);
        }
    }

    fn retire(&mut self, mut items: Vec<Retired>) {
        // A block whose last stub went is retired whole, trampolines and all.
        let mut emptied = Vec::new();
        for r in &items {
            if let RetiredKind::Stub { block, .. } = r.what {
                let blk = &mut self.blocks[block];
                blk.live_stubs -= 1;
                if blk.live_stubs == 0 {
                    emptied.push(block);
                }
            }
        }
        for b in emptied {
            if let Some(code) = self.blocks[b].code.take() {
                let range = (code.addr(), code.addr() + code.len());
                items.push(Retired { ranges: vec![range], what: RetiredKind::Block(code) });
            }
        }
        self.retired.extend(items);
    }

    /// Frees items whose grace period is over.
    fn free(&mut self, items: Vec<Retired>) {
        for r in items {
            match r.what {
                RetiredKind::Stub { block, addr } => {
                    if self.blocks[block].code.is_some() {
                        self.blocks[block].free_stubs.push(addr);
                    }
                }
                RetiredKind::Op { id, boxed } => {
                    // SAFETY: created by Box::into_raw in register; after the
                    // grace period no thread can hold it.
                    drop(unsafe { Box::from_raw(boxed) });
                    self.ids_pending &= !(1 << id);
                }
                RetiredKind::Block(code) => drop(code), // munmap
            }
        }
    }
}
