//! The library-call thunk on aarch64 (`trace/plt.rs`): what a `JUMP_SLOT`
//! points to while library calls are traced.
//!
//! A call `bl malloc@plt` reaches the PLT entry `adrp x16, GOT page; ldr
//! x17, [x16, #slot]; add x16, x16, #slot; br x17`: entered through the
//! slot, the thunk starts exactly like a function entered by `bl` (x30 the
//! caller's return address, the arguments in x0–x7 and x8, x16/x17
//! clobbered by the PLT anyway, x9 a temporary). So it starts like a
//! patchable entry, two NOPs whose first the tracer swaps with `b stub`
//! and to whose + 8 the stub branches back (`arch/tramp_aarch64.rs`),
//! then goes on to the resolved function through x16 (IP0, which a call
//! through a PLT or a veneer may clobber; `br x16` may land on `bti c`):
//!
//! ```text
//!  0: nop              ; the site: nop <-> b stub
//!  4: nop              ; never written
//!  8: ldr x16, 24
//! 12: br x16
//! 16: brk #0 ; brk #0
//! 24: .quad target     ; the slot's resolved target, written once
//! ```

use super::{INSN_LEN, NOP};

/// Bytes per thunk.
pub const THUNK: usize = 32;
/// Where the target is in a thunk.
pub const TARGET_AT: usize = 24;

/// `ldr x16, <pc + 16>` (literal: imm19 = 16 / 4), `br x16`, `brk #0`.
const LDR_X16_PC16: u32 = 0x5800_0000 | (4 << 5) | 16;
const BR_X16: u32 = 0xd61f_0200;
const BRK_0: u32 = 0xd420_0000;

/// The thunk that goes on to `target`.
pub fn thunk(target: usize) -> [u8; THUNK] {
    let mut code = [0u8; THUNK];
    let words = [NOP, NOP, LDR_X16_PC16.to_le_bytes(), BR_X16.to_le_bytes(), BRK_0.to_le_bytes(), BRK_0.to_le_bytes()];
    for (i, w) in words.iter().enumerate() {
        code[i * INSN_LEN..(i + 1) * INSN_LEN].copy_from_slice(w);
    }
    code[TARGET_AT..].copy_from_slice(&(target as u64).to_le_bytes());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words GNU as makes of the listing in the module docs.
    #[test]
    fn matches_the_assembler() {
        let t = thunk(0x1122_3344_5566_7788);
        let words: Vec<u32> = t.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(
            words,
            [0xd503_201f, 0xd503_201f, 0x5800_0090, 0xd61f_0200, 0xd420_0000, 0xd420_0000, 0x5566_7788, 0x1122_3344]
        );
    }
}
