//! The only layer that knows instruction encodings. It uses no other
//! module of the crate: layers above ask it questions ("is this a NOP
//! this site may hold, how long is the marker at this entry, how does the
//! trap handler stand in for this instruction") and never look at bytes
//! themselves.
//!
//! Each supported ISA provides:
//!
//! - the trap byte and the NOP/CALL/JMP encodings ([`encode_call`],
//!   [`encode_jmp`]), and the same as assembler directives for sites
//!   compiled into a program (`__nop5_asm!`);
//! - what compilers put at a patchable function entry: the NOP forms
//!   ([`NopForm`]: gcc's pad of 1-byte NOPs, the single 5-byte NOP), the
//!   branch-target marker before them (`endbr64`), the length of a run of
//!   NOPs (`nop_run_len`);
//! - decoding checks: is this one whole instruction, whole instructions,
//!   is this address an instruction boundary (decode from the function's
//!   start and see whether an instruction starts exactly there);
//! - what the trap handler emulates for a new instruction (`Emulation`),
//!   access to the interrupted context's PC and SP, and the signal frames
//!   a parked thread holds further up its stack (`for_each_outer_pc`);
//! - a core-serialising instruction (`serialize_core`);
//! - an assembler ([`asm`]) and trampoline frames (`tramp`).
//!
//! x86-64 (`x86_64.rs`) and aarch64 (`aarch64.rs`, `aarch64/insn.rs`; see
//! DESIGN.md rule 6: there only B, BL, NOP and BRK may be swapped live).

#[cfg(target_arch = "x86_64")]
mod x86_64;
// Everything of the ISA for the layers above; the few items crates above
// the engine need (a poke's bytes, the TLS offset of generated code's
// thread-locals) are public.
#[cfg(target_arch = "x86_64")]
pub(crate) use self::x86_64::*;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{encode_call, encode_jmp, static_tls_offset, NopForm, NOP5};

/// The bytes of a single-instruction site: NOP, JMP or CALL (5 on x86-64, 4 on aarch64).
pub type SiteInsn = [u8; SITE_NOP.len()];
/// Run-time generated trampolines.
#[cfg(target_arch = "x86_64")]
#[path = "tramp_x86_64.rs"]
pub(crate) mod tramp;

// The assembler the trampolines are written with, and features their own
// inline code for them (see `tramp::Emit`); its docs are in asm.rs.
#[cfg(target_arch = "x86_64")]
pub mod asm;

/// The NOP of a single-instruction site (a static key's disabled branch).
#[cfg(target_arch = "x86_64")]
pub const SITE_NOP: [u8; 5] = NOP5;

/// After code was written at `addr..addr + len`: nothing on x86-64, whose
/// instruction fetch snoops stores (cross-modifying code needs only each
/// core's serialisation, the sync-core rounds).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn sync_icache(_addr: usize, _len: usize) {}

// aarch64 (issue 13): encodings, swappability, cache maintenance, signal
// contexts, an assembler and the tracer's trampolines.
#[cfg(target_arch = "aarch64")]
mod aarch64;
/// The stubs of sites inside function bodies (`#[traced]`).
#[cfg(target_arch = "aarch64")]
#[path = "aarch64/body_stub.rs"]
pub(crate) mod body_stub;
/// The library-call thunk (`trace/plt.rs`).
#[cfg(target_arch = "aarch64")]
#[path = "aarch64/plt_thunk.rs"]
pub(crate) mod plt_thunk;
/// Run-time generated trampolines (aarch64: sites enter their stubs by
/// `b`, see the module docs).
#[cfg(target_arch = "aarch64")]
#[path = "tramp_aarch64.rs"]
pub(crate) mod tramp;
// The assembler of the aarch64 trampolines (op-facing like x86-64's).
#[cfg(target_arch = "aarch64")]
#[path = "aarch64/asm.rs"]
pub mod asm;
#[cfg(target_arch = "aarch64")]
pub(crate) use self::aarch64::*;
#[cfg(target_arch = "aarch64")]
pub use self::aarch64::{encode_call, encode_jmp, static_tls_offset, NopForm, NOP, SITE_NOP};

// The aarch64 encoders are pure functions: their unit tests run on the
// x86-64 host too.
#[cfg(all(test, target_arch = "x86_64"))]
#[path = "aarch64/insn.rs"]
#[allow(dead_code)]
mod aarch64_insn;
// So are the aarch64 assembler's (checked against GNU as).
#[cfg(all(test, target_arch = "x86_64"))]
#[path = "aarch64/asm.rs"]
#[allow(dead_code)]
mod aarch64_asm;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("textpoke supports x86-64 and aarch64");
