//! [`Patcher`]: applying, reverting, driving, forcing and reporting
//! transitions (the kernel's `klp_enable_patch`, `klp_disable_patch`,
//! `klp_try_complete_transition`, `klp_force_transition`,
//! `klp_reverse_transition`).
//!
//! # A transition, step by step
//!
//! Start (`apply`, `revert`):
//! 1. validate (one transition at a time; every target has an entry site;
//!    only the newest patch on a function may be reverted) and run the pre
//!    callback: any refusal writes nothing;
//! 2. claim new sites from the tracer (their tracing stops), make their
//!    stubs; push the patch's versions (and, for an atomic replace, a `nop`
//!    version for every function of earlier patches it leaves out) on each
//!    site's stack;
//! 3. in one seqlock write section: each site's versions by state, its
//!    stub's word, then the transition word (active, not armed, new
//!    generation); publish the stack-check ranges first (Release);
//! 4. one batch turns every site into `jmp stub`: from its last sync on,
//!    every call of a transitioning function goes through its stub; then
//!    the transition is *armed*: threads may switch.
//!
//! Drive (`wait`): the calling thread checks itself; a thread created
//! after the transition was armed that never took a slow path is switched
//! by its birth (`switch_newborn`: it holds no frame); every other thread
//! not at the target is checked from outside if it is blocked
//! (`outside.rs`), else left to switch itself; after 2 ms of running
//! threads pending, the checkpoint op (an op on every traced function
//! entry, gcc pads included by their first byte: `enter::checkpoint`)
//! lets busy threads switch at any traced call. When every thread of
//! `/proc/self/task` is at the target, the
//! transition is marked *completing* (threads created since count as
//! switched), the deciding sections begun before are waited for
//! (`state::sync_deciders`: a decision taken on an older transition word,
//! before a reversal say, is over), and every record and thread is looked
//! at again (a thread with no word of this generation must have been born
//! after arming); then it completes.
//!
//! Complete: settled versions and an inactive transition word (one write
//! section); one batch makes each site `jmp replacement` (a near far-jump
//! stub beyond ±2 GiB) or its NOP again (released to the tracer); post
//! callbacks; what was unpatched or replaced is dropped after a grace
//! period, unless forced.

use super::desc::{Callbacks, FuncDesc, PatchDesc};
use super::enter::{self, Check, CHECK};
use super::outside::{self, Outside, Sched};
use super::report::*;
use super::stack::{self, Range, Ranges};
use super::state::{self, View, PATCHED, UNPATCHED};
use crate::arch::tramp;
use crate::text::codemem::CodeBlock;
use crate::trace::live::{LiveSite, LiveWrite};
use crate::trace::{Entry, Filter, OpHandle, TraceOp, Tracer};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The process's live patcher: one transition at a time, patches stacked
/// in the order applied.
///
/// ```no_run
/// use textpoke::live::{FuncDesc, PatchDesc, Patcher};
/// # let (target, size, replacement, rsize) = (0usize, 1usize, 0usize, 1usize);
/// let p = Patcher::global();
/// let desc = PatchDesc {
///     name: "fix-outer".into(),
///     replace: false,
///     funcs: vec![FuncDesc {
///         name: "outer".into(),
///         target,
///         target_size: size,
///         replacement,
///         replacement_size: rsize,
///         ..Default::default() // no `.cold` fragments
///     }],
///     callbacks: Default::default(),
///     keep_alive: None,
/// };
/// let id = p.apply(desc)?;                       // returns at once; threads switch as they can
/// p.wait(std::time::Duration::from_secs(30))?;   // complete: `outer` is one jump to the replacement
/// p.revert(Some(id))?;
/// p.wait(std::time::Duration::from_secs(30))?;
/// # Ok::<(), textpoke::live::LiveError>(())
/// ```
pub struct Patcher {
    control: Mutex<Control>,
}

struct Version {
    patch: PatchId,
    addr: usize,
    size: usize,
    nop: bool,
}

struct SiteRec {
    site: LiveSite,
    stub: usize,
    /// What the site's five bytes are now.
    bytes: [u8; 5],
    /// What they are with no version on them: the site's own NOP (gcc's
    /// `NOP5`, clang's `0f 1f 44 00 08`), given back exactly; `NOP5` for
    /// a gcc pad (the tracer writes its pad back).
    off: [u8; 5],
    /// The target's entry and size, and the code after the site.
    target: usize,
    target_size: usize,
    orig_body: usize,
    name: String,
    /// Versions, oldest first (the kernel's `func_stack`).
    stack: Vec<Version>,
    /// The far-jump stub to the settled replacement, if out of reach.
    far: Option<(usize, usize)>,
    claimed: bool,
    /// A gcc pad never made one instruction when claimed: the tracer
    /// enables it by its first byte, a jump to its mirror slot
    /// (`trace/live.rs`), so what it jumps to must also be within reach
    /// of the slot ([`pad_slot`]).
    pad: bool,
}

/// The mirror slot of a gcc pad at `site` (`trace/mirror.rs`): where its
/// first byte, made `e9`, jumps.
fn pad_slot(site: usize) -> Option<usize> {
    crate::arch::gcc_pad_jmp_target(site).filter(|&m| m >= 0x10000)
}

impl SiteRec {
    /// The address a version runs from.
    fn run_addr(&self, v: &Version) -> usize {
        if v.nop {
            self.orig_body
        } else {
            v.addr
        }
    }
    /// The ranges a frame of a version is found in (`None`: the original):
    /// its code and its other fragments (gcc's `name.cold` parts), which the
    /// `FuncDesc`s of `patches` (every applied patch, the transitioning
    /// one included) give.
    fn ranges(&self, v: Option<&Version>, patches: &[Patch]) -> Vec<(usize, usize)> {
        let descs = patches.iter().flat_map(|p| p.funcs.iter().map(move |f| (p.id, f)));
        let mut parts: Vec<(usize, usize)> = match v {
            Some(v) if !v.nop => {
                let mine = descs.filter(|(id, f)| *id == v.patch && f.replacement == v.addr);
                mine.flat_map(|(_, f)| f.replacement_fragments.iter().copied()).chain([(v.addr, v.size)]).collect()
            }
            _ => {
                let all = descs.filter(|(_, f)| f.target == self.target);
                all.flat_map(|(_, f)| f.target_fragments.iter().copied())
                    .chain([(self.target, self.target_size)])
                    .collect()
            }
        };
        parts.sort_unstable();
        parts.dedup();
        parts.into_iter().map(|(at, size)| (at, at + size)).collect()
    }
}

struct Patch {
    id: PatchId,
    name: String,
    replace: bool,
    funcs: Vec<FuncDesc>,
    callbacks: Callbacks,
    keep_alive: Option<Box<dyn Any + Send + Sync>>,
    state: PatchState,
    forced: bool,
}

struct Trans {
    patch: PatchId,
    gen: u32,
    initial: u8,
    target: u8,
    reversals: u16,
    /// The live slots involved; their position is the function index of
    /// the stack-check ranges.
    slots: Vec<u32>,
    started: Instant,
    blocked_since: HashMap<i32, (String, Instant)>,
    running_since: Option<Instant>,
    checkpoint: Option<OpHandle>,
    /// The clock tick (`outside::boot_ticks`) read once the transition was
    /// armed: a thread whose start tick is later was created after every
    /// site jumped to its stub (`outside::born_after`).
    armed_tick: u64,
}

/// Stub memory: blocks near the sites, never freed (a thread may sit in a
/// stub for as long as the scheduler likes, as the tracer's stubs).
#[derive(Default)]
struct Arena {
    blocks: Vec<(CodeBlock, usize)>,
}

impl Arena {
    /// `len` bytes within rel32 reach of `near`, 16-aligned.
    fn alloc(&mut self, near: usize, len: usize) -> Result<usize, LiveError> {
        const REACH: usize = (1 << 31) - (1 << 16);
        let fits = |b: &CodeBlock, used: usize| {
            let at = b.addr() + used;
            used + len <= b.len() && at.abs_diff(near) < REACH && (at + len).abs_diff(near) < REACH
        };
        let i = match self.blocks.iter().position(|(b, used)| fits(b, *used)) {
            Some(i) => i,
            None => {
                let b = CodeBlock::near(near, near, 4096).map_err(|source| LiveError::Memory { near, source })?;
                self.blocks.push((b, 0));
                self.blocks.len() - 1
            }
        };
        let (b, used) = &mut self.blocks[i];
        let at = b.addr() + *used;
        *used += len.next_multiple_of(16);
        Ok(at)
    }
    /// `len` bytes for code a site's `jmp` reaches: within rel32 reach of
    /// the site and, where one can be, of its pad's mirror slot too (the
    /// slot then jumps there); else of the site only.
    fn alloc_for_site(&mut self, site: usize, len: usize) -> Result<usize, LiveError> {
        if let Some(slot) = pad_slot(site) {
            if let Ok(at) = self.alloc_reaching((slot, site), site, len) {
                return Ok(at);
            }
        }
        self.alloc(site, len)
    }
    /// `len` bytes within rel32 reach of both `lo` and `hi`, preferring
    /// `prefer`.
    fn alloc_reaching(&mut self, (lo, hi): (usize, usize), prefer: usize, len: usize) -> Result<usize, LiveError> {
        const REACH: usize = (1 << 31) - (1 << 16);
        let fits = |b: &CodeBlock, used: usize| {
            let at = b.addr() + used;
            used + len <= b.len() && [lo, hi].iter().all(|&n| at.abs_diff(n) < REACH && (at + len).abs_diff(n) < REACH)
        };
        let i = match self.blocks.iter().position(|(b, used)| fits(b, *used)) {
            Some(i) => i,
            None => {
                let b = CodeBlock::near_preferring(lo, hi, prefer, 4096)
                    .map_err(|source| LiveError::Memory { near: prefer, source })?;
                self.blocks.push((b, 0));
                self.blocks.len() - 1
            }
        };
        let (b, used) = &mut self.blocks[i];
        if !fits(b, *used) {
            return Err(LiveError::Memory { near: prefer, source: std::io::ErrorKind::AddrNotAvailable.into() });
        }
        let at = b.addr() + *used;
        *used += len.next_multiple_of(16);
        Ok(at)
    }
    fn write(&self, at: usize, code: &[u8]) -> Result<(), LiveError> {
        let (b, _) = self.blocks.iter().find(|(b, _)| b.contains(at)).expect("allocated here");
        b.write(at - b.addr(), code).map_err(|source| LiveError::Memory { near: at, source })
    }
    fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.blocks.iter().map(|(b, _)| (b.addr(), b.addr() + b.len() - 1))
    }
}

struct Control {
    patches: Vec<Patch>,
    sites: Vec<SiteRec>,
    by_site: HashMap<usize, u32>,
    next_id: u64,
    gen: u32,
    trans: Option<Trans>,
    arena: Arena,
    slow: Option<(CodeBlock, usize)>,
    return_trampoline: usize,
    /// Patches unpatched or replaced, whose code goes after a grace period.
    dropped: Vec<Box<dyn Any + Send + Sync>>,
}

// SAFETY: the raw parts (code blocks) are owned mappings; the boxed
// keep-alives are Send.
unsafe impl Send for Control {}

/// Site bytes: jump from `site` to `to`, if in reach.
fn jmp(site: usize, to: usize) -> Option<[u8; 5]> {
    crate::arch::encode_jmp(site, to)
}

impl Patcher {
    /// The process's patcher.
    pub fn global() -> &'static Patcher {
        static P: OnceLock<Patcher> = OnceLock::new();
        P.get_or_init(|| {
            state::init_slots();
            state::init_threads();
            state::register_fork_handlers();
            if let Ok(key) = crate::sys::threads::key_create(state::thread_exit) {
                state::RECORD_KEY.store(key as usize, Ordering::Relaxed);
            }
            Patcher {
                control: Mutex::new(Control {
                    patches: Vec::new(),
                    sites: Vec::new(),
                    by_site: HashMap::new(),
                    next_id: 1,
                    gen: 0,
                    trans: None,
                    arena: Arena::default(),
                    slow: None,
                    return_trampoline: 0,
                    dropped: Vec::new(),
                }),
            }
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Control>, LiveError> {
        if crate::trace::lp_guarded(|nested| nested) {
            return Err(LiveError::InCallback);
        }
        Ok(self.control.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Applies a patch: validates it (targets distinct, each with a
    /// function-entry site; no transition in progress), runs its
    /// pre-patch callback, redirects every target's site to its transition
    /// stub in one batch and starts the transition. Returns at once; drive
    /// it with [`Patcher::wait`]. A refusal writes nothing (a failure after
    /// the pre-patch callback runs the post-unpatch one).
    pub fn apply(&'static self, desc: PatchDesc) -> Result<PatchId, LiveError> {
        let mut c = self.lock()?;
        if let Some(t) = &c.trans {
            return Err(c.busy(t.patch));
        }
        let tracer = Tracer::global();
        let sites = match validate(&desc, tracer) {
            // Objects loaded since the tracer last looked: look again.
            Err(LiveError::NoEntrySite { .. }) => {
                tracer.refresh()?;
                validate(&desc, tracer)?
            }
            r => r?,
        };
        if c.sites.len() + sites.iter().filter(|s| !c.by_site.contains_key(&s.addr)).count() > state::MAX_SLOTS {
            return Err(LiveError::TooManySites(state::MAX_SLOTS));
        }
        c.ensure_started(tracer)?;
        if let Some(pre) = desc.callbacks.pre_patch {
            // SAFETY: the patch's own callback, as its author wrote it.
            let code = unsafe { pre() };
            if code != 0 {
                return Err(LiveError::Callback { name: desc.name, callback: "pre-patch", code });
            }
        }
        let id = PatchId(c.next_id);
        c.next_id += 1;
        let callbacks = desc.callbacks;
        let patch = Patch {
            id,
            name: desc.name,
            replace: desc.replace,
            funcs: desc.funcs,
            callbacks,
            keep_alive: desc.keep_alive,
            state: PatchState::Patching,
            forced: false,
        };
        match c.start_patch(tracer, patch, &sites) {
            Ok(()) => Ok(id),
            Err(e) => {
                if let Some(post) = callbacks.post_unpatch {
                    // SAFETY: as for the pre-patch callback.
                    unsafe { post() };
                }
                Err(e)
            }
        }
    }

    /// Reverts patch `id` (`None`: the newest), with the same consistency:
    /// its pre-unpatch callback, then a transition back to the versions
    /// below it. During that patch's own transition, reverses it instead
    /// (the kernel's `klp_reverse_transition`: threads still in the initial
    /// state are done; no callback runs). Refuses a patch another is
    /// stacked on for one of its functions, naming both.
    pub fn revert(&'static self, id: Option<PatchId>) -> Result<PatchId, LiveError> {
        let mut c = self.lock()?;
        if let Some(t) = &c.trans {
            if id.is_some_and(|id| id != t.patch) {
                return Err(c.busy(t.patch));
            }
            let p = t.patch;
            c.reverse();
            return Ok(p);
        }
        let idx = match id {
            Some(id) => c.patches.iter().position(|p| p.id == id).ok_or(LiveError::UnknownPatch(id))?,
            None => c.patches.len().checked_sub(1).ok_or(LiveError::NoPatches)?,
        };
        let id = c.patches[idx].id;
        // Only the top of every stack it is on.
        let slots: Vec<u32> = c
            .sites
            .iter()
            .enumerate()
            .filter(|(_, s)| s.stack.iter().any(|v| v.patch == id))
            .map(|(i, _)| i as u32)
            .collect();
        for &i in &slots {
            let s = &c.sites[i as usize];
            let top = s.stack.last().expect("a version").patch;
            if top != id {
                let name =
                    |p: PatchId| c.patches.iter().find(|q| q.id == p).map(|q| q.name.clone()).unwrap_or_default();
                return Err(LiveError::Stacked {
                    patch: id,
                    patch_name: name(id),
                    on_top: top,
                    on_top_name: name(top),
                    function: s.name.clone(),
                });
            }
        }
        if let Some(pre) = c.patches[idx].callbacks.pre_unpatch {
            // SAFETY: the patch's own callback.
            let code = unsafe { pre() };
            if code != 0 {
                return Err(LiveError::Callback { name: c.patches[idx].name.clone(), callback: "pre-unpatch", code });
            }
        }
        c.patches[idx].state = PatchState::Unpatching;
        let tracer = Tracer::global();
        if let Err(e) = c.start(tracer, id, slots, PATCHED, UNPATCHED) {
            // Nothing was written: the patch stays enabled. Its post-patch
            // callback runs again to redo what the pre-unpatch callback
            // undid (the kernel pairs them so), and the revert can be
            // retried.
            c.patches[idx].state = PatchState::Enabled;
            if let Some(post) = c.patches[idx].callbacks.post_patch {
                // SAFETY: the patch's own callback.
                unsafe { post() };
            }
            return Err(e);
        }
        Ok(id)
    }

    /// Drives the transition until it completes or `timeout` passes:
    /// checks blocked threads from outside, this thread itself, retries
    /// with backoff. On completion the sites become direct jumps and the
    /// post callbacks run. On timeout: [`LiveError::Pending`] with the
    /// report; the transition stays pending.
    pub fn wait(&'static self, timeout: Duration) -> Result<Completed, LiveError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(50);
        loop {
            {
                let mut c = self.lock()?;
                if c.trans.is_none() {
                    return Err(LiveError::NoTransition);
                }
                if c.round()? {
                    return c.complete(false);
                }
                super::nudge::tick(c.trans.as_ref().and_then(|t| t.running_since)); // opt-in (nudge.rs)
                if Instant::now() >= deadline {
                    return Err(LiveError::Pending(c.report()));
                }
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Completes the transition in progress by force (the kernel's
    /// `klp_force_transition`): every thread is switched whatever its
    /// stack holds — the consistency model may be broken for the threads
    /// returned (what they held). The patch is marked forced: its code, and
    /// for a revert the code it replaced, is never unloaded.
    pub fn force(&'static self) -> Result<Vec<ThreadReport>, LiveError> {
        let mut c = self.lock()?;
        if c.trans.is_none() {
            return Err(LiveError::NoTransition);
        }
        c.round()?;
        let report = c.report();
        let t = View::load();
        let _ = crate::sys::threads::for_each_tid(|tid| {
            if let Some(rec) = state::find_or_claim(tid) {
                let mut w = rec.word.load(Ordering::Acquire);
                while t.effective(w) != t.target {
                    let new = state::word(t.gen, state::epoch(w), t.target);
                    // AcqRel: as every CAS of a thread word.
                    match rec.word.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => break,
                        Err(now) => w = now,
                    }
                }
            }
        });
        let pid = c.trans.as_ref().expect("checked").patch;
        if let Some(p) = c.patches.iter_mut().find(|p| p.id == pid) {
            p.forced = true;
        }
        c.complete(true)?;
        Ok(report.pending)
    }

    /// The transition in progress, with its pending threads.
    pub fn transition(&self) -> Option<TransitionReport> {
        let c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        c.trans.as_ref()?;
        Some(c.report())
    }

    /// The applied patches, oldest first (a patch leaves the list when
    /// its revert completes, or an atomic replace completes over it).
    pub fn patches(&self) -> Vec<PatchInfo> {
        let c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        c.patches
            .iter()
            .map(|p| PatchInfo {
                id: p.id,
                name: p.name.clone(),
                state: p.state,
                functions: p.funcs.iter().map(|f| f.name.clone()).collect(),
                forced: p.forced,
                replace: p.replace,
            })
            .collect()
    }
}

/// Checks a patch description; the entry sites of its targets.
fn validate(desc: &PatchDesc, tracer: &'static Tracer) -> Result<Vec<LiveSite>, LiveError> {
    let bad = |what: String| LiveError::BadDesc { name: desc.name.clone(), what };
    if desc.funcs.is_empty() {
        return Err(LiveError::Empty { name: desc.name.clone() });
    }
    let mut sites = Vec::with_capacity(desc.funcs.len());
    for (i, f) in desc.funcs.iter().enumerate() {
        if desc.funcs[..i].iter().any(|g| g.target == f.target) {
            return Err(bad(format!("{}() is replaced twice", f.name)));
        }
        if f.target_size == 0 || f.replacement_size == 0 || f.replacement == 0 {
            return Err(bad(format!("{}(): sizes and the replacement's address must not be 0", f.name)));
        }
        let site = tracer
            .live_entry_site(f.target)
            .ok_or_else(|| LiveError::NoEntrySite { function: f.name.clone(), addr: f.target })?;
        sites.push(site);
    }
    Ok(sites)
}

impl Control {
    fn busy(&self, id: PatchId) -> LiveError {
        let name = self.patches.iter().find(|p| p.id == id).map(|p| p.name.clone()).unwrap_or_default();
        LiveError::Busy { id, name }
    }

    /// The slow path, the return trampoline, the module table.
    fn ensure_started(&mut self, tracer: &'static Tracer) -> Result<(), LiveError> {
        if self.return_trampoline == 0 {
            self.return_trampoline = tracer.live_return_trampoline()?;
        }
        if self.slow.is_none() {
            let b = CodeBlock::anywhere(4096).map_err(|source| LiveError::Memory { near: 0, source })?;
            let code = tramp::live_slow_path(b.addr(), enter::lp_enter as *const () as usize, tramp::has_avx())
                .map_err(|e| LiveError::Trace(crate::trace::TraceError::CodeGen(e.to_string())))?;
            b.write(0, &code).map_err(|source| LiveError::Memory { near: b.addr(), source })?;
            let addr = b.addr();
            self.slow = Some((b, addr));
        }
        stack::refresh_modules();
        Ok(())
    }

    /// Live slots for `sites` (claimed and given stubs if new).
    fn slots_for(
        &mut self,
        tracer: &'static Tracer,
        sites: &[LiveSite],
        funcs: &[FuncDesc],
    ) -> Result<Vec<u32>, LiveError> {
        self.forget_unloaded_sites(sites, funcs)?;
        let fresh: Vec<LiveSite> = sites.iter().filter(|s| !self.by_site.contains_key(&s.addr)).copied().collect();
        let slow = self.slow.as_ref().expect("started").1;
        let mut made = Vec::new();
        for s in &fresh {
            let i = self.sites.len() as u32;
            let stub = self.arena.alloc_for_site(s.addr, 128)?;
            let code = tramp::live_stub(
                stub,
                (state::slot_word_addr(i), state::trans_addr()),
                state::mirror_offset(),
                i,
                slow,
            )
            .map_err(|e| LiveError::Trace(crate::trace::TraceError::CodeGen(e.to_string())))?;
            self.arena.write(stub, &code)?;
            let f = funcs.iter().zip(sites).find(|(_, x)| x.addr == s.addr).map(|(f, _)| f).expect("a site of funcs");
            self.sites.push(SiteRec {
                site: *s,
                stub,
                bytes: crate::arch::NOP5,
                off: crate::arch::NOP5,
                target: f.target,
                target_size: f.target_size,
                orig_body: s.addr + 5,
                name: f.name.clone(),
                stack: Vec::new(),
                far: None,
                claimed: false,
                pad: false,
            });
            self.by_site.insert(s.addr, i);
            made.push(i);
        }
        // Claim the sites that are not (released ones, and new ones).
        let unclaimed: Vec<u32> =
            sites.iter().map(|s| self.by_site[&s.addr]).filter(|&i| !self.sites[i as usize].claimed).collect();
        if !unclaimed.is_empty() {
            let list: Vec<LiveSite> = unclaimed.iter().map(|&i| self.sites[i as usize].site).collect();
            let bytes = tracer.live_claim(&list)?;
            for (&i, b) in unclaimed.iter().zip(bytes) {
                let s = &mut self.sites[i as usize];
                s.claimed = true;
                s.pad = b == crate::arch::GCC_PAD;
                s.off = if s.pad { crate::arch::NOP5 } else { b };
                s.bytes = b;
            }
        }
        Ok(sites.iter().map(|s| self.by_site[&s.addr]).collect())
    }

    /// A site at an address whose record belongs to another tracer site
    /// (the object that had it was unloaded, and another was loaded
    /// there): the record is made this site's (its slot index reused; the
    /// old site's name, target, size and far jump forgotten) when no
    /// patch holds it, else refused, naming the function.
    fn forget_unloaded_sites(&mut self, sites: &[LiveSite], funcs: &[FuncDesc]) -> Result<(), LiveError> {
        for (s, f) in sites.iter().zip(funcs) {
            let Some(&i) = self.by_site.get(&s.addr) else { continue };
            let rec = &mut self.sites[i as usize];
            if rec.site == *s {
                continue;
            }
            if rec.claimed || !rec.stack.is_empty() {
                return Err(LiveError::BadDesc {
                    name: f.name.clone(),
                    what: format!(
                        "{}() at {:#x} was patched in an object since unloaded ({}); revert that patch first",
                        f.name, s.addr, rec.name
                    ),
                });
            }
            rec.site = *s;
            rec.name = f.name.clone();
            rec.target = f.target;
            rec.target_size = f.target_size;
            rec.orig_body = s.addr + 5;
            rec.far = None;
            rec.pad = false;
            rec.bytes = crate::arch::NOP5;
            rec.off = crate::arch::NOP5;
        }
        Ok(())
    }

    fn start_patch(&mut self, tracer: &'static Tracer, patch: Patch, sites: &[LiveSite]) -> Result<(), LiveError> {
        let slots = self.slots_for(tracer, sites, &patch.funcs)?;
        let id = patch.id;
        for (k, &i) in slots.iter().enumerate() {
            let f = &patch.funcs[k];
            self.sites[i as usize].stack.push(Version {
                patch: id,
                addr: f.replacement,
                size: f.replacement_size,
                nop: false,
            });
        }
        let mut all = slots.clone();
        if patch.replace {
            // Every function of earlier patches this one leaves out goes
            // back to its original code (the kernel's `klp_add_nops`).
            for (i, s) in self.sites.iter_mut().enumerate() {
                if !s.stack.is_empty() && !slots.contains(&(i as u32)) {
                    s.stack.push(Version { patch: id, addr: 0, size: 0, nop: true });
                    all.push(i as u32);
                }
            }
        }
        self.patches.push(patch);
        if let Err(e) = self.start(tracer, id, all.clone(), UNPATCHED, PATCHED) {
            for &i in &all {
                self.sites[i as usize].stack.retain(|v| v.patch != id);
            }
            self.patches.retain(|p| p.id != id);
            self.release_unused(tracer);
            return Err(e);
        }
        Ok(())
    }

    /// Steps 3 and 4 of the module docs.
    fn start(
        &mut self,
        tracer: &'static Tracer,
        patch: PatchId,
        slots: Vec<u32>,
        initial: u8,
        target: u8,
    ) -> Result<(), LiveError> {
        let gen = state::next_gen(self.gen);
        // Stack-check ranges by state; transit ranges in both.
        let mut by_state: [Vec<Range>; 3] = Default::default();
        for (k, &i) in slots.iter().enumerate() {
            let s = &self.sites[i as usize];
            let n = s.stack.len();
            for (lo, hi) in s.ranges(s.stack.last(), &self.patches) {
                by_state[PATCHED as usize].push(Range { lo, hi, func: k as u32 });
            }
            for (lo, hi) in s.ranges(n.checked_sub(2).map(|j| &s.stack[j]), &self.patches) {
                by_state[UNPATCHED as usize].push(Range { lo, hi, func: k as u32 });
            }
        }
        let slow = self.slow.as_ref().expect("started");
        let transit: Vec<Range> = self
            .arena
            .ranges()
            .chain(std::iter::once((slow.0.addr(), slow.0.addr() + slow.0.len() - 1)))
            .map(|(lo, hi)| Range { lo, hi, func: stack::TRANSIT })
            .collect();
        for r in &mut by_state {
            r.extend(transit.iter().copied());
        }
        let [a, b, c] = by_state;
        let check = Box::into_raw(Box::new(Check {
            gen,
            ranges: [Ranges::new(a), Ranges::new(b), Ranges::new(c)],
            return_trampoline: self.return_trampoline,
        }));
        // Release pairs with the Acquire loads of the self-checks.
        let old = CHECK.swap(check, Ordering::AcqRel);
        let view = View { gen, reversals: 0, active: true, armed: false, completing: false, initial, target };
        {
            let _w = state::WriteSection::open();
            for &i in &slots {
                let (vu, vp) = self.versions(i);
                let sl = state::slot(i);
                sl.version[UNPATCHED as usize].store(vu, Ordering::Relaxed);
                sl.version[PATCHED as usize].store(vp, Ordering::Relaxed);
                sl.gen.store(gen, Ordering::Relaxed);
                let vt = if target == PATCHED { vp } else { vu };
                // Relaxed inside the section; the stubs' plain loads see it
                // after the batch's core syncs (below) at the latest.
                sl.word.store(view.tag16() << 48 | vt as u64, Ordering::Relaxed);
            }
            view.publish();
        }
        self.gen = gen;
        // The previous check: its readers are the self-checks, all inside a
        // deciding section (`state::Deciding`); freed once those begun
        // before are over, leaked if they do not end.
        if !old.is_null() && state::sync_deciders(Duration::from_secs(1)) {
            // SAFETY: unpublished above, and no reader is left (see above).
            drop(unsafe { Box::from_raw(old) });
        }
        let writes: Vec<LiveWrite> = slots
            .iter()
            .map(|&i| {
                let s = &self.sites[i as usize];
                LiveWrite { addr: s.site.addr, old: s.bytes, new: jmp(s.site.addr, s.stub).expect("stub in reach") }
            })
            .collect();
        if let Err(e) = tracer.live_write(&writes) {
            let _w = state::WriteSection::open();
            View { active: false, ..view }.publish();
            return Err(e.into());
        }
        for w in &writes {
            let i = self.by_site[&w.addr];
            self.sites[i as usize].bytes = w.new;
        }
        {
            // Every site jumps to its stub now (the batch synced every
            // core): threads may switch.
            let _w = state::WriteSection::open();
            View { armed: true, ..view }.publish();
        }
        // After the publication: a thread started later sees an armed
        // transition at its first call, and holds no frame of before.
        let armed_tick = outside::boot_ticks();
        self.trans = Some(Trans {
            patch,
            gen,
            initial,
            target,
            reversals: 0,
            slots,
            started: Instant::now(),
            blocked_since: HashMap::new(),
            running_since: None,
            checkpoint: None,
            armed_tick,
        });
        Ok(())
    }

    /// `(version(UNPATCHED), version(PATCHED))` of slot `i` for the patch
    /// on top of its stack.
    fn versions(&self, i: u32) -> (usize, usize) {
        let s = &self.sites[i as usize];
        let n = s.stack.len();
        let vp = s.stack.last().map_or(s.orig_body, |v| s.run_addr(v));
        let vu = n.checked_sub(2).map_or(s.orig_body, |j| s.run_addr(&s.stack[j]));
        (vu, vp)
    }

    /// Reverses the transition in progress (note §5.2).
    fn reverse(&mut self) {
        let t = self.trans.as_mut().expect("a transition");
        t.target = if t.target == PATCHED { UNPATCHED } else { PATCHED };
        t.reversals = t.reversals.wrapping_add(1);
        let view = View {
            gen: t.gen,
            reversals: t.reversals,
            active: true,
            armed: true,
            completing: false,
            initial: t.initial,
            target: t.target,
        };
        let pid = t.patch;
        {
            let _w = state::WriteSection::open();
            for &i in &t.slots {
                let sl = state::slot(i);
                let v = sl.version[view.target as usize].load(Ordering::Relaxed);
                sl.word.store(view.tag16() << 48 | v as u64, Ordering::Relaxed);
            }
            view.publish();
        }
        if let Some(p) = self.patches.iter_mut().find(|p| p.id == pid) {
            p.state = if view.target == PATCHED { PatchState::Patching } else { PatchState::Unpatching };
        }
    }

    /// One pass over the threads; whether all are at the target.
    fn round(&mut self) -> Result<bool, LiveError> {
        // The versions of every patched function, which the checkpoint op
        // leaves alone (`register_checkpoint`).
        let version_ranges: Vec<(usize, usize)> = self
            .sites
            .iter()
            .flat_map(|s| s.stack.iter().filter(|v| !v.nop).map(|v| (v.addr, v.addr + v.size)))
            .collect();
        // Objects loaded since: a thread's PC in code of no known object
        // counts as in transit (`outside.rs`).
        stack::refresh_modules();
        enter::check_current_thread();
        // SAFETY: the current check, freed only by this (locked) side.
        let check = unsafe { &*CHECK.load(Ordering::Acquire) };
        let t = View::load();
        let maps = crate::sys::maps::Maps::read().ok();
        let claims = state::CLAIMS.load(Ordering::Relaxed);
        let me = crate::sys::threads::gettid();
        let mut tids = Vec::new();
        let _ = crate::sys::threads::for_each_tid(|tid| tids.push(tid));
        let mut running = 0;
        let mut pending = 0;
        let trans = self.trans.as_mut().expect("a transition");
        for &tid in &tids {
            let at_target = state::find(tid).is_some_and(|r| t.effective(r.word.load(Ordering::Acquire)) == t.target);
            if at_target {
                trans.blocked_since.remove(&tid);
                continue;
            }
            if tid == me {
                pending += 1;
                continue;
            }
            if switch_newborn(tid, t, trans.armed_tick) {
                trans.blocked_since.remove(&tid);
                continue;
            }
            let verdict = match &maps {
                Some(m) => outside::check_blocked(tid, t, check, m),
                None => Outside::Pending,
            };
            match verdict {
                Outside::Switched => {
                    trans.blocked_since.remove(&tid);
                }
                Outside::Running => {
                    running += 1;
                    pending += 1;
                    trans.blocked_since.remove(&tid);
                }
                Outside::Pending => {
                    pending += 1;
                    if let Some(s) = Sched::read(tid) {
                        let e = trans.blocked_since.entry(tid).or_insert_with(|| (s.syscall.clone(), Instant::now()));
                        if e.0 != s.syscall {
                            *e = (s.syscall, Instant::now());
                        }
                    }
                }
            }
        }
        // Stack ends for the self-checks' scans; records of exited threads.
        for r in state::records() {
            let tid = r.tid.load(Ordering::Acquire);
            if tid == 0 {
                continue;
            }
            if !tids.contains(&tid) {
                if r.claimed.load(Ordering::Relaxed) <= claims {
                    state::release(r);
                }
                continue;
            }
            let sp = r.last_sp.load(Ordering::Relaxed);
            if sp != 0 && r.stack_hi.load(Ordering::Relaxed) <= sp {
                if let Some(hi) = maps.as_ref().and_then(|m| outside::mapping_end(m, sp)) {
                    r.stack_hi.store(hi, Ordering::Relaxed);
                }
            }
        }
        if running == 0 {
            trans.running_since = None;
        } else {
            let since = *trans.running_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(2) && trans.checkpoint.is_none() {
                trans.checkpoint = register_checkpoint(&version_ranges);
            }
        }
        if pending > 0 {
            return Ok(false);
        }
        // Every listed thread is at the target. Threads created since the
        // listing count as switched from now on ("completing"); once every
        // decision that read the transition word before is over
        // (`sync_deciders`: after a reversal, one may still switch a
        // thread the old way; a new thread may have entered a stub), look
        // again at every record of this generation and at the threads.
        let completing = View { completing: true, ..t };
        {
            let _w = state::WriteSection::open();
            completing.publish();
        }
        let graced = state::sync_deciders(Duration::from_secs(1));
        let records_ok = state::records().iter().all(|r| {
            let w = r.word.load(Ordering::Acquire);
            r.tid.load(Ordering::Acquire) == 0 || (w >> 32) as u32 != t.gen || completing.effective(w) == t.target
        });
        let mut tids = Vec::new();
        let _ = crate::sys::threads::for_each_tid(|tid| tids.push(tid));
        // A thread with no word of this generation is in the initial state,
        // the target after a reversal; else it counts as switched only if
        // it was created after the transition was armed: an older one
        // missing from the first listing (a listing of /proc/self/task can
        // miss a thread while others exit) has not been checked.
        let armed_tick = trans.armed_tick;
        let threads_ok = tids.iter().all(|&tid| match state::find(tid).map(|r| r.word.load(Ordering::Acquire)) {
            Some(w) if (w >> 32) as u32 == t.gen => completing.effective(w) == t.target,
            _ => t.initial == t.target || tid != me && outside::born_after(tid, armed_tick),
        });
        if graced && records_ok && threads_ok {
            return Ok(true);
        }

        let _w = state::WriteSection::open();
        t.publish();
        Ok(false)
    }

    /// Completes the transition (module docs).
    fn complete(&mut self, forced: bool) -> Result<Completed, LiveError> {
        let tracer = Tracer::global();
        let t = self.trans.take().expect("a transition");
        let pid = t.patch;
        let mut gone: Vec<PatchId> = Vec::new();
        if t.target == PATCHED {
            let replace = self.patches.iter().find(|p| p.id == pid).is_some_and(|p| p.replace);
            if replace {
                gone.extend(self.patches.iter().filter(|p| p.id != pid).map(|p| p.id));
            }
        } else {
            gone.push(pid);
        }
        let target = t.target;
        let keep = |v: &Version| match target {
            PATCHED => !(gone.contains(&v.patch) || v.patch == pid && v.nop),
            _ => v.patch != pid,
        };
        // 1. The sites' direct jumps, before anything changes: every thread
        // is at the target, so a thread jumping straight to the final
        // version and one still deciding in a stub run the same version.
        // A failure leaves the transition as it was (pending, every thread
        // at its target, calls through the stubs) and the next `wait` or
        // `force` completes it again: no half-written state.
        let touched = t.slots.clone();
        let mut writes = Vec::new();
        for &i in &touched {
            let top = self.sites[i as usize].stack.iter().rev().find(|v| keep(v)).map(|v| v.addr);
            let new = match top.map(|to| self.direct_jump(i, to)) {
                None => self.sites[i as usize].off,
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    self.trans = Some(t);
                    return Err(e);
                }
            };
            let s = &self.sites[i as usize];
            if new != s.bytes {
                writes.push(LiveWrite { addr: s.site.addr, old: s.bytes, new });
            }
        }
        if let Err(source) = tracer.live_write(&writes) {
            self.trans = Some(t);
            return Err(LiveError::Completing { patch: pid, source });
        }
        for w in &writes {
            let i = self.by_site[&w.addr];
            self.sites[i as usize].bytes = w.new;
        }
        if let Some(h) = t.checkpoint {
            let _ = tracer.unregister(h);
        }
        // 2. The stacks and states, the settled versions, then the
        // inactive transition word.
        for s in &mut self.sites {
            s.stack.retain(|v| keep(v));
        }
        if t.target == PATCHED {
            if let Some(p) = self.patches.iter_mut().find(|p| p.id == pid) {
                p.state = PatchState::Enabled;
            }
        }
        {
            let _w = state::WriteSection::open();
            for &i in &touched {
                let s = &self.sites[i as usize];
                let v = s.stack.last().map_or(s.orig_body, |v| s.run_addr(v));
                state::slot(i).settled.store(v, Ordering::Relaxed);
            }
            View {
                gen: t.gen,
                reversals: t.reversals,
                active: false,
                armed: false,
                completing: false,
                initial: t.initial,
                target: t.target,
            }
            .publish();
        }
        self.release_unused(tracer);
        // Post callbacks, then forget what went.
        let callbacks = self.patches.iter().find(|p| p.id == pid).map(|p| p.callbacks).unwrap_or_default();
        let cb = if t.target == PATCHED { callbacks.post_patch } else { callbacks.post_unpatch };
        if let Some(cb) = cb {
            // SAFETY: the patch's own callback.
            unsafe { cb() };
        }
        for id in &gone {
            if let Some(k) = self.patches.iter().position(|p| p.id == *id) {
                let mut p = self.patches.remove(k);
                let forced_here = forced && p.id == pid;
                match p.keep_alive.take() {
                    // A forced patch's code may still run: never unloaded.
                    Some(keep) if p.forced || forced_here => std::mem::forget(keep),
                    Some(keep) => self.dropped.push(keep),
                    None => {}
                }
            }
        }
        if !self.dropped.is_empty() && crate::trace::wait_for_grace(Duration::from_secs(1)).unwrap_or(false) {
            self.dropped.clear();
        }
        Ok(Completed {
            patch: pid,
            state: if t.target == PATCHED { PatchState::Enabled } else { PatchState::Unpatching },
            took: t.started.elapsed(),
            forced,
        })
    }

    /// `jmp to` from slot `i`'s site, through a far-jump stub near it
    /// when `to` is out of reach.
    fn direct_jump(&mut self, i: u32, to: usize) -> Result<[u8; 5], LiveError> {
        let addr = self.sites[i as usize].site.addr;
        // A pad's slot jumps there too (`SiteRec::pad`).
        let slot_reaches = |to| !self.sites[i as usize].pad || pad_slot(addr).is_some_and(|m| jmp(m, to).is_some());
        if let Some(b) = jmp(addr, to).filter(|_| slot_reaches(to)) {
            return Ok(b);
        }
        let far = match self.sites[i as usize].far {
            Some((at, dest)) if dest == to => at,
            _ => {
                let at = self.arena.alloc_for_site(addr, 16)?;
                self.arena.write(at, &tramp::far_jump(to))?;
                self.sites[i as usize].far = Some((at, to));
                at
            }
        };
        Ok(jmp(addr, far).expect("far stub in reach"))
    }

    /// Gives the tracer back the sites no patch holds (their NOP is back).
    fn release_unused(&mut self, tracer: &'static Tracer) {
        let idle: Vec<usize> = (0..self.sites.len())
            .filter(|&i| {
                let s = &self.sites[i];
                s.claimed && s.stack.is_empty() && s.bytes == s.off
            })
            .collect();
        if idle.is_empty() {
            return;
        }
        let list: Vec<LiveSite> = idle.iter().map(|&i| self.sites[i].site).collect();
        if tracer.live_release(&list).is_ok() {
            for i in idle {
                self.sites[i].claimed = false;
            }
        }
    }

    /// The report of the transition in progress.
    fn report(&self) -> TransitionReport {
        let t = self.trans.as_ref().expect("a transition");
        let v = View::load();
        let p = self.patches.iter().find(|p| p.id == t.patch);
        let mut pending = Vec::new();
        let _ = crate::sys::threads::for_each_tid(|tid| {
            let rec = state::find(tid);
            if rec.is_some_and(|r| v.effective(r.word.load(Ordering::Acquire)) == v.target) {
                return;
            }
            let sched = Sched::read(tid);
            let activity = match (&sched, t.blocked_since.get(&tid)) {
                (Some(s), since) if s.sleeping() => Activity::Blocked {
                    syscall: s.regs().and_then(|(nr, _, _)| {
                        (nr >= 0)
                            .then(|| outside::syscall_name(nr).map_or_else(|| format!("syscall {nr}"), str::to_string))
                    }),
                    for_: since.map_or(Duration::ZERO, |(_, at)| at.elapsed()),
                },
                _ => Activity::Running,
            };
            let holds = rec.and_then(|r| {
                let h = r.held.load(Ordering::Relaxed);
                let func = (h as u32).checked_sub(1)?;
                let state = (h >> 32) as u8;
                let function = match func {
                    stack::TRANSIT => "(a live-patch stub)".to_string(),
                    f if f == u32::MAX - 1 => "(a frame entered during the transition)".to_string(),
                    f => t.slots.get(f as usize).map(|&i| self.sites[i as usize].name.clone())?,
                };
                Some(Holding {
                    function,
                    version: if state == PATCHED { Held::New } else { Held::Old },
                    frame: (h >> 40) as u32,
                })
            });
            let unreliable = rec.is_some_and(|r| r.unreliable.load(Ordering::Relaxed));
            pending.push(ThreadReport { tid, comm: outside::comm(tid), activity, holds, unreliable });
        });
        TransitionReport {
            patch: t.patch,
            name: p.map(|p| p.name.clone()).unwrap_or_default(),
            direction: if t.target == PATCHED { PatchState::Patching } else { PatchState::Unpatching },
            reversals: u32::from(t.reversals),
            elapsed: t.started.elapsed(),
            pending,
        }
    }
}

/// Switches thread `tid` by its birth (the kernel's `klp_copy_process`
/// inheritance, without a thread-creation hook). Created after the
/// transition was armed (`armed_tick`), the thread reached every function
/// of the transition through its stub, and its first stub took the slow
/// path (a new thread's mirror is zero, which no stub word matches), which
/// writes its word. With no word of this generation it called none: it
/// holds no frame of any version and is at the target, whatever that is
/// now (after a reversal too: the kernel's new task is in its parent's
/// state, which is the target's direction). A thread that took a slow path
/// has a word of this generation and follows the ordinary rules. The CAS
/// fails if the thread writes its word meanwhile (note §5.4). A forked
/// child's thread is a copy of an older one: `state::after_fork_child`
/// gives it a word of this generation, so it is never taken for new.
fn switch_newborn(tid: i32, t: View, armed_tick: u64) -> bool {
    if !outside::born_after(tid, armed_tick) {
        return false;
    }
    let Some(rec) = state::find_or_claim(tid) else { return false };
    // Acquire pairs with the thread's own AcqRel CASes.
    let w0 = rec.word.load(Ordering::Acquire);
    if (w0 >> 32) as u32 == t.gen {
        return t.effective(w0) == t.target;
    }
    let new = state::word(t.gen, state::epoch(w0), t.target);
    // AcqRel: as every CAS of a thread word.
    rec.word.compare_exchange(w0, new, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

/// The checkpoint op (note §5.3): at any traced function entry, a thread
/// not at the target checks itself and switches if clean. No signal.
struct Checkpoint;

impl TraceOp for Checkpoint {
    fn entry(&self, e: &Entry<'_>) {
        let (Some(ra), Some(sp)) = (e.return_address(), e.stack_pointer()) else { return };
        let start = stack::Start { pc: ra, sp: sp + 8, bp: Some(e.lp_caller_rbp()), exact: false };
        enter::checkpoint(start, e.lp_function_entry());
    }
}

/// Registers the checkpoint op on every function-entry site, gcc pads
/// included, with no thread signalled (rule 9): pads are enabled by their
/// first byte (`trace/mirror.rs`), the tracer set to its one-byte-only
/// mode for this one change when it would otherwise stop the machine (a
/// pad whose mirror cannot be placed is then left out). Live patching
/// does not make pads one instruction, so without this a busy thread that
/// only runs pads would never reach a checkpoint. The op reaches the
/// versions' own entries (a replacement's pad, `versions`: entry ranges)
/// are left out: a thread entering a version came through its stub, which
/// decided already, and a trampoline there would change `r11` on the way
/// into it, which the stubs keep. (`enter::checkpoint` counts the function
/// being entered as held anyway, should a name match one elsewhere.)
fn register_checkpoint(versions: &[(usize, usize)]) -> Option<OpHandle> {
    use crate::trace::PadMode;
    let tracer = Tracer::global();
    let mode = tracer.pad_mode();
    if mode == PadMode::StopMachine {
        // A tracer change made by another thread meanwhile refuses a pad
        // it cannot mirror instead of stopping the machine: the cautious
        // side.
        tracer.set_pad_mode(PadMode::OneByteOnly);
    }
    let in_version = |a: usize| versions.iter().any(|&(lo, hi)| (lo..hi).contains(&a));
    let left_out: std::collections::HashSet<Arc<str>> = tracer
        .functions()
        .into_iter()
        .filter(|f| f.place == crate::trace::SitePlace::FunctionEntry && in_version(f.addr))
        .map(|f| f.function)
        .collect();
    let filter = Filter::new(move |n| !left_out.contains(n));
    let op = tracer.register(Arc::new(Checkpoint), filter).ok();
    if mode == PadMode::StopMachine {
        tracer.set_pad_mode(mode);
    }
    op
}
