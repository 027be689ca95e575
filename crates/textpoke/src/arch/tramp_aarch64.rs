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
//! # Not here yet
//!
//! The count and graph trampolines (an op's inline code: the recorder's
//! fast paths) are x86-64 code; on aarch64 the tracer calls every op
//! through the hot path (`trace::state`: no inline code), and
//! [`count_trampoline`], [`graph_trampoline`] and [`graph_stub`] say so if
//! asked. C++ exceptions through functions whose return is hooked are not
//! handled (x86-64's unwinder hooks restore return addresses in stack
//! slots; on aarch64 the replaced x30 is saved wherever the function's
//! prologue put it).

use super::asm::{AsmError, Assembler, Cond, Index, Label, Reg, FP, LR, SP};

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
pub const STUB_CODE: usize = 128;
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

const X9: Reg = Reg(9);
const X16: Reg = Reg(16);
const X17: Reg = Reg(17);

/// x16 = the address of the count (`TPIDR_EL0 + off`).
fn count_address(a: &mut Assembler, off: i32) -> Result<(), AsmError> {
    a.mrs_tpidr(X16)?;
    a.add_offset(X16, X16, off, X17)
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
        match counter {
            Counter::Tls(off) => {
                count_address(a, off)?;
                a.ldr_w(X17, X16, 0)?;
                a.add_imm_w(X17, X17, 1)?;
                a.str_w(X17, X16, 0)?;
                a.tbnz_w(X17, 31, cold)?;
            }
            Counter::Calls => {
                a.load_far(X16, header + HDR_CALL)?; // the enter routine
                a.blr(X16)?;
                a.b_cond(Cond::Eq, done)?;
            }
        }
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
        a.set_label(null)?;
        a.ret()?;
        a.set_label(cold)?;
        if let Counter::Tls(_) = counter {
            a.load_far(X16, header + HDR_CALL)?;
            a.blr(X16)?;
            a.b_cond(Cond::Ne, again)?;
            a.b(done)?;
        }
        Ok(())
    };
    build(&mut a).ok()?;
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

/// Code an op generates to run inline in a trampoline (see the x86-64
/// version). No aarch64 trampoline runs it yet.
pub type Emit<'a> = &'a dyn Fn(&mut Assembler, Label) -> Result<(), AsmError>;

fn x86_only(what: &str) -> AsmError {
    AsmError::new(format!("{what}: inline op code runs in x86-64 trampolines only (aarch64 calls the op)"))
}

/// Not on aarch64 (module docs, "Not here yet").
pub fn count_trampoline(_at: usize, _count: Emit<'_>, _slow: usize) -> Result<Vec<u8>, AsmError> {
    Err(x86_only("count trampoline"))
}

/// Where the tracer keeps its per-thread state and shadow stacks (the
/// x86-64 graph trampolines read it; here only the layout is shared).
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

/// Not on aarch64 (module docs, "Not here yet").
pub fn graph_stub(_at: usize, _data: usize, _header: usize, _count: i32, _ids: (usize, u32, u32)) -> Option<StubCode> {
    None
}

/// Not on aarch64 (module docs, "Not here yet").
pub fn graph_trampoline(
    _at: usize,
    _sh: &ShadowOffsets,
    _op: usize,
    _to: (usize, usize),
    _entry: Emit<'_>,
) -> Result<Vec<u8>, AsmError> {
    Err(x86_only("graph trampoline"))
}

/// Offset of the return trampoline in [`return_block`]: no thunk before it.
pub const RETURN_OFFSET: usize = 0;

/// The never-freed return block placed at `at`: the return trampoline
/// (`fast`, an op's inline exit, is x86-64 only).
pub fn return_block(
    at: usize,
    handler: usize,
    _avx: bool,
    fast: Option<(&ShadowOffsets, Emit<'_>)>,
) -> Result<Vec<u8>, AsmError> {
    if fast.is_some() {
        return Err(x86_only("graph return block"));
    }
    return_trampoline(at, handler)
}

/// Frame of the return trampoline: x29/x30, then [`SavedReturn`].
const RT_SAVED: i32 = 16;
const RT_SIZE: u32 = (RT_SAVED as u32 + std::mem::size_of::<SavedReturn>() as u32).next_multiple_of(16);

/// The return trampoline placed at `at`, calling
/// `handler(saved: *mut SavedReturn, caller_sp: usize) -> usize` (the
/// original return address), then returning there with every result
/// register as the function left it.
pub fn return_trampoline(at: usize, handler: usize) -> Result<Vec<u8>, AsmError> {
    let v = RT_SAVED + 8 * 10;
    let mut a = Assembler::new()?;
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
    a.ret()?;
    a.assemble(at)
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
        assert!(count_trampoline(0, &|_, _| Ok(()), 0).is_err());
    }
}
