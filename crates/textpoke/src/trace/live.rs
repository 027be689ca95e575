//! The tracer's side of live patching (`crate::live`): function-entry
//! sites claimed by a live patch, and their jumps written.
//!
//! A claimed site belongs to the patch: no op traces it (`apply.rs`'s
//! desired mask is 0 for it, so tracing it stops first, in the claiming
//! call), and its five bytes are whatever the live patcher last wrote
//! there (`jmp` to its transition stub, `jmp` to a replacement, or the
//! NOP). Tracing sees a patched function through the replacement's own
//! entry site, if it has one. Releasing a site gives it back to the
//! tracer, which traces it again if an op's filter matches it.
//!
//! A gcc pad (five one-byte NOPs) never made one instruction is enabled
//! by its first byte, as the tracer's one-byte pad modes do
//! (`trace/mirror.rs`), whatever the tracer's mode: `90` becomes `e9`, a
//! jump to the pad's mirror slot, and the slot holds the `jmp` the live
//! patcher means the site to hold (to its stub, then to the version);
//! later changes repoint the slot (one instruction), and switching it off
//! puts the `90` back. No thread is stopped or signalled (DESIGN rule 9:
//! a thread blocked in `nanosleep` must not see EINTR). Only a pad whose
//! mirror cannot be placed gets its first branch by stop-machine (rule 1),
//! after which it is one instruction.

use super::api::Tracer;
use super::hot;
use super::mirror::NoMirror;
use super::TraceError;
use crate::arch::{GCC_PAD, GCC_PAD_JMP, NOP5};
use crate::{Batch, CommitOptions, Poke, Strategy};
use std::sync::atomic::Ordering;

/// A function-entry site, as live patching sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveSite {
    /// The site's index in the tracer.
    pub index: u32,
    /// Where its five bytes are.
    pub addr: usize,
}

/// One write of a claimed site: from `old` to `new`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LiveWrite {
    pub addr: usize,
    pub old: [u8; 5],
    pub new: [u8; 5],
}

impl Tracer {
    /// The function-entry site of the function entered at `entry`: its
    /// patchable NOP at `entry` or right after an `endbr64` there.
    pub(crate) fn live_entry_site(&'static self, entry: usize) -> Option<LiveSite> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        [entry, entry + 4].into_iter().find_map(|addr| {
            let &i = g.by_addr.get(&addr)?;
            let s = &g.sites[i as usize];
            (s.alive && s.place == hot::SitePlace::FunctionEntry).then_some(LiveSite { index: i, addr })
        })
    }

    /// Claims `sites` for live patching: tracing them stops (one tracer
    /// change); returns what each holds now (its own NOP: [`NOP5`], or
    /// clang's; [`GCC_PAD`] for a pad never made one instruction). Sites claimed already are
    /// refused by the caller, not here.
    pub(crate) fn live_claim(&'static self, sites: &[LiveSite]) -> Result<Vec<[u8; 5]>, TraceError> {
        let mut g = self.lock()?;
        for s in sites {
            g.sites[s.index as usize].live = true;
        }
        if let Err(e) = g.apply(Vec::new()) {
            for s in sites {
                g.sites[s.index as usize].live = false;
            }
            self.after_change(g);
            return Err(e);
        }
        let now = sites
            .iter()
            .map(|s| match &g.sites[s.index as usize] {
                site if site.prepared => site.nop,
                _ => GCC_PAD,
            })
            .collect();
        self.after_change(g);
        Ok(now)
    }

    /// Writes claimed sites in one batch by the breakpoint protocol, no
    /// thread stopped or signalled (DESIGN rule 9). `old` and `new` are
    /// what the live patcher means the site to hold: off (`NOP5`, or
    /// `GCC_PAD` for a pad never made one instruction) or a `jmp`. A gcc
    /// pad never made one instruction is enabled by its first byte (module
    /// docs): its mirror slot jumps where `new` jumps. Only a pad whose
    /// mirror cannot be placed gets its first branch by stop-machine
    /// (rule 1), which signals every thread. Nothing is written if it
    /// fails.
    pub(crate) fn live_write(&'static self, writes: &[LiveWrite]) -> Result<(), TraceError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut g = self.lock()?;
        let _pins = g.pin_live_objects(writes);
        let mut batch = Batch::with_capacity(writes.len());
        let mut stop_machine = false;
        // Slots pointed elsewhere by this batch: (site index, new target).
        let mut moved = Vec::new();
        let session = crate::text::codemem::WriteSession::open();
        let mut made = Ok(());
        for w in writes {
            let i = g.by_addr.get(&w.addr).map(|&i| i as usize);
            let name = i.map(|i| g.sites[i].function.clone());
            let named = |p: Poke| match &name {
                Some(n) => p.named(n.clone()),
                None => p,
            };
            let pad = i.filter(|&i| !g.sites[i].prepared);
            let (Some(i), Some(_)) = (i, pad) else {
                batch.push(named(Poke::new(w.addr, w.old, w.new)));
                continue;
            };
            match (jump_target(w.addr, w.old), jump_target(w.addr, w.new)) {
                (None, None) => {}
                (on, Some(to)) => match g.live_mirror(i, to) {
                    Ok(slot_poke) => {
                        if let Some(p) = slot_poke {
                            batch.push(p);
                        }
                        moved.push((i, to));
                        if on.is_none() {
                            batch.push(named(Poke::first_byte(w.addr, GCC_PAD, GCC_PAD_JMP)));
                        }
                    }
                    Err(NoMirror::Unavailable(_)) if on.is_none() => {
                        // No mirror: one instruction by stop-machine.
                        stop_machine = true;
                        batch.push(named(Poke::region(w.addr, GCC_PAD, w.new)));
                    }
                    Err(NoMirror::Unavailable(why)) => {
                        made = Err(TraceError::CodeGen(format!("live site at {:#x}: {why}", w.addr)));
                        break;
                    }
                    Err(NoMirror::Failed(e)) => {
                        made = Err(e);
                        break;
                    }
                },
                (Some(_), None) => {
                    batch.push(named(Poke::first_byte(w.addr, GCC_PAD_JMP, GCC_PAD)));
                }
            }
        }
        if let Err(source) = session.finish() {
            g.forget_unwritten_code();
            g.forget_unwritten_mirrors(moved.iter().map(|&(i, _)| i));
            return Err(TraceError::TrampolineMemory { near: writes[0].addr, source });
        }
        made?;
        if std::mem::take(&mut g.fresh_code) {
            // New slots are reached only through this batch's sites, whose
            // writes sync every core; serialise first anyway, as the
            // tracer does for fresh code (cross-modifying code).
            crate::sync::sync_cores(crate::sync::best_method())?;
        }
        // Parked anyway: with `prepare_pads`, every other pad becomes one
        // 5-byte NOP in the same batch, as in the tracer's own changes.
        let mut padded = Vec::new();
        if stop_machine && g.prepare_pads {
            let mut writing: Vec<usize> =
                writes.iter().filter_map(|w| g.by_addr.get(&w.addr).map(|&i| i as usize)).collect();
            writing.sort_unstable();
            padded = g.pads_to_prepare(&writing);
            padded.retain(|&i| !g.sites[i].live);
            for &i in &padded {
                let s = &g.sites[i];
                batch.push(Poke::region(s.addr, GCC_PAD, NOP5).named(s.function.clone()));
            }
        }
        let strategy = if stop_machine { Strategy::StopMachine } else { Strategy::Breakpoint };
        let r = batch.commit_with(CommitOptions::strategy(strategy));
        if r.is_ok() {
            for &(i, to) in &moved {
                g.live_mirror_moved(i, to);
            }
            for w in writes.iter().filter(|w| w.old == GCC_PAD && jump_target(w.addr, w.new).is_some()) {
                if let Some(&i) = g.by_addr.get(&w.addr) {
                    if !moved.iter().any(|&(m, _)| m == i as usize) {
                        g.sites[i as usize].prepared = true; // one instruction from now on
                    }
                }
            }
            for i in padded {
                g.sites[i].prepared = true;
            }
        }
        drop(g);
        r.map(drop).map_err(Into::into)
    }

    /// Gives claimed sites (holding their NOP again) back to the tracer.
    pub(crate) fn live_release(&'static self, sites: &[LiveSite]) -> Result<(), TraceError> {
        let mut g = self.lock()?;
        for s in sites {
            g.sites[s.index as usize].live = false;
        }
        let r = g.apply(Vec::new());
        self.after_change(g);
        r
    }

    /// How many times thread `tid` is inside tracer code now (its
    /// quiescence count, as grace periods read it; `None`: not known, or
    /// the thread never entered the tracer and so has no count to read).
    /// Live patching's outside check of a blocked thread: a thread inside
    /// a trampoline or an op's callback may be on its way into the
    /// function whose entry site it traces, a frame no unwind shows yet.
    pub(crate) fn live_tracer_nesting(&self, tid: i32) -> Option<u32> {
        let scan = super::registry::Scan::start();
        let (i, _) = scan.live().into_iter().find(|&(_, t)| t == tid)?;
        match scan.count(i, tid) {
            super::registry::Count::Nesting(n) => Some(n),
            _ => None,
        }
    }

    /// The return trampoline's address, made if needed (marked shadow
    /// entries return through it; the unwinder hooks come with it).
    pub(crate) fn live_return_trampoline(&'static self) -> Result<usize, TraceError> {
        let mut g = self.lock()?;
        g.ensure_return_trampoline()?;
        drop(g);
        // Pairs with the Release store in `ensure_return_trampoline`.
        Ok(hot::RETURN_TRAMPOLINE.load(Ordering::Acquire))
    }
}

/// Where `bytes` at `site` jump (`None`: a NOP, the pad or `NOP5`).
fn jump_target(site: usize, bytes: [u8; 5]) -> Option<usize> {
    (bytes[0] == 0xe9 && bytes != GCC_PAD_JMP).then(|| {
        let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        (site + 5).wrapping_add_signed(rel as isize)
    })
}

impl super::state::Inner {
    /// Pins the objects of the sites `writes` touch for the batch.
    fn pin_live_objects(&self, writes: &[LiveWrite]) -> Vec<crate::sites::Pin> {
        let mut owners: Vec<_> =
            writes.iter().filter_map(|w| self.by_addr.get(&w.addr).map(|&i| self.sites[i as usize].object)).collect();
        owners.sort_unstable_by_key(|o| o.get());
        owners.dedup();
        owners.into_iter().filter_map(|id| self.table.objects().get(id).and_then(|o| o.pin().ok())).collect()
    }
}
