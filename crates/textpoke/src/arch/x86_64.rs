//! x86-64: encodings, decoding checks (iced-x86) and trap emulation.
//!
//! - **Encodings.** `int3` is the trap byte; a patchable site is the 5-byte
//!   NOP ([`NOP5`]), a `call rel32` or a `jmp rel32` ([`encode_call`],
//!   [`encode_jmp`]: `None` beyond ±2 GiB). What compilers put at entries
//!   is in the `entry` submodule ([`NopForm`], [`branch_target_len`]).
//! - **Decoding checks** (iced-x86, 64-bit mode). A poke's bytes must be
//!   one whole instruction ([`check_one_instruction`]) or whole
//!   instructions ([`check_whole_instructions`]); an address is an
//!   instruction boundary when decoding from its function's start lands on
//!   it exactly ([`check_boundary`], which otherwise names the instruction
//!   that steps over it).
//! - **Trap emulation.** [`emulation_for`] says what the trap handler does
//!   instead of a new instruction (the kernel's `int3_emulate_*`): skip a
//!   NOP, jump, or push the return address and jump; [`emulate`] does it
//!   on the interrupted context.
//! - **Parked threads.** A thread stopped in a signal handler of its own
//!   resumes later at the PC saved in that handler's signal frame:
//!   [`for_each_outer_pc`] finds those frames above a stack pointer by the
//!   kernel's `rt_sigframe` layout.
//! - **Serialisation.** [`serialize_core`]: `serialize` where the CPU has
//!   it, `cpuid` otherwise.
//! - **Thread pointer.** `fs:0`, and the static-TLS offset generated code
//!   uses to reach a thread-local ([`static_tls_offset`]).

mod entry;

pub use self::entry::*;

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Mnemonic};

/// `int3`, the trap byte of the breakpoint protocol.
pub const TRAP_BYTE: u8 = 0xcc;
/// The 5-byte NOP gcc and clang emit for patchable entries (`nopl 0x0(%rax,%rax,1)`).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Length of a `call rel32` / `jmp rel32`.
pub const REL32_LEN: usize = 5;
/// The longest x86-64 instruction, in bytes.
pub const MAX_INSN_LEN: usize = 15;

/// [`NOP5`] as an assembler directive, for sites compiled into a program:
/// `asm!($crate::__nop5_asm!(), ...)` emits exactly the bytes the `sites`
/// and `keys` layers expect there.
#[doc(hidden)]
#[macro_export]
macro_rules! __nop5_asm {
    () => {
        ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00"
    };
}

/// The opcode of `jmp rel32` as an assembler directive, for sites compiled
/// into a program: the `.long` that follows it must be the displacement
/// from the end of the [`REL32_LEN`]-byte instruction to the target.
#[doc(hidden)]
#[macro_export]
macro_rules! __jmp_rel32_opcode_asm {
    () => {
        ".byte 0xe9"
    };
}

/// What the trap handler does instead of executing a site's new instruction
/// while the breakpoint protocol is in flight (the kernel's int3_emulate_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulation {
    /// A NOP: continue after it.
    Skip { len: usize },
    /// `call target`: push `ret`, continue at `target`.
    Call { target: usize, ret: usize },
    /// `jmp target`.
    Jmp { target: usize },
}

fn rel32(site: usize, len: usize, target: usize) -> Option<[u8; 4]> {
    let disp = (target as i128) - (site as i128 + len as i128);
    i32::try_from(disp).ok().map(i32::to_le_bytes)
}

/// `call target` placed at `site`, or `None` if `target` is farther than ±2 GiB.
pub fn encode_call(site: usize, target: usize) -> Option<[u8; 5]> {
    let d = rel32(site, REL32_LEN, target)?;
    Some([0xe8, d[0], d[1], d[2], d[3]])
}

/// `jmp target` (rel32) placed at `site`, or `None` if out of range.
pub fn encode_jmp(site: usize, target: usize) -> Option<[u8; 5]> {
    let d = rel32(site, REL32_LEN, target)?;
    Some([0xe9, d[0], d[1], d[2], d[3]])
}

fn decoder(ip: usize, bytes: &[u8]) -> Decoder<'_> {
    Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE)
}

/// Checks that `bytes` at `ip` are exactly one valid instruction.
/// On failure says what they are instead.
pub fn check_one_instruction(ip: usize, bytes: &[u8]) -> Result<(), String> {
    let mut dec = decoder(ip, bytes);
    let insn = dec.decode();
    if insn.is_invalid() {
        return Err("not a valid instruction".into());
    }
    if insn.len() != bytes.len() {
        return Err(format!("a {}-byte instruction followed by more", insn.len()));
    }
    Ok(())
}

/// Checks that `bytes` at `ip` decode as whole valid instructions ending
/// exactly at the end of `bytes`.
pub fn check_whole_instructions(ip: usize, bytes: &[u8]) -> bool {
    let mut dec = decoder(ip, bytes);
    while dec.can_decode() {
        if dec.decode().is_invalid() {
            return false; // also covers an instruction cut off by the end
        }
    }
    true
}

/// Decodes from `start` (the bytes `code`) until reaching `target`.
/// `Ok` if an instruction starts exactly at `target`; otherwise the
/// instruction that steps over it.
pub fn check_boundary(start: usize, code: &[u8], target: usize) -> Result<(), (usize, usize)> {
    let mut dec = decoder(start, code);
    let mut ip = start;
    while ip < target && dec.can_decode() {
        let insn = dec.decode();
        let next = insn.next_ip() as usize;
        if insn.is_invalid() || next > target {
            return Err((ip, next));
        }
        ip = next;
    }
    if ip == target {
        Ok(())
    } else {
        Err((ip, ip))
    }
}

/// How the trap handler can stand in for the instruction `bytes` at `ip`
/// (one whole instruction), or `None` if it cannot.
pub fn emulation_for(ip: usize, bytes: &[u8]) -> Option<Emulation> {
    let insn = decoder(ip, bytes).decode();
    if insn.is_invalid() || insn.len() != bytes.len() {
        return None;
    }
    let next = insn.next_ip() as usize;
    match insn.code() {
        Code::Call_rel32_64 => Some(Emulation::Call { target: insn.near_branch_target() as usize, ret: next }),
        Code::Jmp_rel32_64 | Code::Jmp_rel8_64 => Some(Emulation::Jmp { target: insn.near_branch_target() as usize }),
        _ if insn.mnemonic() == Mnemonic::Nop && insn.flow_control() == FlowControl::Next => {
            Some(Emulation::Skip { len: bytes.len() })
        }
        _ => None,
    }
}

/// The interrupted program counter of a signal context.
///
/// # Safety
/// `ctx` must be the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
#[inline(always)]
pub unsafe fn context_pc(ctx: *const libc::ucontext_t) -> usize {
    // SAFETY: the caller passes the kernel's ucontext, valid for reads.
    unsafe { (*ctx).uc_mcontext.gregs[libc::REG_RIP as usize] as usize }
}

/// Sets the PC the interrupted thread resumes at.
///
/// # Safety
/// As [`context_pc`]; `pc` must be code the thread may run.
#[inline(always)]
pub unsafe fn set_context_pc(ctx: *mut libc::ucontext_t, pc: usize) {
    // SAFETY: the caller passes the kernel's ucontext, valid for writes;
    // the kernel restores the thread from it.
    unsafe { (*ctx).uc_mcontext.gregs[libc::REG_RIP as usize] = pc as i64 };
}

/// The PC of a trap: `int3` reports the address after itself.
#[inline(always)]
pub fn trap_site(pc_after_trap: usize) -> usize {
    pc_after_trap.wrapping_sub(1)
}

/// Makes the interrupted thread behave as if it had executed `emu` at `site`.
///
/// # Safety
/// `ctx` as in [`context_pc`]. For `Call`, the interrupted thread's stack
/// must have room for one more return address: true wherever the real CALL
/// could run, and the kernel put the signal frame below the red zone.
#[inline(always)]
pub unsafe fn emulate(ctx: *mut libc::ucontext_t, site: usize, emu: Emulation) {
    // SAFETY: the caller passes the kernel's ucontext, valid for writes.
    let g = unsafe { &mut (*ctx).uc_mcontext.gregs };
    match emu {
        Emulation::Skip { len } => g[libc::REG_RIP as usize] = (site + len) as i64,
        Emulation::Jmp { target } => g[libc::REG_RIP as usize] = target as i64,
        Emulation::Call { target, ret } => {
            let sp = (g[libc::REG_RSP as usize] as usize) - 8;
            // SAFETY: the caller guarantees room for one more return
            // address below the interrupted stack pointer.
            unsafe { (sp as *mut usize).write(ret) };
            g[libc::REG_RSP as usize] = sp as i64;
            g[libc::REG_RIP as usize] = target as i64;
        }
    }
}

/// Executes a core-serialising instruction: `serialize` where the CPU has
/// it, `cpuid` otherwise (Intel SDM: cross-modifying code requires the
/// executing core to serialise before it runs the new bytes).
#[inline]
pub fn serialize_core() {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0 unknown, 1 no, 2 yes. Relaxed: a cache of what CPUID says, the
    // same whichever thread computes it; nothing else is read on its
    // strength.
    static HAS_SERIALIZE: AtomicU8 = AtomicU8::new(0);
    let mut has = HAS_SERIALIZE.load(Ordering::Relaxed);
    if has == 0 {
        let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
        has = if leaf7.edx & (1 << 14) != 0 { 2 } else { 1 };
        HAS_SERIALIZE.store(has, Ordering::Relaxed);
    }
    if has == 2 {
        // SAFETY: `serialize` (0f 01 e8) has no operands and no effect but
        // serialisation; the CPU advertises it (CPUID.7.0:EDX[14]).
        unsafe { core::arch::asm!(".byte 0x0f, 0x01, 0xe8", options(nostack, preserves_flags)) };
    } else {
        // cpuid is architecturally serialising and always present.
        core::arch::x86_64::__cpuid(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_and_jmp_encode_and_emulate() {
        let site = 0x1000;
        let call = encode_call(site, 0x2000).unwrap();
        assert_eq!(call[0], 0xe8);
        assert_eq!(emulation_for(site, &call), Some(Emulation::Call { target: 0x2000, ret: 0x1005 }));
        let jmp = encode_jmp(site, 0x800).unwrap();
        assert_eq!(emulation_for(site, &jmp), Some(Emulation::Jmp { target: 0x800 }));
        assert_eq!(emulation_for(site, &NOP5), Some(Emulation::Skip { len: 5 }));
        assert_eq!(emulation_for(site, &[0xeb, 0x10]), Some(Emulation::Jmp { target: 0x1012 }));
        // mov eax, 1 is not emulated
        assert_eq!(emulation_for(site, &[0xb8, 1, 0, 0, 0]), None);
        assert!(encode_call(0x1000, 0x1000 + (1usize << 32)).is_none());
    }

    /// The bytes the asm directives emit, read back from the code.
    #[test]
    fn asm_directives_emit_the_encodings() {
        let (nop, jmp): (usize, usize);
        // SAFETY: only takes two code addresses; the bytes between the
        // labels are jumped over, never executed.
        unsafe {
            core::arch::asm!(
                "lea {nop}, [rip + 3f]",
                "lea {jmp}, [rip + 4f]",
                "jmp 5f",
                "3:",
                crate::__nop5_asm!(),
                "4:",
                crate::__jmp_rel32_opcode_asm!(),
                ".long 5f - 4b - 5",
                "5:",
                nop = out(reg) nop,
                jmp = out(reg) jmp,
            )
        };
        // SAFETY: both addresses are of code in this function, mapped readable.
        let read = |a: usize| unsafe { std::slice::from_raw_parts(a as *const u8, REL32_LEN) }.to_vec();
        assert_eq!(read(nop), NOP5);
        assert_eq!(read(jmp), encode_jmp(jmp, jmp + REL32_LEN).unwrap());
    }

    #[test]
    fn instruction_checks() {
        assert!(check_one_instruction(0, &NOP5).is_ok());
        assert!(check_one_instruction(0, &[0x90, 0x90]).is_err());
        assert!(check_one_instruction(0, &[0x0f, 0x1f]).is_err());
        assert!(check_whole_instructions(0, &[0x66, 0x90, 0x0f, 0x1f, 0x00]));
        assert!(!check_whole_instructions(0, &[0x66, 0x90, 0x0f, 0x1f]));
        // push rbp; mov rbp,rsp; nop5
        let code = [0x55, 0x48, 0x89, 0xe5, 0x0f, 0x1f, 0x44, 0, 0];
        assert!(check_boundary(0x10, &code, 0x14).is_ok());
        assert_eq!(check_boundary(0x10, &code, 0x12), Err((0x11, 0x14)));
    }
}

/// Layout of the kernel's x86-64 `rt_sigframe` at address `a`: the return
/// address `pretcode` (the handler's `sa_restorer`), then `struct ucontext`
/// whose `uc_mcontext` (struct sigcontext) starts 40 bytes in.
mod sigframe {
    pub const UC: usize = 8;
    pub const MCONTEXT: usize = UC + 40;
    pub const RSP: usize = MCONTEXT + 15 * 8;
    pub const RIP: usize = MCONTEXT + 16 * 8;
    pub const FPSTATE: usize = MCONTEXT + 23 * 8;
    pub const SIZE: usize = FPSTATE + 8;
}

/// The restorer address of the signal frame whose ucontext is `ctx`: the
/// word just below it, `pretcode`.
///
/// # Safety
/// `ctx` must be the ucontext the kernel passed to the running handler.
#[inline(always)]
pub unsafe fn frame_restorer(ctx: *const libc::ucontext_t) -> usize {
    // SAFETY: the kernel's rt_sigframe puts `pretcode` right below the
    // ucontext the caller passes.
    unsafe { ctx.cast::<usize>().sub(1).read() }
}

/// The interrupted stack pointer of a signal context.
///
/// # Safety
/// As [`context_pc`].
#[inline(always)]
pub unsafe fn context_sp(ctx: *const libc::ucontext_t) -> usize {
    // SAFETY: the caller passes the kernel's ucontext, valid for reads.
    unsafe { (*ctx).uc_mcontext.gregs[libc::REG_RSP as usize] as usize }
}

/// How far above a stack pointer signal frames are looked for.
const MAX_FRAME_SCAN: usize = 256 << 10;

/// Finds the signal frames above `sp` — a thread interrupted in a signal
/// handler has the context it interrupted saved there — and calls `f` with
/// each saved PC, outermost last. A frame is a word equal to `restorer`
/// (glibc's `__restore_rt`) followed by a ucontext whose fpstate pointer
/// lies just above it, as the kernel lays them out; after a frame the scan
/// continues from the stack pointer it saved, which also follows a handler
/// on an alternate stack back to the interrupted stack. `read` copies
/// memory without faulting and returns how much it could copy. A false
/// match can only make the caller more cautious. Allocation-free.
pub fn for_each_outer_pc(
    sp: usize,
    restorer: usize,
    read: impl Fn(usize, &mut [u8]) -> usize,
    mut f: impl FnMut(usize),
) {
    let mut buf = [0u8; 4096];
    let mut at = sp & !7;
    let mut scanned = 0;
    let mut frames = 0;
    'chunks: while scanned < MAX_FRAME_SCAN && frames < 64 && restorer != 0 {
        let n = read(at, &mut buf) & !7;
        if n == 0 {
            return;
        }
        for off in (0..n).step_by(8) {
            if usize::from_ne_bytes(buf[off..off + 8].try_into().unwrap()) != restorer {
                continue;
            }
            let a = at + off;
            let mut fr = [0u8; sigframe::SIZE];
            if read(a, &mut fr) != sigframe::SIZE {
                continue;
            }
            let word = |o: usize| usize::from_ne_bytes(fr[o..o + 8].try_into().unwrap());
            let (rsp, rip, fpstate) = (word(sigframe::RSP), word(sigframe::RIP), word(sigframe::FPSTATE));
            if fpstate <= a || fpstate - a > 16 << 10 || rip == 0 {
                continue; // not a frame the kernel built
            }
            f(rip);
            frames += 1;
            scanned += off;
            at = rsp & !7;
            continue 'chunks;
        }
        at += n;
        scanned += n;
    }
}

/// The thread pointer: on x86-64 Linux `fs:0` holds the TCB's own address.
pub fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reading `fs:0` (the TCB's self pointer) has no side effect.
    unsafe { core::arch::asm!("mov {}, fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags)) };
    tp
}

/// The offset from the thread pointer of a thread-local whose address in
/// the calling thread `addr` returns, if it is the same in every thread
/// (the variable lives in the static TLS block: the program itself or a
/// library loaded at start, such as the preloaded agent; a library loaded
/// later may get dynamic TLS) and fits an `fs:disp32` operand. Checked in a
/// second thread.
pub fn static_tls_offset(addr: fn() -> usize) -> Option<i32> {
    let offset = move || addr() as isize - thread_pointer() as isize;
    let here = offset();
    let there = std::thread::spawn(offset).join().ok()?;
    (here == there).then(|| i32::try_from(here).ok()).flatten()
}
