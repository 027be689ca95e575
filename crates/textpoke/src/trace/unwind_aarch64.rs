//! aarch64's unwinder hooks: where the replaced return addresses are, and
//! putting them back.
//!
//! # Why a walk
//!
//! On x86-64 a replaced return address stays in the stack slot the call
//! pushed, which the shadow record names: putting it back is one store per
//! record. On aarch64 the stub hands the function its return address in
//! x30 (`arch/tramp_aarch64.rs`), and the function's prologue saves x30
//! wherever it likes (usually `stp x29, x30, [sp, #-N]!`, sometimes in a
//! callee-saved register), and a callee may save that register in turn.
//! The record's slot is only the frame's identity, its entry SP − 8. The
//! places are known to the unwinder alone: the call frame information
//! (`.eh_frame`), which says for each frame where its caller's registers
//! are. So the hooks walk the thread's frames with it (gimli's reader over
//! each object's `.eh_frame_hdr` search table, read in place, no
//! allocation), as libgcc is about to:
//!
//! 1. The hook saves x19–x30 as it was entered (the values of its
//!    caller's frame) in a save area and passes it with the SP it was
//!    entered with. The first frame is the caller's: PC = the saved x30.
//! 2. For each frame: the FDE's row at PC − 1 gives the CFA (SP or a
//!    tracked register plus an offset) and where each of x19–x30 of the
//!    caller is: at CFA + offset, in another register (then wherever that
//!    one is), or unchanged. A location is an address: a stack slot, or
//!    the hook's save area (restored into the registers when the hook
//!    continues into the real function).
//! 3. The caller's x30 is this frame's return address. The visitor looks
//!    at its location (`frame CFA`, `location`, `signed`): the return
//!    trampoline there means a hooked frame whose identity is CFA − 8, and
//!    its record holds the original.
//! 4. The walk goes on at the return address (the original for a hooked
//!    frame) with SP = CFA, until the outermost frame (x30 undefined), a
//!    signal frame, an address without unwind information, or anything
//!    that does not look like a sane frame (a CFA below SP, a location
//!    outside the frame): stopping is always safe, the unwinder would stop
//!    there too.
//!
//! # Pointer authentication
//!
//! A function built with `-mbranch-protection=pac-ret` signs x30 with SP
//! as the modifier (`paciasp`, right after the pad: SP is its entry SP, the
//! CFA) and its CFI says so (`DW_CFA_AARCH64_negate_ra_state`). The saved
//! word is then the *signed* return trampoline; the original is written
//! back signed the same way (`pacia1716` with the CFA), and a signed
//! address is stripped (`xpaclri`) before it is looked up. Both are in the
//! hint space: no-ops on a core without pointer authentication, where
//! `paciasp` was one too.

use crate::trace::hot;
use gimli::{
    AArch64, BaseAddresses, CfaRule, EhFrame, EhFrameHdr, NativeEndian, Pointer, Register, RegisterRule, UnwindContext,
    UnwindContextStorage, UnwindSection, UnwindTableRow, Vendor,
};
use std::sync::atomic::Ordering;

/// x19..=x30 are tracked: the callee-saved registers x19–x28, the frame
/// pointer x29 and the link register x30 (DWARF numbers are the register
/// numbers). Caller-saved registers do not survive a call: no CFA nor
/// saved return address is ever based on them.
const FIRST: u16 = 19;
const TRACKED: usize = 12;
const X29: usize = 10;
const X30: usize = 11;

/// A walk never goes further (a corrupt chain that never ends).
const MAX_FRAMES: usize = 1 << 16;

/// What the hooks save (`unwind.rs`, the aarch64 hooks): x19..=x30 as they
/// were entered, then x0 and x1, restored before the real function runs.
#[repr(C)]
pub(super) struct SaveArea {
    regs: [usize; TRACKED],
    args: [usize; 2],
}

/// The save area's size, in the hooks' assembly.
pub(super) const SAVE_AREA: usize = std::mem::size_of::<SaveArea>();
const _: () = assert!(SAVE_AREA == 112);

/// Unwind context storage on the stack: aarch64 functions describe
/// x19–x30 and d8–d15 at most, plus the RA sign state; libgcc nests
/// `remember_state` once or twice.
struct OnStack;

impl UnwindContextStorage<usize> for OnStack {
    type Rules = [(Register, RegisterRule<usize>); 32];
    type Stack = [UnwindTableRow<usize, OnStack>; 4];
}

/// Where one of the tracked registers of the caller is, per a frame's row.
#[derive(Clone, Copy)]
enum Rule {
    /// Unchanged by this frame (undescribed callee-saved registers).
    Same,
    /// At CFA + offset.
    At(i64),
    /// In the (callee's) register with this index.
    In(usize),
    /// Anything else: the walk stops.
    Unknown,
}

/// What a frame's row says, read out of gimli's row.
struct Row {
    cfa_reg: usize,
    cfa_offset: i64,
    rules: [Rule; TRACKED],
    signed: bool,
}

/// Where a walk starts: the hook's save area and its entry SP.
pub(super) struct Start {
    pub save: *mut SaveArea,
    pub sp: usize,
}

/// Walks the frames from the hook's caller outwards; `visit(cfa,
/// location, signed)` gets each frame's saved return address's location
/// and returns the return address to go on with (`None`: stop).
///
/// # Safety
///
/// `start` is a hook's save area and entry SP, on this thread's stack,
/// whose frames are live for the whole walk.
pub(super) unsafe fn walk(start: Start, mut visit: impl FnMut(usize, *mut usize, bool) -> Option<usize>) {
    let mut ctx = UnwindContext::<usize, OnStack>::new_in();
    // SAFETY: the caller's save area (this function's contract).
    let save = unsafe { &mut *start.save };
    let mut loc: [*mut usize; TRACKED] = std::array::from_fn(|i| &mut save.regs[i] as *mut usize);
    let mut pc = save.regs[X30];
    let mut sp = start.sp;
    for _ in 0..MAX_FRAMES {
        let Some(row) = row_at(&mut ctx, pc.wrapping_sub(1)) else { return };
        let base = match row.cfa_reg {
            31 => sp,
            // SAFETY: a location of this walk: a slot of a live frame
            // checked to lie in it, or the save area.
            r @ 19..=30 => unsafe { *loc[r - FIRST as usize] },
            _ => return,
        };
        let Some(cfa) = base.checked_add_signed(row.cfa_offset as isize) else { return };
        if cfa < sp || cfa % 8 != 0 {
            return;
        }
        let mut next = loc;
        for (i, rule) in row.rules.iter().enumerate() {
            next[i] = match *rule {
                Rule::Same => loc[i],
                Rule::In(r) => loc[r],
                Rule::At(o) => match cfa.checked_add_signed(o as isize) {
                    // Saved registers lie in the frame: [SP at the call, CFA).
                    Some(a) if a >= sp && a + 8 <= cfa && a % 8 == 0 => a as *mut usize,
                    _ => return,
                },
                Rule::Unknown => return,
            };
        }
        // The outermost frame leaves x30 undefined; a frame that made a
        // call saved it somewhere.
        if matches!(row.rules[X30], Rule::Same) {
            return;
        }
        let Some(ra) = visit(cfa, next[X30], row.signed) else { return };
        if ra == 0 || (cfa == sp && ra == pc) {
            return;
        }
        (pc, sp, loc) = (ra, cfa, next);
    }
}

/// The row for `addr` in its object's `.eh_frame`, `None` for an address
/// without unwind information or a signal frame.
fn row_at(ctx: &mut UnwindContext<usize, OnStack>, addr: usize) -> Option<Row> {
    let (hdr, eh_frame, bases) = tables_for(addr)?;
    let hdr = EhFrameHdr::new(hdr, NativeEndian).parse(&bases, 8).ok()?;
    let table = hdr.table()?;
    let mut eh = EhFrame::new(eh_frame, NativeEndian);
    eh.set_vendor(Vendor::AArch64);
    let fde = table.fde_for_address(&eh, &bases, addr as u64, EhFrame::cie_from_offset).ok()?;
    if fde.is_signal_trampoline() {
        return None;
    }
    let row = fde.unwind_info_for_address(&eh, &bases, ctx, addr as u64).ok()?;
    let (cfa_reg, cfa_offset) = match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => (register.0 as usize, offset),
        CfaRule::Expression(_) => return None,
    };
    let rules = std::array::from_fn(|i| match row.register(Register(FIRST + i as u16)) {
        RegisterRule::Undefined | RegisterRule::SameValue => Rule::Same,
        RegisterRule::Offset(o) => Rule::At(o),
        RegisterRule::Register(Register(r)) if (FIRST..FIRST + TRACKED as u16).contains(&r) => {
            Rule::In((r - FIRST) as usize)
        }
        _ => Rule::Unknown,
    });
    let signed = matches!(row.register(AArch64::RA_SIGN_STATE), RegisterRule::Constant(1));
    Some(Row { cfa_reg, cfa_offset, rules, signed })
}

/// The `.eh_frame_hdr` and `.eh_frame` of the loaded object whose
/// executable segment holds `addr`, read in place.
fn tables_for(addr: usize) -> Option<(&'static [u8], &'static [u8], BaseAddresses)> {
    let mut found = None;
    crate::sys::loader::for_each_object(|o| {
        let load = |p: &libc::Elf64_Phdr| (o.bias + p.p_vaddr as usize, o.bias + (p.p_vaddr + p.p_memsz) as usize);
        let loads = || o.phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
        if !loads().any(|p| p.p_flags & libc::PF_X != 0 && (load(p).0..load(p).1).contains(&addr)) {
            return std::ops::ControlFlow::Continue(());
        }
        let seg_end = |a: usize| loads().map(load).find(|l| (l.0..l.1).contains(&a)).map(|l| l.1);
        found = (|| {
            let hdr_ph = o.phdrs.iter().find(|p| p.p_type == libc::PT_GNU_EH_FRAME)?;
            let hdr_addr = o.bias + hdr_ph.p_vaddr as usize;
            // SAFETY: the header lies in a loaded segment of an object that
            // holds a frame of this thread, so stays loaded during the walk.
            let hdr: &'static [u8] =
                unsafe { std::slice::from_raw_parts(hdr_addr as *const u8, seg_end(hdr_addr)? - hdr_addr) };
            let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr as u64);
            let parsed = EhFrameHdr::new(hdr, NativeEndian).parse(&bases, 8).ok()?;
            let Pointer::Direct(eh) = parsed.eh_frame_ptr() else { return None };
            let eh = eh as usize;
            // SAFETY: as for the header.
            let eh_frame: &'static [u8] = unsafe { std::slice::from_raw_parts(eh as *const u8, seg_end(eh)? - eh) };
            Some((hdr, eh_frame, bases.set_eh_frame(eh as u64)))
        })();
        std::ops::ControlFlow::Break(())
    });
    found
}

/// `addr` signed with key A and `modifier`, as `paciasp` with SP =
/// `modifier` signs it (`pacia1716`: a no-op without pointer
/// authentication).
fn sign(addr: usize, modifier: usize) -> usize {
    let out: usize;
    // SAFETY: `pacia1716` (hint #8) only computes x17 from x16 and x17.
    unsafe {
        core::arch::asm!("hint #8", inout("x17") addr => out, in("x16") modifier, options(nomem, nostack, pure));
    }
    out
}

/// `addr` without its pointer authentication code (`xpaclri`, hint #7,
/// works on x30 only; a no-op without pointer authentication).
fn strip(addr: usize) -> usize {
    let out: usize;
    // SAFETY: `xpaclri` only rewrites x30, which is declared clobbered
    // (here it carries the value in and out).
    unsafe {
        core::arch::asm!("hint #7", inout("x30") addr => out, options(nomem, nostack, pure));
    }
    out
}

/// The word a frame with `signed` return addresses keeps for `addr`.
fn as_saved(addr: usize, cfa: usize, signed: bool) -> usize {
    if signed {
        sign(addr, cfa)
    } else {
        addr
    }
}

/// The return trampoline's address (0 before there is one).
fn return_trampoline() -> usize {
    // Pairs with the Release stores in tramp_alloc.rs, as in function_entry.
    hot::RETURN_TRAMPOLINE.load(Ordering::Acquire)
}

/// Before an unwinder walks this thread's stack (`_Unwind_RaiseException`,
/// `_Unwind_Resume_or_Rethrow`): every hooked frame on the walk gets its
/// original return address back where it saved x30, and its record is
/// marked restored (the exception may be caught further up:
/// [`rearm_after_catch`]).
///
/// # Safety
///
/// As [`walk`].
pub(super) unsafe fn restore_for_unwinder(start: Start) {
    let ret = return_trampoline();
    if ret == 0 {
        return; // no frame was ever hooked
    }
    let visit = |cfa: usize, at: *mut usize, signed| {
        // SAFETY: a location the walk checked (a slot of a live frame, or
        // the save area).
        let word = unsafe { *at };
        if word != as_saved(ret, cfa, signed) {
            return Some(if signed { strip(word) } else { word });
        }
        let orig = hot::with_frame_record(cfa - 8, |_, _| Some(true))?;
        // SAFETY: the same location; the frame is live, its saved x30
        // becomes the original it stood for.
        unsafe { *at = as_saved(orig, cfa, signed) };
        Some(orig)
    };
    // SAFETY: this function's contract.
    unsafe { walk(start, visit) }
}

/// An exception was caught by the frame that called the hook (the
/// `__cxa_begin_catch` of its handler): the hooked frames from it outwards
/// are live again, and those the walk finds still holding their restored
/// original get the return trampoline back; the other restored records
/// stand for frames the exception unwound and are dropped (lost exits).
///
/// # Safety
///
/// As [`walk`].
pub(super) unsafe fn rearm_after_catch(start: Start) {
    let ret = return_trampoline();
    if ret == 0 {
        return;
    }
    let visit = |cfa: usize, at: *mut usize, signed| {
        // SAFETY: a location the walk checked.
        let word = unsafe { *at };
        let plain = if signed { strip(word) } else { word };
        if plain == ret {
            // Never restored (above an earlier catch): go on with its original.
            return hot::with_frame_record(cfa - 8, |_, _| None);
        }
        hot::with_frame_record(cfa - 8, |orig, restored| {
            if !restored || word != as_saved(orig, cfa, signed) {
                return None;
            }
            // SAFETY: the live frame's saved x30, which holds the original
            // the record keeps: hooked again.
            unsafe { *at = as_saved(ret, cfa, signed) };
            Some(false)
        });
        Some(plain)
    };
    // SAFETY: this function's contract.
    unsafe { walk(start, visit) }
    hot::drop_restored_records();
}
