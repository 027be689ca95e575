//! What compilers put at a patchable function entry on x86-64, and how
//! the `sites` layer recognises it without knowing an encoding.
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
//! clang 16's `-fpatchable-function-entry=5` emits one 5-byte NOP with
//! another displacement byte, `0f 1f 44 00 08` (`nopl 8(%rax,%rax,1)`):
//! a single instruction too ([`NopForm::SingleDisp`]), patched like
//! [`NOP5`] and given back its own bytes when disabled.
//!
//! With `-fcf-protection` an `endbr64` (`f3 0f 1e fa`), the branch-target
//! marker of indirect branch tracking, comes first at the symbol and the
//! NOPs follow it; the M bytes before the symbol stay before it. The
//! `sites` layer asks [`branch_target_len`] how long the marker at an entry
//! is (0 without one) and finds the NOP after it.
//!
//! # Two forms of the 5-byte NOP
//!
//! Five 1-byte NOPs ([`GCC_PAD`]) are five instructions: a thread may be
//! stopped between any two of them. Rule 1 of DESIGN.md forbids turning
//! them into one 5-byte CALL while threads run; such a site
//! ([`NopForm::Split`]) must first be rewritten into the single 5-byte NOP
//! ([`NOP5`]) with every thread parked and none of their PCs strictly
//! inside it. Only a [`NopForm::Single`] site is ready for the breakpoint
//! protocol. [`classify_site_nop`] tells which form five bytes are.
//!
//! # Measuring a pad
//!
//! The file does not record a pad's length N; it is inferred from the run
//! of NOPs at the site ([`nop_run_len`]). A gcc pad is made of `90` bytes
//! only, so for it only those are counted: a multi-byte alignment NOP at
//! the start of the body is not pad. Otherwise whole NOP instructions are
//! counted as decoded. [`all_nops`] checks that the bytes between a pad's
//! start and a function symbol are NOPs (the M bytes before the entry).

use super::NOP5;
use iced_x86::{Decoder, DecoderOptions, Mnemonic};

/// Five 1-byte NOPs, what gcc emits for `-fpatchable-function-entry`.
pub const GCC_PAD: [u8; 5] = [0x90; 5];

/// [`GCC_PAD`] with its first byte made `jmp rel32` (`e9`): the four
/// NOPs after it are the displacement, so that one changed byte, a whole
/// instruction at each end, turns the pad into one jump and back
/// (`Poke::first_byte`). Where it lands: [`gcc_pad_jmp_target`].
pub const GCC_PAD_JMP: [u8; 5] = [0xe9, GCC_PAD[1], GCC_PAD[2], GCC_PAD[3], GCC_PAD[4]];

/// Where [`GCC_PAD_JMP`] placed at `site` jumps: `site + 5` plus the
/// sign-extended displacement `0x90909090` (`site - 0x6f6f6f6b`, about
/// 1.74 GiB below); `None` below address 0 (a program linked at
/// `0x400000`).
pub fn gcc_pad_jmp_target(site: usize) -> Option<usize> {
    let disp = i32::from_le_bytes([GCC_PAD_JMP[1], GCC_PAD_JMP[2], GCC_PAD_JMP[3], GCC_PAD_JMP[4]]);
    let end = site.checked_add(GCC_PAD_JMP.len())?;
    end.checked_add_signed(disp as isize)
}

/// `endbr64`, which `-fcf-protection` puts at the entry of functions whose
/// address may be taken.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Length of the branch-target marker ([`ENDBR64`]) when an entry has one.
pub const BRANCH_TARGET_LEN: usize = ENDBR64.len();

/// How the 5 bytes of a patchable NOP are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NopForm {
    /// One 5-byte NOP instruction ([`NOP5`]): a single instruction that the
    /// breakpoint protocol can turn into a 5-byte CALL/JMP and back.
    Single,
    /// One 5-byte NOP whose displacement byte is not 0 (clang's
    /// `0f 1f 44 00 08`): as ready as [`NopForm::Single`]; a site keeps
    /// its own bytes, so that disabling it writes back exactly what the
    /// compiler left.
    SingleDisp(u8),
    /// Several NOP instructions (gcc's `GCC_PAD`: `insns` = 5). Must be
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
            NopForm::SingleDisp(d) => [NOP5[0], NOP5[1], NOP5[2], NOP5[3], d],
            NopForm::Split { .. } => GCC_PAD,
        }
    }

    /// Whether the 5 bytes are one instruction (ready for the breakpoint
    /// protocol, no one-time rewrite).
    pub fn is_single(self) -> bool {
        !matches!(self, NopForm::Split { .. })
    }
}

/// The encodings accepted at a 5-byte site, in the order error messages
/// list them.
pub const SITE_NOPS: &[[u8; 5]] = &[NOP5, [0x0f, 0x1f, 0x44, 0x00, 0x08], GCC_PAD];

/// Which known 5-byte NOP these bytes are, if any.
pub fn classify_site_nop(bytes: &[u8]) -> Option<NopForm> {
    match bytes {
        b if b == NOP5 => Some(NopForm::Single),
        [0x0f, 0x1f, 0x44, 0x00, d] => Some(NopForm::SingleDisp(*d)),
        b if b == GCC_PAD => Some(NopForm::Split { insns: 5 }),
        _ => None,
    }
}

/// Length of the branch-target marker (`endbr64`) at the start of `bytes`:
/// [`BRANCH_TARGET_LEN`], or 0 when there is none.
pub fn branch_target_len(bytes: &[u8]) -> usize {
    if bytes.starts_with(&ENDBR64) {
        BRANCH_TARGET_LEN
    } else {
        0
    }
}

/// Length in bytes of the run of NOP instructions at the start of `bytes`
/// (see the module docs, "Measuring a pad").
pub fn nop_run_len(bytes: &[u8]) -> usize {
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
pub fn all_nops(bytes: &[u8]) -> bool {
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
        assert_eq!(classify_site_nop(&NOP5), Some(NopForm::Single));
        assert_eq!(classify_site_nop(&[0x90; 5]), Some(NopForm::Split { insns: 5 }));
        assert_eq!(classify_site_nop(&[0xe8, 0, 0, 0, 0]), None);
        assert_eq!(nop_run_len(&[0x90, 0x90, 0x90, 0x0f, 0x1f, 0x00, 0x8d]), 3);
        assert_eq!(nop_run_len(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x66, 0x90, 0xc3]), 7);
        assert_eq!(nop_run_len(&[0xc3]), 0);
        assert!(all_nops(&[0x90, 0x0f, 0x1f, 0x00]));
        assert!(!all_nops(&[0x90, 0x0f, 0x1f]));
        assert!(!all_nops(&[0x90, 0xc3]));
        assert_eq!(branch_target_len(&[0xf3, 0x0f, 0x1e, 0xfa, 0x90]), 4);
        assert_eq!(branch_target_len(&[0xf3, 0x0f, 0x1e]), 0);
        assert_eq!(branch_target_len(&NOP5), 0);
        assert_eq!(classify_site_nop(&[0x0f, 0x1f, 0x44, 0x00, 0x08]), Some(NopForm::SingleDisp(8)));
        for form in [NopForm::Single, NopForm::SingleDisp(8), NopForm::Split { insns: 5 }] {
            assert_eq!(classify_site_nop(&form.bytes()), Some(form));
            assert_eq!(form.is_single(), form != NopForm::Split { insns: 5 });
        }
        // Every form decodes as what it claims: one instruction, or five.
        for nop in SITE_NOPS {
            let insns = Decoder::with_ip(64, nop, 0, DecoderOptions::NONE).into_iter().count();
            let form = classify_site_nop(nop).expect("a listed form is recognised");
            assert_eq!(insns == 1, form.is_single(), "{nop:02x?}");
        }
    }
}
