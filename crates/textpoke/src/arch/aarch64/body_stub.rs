//! The stub of a site inside a function body (`#[textpoke::traced]`'s
//! entry and exit sites, `sites/marked.rs`) on aarch64.
//!
//! A body site is one `nop` that the tracer swaps with `b stub` (NOP↔B,
//! allowed while other cores run it, as a pad's first word). At a
//! function's first instruction the entry stub (`arch/tramp_aarch64.rs`,
//! `call_stub`) may use x9, x16, x17 and the flags, which are dead there;
//! inside a body every register may be live, x30 included (the site may be
//! in a leaf that keeps its return address in x30). So this stub saves x9,
//! x16, x17, NZCV and x29/x30 before it touches them, and restores them
//! before it branches back to the site + 4; the body trampoline
//! (`entry_trampoline` with `Live::Body`) saves every other caller-saved
//! register, q0–q31 whole. It stores only after moving SP down (AAPCS64
//! has no red zone: nothing of the body lives below SP).
//!
//! ```text
//!    stp x29, x30, [sp, #-48]!
//!    stp x16, x17, [sp, #16]
//!    mrs x16, nzcv
//!    stp x9, x16, [sp, #32]
//!    mrs x17, tpidr_el0 ; add x17, x17, #count
//!    ldr w16, [x17] ; add w16, w16, #1 ; str w16, [x17]
//!    tbnz w16, #31, cold
//! again:
//!    movz w9, #value (; movk)
//!    adrp x16, word ; ldr x16, [x16, #:lo12:word]
//!    blr x16
//!    ldr w16, [x17] ; sub w16, w16, #1 ; stlr w16, [x17]
//! done:
//!    ldp x9, x16, [sp, #32]
//!    msr nzcv, x16
//!    ldp x16, x17, [sp, #16]
//!    ldp x29, x30, [sp], #48
//!    b site + 4
//! null:
//!    ret
//! cold:
//!    adrp x16, header ; ldr x16, [x16, #call] ; blr x16
//!    b.ne again
//!    b done
//! ```
//!
//! The count's address stays in x17 across the call: whatever the word
//! points to preserves it (the body trampoline saves x0–x18, the routines
//! every register, the null path is a `ret`), as it must preserve every
//! register the body may hold. That keeps the stub within a slot
//! ([`STUB_CODE`](super::tramp::STUB_CODE)) with any positive 32-bit count offset (aarch64's static
//! TLS offsets are positive) and any value. With
//! [`Counter::Calls`] the enter and leave routines are called instead, as
//! in the entry stub.
//!
//! The entry trampoline reads the stub's SP from its frame only for entry
//! sites (the return slot, the entry SP): a body site's entry has neither.

use super::asm::{AsmError, Assembler, Index, FP, LR, SP, X16, X17, X9};
use super::tramp::{finish_stub, raise_count, stub_tail, Counter, StubCode, StubLabels, HDR_LEAVE};

/// `mrs x16, nzcv` and `msr nzcv, x16`.
const MRS_X16_NZCV: u32 = 0xd53b_4200 | 16;
const MSR_NZCV_X16: u32 = 0xd51b_4200 | 16;

/// The stub's frame: x29/x30, x16/x17, x9 and NZCV.
const FRAME: i32 = 48;

/// The stub of the body site at `site`, placed at `at` with its data slot
/// at `data` and its block's header at `header`: calls through its word
/// with x9 = `value` and branches back to `site + 4` with every register
/// and the flags as they were. `None` if the data or the way back is out
/// of reach, or the code does not fit a stub slot.
pub fn body_stub(at: usize, data: usize, header: usize, value: u32, counter: Counter, site: usize) -> Option<StubCode> {
    let mut a = Assembler::new().ok()?;
    let (again, done, null, cold) = (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    let build = |a: &mut Assembler| -> Result<(), AsmError> {
        a.stp(FP, LR, SP, -FRAME, Index::Pre)?;
        a.stp(X16, X17, SP, 16, Index::Offset)?;
        a.word(MRS_X16_NZCV)?;
        a.stp(X9, X16, SP, 32, Index::Offset)?;
        // x17 keeps the count's address across the call (module docs).
        raise_count(a, counter, header, (X17, X16), (cold, done))?;
        a.set_label(again)?;
        a.mov_imm(X9, value as u64)?;
        a.load_far(X16, data)?;
        a.blr(X16)?;
        match counter {
            Counter::Tls(_) => {
                // x17: the count's address, preserved by the call.
                a.ldr_w(X16, X17, 0)?;
                a.sub_imm_w(X16, X16, 1)?;
                a.stlr_w(X16, X17)?;
            }
            Counter::Calls => {
                a.load_far(X16, header + HDR_LEAVE)?;
                a.blr(X16)?;
            }
        }
        a.set_label(done)?;
        a.ldp(X9, X16, SP, 32, Index::Offset)?;
        a.word(MSR_NZCV_X16)?;
        a.ldp(X16, X17, SP, 16, Index::Offset)?;
        a.ldp(FP, LR, SP, FRAME, Index::Post)?;
        a.b_to(site + super::INSN_LEN)?;
        stub_tail(a, counter, header, StubLabels { again, done, null, cold })
    };
    build(&mut a).ok()?;
    finish_stub(a, at, null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(code: &[u8]) -> Vec<u32> {
        code.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// The registers the stub uses are saved before and restored after,
    /// NZCV included, and it goes back to the site + 4; it fits a slot
    /// with count offsets of one, two and three instructions and a value
    /// that takes two.
    #[test]
    fn saves_what_it_uses_and_returns_past_the_site() {
        let (at, site) = (0x10_0000, 0x20_0000);
        for counter in [Counter::Tls(0x10), Counter::Tls(0xff_fff0), Counter::Tls(0x7fff_fff0), Counter::Calls] {
            let s = body_stub(at, at + 0x1000, at + 0x1000, 0xffff_ffff, counter, site).expect("fits");
            let w = words(&s.code);
            assert_eq!(w[0], 0xa9bd_7bfd, "stp x29, x30, [sp, #-48]!");
            assert_eq!(w[1], 0xa901_47f0, "stp x16, x17, [sp, #16]");
            assert_eq!(w[2], MRS_X16_NZCV);
            assert_eq!(w[3], 0xa902_43e9, "stp x9, x16, [sp, #32]");
            let back = w.iter().position(|&x| x == MSR_NZCV_X16).expect("msr nzcv");
            assert_eq!(w[back - 1], 0xa942_43e9, "ldp x9, x16, [sp, #32]");
            assert_eq!(w[back + 1], 0xa941_47f0, "ldp x16, x17, [sp, #16]");
            assert_eq!(w[back + 2], 0xa8c3_7bfd, "ldp x29, x30, [sp], #48");
            let b = w[back + 3];
            assert_eq!(b >> 26, 0b000101, "b");
            let from = at + 4 * (back + 3);
            let imm = ((b & 0x03ff_ffff) << 6) as i32 >> 6;
            assert_eq!(from.wrapping_add_signed(4 * imm as isize), site + 4, "back to the site + 4");
            assert_eq!(s.null, at + 4 * (back + 4));
            assert_eq!(w[back + 4], 0xd65f_03c0, "null: ret");
        }
    }
}
