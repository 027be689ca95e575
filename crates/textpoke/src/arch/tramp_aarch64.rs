//! Trampoline code for aarch64, generated at run time with
//! `arch::asm` (`aarch64/asm.rs`). The same pieces as on x86-64
//! (`tramp_x86_64.rs`: stubs with a data word, shared entry trampolines,
//! never-freed routines, the return trampoline), for the same layers
//! above; what differs is how a site reaches its stub and where the
//! return address lives.
//!
//! # How a site reaches its stub: `b stub`, not `mov x9, x30` + `bl`
//!
//! gcc and clang `-fpatchable-function-entry=2` leave `nop; nop` at the
//! entry (after `bti c` with branch protection). The kernel's arm64
//! ftrace rewrites the first NOP into `mov x9, x30` once and then swaps
//! the second between `nop` and `bl tramp`. That one-time rewrite is not
//! a concurrent swap (MOV is not among B, BL, NOP, BRK: Arm ARM B2.2.5,
//! "Concurrent modification and execution of instructions"): it needs
//! every other thread parked with none of their PCs on the second NOP (a
//! thread there would later run the `bl` with x30 unsaved) — the
//! stop-machine strategy, which signals every thread (EINTR for a thread
//! in `nanosleep`, DESIGN rule 9) and does not finish under qemu today.
//!
//! textpoke swaps the **first** NOP with `b stub` instead, a NOP↔B swap
//! that is allowed while other cores execute it, and the stub (one per
//! site, never freed) does what `mov x9, x30; bl` would have:
//!
//! 1. `b` leaves every register as it was, x30 included: the stub saves
//!    x29 and x30 (the function's return address) with one `stp`, as a
//!    frame record;
//! 2. it raises the thread's quiescence count, calls its trampoline
//!    through its word (`blr`), lowers the count (a store-release);
//! 3. it reloads x29 and x30 — x30 possibly replaced by the tracer
//!    (function_graph: the return trampoline) — and branches back to the
//!    site + 8, past the second NOP.
//!
//! Soundness: the only word ever written in the program's code is the
//! first NOP, NOP↔B (rule 1 of `arch/aarch64.rs`: single-copy atomic,
//! allowed concurrently); the second NOP is never written, so a thread
//! between the two words, or preempted anywhere, runs one whole old or
//! new instruction and nothing else changes under it. No stop-machine, no
//! signal, no rewrite. Cost untraced: the two NOPs, as in the kernel's
//! form (`mov x9, x30; nop`), and nothing else; traced: one `b` in, one
//! `b` out. x9–x17 are dead at a function's first instruction (AAPCS64:
//! x9–x15 temporaries, x16/x17 the intra-procedure-call registers a
//! linker veneer may clobber between a call and its target), and gcc
//! turns off interprocedural register allocation for calls to functions
//! with patchable entries (see ARCHITECTURE.md), so the stub may use
//! x9, x16 and x17 and the flags.
//!
//! # Quiescence count
//!
//! As on x86-64 ([`Counter`]): a `u32` at a fixed offset from
//! `TPIDR_EL0` (`mrs`, `add`, `ldr`/`add`/`str`), or calls to never-freed
//! routines when the tracer's thread-local is in dynamic TLS. The raise is
//! a plain load and store: a signal handler running between them leaves
//! the count as it found it (its stubs raise and lower in pairs), except
//! registering the thread, which the registration accounts for
//! (`trace::hot::register`). The raise needs no barrier of its own (the
//! grace period's membarrier orders it, `trace/grace.rs`); the lowering is
//! `stlr`, so that everything the trampoline read is read before a grace
//! period can see the count lowered.
//!
//! # Entry trampoline frame
//!
//! A trampoline is entered by the stub's `blr` with x9 = the stub's value
//! (site index or function id) and SP = the stub's frame record, which
//! holds the function's return address at `+8`; SP + 16 is the SP the
//! function was entered with. The trampoline makes its own frame: `[fp]`
//! x29, `[fp+8]` x30 (the return into the stub), `[fp+16]` the value (the
//! same index as x86-64's `frame[2]`), `[fp+24]` the stub's SP; then the
//! saved registers ([`SavedRegs`]), and calls `handler(regs, fp, ctx)`.
//! [`frame_value`], [`return_slot`] and [`entry_sp`] read the frame for the
//! hot path. Replacing the return address is a store into the stub's
//! frame record (`return_slot`): the stub loads x30 from it before it
//! branches back. A replaced frame's identity is `entry SP - 8`, the same
//! rule as x86-64's (`caller_sp - 8`), which the return trampoline
//! computes from the SP the function returns with.
//!
//! # Return trampoline
//!
//! The function returns here (`ret` to the x30 the stub gave it) with SP
//! back at its entry value and results in x0–x7 and q0–q7 (AAPCS64 result
//! registers, x8 included for safety). It saves them, calls
//! `handler(saved, sp) -> original return address`, restores them and
//! returns there with `ret`.
//!
//! # Count and graph trampolines
//!
//! As on x86-64, for a site whose only op has inline code (the recorder's
//! fast paths: `textpoke-record`'s `codegen/aarch64.rs`): the count
//! trampoline ([`count_trampoline`], behind a call stub) and, at a
//! function's entry, the graph trampoline ([`graph_trampoline`], reached
//! through a [`graph_stub`] the site branches to) run the op's code and
//! fall back to a direct trampoline for anything unusual; the return
//! block's return trampoline runs the op's exit code first
//! ([`return_block`]). What aarch64 gives them: x9-x17 are dead at a
//! function's entry and after a return, so the graph and return paths save
//! nothing, and a thunk's `blr` keeps calls and returns paired for the
//! return-address predictor, as x86-64's `call r11` does.
//!
//! # C++ exceptions
//!
//! A replaced x30 is saved wherever the function's prologue put it, not in
//! a slot the shadow record names (x86-64's case): the unwinder hooks walk
//! the thread's frames with their CFI and put the originals back
//! (`trace/unwind_aarch64.rs`).

use super::asm::{
    AsmError, Assembler, Cond, Index, Label, Reg, FP, LR, SP, X10, X11, X12, X13, X14, X15, X16, X17, X9, ZR,
};

/// A thread's count while it is not registered with the tracer (bit 31):
/// the stub tests it after its raise (`tbnz`). The low bits count nesting.
pub const UNREGISTERED: u32 = 1 << 31;

/// Where a thread's quiescence count is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// A `u32` at this offset from `TPIDR_EL0`.
    Tls(i32),
    /// Not addressable from generated code (dynamic TLS): stubs call the
    /// never-freed helpers of [`register_routine`] and [`leave_routine`].
    Calls,
}

/// Size of a stub's code slot and of its data slot.
pub const STUB_CODE: usize = 192;
pub const STUB_DATA: usize = 32;

/// A stub block's header (its first data slot): the words stubs call the
/// never-freed routines through.
pub const HDR_CALL: usize = 0;
pub const HDR_GRAPH: usize = 8;
pub const HDR_LEAVE: usize = 16;

/// A stub, ready to be written (as on x86-64).
#[derive(Debug, Clone)]
pub struct StubCode {
    pub code: Vec<u8>,
    pub data: [u8; STUB_DATA],
    pub word: usize,
    pub null: usize,
}

/// x16 = the address of the count (`TPIDR_EL0 + off`).
fn count_address(a: &mut Assembler, off: i32) -> Result<(), AsmError> {
    a.mrs_tpidr(X16)?;
    a.add_offset(X16, X16, off, X17)
}

/// A call stub's raise of the thread's count: `addr` = the count's
/// address, `val` its new value (to `cold` when the thread is not
/// registered), or with [`Counter::Calls`] the enter routine (Z set: not
/// traced, to `done`). Clobbers x16, x17 and the flags, as every stub may.
pub(super) fn raise_count(
    a: &mut Assembler,
    counter: Counter,
    header: usize,
    (addr, val): (Reg, Reg),
    (cold, done): (Label, Label),
) -> Result<(), AsmError> {
    match counter {
        Counter::Tls(off) => {
            a.mrs_tpidr(addr)?;
            a.add_offset(addr, addr, off, val)?;
            a.ldr_w(val, addr, 0)?;
            a.add_imm_w(val, val, 1)?;
            a.str_w(val, addr, 0)?;
            a.tbnz_w(val, 31, cold)
        }
        Counter::Calls => {
            a.load_far(X16, header + HDR_CALL)?; // the enter routine
            a.blr(X16)?;
            a.b_cond(Cond::Eq, done)
        }
    }
}

/// How a site enters its stub, and so how the stub leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// By `b stub` from the first NOP of a patchable entry at `site`: the
    /// stub goes back with `b site + 8`.
    Branch { site: usize },
    /// By `bl stub`: the stub returns with `ret` (to the x30 it saved).
    Call,
}

/// A call stub placed at `at` with its data slot at `data` and its block's
/// header at `header` (see the module docs): saves x29/x30, raises the
/// count, calls through its word with x9 = `value`, lowers the count,
/// restores x29/x30 and leaves as `entered` says. `None` if the data or the
/// way back is out of reach.
///
/// With [`Counter::Tls`] (in instructions; 4 more on the way in for the
/// count's address beyond 12 bits):
///
/// ```text
///    stp x29, x30, [sp, #-16]!
///    mov x29, sp
///    mrs x16, tpidr_el0 ; add x16, x16, #count
///    ldr w17, [x16] ; add w17, w17, #1 ; str w17, [x16]
///    tbnz w17, #31, cold
/// again:
///    movz w9, #value (; movk)
///    adrp x16, word ; ldr x16, [x16, #:lo12:word]
///    blr x16
///    mrs x16, tpidr_el0 ; add x16, x16, #count
///    ldr w17, [x16] ; sub w17, w17, #1 ; stlr w17, [x16]
/// done:
///    ldp x29, x30, [sp], #16
///    b site + 8          (or ret)
/// null:                  ; the word points here while there is no trampoline
///    ret
/// cold:                  ; unregistered thread: register_routine, Z set when
///    adrp x16, header ; ldr x16, [x16, #call] ; blr x16   ; it may not be traced
///    b.ne again
///    b done
/// ```
pub fn call_stub(
    at: usize,
    data: usize,
    header: usize,
    value: u32,
    counter: Counter,
    entered: Entered,
) -> Option<StubCode> {
    let mut a = Assembler::new().ok()?;
    let (again, done, null, cold) = (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    let build = |a: &mut Assembler| -> Result<(), AsmError> {
        a.stp(FP, LR, SP, -16, Index::Pre)?;
        a.mov_sp(FP, SP)?;
        raise_count(a, counter, header, (X16, X17), (cold, done))?;
        a.set_label(again)?;
        a.mov_imm(X9, value as u64)?;
        a.load_far(X16, data)?;
        a.blr(X16)?;
        match counter {
            Counter::Tls(off) => {
                count_address(a, off)?;
                a.ldr_w(X17, X16, 0)?;
                a.sub_imm_w(X17, X17, 1)?;
                a.stlr_w(X17, X16)?;
            }
            Counter::Calls => {
                a.load_far(X16, header + HDR_LEAVE)?;
                a.blr(X16)?;
            }
        }
        a.set_label(done)?;
        a.ldp(FP, LR, SP, 16, Index::Post)?;
        match entered {
            Entered::Branch { site } => a.b_to(site + 2 * super::INSN_LEN)?,
            Entered::Call => a.ret()?,
        }
        stub_tail(a, counter, header, StubLabels { again, done, null, cold })
    };
    build(&mut a).ok()?;
    finish_stub(a, at, null)
}

/// The labels every call stub ([`call_stub`], `body_stub`) places.
pub(super) struct StubLabels {
    pub again: Label,
    pub done: Label,
    pub null: Label,
    pub cold: Label,
}

/// The end shared by every call stub: `null` (where the word points while
/// there is no trampoline: `ret`) and, with a TLS counter, `cold` (an
/// unregistered thread calls the register routine, which sets Z when the
/// thread may not be traced: on to `done`, else back to `again`).
pub(super) fn stub_tail(a: &mut Assembler, counter: Counter, header: usize, l: StubLabels) -> Result<(), AsmError> {
    a.set_label(l.null)?;
    a.ret()?;
    a.set_label(l.cold)?;
    if let Counter::Tls(_) = counter {
        a.load_far(X16, header + HDR_CALL)?;
        a.blr(X16)?;
        a.b_cond(Cond::Ne, l.again)?;
        a.b(l.done)?;
    }
    Ok(())
}

/// Assembles a call stub for `at`; its data word starts at `null`'s
/// address (a stub with no trampoline returns at once). `None` if it does
/// not fit a stub slot.
pub(super) fn finish_stub(a: Assembler, at: usize, null: Label) -> Option<StubCode> {
    let null_at = at + 4 * a.label_index(null)?;
    let code = a.assemble(at).ok()?;
    if code.len() > STUB_CODE {
        return None;
    }
    let mut d = [0u8; STUB_DATA];
    d[..8].copy_from_slice(&(null_at as u64).to_le_bytes());
    Some(StubCode { code, data: d, word: 0, null: null_at })
}

/// Registers saved by the entry trampoline: x0–x18 (x19 is padding), then
/// q0–q31 (q8–q31 only for body sites).
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy)]
pub struct SavedRegs {
    pub x: [u64; 20],
    pub v: [[u8; 16]; 32],
}

impl SavedRegs {
    /// Integer argument `n` (x0–x7).
    pub fn int_arg(&self, n: usize) -> Option<u64> {
        (n < 8).then(|| self.x[n])
    }
    /// Floating-point argument `n` (d0–d7: the low 8 bytes of q0–q7).
    pub fn float_arg(&self, n: usize) -> Option<f64> {
        (n < 8).then(|| f64::from_le_bytes(self.v[n][..8].try_into().unwrap()))
    }
    /// The first integer result register (x0).
    pub fn int_result(&self) -> u64 {
        self.x[0]
    }
}

/// Registers saved by the return trampoline: x0–x8 (x9 padding), q0–q7.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy)]
pub struct SavedReturn {
    pub x: [u64; 10],
    pub v: [[u8; 16]; 8],
}

impl SavedReturn {
    /// The integer result (x0).
    pub fn int_result(&self) -> u64 {
        self.x[0]
    }
    /// The floating-point result (d0).
    pub fn float_result(&self) -> f64 {
        f64::from_le_bytes(self.v[0][..8].try_into().unwrap())
    }
}

/// No AVX on aarch64: the entry trampolines save q registers whole.
pub fn has_avx() -> bool {
    false
}

/// Which registers an entry trampoline must preserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// At a function's first instruction: x0–x8 (arguments, the indirect
    /// result register), x18 (gcc's static chain), q0–q7 (arguments);
    /// x0–x18 are saved whole (the stub's x9/x16/x17 and dead temporaries
    /// cost three pairs), q8–q31 are not (q8–q15's low halves are
    /// callee-saved, the handler keeps them; the rest is dead).
    FunctionEntry,
    /// Inside a body: every caller-saved register, q0–q31 whole.
    Body,
}

/// Offsets in the entry trampoline's frame.
const TF_VALUE: i32 = 16;
const TF_STUB_SP: i32 = 24;
const TF_REGS: i32 = 32;
const REGS_X: i32 = TF_REGS;
const REGS_V: i32 = TF_REGS + 8 * 20;

/// The value the stub passed (x9): the site index, or a function id.
///
/// # Safety
/// `frame` must be the frame an entry trampoline passed to its handler.
pub unsafe fn frame_value(frame: *const usize) -> usize {
    // SAFETY: the trampoline stored x9 at [fp + TF_VALUE] (module docs).
    unsafe { *frame.add(TF_VALUE as usize / 8) }
}

/// Where the traced function's return address is kept until the stub
/// reloads x30 from it (the stub's frame record + 8).
///
/// # Safety
/// As [`frame_value`].
pub unsafe fn return_slot(frame: *const usize) -> usize {
    // SAFETY: the trampoline stored the stub's SP at [fp + TF_STUB_SP].
    unsafe { *frame.add(TF_STUB_SP as usize / 8) + 8 }
}

/// The stack pointer the traced function was entered with.
///
/// # Safety
/// As [`frame_value`].
pub unsafe fn entry_sp(frame: *const usize) -> usize {
    // SAFETY: as in return_slot.
    unsafe { *frame.add(TF_STUB_SP as usize / 8) + 16 }
}

/// Saves x0–x18 at `[sp + x]`.
fn save_gprs(a: &mut Assembler, x: i32) -> Result<(), AsmError> {
    for i in (0..18).step_by(2) {
        a.stp(Reg(i), Reg(i + 1), SP, x + 8 * i as i32, Index::Offset)?;
    }
    a.str(Reg(18), SP, x + 8 * 18)
}

/// Restores what [`save_gprs`] saved.
fn restore_gprs(a: &mut Assembler, x: i32) -> Result<(), AsmError> {
    for i in (0..18).step_by(2) {
        a.ldp(Reg(i), Reg(i + 1), SP, x + 8 * i as i32, Index::Offset)?;
    }
    a.ldr(Reg(18), SP, x + 8 * 18)
}

/// The size of a frame holding `vecs` q registers after the general ones
/// (a multiple of 16: SP stays 16-aligned).
fn frame_size(vecs: u8) -> u32 {
    (REGS_V as u32 + 16 * vecs as u32).next_multiple_of(16)
}

/// The entry trampoline placed at `at`, calling
/// `handler(regs: *mut SavedRegs, frame: *mut usize, ctx: usize)` (frame
/// layout in the module docs), then returning into the stub.
pub fn entry_trampoline(at: usize, handler: usize, ctx: usize, _avx: bool, live: Live) -> Result<Vec<u8>, AsmError> {
    let vecs = match live {
        Live::FunctionEntry => 8,
        Live::Body => 32,
    };
    let size = frame_size(vecs);
    let mut a = Assembler::new()?;
    a.sub_imm(SP, SP, size)?;
    a.stp(FP, LR, SP, 0, Index::Offset)?;
    a.mov_sp(FP, SP)?;
    a.str(X9, SP, TF_VALUE)?;
    a.add_imm(X9, SP, size)?; // the stub's SP
    a.str(X9, SP, TF_STUB_SP)?;
    save_gprs_and_vecs(&mut a, vecs, true)?;
    a.add_imm(Reg(0), SP, TF_REGS as u32)?;
    a.mov_sp(Reg(1), SP)?;
    a.mov_imm(Reg(2), ctx as u64)?;
    a.mov_imm(X16, handler as u64)?;
    a.blr(X16)?;
    save_gprs_and_vecs(&mut a, vecs, false)?;
    a.ldp(FP, LR, SP, 0, Index::Offset)?;
    a.add_imm(SP, SP, size)?;
    a.ret()?;
    a.assemble(at)
}

/// Saves (or restores) x0–x18 at `[sp + REGS_X]` and q0..`vecs` at
/// `[x17 + 0]` with x17 = sp + REGS_V (pair offsets reach 1008 bytes;
/// 32 q registers take 512 from there). x17 is dead where this runs
/// (the stub used it), and restored last on the way out.
fn save_gprs_and_vecs(a: &mut Assembler, vecs: u8, save: bool) -> Result<(), AsmError> {
    if save {
        save_gprs(a, REGS_X)?;
        a.add_imm(X17, SP, REGS_V as u32)?;
        for i in (0..vecs).step_by(2) {
            a.stp_q(i, i + 1, X17, 16 * i as i32)?;
        }
        Ok(())
    } else {
        a.add_imm(X17, SP, REGS_V as u32)?;
        for i in (0..vecs).step_by(2) {
            a.ldp_q(i, i + 1, X17, 16 * i as i32)?;
        }
        restore_gprs(a, REGS_X)
    }
}

/// Where a stub's cold path goes when its thread may not be traced. On
/// aarch64 the routine returns either way (the Z flag says which) and the
/// stub decides; kept for the tracer's calls, which name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    ToSite,
    ToResume,
}

/// Saves every caller-saved register (x0–x18, q0–q31) and the frame,
/// calls `handler() -> u32`, sets the flags by `cmp w0, #0` (Z: it
/// returned 0), restores everything else and returns.
fn save_all_and_call(a: &mut Assembler, handler: usize) -> Result<(), AsmError> {
    let size = frame_size(32);
    a.sub_imm(SP, SP, size)?;
    a.stp(FP, LR, SP, 0, Index::Offset)?;
    a.mov_sp(FP, SP)?;
    save_gprs_and_vecs(a, 32, true)?;
    a.mov_imm(X16, handler as u64)?;
    a.blr(X16)?;
    a.cmp_imm_w(Reg(0), 0)?; // nothing below changes the flags
    save_gprs_and_vecs(a, 32, false)?;
    a.ldp(FP, LR, SP, 0, Index::Offset)?;
    a.add_imm(SP, SP, size)
}

/// A never-freed routine placed at `at` that a stub calls on its cold path
/// (`handler` registers the thread; 0: it may not be traced) or, with
/// [`Counter::Calls`], on every entry (`handler` also raises the count):
/// returns with Z set when `handler` returned 0, every other register as
/// it came.
pub fn register_routine(at: usize, handler: usize, _avx: bool, _skip: Skip) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    save_all_and_call(&mut a, handler)?;
    a.ret()?;
    a.assemble(at)
}

/// The never-freed *leave* routine of [`Counter::Calls`].
pub fn leave_routine(at: usize, handler: usize, _avx: bool) -> Result<Vec<u8>, AsmError> {
    register_routine(at, handler, false, Skip::ToSite)
}

/// Code an op generates to run inline in a trampoline, instead of being
/// called: `emit(a, fail)` appends it to `a`. It either falls through
/// having done its work, or branches to `fail` having changed nothing
/// another thread or a later call could see. Which registers hold its
/// inputs and which it may clobber depends on the trampoline: see
/// [`count_trampoline`], [`graph_trampoline`] and [`return_block`].
pub type Emit<'a> = &'a dyn Fn(&mut Assembler, Label) -> Result<(), AsmError>;

/// `d = [TPIDR_EL0 + off]`, a u64 (`scratch` only for far offsets).
fn load_tls(a: &mut Assembler, d: Reg, off: i32, scratch: Reg) -> Result<(), AsmError> {
    a.mrs_tpidr(d)?;
    if (0..32768).contains(&off) && off % 8 == 0 {
        return a.ldr(d, d, off);
    }
    a.add_offset(d, d, off, scratch)?;
    a.ldr(d, d, 0)
}

/// The count trampoline placed at `at`, entered by a call stub's `blr`
/// with x9 = the function's id and x30 the return into the stub. It saves
/// x10 and x11 and runs `count`, which gets x9 = the id (kept until it
/// branches to `fail`) and may clobber x9, x10, x11, x16, x17 and the flags
/// (x9, x16 and x17 are the stub's: dead at a function's entry, and a stub
/// in a body clobbers them anyway), then returns into the stub, or, when
/// `count` fails, branches to `slow` (a full entry trampoline that takes
/// x9 as its value) with x9, x10, x11 as they came.
///
/// ```text
///    stp x10, x11, [sp, #-16]!
///    <count>                    ; fails to pop_slow
///    ldp x10, x11, [sp], #16
///    ret                        ; into the stub, which lowers the count
/// pop_slow:
///    ldp x10, x11, [sp], #16
///    b slow
/// ```
pub fn count_trampoline(at: usize, count: Emit<'_>, slow: usize) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    let pop_slow = a.create_label();
    a.stp(X10, X11, SP, -16, Index::Pre)?;
    count(&mut a, pop_slow)?;
    a.ldp(X10, X11, SP, 16, Index::Post)?;
    a.ret()?;
    a.set_label(pop_slow)?;
    a.ldp(X10, X11, SP, 16, Index::Post)?;
    a.b_to(slow)?;
    a.assemble(at)
}

/// Where the tracer keeps its per-thread state and shadow stacks, for the
/// graph and return trampolines (the tracer fills it in; see the x86-64
/// version for each field). The offsets from the thread pointer are from
/// `TPIDR_EL0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowOffsets {
    pub tls_in_tramp: i32,
    pub tls_shadow: i32,
    pub len: usize,
    pub cap: usize,
    pub entries: usize,
    pub entry_size: usize,
    pub e_slot: usize,
    pub e_orig: usize,
    pub e_func_depth: usize,
    pub e_mask: usize,
    pub e_time: usize,
    pub e_site: usize,
    pub fast_exit: usize,
}

/// Offsets in a graph stub's data (what x16 points to), as on x86-64:
/// where the function goes on after the site, the site index (a u64 whose
/// upper half is the function's id), the stub's word (its graph
/// trampoline) and its tail (what a direct trampoline entered on the graph
/// trampoline's slow path returns to).
const GS_RESUME: i32 = 0;
const GS_INDEX: i32 = 8;
const GS_FUNC: i32 = 12;
const GS_WORD: usize = 16;
const GS_TAIL: i32 = 24;

/// The stub of a site whose target is a graph trampoline, placed at `at`
/// with its data slot at `data` and its block's header at `header` (needs
/// [`Counter::Tls`] at offset `count`). The site branches to it from its
/// first NOP with every register as the function's entry has it (x30 its
/// return address); it points x16 at its data (where the function goes
/// on: the stub's own `b resume`, `resume` being the site's second NOP;
/// the site `index`; the function id `func`; its word; its tail), raises
/// the count (w9 = the count after the raise) and branches through its
/// word. `None` if the data or `resume` is out of reach.
///
/// The function goes on through the stub's `b resume`, not by an indirect
/// branch to `resume` (the graph thunk's `blr`): with branch protection
/// the function's code is guarded, and an indirect branch there must land
/// on its `bti c`, while a direct branch may land anywhere.
///
/// ```text
///    adrp x16, data ; add x16, x16, #:lo12:data
///    mrs x17, tpidr_el0 ; add x17, x17, #count
///    ldr w9, [x17] ; add w9, w9, #1 ; str w9, [x17]
///    tbnz w9, #31, cold
/// again:
///    ldr x17, [x16, #word] ; br x17
/// tail:                       ; a direct trampoline returns here:
///    ldp x29, x30, [sp], #16  ; the frame the graph trampoline made,
/// null:                       ; the word points here while the stub has
///    <lower the count> ; b resume       ; no trampoline: on, untraced
/// cold:                       ; register_routine; Z: it may not be traced
///    stp x29, x30, [sp, #-16]! ; adrp/ldr x17, [header.graph] ; blr x17
///    ldp x29, x30, [sp], #16 ; b.eq go_on
///    <w9 = the count> ; b again
/// go_on:                      ; the data's resume address: the thunk's
///    b resume                 ; `blr` lands here
/// ```
pub fn graph_stub(
    at: usize,
    data: usize,
    header: usize,
    count: i32,
    (resume, index, func): (usize, u32, u32),
) -> Option<StubCode> {
    let mut a = Assembler::new().ok()?;
    let (again, null, cold, go_on) = (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    let tail = a.create_label();
    let build = |a: &mut Assembler| -> Result<(), AsmError> {
        a.adrp(X16, data)?;
        a.add_imm(X16, X16, (data & 0xfff) as u32)?;
        a.mrs_tpidr(X17)?;
        a.add_offset(X17, X17, count, X9)?;
        a.ldr_w(X9, X17, 0)?;
        a.add_imm_w(X9, X9, 1)?;
        a.str_w(X9, X17, 0)?;
        a.tbnz_w(X9, 31, cold)?;
        a.set_label(again)?;
        a.ldr(X17, X16, GS_WORD as i32)?;
        a.br(X17)?;
        a.set_label(tail)?;
        a.ldp(FP, LR, SP, 16, Index::Post)?;
        a.set_label(null)?;
        count_address(a, count)?;
        a.ldr_w(X17, X16, 0)?;
        a.sub_imm_w(X17, X17, 1)?;
        a.stlr_w(X17, X16)?;
        a.b_to(resume)?;
        a.set_label(cold)?;
        a.stp(FP, LR, SP, -16, Index::Pre)?;
        a.load_far(X17, header + HDR_GRAPH)?;
        a.blr(X17)?; // keeps x0-x18 (x16: the data)
        a.ldp(FP, LR, SP, 16, Index::Post)?; // keeps the flags
        a.b_cond(Cond::Eq, go_on)?;
        a.mrs_tpidr(X17)?; // registered: the count without UNREGISTERED
        a.add_offset(X17, X17, count, X9)?;
        a.ldr_w(X9, X17, 0)?;
        a.b(again)?;
        a.set_label(go_on)?;
        a.b_to(resume)
    };
    build(&mut a).ok()?;
    let (null_at, tail_at) = (at + 4 * a.label_index(null)?, at + 4 * a.label_index(tail)?);
    let go_on_at = at + 4 * a.label_index(go_on)?;
    let code = a.assemble(at).ok()?;
    if code.len() > STUB_CODE {
        return None;
    }
    let mut d = [0u8; STUB_DATA];
    d[0..8].copy_from_slice(&(go_on_at as u64).to_le_bytes());
    d[8..12].copy_from_slice(&index.to_le_bytes());
    d[12..16].copy_from_slice(&func.to_le_bytes());
    d[GS_WORD..GS_WORD + 8].copy_from_slice(&(null_at as u64).to_le_bytes());
    d[24..32].copy_from_slice(&(tail_at as u64).to_le_bytes());
    Some(StubCode { code, data: d, word: GS_WORD, null: null_at })
}

/// The graph trampoline placed at `at`, for function-entry sites whose
/// only op `op` has inline entry and exit code (the tracer's
/// `TraceOp::inline`).
///
/// Entered from a [`graph_stub`] with x16 = the stub's data, w9 = the
/// thread's count (raised by the stub), x30 = the function's return
/// address and SP as the function was entered. At a function's entry
/// x9-x17 are dead (AAPCS64; module docs), so nothing is saved: x0-x8,
/// x18, x29, x30, SP and q0-q31 are left alone. If the count is 1 (the
/// thread was not already in tracer code: the recursion guard), `op` is
/// still the op whose exits the return trampoline handles (`sh.fast_exit`)
/// and the thread has room on its shadow stack, it runs the op's `entry`
/// code with x9 = the function id and x10 = the depth (it may clobber
/// x9-x15, x17 and the flags, and must keep x16), pushes the shadow entry
/// exactly as the tracer's hot path does (its slot: entry SP - 8, the
/// frame's identity, `return_slot`'s rule; its original: x30), and
/// branches to `thunk` with x9 = where the function goes on (the stub's
/// `b resume`) and x16 = the count's address. The thunk (never freed) lowers the count and calls
/// the function there with `blr`, whose return address is the return
/// trampoline: the function returns into it with a return the CPU
/// predicts, and the return trampoline's `ret` to the original address
/// pairs with the caller's own `bl` (as x86-64's thunk does).
///
/// Any other case (an op no longer the fast-exit op, a thread inside the
/// tracer, no shadow stack yet, a full shadow stack, the op's code failing)
/// makes the frame record a call stub would have (x29, x30), loads x9 =
/// the site index and x30 = the stub's tail, and branches to `slow`, the
/// op's direct trampoline, which returns into the tail (which pops the
/// frame record, lowers the count and goes on at the resume address).
pub fn graph_trampoline(
    at: usize,
    sh: &ShadowOffsets,
    op: usize,
    (thunk, slow): (usize, usize),
    entry: Emit<'_>,
) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    let to_slow = a.create_label();
    let field = |off: usize| -> Result<i32, AsmError> {
        i32::try_from(sh.entries + off).map_err(|_| AsmError::new("shadow entry offset"))
    };
    let (len, cap) = (sh.len as i32, sh.cap as i32);
    a.cmp_imm_w(X9, 1)?; // the recursion guard: held until the thunk
    a.b_cond(Cond::Ne, to_slow)?;
    a.mov_imm(X10, sh.fast_exit as u64)?;
    a.ldr(X10, X10, 0)?;
    a.mov_imm(X11, 1u64 << op)?;
    a.cmp(X10, X11)?;
    a.b_cond(Cond::Ne, to_slow)?;
    load_tls(&mut a, X12, sh.tls_shadow, X13)?;
    a.cbz(X12, to_slow)?;
    a.ldr(X10, X12, len)?; // depth
    a.ldr(X11, X12, cap)?;
    a.cmp(X10, X11)?;
    a.b_cond(Cond::Hs, to_slow)?;
    a.ldr_w(X9, X16, GS_FUNC)?;
    entry(&mut a, to_slow)?;

    // The shadow entry, then its length.
    load_tls(&mut a, X12, sh.tls_shadow, X13)?;
    a.ldr(X10, X12, len)?;
    a.mov_imm(X11, sh.entry_size as u64)?;
    a.madd(X13, X10, X11, X12)?; // the entry, less `entries`
    a.sub_imm(X14, SP, 8)?;
    a.str(X14, X13, field(sh.e_slot)?)?;
    a.str(LR, X13, field(sh.e_orig)?)?;
    a.ldr_w(X9, X16, GS_FUNC)?;
    a.orr_lsl(X9, X9, X10, 32)?; // func | depth << 32
    a.str(X9, X13, field(sh.e_func_depth)?)?;
    a.mov_imm(X11, 1u64 << op)?;
    a.str(X11, X13, field(sh.e_mask)?)?;
    a.str(ZR, X13, field(sh.e_time)?)?;
    a.ldr_w(X11, X16, GS_INDEX)?;
    a.str_w(X11, X13, field(sh.e_site)?)?;
    a.add_imm(X10, X10, 1)?;
    a.str(X10, X12, len)?;
    a.ldr(X9, X16, GS_RESUME)?;
    count_address(&mut a, sh.tls_in_tramp)?; // x16
    a.b_to(thunk)?; // lowers the count, calls the function
    a.set_label(to_slow)?;
    a.stp(FP, LR, SP, -16, Index::Pre)?; // as the call stub's frame record
    a.mov_sp(FP, SP)?;
    a.ldr_w(X9, X16, GS_INDEX)?; // the value a call stub passes: the index
    a.ldr(LR, X16, GS_TAIL)?; // as if called from the stub's tail
    a.b_to(slow)?;
    a.assemble(at)
}

/// Offset of the return trampoline in [`return_block`]: after the thunk.
pub const RETURN_OFFSET: usize = 16;

/// A never-freed return block placed at `at`: the thunk graph trampolines
/// branch to (with `fast`; `brk` padding without), then, at
/// [`RETURN_OFFSET`] (the thunk's return address), the return trampoline,
/// whose fast path runs `fast`'s exit code.
///
/// ```text
/// thunk:                   ; x16 = the count's address, x9 = the resume address
///    ldr w17, [x16] ; sub w17, w17, #1 ; stlr w17, [x16]
///    blr x9                ; the function returns to:
/// return trampoline:
/// ```
///
/// The return trampoline's fast path, entered by the function's `ret`
/// with SP back at its entry value and results in x0-x8 and q0-q7 (x9-x17
/// are dead after a return): when the shadow stack's top entry is this
/// frame's (its slot is SP - 8) and its mask is the fast-exit op's, it
/// runs the op's `exit` code with x9 = the entry's `func_depth` and x0
/// the return value (it may clobber x9, x10, x11, x14-x17 and the flags,
/// and must keep x12 and x13), pops the entry and returns to the original
/// address with x30 = it, every result register as the function left it.
/// Anything else goes to the handler, as [`return_trampoline`] does.
pub fn return_block(
    at: usize,
    handler: usize,
    _avx: bool,
    fast: Option<(&ShadowOffsets, Emit<'_>)>,
) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    match fast {
        Some(_) => {
            a.ldr_w(X17, X16, 0)?;
            a.sub_imm_w(X17, X17, 1)?;
            a.stlr_w(X17, X16)?; // release: as a call stub's lowering
            a.blr(X9)?;
        }
        None => {
            for _ in 0..RETURN_OFFSET / 4 {
                a.brk(0)?;
            }
        }
    }
    debug_assert_eq!(a.len() * 4, RETURN_OFFSET);
    if let Some((sh, exit)) = fast {
        fast_return(&mut a, sh, exit)?;
    }
    slow_return(&mut a, handler)?;
    a.assemble(at)
}

/// The fast path of the return trampoline (see [`return_block`]); falls
/// through to the slow one with x0-x8, q0-q7 and SP as they came.
fn fast_return(a: &mut Assembler, sh: &ShadowOffsets, exit: Emit<'_>) -> Result<(), AsmError> {
    let out = a.create_label();
    let field = |off: usize| -> Result<i32, AsmError> {
        i32::try_from(sh.entries + off).map_err(|_| AsmError::new("shadow entry offset"))
    };
    let len = sh.len as i32;
    a.mov_imm(X9, sh.fast_exit as u64)?;
    a.ldr(X9, X9, 0)?;
    a.cbz(X9, out)?;
    a.mrs_tpidr(X10)?;
    a.add_offset(X11, X10, sh.tls_in_tramp, X12)?;
    a.ldr_w(X11, X11, 0)?;
    a.cbnz_w(X11, out)?; // inside the tracer, or unregistered (exiting)
    load_tls(a, X11, sh.tls_shadow, X12)?;
    a.cbz(X11, out)?;
    a.ldr(X12, X11, len)?;
    a.cbz(X12, out)?;
    a.sub_imm(X12, X12, 1)?; // the top entry's index, and the length after the pop
    a.mov_imm(X13, sh.entry_size as u64)?;
    a.madd(X13, X12, X13, X11)?; // the entry, less `entries`
    a.sub_imm(X14, SP, 8)?; // this frame's identity (else frames were skipped)
    a.ldr(X15, X13, field(sh.e_slot)?)?;
    a.cmp(X15, X14)?;
    a.b_cond(Cond::Ne, out)?;
    a.ldr(X15, X13, field(sh.e_mask)?)?;
    a.cmp(X15, X9)?;
    a.b_cond(Cond::Ne, out)?;
    a.ldr(X9, X13, field(sh.e_func_depth)?)?;
    exit(a, out)?;
    // Recorded: pop the entry (a signal handler's traced calls from now on
    // push over it), then return to the original address.
    a.ldr(LR, X13, field(sh.e_orig)?)?;
    load_tls(a, X11, sh.tls_shadow, X14)?;
    a.str(X12, X11, len)?;
    a.ret()?;
    a.set_label(out)
}

/// Frame of the return trampoline: x29/x30, then [`SavedReturn`].
const RT_SAVED: i32 = 16;
const RT_SIZE: u32 = (RT_SAVED as u32 + std::mem::size_of::<SavedReturn>() as u32).next_multiple_of(16);

/// The return trampoline placed at `at`, calling
/// `handler(saved: *mut SavedReturn, caller_sp: usize) -> usize` (the
/// original return address), then returning there with every result
/// register as the function left it.
pub fn return_trampoline(at: usize, handler: usize) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    slow_return(&mut a, handler)?;
    a.assemble(at)
}

/// The return trampoline's code through the handler.
fn slow_return(a: &mut Assembler, handler: usize) -> Result<(), AsmError> {
    let v = RT_SAVED + 8 * 10;
    a.sub_imm(SP, SP, RT_SIZE)?;
    a.stp(FP, LR, SP, 0, Index::Offset)?;
    a.mov_sp(FP, SP)?;
    for i in (0..10).step_by(2) {
        a.stp(Reg(i), Reg(i + 1), SP, RT_SAVED + 8 * i as i32, Index::Offset)?;
    }
    for i in (0..8).step_by(2) {
        a.stp_q(i, i + 1, SP, v + 16 * i as i32)?;
    }
    a.add_imm(Reg(0), SP, RT_SAVED as u32)?;
    a.add_imm(Reg(1), SP, RT_SIZE)?; // the SP the function returned with
    a.mov_imm(X16, handler as u64)?;
    a.blr(X16)?;
    a.mov(LR, Reg(0))?;
    for i in (0..8).step_by(2) {
        a.ldp_q(i, i + 1, SP, v + 16 * i as i32)?;
    }
    for i in (0..10).step_by(2) {
        a.ldp(Reg(i), Reg(i + 1), SP, RT_SAVED + 8 * i as i32, Index::Offset)?;
    }
    a.ldr(FP, SP, 0)?;
    a.add_imm(SP, SP, RT_SIZE)?;
    a.ret()
}

/// Instructions on the path from `code`'s start (at `ip`) that takes no
/// conditional branch, following `b` within `code`, to the first `ret`,
/// `br`, `blr` or branch out of it (what one traced call executes there).
#[cfg(any(test, feature = "testing"))]
pub fn straight_path(ip: u64, code: &[u8]) -> usize {
    let words: Vec<u32> = code.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let (mut pc, mut n) = (0usize, 0);
    while pc < words.len() {
        let w = words[pc];
        n += 1;
        let is_b = w & 0xfc00_0000 == 0x1400_0000;
        if w == super::RET || w & 0xffff_fc1f == 0xd63f_0000 || w & 0xffff_fc1f == 0xd61f_0000 {
            return n;
        }
        if is_b {
            let t = super::branch_target(ip as usize + 4 * pc, w).expect("a b");
            let off = t as i64 - ip as i64;
            if !(0..code.len() as i64).contains(&off) {
                return n;
            }
            pc = off as usize / 4;
        } else {
            pc += 1;
        }
        assert!(n < 10_000, "a loop on the straight path");
    }
    panic!("no ret or branch out")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(code: &[u8]) -> Vec<u32> {
        code.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn call_stub_raises_first_lowers_last_and_branches_back() {
        let (at, data, header, site) = (0x40_0000, 0x41_0020, 0x41_0000, 0x38_1000);
        let s = call_stub(at, data, header, 7, Counter::Tls(0x10), Entered::Branch { site }).unwrap();
        let w = words(&s.code);
        assert_eq!(&w[..2], [0xa9bf7bfd, 0x910003fd], "stp x29, x30, [sp, #-16]!; mov x29, sp");
        assert_eq!(&w[2..4], [0xd53bd050, 0x91004210], "mrs x16, tpidr_el0; add x16, x16, #0x10");
        assert_eq!(&w[4..7], [0xb9400211, 0x11000631, 0xb9000211], "ldr; add #1; str");
        assert_eq!(w[7] & 0xfff8_001f, 0x37f8_0011, "tbnz w17, #31, cold");
        assert_eq!(w[8], 0xd28000e9, "mov x9, #7");
        assert!(w.contains(&0x889ffe11), "the lowering is stlr w17, [x16]");
        assert_eq!(crate::arch::branch_target(s.null - 4, w[(s.null - at) / 4 - 1]), Some(site + 8), "b site + 8");
        assert_eq!(w[(s.null - at) / 4], crate::arch::RET, "the null path is a ret");
        assert_eq!(u64::from_le_bytes(s.data[..8].try_into().unwrap()), s.null as u64, "the word starts at null");
        // In: stp, mov, mrs, add, ldr, add, str, tbnz, mov, adrp, ldr, blr;
        // out: mrs, add, ldr, sub, stlr, ldp, b.
        assert_eq!(straight_path(at as u64, &s.code), 12);
        assert!(s.code.len() <= STUB_CODE);
        let c = call_stub(at, data, header, 1 << 20, Counter::Calls, Entered::Call).unwrap();
        assert!(c.code.len() <= STUB_CODE);
        assert!(call_stub(at, at + (8 << 30), header, 7, Counter::Calls, Entered::Call).is_none(), "data too far");
        assert!(call_stub(at, data, header, 7, Counter::Calls, Entered::Branch { site: at + (256 << 20) }).is_none());
    }

    #[test]
    fn trampolines_assemble_and_keep_the_stack_aligned() {
        for live in [Live::FunctionEntry, Live::Body] {
            let e = entry_trampoline(0x10000, 0x2000_0000, 42, false, live).unwrap();
            let w = words(&e);
            assert_eq!(w[0] & 0xffc0_03ff, 0xd100_03ff, "sub sp, sp, #size");
            let size = (w[0] >> 10) & 0xfff;
            assert_eq!(size % 16, 0);
            assert_eq!(*w.last().unwrap(), crate::arch::RET);
        }
        let r = return_trampoline(0x10000, 0x2000_0000).unwrap();
        assert_eq!(RT_SIZE % 16, 0);
        let e = entry_trampoline(0x10000, 0x2000_0000, 42, false, Live::FunctionEntry).unwrap();
        // The tracer's part of a traced call, besides the stub's 12 + 7 and
        // the site's `b`: the trampoline up to its `blr` into the handler,
        // and the return trampoline up to its `blr`.
        let (te, tr) = (straight_path(0x10000, &e), straight_path(0x10000, &r));
        println!("entry trampoline to the handler: {te}; return trampoline to the handler: {tr} instructions");
        assert!(te <= 30 && tr <= 20, "entry {te}, return {tr}");
        assert!(words(&r).contains(&0xaa0003fe), "mov x30, x0: returns to the original address");
        assert!(return_block(0, 0, false, None).is_ok());
    }

    fn offsets() -> ShadowOffsets {
        ShadowOffsets {
            tls_in_tramp: 0x10,
            tls_shadow: 0x18,
            len: 0,
            cap: 8,
            entries: 16,
            entry_size: 48,
            e_slot: 0,
            e_orig: 8,
            e_func_depth: 16,
            e_mask: 24,
            e_time: 32,
            e_site: 40,
            fast_exit: 0x1234_5678,
        }
    }

    /// Inline code that fails when x9 is 0, else does nothing.
    fn fails_on_zero(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
        a.cbz(X9, fail)
    }

    #[test]
    fn count_trampoline_saves_what_the_code_may_clobber() {
        let (at, slow) = (0x10000, 0x10400);
        let c = count_trampoline(at, &fails_on_zero, slow).unwrap();
        let w = words(&c);
        assert_eq!(w[0], 0xa9bf2fea, "stp x10, x11, [sp, #-16]!");
        assert_eq!(&w[2..4], [0xa8c12fea, crate::arch::RET], "ldp x10, x11, [sp], #16; ret");
        assert_eq!(w[4], 0xa8c12fea, "the failure path restores them too");
        assert_eq!(crate::arch::branch_target(at + 20, w[5]), Some(slow));
        assert_eq!(straight_path(at as u64, &c), 4);
    }

    #[test]
    fn graph_stub_raises_the_count_and_leaves_through_its_word() {
        let (at, data, header, resume) = (0x40_0000, 0x41_0040, 0x41_0000, 0x38_1004);
        let s = graph_stub(at, data, header, 0x10, (resume, 7, 42)).unwrap();
        assert!(s.code.len() <= STUB_CODE);
        let w = words(&s.code);
        assert_eq!(&w[2..4], [0xd53bd051, 0x91004231], "mrs x17, tpidr_el0; add x17, x17, #0x10");
        assert_eq!(&w[4..7], [0xb9400229, 0x11000529, 0xb9000229], "ldr w9; add w9, #1; str w9");
        assert_eq!(&w[8..10], [0xf9400a11, 0xd61f0220], "ldr x17, [x16, #16]; br x17");
        assert_eq!(straight_path(at as u64, &s.code), 10);
        let null = (s.null - at) / 4;
        assert!(w[null..].contains(&0x889ffe11), "the null path lowers the count: stlr w17, [x16]");
        let d = |o: usize| u64::from_le_bytes(s.data[o..o + 8].try_into().unwrap());
        assert_eq!((d(8), d(16)), (7 | 42 << 32, s.null as u64));
        let go_on = (d(0) as usize - at) / 4;
        assert_eq!(crate::arch::branch_target(d(0) as usize, w[go_on]), Some(resume), "goes on by a direct b");
        assert_eq!(words(&s.code)[(d(24) as usize - at) / 4], 0xa8c17bfd, "the tail pops the frame record");
        let far = graph_stub(at, data, header, 0x10, (at + (200 << 20), 7, 42));
        assert!(far.is_none(), "resume out of a b's reach");
    }

    #[test]
    fn graph_trampoline_and_return_block_assemble_around_op_code() {
        let sh = offsets();
        let (at, block, slow) = (0x50000, 0x60000, 0x50800);
        let g = graph_trampoline(at, &sh, 3, (block, slow), &fails_on_zero).unwrap();
        let w = words(&g);
        assert_eq!(w[0], 0x7100053f, "cmp w9, #1: the recursion guard");
        // The fast path ends in a branch to the thunk, the slow one to the
        // direct trampoline, with x30 the stub's tail.
        let n = straight_path(at as u64, &g);
        assert_eq!(crate::arch::branch_target(at + 4 * (n - 1), w[n - 1]), Some(block));
        assert_eq!(crate::arch::branch_target(at + 4 * (w.len() - 1), w[w.len() - 1]), Some(slow));
        assert_eq!(w[w.len() - 2], 0xf9400e1e, "ldr x30, [x16, #24]");
        let r = return_block(block, 0x2000_0000, false, Some((&sh, &fails_on_zero))).unwrap();
        let rw = words(&r);
        assert_eq!(&rw[..4], [0xb9400211, 0x51000631, 0x889ffe11, 0xd63f0120], "ldr; sub; stlr; blr x9");
        let rn = straight_path((block + RETURN_OFFSET) as u64, &r[RETURN_OFFSET..]);
        assert_eq!(rw[RETURN_OFFSET / 4 + rn - 1], crate::arch::RET, "the fast return ends in ret");
        let plain = return_block(block, 0x2000_0000, false, None).unwrap();
        assert_eq!(&plain[RETURN_OFFSET..], return_trampoline(block + RETURN_OFFSET, 0x2000_0000).unwrap());
        println!("graph entry {n}, fast return {rn} instructions around op code of one");
    }
}
