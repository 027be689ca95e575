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
//!   NOPs ([`nop_run_len`]);
//! - decoding checks: is this one whole instruction, whole instructions,
//!   is this address an instruction boundary (decode from the function's
//!   start and see whether an instruction starts exactly there);
//! - what the trap handler emulates for a new instruction ([`Emulation`]),
//!   access to the interrupted context's PC and SP, and the signal frames
//!   a parked thread holds further up its stack ([`for_each_outer_pc`]);
//! - a core-serialising instruction ([`serialize_core`]);
//! - an assembler ([`asm`]) and trampoline frames ([`tramp`]).
//!
//! x86-64 first; aarch64 next (see DESIGN.md rule 6: there only B, BL,
//! NOP and BRK may be swapped live).

#[cfg(target_arch = "x86_64")]
mod x86_64;
// Everything of the ISA for the layers above; the few items crates above
// the engine need (a poke's bytes, the TLS offset of generated code's
// thread-locals) are public.
#[cfg(target_arch = "x86_64")]
pub(crate) use self::x86_64::*;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{encode_call, encode_jmp, static_tls_offset, NopForm, NOP5};
/// Run-time generated trampolines.
#[cfg(target_arch = "x86_64")]
#[path = "tramp_x86_64.rs"]
pub(crate) mod tramp;

// The assembler the trampolines are written with, and features their own
// inline code for them (see `tramp::Emit`); its docs are in asm.rs.
#[cfg(target_arch = "x86_64")]
pub mod asm;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("textpoke supports x86-64 only for now; aarch64 is next");
