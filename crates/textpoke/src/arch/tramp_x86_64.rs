//! Trampoline code for x86-64, generated at run time.
//!
//! # Quiescence counter
//!
//! The tracer frees trampolines after a grace period that reads a
//! per-thread nesting count instead of interrupting threads (see
//! `trace::grace`). That count must cover every instant a thread can be in
//! code that may be freed, so it is raised by code that is never freed
//! *before* the thread enters such code, and lowered only after it has
//! left it. [`Counter`] says where the count is: a `u32` at a fixed offset
//! from the thread pointer (`inc`/`dec` in place), or, when the tracer's
//! thread-local is not in the static TLS block, behind never-freed helper
//! routines that save every register.
//!
//! # Stubs
//!
//! Every traced site has its own stubs (one per kind: [`call_stub`] for
//! trampolines entered by `call`, whose pushed value is the site index or
//! the function id; [`graph_stub`] for graph trampolines, entered by
//! `jmp`), made once and never freed or given to another site while the
//! site's object is loaded. A stub is code (near the site, rel32 reach)
//! and data (a writable page near it): the stub raises the count, then
//! goes on through its *word*, an 8-byte data slot holding the address of
//! its trampoline. Changing a site's trampoline is an atomic store to that
//! word, not a code change; retiring a trampoline points the word at the
//! stub's own *null* path (lower the count, carry on untraced) before the
//! grace period. A thread that registered nowhere yet takes a cold path
//! first (the count starts at [`UNREGISTERED`], so the stub's `inc` leaves
//! the sign flag set): a never-freed [`register_routine`] saves every
//! register and calls the tracer, which records where the thread's count
//! is, so grace periods can read it.
//!
//! A call stub is `inc count; js register; push value; call [word];
//! lea rsp, [rsp+8]; dec count; ret`: the trampoline returns into the stub,
//! which drops the value, lowers the count and returns into the site. No
//! register but the flags changes, so stubs also serve sites in the
//! middle of a function body.
//!
//! # Entry trampoline
//!
//! On entry `[rsp]` is the return into the stub, `[rsp+8]` the value the
//! stub pushed (the site index), `[rsp+16]` the return address into the
//! site, and for a site at a function's entry `[rsp+24]` is the function's
//! own return address. The trampoline makes a frame (`rbp`), aligns the
//! stack to 32 bytes, saves the registers that may be live ([`Live`]: at a
//! function entry the argument registers; in a body every caller-saved
//! one: 9 general-purpose and vectors 0-15; vectors as ymm when the CPU
//! has AVX) into a [`SavedRegs`], and calls `handler(regs, frame, ctx)`
//! where `frame` is its `rbp` (so `frame[1]` is the return into the stub,
//! `frame[2]` the site index, `frame[3]` the return into the site,
//! `frame[4]` the function's return address) and `ctx` a value baked into
//! the code. Then it restores everything and returns into the stub. Flags
//! are clobbered (allowed at a function entry, and sites in a body tell
//! the compiler so); the red zone is free (at an entry nothing lives below
//! `rsp`; body sites are not `nostack`).
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
//! return block right after the graph trampolines' thunk (`dec count; call
//! r11`), whose return address it is; it first tries the graph op's exit
//! inline. It is never freed, so it needs no count of its own.

use super::asm::{
    dword_ptr, qword_ptr, AsmError, Assembler, Label,
    Reg32::*,
    Reg64::{self, *},
    Vector,
};

/// A thread's count while it is not registered with the tracer (bit 31):
/// a stub's `inc` then leaves the sign flag set and takes its cold path.
/// The low bits still count nesting.
pub const UNREGISTERED: u32 = 1 << 31;

/// Where a thread's quiescence count is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// A `u32` at this offset from the thread pointer: stubs `inc` and
    /// `dec` it in place.
    Tls(i32),
    /// Not addressable from generated code (dynamic TLS): stubs call the
    /// never-freed helpers of [`enter_routine`] and [`leave_routine`].
    Calls,
}

/// Size of a stub's code slot and of its data slot.
pub const STUB_CODE: usize = 64;
pub const STUB_DATA: usize = 32;

/// A stub block's header is its first data slot: the words stubs call the
/// never-freed routines through (code and data blocks may lie farther
/// than rel32 from those routines). With [`Counter::Tls`]: the register
/// routines of call stubs and graph stubs ([`register_routine`]); with
/// [`Counter::Calls`]: the enter and leave routines.
pub const HDR_CALL: usize = 0;
pub const HDR_GRAPH: usize = 8;
pub const HDR_LEAVE: usize = 16;

/// A stub, ready to be written: its code, its data slot's initial bytes,
/// the offset of its word in the data slot, and the address the word
/// holds while the stub has no trampoline (its null path).
#[derive(Debug, Clone)]
pub struct StubCode {
    pub code: Vec<u8>,
    pub data: [u8; STUB_DATA],
    pub word: usize,
    pub null: usize,
}

/// `rel32` from the end of an instruction at `next` to `target`.
fn rel32(next: usize, target: usize) -> Option<[u8; 4]> {
    i32::try_from(target as i128 - next as i128).ok().map(i32::to_le_bytes)
}

/// `inc dword fs:[off]` (1) or `dec dword fs:[off]` (0x0c).
fn fs_incdec(modrm: u8, off: i32) -> [u8; 8] {
    let d = off.to_le_bytes();
    [0x64, 0xff, modrm, 0x25, d[0], d[1], d[2], d[3]]
}
const INC: u8 = 0x04;
const DEC: u8 = 0x0c;

/// A call stub placed at `at` with its data slot at `data` and its block's
/// header at `header`: the site calls it; it raises the count, pushes
/// `value` (the site index, or for a count trampoline the function id),
/// calls through its word, then drops the value, lowers the count and
/// returns into the site. `None` if the data is out of rel32 reach.
///
/// With [`Counter::Tls`] (54 bytes at most, 4 instructions on the way in,
/// 3 on the way out):
///
/// ```text
///  0: inc dword fs:[count]
///  8: js cold
/// 10: again: push value
/// 15: call [word]
/// 21: lea rsp, [rsp+8]
/// 26: dec dword fs:[count]
/// 34: ret                     ; the null path: the word points here
/// 35: cold: call [header.call] ; register_routine: returns to `again`,
/// 41: jmp again                ; or into the site (thread exiting)
/// ```
pub fn call_stub(at: usize, data: usize, header: usize, value: u32, counter: Counter) -> Option<StubCode> {
    let v = i32::try_from(value).ok()?.to_le_bytes();
    let mut c = Vec::with_capacity(48);
    let null = match counter {
        Counter::Tls(off) => {
            c.extend(fs_incdec(INC, off));
            c.extend([0x78, 35 - 10]); // js cold
            c.extend([0x68, v[0], v[1], v[2], v[3]]);
            c.extend([0xff, 0x15]);
            c.extend(rel32(at + 21, data)?);
            c.extend([0x48, 0x8d, 0x64, 0x24, 0x08]);
            c.extend(fs_incdec(DEC, off));
            c.push(0xc3);
            c.extend([0xff, 0x15]);
            c.extend(rel32(at + 41, header + HDR_CALL)?);
            c.extend([0xeb, (10i32 - 43) as u8]); // jmp again
            at + 34
        }
        Counter::Calls => {
            c.extend([0xff, 0x15]);
            c.extend(rel32(at + 6, header + HDR_CALL)?); // enter: or into the site
            c.extend([0x68, v[0], v[1], v[2], v[3]]);
            c.extend([0xff, 0x15]);
            c.extend(rel32(at + 17, data)?);
            c.extend([0x48, 0x8d, 0x64, 0x24, 0x08]);
            c.extend([0xff, 0x15]);
            c.extend(rel32(at + 28, header + HDR_LEAVE)?);
            c.push(0xc3);
            at + 28
        }
    };
    debug_assert!(c.len() <= STUB_CODE);
    let mut d = [0u8; STUB_DATA];
    d[..8].copy_from_slice(&(null as u64).to_le_bytes());
    Some(StubCode { code: c, data: d, word: 0, null })
}

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

impl SavedRegs {
    /// Integer argument `n` (0-5: rdi, rsi, rdx, rcx, r8, r9).
    pub fn int_arg(&self, n: usize) -> Option<u64> {
        [self.rdi, self.rsi, self.rdx, self.rcx, self.r8, self.r9].get(n).copied()
    }
    /// Floating-point argument `n` (xmm0-7), low 8 bytes.
    pub fn float_arg(&self, n: usize) -> Option<f64> {
        (n < 8).then(|| f64::from_le_bytes(self.vec[n][..8].try_into().unwrap()))
    }
    /// The first integer result register (rax).
    pub fn int_result(&self) -> u64 {
        self.rax
    }
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

impl SavedReturn {
    /// The integer result (rax).
    pub fn int_result(&self) -> u64 {
        self.rax
    }
    /// The floating-point result (xmm0's low 8 bytes).
    pub fn float_result(&self) -> f64 {
        f64::from_le_bytes(self.vec0[..8].try_into().unwrap())
    }
}

/// Where the traced function's return address is: the stack slot above
/// the site's return address (`frame[4]`, see "Entry trampoline").
///
/// # Safety
/// `frame` must be the frame an entry trampoline passed to its handler.
pub unsafe fn return_slot(frame: *const usize) -> usize {
    frame as usize + 32
}

/// The stack pointer the traced function was entered with: its return
/// address's slot.
///
/// # Safety
/// As [`return_slot`].
pub unsafe fn entry_sp(frame: *const usize) -> usize {
    frame as usize + 32
}

const GPR_OFF: [(Reg64, i32); 9] =
    [(rax, 0), (rcx, 8), (rdx, 16), (rsi, 24), (rdi, 32), (r8, 40), (r9, 48), (r10, 56), (r11, 64)];
const VEC_OFF: i32 = 96;

/// Whether the CPU and OS have AVX state enabled (then ymm is saved).
pub fn has_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

/// Vector register `i` as saved: ymm with AVX, else xmm.
fn vector(i: usize, avx: bool) -> Vector {
    if avx {
        Vector::Ymm(i as u8)
    } else {
        Vector::Xmm(i as u8)
    }
}

fn save_vec(a: &mut Assembler, i: usize, off: i32, avx: bool) -> Result<(), AsmError> {
    a.store_vector(rsp + off, vector(i, avx))
}

fn load_vec(a: &mut Assembler, i: usize, off: i32, avx: bool) -> Result<(), AsmError> {
    a.load_vector(vector(i, avx), rsp + off)
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
pub fn entry_trampoline(at: usize, handler: usize, ctx: usize, avx: bool, live: Live) -> Result<Vec<u8>, AsmError> {
    let (gprs, vecs) = match live {
        Live::FunctionEntry => (&GPR_OFF[..8], 8),
        Live::Body => (&GPR_OFF[..], 16),
    };
    let frame_size = (VEC_OFF as usize + 32 * vecs) as i32;
    let mut a = Assembler::new()?;
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
    a.ret()?; // into the stub, which drops the index and lowers the count
    a.assemble(at)
}

/// Saves every register a site in a function body may have live (the
/// nine caller-saved general-purpose ones, vectors 0-15 as ymm with
/// `avx`), calls `handler() -> u32`, restores them all and leaves the zero
/// flag set when the handler returned 0. Only the flags change.
fn save_all_and_call(a: &mut Assembler, handler: usize, avx: bool) -> Result<(), AsmError> {
    let frame_size = VEC_OFF + 32 * 16;
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.and(rsp, -32)?;
    a.sub(rsp, frame_size)?;
    for &(r, off) in &GPR_OFF {
        a.mov(qword_ptr(rsp + off), r)?;
    }
    for i in 0..16 {
        save_vec(a, i, VEC_OFF + 32 * i as i32, avx)?;
    }
    a.mov(rax, handler as u64)?;
    a.call(rax)?;
    a.test(eax, eax)?; // what follows keeps the flags: moves, pop
    for i in 0..16 {
        load_vec(a, i, VEC_OFF + 32 * i as i32, avx)?;
    }
    for &(r, off) in &GPR_OFF {
        a.mov(r, qword_ptr(rsp + off))?;
    }
    a.mov(rsp, rbp)?;
    a.pop(rbp)
}

/// Where a stub's cold path goes when its thread may not be traced (it is
/// exiting): back into a call site, or on into the function after a graph
/// site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Called from a [`call_stub`]: `[rsp]` returns into the stub,
    /// `[rsp+8]` into the site.
    ToSite,
    /// Called from a [`graph_stub`]: `[rsp]` returns into the stub,
    /// `[rsp+8]` is the function's return address, r11 the stub's data.
    ToResume,
}

/// A never-freed routine placed at `at` that a stub calls on its cold
/// path (its thread's count had [`UNREGISTERED`] set): saves every
/// register, calls `handler() -> u32` (the tracer registers the thread,
/// which clears the flag and keeps the nesting count; it returns 0, having
/// undone the stub's `inc`, when the thread may not be traced), restores
/// everything, and returns into the stub, or on handler 0 leaves as
/// `skip` says: untraced, the stub's trampoline never reached. With
/// [`Counter::Calls`] it is the *enter* routine every call stub calls
/// first (the handler also raises the count).
pub fn register_routine(at: usize, handler: usize, avx: bool, skip: Skip) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    let skipped = a.create_label();
    save_all_and_call(&mut a, handler, avx)?;
    a.jz(skipped)?;
    a.ret()?;
    a.set_label(skipped)?;
    a.lea(rsp, qword_ptr(rsp + 8))?; // the return into the stub
    match skip {
        Skip::ToSite => a.ret()?,
        Skip::ToResume => a.jmp_mem(qword_ptr(r11 + GS_RESUME))?,
    }
    a.assemble(at)
}

/// The never-freed *leave* routine of [`Counter::Calls`] placed at `at`:
/// every call stub calls it on its way out; it saves every register,
/// calls `handler()` (which lowers the count) and returns.
pub fn leave_routine(at: usize, handler: usize, avx: bool) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    save_all_and_call(&mut a, handler, avx)?;
    a.ret()?;
    a.assemble(at)
}

/// Code an op generates to run inline in a trampoline, instead of being
/// called: `emit(a, fail)` appends it to `a`. It either falls through
/// having done its work, or jumps to `fail` having changed nothing another
/// thread or a later call could see. Which registers hold its inputs and
/// which it may clobber depends on the trampoline: see
/// [`count_trampoline`], [`graph_trampoline`] and [`return_block`].
pub type Emit<'a> = &'a dyn Fn(&mut Assembler, Label) -> Result<(), AsmError>;

/// The count trampoline placed at `at`: on entry `[rsp]` returns into the
/// stub and `[rsp+8]` is the function's id (pushed by its stub). It saves
/// four scratch registers, loads the id into rcx and runs `count` (which
/// may clobber rax, rcx, rdx and rsi), and returns into the stub, or jumps
/// to `slow` (a full entry trampoline, same stack) when `count` fails.
pub fn count_trampoline(at: usize, count: Emit<'_>, slow: usize) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    let pop_slow = a.create_label();
    const SAVED: [Reg64; 4] = [rax, rcx, rdx, rsi];
    for reg in SAVED {
        a.push(reg)?;
    }
    a.mov(ecx, dword_ptr(rsp + 40))?; // the id the stub pushed
    count(&mut a, pop_slow)?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.ret()?; // into the stub, which drops the id and lowers the count
    a.set_label(pop_slow)?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.jmp_to(slow)?;
    a.assemble(at)
}

/// Where the tracer keeps its per-thread state and shadow stacks, for the
/// graph and return trampolines (the tracer fills it in: this layer knows
/// no feature, only the offsets it is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowOffsets {
    /// Offsets from the thread pointer of the thread's quiescence count
    /// (`in_tramp`, a u32 nesting count that is also the recursion guard:
    /// a graph stub raised it to 1, more means the thread was already in
    /// tracer code) and shadow stack pointer: the same in every thread.
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

/// Offsets in a graph stub's data (what `r11` points to): where the
/// function continues after the site, the site index (a u64), the
/// function's id (u32, in the index's upper half), the stub's word (its
/// graph trampoline) and its tail (what a direct trampoline entered on the
/// graph trampoline's slow path returns to).
const GS_RESUME: i32 = 0;
const GS_INDEX: i32 = 8;
const GS_FUNC: i32 = 12;
const GS_WORD: usize = 16;
const GS_TAIL: i32 = 24;

/// The stub of a site whose target is a graph trampoline, placed at `at`
/// with its data slot at `data` and its block's header at `header` (needs
/// [`Counter::Tls`] at offset `count`). The site *jumps* to it (no return
/// address is pushed, so the return stack buffer stays in step: see
/// [`graph_trampoline`]); it points `r11` (free at a function's entry) at
/// its data — the address after the site (`resume`), the site `index`, the
/// function id `func`, its word and its tail — raises the count and jumps
/// through its word. `None` if the data is out of rel32 reach.
///
/// ```text
///  0: lea r11, [data]
///  7: inc dword fs:[count]
/// 15: js cold
/// 17: again: jmp [r11+word]
/// 21: tail: lea rsp, [rsp+8]   ; a direct trampoline returns here:
/// 26: dec dword fs:[count]     ; drop the index, lower the count,
/// 34: ret                      ; return to `resume`
/// 35: null: dec dword fs:[count] ; the word points here when the stub
/// 43: jmp [r11]                ; has no trampoline: on, untraced
/// 46: cold: call [header.graph] ; register_routine (Skip::ToResume)
/// 52: jmp again
/// ```
pub fn graph_stub(
    at: usize,
    data: usize,
    header: usize,
    count: i32,
    (resume, index, func): (usize, u32, u32),
) -> Option<StubCode> {
    let mut c = Vec::with_capacity(56);
    c.extend([0x4c, 0x8d, 0x1d]);
    c.extend(rel32(at + 7, data)?);
    c.extend(fs_incdec(INC, count));
    c.extend([0x78, 46 - 17]); // js cold
    c.extend([0x41, 0xff, 0x63, GS_WORD as u8]); // jmp [r11+word]
    c.extend([0x48, 0x8d, 0x64, 0x24, 0x08]);
    c.extend(fs_incdec(DEC, count));
    c.push(0xc3);
    c.extend(fs_incdec(DEC, count));
    c.extend([0x41, 0xff, 0x23]); // jmp [r11]
    c.extend([0xff, 0x15]);
    c.extend(rel32(at + 52, header + HDR_GRAPH)?);
    c.extend([0xeb, (17i32 - 54) as u8]); // jmp again
    debug_assert!(c.len() <= STUB_CODE);
    let null = at + 35;
    let mut d = [0u8; STUB_DATA];
    d[0..8].copy_from_slice(&(resume as u64).to_le_bytes());
    d[8..12].copy_from_slice(&index.to_le_bytes());
    d[12..16].copy_from_slice(&func.to_le_bytes());
    d[GS_WORD..GS_WORD + 8].copy_from_slice(&(null as u64).to_le_bytes());
    d[24..32].copy_from_slice(&((at + 21) as u64).to_le_bytes());
    Some(StubCode { code: c, data: d, word: GS_WORD, null })
}

/// The graph trampoline placed at `at`, for function-entry sites whose
/// only op `op` has inline entry and exit code (the tracer's
/// `TraceOp::inline`).
///
/// Entered from a [`graph_stub`] with `[rsp]` the function's return
/// address, `r11` the stub's data and the thread's count raised by the
/// stub. If the count is 1 (the thread was not already in tracer code: the
/// count is the recursion guard), it checks
/// that `op` is still the op whose exits the return trampoline handles
/// (`sh.fast_exit`) and that the thread has room on its shadow stack, runs
/// the op's `entry` code with rdi = the function id and rcx = the depth
/// (it may clobber rax, rcx, rdx, rsi, rdi, r8 and the flags; r9, r10 and
/// r11 are not its to touch), pushes the shadow entry exactly as the
/// tracer's hot path does, drops the return address from the stack and
/// jumps to `thunk`, `dec count; call r11` (lowers the count in
/// never-freed code, then calls into the function, after the site) whose
/// return address is the return trampoline: it lands in the very
/// slot the old return address was in, so the function sees the stack it
/// would have seen. Every call and return then pairs up — the caller's
/// call with the return trampoline's final `ret`, the thunk's call with
/// the function's `ret` — and the CPU predicts both returns, where
/// replacing a return address in place costs a mispredicted return (9 ns
/// measured here: over a third of the budget).
///
/// Any other case (an op no longer the fast-exit op, a thread inside the
/// tracer, no shadow stack yet, a full shadow stack, the op's code failing)
/// pushes the resume address, the site index and the stub's tail as a
/// site's `call` and a call stub's `push` and `call` would have and jumps
/// to `slow`, the op's direct trampoline, which returns into the tail
/// (which lowers the count and returns to the resume address).
pub fn graph_trampoline(
    at: usize,
    sh: &ShadowOffsets,
    op: usize,
    (thunk, slow): (usize, usize),
    entry: Emit<'_>,
) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    let pop_slow = a.create_label();
    // rdi, rsi, rdx, rcx, r8 (arguments) and rax (vector count of a
    // varargs call) are restored; after the pushes [rsp+48] is the
    // function's return address. r9 and r10 are not touched.
    const SAVED: [Reg64; 6] = [rax, rdx, rcx, rsi, rdi, r8];
    for reg in SAVED {
        a.push(reg)?;
    }
    let slot = 48;
    // The recursion guard: the count the stub raised, held until the thunk
    // lowers it, after the shadow entry is pushed: a signal handler's
    // traced calls meanwhile are not traced. (Without a guard they pushed
    // their entry over the one being written here, before its length was
    // stored: found by a signal storm.)
    a.cmp(dword_ptr(sh.tls_in_tramp).fs(), 1)?;
    a.jne(pop_slow)?;
    // The op is still the one whose exits the return trampoline handles
    // (an op being unregistered gets no entry it would get no exit for).
    a.mov(rdx, sh.fast_exit as u64)?;
    a.mov(rax, 1u64 << op)?;
    a.cmp(qword_ptr(rdx), rax)?;
    a.jne(pop_slow)?;
    a.mov(rsi, qword_ptr(sh.tls_shadow).fs())?;
    a.test(rsi, rsi)?;
    a.jz(pop_slow)?;
    a.mov(rcx, qword_ptr(rsi + sh.len as i32))?; // depth
    a.cmp(rcx, qword_ptr(rsi + sh.cap as i32))?;
    a.jae(pop_slow)?;
    a.mov(edi, dword_ptr(r11 + GS_FUNC))?;
    entry(&mut a, pop_slow)?;

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
    a.mov(r11, qword_ptr(r11 + GS_RESUME))?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.lea(rsp, qword_ptr(rsp + 8))?; // the return address is in the shadow entry
    a.jmp_to(thunk)?; // lowers the count, calls the function
    a.set_label(pop_slow)?;
    for reg in SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.push(qword_ptr(r11 + GS_RESUME))?; // as the site's call would have
    a.push(qword_ptr(r11 + GS_INDEX))?; // as a stub's push: the index (func above it)
    a.push(qword_ptr(r11 + GS_TAIL))?; // as a stub's call: the return into its tail
    a.jmp_to(slow)?;
    a.assemble(at)
}

/// Offset of the return trampoline in [`return_block`]: after the thunk.
pub const RETURN_OFFSET: usize = 11;

/// A never-freed return block placed at `at`: the thunk `dec count; call
/// r11` that graph trampolines jump to (with `fast`; `int3` padding
/// without), then, at [`RETURN_OFFSET`] (the thunk's return address), the
/// return trampoline (see [`return_trampoline`]).
pub fn return_block(
    at: usize,
    handler: usize,
    avx: bool,
    fast: Option<(&ShadowOffsets, Emit<'_>)>,
) -> Result<Vec<u8>, AsmError> {
    let mut code = match fast {
        Some((sh, _)) => fs_incdec(DEC, sh.tls_in_tramp).to_vec(),
        None => vec![0xcc; 8],
    };
    code.extend([0x41, 0xff, 0xd3]); // call r11
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
) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
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
    a.assemble(at)
}

/// The fast path of the return trampoline; falls through to the slow one
/// with the stack and registers as they came.
fn fast_return(a: &mut Assembler, sh: &ShadowOffsets, exit: Emit<'_>) -> Result<(), AsmError> {
    let out = a.create_label();
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
    a.set_label(out)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.lea(rsp, qword_ptr(rsp + 8))
}

/// Instructions on the path from `code`'s start (at `ip`) that takes no
/// conditional branch, following unconditional jumps within `code`, to the
/// first `ret` or jump out of it: every conditional branch of a fast path
/// leaves it, so this is what one traced call executes there (tests of the
/// trampolines and of the ops that generate inline code count them;
/// public for the latter, which live in crates above this one).
#[cfg(any(test, feature = "testing"))]
pub fn straight_path(ip: u64, code: &[u8]) -> usize {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let end = ip + code.len() as u64;
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut n = 0;
    while d.can_decode() {
        let i = d.decode();
        n += 1;
        match i.flow_control() {
            FlowControl::Return | FlowControl::IndirectBranch => return n,
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

/// `code` placed at `ip`, disassembled: one `address:instruction` per
/// element (Intel syntax).
#[cfg(any(test, feature = "testing"))]
fn disasm(ip: usize, code: &[u8]) -> Vec<String> {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let mut f = IntelFormatter::new();
    Decoder::with_ip(64, code, ip as u64, DecoderOptions::NONE)
        .into_iter()
        .map(|i| {
            let mut s = String::new();
            f.format(&i, &mut s);
            format!("{:x}:{s}", i.ip())
        })
        .collect()
}

/// `code` placed at `ip`, disassembled, one instruction a line (for
/// tests that print generated code).
#[cfg(feature = "testing")]
pub(crate) fn listing(ip: usize, code: &[u8]) -> String {
    disasm(ip, code).into_iter().map(|l| l + "\n").collect()
}

// ---------------------------------------------------------------- live patching
//
// The code `crate::live` (issue 12) runs at a patched function's entry
// during a transition. The site is `jmp stub` (a jump: nothing is pushed,
// the chosen version returns straight to the caller).

/// A live-patching transition stub placed at `at`, for live site `index`.
/// Its fast path compares the tag of the site's *word* (at `word`: bits
/// 48-63 the transition's tag for its target state, bits 0-47 the target
/// state's version) with the calling thread's tag (a `u64` at `mirror`
/// from the thread pointer, `None` when the live module's thread-local is
/// not in static TLS: then every call takes the slow path), and the whole
/// transition word (at `trans`) with the one the thread set its tag under
/// (the `u64` at `mirror + 8`): the 16-bit tag repeats every 16,384
/// generations, the transition word does not, so a thread that set its
/// tag long ago never takes the fast path on an old match. On a match it
/// jumps to the version; else it pushes `index` and goes to `slow` (see
/// [`live_slow_path`]). One load of the word gives tag and version, so a
/// stale word is a stale pair, never a mix. Only the flags change, and
/// the 32 bytes below the stack pointer (the function's red zone: the
/// function has not run yet, and signal frames skip the red zone):
///
/// ```text
///     push rax; push rcx
///     mov rax, WORD; mov rax, [rax]
///     mov rcx, rax; shr rcx, 48; shl rcx, 48
///     cmp rcx, fs:[mirror]; jne slow
///     mov rcx, TRANS; mov rcx, [rcx]
///     cmp rcx, fs:[mirror+8]; jne slow
///     shl rax, 16; shr rax, 16       ; the version
///     mov [rsp-8], rax; pop rcx; pop rax
///     jmp [rsp-24]
/// slow:
///     pop rcx; pop rax
///     push index; push rax
///     mov rax, SLOW; mov [rsp-8], rax; pop rax
///     jmp [rsp-16]
/// ```
pub fn live_stub(
    at: usize,
    (word, trans): (usize, usize),
    mirror: Option<i32>,
    index: u32,
    slow: usize,
) -> Result<Vec<u8>, AsmError> {
    let mut a = Assembler::new()?;
    let slow_label = a.create_label();
    a.push(rax)?;
    a.push(rcx)?;
    a.mov(rax, word as u64)?;
    a.mov(rax, qword_ptr(rax))?;
    match mirror {
        Some(off) => {
            a.mov(rcx, rax)?;
            a.shr(rcx, 48)?;
            a.shl(rcx, 48)?;
            a.cmp(rcx, qword_ptr(off).fs())?;
            a.jne(slow_label)?;
            a.mov(rcx, trans as u64)?;
            a.mov(rcx, qword_ptr(rcx))?;
            a.cmp(rcx, qword_ptr(off + 8).fs())?;
            a.jne(slow_label)?;
        }
        None => a.jmp(slow_label)?,
    }
    a.shl(rax, 16)?;
    a.shr(rax, 16)?;
    a.mov(qword_ptr(rsp - 8), rax)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.jmp_mem(qword_ptr(rsp - 24))?;
    a.set_label(slow_label)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.push(i64::from(index))?;
    a.push(rax)?;
    a.mov(rax, slow as u64)?;
    a.mov(qword_ptr(rsp - 8), rax)?;
    a.pop(rax)?;
    a.jmp_mem(qword_ptr(rsp - 16))?;
    a.assemble(at)
}

/// The shared slow path of [`live_stub`]s, placed at `at`. On entry
/// `[rsp]` is the live site index the stub pushed and `[rsp+8]` the
/// patched function's return address. Saves every caller-saved register
/// (r10, the static chain, and r11 included; vectors 0-15, as ymm with
/// `avx`), calls `handler(index, entry_sp, caller_rbp) -> version` where
/// `entry_sp` is the address of that return address, restores everything
/// and jumps to the version with the stack exactly as the caller's `call`
/// left it.
///
/// Keeping r11 and the other call-clobbered registers holds on the way
/// *in* only. A frame the slow path marks (its thread has not switched)
/// returns through [`return_trampoline`], which keeps only what the ABI
/// returns in (rax, rdx, xmm0/1): a caller that keeps a value in r11, or
/// any call-clobbered register, across the call (gcc's `-fipa-ra`, knowing
/// the old body does not touch it) loses it there, as it would with a
/// replacement compiled separately. Targets and their callers must be
/// built without interprocedural register allocation: `-fno-ipa-ra`, which
/// `-flive-patching=inline-clone` implies (docs/livepatch-writing.md §2;
/// gcc already turns it off for calls to patchable-entry functions).
pub fn live_slow_path(at: usize, handler: usize, avx: bool) -> Result<Vec<u8>, AsmError> {
    let frame_size = VEC_OFF + 32 * 16;
    let mut a = Assembler::new()?;
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.and(rsp, -32)?;
    a.sub(rsp, frame_size)?;
    for &(r, off) in &GPR_OFF {
        a.mov(qword_ptr(rsp + off), r)?;
    }
    for i in 0..16 {
        save_vec(&mut a, i, VEC_OFF + 32 * i as i32, avx)?;
    }
    a.mov(rdi, qword_ptr(rbp + 8))?;
    a.lea(rsi, qword_ptr(rbp + 16))?;
    a.mov(rdx, qword_ptr(rbp))?;
    a.mov(rax, handler as u64)?;
    a.call(rax)?;
    a.mov(qword_ptr(rbp + 8), rax)?; // the index's slot: where `ret` goes
    for i in 0..16 {
        load_vec(&mut a, i, VEC_OFF + 32 * i as i32, avx)?;
    }
    for &(r, off) in &GPR_OFF {
        a.mov(r, qword_ptr(rsp + off))?;
    }
    a.mov(rsp, rbp)?;
    a.pop(rbp)?;
    a.ret()?;
    a.assemble(at)
}

/// A far jump placed anywhere: `jmp [rip+0]; .quad to` (14 bytes), for a
/// site whose replacement lies beyond rel32 reach.
pub fn far_jump(to: usize) -> Vec<u8> {
    let mut c = vec![0xff, 0x25, 0, 0, 0, 0];
    c.extend((to as u64).to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_stubs_raise_the_count_first_and_lower_it_last() {
        let (at, data, header) = (0x1000, 0x9000, 0x8000);
        let s = call_stub(at, data, header, 7, Counter::Tls(-0x40)).unwrap();
        let d = disasm(at, &s.code);
        assert_eq!(
            d,
            [
                "1000:inc dword ptr fs:[0FFFFFFFFFFFFFFC0h]",
                "1008:js short 0000000000001023h",
                "100a:push 7",
                "100f:call qword ptr [9000h]",
                "1015:lea rsp,[rsp+8]",
                "101a:dec dword ptr fs:[0FFFFFFFFFFFFFFC0h]",
                "1022:ret",
                "1023:call qword ptr [8000h]",
                "1029:jmp short 000000000000100Ah",
            ],
            "{d:#?}"
        );
        assert_eq!((s.null, s.word), (0x1022, 0));
        assert_eq!(u64::from_le_bytes(s.data[..8].try_into().unwrap()), 0x1022, "the word starts at the null path");
        // In, through the word, out: 4 instructions before the trampoline, 3 after.
        assert_eq!(straight_path(at as u64, &s.code), 7);
        let c = call_stub(at, data, header, 7, Counter::Calls).unwrap();
        let d = disasm(at, &c.code);
        assert_eq!(
            d,
            [
                "1000:call qword ptr [8000h]",
                "1006:push 7",
                "100b:call qword ptr [9000h]",
                "1011:lea rsp,[rsp+8]",
                "1016:call qword ptr [8010h]",
                "101c:ret",
            ],
            "{d:#?}"
        );
        assert_eq!(c.null, 0x101c);
        assert!(call_stub(at, at + (1 << 32), header, 7, Counter::Calls).is_none(), "data out of reach");
        assert!(call_stub(at, data, header, 1 << 31, Counter::Calls).is_none(), "value does not fit");
    }

    #[test]
    fn graph_stubs_point_r11_at_their_data() {
        let (at, data, header) = (0x1000, 0x9000, 0x8000);
        let s = graph_stub(at, data, header, -0x40, (0x5005, 3, 9)).unwrap();
        let d = disasm(at, &s.code);
        assert_eq!(
            d,
            [
                "1000:lea r11,[9000h]",
                "1007:inc dword ptr fs:[0FFFFFFFFFFFFFFC0h]",
                "100f:js short 000000000000102Eh",
                "1011:jmp qword ptr [r11+10h]",
                "1015:lea rsp,[rsp+8]",
                "101a:dec dword ptr fs:[0FFFFFFFFFFFFFFC0h]",
                "1022:ret",
                "1023:dec dword ptr fs:[0FFFFFFFFFFFFFFC0h]",
                "102b:jmp qword ptr [r11]",
                "102e:call qword ptr [8008h]",
                "1034:jmp short 0000000000001011h",
            ],
            "{d:#?}"
        );
        let word = |o: usize| u64::from_le_bytes(s.data[o..o + 8].try_into().unwrap());
        assert_eq!((word(0), word(8), word(16), word(24)), (0x5005, 3 | 9 << 32, 0x1023, 0x1015));
        assert_eq!((s.null, s.word), (0x1023, 16));
        assert_eq!(straight_path(at as u64, &s.code), 4);
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
        let stub = graph_stub(0x50000, 0x60000, 0x61000, -64, (0x70005, 7, 9)).unwrap();
        let (s, e, t, r) = (
            straight_path(0x50000, &stub.code),
            straight_path(0x10000, &entry),
            disasm(0x40000, &block[..RETURN_OFFSET]).len(), // dec, call r11
            straight_path(0x40000 + RETURN_OFFSET as u64, &block[RETURN_OFFSET..]),
        );
        println!("graph frame: stub {s}, entry {e}, thunk {t}, return {r} instructions (1 of each is the op's)");
        // The stub's count (inc, js) and the thunk's dec are the grace
        // period's; the trampoline no longer sets and clears the guard.
        assert_eq!((s, t), (4, 2));
        // Measured: entry 49, return 31 (the nop included).
        assert!(e <= 53 && r <= 35, "entry {e}, return {r}");
    }
}
