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

/// The count trampoline placed at `at`: on entry `[rsp]` is the function's
/// recorder id (pushed by its stub). It performs the recorder's count
/// protocol (K1 save and set `busy`, K2 session and range checks, K3 one
/// `inc`, K4 restore `busy`; see `record::buffer`) with four scratch
/// registers it saves, and jumps to `slow` (a full entry trampoline whose
/// handler calls `record::count`) when the thread has no buffer yet, the
/// buffer is stale or the id is out of range.
pub fn count_trampoline(at: usize, l: &crate::record::BufferLayout, slow: usize) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut undo = a.create_label();
    let mut pop_slow = a.create_label();
    let (busy, session, counters, ncounters) = (l.busy as i32, l.session as i32, l.counters as i32, l.ncounters as i32);
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(rsi)?;
    a.mov(rax, qword_ptr(l.tls_buf).fs())?; // this thread's buffer
    a.test(rax, rax)?;
    a.jz(pop_slow)?;
    a.mov(edx, dword_ptr(rax + busy))?; // K1: was = busy; busy = 1
    a.mov(dword_ptr(rax + busy), 1)?;
    a.mov(rsi, l.active as u64)?;
    a.mov(rsi, qword_ptr(rsi))?;
    a.cmp(rsi, qword_ptr(rax + session))?; // K2: current session
    a.jne(undo)?;
    a.mov(ecx, dword_ptr(rsp + 32))?; // the id the stub pushed
    a.cmp(rcx, qword_ptr(rax + ncounters))?; // K2: in range
    a.jae(undo)?;
    a.mov(rsi, qword_ptr(rax + counters))?;
    a.inc(qword_ptr(rsi + rcx * 8))?; // K3: one instruction
    a.mov(dword_ptr(rax + busy), edx)?; // K4 (a plain store is a release on x86)
    a.pop(rsi)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.lea(rsp, qword_ptr(rsp + 8))?; // drop the id
    a.ret()?;
    a.set_label(&mut undo)?;
    a.mov(dword_ptr(rax + busy), edx)?;
    a.set_label(&mut pop_slow)?;
    a.pop(rsi)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.jmp(slow as u64)?;
    a.assemble(at as u64)
}

/// Where the recorder's and the tracer's per-thread state are, for the
/// graph trampolines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphLayout {
    pub rec: crate::record::BufferLayout,
    pub sh: crate::trace::ShadowLayout,
}

impl GraphLayout {
    /// Both layouts, if both thread-locals are in the static TLS block.
    pub fn get() -> Option<GraphLayout> {
        Some(GraphLayout { rec: crate::record::buffer_layout()?, sh: crate::trace::shadow_layout()? })
    }
}

/// The second word of a ring record (see `record::format::RawRecord`):
/// `func | depth << 32 | kind << 48`, flags 0.
const fn kind_bits(kind: u8) -> u64 {
    (kind as u64) << 48
}

/// Reads the ordered TSC into rax (clobbers rdx): the recorder's clock
/// when it is the TSC (the callers check `use_tsc`).
fn read_clock(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.lfence()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// The recorder's protocol up to the slot write, for `need` slots, with
/// the buffer in `buf` and `t` a scratch register: busy (H2), session
/// (H3), room without refreshing the cached tail (H4), and no half-full
/// crossing (the slow path wakes the writer there). Jumps to `slow` before
/// taking `busy`, to `undo` after.
fn claim_slots(
    a: &mut CodeAssembler,
    l: &crate::record::BufferLayout,
    (buf, t): (AsmRegister64, AsmRegister64),
    need: i32,
    (slow, undo): (CodeLabel, CodeLabel),
) -> Result<(), IcedError> {
    let f = |off: usize| qword_ptr(buf + off as i32);
    a.mov(buf, qword_ptr(l.tls_buf).fs())?; // H1
    a.test(buf, buf)?;
    a.jz(slow)?;
    a.cmp(dword_ptr(buf + l.busy as i32), 0)?; // H2: nested records drop in the slow path
    a.jne(slow)?;
    a.mov(dword_ptr(buf + l.busy as i32), 1)?;
    a.mov(t, l.active as u64)?; // H3
    a.mov(t, qword_ptr(t))?;
    a.cmp(t, f(l.session))?;
    a.jne(undo)?;
    a.mov(t, f(l.head))?; // H4: head + need - cached_tail <= cap
    a.sub(t, f(l.cached_tail))?;
    a.add(t, need)?;
    a.cmp(t, f(l.cap))?;
    a.ja(undo)?;
    // Half full is crossed when head - tail goes from below cap/2 to at
    // least cap/2: 2 * (head + need - tail) - cap in [0, 2 * need).
    a.add(t, t)?;
    a.sub(t, f(l.cap))?;
    a.cmp(t, 2 * need - 1)?;
    a.jbe(undo)
}

/// H5: clamps the timestamp in rax to the thread's last one, stores it.
fn clamp_time(a: &mut CodeAssembler, l: &crate::record::BufferLayout, buf: AsmRegister64) -> Result<(), IcedError> {
    a.cmp(rax, qword_ptr(buf + l.last_ts as i32))?;
    a.cmovb(rax, qword_ptr(buf + l.last_ts as i32))?;
    a.mov(qword_ptr(buf + l.last_ts as i32), rax)
}

/// `slot = ring + ((head + k) & (cap - 1)) * 16` into `out` (`t` scratch).
fn ring_slot(
    a: &mut CodeAssembler,
    l: &crate::record::BufferLayout,
    buf: AsmRegister64,
    k: i32,
    (out, t): (AsmRegister64, AsmRegister64),
) -> Result<(), IcedError> {
    a.mov(t, qword_ptr(buf + l.cap as i32))?;
    a.dec(t)?;
    a.mov(out, qword_ptr(buf + l.head as i32))?;
    if k != 0 {
        a.add(out, k)?;
    }
    a.and(out, t)?;
    a.shl(out, 4)?;
    a.add(out, qword_ptr(buf + l.ring as i32))
}

/// Length of a graph stub: `lea r11, [rip+5]; jmp rel32` and its data
/// (see [`graph_stub`]).
pub const GRAPH_STUB_LEN: usize = 28;
/// Offsets in a graph stub's data (what `r11` points to): where the
/// function continues after the site, the site index (a u64), the
/// function's recorder id (u32, in the index's upper half).
const GS_RESUME: i32 = 0;
const GS_INDEX: i32 = 8;
const GS_FUNC: i32 = 12;

/// The stub of a site whose target is a graph trampoline, placed at `at`.
/// The site *jumps* to it (no return address is pushed, so the return
/// stack buffer stays in step: see [`graph_trampoline`]); it points `r11`
/// (free at a function's entry) at its data — the address after the site
/// (`resume`), the site `index` and the recorder id `func` — and jumps to
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
/// only op `op` records the function graph (`TraceOp::records_graph`).
///
/// Entered from a [`graph_stub`] with `[rsp]` the function's return
/// address and `r11` the stub's data. Under the recursion guard, it reads
/// the ordered TSC as soon as it knows the op and clock are right (so the
/// remaining checks overlap its latency), records the entry (H1-H8 of
/// `record::buffer`), pushes the shadow entry exactly as
/// `hot::function_entry` does, drops the return address from the stack
/// and jumps to `thunk`, a `call r11` (into the function, after the site)
/// whose return address is the return trampoline: it lands in the very
/// slot the old return address was in, so the function sees the stack it
/// would have seen. Every call and return then pairs up — the caller's
/// call with the return trampoline's final `ret`, the thunk's call with
/// the function's `ret` — and the CPU predicts both returns, where
/// replacing a return address in place costs a mispredicted return (9 ns
/// measured here: over a third of the budget).
///
/// Any other case (a monotonic clock, an op no longer the recorder's
/// registered graph op (`hot::FAST_EXIT`), a thread inside the tracer, no
/// shadow stack or buffer yet, a full shadow stack, a nested record, a
/// stale session, a ring that needs its tail refreshed or the writer
/// woken) pushes the resume address and the site index as a stub's `call`
/// and `push` would have and jumps to `slow`, the op's direct trampoline.
pub fn graph_trampoline(
    at: usize,
    l: &GraphLayout,
    op: usize,
    thunk: usize,
    slow: usize,
) -> Result<Vec<u8>, IcedError> {
    let (r, sh) = (&l.rec, &l.sh);
    let mut a = CodeAssembler::new(64)?;
    let mut undo = a.create_label();
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
    // The op is still the one whose exits the return trampoline records
    // (an op being unregistered gets no entry it would get no exit for),
    // and the clock is the TSC: checked before reading it.
    a.mov(rdx, sh.fast_exit as u64)?;
    a.mov(rax, 1u64 << op)?;
    a.cmp(qword_ptr(rdx), rax)?;
    a.jne(leave)?;
    a.mov(rdx, r.use_tsc as u64)?;
    a.cmp(byte_ptr(rdx), 0)?;
    a.je(leave)?;
    // H0, first of the record: the checks below overlap its latency.
    read_clock(&mut a)?;
    a.mov(rsi, qword_ptr(sh.tls_shadow).fs())?;
    a.test(rsi, rsi)?;
    a.jz(leave)?;
    a.mov(rcx, qword_ptr(rsi + sh.len as i32))?; // depth
    a.cmp(rcx, qword_ptr(rsi + sh.cap as i32))?;
    a.jae(leave)?;
    claim_slots(&mut a, r, (r8, rdx), 1, (leave, undo))?;
    clamp_time(&mut a, r, r8)?;
    ring_slot(&mut a, r, r8, 0, (rdx, rdi))?; // H6
    a.mov(qword_ptr(rdx), rax)?;
    a.mov(edi, dword_ptr(r11 + GS_FUNC))?;
    a.mov(rax, rcx)?;
    a.shl(rax, 32)?;
    a.or(rdi, rax)?; // func | depth << 32
    a.mov(rax, kind_bits(crate::record::format::KIND_ENTRY))?;
    a.or(rax, rdi)?;
    a.mov(qword_ptr(rdx + 8), rax)?;
    a.add(qword_ptr(r8 + r.head as i32), 1)?; // H7 (x86 stores are release)
    a.mov(dword_ptr(r8 + r.busy as i32), 0)?; // H8

    // The shadow entry, then its length.
    a.imul_3(rdx, rcx, sh.entry_size as i32)?;
    a.add(rdx, rsi)?;
    let e = |off: usize| qword_ptr(rdx + (sh.entries + off) as i32);
    a.lea(rax, qword_ptr(rsp + slot))?;
    a.mov(e(sh.e_slot), rax)?;
    a.mov(rax, qword_ptr(rax))?;
    a.mov(e(sh.e_orig), rax)?;
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
    a.set_label(&mut undo)?;
    a.mov(dword_ptr(r8 + r.busy as i32), 0)?;
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

/// The tracer's never-freed return block placed at `at`: the thunk `call
/// r11` that graph trampolines jump to, then, at [`RETURN_OFFSET`] (the
/// thunk's return address), the return trampoline (see
/// [`return_trampoline`]).
pub fn return_block(at: usize, handler: usize, avx: bool, fast: Option<&GraphLayout>) -> Result<Vec<u8>, IcedError> {
    let mut code = vec![0x41, 0xff, 0xd3]; // call r11
    debug_assert_eq!(code.len(), RETURN_OFFSET);
    code.extend(return_trampoline(at + RETURN_OFFSET, handler, avx, fast)?);
    Ok(code)
}

/// The return trampoline placed at `at`, calling
/// `handler(saved: *mut SavedReturn, caller_sp: usize) -> usize` which
/// returns the original return address.
///
/// With `fast` it first tries what `graph_trampoline` does for entries:
/// when the shadow stack's top entry is this frame's (its slot is right
/// below the stack pointer) and its mask is the graph-recording op's
/// (`hot::FAST_EXIT`), it records the exit and the return value (H1-H8,
/// two slots), pops the entry and returns to the original return address,
/// touching only rax/rdx (restored) and registers no caller keeps across a
/// call. Any other case goes to the handler.
pub fn return_trampoline(
    at: usize,
    handler: usize,
    avx: bool,
    fast: Option<&GraphLayout>,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    if let Some(l) = fast {
        fast_return(&mut a, l)?;
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
fn fast_return(a: &mut CodeAssembler, l: &GraphLayout) -> Result<(), IcedError> {
    let (r, sh) = (&l.rec, &l.sh);
    let mut undo = a.create_label();
    let mut out = a.create_label();
    // The results, below the caller's stack pointer (nothing of the caller
    // lives there after a return) and below this frame's return slot at
    // caller_sp - 8, which stays untouched: until the pop, the shadow entry
    // points at it, and an unwinder's restore and re-arm (a signal handler
    // throwing and catching) write there. [rsp] rdx, [rsp+8] rax.
    a.lea(rsp, qword_ptr(rsp - 8))?;
    a.push(rax)?;
    a.push(rdx)?;
    // Before the clock: whether the recorder's graph op is registered
    // (other function_graph ops never pay a clock read here) and the clock
    // is the TSC.
    a.mov(r9, sh.fast_exit as u64)?;
    a.mov(r9, qword_ptr(r9))?;
    a.test(r9, r9)?;
    a.jz(out)?;
    a.mov(rdx, r.use_tsc as u64)?;
    a.cmp(byte_ptr(rdx), 0)?;
    a.je(out)?;
    read_clock(a)?;
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
    claim_slots(a, r, (r11, rdx), 2, (out, undo))?;
    // Nothing fails from here. Read the entry, then pop it: a signal
    // handler tracing calls from now on pushes over it.
    a.mov(rdx, e(sh.e_func_depth))?;
    a.mov(rdi, e(sh.e_orig))?;
    a.mov(qword_ptr(rsi + sh.len as i32), rcx)?;
    clamp_time(a, r, r11)?;
    ring_slot(a, r, r11, 0, (rsi, r8))?; // H6: the exit record
    a.mov(qword_ptr(rsi), rax)?;
    a.mov(rax, kind_bits(crate::record::format::KIND_EXIT))?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rsi + 8), rax)?;
    ring_slot(a, r, r11, 1, (rsi, r8))?; // and the value record
    a.mov(rax, qword_ptr(rsp + 8))?;
    a.mov(qword_ptr(rsi), rax)?;
    a.mov(rax, kind_bits(crate::record::format::KIND_VALUE))?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rsi + 8), rax)?;
    a.add(qword_ptr(r11 + r.head as i32), 2)?; // H7
    a.mov(dword_ptr(r11 + r.busy as i32), 0)?; // H8
    a.pop(rdx)?;
    a.pop(rax)?;
    // `ret`, not `jmp`: after a graph trampoline's thunk, the caller's own
    // call is the newest one the CPU has not seen return.
    a.mov(qword_ptr(rsp), rdi)?;
    a.ret()?;
    a.set_label(&mut undo)?;
    a.mov(dword_ptr(r11 + r.busy as i32), 0)?;
    a.set_label(&mut out)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.lea(rsp, qword_ptr(rsp + 8))
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

    /// Instructions on the straight path from `code`'s start (at `ip`) to
    /// its first `jmp` or `ret`: every conditional branch of a fast path
    /// leaves it, so this is what one traced call executes there.
    fn straight_path(ip: u64, code: &[u8]) -> usize {
        use iced_x86::{Decoder, DecoderOptions, FlowControl};
        let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
        let mut n = 0;
        while d.can_decode() {
            let i = d.decode();
            n += 1;
            if matches!(i.flow_control(), FlowControl::UnconditionalBranch | FlowControl::Return) {
                return n;
            }
        }
        panic!("no jmp or ret")
    }

    /// Each instruction between the two ordered clock reads of a traced
    /// call costs about 0.035 ns (`lfence` waits for them to retire): a
    /// guard against the fast paths growing unnoticed.
    #[test]
    fn graph_fast_paths_stay_short() {
        let (Some(l), Some(_)) = (GraphLayout::get(), crate::trace::shadow_layout()) else { return };
        let entry = graph_trampoline(0x10000, &l, 3, 0x40000, 0x20000).unwrap();
        let block = return_block(0x40000, 0x30000, true, Some(&l)).unwrap();
        let stub = graph_stub(0x50000, 0x60005, 7, 9, 0x10000).unwrap();
        let (s, e, r) = (
            straight_path(0x50000, &stub),
            straight_path(0x10000, &entry),
            straight_path(0x40000 + RETURN_OFFSET as u64, &block[RETURN_OFFSET..]),
        );
        println!("graph fast path: stub {s}, entry {e}, thunk 1, return {r} instructions");
        assert_eq!(s, 2);
        assert!(e <= 90 && r <= 85, "entry {e}, return {r}");
    }
}
