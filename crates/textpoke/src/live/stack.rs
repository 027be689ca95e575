//! Stack checks: is any frame of a set of functions on a thread's stack?
//!
//! Two ways, as in the note's §6.2/§6.3:
//!
//! 1. **A reliable unwind** over the loaded objects' `.eh_frame` (gimli's
//!    CFI reader, through each object's `.eh_frame_hdr` search table, read
//!    in place; no allocation: the unwind context lives on the stack). It
//!    counts as reliable only when every frame's address has an FDE, the
//!    CFA is `rsp`/`rbp` plus an offset with the register known, the
//!    return address is saved at an offset from the CFA, the stack pointer
//!    strictly grows (but across a signal frame), and the walk ends at a
//!    frame whose return address is undefined (glibc's `_start` and
//!    `clone3` mark the outermost frame so). A return address equal to the
//!    return trampoline is the shadow entry's original (the entry whose
//!    slot is CFA - 8); no such entry: unreliable. A signal frame (glibc's
//!    `__restore_rt`, its FDE marked so) is crossed through the
//!    `ucontext` the kernel saved: the walk goes on from the interrupted
//!    `rip`, `rsp` and `rbp`, an exact PC. An exact PC (where a thread is,
//!    or was interrupted) in code of no loaded object is a hit on
//!    [`TRANSIT`]: a tracer stub, trampoline or mirror slot may be between
//!    a version's entry site and its body, which no frame shows yet.
//! 2. **A conservative scan** of every 8-byte word from the stack pointer
//!    to the end of its mapping, the PC, and every shadow entry's original
//!    return address: a hit is any of them inside a checked function. Sound
//!    without unwinding (a frame's return address stays in its slot until
//!    it returns; `call` pushes 8-aligned), it can only err towards "on the
//!    stack" (stale words). Used when the unwind is not reliable.
//!
//! The live stubs and the slow path are "transit" ranges: a thread found
//! inside them is about to enter a version it chose already, so it counts
//! as holding one.

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, NativeEndian, Pointer, Register, RegisterRule, UnwindContext,
    UnwindContextStorage, UnwindSection, UnwindTableRow, X86_64,
};
use std::sync::atomic::{AtomicPtr, Ordering};

/// A function-address range checked, `[lo, hi]` (hi inclusive: a call as
/// a function's last instruction returns one past its end), and what it
/// stands for: an index into the transition's functions, or [`TRANSIT`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Range {
    pub lo: usize,
    pub hi: usize,
    pub func: u32,
}

/// [`Range::func`] of the live stubs and the slow path.
pub(super) const TRANSIT: u32 = u32::MAX;

/// Ranges, sorted by `lo`.
#[derive(Debug, Clone, Default)]
pub(super) struct Ranges(Vec<Range>);

impl Ranges {
    pub(super) fn new(mut v: Vec<Range>) -> Ranges {
        v.sort_unstable_by_key(|r| r.lo);
        Ranges(v)
    }
    /// The range holding `pc`.
    pub(super) fn find(&self, pc: usize) -> Option<u32> {
        let i = self.0.partition_point(|r| r.lo <= pc);
        self.0[..i].iter().rev().take(8).find(|r| pc <= r.hi).map(|r| r.func)
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No frame of the checked functions.
    Clean,
    /// A frame of function `func` (or [`TRANSIT`]), `frame` frames (or for
    /// a scan, words) from the top.
    Hit { func: u32, frame: u32, reliable: bool },
    /// The unwind could not be trusted.
    Unreliable,
}

// ---------------------------------------------------------------- modules

/// One loaded object's unwind tables, in memory.
struct Module {
    /// Its executable range.
    lo: usize,
    hi: usize,
    hdr: &'static [u8],
    eh_frame: &'static [u8],
    bases: BaseAddresses,
}

struct Modules {
    counters: Option<(u64, u64)>,
    list: Vec<Module>,
    /// Every loaded object's executable range, sorted (with unwind tables
    /// or without).
    code: Vec<(usize, usize)>,
}

/// The current module table. Replaced tables are leaked (a reader may be
/// walking one; they are small and change only when objects come and go).
static MODULES: AtomicPtr<Modules> = AtomicPtr::new(std::ptr::null_mut());

/// Rebuilds the module table if objects were loaded or unloaded since
/// (control side).
pub(super) fn refresh_modules() {
    let counters = crate::sys::loader::counters();
    // Acquire pairs with the Release store below.
    let cur = MODULES.load(Ordering::Acquire);
    // SAFETY: tables are leaked, never freed.
    if let Some(m) = unsafe { cur.as_ref() } {
        if counters.is_some() && m.counters == counters {
            return;
        }
    }
    let mut list = Vec::new();
    let mut code = Vec::new();
    crate::sys::loader::for_each_object(|o| {
        if let Some(m) = module_of(o) {
            list.push(m);
        }
        code.extend(exec_range(o));
        std::ops::ControlFlow::Continue(())
    });
    list.sort_unstable_by_key(|m| m.lo);
    code.sort_unstable();
    let table = Box::into_raw(Box::new(Modules { counters, list, code }));
    // Release pairs with the Acquire loads: the table is complete.
    MODULES.store(table, Ordering::Release);
}

/// The range covering an object's executable segments.
fn exec_range(o: &crate::sys::loader::LoadedObjectInfo<'_>) -> Option<(usize, usize)> {
    let exec = o.phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0);
    let (lo, hi) = exec.fold((usize::MAX, 0), |(a, b), p| {
        (a.min(o.bias + p.p_vaddr as usize), b.max(o.bias + (p.p_vaddr + p.p_memsz) as usize))
    });
    (lo < hi).then_some((lo, hi))
}

fn module_of(o: &crate::sys::loader::LoadedObjectInfo<'_>) -> Option<Module> {
    let loads: Vec<(usize, usize, bool)> = o
        .phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_LOAD)
        .map(|p| (o.bias + p.p_vaddr as usize, o.bias + (p.p_vaddr + p.p_memsz) as usize, p.p_flags & libc::PF_X != 0))
        .collect();
    let hdr_ph = o.phdrs.iter().find(|p| p.p_type == libc::PT_GNU_EH_FRAME)?;
    let hdr_addr = o.bias + hdr_ph.p_vaddr as usize;
    let (lo, hi) = loads.iter().filter(|l| l.2).fold((usize::MAX, 0), |(a, b), l| (a.min(l.0), b.max(l.1)));
    if lo >= hi {
        return None;
    }
    let seg_end = |addr: usize| loads.iter().find(|l| l.0 <= addr && addr < l.1).map(|l| l.1);
    let hdr_end = seg_end(hdr_addr)?;
    // SAFETY: the header lies in a loaded segment of a loaded object,
    // mapped for as long as the object is (module docs on unloading).
    let hdr: &'static [u8] = unsafe { std::slice::from_raw_parts(hdr_addr as *const u8, hdr_end - hdr_addr) };
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr as u64);
    let parsed = EhFrameHdr::new(hdr, NativeEndian).parse(&bases, 8).ok()?;
    let Pointer::Direct(eh) = parsed.eh_frame_ptr() else { return None };
    let eh = eh as usize;
    let eh_end = seg_end(eh)?;
    // SAFETY: as for the header.
    let eh_frame: &'static [u8] = unsafe { std::slice::from_raw_parts(eh as *const u8, eh_end - eh) };
    let bases = bases.set_eh_frame(eh as u64);
    Some(Module { lo, hi, hdr, eh_frame, bases })
}

/// Whether `pc` lies in a loaded object's code (not in anonymous code:
/// the tracer's stubs, trampolines and mirror slots, live stubs, a JIT's).
pub(super) fn in_object(pc: usize) -> bool {
    // Acquire pairs with refresh_modules' Release store.
    // SAFETY: tables are leaked, never freed.
    let Some(m) = (unsafe { MODULES.load(Ordering::Acquire).as_ref() }) else { return true };
    let i = m.code.partition_point(|r| r.0 <= pc);
    m.code[..i].last().is_some_and(|r| pc < r.1)
}

fn module_for(pc: usize) -> Option<&'static Module> {
    // Acquire pairs with refresh_modules' Release store.
    // SAFETY: tables are leaked, never freed.
    let m = unsafe { MODULES.load(Ordering::Acquire).as_ref() }?;
    let i = m.list.partition_point(|m| m.lo <= pc);
    m.list[..i].last().filter(|m| pc < m.hi)
}

// ---------------------------------------------------------------- unwinding

/// Unwind context storage on the stack: x86-64 has 17 DWARF registers
/// and the return address; glibc nests `remember_state` once or twice.
struct OnStack;

impl UnwindContextStorage<usize> for OnStack {
    type Rules = [(Register, RegisterRule<usize>); 24];
    type Stack = [UnwindTableRow<usize, OnStack>; 4];
}

/// Where an unwind starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Start {
    pub pc: usize,
    pub sp: usize,
    pub bp: Option<usize>,
    /// `pc` is where the thread is (not a return address).
    pub exact: bool,
}

/// Reads 8 bytes of the stack.
pub(super) trait Memory {
    fn word(&self, addr: usize) -> Option<usize>;
    /// Copies what it can at `addr` into `buf`; how many bytes.
    fn bytes(&self, addr: usize, buf: &mut [u8]) -> usize;
}

/// This process's memory, read without faulting (`process_vm_readv`).
pub(super) struct OwnMemory;

impl Memory for OwnMemory {
    fn word(&self, addr: usize) -> Option<usize> {
        let mut b = [0u8; 8];
        (crate::sys::mem::read_memory(addr, &mut b) == 8).then(|| usize::from_ne_bytes(b))
    }
    fn bytes(&self, addr: usize, buf: &mut [u8]) -> usize {
        crate::sys::mem::read_memory(addr, buf)
    }
}

/// A copy of a stack from `base`.
pub(super) struct Snapshot {
    pub base: usize,
    pub bytes: Vec<u8>,
}

impl Memory for Snapshot {
    fn word(&self, addr: usize) -> Option<usize> {
        let off = addr.checked_sub(self.base)?;
        let b = self.bytes.get(off..off + 8)?;
        Some(usize::from_ne_bytes(b.try_into().ok()?))
    }
    fn bytes(&self, addr: usize, buf: &mut [u8]) -> usize {
        let Some(off) = addr.checked_sub(self.base) else { return 0 };
        let src = self.bytes.get(off..).unwrap_or(&[]);
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        n
    }
}

/// Whether shadow entry `e` still stands for a frame of a stack whose
/// pointer is `sp` and whose lowest address is `lo` (`sp` when unknown).
/// A frame left by `longjmp`, or by an exception caught past the
/// trampoline, leaves its entry behind until a later return through the
/// trampoline drops it (`on_return`), which a blocked thread never makes.
/// Such an entry's slot lies in `[lo, sp)` (below the stack pointer, on
/// the same stack), or no longer holds what the entry put there (the
/// return trampoline; the original once restored for an unwinder, low bit
/// of `slot`): a live frame's return slot always does. An unreadable slot
/// counts as live (this can only err towards "on the stack").
pub(super) fn entry_alive(
    e: &crate::trace::LpShadowEntry,
    (lo, sp): (usize, usize),
    mem: &dyn Memory,
    return_trampoline: usize,
) -> bool {
    let (slot, restored) = (e.slot & !1, e.slot & 1 != 0);
    if (lo..sp).contains(&slot) {
        return false;
    }
    match mem.word(slot) {
        Some(w) => w == if restored { e.orig } else { return_trampoline },
        None => true,
    }
}

/// What an unwind needs besides memory: the ranges to look for, the
/// return trampoline, and the shadow entries' originals by slot.
pub(super) struct Lookups<'a> {
    pub ranges: &'a Ranges,
    pub return_trampoline: usize,
    pub shadow: &'a dyn Fn(usize) -> Option<usize>,
}

/// Unwinds from `start`; a hit as soon as a frame's PC is in a range.
pub(super) fn unwind(start: Start, mem: &dyn Memory, l: &Lookups<'_>) -> Verdict {
    let mut ctx = UnwindContext::<usize, OnStack>::new_in();
    let (mut pc, mut sp, mut bp, mut exact) = (start.pc, start.sp, start.bp, start.exact);
    for frame in 0..4096u32 {
        if pc == 0 {
            return Verdict::Unreliable;
        }
        if let Some(func) = l.ranges.find(pc) {
            return Verdict::Hit { func, frame, reliable: true };
        }
        if exact && !in_object(pc) {
            // Where the thread is (or was when a signal came), in code of no
            // loaded object: a tracer stub, trampoline or mirror slot, maybe
            // between a version's entry site and its body (no frame shows
            // that yet), or a JIT's code. In transit.
            return Verdict::Hit { func: TRANSIT, frame, reliable: true };
        }
        let lookup = if exact { pc } else { pc - 1 };
        let step = match step(&mut ctx, lookup, sp, bp, mem) {
            Some(StepOrSignal::Step(s)) => s,
            Some(StepOrSignal::Signal) => {
                // A signal frame: go on from the interrupted context.
                let Some(regs) = interrupted(sp, mem) else { return Verdict::Unreliable };
                (pc, sp, bp, exact) = (regs.0, regs.1, Some(regs.2), true);
                continue;
            }
            None => return Verdict::Unreliable,
        };
        let Step { cfa, ra, new_bp } = step;
        let Some(ra) = ra else { return Verdict::Clean }; // the outermost frame
        if cfa <= sp {
            return Verdict::Unreliable;
        }
        pc = if ra == l.return_trampoline && ra != 0 {
            match (l.shadow)(cfa - 8) {
                Some(orig) => orig,
                None => return Verdict::Unreliable,
            }
        } else {
            ra
        };
        sp = cfa;
        bp = new_bp;
        exact = false;
    }
    Verdict::Unreliable
}

/// The interrupted `(rip, rsp, rbp)` of a signal frame whose `ucontext`
/// is at `uc` (x86-64: the stack pointer in glibc's `__restore_rt`, the
/// handler's `ret` having popped `pretcode`; `uc_mcontext.gregs` after
/// `uc_flags`, `uc_link` and `uc_stack`, 40 bytes: rbp is greg 10, rsp
/// 15, rip 16).
fn interrupted(uc: usize, mem: &dyn Memory) -> Option<(usize, usize, usize)> {
    const GREGS: usize = 40;
    let greg = |n: usize| mem.word(uc + GREGS + 8 * n);
    Some((greg(16)?, greg(15)?, greg(10)?))
}

enum StepOrSignal {
    Step(Step),
    /// The frame is a signal trampoline's (`__restore_rt`).
    Signal,
}

struct Step {
    cfa: usize,
    /// `None`: the return address is undefined (the outermost frame).
    ra: Option<usize>,
    new_bp: Option<usize>,
}

fn step(
    ctx: &mut UnwindContext<usize, OnStack>,
    addr: usize,
    sp: usize,
    bp: Option<usize>,
    mem: &dyn Memory,
) -> Option<StepOrSignal> {
    let m = module_for(addr)?;
    let hdr = EhFrameHdr::new(m.hdr, NativeEndian).parse(&m.bases, 8).ok()?;
    let table = hdr.table()?;
    let eh = EhFrame::new(m.eh_frame, NativeEndian);
    let fde = table.fde_for_address(&eh, &m.bases, addr as u64, EhFrame::cie_from_offset).ok()?;
    if fde.is_signal_trampoline() {
        return Some(StepOrSignal::Signal);
    }
    let row = fde.unwind_info_for_address(&eh, &m.bases, ctx, addr as u64).ok()?;
    let cfa = match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let base = if register == X86_64::RSP {
                sp
            } else if register == X86_64::RBP {
                bp?
            } else {
                return None;
            };
            base.checked_add_signed(offset as isize)?
        }
        CfaRule::Expression(_) => return None,
    };
    let ra = match row.register(X86_64::RA) {
        RegisterRule::Undefined => None,
        RegisterRule::Offset(o) => Some(mem.word(cfa.checked_add_signed(o as isize)?)?),
        _ => return None,
    };
    let new_bp = match row.register(X86_64::RBP) {
        // Not described: callee-saved registers a function does not touch
        // keep their value.
        RegisterRule::Undefined | RegisterRule::SameValue => bp,
        RegisterRule::Offset(o) => Some(mem.word(cfa.checked_add_signed(o as isize)?)?),
        _ => None,
    };
    Some(StepOrSignal::Step(Step { cfa, ra, new_bp }))
}

// ---------------------------------------------------------------- scanning

/// The conservative scan: `pc`, then each word of `mem` from `sp` to `hi`
/// (the shadow entries' originals are the caller's to check, with
/// [`Ranges::find`]). A word equal to the return
/// trampoline when the shadow entries could not be read is a hit on
/// [`TRANSIT`] (what it hides is unknown).
pub(super) fn scan(
    pc: Option<usize>,
    sp: usize,
    hi: usize,
    mem: &dyn Memory,
    shadow_known: bool,
    l: &Lookups<'_>,
) -> Verdict {
    let hit = |func, frame| Verdict::Hit { func, frame, reliable: false };
    if let Some(f) = pc.and_then(|pc| l.ranges.find(pc)) {
        return hit(f, 0);
    }
    let mut a = sp & !7;
    let mut k = 1;
    let mut buf = [0u8; 2048];
    'chunks: while a + 8 <= hi {
        let want = (hi - a).min(buf.len()) & !7;
        let got = mem.bytes(a, &mut buf[..want]) & !7;
        for c in buf[..got].chunks_exact(8) {
            let w = usize::from_ne_bytes(c.try_into().expect("8 bytes"));
            if let Some(f) = l.ranges.find(w) {
                return hit(f, k);
            }
            if !shadow_known && w == l.return_trampoline && w != 0 {
                return hit(TRANSIT, k);
            }
            k += 1;
        }
        if got < want || got == 0 {
            break 'chunks;
        }
        a += got;
    }
    Verdict::Clean
}
