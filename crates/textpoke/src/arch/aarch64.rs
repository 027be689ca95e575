//! aarch64: encodings, what may be swapped while other cores run it,
//! cache maintenance, and the signal-context access the engine needs.
//!
//! - **Encodings.** Every instruction is one little-endian 32-bit word at
//!   a 4-byte aligned address. [`NOP`] (`d503201f`), `B`/`BL` with a
//!   26-bit word offset (±128 MiB: [`encode_b`], [`encode_bl`],
//!   [`encode_jmp`]/[`encode_call`] under the names the layers above use),
//!   `BRK #imm16` ([`encode_brk`]), `BTI c` ([`BTI_C`]) and
//!   `mov x9, x30` ([`MOV_X9_X30`]), the LR-preserving instruction of the
//!   kernel's arm64 ftrace (seed 003). What compilers put at a patchable
//!   entry is in the `entry` submodule.
//! - **What may be swapped live.** The Arm ARM ("Concurrent modification
//!   and execution of instructions", B2.2.5 in DDI 0487) lets one core
//!   replace an instruction while others execute it, with no further
//!   synchronisation than the cache maintenance below, only when both the
//!   old and the new instruction are one of B, BL, BRK, HVC, ISB, NOP, SMC,
//!   SVC. Any other pair may be observed by another core as an
//!   unpredictable mix ([`concurrently_swappable`]). The engine's live
//!   strategy on aarch64 is therefore a plain atomic swap (see
//!   `text/swap_aarch64.rs`): every poke one aligned 32-bit word, old and
//!   new among NOP, B, BL (and BRK); anything else, such as the one-time
//!   NOP→`mov x9, x30` rewrite of a gcc pad, needs stop-machine.
//! - **Cache maintenance** ([`sync_icache`]). The data and instruction
//!   caches are not coherent for instruction fetch: after a write, `DC
//!   CVAU` (clean the data line to the point of unification), `DSB ISH`,
//!   `IC IVAU` (invalidate the instruction line), `DSB ISH`, `ISB` — the
//!   sequence of libgcc's `__aarch64_sync_cache_range`, each half skipped
//!   when `CTR_EL0.IDC`/`DIC` say the hardware does it. The `IC IVAU` is
//!   broadcast to the Inner Shareable domain; what remains is a context
//!   synchronisation event on every *other* core that may already have
//!   fetched the old instruction: `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`
//!   (arm64 supports it), or the signal fallback whose handler runs
//!   [`serialize_core`] (`ISB`; returning from the signal is one too).
//! - **Trap emulation.** `BRK` reports its own address (the kernel sets
//!   the PC to the BRK, [`trap_site`]); [`emulate`] stands in for NOP, B and
//!   BL. The aarch64 strategies use no trap (a swap needs none), so the
//!   SIGTRAP handler is never installed there; these exist so the trap
//!   module means the same thing on both ISAs.
//! - **Parked threads.** [`for_each_outer_pc`] finds the kernel's arm64
//!   `rt_sigframe`s above a stack pointer by their first record, the
//!   FPSIMD context header.
//! - **Guarded pages (BTI).** On a CPU with BTI (`HWCAP2_BTI`) the loader
//!   maps the code of objects whose `.note.gnu.property` says BTI with
//!   `PROT_BTI`: an indirect branch into such a page must land on a `bti`
//!   or it faults (SIGILL). `/proc/self/maps` does not show the bit and
//!   `mprotect` sets a page's whole protection, so the mprotect write
//!   method takes each page's guard from `sys::bti` (smaps `VmFlags: bt`
//!   natively; the loader's rule, note plus hwcap, under qemu-user, whose
//!   smaps is the host's) and keeps it while the page is writable and
//!   after (`text/write.rs`, "Guarded pages"); a page without it never
//!   gets it. The /proc/self/mem method changes no protection. The words
//!   the tracer and the keys write (a pad's NOP, a key's NOP or B) are no
//!   landing pads: an indirect call lands on the `bti c` before a pad,
//!   which is never written. textpoke's own code blocks are never
//!   guarded (`text/codemem.rs`, "Never guarded"): its stubs and
//!   trampolines need no landing pads. `tests/bti.rs` checks under qemu
//!   (which enforces BTI like hardware) that a `blr` past the landing pad
//!   of a patched, then unpatched, page still faults, and that an object
//!   built without the property is never guarded.
//!
//! # What qemu cannot prove
//!
//! `.ci/aarch64` runs the tests under qemu-user, which translates code
//! and invalidates its translations itself whenever a page holding
//! translated code is written: a missing `DC`/`IC`/`DSB`/`ISB` or a
//! missing sync-core would still pass there, and qemu runs the guest's
//! threads on host cores with the host's (x86, TSO) memory model, so a
//! missing Acquire or Release between threads would pass too. The tests
//! prove the function (the right words written, the strategies' steps,
//! counts exact under concurrent calls, threads parked and released), not
//! the memory model, not real instruction fetch, and not timing. On
//! hardware the protocol rests on these rules of the Arm ARM (DDI 0487;
//! section names, as their numbers move between issues):
//!
//! 1. **Single-copy atomicity.** An aligned 32-bit store is single-copy
//!    atomic, and an instruction fetch of an aligned instruction is too
//!    ("Single-copy atomicity": instruction fetches are single-copy atomic
//!    at 32-bit granularity): a core fetches the old or the new word,
//!    never a mix. The swap writes each site with one `str w`
//!    ([`store_code`]).
//! 2. **Concurrent modification and execution.** When both the old and
//!    the new instruction are among B, BL, BRK, HVC, ISB, NOP, SMC and SVC,
//!    another core executing the location while it is written executes
//!    either the old or the new instruction ("Concurrent modification and
//!    execution of instructions"); for any other pair the outcome is
//!    CONSTRAINED UNPREDICTABLE, possibly an instruction that is neither.
//!    So a live swap is only ever NOP↔B, NOP↔BL ([`concurrently_swappable`],
//!    checked for the old and the new word of every poke), and everything
//!    else (the pad's one-time NOP→`mov x9, x30`, two-word regions) is
//!    written with every other thread parked (stop-machine). A core that
//!    runs the old word after the store is as if it had run it just
//!    before: the batch's callers already allow that (a flip takes effect
//!    at some moment during the commit, not before it starts).
//! 3. **Making the word visible to instruction fetch** ("Instruction
//!    cache maintenance" and the self-modifying-code sequence under
//!    "Concurrent modification..."): the store goes to the data side;
//!    `DC CVAU` cleans its line to the point of unification, `DSB ISH`
//!    waits for that, `IC IVAU` invalidates the line in the instruction
//!    caches of every core of the Inner Shareable domain (the operation
//!    is broadcast), and the second `DSB ISH` waits until the invalidation
//!    is complete on all of them. `CTR_EL0.IDC` (no clean needed) and
//!    `CTR_EL0.DIC` (no invalidation needed) let hardware that keeps the
//!    caches coherent skip either half ([`sync_icache`]). After this no
//!    core's instruction cache holds the old word.
//! 4. **Context synchronisation.** A core may still have fetched the old
//!    word into its pipeline before the invalidation; only a context
//!    synchronisation event (an `ISB`, taking an exception, or returning
//!    from one) makes it fetch again ("Context synchronization event").
//!    The writer runs `ISB` itself; every other core running a thread of
//!    the process gets one from `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`:
//!    the kernel interrupts each of them (taking the IPI is an exception)
//!    and returns to user space with `ERET` (arm64 declares
//!    `ARCH_HAS_MEMBARRIER_SYNC_CORE` on exactly that ground), and a core
//!    not running one of its threads will switch to it through an exception
//!    return. After the one sync every core runs the new word: one sync for
//!    a whole batch, as `text/swap_aarch64.rs` does.
//! 5. **Parked threads (stop-machine).** Each parked thread waits in the
//!    rendezvous signal handler with every signal blocked; the patcher
//!    writes (1 and 3), then publishes the end with a Release store that
//!    the handler reads with Acquire, after which the handler runs
//!    [`serialize_core`] (`ISB`) and returns through `rt_sigreturn`, an
//!    exception return: two context synchronisation events before it runs
//!    the code again. A thread whose PC (or a PC saved in an outer signal
//!    frame, rule 4 of DESIGN) lies strictly inside a region makes the
//!    commit retry, so no thread resumes between two rewritten words.
//! 6. **Data ordering.** The rendezvous and the keys' counts are ordinary
//!    Acquire/Release pairs, which Armv8's other-multi-copy-atomic model
//!    honours as the Rust memory model says; each pair is named in
//!    `sync/rendezvous.rs` and the keys layer. x86 would hide a missing one;
//!    they were written to the Rust model, not to TSO.
//!
//! What the qemu runs did show about qemu itself (issue 13): guest signals
//! 63 and 64 have no host signal under qemu-aarch64 7.2, and
//! `/proc/self/task` lists qemu's own `call_rcu` thread, which never
//! answers a signal; the rendezvous copes with both (`sync/rendezvous.rs`,
//! "Under a user-mode emulator"; `.ci/aarch64-qemu-signals.c` shows them
//! outside textpoke). And the C keys test's 4 threads see, a few times in
//! 10^8 calls, a call that ran a site's old word after the flip had
//! returned, while memory held the new word and the sync was done: rules
//! 3 and 4 forbid that on hardware. The cause is qemu 7.2's translation
//! chaining: invalidating a translation block unlinks the jumps *into* it
//! but not its own patched jumps *out*, so a caller preempted inside the
//! loop's (invalidated) block resumes after the flip and follows that
//! block's old chained jump into the site's old block, once.
//! `.ci/aarch64-qemu-smc.c` reproduces it with no textpoke code (2–7 stale
//! calls per 1,000 flips with the callers' loop on the sites' page, none
//! with `-d nochain`, none when the call is indirect or the loop is on
//! another page); `.ci/aarch64` runs that test under `qemu-aarch64 -d
//! nochain`, where it passes.
//!
//! Nothing here was run on real Arm cores in this project: that is the
//! remaining gap. The first thing to do on Arm hardware is `.ci/aarch64`'s
//! cargo lines natively (without the runner, and with the C tests it
//! skips), then `poke-stress` with both strategies for minutes, and
//! `.ci/aarch64-qemu-smc.c` natively (it must report no disagreement).

mod insn;

pub use self::insn::*;

/// The interrupted program counter of a signal context.
///
/// # Safety
/// `ctx` must be the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
#[inline(always)]
pub unsafe fn context_pc(ctx: *const libc::ucontext_t) -> usize {
    // SAFETY: the caller passes the kernel's ucontext, valid for reads.
    unsafe { (*ctx).uc_mcontext.pc as usize }
}

/// Sets the PC the interrupted thread resumes at.
///
/// # Safety
/// As [`context_pc`]; `pc` must be code the thread may run.
#[inline(always)]
pub unsafe fn set_context_pc(ctx: *mut libc::ucontext_t, pc: usize) {
    // SAFETY: the caller passes the kernel's ucontext, valid for writes.
    unsafe { (*ctx).uc_mcontext.pc = pc as u64 };
}

/// The interrupted stack pointer of a signal context.
///
/// # Safety
/// As [`context_pc`].
#[inline(always)]
pub unsafe fn context_sp(ctx: *const libc::ucontext_t) -> usize {
    // SAFETY: the caller passes the kernel's ucontext, valid for reads.
    unsafe { (*ctx).uc_mcontext.sp as usize }
}

/// The PC of a trap: the kernel reports a `brk` at its own address.
#[inline(always)]
pub fn trap_site(pc: usize) -> usize {
    pc
}

/// Makes the interrupted thread behave as if it had executed `emu` at `site`.
///
/// # Safety
/// `ctx` as in [`context_pc`].
#[inline(always)]
pub unsafe fn emulate(ctx: *mut libc::ucontext_t, site: usize, emu: Emulation) {
    // SAFETY: the caller passes the kernel's ucontext, valid for writes.
    let m = unsafe { &mut (*ctx).uc_mcontext };
    match emu {
        Emulation::Skip { len } => m.pc = (site + len) as u64,
        Emulation::Jmp { target } => m.pc = target as u64,
        Emulation::Call { target, ret } => {
            m.regs[30] = ret as u64;
            m.pc = target as u64;
        }
    }
}

/// A context synchronisation event on this core (`ISB`): instructions
/// after it are fetched anew (Arm ARM, "Context synchronization event").
#[inline]
pub fn serialize_core() {
    // SAFETY: `isb` has no operands and no effect but the synchronisation.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// `CTR_EL0` (Linux lets EL0 read it, or emulates the read).
fn ctr_el0() -> u64 {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effect.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    ctr
}

/// `CTR_EL0.IDC`: cleaning the data cache to the point of unification is
/// not required for instruction-to-data coherence.
const CTR_IDC: u64 = 1 << 28;
/// `CTR_EL0.DIC`: invalidating the instruction cache is not required.
const CTR_DIC: u64 = 1 << 29;

/// Makes code just written at `addr..addr + len` visible to instruction
/// fetch on every core of the Inner Shareable domain (module docs, "Cache
/// maintenance"; libgcc's `__aarch64_sync_cache_range`). Other cores still
/// need a context synchronisation event (the engine's sync-core) before
/// they are sure to run it.
pub fn sync_icache(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    let ctr = ctr_el0();
    let end = addr + len;
    if ctr & CTR_IDC == 0 {
        let line = 4usize << ((ctr >> 16) & 0xf); // DminLine: log2 of words
        let mut a = addr & !(line - 1);
        while a < end {
            // SAFETY: `dc cvau` on a mapped, readable address (code just
            // written) only cleans its cache line.
            unsafe { core::arch::asm!("dc cvau, {}", in(reg) a, options(nostack, preserves_flags)) };
            a += line;
        }
    }
    // SAFETY: a barrier: the cleaning (or the store itself, with IDC)
    // completes before the invalidation below.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
    if ctr & CTR_DIC == 0 {
        let line = 4usize << (ctr & 0xf); // IminLine
        let mut a = addr & !(line - 1);
        while a < end {
            // SAFETY: `ic ivau` on a mapped address only invalidates the
            // instruction cache line, broadcast to the Inner Shareable domain.
            unsafe { core::arch::asm!("ic ivau, {}", in(reg) a, options(nostack, preserves_flags)) };
            a += line;
        }
        // SAFETY: a barrier: waits for the broadcast invalidation.
        unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
    }
    serialize_core();
}

/// Writes one aligned instruction word at `addr` with a single 32-bit
/// store (single-copy atomic: another core fetches the old or the new
/// word, never a mix), or `bytes` byte by byte when they are not one
/// aligned word (stop-machine regions, with every other thread parked).
///
/// # Safety
/// `addr..addr + bytes.len()` must be writable, and no thread may be
/// running it unless it is one aligned word swapped between two
/// [`concurrently_swappable`] instructions.
pub unsafe fn store_code(addr: usize, bytes: &[u8]) {
    use std::sync::atomic::{AtomicU32, Ordering};
    match word(bytes) {
        Some(w) if addr % INSN_LEN == 0 => {
            // SAFETY: aligned and writable (the caller's contract).
            // Relaxed: what orders it before other cores' fetch is
            // sync_icache's barriers and the sync-core after it.
            unsafe { AtomicU32::from_ptr(addr as *mut u32) }.store(w, Ordering::Relaxed)
        }
        _ => {
            for (i, &b) in bytes.iter().enumerate() {
                // SAFETY: writable (the caller's contract).
                unsafe { ((addr + i) as *mut u8).write_volatile(b) };
            }
        }
    }
}

/// Layout of the kernel's arm64 `rt_sigframe` (arch/arm64/kernel/signal.c)
/// at the handler's stack pointer: `siginfo` (128 bytes), then `struct
/// ucontext` whose `uc_mcontext` (16-aligned) starts 176 bytes in, then
/// the sigcontext's `__reserved` records, the FPSIMD context first.
mod sigframe {
    pub const UC: usize = 128;
    pub const MCONTEXT: usize = UC + 176;
    pub const SP: usize = MCONTEXT + 8 + 31 * 8;
    pub const PC: usize = SP + 8;
    pub const RESERVED: usize = MCONTEXT + 288;
    pub const SIZE: usize = RESERVED + 8;
    /// The FPSIMD record's header: `magic` 0x46508001, `size` 528.
    pub const FPSIMD_HEADER: usize = (528 << 32) | 0x4650_8001;
}

/// The word that marks a signal frame like the running handler's: its
/// FPSIMD record header (on x86-64, the restorer address; here the return
/// goes through x30, not a word on the stack). [`for_each_outer_pc`]
/// scans for it.
///
/// # Safety
/// `ctx` must be the ucontext the kernel passed to the running handler.
#[inline(always)]
pub unsafe fn frame_restorer(ctx: *const libc::ucontext_t) -> usize {
    let at = ctx as usize - sigframe::UC + sigframe::RESERVED;
    // SAFETY: the kernel's rt_sigframe holds the FPSIMD record first in
    // `__reserved`, inside the ucontext the caller passes.
    unsafe { (at as *const usize).read() }
}

/// How far above a stack pointer signal frames are looked for.
const MAX_FRAME_SCAN: usize = 256 << 10;

/// Finds the signal frames above `sp` (see the x86-64 version): a frame
/// is a 16-aligned address whose FPSIMD record header equals `marker`
/// (what [`frame_restorer`] read from a frame of this process) and whose
/// saved SP lies above it; the scan continues from that saved SP.
/// `read` copies memory without faulting. Allocation-free.
pub fn for_each_outer_pc(sp: usize, marker: usize, read: impl Fn(usize, &mut [u8]) -> usize, mut f: impl FnMut(usize)) {
    if marker != sigframe::FPSIMD_HEADER {
        return; // not a layout this scan knows
    }
    let mut buf = [0u8; 4096];
    let mut at = sp & !15;
    let (mut scanned, mut frames) = (0, 0);
    'chunks: while scanned < MAX_FRAME_SCAN && frames < 64 {
        let n = read(at, &mut buf) & !15;
        if n == 0 {
            return;
        }
        for off in (0..n).step_by(16) {
            let header = at + off;
            let Some(frame) = header.checked_sub(sigframe::RESERVED) else { continue };
            if frame < sp || buf[off..off + 8] != marker.to_ne_bytes() {
                continue;
            }
            let mut fr = [0u8; sigframe::SIZE];
            if read(frame, &mut fr) != sigframe::SIZE {
                continue;
            }
            let w = |o: usize| usize::from_ne_bytes(fr[o..o + 8].try_into().unwrap());
            let (saved_sp, pc) = (w(sigframe::SP), w(sigframe::PC));
            if saved_sp <= frame || pc == 0 || pc % INSN_LEN != 0 {
                continue; // not a frame the kernel built
            }
            f(pc);
            frames += 1;
            scanned += off;
            at = saved_sp & !15;
            continue 'chunks;
        }
        at += n;
        scanned += n;
    }
}

/// Where the first-byte jump of a gcc pad would land (x86-64's one-byte
/// pad mode, the tracer's `mirror.rs`): nowhere on aarch64, where a pad's
/// first NOP is swapped with a `b` to its stub directly
/// (`arch/tramp_aarch64.rs`), so no pad has a mirror slot.
pub fn gcc_pad_jmp_target(_pad: usize) -> Option<usize> {
    None
}

/// The thread pointer (`TPIDR_EL0`).
pub fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reading TPIDR_EL0 has no side effect.
    unsafe { core::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nomem, nostack, preserves_flags)) };
    tp
}

/// The offset from the thread pointer of a thread-local, if it is the
/// same in every thread (static TLS) and fits 32 bits; checked in a second
/// thread (see the x86-64 version).
pub fn static_tls_offset(addr: fn() -> usize) -> Option<i32> {
    let offset = move || addr() as isize - thread_pointer() as isize;
    let here = offset();
    let there = std::thread::spawn(offset).join().ok()?;
    (here == there).then(|| i32::try_from(here).ok()).flatten()
}
