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
//! A gcc pad (five one-byte NOPs) gets its first write by stop-machine,
//! as when the tracer first traces one (DESIGN rule 1); from then on it
//! is one instruction and every change is a breakpoint batch.

use super::api::Tracer;
use super::hot;
use super::TraceError;
use crate::arch::{GCC_PAD, NOP5};
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
    /// change); returns what each holds now ([`NOP5`], or [`GCC_PAD`] for
    /// a pad never made one instruction). Sites claimed already are
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
        let now = sites.iter().map(|s| if g.sites[s.index as usize].prepared { NOP5 } else { GCC_PAD }).collect();
        self.after_change(g);
        Ok(now)
    }

    /// Writes claimed sites in one batch: by the breakpoint protocol, or by
    /// stop-machine when a pad gets its first branch. Nothing is written
    /// if it fails.
    pub(crate) fn live_write(&'static self, writes: &[LiveWrite]) -> Result<(), TraceError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut g = self.lock()?;
        let _pins = g.pin_live_objects(writes);
        let mut batch = Batch::with_capacity(writes.len());
        let mut stop_machine = false;
        for w in writes {
            let name = g.by_addr.get(&w.addr).map(|&i| g.sites[i as usize].function.clone());
            let poke = if w.old == GCC_PAD {
                stop_machine = true;
                Poke::region(w.addr, w.old, w.new)
            } else {
                Poke::new(w.addr, w.old, w.new)
            };
            batch.push(match name {
                Some(n) => poke.named(n),
                None => poke,
            });
        }
        // Parked anyway: with `prepare_pads`, every other pad becomes one
        // 5-byte NOP in the same batch, as in the tracer's own changes.
        let mut padded = Vec::new();
        if stop_machine && g.prepare_pads {
            let writing: Vec<usize> =
                writes.iter().filter_map(|w| g.by_addr.get(&w.addr).map(|&i| i as usize)).collect();
            let mut writing = writing;
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
            for w in writes.iter().filter(|w| w.old == GCC_PAD) {
                if let Some(&i) = g.by_addr.get(&w.addr) {
                    g.sites[i as usize].prepared = true; // one instruction from now on
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
