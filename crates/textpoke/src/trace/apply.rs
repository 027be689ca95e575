//! Bringing every site to its desired ops: the four steps of "Changing
//! what is traced" (module docs of `trace`), written once in
//! [`Inner::apply`].

use super::hot::{self, SitePlace};
use super::mirror::{MirrorChange, NoMirror, PadMode};
use super::reclaim::Retired;
use super::state::{Inner, SiteInfo, Target};
use super::tramp_alloc::Wire;
use super::Filter;
use super::TraceError;
use crate::arch::{self, SiteInsn, SITE_NOP as NOP5};
use crate::sites::ObjectId;
use crate::{Batch, CommitOptions, Poke, Strategy};
use std::sync::atomic::Ordering;

// gcc's pad at a patchable entry, five 1-byte NOPs: five instructions,
// made one ([`NOP5`]) only by stop-machine (step 3), or enabled by its
// first byte, `GCC_PAD_JMP` (`mirror.rs`).
#[cfg(target_arch = "x86_64")]
use crate::arch::{GCC_PAD, GCC_PAD_JMP};
// aarch64: a pad's first NOP is the site itself, swapped live with `b stub`
// (`arch/tramp_aarch64.rs`): every site is "prepared" (state.rs) and the
// pad paths below are never taken there.
#[cfg(target_arch = "aarch64")]
const GCC_PAD: SiteInsn = arch::SITE_NOP;
#[cfg(target_arch = "aarch64")]
const GCC_PAD_JMP: SiteInsn = arch::SITE_NOP;

/// One of `Poke`'s constructors, for a site's bytes.
type MakePoke = fn(usize, SiteInsn, SiteInsn) -> Poke;

/// What a traced site becomes: a call to its stub, or for a graph
/// trampoline a jump (its stub and trampoline call the function instead,
/// see `tramp::graph_trampoline`). On aarch64 always a `b`: the stub saves
/// x30 itself (`arch/tramp_aarch64.rs`).
fn site_branch(site: usize, target: Target, stub: usize) -> SiteInsn {
    let b = match target {
        Target::Graph(_) => arch::encode_jmp(site, stub),
        _ if cfg!(target_arch = "aarch64") => arch::encode_jmp(site, stub),
        _ => arch::encode_call(site, stub),
    };
    b.expect("stub in reach")
}

impl Inner {
    /// The registered ops, as [`Inner::desired_mask`] needs them: (id,
    /// filter, wants exits).
    fn live_ops(&self) -> Vec<(usize, &Filter, bool)> {
        let ops = self.ops.iter().enumerate();
        // SAFETY: `boxed` stays valid while the op is registered.
        ops.filter_map(|(id, op)| op.as_ref().map(|o| (id, &o.filter, unsafe { (*o.boxed).wants_exit }))).collect()
    }

    fn desired_mask(s: &SiteInfo, ops: &[(usize, &Filter, bool)]) -> u64 {
        if !s.alive || s.live {
            return 0; // gone, or a live patch's (trace/live.rs)
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

    fn site_bytes(&self, s: &SiteInfo) -> SiteInsn {
        match s.target.stub_kind().and_then(|k| s.stubs[k as usize]) {
            // A pad with a trampoline is one enabled by its first byte.
            Some(_) if !s.prepared => GCC_PAD_JMP,
            Some(stub) => site_branch(s.addr, s.target, stub.code),
            None if s.prepared => s.nop,
            None => GCC_PAD,
        }
    }

    /// Brings every site to its desired op mask: steps 1 to 4 of `trace`'s
    /// module docs, labelled so below.
    pub(super) fn apply(&mut self, retire: Vec<Retired>) -> Result<(), TraceError> {
        struct Change {
            i: usize,
            mask: u64,
            target: Target,
            stub: Option<Wire>,
            /// A pad enabled by its first byte: what its mirror slot becomes.
            mirror: Option<MirrorChange>,
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
        self.forget_refusals();
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
                // Release pairs with the Acquire load of the mask in
                // `hot::on_entry_list`: the new ops are registered (OPS) before.
                hot::site_slot(i as u32).expect("site slot").mask.store(mask, Ordering::Release);
                continue;
            }
            changes.push(Change { i, mask, target, stub: None, mirror: None });
        }
        if changes.is_empty() {
            self.retire(retire);
            return Ok(());
        }
        // 1. Stubs and trampolines for the new targets, their code written
        // together when the session finishes (nothing reaches it before);
        // the mirror slots of pads enabled by their first byte (every
        // object's mirror region mapped first, before any stub block is
        // placed where a slot must go: `mirror.rs`).
        if changes.iter().any(|c| self.wants_mirror(c.i, c.target)) {
            self.reserve_mirrors();
        }
        let writes = crate::text::codemem::WriteSession::open();
        let mut made = Ok(());
        let mut refused = Vec::new();
        for (k, c) in changes.iter_mut().enumerate().filter(|(_, c)| c.target != Target::Off) {
            let w = match self.make_stub(c.i, c.target) {
                Ok(w) => w,
                Err(e) => {
                    made = Err(e);
                    break;
                }
            };
            c.stub = Some(w);
            if !self.wants_mirror(c.i, c.target) {
                continue;
            }
            match self.mirror_for(c.i, c.target, w.stub) {
                Ok(m) => c.mirror = Some(m),
                // Made one instruction by stop-machine in step 3.
                Err(NoMirror::Unavailable(_)) if self.mirrors.mode == PadMode::OneByte => {}
                Err(NoMirror::Unavailable(why)) => {
                    self.refuse_pad(c.i, why);
                    refused.push(k);
                }
                Err(NoMirror::Failed(e)) => {
                    made = Err(e);
                    break;
                }
            }
        }
        if let Err(source) = writes.finish() {
            self.forget_unwritten_code();
            let fresh = changes.iter().filter(|c| c.mirror.is_some_and(|m| m.from.is_none())).map(|c| c.i);
            self.forget_unwritten_mirrors(fresh);
            self.retire(retire);
            return Err(TraceError::TrampolineMemory { near: self.sites[changes[0].i].addr, source });
        }
        if let Err(e) = made {
            self.retire(retire);
            return Err(e);
        }
        // Refused pads (no mirror, no signal allowed) stay as they are.
        for k in refused.into_iter().rev() {
            changes.remove(k);
        }
        if changes.is_empty() {
            self.retire(retire);
            return Ok(());
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
        // its branch (rule 1) other than by its first byte.
        let mut batch = Batch::with_capacity(changes.len());
        let mut split = false;
        for c in &changes {
            let s = &self.sites[c.i];
            if !s.alive {
                continue; // its object is gone: nothing to write
            }
            if let Some(p) = c.mirror.and_then(|m| self.mirror_poke(c.i, m)) {
                batch.push(p); // the pad's slot, jmp to jmp
            }
            let old = self.site_bytes(s);
            let (new, poke): (SiteInsn, MakePoke) = match (c.stub, c.mirror) {
                (Some(_), Some(_)) => (GCC_PAD_JMP, Poke::first_byte),
                (Some(w), None) if s.prepared => (site_branch(s.addr, c.target, w.stub), Poke::new),
                (Some(w), None) => (site_branch(s.addr, c.target, w.stub), Poke::region),
                (None, _) if s.prepared => (s.nop, Poke::new),
                (None, _) => (GCC_PAD, Poke::first_byte), // a pad enabled by its first byte goes off
            };
            if old == new {
                continue; // the site keeps its stub (or slot): its word changes in step 4
            }
            split |= !s.prepared && c.mirror.is_none() && c.stub.is_some();
            batch.push(poke(s.addr, old, new).named(s.function.clone()));
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
            batch.push(Poke::region(s.addr, GCC_PAD, NOP5).named(s.function.clone()));
        }
        for c in &changes {
            // Release pairs with the Acquire load in `hot::on_entry_list` (list
            // trampolines); the other trampolines bake their op in, and a thread
            // reaches them after step 3's syncs or through a word stored with
            // Release in step 1.
            hot::site_slot(c.i as u32).expect("site slot").mask.store(c.mask, Ordering::Release);
        }
        let strategy = if split { Strategy::StopMachine } else { Strategy::Breakpoint };
        if let Err(e) = batch.commit_with(CommitOptions::strategy(strategy)) {
            for c in &changes {
                // Put back (Release: partner as in step 2); the batch wrote nothing.
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
            if let Some(m) = c.mirror {
                self.mirror_committed(c.i, m);
            }
            let s = &mut self.sites[c.i];
            // A pad written by stop-machine is one instruction now; one
            // enabled by its first byte is still the pad after it.
            s.prepared |= c.stub.is_some() && c.mirror.is_none();
            s.mask = c.mask;
            s.target = c.target;
        }
        self.retire(retire);
        Ok(())
    }

    /// The live sites still in gcc's five-one-byte-NOP form that `changing`
    /// (site indexes, ascending) does not write.
    pub(super) fn pads_to_prepare(&self, changing: &[usize]) -> Vec<usize> {
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
}
