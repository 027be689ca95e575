//! gcc's pads traced by changing one byte: each site's *mirror* (attach.md
//! §6.3).
//!
//! # Why
//!
//! A gcc pad (`-fpatchable-function-entry=5`) is five one-byte NOPs: five
//! instructions, which rule 1 of DESIGN.md forbids combining into one
//! `call` while a thread may be between two of them. The stop-machine
//! strategy does it with every thread parked by a signal, and that signal
//! makes a thread waiting in `nanosleep`, `epoll_wait`... return `EINTR`:
//! not allowed in a process textpoke attached to (rule 9).
//!
//! # The one-byte enable
//!
//! Change the first byte only, `90` to `e9` ([`arch::GCC_PAD_JMP`]): the
//! four NOPs after it become the displacement of a `jmp rel32`, which
//! lands `0x6f6f6f6b` bytes (about 1.74 GiB) below the site
//! ([`arch::gcc_pad_jmp_target`]). The byte goes back to `90` to disable
//! the site, and detach leaves the pad exactly as the compiler wrote it.
//! One byte, a whole instruction at each end, the rest never written: a
//! [`Poke::first_byte`], committed by the breakpoint protocol while every
//! thread runs (`text::validate` has the rule and its proof; a thread
//! trapping at the byte is emulated as the jump, or as one NOP going back).
//!
//! Where the jump lands, the tracer puts the site's **mirror slot**: a
//! 5-byte `jmp` to the site's *entry*:
//!
//! - for a graph trampoline, the site's graph stub, which sites enter by
//!   a jump anyway;
//! - for the others (direct, list and count trampolines, whose call stubs
//!   expect the return address a `call` at the site pushes), the site's
//!   **adapter** for that stub, `call stub; jmp site+5`: the stub sees the
//!   stack a call from the site would have made (the adapter's return
//!   address where the site's would be, the function's own return address
//!   above it), and its trampoline returns into the adapter, which goes
//!   on where the site's call would have returned. Calls and returns pair
//!   up.
//!
//! A site always *jumps* to its slot, never calls it: a thread may sit on
//! the slot's `jmp` for as long as the scheduler likes (it jumped from the
//! site, was preempted, and runs the slot's instruction later, whatever
//! it holds by then), so every entry a slot ever points to must be one a
//! thread enters by a jump. When a site changes trampoline kind its slot
//! is pointed at the other entry by a one-instruction poke (`jmp` to
//! `jmp`) in the same breakpoint batch; stubs and adapters are per site
//! and never freed while the object is loaded, so a late thread still
//! lands in code of its own site.
//!
//! # Mirror memory
//!
//! Slots are 5 bytes at an address the site dictates, so they are laid
//! out as the sites are. The first time a pad is enabled this way, every
//! loaded object with pads gets its **mirror region**, the pages covering
//! its pads' slots, mapped readable and executable at once with
//! `MAP_FIXED_NOREPLACE` (an existing mapping is never replaced) before
//! any stub block is placed, so that no block of the tracer's sits where
//! a slot must go. Slots are written through `/proc/self/mem` like every
//! code block; pages never written cost no memory. Where a region's range
//! is taken, its pages are mapped one by one as slots need them. A region
//! lives as long as its object is loaded (a thread may be on a slot's
//! first instruction) and is retired with the object's stubs.
//!
//! Stubs and adapters of such a pad are placed within rel32 reach of both
//! the site and its slot (`tramp_alloc`).
//!
//! # Where no mirror can be placed
//!
//! The slot may be below the lowest address a process may map (a program
//! linked at `0x400000`: not position-independent), its page may be taken
//! by another mapping, or no stub memory may be found within reach of
//! both. Then, with [`PadMode::OneByte`], the pad is made one 5-byte
//! instruction by stop-machine as before (signalling every thread); with
//! [`PadMode::OneByteOnly`] (an attached process: no thread may get a
//! signal) the site is left untraced, and [`Tracer::refused_pads`] says
//! which and why.
//!
//! [`Tracer::refused_pads`]: super::Tracer::refused_pads

use super::state::{Inner, StubKind, Target};
use super::TraceError;
use crate::arch;
use crate::sites::ObjectId;
use crate::text::codemem::CodeBlock;
use crate::Poke;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// How gcc's pads (five one-byte NOPs) get their branch when first traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadMode {
    /// Rewritten into one 5-byte NOP by the stop-machine strategy, which
    /// parks every thread with a signal (a thread in `nanosleep` or
    /// `epoll_wait` gets `EINTR`); from then on flipped by the breakpoint
    /// protocol. Right where no other thread runs yet (a preloaded agent's
    /// first change, from a constructor).
    #[default]
    StopMachine,
    /// Only the first byte changes (`90` to `e9`, a jump to the site's
    /// mirror; see `trace::mirror`): no thread is stopped or signalled,
    /// and disabling gives the pad its exact bytes back. A pad whose
    /// mirror cannot be placed is converted by stop-machine, as above.
    OneByte,
    /// As [`PadMode::OneByte`], but a pad whose mirror cannot be placed is
    /// left untraced ([`super::Tracer::refused_pads`] says why): the
    /// tracer never signals a thread. For a process textpoke attached to.
    OneByteOnly,
}

/// A pad the tracer left untraced although an op's filter matches it
/// ([`PadMode::OneByteOnly`]: its mirror cannot be placed).
#[derive(Debug, Clone)]
pub struct RefusedPad {
    pub site: u32,
    pub function: Arc<str>,
    /// The pad.
    pub addr: usize,
    /// Why its mirror cannot be placed, and what to do (the same text for
    /// every pad refused for the same cause).
    pub reason: String,
}

/// The lowest address a slot may have (the kernel's usual
/// `vm.mmap_min_addr`).
const MIN_SLOT: usize = 0x10000;

/// The mirror state of the tracer: its memory, each pad's slot and
/// adapters, the pads refused.
#[derive(Default)]
pub(super) struct Mirrors {
    pub(super) mode: PadMode,
    /// Mirror memory by start address (never overlapping), each with the
    /// objects whose slots it holds.
    blocks: BTreeMap<usize, MirrorBlock>,
    /// Objects whose region was mapped, or tried (their pages are then
    /// mapped one by one).
    tried: HashSet<ObjectId>,
    /// Slots by site index: written once, never freed while the object is
    /// loaded.
    slots: HashMap<u32, Slot>,
    /// Adapters by (site index, stub kind): never freed either.
    adapters: HashMap<(u32, u8), usize>,
    /// Pads left untraced ([`PadMode::OneByteOnly`]), by site index.
    refused: BTreeMap<u32, String>,
}

struct MirrorBlock {
    code: CodeBlock,
    objects: Vec<ObjectId>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The entry its `jmp` goes to now.
    to: usize,
}

/// What a change of a pad enabled by one byte does to its slot: `from`
/// (`None`: the slot was just made and written) becomes `to`.
#[derive(Debug, Clone, Copy)]
pub(super) struct MirrorChange {
    pub(super) slot: usize,
    pub(super) from: Option<usize>,
    pub(super) to: usize,
}

/// Why a pad cannot be enabled by one byte.
pub(super) enum NoMirror {
    /// Its mirror cannot be placed (the message says why): convert it by
    /// stop-machine, or refuse it.
    Unavailable(String),
    /// The tracer failed (memory, code generation): the change fails.
    Failed(TraceError),
}

impl From<TraceError> for NoMirror {
    fn from(e: TraceError) -> NoMirror {
        NoMirror::Failed(e)
    }
}

impl Mirrors {
    /// The block of mirror memory holding `addr`.
    fn block_at(&self, addr: usize) -> Option<&MirrorBlock> {
        let (_, b) = self.blocks.range(..=addr).next_back()?;
        b.code.contains(addr).then_some(b)
    }

    fn block_at_mut(&mut self, addr: usize) -> Option<&mut MirrorBlock> {
        let (_, b) = self.blocks.range_mut(..=addr).next_back()?;
        b.code.contains(addr).then_some(b)
    }

    /// Notes that `object` has slots in the block holding `addr` (it then
    /// lives as long as `object` is loaded); false if no block holds it.
    fn share(&mut self, addr: usize, object: ObjectId) -> bool {
        match self.block_at_mut(addr) {
            Some(b) => {
                if !b.objects.contains(&object) {
                    b.objects.push(object);
                }
                true
            }
            None => false,
        }
    }

    fn add(&mut self, code: CodeBlock, object: ObjectId) {
        self.blocks.insert(code.addr(), MirrorBlock { code, objects: vec![object] });
    }
}

impl Inner {
    /// Where site `i`'s slot is, if it is a live gcc pad the one-byte mode
    /// handles (in either direction) and the slot's address can exist.
    pub(super) fn mirror_addr(&self, i: usize) -> Option<usize> {
        let s = &self.sites[i];
        let one_byte = self.mirrors.mode != PadMode::StopMachine;
        (one_byte && s.alive && !s.prepared)
            .then(|| arch::gcc_pad_jmp_target(s.addr))
            .flatten()
            .filter(|&m| m >= MIN_SLOT)
    }

    /// Whether a change of site `i` to `target` needs its mirror: a live
    /// pad getting a trampoline in one of the one-byte modes.
    pub(super) fn wants_mirror(&self, i: usize, target: Target) -> bool {
        let s = &self.sites[i];
        self.mirrors.mode != PadMode::StopMachine && s.alive && !s.prepared && target != Target::Off
    }

    /// Maps the mirror region of every loaded object with pads whose
    /// region was not tried yet (see the module docs): before any stub of
    /// theirs is placed.
    pub(super) fn reserve_mirrors(&mut self) {
        let mut spans: HashMap<ObjectId, (usize, usize)> = HashMap::new();
        for i in 0..self.sites.len() {
            let Some(slot) = self.mirror_addr(i) else { continue };
            let object = self.sites[i].object;
            if self.mirrors.tried.contains(&object) {
                continue;
            }
            let span = spans.entry(object).or_insert((slot, slot));
            span.0 = span.0.min(slot);
            span.1 = span.1.max(slot);
        }
        let ps = crate::text::page_size();
        for (object, (lo, hi)) in spans {
            self.mirrors.tried.insert(object);
            let (mut start, mut end) = (lo & !(ps - 1), (hi + arch::REL32_LEN).next_multiple_of(ps));
            // A page at either end may hold another object's slots already.
            while start < end && self.mirrors.share(start, object) {
                start += ps;
            }
            while start < end && self.mirrors.share(end - ps, object) {
                end -= ps;
            }
            if start < end {
                // Taken: its pages are mapped one by one (`slot_pages`).
                if let Ok(code) = CodeBlock::exactly(start, end - start) {
                    self.mirrors.add(code, object);
                }
            }
        }
    }

    /// Maps the pages of slot `slot` (site `i`'s) that are not mapped yet.
    fn slot_pages(&mut self, i: usize, slot: usize) -> Result<(), NoMirror> {
        let object = self.sites[i].object;
        let ps = crate::text::page_size();
        for page in [slot & !(ps - 1), (slot + arch::REL32_LEN - 1) & !(ps - 1)] {
            if self.mirrors.share(page, object) {
                continue;
            }
            match CodeBlock::exactly(page, ps) {
                Ok(code) => self.mirrors.add(code, object),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    return Err(NoMirror::Unavailable(
                        "the address its first byte would jump to, 1.74 GiB below it, is taken by another mapping"
                            .into(),
                    ))
                }
                Err(e) => {
                    return Err(NoMirror::Unavailable(format!(
                        "the address its first byte would jump to, 1.74 GiB below it, cannot be mapped: {e}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Writes `bytes` at `at` in mirror memory (within a write session:
    /// when it finishes). The bytes must be mapped and never run yet.
    fn write_mirror(&mut self, at: usize, bytes: &[u8]) -> Result<(), NoMirror> {
        let mut done = 0;
        while done < bytes.len() {
            let a = at + done;
            let b = self.mirrors.block_at(a).expect("the slot's pages are mapped");
            let n = (b.code.addr() + b.code.len() - a).min(bytes.len() - done);
            b.code
                .write(a - b.code.addr(), &bytes[done..done + n])
                .map_err(|e| NoMirror::Unavailable(format!("its mirror at {at:#x} cannot be written: {e}")))?;
            done += n;
        }
        self.fresh_code = true;
        Ok(())
    }

    /// Site `i`'s adapter for its call stub `stub` of `kind`: `call stub;
    /// jmp site+5`, made on first need in the site's stub memory.
    fn adapter(&mut self, i: usize, kind: StubKind, stub: usize) -> Result<usize, NoMirror> {
        if let Some(&a) = self.mirrors.adapters.get(&(i as u32, kind as u8)) {
            return Ok(a);
        }
        let resume = self.sites[i].addr + arch::REL32_LEN;
        let (sb, at) = self.stub_code_slot(i)?;
        let (Some(call), Some(jmp)) = (arch::encode_call(at, stub), arch::encode_jmp(at + arch::REL32_LEN, resume))
        else {
            return Err(NoMirror::Unavailable("no stub memory is free within reach of it and of its mirror".into()));
        };
        let mut code = [0u8; 2 * arch::REL32_LEN];
        code[..arch::REL32_LEN].copy_from_slice(&call);
        code[arch::REL32_LEN..].copy_from_slice(&jmp);
        let blk = &self.stub_blocks[sb].as_ref().expect("live stub block").code;
        blk.write(at - blk.addr(), &code).map_err(|source| TraceError::TrampolineMemory { near: at, source })?;
        self.fresh_code = true;
        self.mirrors.adapters.insert((i as u32, kind as u8), at);
        Ok(at)
    }

    /// Prepares site `i`'s mirror for `target`, reached through its stub
    /// at `stub` (step 1 of a change): the slot's pages, the entry (the
    /// graph stub, or the stub's adapter), and a new slot written. What
    /// the slot must become, or why the pad cannot be enabled so.
    pub(super) fn mirror_for(&mut self, i: usize, target: Target, stub: usize) -> Result<MirrorChange, NoMirror> {
        let Some(slot) = self.mirror_addr(i) else {
            return Err(NoMirror::Unavailable(format!(
                "its first byte would jump below address {MIN_SLOT:#x} (a program linked at a fixed address, not \
                 position-independent); rebuild it with -fPIE -pie, or run it under `textpoke record`"
            )));
        };
        self.slot_pages(i, slot)?;
        let entry = match target.stub_kind().expect("a target with a stub") {
            StubKind::Graph => stub,
            kind => self.adapter(i, kind, stub)?,
        };
        let Some(jmp) = arch::encode_jmp(slot, entry) else {
            return Err(NoMirror::Unavailable("no stub memory is free within reach of it and of its mirror".into()));
        };
        if let Some(s) = self.mirrors.slots.get(&(i as u32)) {
            return Ok(MirrorChange { slot, from: Some(s.to), to: entry });
        }
        // A new slot: nothing jumps there before the batch enabling the site.
        self.write_mirror(slot, &jmp)?;
        self.mirrors.slots.insert(i as u32, Slot { to: entry });
        Ok(MirrorChange { slot, from: None, to: entry })
    }

    /// Live patching (`trace/live.rs`): site `i`'s slot made to jump to
    /// `to` (a live stub or version, entered by a jump), whatever the
    /// tracer's pad mode. A new slot is written now (inside the caller's
    /// write session; nothing jumps there before the batch enabling the
    /// site); an existing one gives the poke changing it (`None`: it jumps
    /// to `to` already). [`Inner::live_mirror_moved`] once the batch is in.
    pub(super) fn live_mirror(&mut self, i: usize, to: usize) -> Result<Option<Poke>, NoMirror> {
        let s = &self.sites[i];
        let slot = (s.alive && !s.prepared)
            .then(|| arch::gcc_pad_jmp_target(s.addr))
            .flatten()
            .filter(|&m| m >= MIN_SLOT)
            .ok_or_else(|| {
                NoMirror::Unavailable("its first byte would jump below the lowest mappable address".into())
            })?;
        let Some(jmp) = arch::encode_jmp(slot, to) else {
            return Err(NoMirror::Unavailable(format!("{to:#x} is out of rel32 reach of its mirror at {slot:#x}")));
        };
        if let Some(cur) = self.mirrors.slots.get(&(i as u32)) {
            let from = cur.to;
            return Ok(self.mirror_poke(i, MirrorChange { slot, from: Some(from), to }));
        }
        self.slot_pages(i, slot)?;
        self.write_mirror(slot, &jmp)?;
        self.mirrors.slots.insert(i as u32, Slot { to });
        Ok(None)
    }

    /// The batch with [`Inner::live_mirror`]'s poke of site `i` is in: its
    /// slot jumps to `to`.
    pub(super) fn live_mirror_moved(&mut self, i: usize, to: usize) {
        if let Some(s) = self.mirrors.slots.get_mut(&(i as u32)) {
            s.to = to;
        }
    }

    /// The poke pointing a slot at its new entry, if it changes.
    pub(super) fn mirror_poke(&self, i: usize, m: MirrorChange) -> Option<Poke> {
        let from = m.from.filter(|&f| f != m.to)?;
        let old = arch::encode_jmp(m.slot, from).expect("the slot reached it");
        let new = arch::encode_jmp(m.slot, m.to).expect("checked by mirror_for");
        Some(Poke::new(m.slot, old, new).named(format!("{} (mirror)", self.sites[i].function)))
    }

    /// The batch that pointed slots elsewhere was committed.
    pub(super) fn mirror_committed(&mut self, i: usize, m: MirrorChange) {
        if let Some(s) = self.mirrors.slots.get_mut(&(i as u32)) {
            s.to = m.to;
        }
    }

    /// Site `i` is left untraced: its mirror cannot be placed.
    pub(super) fn refuse_pad(&mut self, i: usize, why: String) {
        self.mirrors.refused.insert(i as u32, why);
    }

    /// Forgets the refusals of the last change: each change finds its own
    /// (a refused pad is a change again, its mask not being what the ops
    /// want).
    pub(super) fn forget_refusals(&mut self) {
        self.mirrors.refused.clear();
    }

    /// The pads left untraced, and why.
    pub(super) fn refused_pads(&self) -> Vec<RefusedPad> {
        let refused = self.mirrors.refused.iter();
        refused
            .filter(|(&i, _)| self.sites[i as usize].alive)
            .map(|(&i, why)| {
                let s = &self.sites[i as usize];
                RefusedPad { site: i, function: s.function.clone(), addr: s.addr, reason: why.clone() }
            })
            .collect()
    }

    /// After a write session failed: the slots made in it (`fresh`: their
    /// sites) may not be written, and adapters in poisoned stub blocks
    /// that no slot points to may not be either; forget them (they are
    /// made again at the next need).
    pub(super) fn forget_unwritten_mirrors(&mut self, fresh: impl Iterator<Item = usize>) {
        for i in fresh {
            self.mirrors.slots.remove(&(i as u32));
        }
        let poisoned = self.poisoned_stub_ranges();
        let used: HashSet<usize> = self.mirrors.slots.values().map(|s| s.to).collect();
        self.mirrors.adapters.retain(|_, a| used.contains(a) || !poisoned.iter().any(|r| r.contains(a)));
    }

    /// Retires the mirror memory of objects no longer loaded (`loaded`),
    /// with the slots, adapters and refusals of their sites: as their
    /// stubs (see `retire_stubs_of_unloaded_objects`).
    pub(super) fn retire_mirrors(&mut self, loaded: &HashSet<ObjectId>) -> Vec<CodeBlock> {
        self.mirrors.tried.retain(|o| loaded.contains(o));
        let gone: Vec<usize> = self
            .mirrors
            .blocks
            .iter()
            .filter(|(_, b)| b.objects.iter().all(|o| !loaded.contains(o)))
            .map(|(&a, _)| a)
            .collect();
        let dead = |sites: &[super::state::SiteInfo], i: u32| !loaded.contains(&sites[i as usize].object);
        self.mirrors.slots.retain(|&i, _| !dead(&self.sites, i));
        self.mirrors.adapters.retain(|&(i, _), _| !dead(&self.sites, i));
        self.mirrors.refused.retain(|&i, _| !dead(&self.sites, i));
        gone.into_iter().filter_map(|a| self.mirrors.blocks.remove(&a)).map(|b| b.code).collect()
    }

    /// Whether any mirror memory exists (nothing to retire otherwise).
    pub(super) fn has_mirrors(&self) -> bool {
        !self.mirrors.blocks.is_empty()
    }
}
