//! The only layer that knows instruction encodings.
//!
//! Each supported ISA provides: the trap byte and NOP/CALL/JMP encodings,
//! decoding checks (is this one whole instruction, is this address an
//! instruction boundary), what the trap handler emulates for a new
//! instruction, access to the interrupted context's PC and SP, and a
//! core-serialising instruction. x86-64 first; aarch64 next (see DESIGN.md
//! rule 6: there only B, BL, NOP and BRK may be swapped live).

#[cfg(target_arch = "x86_64")]
mod x86_64;
// Everything of the ISA for the layers above; the few items crates above
// the engine need (a poke's bytes, the TLS offset of generated code's
// thread-locals) are public.
#[cfg(target_arch = "x86_64")]
pub(crate) use self::x86_64::*;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{encode_call, encode_jmp, static_tls_offset, NOP5};
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
