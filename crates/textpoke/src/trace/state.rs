//! The tracer's state: its sites (where each is, what it calls now, its
//! stubs) and its ops (their filters, ids, and which inline code each may
//! use), and how a rescan of the loaded objects updates them.

use super::hot::{self, InlineCode, OpBox, SitePlace, MAX_OPS};
use super::reclaim::Retired;
use super::tramp_alloc::{GraphCode, Routines, StubBlock, TrampBlock};
use super::{unwind, EmitFn, Filter, FunctionInfo, TrampolineKind};
use crate::arch::{self, tramp, SiteInsn};
use crate::sites::{MarkedPoint, NopForm, ObjectId, SiteKind, SiteTable};
use crate::text::codemem::CodeBlock;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Off,
    Direct(usize),
    List,
    /// A count-only op alone: the count trampoline, no callback.
    Count(usize),
    /// A graph-recording op alone at a function entry: the graph
    /// trampoline, which records entry and exit without a callback.
    Graph(usize),
}

pub(super) struct SiteInfo {
    pub(super) addr: usize,
    pub(super) function: Arc<str>,
    pub(super) object: ObjectId,
    pub(super) place: SitePlace,
    /// Is the site one 5-byte NOP (or a call)? A gcc pad is not: it is
    /// rewritten once by stop-machine, or enabled by its first byte
    /// (`mirror.rs`), which leaves it unprepared.
    pub(super) prepared: bool,
    /// The bytes of the site when it is off and prepared: its own NOP
    /// when the compiler left one instruction (gcc's `0f 1f 44 00 00`,
    /// clang's `0f 1f 44 00 08`), written back exactly; [`arch::SITE_NOP`]
    /// for a gcc pad once rewritten.
    pub(super) nop: SiteInsn,
    pub(super) mask: u64,
    pub(super) target: Target,
    /// The site's stubs by kind ([`StubKind`]), made on first need and
    /// kept: never freed or given to another site while its object is
    /// loaded (a thread may sit on a stub's first instruction for as long
    /// as the scheduler likes).
    pub(super) stubs: [Option<Stub>; 3],
    pub(super) alive: bool,
    /// Claimed by live patching (`trace/live.rs`): no op traces it; its
    /// bytes are the live patcher's.
    pub(super) live: bool,
}

/// Which stub a target is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StubKind {
    /// A call stub pushing the site index: direct and list trampolines.
    Call = 0,
    /// A call stub pushing the function id: count trampolines.
    Count = 1,
    /// A graph stub (the site jumps to it): graph trampolines.
    Graph = 2,
}

impl Target {
    pub(super) fn stub_kind(self) -> Option<StubKind> {
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
pub(super) struct Stub {
    pub(super) code: usize,
    /// Address of its word (in its stub block's data).
    pub(super) word: usize,
    /// What the word holds while the stub has no trampoline.
    pub(super) null: usize,
    /// The trampoline block the word points into, if any.
    pub(super) block: Option<usize>,
}

pub(super) struct OpInfo {
    pub(super) filter: Filter,
    pub(super) boxed: *mut OpBox,
}

// SAFETY: the raw OpBox pointer is owned by the tracer and only shared with
// the hot path through OPS.
unsafe impl Send for OpInfo {}

pub(super) struct Inner {
    pub(super) table: SiteTable,
    pub(super) sites: Vec<SiteInfo>,
    pub(super) by_addr: HashMap<usize, u32>,
    pub(super) ops: Vec<Option<OpInfo>>,
    /// Op ids retired but not yet reusable.
    pub(super) ids_pending: u64,
    pub(super) next_id: usize,
    /// Trampoline blocks; a retired block's index is reused.
    pub(super) blocks: Vec<Option<TrampBlock>>,
    /// Stub blocks; those of unloaded objects become `None`.
    pub(super) stub_blocks: Vec<Option<StubBlock>>,
    /// Where threads' quiescence counts are (`arch::tramp::Counter`).
    pub(super) counter: tramp::Counter,
    pub(super) routines: Option<Routines>,
    /// Trampoline code was written since cores were last synced.
    pub(super) fresh_code: bool,
    pub(super) return_block: Option<CodeBlock>,
    pub(super) retired: Vec<Retired>,
    pub(super) grace_enabled: bool,
    /// Whether a stop-machine batch also prepares every other gcc pad
    /// ([`Tracer::set_prepare_pads`]).
    pub(super) prepare_pads: bool,
    pub(super) avx: bool,
    /// Unwinder hooks, installed once an op wants exits.
    pub(super) unwind: Option<unwind::UnwindHooks>,
    /// The graph code whose exits the graph return block runs inline (the
    /// first op with graph code registered), and that block: never freed,
    /// like the plain return block.
    pub(super) graph_code: Option<GraphCode>,
    /// Whether count and graph trampolines may be used (a test and
    /// benchmark switch: off, every site calls its op through the hot path).
    pub(super) inline_recording: bool,
    /// Library calls: PLT slots, their thunks and sites (`plt.rs`).
    pub(super) plt: super::plt::PltState,
    /// gcc's pads enabled by one byte: the pad mode, the mirror slots
    /// (`mirror.rs`).
    pub(super) mirrors: super::mirror::Mirrors,
}

impl Inner {
    pub(super) fn info(&self, i: usize) -> FunctionInfo {
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
        // Count and graph stubs raise the count in place (static TLS). The
        // trampolines that run inline code are x86-64 code: on aarch64 every
        // op is called through the hot path (`arch/tramp_aarch64.rs`).
        let tls = matches!(self.counter, tramp::Counter::Tls(_));
        (self.inline_recording && tls && cfg!(target_arch = "x86_64")).then(|| o.inline()).flatten()
    }

    /// Op `op`'s count code, if it may use the count trampoline.
    pub(super) fn count_code(&self, op: usize) -> Option<EmitFn> {
        match self.inline_code(op)? {
            InlineCode::Count { count } => Some(count),
            InlineCode::Graph { .. } => None,
        }
    }

    /// Op `op`'s entry code, if it may use graph trampolines (its exits
    /// are then handled inline by the graph return block).
    pub(super) fn graph_entry_code(&self, op: usize) -> Option<EmitFn> {
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
    pub(super) fn records_graph(&self, op: usize) -> bool {
        self.graph_entry_code(op).is_some()
    }

    /// Publishes [`hot::FAST_EXIT`]: the bit of the one registered op whose
    /// exits the return trampoline records itself, or 0.
    pub(super) fn update_fast_exit(&self) {
        let mut graph = (0..MAX_OPS).filter(|&id| self.records_graph(id));
        let bit = match (graph.next(), graph.next()) {
            (Some(id), None) => 1u64 << id,
            _ => 0,
        };
        // Release pairs with the graph and return trampolines' plain loads of
        // it in generated code (`arch::tramp::graph_trampoline`,
        // `fast_return`: x86 loads, acquire).
        hot::FAST_EXIT.store(bit, Ordering::Release);
    }

    pub(super) fn free_id_peek(&self) -> Option<usize> {
        (0..MAX_OPS).find(|&i| self.ops[i].is_none() && self.ids_pending & (1 << i) == 0)
    }

    pub(super) fn free_id(&mut self) -> Option<usize> {
        (0..MAX_OPS)
            .map(|k| (self.next_id + k) % MAX_OPS)
            .find(|&i| self.ops[i].is_none() && self.ids_pending & (1 << i) == 0)
            .inspect(|&i| self.next_id = i + 1)
    }

    pub(super) fn refresh(&mut self) {
        let before = crate::funcs::count() as u32;
        self.scan_objects();
        self.plt_scan();
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
                // aarch64: only gcc's and clang's fresh pads (`nop; nop` at a
                // function's entry), whose first NOP is swapped with `b stub`
                // (arch/tramp_aarch64.rs); `#[traced]` sites are x86-64 only,
                // and an entry already `mov x9, x30; nop` is someone else's.
                if cfg!(target_arch = "aarch64")
                    && (matches!(site.kind, SiteKind::Marked(_)) || site.nop_form == NopForm::Single)
                {
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
                    // aarch64: a pad's first word is swapped live.
                    prepared: site.nop_form.is_single() || cfg!(target_arch = "aarch64"),
                    nop: site_nop(site.nop_form),
                    mask: 0,
                    target: Target::Off,
                    stubs: [None; 3],
                    alive: true,
                    live: false,
                });
            }
        }
    }
}

/// What a site's first instruction is when it is off and prepared
/// ([`SiteInfo::nop`]).
fn site_nop(form: NopForm) -> SiteInsn {
    match form {
        #[cfg(target_arch = "x86_64")]
        f @ NopForm::SingleDisp(_) => f.bytes(),
        _ => arch::SITE_NOP,
    }
}
