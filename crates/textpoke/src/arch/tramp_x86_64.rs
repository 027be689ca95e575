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
//! # Return trampoline (function_graph)
//!
//! A traced function whose return address was replaced returns here with
//! its results in rax/rdx and xmm0/xmm1 (ymm when AVX). The trampoline
//! pushes a placeholder, saves those, calls `handler(saved, caller_sp)`
//! where `caller_sp` is the stack pointer the function returned with (its
//! return slot + 8), stores the returned original address into the
//! placeholder, restores, and `ret`s to it: the caller sees the exact stack
//! pointer and registers it would have seen.

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
pub fn count_trampoline(at: usize, l: &crate::record::CountLayout, slow: usize) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut undo = a.create_label();
    let mut pop_slow = a.create_label();
    let (busy, session, counters, ncounters) = (l.busy as i32, l.session as i32, l.counters as i32, l.ncounters as i32);
    a.push(rax)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(rsi)?;
    a.mov(rax, qword_ptr(l.tls_buf as i32).fs())?; // this thread's buffer
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

/// The return trampoline placed at `at`, calling
/// `handler(saved: *mut SavedReturn, caller_sp: usize) -> usize` which
/// returns the original return address.
pub fn return_trampoline(at: usize, handler: usize, avx: bool) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
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
            let r = return_trampoline(0x10000, 0x20000, avx).unwrap();
            assert!(r.len() < 256);
        }
    }
}
