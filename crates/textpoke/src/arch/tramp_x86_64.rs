//! Trampoline code for x86-64, generated at run time.
//!
//! # Stub
//!
//! Every traced site calls its own 10-byte stub: `push imm32` (the site's
//! index) then `jmp rel32` to a shared trampoline. No register is touched,
//! so stubs also serve sites in the middle of a function body.
//!
//! # Entry trampoline
//!
//! On entry `[rsp]` is the site index, `[rsp+8]` the return address into
//! the site, and for a site at a function's entry `[rsp+16]` is the
//! function's own return address. The trampoline makes a frame (`rbp`),
//! aligns the stack to 32 bytes, saves the registers that may be live
//! ([`Live`]: at a function entry the argument registers; in a body every
//! caller-saved one: 9 general-purpose and vectors 0-15; vectors as ymm
//! when the CPU has AVX) into a [`SavedRegs`], and calls `handler(regs, frame, ctx)` where `frame` is
//! its `rbp` (so `frame[1]` is the site index, `frame[2]` the return into
//! the site, `frame[3]` the function's return address) and `ctx` a value
//! baked into the code. Then it restores everything, drops the index and
//! returns into the site. Flags are clobbered (allowed at a function entry,
//! and sites in a body tell the compiler so); the red zone is free (at an
//! entry nothing lives below `rsp`; body sites are not `nostack`).
//!
//! # Count and graph trampolines
//!
//! For a site whose only op is the recorder's, the count trampoline
//! ([`count_trampoline`]) and, at a function entry, the graph trampoline
//! ([`graph_trampoline`], reached through a [`graph_stub`] the site jumps
//! to) do the recorder's protocol in generated code and fall back to a
//! direct trampoline for anything unusual.
//!
//! # Return trampoline (function_graph)
//!
//! A traced function whose return address was replaced returns here with
//! its results in rax/rdx and xmm0/xmm1 (ymm when AVX). The trampoline
//! pushes a placeholder, saves those, calls `handler(saved, caller_sp)`
//! where `caller_sp` is the stack pointer the function returned with (its
//! return slot + 8), stores the returned original address into the
//! placeholder, restores, and `ret`s to it: the caller sees the exact stack
//! pointer and registers it would have seen. It sits in the never-freed
//! return block right after the graph trampolines' thunk (`call r11`), whose
//! return address it is; it first tries the graph op's exit inline.

use iced_x86::code_asm::*;

/// Length of a stub.
pub const STUB_LEN: usize = 10;

/// Registers saved by the entry trampoline, in this order.
#[repr(C, align(32))]
#[derive(Debug, Clone, Copy)]
pub struct SavedRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    _pad: [u64; 3],
    /// xmm/ymm 0-15, 32 bytes each (the low 16 when only SSE is saved).
    pub vec: [[u8; 32]; 16],
}

/// Registers saved by the return trampoline.
#[repr(C, align(32))]
#[derive(Debug, Clone, Copy)]
pub struct SavedReturn {
    pub rax: u64,
    pub rdx: u64,
    _pad: [u64; 2],
    pub vec0: [u8; 32],
    pub vec1: [u8; 32],
}

const GPR_OFF: [(AsmRegister64, i32); 9] =
    [(rax, 0), (rcx, 8), (rdx, 16), (rsi, 24), (rdi, 32), (r8, 40), (r9, 48), (r10, 56), (r11, 64)];
const VEC_OFF: i32 = 96;

/// Whether the CPU and OS have AVX state enabled (then ymm is saved).
pub fn has_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

fn ymm_reg(i: usize) -> AsmRegisterYmm {
    [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15][i]
}
fn xmm_reg(i: usize) -> AsmRegisterXmm {
    [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15][i]
}

fn save_vec(a: &mut CodeAssembler, i: usize, off: i32, avx: bool) -> Result<(), IcedError> {
    if avx {
        a.vmovdqu(ymmword_ptr(rsp + off), ymm_reg(i))
    } else {
        a.movdqu(xmmword_ptr(rsp + off), xmm_reg(i))
    }
}

fn load_vec(a: &mut CodeAssembler, i: usize, off: i32, avx: bool) -> Result<(), IcedError> {
    if avx {
        a.vmovdqu(ymm_reg(i), ymmword_ptr(rsp + off))
    } else {
        a.movdqu(xmm_reg(i), xmmword_ptr(rsp + off))
    }
}

/// `push imm32(index); jmp target`, placed at `at`. `None` if `target` is
/// out of rel32 reach or the index does not fit.
pub fn stub(at: usize, index: u32, target: usize) -> Option<[u8; STUB_LEN]> {
    let imm = i32::try_from(index).ok()?.to_le_bytes();
    let disp = i32::try_from(target as i128 - (at as i128 + STUB_LEN as i128)).ok()?.to_le_bytes();
    Some([0x68, imm[0], imm[1], imm[2], imm[3], 0xe9, disp[0], disp[1], disp[2], disp[3]])
}

/// Which registers an entry trampoline must preserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// At a function's first instruction: only the argument registers (rdi,
    /// rsi, rdx, rcx, r8, r9, rax for varargs, r10 for the static chain,
    /// vector 0-7) are live; r11 and vectors 8-15 are dead by the ABI.
    FunctionEntry,
    /// Inside a body: every caller-saved register may hold a live value.
    Body,
}

/// The entry trampoline placed at `at`, calling
/// `handler(regs: *mut SavedRegs, frame: *mut u64, ctx: usize)`.
pub fn entry_trampoline(at: usize, handler: usize, ctx: usize, avx: bool, live: Live) -> Result<Vec<u8>, IcedError> {
    let (gprs, vecs) = match live {
        Live::FunctionEntry => (&GPR_OFF[..8], 8),
        Live::Body => (&GPR_OFF[..], 16),
    };
    let frame_size = (VEC_OFF as usize + 32 * vecs) as i32;
    let mut a = CodeAssembler::new(64)?;
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.and(rsp, -32)?;
    a.sub(rsp, frame_size)?;
    for &(r, off) in gprs {
        a.mov(qword_ptr(rsp + off), r)?;
    }
    for i in 0..vecs {
        save_vec(&mut a, i, VEC_OFF + 32 * i as i32, avx)?;
    }
    a.mov(rdi, rsp)?;
    a.mov(rsi, rbp)?;
    a.mov(rdx, ctx as u64)?;
    a.mov(rax, handler as u64)?;
    a.call(rax)?;
    for i in 0..vecs {
        load_vec(&mut a, i, VEC_OFF + 32 * i as i32, avx)?;
    }
    for &(r, off) in gprs {
        a.mov(r, qword_ptr(rsp + off))?;
    }
    if avx {
        // Leave no dirty upper state behind for SSE code: not vzeroupper
        // (that would clear the caller's live upper halves we restored).
    }
    a.mov(rsp, rbp)?;
    a.pop(rbp)?;
    a.lea(rsp, qword_ptr(rsp + 8))?; // drop the site index, keep flags as they are
    a.ret()?;
    a.assemble(at as u64)
}

/// Code an op generates to run inline in a trampoline, instead of being
/// called: `emit(a, fail)` appends it to `a`. It either falls through
/// having done its work, or jumps to `fail` having changed nothing another
/// thread or a later call could see. Which registers hold its inputs and
/// which it may clobber depends on the trampoline: see
/// [`count_trampoline`], [`graph_trampoline`] and [`return_block`].
pub type Emit<'a> = &'a dyn Fn(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>;

/// The count trampoline placed at `at`: on entry `[rsp]` is the function's
/// id (pushed by its stub). It saves four scratch registers, loads the id
/// into rcx and runs `count` (which may clobber rax, rcx, rdx and rsi),
/// and jumps to `slow` (a full entry trampoline) when `count` fails.
pub fn count_trampoline(at: usize, count: Emit<'_>, slow: usize) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut pop_slow = a.create_label();
    const SAVED: [AsmRegister64; 4] = [rax, rcx, rdx, rsi];
    for reg in SAVED {
        a.push(reg)?;
    }
    a.mov(ecx, dword_ptr(rsp + 32))?; // the id the stub pushed
    count(&mut a, pop_slow)?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.lea(rsp, qword_ptr(rsp + 8))?; // drop the id
    a.ret()?;
    a.set_label(&mut pop_slow)?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.jmp(slow as u64)?;
    a.assemble(at as u64)
}

/// Where the tracer keeps its per-thread state and shadow stacks, for the
/// graph and return trampolines (the tracer fills it in: this layer knows
/// no feature, only the offsets it is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowOffsets {
    /// Offsets from the thread pointer of the thread's recursion guard
    /// (`in_tramp`, u32) and shadow stack pointer: the same in every thread.
    pub tls_in_tramp: i32,
    pub tls_shadow: i32,
    /// Offsets in a shadow stack of `len`, `cap` (u64s) and the entries.
    pub len: usize,
    pub cap: usize,
    pub entries: usize,
    /// Size of an entry and offsets of its fields: `slot`, `orig` (u64),
    /// `func_depth` (u64: the function id, its depth << 32), `mask`,
    /// `time` (u64), `site` (u32).
    pub entry_size: usize,
    pub e_slot: usize,
    pub e_orig: usize,
    pub e_func_depth: usize,
    pub e_mask: usize,
    pub e_time: usize,
    pub e_site: usize,
    /// Address of the word holding the op bit whose exits the return
    /// trampoline may handle inline (0: none).
    pub fast_exit: usize,
}

/// Length of a graph stub: `lea r11, [rip+5]; jmp rel32` and its data
/// (see [`graph_stub`]).
pub const GRAPH_STUB_LEN: usize = 28;
/// Offsets in a graph stub's data (what `r11` points to): where the
/// function continues after the site, the site index (a u64), the
/// function's id (u32, in the index's upper half).
const GS_RESUME: i32 = 0;
const GS_INDEX: i32 = 8;
const GS_FUNC: i32 = 12;

/// The stub of a site whose target is a graph trampoline, placed at `at`.
/// The site *jumps* to it (no return address is pushed, so the return
/// stack buffer stays in step: see [`graph_trampoline`]); it points `r11`
/// (free at a function's entry) at its data — the address after the site
/// (`resume`), the site `index` and the function id `func` — and jumps to
/// `tramp`. `None` if `tramp` is out of rel32 reach.
pub fn graph_stub(at: usize, resume: usize, index: u32, func: u32, tramp: usize) -> Option<[u8; GRAPH_STUB_LEN]> {
    let disp = i32::try_from(tramp as i128 - (at as i128 + 12)).ok()?.to_le_bytes();
    let mut s = [0u8; GRAPH_STUB_LEN];
    s[..7].copy_from_slice(&[0x4c, 0x8d, 0x1d, 5, 0, 0, 0]); // lea r11, [rip+5]: the data
    s[7] = 0xe9;
    s[8..12].copy_from_slice(&disp);
    s[12..20].copy_from_slice(&(resume as u64).to_le_bytes());
    s[20..24].copy_from_slice(&index.to_le_bytes());
    s[24..28].copy_from_slice(&func.to_le_bytes());
    Some(s)
}

/// The graph trampoline placed at `at`, for function-entry sites whose
/// only op `op` has inline entry and exit code (the tracer's
/// `TraceOp::inline`).
///
/// Entered from a [`graph_stub`] with `[rsp]` the function's return
/// address and `r11` the stub's data. Under the recursion guard, it checks
/// that `op` is still the op whose exits the return trampoline handles
/// (`sh.fast_exit`) and that the thread has room on its shadow stack, runs
/// the op's `entry` code with rdi = the function id and rcx = the depth
/// (it may clobber rax, rcx, rdx, rsi, rdi, r8 and the flags; r9, r10 and
/// r11 are not its to touch), pushes the shadow entry exactly as the
/// tracer's hot path does, drops the return address from the stack and
/// jumps to `thunk`, a `call r11` (into the function, after the site)
/// whose return address is the return trampoline: it lands in the very
/// slot the old return address was in, so the function sees the stack it
/// would have seen. Every call and return then pairs up — the caller's
/// call with the return trampoline's final `ret`, the thunk's call with
/// the function's `ret` — and the CPU predicts both returns, where
/// replacing a return address in place costs a mispredicted return (9 ns
/// measured here: over a third of the budget).
///
/// Any other case (an op no longer the fast-exit op, a thread inside the
/// tracer, no shadow stack yet, a full shadow stack, the op's code failing)
/// pushes the resume address and the site index as a stub's `call` and
/// `push` would have and jumps to `slow`, the op's direct trampoline.
pub fn graph_trampoline(
    at: usize,
    sh: &ShadowOffsets,
    op: usize,
    (thunk, slow): (usize, usize),
    entry: Emit<'_>,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut leave = a.create_label();
    let mut pop_slow = a.create_label();
    // rdi, rsi, rdx, rcx, r8 (arguments) and rax (vector count of a
    // varargs call) are restored; after the pushes [rsp+48] is the
    // function's return address. r9 and r10 are not touched.
    const SAVED: [AsmRegister64; 6] = [rax, rdx, rcx, rsi, rdi, r8];
    for reg in SAVED {
        a.push(reg)?;
    }
    let slot = 48;
    // The recursion guard, held until the shadow entry is pushed, as the
    // hot path holds it: a signal handler's traced calls meanwhile are not
    // traced. (Without it they pushed their entry over the one being
    // written here, before its length was stored: found by a signal storm.)
    a.cmp(dword_ptr(sh.tls_in_tramp).fs(), 0)?;
    a.jne(pop_slow)?;
    a.mov(dword_ptr(sh.tls_in_tramp).fs(), 1)?;
    // The op is still the one whose exits the return trampoline handles
    // (an op being unregistered gets no entry it would get no exit for).
    a.mov(rdx, sh.fast_exit as u64)?;
    a.mov(rax, 1u64 << op)?;
    a.cmp(qword_ptr(rdx), rax)?;
    a.jne(leave)?;
    a.mov(rsi, qword_ptr(sh.tls_shadow).fs())?;
    a.test(rsi, rsi)?;
    a.jz(leave)?;
    a.mov(rcx, qword_ptr(rsi + sh.len as i32))?; // depth
    a.cmp(rcx, qword_ptr(rsi + sh.cap as i32))?;
    a.jae(leave)?;
    a.mov(edi, dword_ptr(r11 + GS_FUNC))?;
    entry(&mut a, leave)?;

    // The shadow entry, then its length.
    a.mov(rsi, qword_ptr(sh.tls_shadow).fs())?;
    a.mov(rcx, qword_ptr(rsi + sh.len as i32))?;
    a.imul_3(rdx, rcx, sh.entry_size as i32)?;
    a.add(rdx, rsi)?;
    let e = |off: usize| qword_ptr(rdx + (sh.entries + off) as i32);
    a.lea(rax, qword_ptr(rsp + slot))?;
    a.mov(e(sh.e_slot), rax)?;
    a.mov(rax, qword_ptr(rax))?;
    a.mov(e(sh.e_orig), rax)?;
    a.mov(edi, dword_ptr(r11 + GS_FUNC))?;
    a.mov(rax, rcx)?;
    a.shl(rax, 32)?;
    a.or(rdi, rax)?; // func | depth << 32
    a.mov(e(sh.e_func_depth), rdi)?;
    a.mov(rax, 1u64 << op)?;
    a.mov(e(sh.e_mask), rax)?;
    a.mov(e(sh.e_time), 0)?;
    a.mov(eax, dword_ptr(r11 + GS_INDEX))?;
    a.mov(dword_ptr(rdx + (sh.entries + sh.e_site) as i32), eax)?;
    a.inc(rcx)?;
    a.mov(qword_ptr(rsi + sh.len as i32), rcx)?;
    a.mov(dword_ptr(sh.tls_in_tramp).fs(), 0)?;
    a.mov(r11, qword_ptr(r11 + GS_RESUME))?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.lea(rsp, qword_ptr(rsp + 8))?; // the return address is in the shadow entry
    a.jmp(thunk as u64)?;
    a.set_label(&mut leave)?;
    a.mov(dword_ptr(sh.tls_in_tramp).fs(), 0)?;
    a.set_label(&mut pop_slow)?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.push(qword_ptr(r11 + GS_RESUME))?; // as the site's call would have
    a.push(qword_ptr(r11 + GS_INDEX))?; // as a stub's push: the index (func above it)
    a.jmp(slow as u64)?;
    a.assemble(at as u64)
}

/// Offset of the return trampoline in [`return_block`]: after the thunk.
pub const RETURN_OFFSET: usize = 3;

/// A never-freed return block placed at `at`: the thunk `call r11` that
/// graph trampolines jump to, then, at [`RETURN_OFFSET`] (the thunk's
/// return address), the return trampoline (see [`return_trampoline`]).
pub fn return_block(
    at: usize,
    handler: usize,
    avx: bool,
    fast: Option<(&ShadowOffsets, Emit<'_>)>,
) -> Result<Vec<u8>, IcedError> {
    let mut code = vec![0x41, 0xff, 0xd3]; // call r11
    debug_assert_eq!(code.len(), RETURN_OFFSET);
    code.extend(return_trampoline(at + RETURN_OFFSET, handler, avx, fast)?);
    Ok(code)
}

/// The return trampoline placed at `at`, calling
/// `handler(saved: *mut SavedReturn, caller_sp: usize) -> usize` which
/// returns the original return address.
///
/// With `fast = (offsets, exit)` it first tries to do inline what the
/// handler would: when the shadow stack's top entry is this frame's (its
/// slot is right below the stack pointer) and its mask is the fast-exit
/// op's, it runs the op's `exit` code with rdx = the entry's `func_depth`
/// and the return value at `[rsp+8]` (it may clobber rax, rdx, rsi, r8,
/// r9, r10, r11 and the flags, and must keep rcx and rdi), pops the entry
/// and returns to the original return address, touching only registers no
/// caller keeps across a call (rax and rdx are restored). Any other case
/// goes to the handler.
pub fn return_trampoline(
    at: usize,
    handler: usize,
    avx: bool,
    fast: Option<(&ShadowOffsets, Emit<'_>)>,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    if let Some((sh, exit)) = fast {
        fast_return(&mut a, sh, exit)?;
    }
    a.push(0)?; // placeholder for the original return address
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.and(rsp, -32)?;
    a.sub(rsp, 96)?;
    a.mov(qword_ptr(rsp), rax)?;
    a.mov(qword_ptr(rsp + 8), rdx)?;
    save_vec(&mut a, 0, 32, avx)?;
    save_vec(&mut a, 1, 64, avx)?;
    a.mov(rdi, rsp)?;
    a.lea(rsi, qword_ptr(rbp + 16))?;
    a.mov(rax, handler as u64)?;
    a.call(rax)?;
    a.mov(qword_ptr(rbp + 8), rax)?;
    load_vec(&mut a, 0, 32, avx)?;
    load_vec(&mut a, 1, 64, avx)?;
    a.mov(rdx, qword_ptr(rsp + 8))?;
    a.mov(rax, qword_ptr(rsp))?;
    a.mov(rsp, rbp)?;
    a.pop(rbp)?;
    a.ret()?;
    a.assemble(at as u64)
}

/// The fast path of the return trampoline; falls through to the slow one
/// with the stack and registers as they came.
fn fast_return(a: &mut CodeAssembler, sh: &ShadowOffsets, exit: Emit<'_>) -> Result<(), IcedError> {
    let mut out = a.create_label();
    // The results, below the caller's stack pointer (nothing of the caller
    // lives there after a return) and below this frame's return slot at
    // caller_sp - 8, which stays untouched: until the pop, the shadow entry
    // points at it, and an unwinder's restore and re-arm (a signal handler
    // throwing and catching) write there. [rsp] rdx, [rsp+8] rax.
    a.lea(rsp, qword_ptr(rsp - 8))?;
    a.push(rax)?;
    a.push(rdx)?;
    a.mov(r9, sh.fast_exit as u64)?;
    a.mov(r9, qword_ptr(r9))?;
    a.test(r9, r9)?;
    a.jz(out)?;
    a.cmp(dword_ptr(sh.tls_in_tramp).fs(), 0)?;
    a.jne(out)?;
    a.mov(rsi, qword_ptr(sh.tls_shadow).fs())?;
    a.test(rsi, rsi)?;
    a.jz(out)?;
    a.mov(rcx, qword_ptr(rsi + sh.len as i32))?;
    a.test(rcx, rcx)?;
    a.jz(out)?;
    a.dec(rcx)?; // the top entry's index, and the length after the pop
    a.imul_3(rdi, rcx, sh.entry_size as i32)?;
    a.add(rdi, rsi)?;
    let e = |off: usize| qword_ptr(rdi + (sh.entries + off) as i32);
    a.lea(r8, qword_ptr(rsp + 16))?; // caller_sp - 8: this frame's return slot
    a.cmp(e(sh.e_slot), r8)?; // else frames were skipped, or restored for an unwinder
    a.jne(out)?;
    a.cmp(e(sh.e_mask), r9)?;
    a.jne(out)?;
    a.mov(rdx, e(sh.e_func_depth))?;
    exit(a, out)?;
    // Recorded: pop the entry (a signal handler's traced calls from now on
    // push over it), then return to the original address.
    a.mov(r8, e(sh.e_orig))?;
    a.mov(rsi, qword_ptr(sh.tls_shadow).fs())?;
    a.mov(qword_ptr(rsi + sh.len as i32), rcx)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    // `ret`, not `jmp`: after a graph trampoline's thunk, the caller's own
    // call is the newest one the CPU has not seen return.
    a.mov(qword_ptr(rsp), r8)?;
    a.ret()?;
    a.set_label(&mut out)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.lea(rsp, qword_ptr(rsp + 8))
}

/// Instructions on the path from `code`'s start (at `ip`) that takes no
/// conditional branch, following unconditional jumps within `code`, to the
/// first `ret` or jump out of it: every conditional branch of a fast path
/// leaves it, so this is what one traced call executes there (tests of the
/// trampolines and of the ops that generate inline code count them).
#[cfg(test)]
pub(crate) fn straight_path(ip: u64, code: &[u8]) -> usize {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let end = ip + code.len() as u64;
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut n = 0;
    while d.can_decode() {
        let i = d.decode();
        n += 1;
        match i.flow_control() {
            FlowControl::Return => return n,
            FlowControl::UnconditionalBranch => {
                let t = i.near_branch_target();
                if !(ip..end).contains(&t) {
                    return n;
                }
                d.set_position((t - ip) as usize).expect("a target inside the code");
                d.set_ip(t);
            }
            _ => {}
        }
        assert!(n < 10_000, "a loop on the straight path");
    }
    panic!("no jmp or ret")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_encodes_push_and_jmp() {
        let s = stub(0x1000, 7, 0x2000).unwrap();
        assert_eq!(&s[..5], &[0x68, 7, 0, 0, 0]);
        assert_eq!(s[5], 0xe9);
        assert_eq!(i32::from_le_bytes(s[6..].try_into().unwrap()), 0x2000 - 0x100a);
        assert!(stub(0x1000, 7, 0x1000 + (1 << 32)).is_none());
    }

    #[test]
    fn trampolines_assemble() {
        for avx in [false, true] {
            let e = entry_trampoline(0x10000, 0x20000, 42, avx, Live::Body).unwrap();
            let f = entry_trampoline(0x10000, 0x20000, 42, avx, Live::FunctionEntry).unwrap();
            assert!(f.len() < e.len());
            assert!(e.len() > 100 && e.len() < 1024);
            let r = return_trampoline(0x10000, 0x20000, avx, None).unwrap();
            assert!(r.len() < 256);
        }
    }

    /// The tracer's part of the graph fast paths, with an op whose inline
    /// code is one `nop`: what every traced call pays besides the op.
    #[test]
    fn graph_frame_stays_short() {
        let sh = ShadowOffsets {
            tls_in_tramp: -64,
            tls_shadow: -56,
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
            fast_exit: 0x7000,
        };
        let nop: Emit<'_> = &|a, _fail| a.nop();
        let entry = graph_trampoline(0x10000, &sh, 3, (0x40000, 0x20000), nop).unwrap();
        let block = return_block(0x40000, 0x30000, true, Some((&sh, nop))).unwrap();
        let stub = graph_stub(0x50000, 0x60005, 7, 9, 0x10000).unwrap();
        let (s, e, r) = (
            straight_path(0x50000, &stub),
            straight_path(0x10000, &entry),
            straight_path(0x40000 + RETURN_OFFSET as u64, &block[RETURN_OFFSET..]),
        );
        println!("graph frame: stub {s}, entry {e}, thunk 1, return {r} instructions (1 of each is the op's)");
        assert_eq!(s, 2);
        // Measured: entry 51, return 31 (the nop included).
        assert!(e <= 55 && r <= 35, "entry {e}, return {r}");
    }
}
