//! aarch64 instructions as data: the encodings, what may be swapped while
//! other cores execute it, and what compilers put at a patchable function
//! entry. Pure functions, no `asm!`: the x86-64 host compiles and tests
//! them too (`arch::aarch64_insn` in test builds there).
//!
//! # Patchable entries
//!
//! gcc and clang `-fpatchable-function-entry=2` put two NOPs at the entry
//! and record their address in `__patchable_function_entries`; with
//! `-mbranch-protection=bti|standard` a `bti c` comes first and the
//! recorded address is after it (gcc 12, checked under qemu: FIELD-NOTES).
//! The kernel's arm64 ftrace (seed 003) turns the first NOP into
//! `mov x9, x30` once, then only swaps the second between `nop` and
//! `bl <trampoline>`: the trampoline finds the caller's return address in
//! x9 and its own in x30. So an entry is in one of three states
//! ([`EntryState`]): *fresh* (`nop; nop`), *prepared* (`mov x9, x30; nop`)
//! or *enabled* (`mov x9, x30; bl …`). Fresh→prepared is not a concurrent
//! swap (MOV is not among B, BL, NOP, BRK): it needs every other thread
//! parked and none of their PCs on the second NOP (a thread there would
//! skip the MOV and later `bl` with x30 unsaved), i.e. a stop-machine
//! region poke of both words ([`prepare_entry_pokes`]). From then on the
//! live site is the second word ([`ENTRY_SITE_OFFSET`]).

/// `nop`.
pub const NOP_WORD: u32 = 0xd503_201f;
/// [`NOP_WORD`] as bytes: a static-key site when disabled, the second
/// instruction of a prepared patchable entry.
pub const NOP: [u8; 4] = NOP_WORD.to_le_bytes();
/// `bti c`: the branch-target marker of functions reached by indirect
/// calls under `-mbranch-protection=bti|standard`.
pub const BTI_C: u32 = 0xd503_245f;
/// `bti jc`, also accepted by calls.
pub const BTI_JC: u32 = 0xd503_24df;
/// `mov x9, x30` (`orr x9, xzr, x30`): saves the return address before a
/// `bl` at a function entry clobbers it (the kernel's arm64 ftrace).
pub const MOV_X9_X30: u32 = 0xaa1e_03e9;
/// `mov x30, x9`.
pub const MOV_X30_X9: u32 = 0xaa09_03fe;
/// `ret` (`ret x30`).
pub const RET: u32 = 0xd65f_03c0;
/// `brk #0`.
pub const BRK0: u32 = 0xd420_0000;

/// Length of every instruction.
pub const INSN_LEN: usize = 4;
/// The longest instruction, in bytes (they are all 4).
pub const MAX_INSN_LEN: usize = INSN_LEN;
/// Length of a `bl`/`b` (what a site's call or jump takes).
pub const REL32_LEN: usize = INSN_LEN;
/// The first byte (little-endian) of `brk #0`, which the trap module
/// compares; see the module docs ("Trap emulation").
pub const TRAP_BYTE: u8 = BRK0.to_le_bytes()[0];

const B_OPCODE: u32 = 0x1400_0000;
const BL_OPCODE: u32 = 0x9400_0000;
const BRANCH_MASK: u32 = 0xfc00_0000;
const IMM26_MASK: u32 = 0x03ff_ffff;

/// The `imm26` field of a branch at `site` to `target`: `None` unless the
/// target is word-aligned relative to the site and within ±128 MiB.
fn imm26(site: usize, target: usize) -> Option<u32> {
    let disp = target as i128 - site as i128;
    if disp % 4 != 0 || !(-(1 << 27)..(1 << 27)).contains(&disp) {
        return None;
    }
    Some(((disp >> 2) as u32) & IMM26_MASK)
}

/// `b target` placed at `site`, or `None` beyond ±128 MiB.
pub fn encode_b(site: usize, target: usize) -> Option<u32> {
    imm26(site, target).map(|i| B_OPCODE | i)
}

/// `bl target` placed at `site`, or `None` beyond ±128 MiB (a trampoline
/// farther away needs a veneer within range, the kernel's module PLTs).
pub fn encode_bl(site: usize, target: usize) -> Option<u32> {
    imm26(site, target).map(|i| BL_OPCODE | i)
}

/// `brk #imm`.
pub const fn encode_brk(imm: u16) -> u32 {
    0xd420_0000 | ((imm as u32) << 5)
}

/// `bl target` as bytes (the name the layers above use for "call").
pub fn encode_call(site: usize, target: usize) -> Option<[u8; 4]> {
    encode_bl(site, target).map(u32::to_le_bytes)
}

/// `b target` as bytes (the name the layers above use for "jump").
pub fn encode_jmp(site: usize, target: usize) -> Option<[u8; 4]> {
    encode_b(site, target).map(u32::to_le_bytes)
}

/// The target of a `b` or `bl` word at `site`.
pub fn branch_target(site: usize, word: u32) -> Option<usize> {
    if word & BRANCH_MASK != B_OPCODE && word & BRANCH_MASK != BL_OPCODE {
        return None;
    }
    // Sign-extend the 26-bit word offset, then scale to bytes.
    let offset = (((word & IMM26_MASK) << 6) as i32 >> 6) as isize * 4;
    Some(site.wrapping_add_signed(offset))
}

/// Whether `word` is `brk #imm`.
pub fn is_brk(word: u32) -> bool {
    word & 0xffe0_001f == BRK0
}

/// Whether one core may replace `old` by `new` while others execute it
/// (both among B, BL, NOP and BRK: see the module docs). HVC, SMC, SVC and
/// ISB, which the Arm ARM lists too, never appear at a site.
pub fn concurrently_swappable(old: u32, new: u32) -> bool {
    let ok = |w: u32| w == NOP_WORD || is_brk(w) || branch_target(0, w).is_some();
    ok(old) && ok(new)
}

/// The word of a 4-byte slice.
pub fn word(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// What the trap handler does instead of executing a site's new
/// instruction (unused by the aarch64 strategies: see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulation {
    /// A NOP: continue after it.
    Skip { len: usize },
    /// `bl target`: x30 = `ret`, continue at `target`.
    Call { target: usize, ret: usize },
    /// `b target`.
    Jmp { target: usize },
}

/// Checks that `bytes` at `ip` are one instruction slot: 4 bytes at a
/// word-aligned address. (Every aligned word is one instruction; whether
/// it is a *swappable* one is [`emulation_for`]'s and the strategy's
/// question.)
pub fn check_one_instruction(ip: usize, bytes: &[u8]) -> Result<(), String> {
    if !ip.is_multiple_of(INSN_LEN) {
        return Err(format!("address {ip:#x} is not 4-byte aligned"));
    }
    if bytes.len() != INSN_LEN {
        return Err(format!("{} bytes: aarch64 instructions are 4", bytes.len()));
    }
    Ok(())
}

/// Checks that `bytes` at `ip` are whole instructions: aligned, a multiple
/// of 4 bytes long.
pub fn check_whole_instructions(ip: usize, bytes: &[u8]) -> bool {
    ip.is_multiple_of(INSN_LEN) && bytes.len().is_multiple_of(INSN_LEN) && !bytes.is_empty()
}

/// Whether an instruction starts at `target` in the function at `start`:
/// on aarch64 every word-aligned address does. Otherwise the instruction
/// that covers it.
pub fn check_boundary(start: usize, _code: &[u8], target: usize) -> Result<(), (usize, usize)> {
    let misalign = target.wrapping_sub(start) % INSN_LEN;
    if misalign == 0 {
        Ok(())
    } else {
        Err((target - misalign, target - misalign + INSN_LEN))
    }
}

/// The instruction `bytes` at `ip` as one the live (swap) strategy may
/// write: NOP, B or BL, with what a trap handler would do for it; `None`
/// for anything else (BRK is swappable too, but a site never becomes one).
pub fn emulation_for(ip: usize, bytes: &[u8]) -> Option<Emulation> {
    let w = word(bytes)?;
    if !ip.is_multiple_of(INSN_LEN) {
        return None;
    }
    if w == NOP_WORD {
        return Some(Emulation::Skip { len: INSN_LEN });
    }
    let target = branch_target(ip, w)?;
    Some(if w & BRANCH_MASK == BL_OPCODE {
        Emulation::Call { target, ret: ip + INSN_LEN }
    } else {
        Emulation::Jmp { target }
    })
}

/// Length of a patchable entry: two instructions.
pub const ENTRY_LEN: usize = 2 * INSN_LEN;
/// Offset of the live site (the word swapped between NOP and BL) in a
/// patchable entry.
pub const ENTRY_SITE_OFFSET: usize = INSN_LEN;
/// Length of the branch-target marker (`bti c`) when an entry has one.
pub const BRANCH_TARGET_LEN: usize = INSN_LEN;

/// gcc's fresh pad: `nop; nop`.
pub const GCC_PAD: [u8; ENTRY_LEN] = words2(NOP_WORD, NOP_WORD);
/// A prepared entry: `mov x9, x30; nop`.
pub const PREPARED_ENTRY: [u8; ENTRY_LEN] = words2(MOV_X9_X30, NOP_WORD);

const fn words2(a: u32, b: u32) -> [u8; 8] {
    let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The single-instruction site NOP: what a static key's disabled site
/// and a prepared entry's live word hold.
pub const SITE_NOP: [u8; INSN_LEN] = NOP;

/// How the two words of a patchable entry are made (the sites layer's
/// name for the states that hold no call: see [`EntryState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NopForm {
    /// [`PREPARED_ENTRY`]: `mov x9, x30; nop`, ready for NOP↔BL swaps of
    /// its second word.
    Single,
    /// [`GCC_PAD`], `nop; nop` (`insns` = 2): must be rewritten into
    /// [`PREPARED_ENTRY`] with every other thread parked first.
    Split {
        /// Number of instructions: 2.
        insns: u8,
    },
}

impl NopForm {
    /// The bytes of this form.
    pub fn bytes(self) -> [u8; ENTRY_LEN] {
        match self {
            NopForm::Single => PREPARED_ENTRY,
            NopForm::Split { .. } => GCC_PAD,
        }
    }

    /// Whether the entry is already in the kernel's prepared form.
    pub fn is_single(self) -> bool {
        matches!(self, NopForm::Single)
    }
}

/// The encodings accepted at an entry, in the order error messages list them.
pub const SITE_NOPS: &[[u8; ENTRY_LEN]] = &[PREPARED_ENTRY, GCC_PAD];

/// Which known entry form these bytes are, if any.
pub fn classify_site_nop(bytes: &[u8]) -> Option<NopForm> {
    match bytes {
        b if b == PREPARED_ENTRY => Some(NopForm::Single),
        b if b == GCC_PAD => Some(NopForm::Split { insns: 2 }),
        _ => None,
    }
}

/// The state of a patchable entry, including an enabled one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// `nop; nop`, as the compiler left it.
    Fresh,
    /// `mov x9, x30; nop`.
    Prepared,
    /// `mov x9, x30; bl target`.
    Enabled { target: usize },
}

/// Recognises the patchable entry whose first word is at `entry` (after
/// any `bti c`) from its 8 bytes; `None` for anything else.
pub fn entry_state(entry: usize, bytes: &[u8]) -> Option<EntryState> {
    let (first, second) = (word(bytes.get(..4)?)?, word(bytes.get(4..8)?)?);
    match (first, second) {
        (NOP_WORD, NOP_WORD) => Some(EntryState::Fresh),
        (MOV_X9_X30, NOP_WORD) => Some(EntryState::Prepared),
        (MOV_X9_X30, w) if w & BRANCH_MASK == BL_OPCODE => {
            Some(EntryState::Enabled { target: branch_target(entry + ENTRY_SITE_OFFSET, w)? })
        }
        _ => None,
    }
}

/// The one-time rewrite of a fresh entry into a prepared one, as the
/// region (old, new) to commit with stop-machine.
pub fn prepare_entry_pokes() -> ([u8; ENTRY_LEN], [u8; ENTRY_LEN]) {
    (GCC_PAD, PREPARED_ENTRY)
}

/// Length of the branch-target marker (`bti c` or `bti jc`) at the start
/// of `bytes`: [`BRANCH_TARGET_LEN`], or 0 when there is none.
pub fn branch_target_len(bytes: &[u8]) -> usize {
    match bytes.get(..4).and_then(word) {
        Some(BTI_C | BTI_JC) => BRANCH_TARGET_LEN,
        _ => 0,
    }
}

/// Length in bytes of the run of NOPs (whole words) at the start of `bytes`.
pub fn nop_run_len(bytes: &[u8]) -> usize {
    bytes.chunks_exact(INSN_LEN).take_while(|w| *w == NOP).count() * INSN_LEN
}

/// Whether `bytes` is exactly a sequence of NOPs.
pub fn all_nops(bytes: &[u8]) -> bool {
    bytes.len().is_multiple_of(INSN_LEN) && nop_run_len(bytes) == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodings checked against GNU as (aarch64-linux-gnu-as 2.40).
    #[test]
    fn encodings() {
        assert_eq!(NOP, [0x1f, 0x20, 0x03, 0xd5]);
        // b .+8 / bl .-4 / b .+(128 MiB - 4) / bl .-128 MiB
        assert_eq!(encode_b(0x1000, 0x1008), Some(0x1400_0002));
        assert_eq!(encode_bl(0x1000, 0x0ffc), Some(0x97ff_ffff));
        assert_eq!(encode_b(0x1000_0000, 0x1000_0000 + (1 << 27) - 4), Some(0x15ff_ffff));
        assert_eq!(encode_bl(0x1000_0000, 0x1000_0000 - (1 << 27)), Some(0x9600_0000));
        // Out of range, misaligned.
        assert_eq!(encode_b(0x1000_0000, 0x1000_0000 + (1 << 27)), None);
        assert_eq!(encode_bl(0x1000_0000, 0x1000_0000 - (1 << 27) - 4), None);
        assert_eq!(encode_b(0x1000, 0x1002), None);
        assert_eq!(encode_brk(0), 0xd420_0000);
        assert_eq!(encode_brk(0x3e8), 0xd420_7d00);
        assert_eq!(encode_call(0x1000, 0x1008), Some(0x9400_0002u32.to_le_bytes()));
        assert_eq!(encode_jmp(0x1000, 0x1000), Some(0x1400_0000u32.to_le_bytes()));
    }

    #[test]
    fn branch_targets_round_trip() {
        for (site, target) in [(0x40_0000usize, 0x40_0004usize), (0x40_0000, 0x3f_0000), (0x800_0000, 0x0)] {
            let b = encode_b(site, target).unwrap();
            let bl = encode_bl(site, target).unwrap();
            assert_eq!(branch_target(site, b), Some(target));
            assert_eq!(branch_target(site, bl), Some(target));
            assert_eq!(emulation_for(site, &b.to_le_bytes()), Some(Emulation::Jmp { target }));
            assert_eq!(emulation_for(site, &bl.to_le_bytes()), Some(Emulation::Call { target, ret: site + 4 }));
        }
        assert_eq!(branch_target(0, NOP_WORD), None);
        assert_eq!(emulation_for(0x1000, &NOP), Some(Emulation::Skip { len: 4 }));
        assert_eq!(emulation_for(0x1002, &NOP), None);
        assert_eq!(emulation_for(0x1000, &MOV_X9_X30.to_le_bytes()), None);
    }

    /// Only B, BL, NOP and BRK, both before and after.
    #[test]
    fn swappable_pairs() {
        let b = encode_b(0, 8).unwrap();
        let bl = encode_bl(0, 8).unwrap();
        for (old, new) in [(NOP_WORD, b), (b, NOP_WORD), (NOP_WORD, bl), (bl, NOP_WORD), (NOP_WORD, BRK0), (b, bl)] {
            assert!(concurrently_swappable(old, new), "{old:#x} -> {new:#x}");
        }
        for (old, new) in [(NOP_WORD, MOV_X9_X30), (MOV_X9_X30, NOP_WORD), (NOP_WORD, RET), (BTI_C, NOP_WORD)] {
            assert!(!concurrently_swappable(old, new), "{old:#x} -> {new:#x}");
        }
        assert!(is_brk(encode_brk(0xffff)));
        assert!(!is_brk(0xd420_0001));
    }

    #[test]
    fn instruction_checks() {
        assert!(check_one_instruction(0x1000, &NOP).is_ok());
        assert!(check_one_instruction(0x1002, &NOP).is_err());
        assert!(check_one_instruction(0x1000, &GCC_PAD).is_err());
        assert!(check_whole_instructions(0x1000, &GCC_PAD));
        assert!(!check_whole_instructions(0x1000, &GCC_PAD[..6]));
        assert_eq!(check_boundary(0x1000, &[], 0x1008), Ok(()));
        assert_eq!(check_boundary(0x1000, &[], 0x1009), Err((0x1008, 0x100c)));
    }

    /// gcc 12 `-fpatchable-function-entry=2`, with and without
    /// `-mbranch-protection=standard` (FIELD-NOTES), and the states after.
    #[test]
    fn patchable_entries() {
        let bti = BTI_C.to_le_bytes();
        assert_eq!(branch_target_len(&bti), 4);
        assert_eq!(branch_target_len(&BTI_JC.to_le_bytes()), 4);
        assert_eq!(branch_target_len(&NOP), 0);
        assert_eq!(branch_target_len(&bti[..3]), 0);
        assert_eq!(classify_site_nop(&GCC_PAD), Some(NopForm::Split { insns: 2 }));
        assert_eq!(classify_site_nop(&PREPARED_ENTRY), Some(NopForm::Single));
        assert_eq!(classify_site_nop(&[0; 8]), None);
        for form in [NopForm::Single, NopForm::Split { insns: 2 }] {
            assert_eq!(classify_site_nop(&form.bytes()), Some(form));
        }
        let entry = 0x40_1000;
        assert_eq!(entry_state(entry, &GCC_PAD), Some(EntryState::Fresh));
        assert_eq!(entry_state(entry, &PREPARED_ENTRY), Some(EntryState::Prepared));
        let bl = encode_bl(entry + ENTRY_SITE_OFFSET, 0x40_0000).unwrap();
        let enabled = words2(MOV_X9_X30, bl);
        assert_eq!(entry_state(entry, &enabled), Some(EntryState::Enabled { target: 0x40_0000 }));
        assert_eq!(entry_state(entry, &words2(NOP_WORD, bl)), None, "a BL without the saved x30");
        let (old, new) = prepare_entry_pokes();
        assert_eq!((old, new), (GCC_PAD, PREPARED_ENTRY));
        assert!(!concurrently_swappable(NOP_WORD, MOV_X9_X30), "preparing needs stop-machine");
        assert_eq!(nop_run_len(&[GCC_PAD.as_slice(), &RET.to_le_bytes()].concat()), 8);
        assert!(all_nops(&GCC_PAD));
        assert!(!all_nops(&PREPARED_ENTRY));
    }
}
