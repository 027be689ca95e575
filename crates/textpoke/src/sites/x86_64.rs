//! x86-64 encodings the `sites` layer must recognise.
//!
//! DESIGN.md keeps instruction encodings in the `arch` layer: the 5-byte
//! NOP is `arch::NOP5`; the few patterns only site discovery needs (gcc's
//! pads, `endbr64`) are here, and belong in `arch::x86_64` next.
//!
//! What gcc 12.2 emits (checked with objdump on this machine):
//!
//! | flags                                         | bytes at the function symbol                         |
//! |-----------------------------------------------|------------------------------------------------------|
//! | `-fpatchable-function-entry=5`                | `90 90 90 90 90` (five 1-byte NOPs), then the body    |
//! | `-fpatchable-function-entry=16`               | sixteen `90`, then the body                            |
//! | `-fpatchable-function-entry=8,3`              | three `90` *before* the symbol, five `90` after it     |
//! | `-pg -mfentry -mnop-mcount -mrecord-mcount`   | `0f 1f 44 00 00` (one 5-byte NOP)                      |
//!
//! With `-fcf-protection` an `endbr64` (`f3 0f 1e fa`) comes first at the
//! symbol and the NOPs follow it; the M bytes before the symbol stay before
//! it.
//!
//! Five 1-byte NOPs are five instructions: a thread may be stopped between
//! any two of them. Rule 1 of DESIGN.md forbids turning them into one 5-byte
//! CALL while threads run; such a site ([`NopForm::Split`]) must first be
//! rewritten into the single 5-byte NOP with every thread parked and none of
//! their PCs strictly inside it. Only a [`NopForm::Single`] site is ready for
//! the breakpoint protocol.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};

/// The 5-byte NOP (`nopl 0x0(%rax,%rax,1)`), the kernel's `x86_nops[5]`.
pub use crate::arch::NOP5;

/// Five 1-byte NOPs, what gcc emits for `-fpatchable-function-entry`.
pub const NOP1X5: [u8; 5] = [0x90; 5];

/// `endbr64`, which `-fcf-protection` puts at the entry of functions whose
/// address may be taken.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// How the 5 bytes of a patchable NOP are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NopForm {
    /// One 5-byte NOP instruction ([`NOP5`]): a single instruction that the
    /// breakpoint protocol can turn into a 5-byte CALL/JMP and back.
    Single,
    /// Several NOP instructions (gcc's [`NOP1X5`]: `insns` = 5). Must be
    /// rewritten into [`NOP5`] with every thread parked before it can be
    /// patched live (DESIGN.md rule 1).
    Split {
        /// Number of instructions in the 5 bytes.
        insns: u8,
    },
}

impl NopForm {
    /// The bytes of this form.
    pub fn bytes(self) -> [u8; 5] {
        match self {
            NopForm::Single => NOP5,
            NopForm::Split { .. } => NOP1X5,
        }
    }
}

/// The encodings accepted at a 5-byte site.
pub(crate) const EXPECTED_NOPS: &[[u8; 5]] = &[NOP5, NOP1X5];

/// Which known 5-byte NOP these bytes are, if any.
pub(crate) fn classify(bytes: &[u8]) -> Option<NopForm> {
    match bytes {
        b if b == NOP5 => Some(NopForm::Single),
        b if b == NOP1X5 => Some(NopForm::Split { insns: 5 }),
        _ => None,
    }
}

/// Whether `bytes` start with `endbr64`.
pub(crate) fn starts_with_endbr64(bytes: &[u8]) -> bool {
    bytes.starts_with(&ENDBR64)
}

/// Length in bytes of the run of NOP instructions at the start of `bytes`.
///
/// A pad made of 1-byte NOPs (gcc's) counts only the `90` bytes, so that a
/// multi-byte alignment NOP at the start of the function body is not counted
/// as pad. Otherwise whole NOP instructions are counted as decoded.
pub(crate) fn nop_run_len(bytes: &[u8]) -> usize {
    if bytes.first() == Some(&0x90) {
        return bytes.iter().take_while(|&&b| b == 0x90).count();
    }
    let mut decoder = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
    let mut len = 0;
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() || insn.mnemonic() != Mnemonic::Nop {
            break;
        }
        len += insn.len();
    }
    len
}

/// Whether `bytes` is exactly a sequence of whole NOP instructions.
pub(crate) fn all_nops(bytes: &[u8]) -> bool {
    let mut decoder = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
    let mut len = 0;
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() || insn.mnemonic() != Mnemonic::Nop {
            return false;
        }
        len += insn.len();
    }
    len == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_nops() {
        assert_eq!(classify(&NOP5), Some(NopForm::Single));
        assert_eq!(classify(&[0x90; 5]), Some(NopForm::Split { insns: 5 }));
        assert_eq!(classify(&[0xe8, 0, 0, 0, 0]), None);
        assert_eq!(nop_run_len(&[0x90, 0x90, 0x90, 0x0f, 0x1f, 0x00, 0x8d]), 3);
        assert_eq!(nop_run_len(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x66, 0x90, 0xc3]), 7);
        assert_eq!(nop_run_len(&[0xc3]), 0);
        assert!(all_nops(&[0x90, 0x0f, 0x1f, 0x00]));
        assert!(!all_nops(&[0x90, 0x0f, 0x1f]));
        assert!(!all_nops(&[0x90, 0xc3]));
        assert!(starts_with_endbr64(&[0xf3, 0x0f, 0x1e, 0xfa, 0x90]));
    }
}
