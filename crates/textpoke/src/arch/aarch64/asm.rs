//! A small aarch64 assembler: the instructions textpoke's stubs and
//! trampolines use, with labels, as `arch::asm` is on x86-64 (there a
//! layer over iced-x86's encoder; here the encodings are written out, each
//! checked against GNU as in the tests below).
//!
//! Every instruction is one 32-bit word. Branches to labels are recorded
//! as fix-ups and resolved by [`Assembler::assemble`], which also places
//! PC-relative operands (`adrp`, `b`/`bl` to an absolute address) for the
//! address the code will run at. Out-of-range immediates are an
//! [`AsmError`], never a wrong encoding.
//!
//! The op-facing part of the API (what an op's inline code is written
//! with, `trace::EmitFn`: the recorder's count and graph fast paths) is
//! [`Assembler`], [`Label`], [`AsmError`], [`Reg`] and [`Cond`]; the
//! count, graph and return trampolines (`arch/tramp_aarch64.rs`) say which
//! registers such code gets.

use std::fmt;

/// A general-purpose register `x0`..`x30` (or its `w` half, by the
/// instruction), or [`SP`]/[`ZR`] where the instruction reads register 31
/// so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg(pub u8);

/// Register 31 read as the stack pointer (loads, stores, `add`/`sub` imm).
pub const SP: Reg = Reg(31);
/// Register 31 read as zero (`orr`, `subs` to discard).
pub const ZR: Reg = Reg(31);
/// The frame pointer and the link register.
pub const FP: Reg = Reg(29);
pub const LR: Reg = Reg(30);

/// The general-purpose registers stubs, trampolines and the recorder's
/// inline code name (one set for all of them).
pub const X0: Reg = Reg(0);
pub const X9: Reg = Reg(9);
pub const X10: Reg = Reg(10);
pub const X11: Reg = Reg(11);
pub const X12: Reg = Reg(12);
pub const X13: Reg = Reg(13);
pub const X14: Reg = Reg(14);
pub const X15: Reg = Reg(15);
pub const X16: Reg = Reg(16);
pub const X17: Reg = Reg(17);

/// Why code could not be assembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsmError(String);

impl fmt::Display for AsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AsmError {}

impl AsmError {
    pub(crate) fn new(what: impl Into<String>) -> AsmError {
        AsmError(what.into())
    }
}

/// A position in the code, bound once with [`Assembler::set_label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// Branch conditions (`b.cond`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Cond {
    Eq = 0,
    Ne = 1,
    /// Unsigned `>=` (carry set).
    Hs = 2,
    /// Unsigned `<` (carry clear).
    Lo = 3,
    /// Unsigned `>`.
    Hi = 8,
    /// Unsigned `<=`.
    Ls = 9,
}

#[derive(Debug, Clone, Copy)]
enum Fixup {
    /// `b`/`bl` (imm26) to a label.
    Imm26(Label),
    /// `b.cond`, `cbz`/`cbnz` (imm19 at bit 5) to a label.
    Imm19(Label),
    /// `tbz`/`tbnz` (imm14 at bit 5) to a label.
    Imm14(Label),
    /// `b`/`bl` to an absolute address.
    Abs26(usize),
    /// `adrp` of an absolute address's page.
    Page(usize),
}

/// Code being assembled: words, labels, fix-ups.
#[derive(Default)]
pub struct Assembler {
    words: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Fixup)>,
}

fn check(ok: bool, what: &str) -> Result<(), AsmError> {
    if ok {
        Ok(())
    } else {
        Err(AsmError::new(what))
    }
}

/// A scaled unsigned 12-bit offset: `off` must be a multiple of `scale`.
fn uimm12(off: i32, scale: i32, what: &str) -> Result<u32, AsmError> {
    check(off >= 0 && off % scale == 0 && off / scale < 4096, what)?;
    Ok((off / scale) as u32)
}

/// A scaled signed 7-bit offset (load/store pair).
fn simm7(off: i32, scale: i32) -> Result<u32, AsmError> {
    check(off % scale == 0 && (-64..64).contains(&(off / scale)), "pair offset out of range")?;
    Ok(((off / scale) as u32) & 0x7f)
}

fn rd(r: Reg) -> u32 {
    (r.0 & 31) as u32
}

fn rn(r: Reg) -> u32 {
    ((r.0 & 31) as u32) << 5
}

fn rt2(r: Reg) -> u32 {
    ((r.0 & 31) as u32) << 10
}

fn rm(r: Reg) -> u32 {
    ((r.0 & 31) as u32) << 16
}

/// Addressing of a load/store pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// `[base, #off]`
    Offset,
    /// `[base, #off]!`
    Pre,
    /// `[base], #off`
    Post,
}

impl Index {
    fn bits(self) -> u32 {
        match self {
            Index::Offset => 0x0100_0000,
            Index::Pre => 0x0180_0000,
            Index::Post => 0x0080_0000,
        }
    }
}

impl Assembler {
    pub(crate) fn new() -> Result<Assembler, AsmError> {
        Ok(Assembler::default())
    }

    /// Appends a raw instruction word.
    pub fn word(&mut self, w: u32) -> Result<(), AsmError> {
        self.words.push(w);
        Ok(())
    }

    /// Number of instructions so far.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether nothing was emitted yet.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn create_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// The instruction index `l` is bound at, once bound.
    pub(crate) fn label_index(&self, l: Label) -> Option<usize> {
        *self.labels.get(l.0)?
    }

    pub fn set_label(&mut self, l: Label) -> Result<(), AsmError> {
        let slot = self.labels.get_mut(l.0).ok_or_else(|| AsmError::new("unknown label"))?;
        check(slot.is_none(), "label bound twice")?;
        *slot = Some(self.words.len());
        Ok(())
    }

    fn fixup(&mut self, w: u32, f: Fixup) -> Result<(), AsmError> {
        self.fixups.push((self.words.len(), f));
        self.word(w)
    }

    /// The code placed at `at` (4-aligned), fix-ups resolved.
    pub(crate) fn assemble(mut self, at: usize) -> Result<Vec<u8>, AsmError> {
        check(at.is_multiple_of(4), "code must be 4-byte aligned")?;
        for &(i, f) in &self.fixups {
            let pc = at + 4 * i;
            let target_of = |l: Label| -> Result<usize, AsmError> {
                let w = self.labels[l.0].ok_or_else(|| AsmError::new("label never bound"))?;
                Ok(at + 4 * w)
            };
            let disp = |t: usize| (t as i64 - pc as i64) / 4;
            let field = match f {
                Fixup::Imm26(l) => imm(disp(target_of(l)?), 26)?,
                Fixup::Abs26(t) => imm(disp(t), 26)?,
                Fixup::Imm19(l) => imm(disp(target_of(l)?), 19)? << 5,
                Fixup::Imm14(l) => imm(disp(target_of(l)?), 14)? << 5,
                Fixup::Page(t) => {
                    let pages = imm(((t & !0xfff) as i64 - (pc & !0xfff) as i64) >> 12, 21)?;
                    ((pages & 3) << 29) | ((pages >> 2) << 5)
                }
            };
            self.words[i] |= field;
        }
        Ok(self.words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    // ------------------------------------------------------------ moves

    /// `mov xd, xm` (`orr xd, xzr, xm`; not for SP).
    pub fn mov(&mut self, d: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0xaa00_03e0 | rm(m) | rd(d))
    }

    /// `mov xd, sp` / `mov sp, xn` (`add xd, xn, #0`).
    pub fn mov_sp(&mut self, d: Reg, n: Reg) -> Result<(), AsmError> {
        self.add_imm(d, n, 0)
    }

    /// `xd = value`: `movz` then a `movk` per further non-zero 16 bits.
    pub fn mov_imm(&mut self, d: Reg, value: u64) -> Result<(), AsmError> {
        let mut first = true;
        for hw in 0..4u32 {
            let part = (value >> (16 * hw)) & 0xffff;
            if part == 0 && !(first && hw == 3) && !(value == 0 && hw == 0) {
                continue;
            }
            let op = if first { 0xd280_0000 } else { 0xf280_0000 };
            self.word(op | (hw << 21) | ((part as u32) << 5) | rd(d))?;
            first = false;
        }
        Ok(())
    }

    /// `mrs xd, cntvct_el0` (the generic timer's virtual count).
    pub fn mrs_cntvct(&mut self, d: Reg) -> Result<(), AsmError> {
        self.word(0xd53b_e040 | rd(d))
    }

    /// `isb`: the instructions after it wait for those before it.
    pub fn isb(&mut self) -> Result<(), AsmError> {
        self.word(0xd503_3fdf)
    }

    /// `mrs xd, tpidr_el0` (the thread pointer).
    pub fn mrs_tpidr(&mut self, d: Reg) -> Result<(), AsmError> {
        self.word(0xd53b_d040 | rd(d))
    }

    /// `adrp xd, page of target` (±4 GiB).
    pub fn adrp(&mut self, d: Reg, target: usize) -> Result<(), AsmError> {
        self.fixup(0x9000_0000 | rd(d), Fixup::Page(target))
    }

    /// `xd = [addr]` from anywhere within ±4 GiB: `adrp xd, addr; ldr xd, [xd, #lo12]`.
    pub fn load_far(&mut self, d: Reg, addr: usize) -> Result<(), AsmError> {
        check(addr.is_multiple_of(8), "a far word must be 8-aligned")?;
        self.adrp(d, addr)?;
        self.ldr(d, d, (addr & 0xfff) as i32)
    }

    // ------------------------------------------------------------ arithmetic

    /// `add xd, xn, #imm` (`imm` < 4096, or a multiple of 4096 below 2^24).
    pub fn add_imm(&mut self, d: Reg, n: Reg, imm: u32) -> Result<(), AsmError> {
        self.addsub_imm(0x9100_0000, d, n, imm)
    }

    /// `sub xd, xn, #imm`.
    pub fn sub_imm(&mut self, d: Reg, n: Reg, imm: u32) -> Result<(), AsmError> {
        self.addsub_imm(0xd100_0000, d, n, imm)
    }

    /// `add wd, wn, #imm`.
    pub fn add_imm_w(&mut self, d: Reg, n: Reg, imm: u32) -> Result<(), AsmError> {
        self.addsub_imm(0x1100_0000, d, n, imm)
    }

    /// `sub wd, wn, #imm`.
    pub fn sub_imm_w(&mut self, d: Reg, n: Reg, imm: u32) -> Result<(), AsmError> {
        self.addsub_imm(0x5100_0000, d, n, imm)
    }

    /// `cmp wn, #imm` (`subs wzr, wn, #imm`).
    pub fn cmp_imm_w(&mut self, n: Reg, imm: u32) -> Result<(), AsmError> {
        self.addsub_imm(0x7100_0000, ZR, n, imm)
    }

    fn addsub_imm(&mut self, op: u32, d: Reg, n: Reg, imm: u32) -> Result<(), AsmError> {
        let (imm12, shift) = if imm < 4096 {
            (imm, 0)
        } else if imm.is_multiple_of(4096) && imm < 1 << 24 {
            (imm >> 12, 1 << 22)
        } else {
            return Err(AsmError::new(format!("immediate {imm} does not fit add/sub")));
        };
        self.word(op | shift | (imm12 << 10) | rn(n) | rd(d))
    }

    /// `add xd, xn, xm`.
    pub fn add(&mut self, d: Reg, n: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0x8b00_0000 | rm(m) | rn(n) | rd(d))
    }

    /// `add xd, xn, xm, lsl #shift`.
    pub fn add_lsl(&mut self, d: Reg, n: Reg, m: Reg, shift: u32) -> Result<(), AsmError> {
        check(shift < 64, "shift below 64")?;
        self.word(0x8b00_0000 | rm(m) | (shift << 10) | rn(n) | rd(d))
    }

    /// `sub xd, xn, xm`.
    pub fn sub(&mut self, d: Reg, n: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0xcb00_0000 | rm(m) | rn(n) | rd(d))
    }

    /// `orr xd, xn, xm, lsl #shift`.
    pub fn orr_lsl(&mut self, d: Reg, n: Reg, m: Reg, shift: u32) -> Result<(), AsmError> {
        check(shift < 64, "shift below 64")?;
        self.word(0xaa00_0000 | rm(m) | (shift << 10) | rn(n) | rd(d))
    }

    /// `mov wd, wm`: the low half of `m`, zero-extended into `d`.
    pub fn mov_w(&mut self, d: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0x2a00_03e0 | rm(m) | rd(d))
    }

    /// `mov wd, #imm` (`movz`, `imm` < 65536).
    pub fn mov_imm_w(&mut self, d: Reg, imm: u32) -> Result<(), AsmError> {
        check(imm < 1 << 16, "movz w: 16 bits")?;
        self.word(0x5280_0000 | (imm << 5) | rd(d))
    }

    /// `cmp xn, xm` (`subs xzr, xn, xm`).
    pub fn cmp(&mut self, n: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0xeb00_001f | rm(m) | rn(n))
    }

    /// `cmp xn, #imm` (`subs xzr, xn, #imm`).
    pub fn cmp_imm(&mut self, n: Reg, imm: u32) -> Result<(), AsmError> {
        self.addsub_imm(0xf100_0000, ZR, n, imm)
    }

    /// `csel xd, xn, xm, cond`: `d = cond ? n : m`.
    pub fn csel(&mut self, d: Reg, n: Reg, m: Reg, c: Cond) -> Result<(), AsmError> {
        self.word(0x9a80_0000 | rm(m) | ((c as u32) << 12) | rn(n) | rd(d))
    }

    /// `ubfm xd, xn, #immr, #imms` (the shifts and `ubfx` below).
    fn ubfm(&mut self, d: Reg, n: Reg, immr: u32, imms: u32) -> Result<(), AsmError> {
        check(immr < 64 && imms < 64, "ubfm: fields below 64")?;
        self.word(0xd340_0000 | (immr << 16) | (imms << 10) | rn(n) | rd(d))
    }

    /// `lsl xd, xn, #shift`.
    pub fn lsl_imm(&mut self, d: Reg, n: Reg, shift: u32) -> Result<(), AsmError> {
        check((1..64).contains(&shift), "lsl: shift 1 to 63")?;
        self.ubfm(d, n, 64 - shift, 63 - shift)
    }

    /// `lsr xd, xn, #shift`.
    pub fn lsr_imm(&mut self, d: Reg, n: Reg, shift: u32) -> Result<(), AsmError> {
        check(shift < 64, "lsr: shift below 64")?;
        self.ubfm(d, n, shift, 63)
    }

    /// `ubfx xd, xn, #lsb, #width`: bits `lsb..lsb + width` of `n`.
    pub fn ubfx(&mut self, d: Reg, n: Reg, lsb: u32, width: u32) -> Result<(), AsmError> {
        check(width >= 1 && lsb + width <= 64, "ubfx: a field within 64 bits")?;
        self.ubfm(d, n, lsb, lsb + width - 1)
    }

    /// `lsr xd, xn, xm` (`lsrv`: the shift is `m` modulo 64).
    pub fn lsrv(&mut self, d: Reg, n: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0x9ac0_2400 | rm(m) | rn(n) | rd(d))
    }

    /// `madd xd, xn, xm, xa`: `d = a + n * m`.
    pub fn madd(&mut self, d: Reg, n: Reg, m: Reg, a: Reg) -> Result<(), AsmError> {
        self.word(0x9b00_0000 | rm(m) | (((a.0 & 31) as u32) << 10) | rn(n) | rd(d))
    }

    /// `xd = xn + off` for any 32-bit signed `off` (1 or 2 instructions,
    /// or 3 through `scratch` when it needs more than 24 bits).
    pub fn add_offset(&mut self, d: Reg, n: Reg, off: i32, scratch: Reg) -> Result<(), AsmError> {
        let mag = off.unsigned_abs();
        if mag < 1 << 24 {
            let (hi, lo) = (mag & !0xfff, mag & 0xfff);
            let step = |a: &mut Self, from: Reg, v: u32| {
                if off < 0 {
                    a.sub_imm(d, from, v)
                } else {
                    a.add_imm(d, from, v)
                }
            };
            match (hi, lo) {
                (0, lo) => step(self, n, lo),
                (hi, 0) => step(self, n, hi),
                (hi, lo) => {
                    step(self, n, hi)?;
                    step(self, d, lo)
                }
            }
        } else {
            self.mov_imm(scratch, off as i64 as u64)?;
            self.add(d, n, scratch)
        }
    }

    // ------------------------------------------------------------ loads and stores

    /// `ldrb wt, [xn, #off]`.
    pub fn ldrb(&mut self, t: Reg, n: Reg, off: i32) -> Result<(), AsmError> {
        self.word(0x3940_0000 | (uimm12(off, 1, "ldrb offset")? << 10) | rn(n) | rd(t))
    }

    /// `ldr xt, [xn, xm, lsl #3]`: the `m`-th word from `n`.
    pub fn ldr_index(&mut self, t: Reg, n: Reg, m: Reg) -> Result<(), AsmError> {
        self.word(0xf860_7800 | rm(m) | rn(n) | rd(t))
    }

    /// `stlr xt, [xn]`: a store-release.
    pub fn stlr(&mut self, t: Reg, n: Reg) -> Result<(), AsmError> {
        self.word(0xc89f_fc00 | rn(n) | rd(t))
    }

    /// `ldxr xt, [xn]`: a load-exclusive.
    pub fn ldxr(&mut self, t: Reg, n: Reg) -> Result<(), AsmError> {
        self.word(0xc85f_7c00 | rn(n) | rd(t))
    }

    /// `stxr ws, xt, [xn]`: a store-exclusive, `s` = 0 when it stored.
    pub fn stxr(&mut self, s: Reg, t: Reg, n: Reg) -> Result<(), AsmError> {
        self.word(0xc800_7c00 | rm(s) | rn(n) | rd(t))
    }

    /// `stadd xs, [xn]`: an atomic add to memory (ARMv8.1 LSE).
    pub fn stadd(&mut self, s: Reg, n: Reg) -> Result<(), AsmError> {
        self.word(0xf820_001f | rm(s) | rn(n))
    }

    /// `ldr xt, [xn, #off]`.
    pub fn ldr(&mut self, t: Reg, n: Reg, off: i32) -> Result<(), AsmError> {
        self.word(0xf940_0000 | (uimm12(off, 8, "ldr x offset")? << 10) | rn(n) | rd(t))
    }

    /// `str xt, [xn, #off]`.
    pub fn str(&mut self, t: Reg, n: Reg, off: i32) -> Result<(), AsmError> {
        self.word(0xf900_0000 | (uimm12(off, 8, "str x offset")? << 10) | rn(n) | rd(t))
    }

    /// `ldr wt, [xn, #off]`.
    pub fn ldr_w(&mut self, t: Reg, n: Reg, off: i32) -> Result<(), AsmError> {
        self.word(0xb940_0000 | (uimm12(off, 4, "ldr w offset")? << 10) | rn(n) | rd(t))
    }

    /// `str wt, [xn, #off]`.
    pub fn str_w(&mut self, t: Reg, n: Reg, off: i32) -> Result<(), AsmError> {
        self.word(0xb900_0000 | (uimm12(off, 4, "str w offset")? << 10) | rn(n) | rd(t))
    }

    /// `stlr wt, [xn]`: a store-release.
    pub fn stlr_w(&mut self, t: Reg, n: Reg) -> Result<(), AsmError> {
        self.word(0x889f_fc00 | rn(n) | rd(t))
    }

    /// `stp xt, xt2, [xn, #off]` (or pre/post-indexed).
    pub fn stp(&mut self, t: Reg, t2: Reg, n: Reg, off: i32, ix: Index) -> Result<(), AsmError> {
        self.word(0xa800_0000 | ix.bits() | (simm7(off, 8)? << 15) | rt2(t2) | rn(n) | rd(t))
    }

    /// `ldp xt, xt2, [xn, #off]` (or pre/post-indexed).
    pub fn ldp(&mut self, t: Reg, t2: Reg, n: Reg, off: i32, ix: Index) -> Result<(), AsmError> {
        self.word(0xa840_0000 | ix.bits() | (simm7(off, 8)? << 15) | rt2(t2) | rn(n) | rd(t))
    }

    /// `stp qt, qt2, [xn, #off]`.
    pub fn stp_q(&mut self, t: u8, t2: u8, n: Reg, off: i32) -> Result<(), AsmError> {
        let i = Index::Offset.bits();
        self.word(0xac00_0000 | i | (simm7(off, 16)? << 15) | rt2(Reg(t2)) | rn(n) | rd(Reg(t)))
    }

    /// `ldp qt, qt2, [xn, #off]`.
    pub fn ldp_q(&mut self, t: u8, t2: u8, n: Reg, off: i32) -> Result<(), AsmError> {
        let i = Index::Offset.bits();
        self.word(0xac40_0000 | i | (simm7(off, 16)? << 15) | rt2(Reg(t2)) | rn(n) | rd(Reg(t)))
    }

    // ------------------------------------------------------------ branches

    /// `b label`.
    pub fn b(&mut self, l: Label) -> Result<(), AsmError> {
        self.fixup(0x1400_0000, Fixup::Imm26(l))
    }

    /// `b target` (an absolute address within ±128 MiB of this instruction).
    pub fn b_to(&mut self, target: usize) -> Result<(), AsmError> {
        self.fixup(0x1400_0000, Fixup::Abs26(target))
    }

    /// `b.cond label`.
    pub fn b_cond(&mut self, c: Cond, l: Label) -> Result<(), AsmError> {
        self.fixup(0x5400_0000 | c as u32, Fixup::Imm19(l))
    }

    /// `tbnz wt, #bit, label` (`bit` < 32).
    pub fn tbnz_w(&mut self, t: Reg, bit: u32, l: Label) -> Result<(), AsmError> {
        check(bit < 32, "tbnz w: bit below 32")?;
        self.fixup(0x3700_0000 | (bit << 19) | rd(t), Fixup::Imm14(l))
    }

    /// `cbz xt, label`.
    pub fn cbz(&mut self, t: Reg, l: Label) -> Result<(), AsmError> {
        self.fixup(0xb400_0000 | rd(t), Fixup::Imm19(l))
    }

    /// `cbnz xt, label`.
    pub fn cbnz(&mut self, t: Reg, l: Label) -> Result<(), AsmError> {
        self.fixup(0xb500_0000 | rd(t), Fixup::Imm19(l))
    }

    /// `cbz wt, label`.
    pub fn cbz_w(&mut self, t: Reg, l: Label) -> Result<(), AsmError> {
        self.fixup(0x3400_0000 | rd(t), Fixup::Imm19(l))
    }

    /// `cbnz wt, label`.
    pub fn cbnz_w(&mut self, t: Reg, l: Label) -> Result<(), AsmError> {
        self.fixup(0x3500_0000 | rd(t), Fixup::Imm19(l))
    }

    /// `blr xn`.
    pub fn blr(&mut self, n: Reg) -> Result<(), AsmError> {
        self.word(0xd63f_0000 | rn(n))
    }

    /// `br xn`.
    pub fn br(&mut self, n: Reg) -> Result<(), AsmError> {
        self.word(0xd61f_0000 | rn(n))
    }

    /// `ret` (to x30).
    pub fn ret(&mut self) -> Result<(), AsmError> {
        self.word(0xd65f_03c0)
    }

    /// `nop`.
    pub fn nop(&mut self) -> Result<(), AsmError> {
        self.word(0xd503_201f)
    }

    /// `brk #imm`: traps (padding no path runs).
    pub fn brk(&mut self, imm: u32) -> Result<(), AsmError> {
        check(imm < 1 << 16, "brk: 16 bits")?;
        self.word(0xd420_0000 | (imm << 5))
    }
}

/// `v` as a signed `bits`-wide field, or an error when out of range.
fn imm(v: i64, bits: u32) -> Result<u32, AsmError> {
    let half = 1i64 << (bits - 1);
    check((-half..half).contains(&v), "branch or page offset out of range")?;
    Ok((v as u32) & ((1u32 << bits) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(a: Assembler, at: usize) -> Vec<u32> {
        a.assemble(at).unwrap().chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// Every encoding against aarch64-linux-gnu-as 2.40 (`as` then
    /// `objdump -d` of the same source).
    #[test]
    fn encodings_match_gnu_as() {
        let mut a = Assembler::new().unwrap();
        let (x0, x1, x9, x16, x17) = (Reg(0), Reg(1), Reg(9), Reg(16), Reg(17));
        a.stp(FP, LR, SP, -16, Index::Pre).unwrap(); // stp x29, x30, [sp, #-16]!
        a.mov_sp(FP, SP).unwrap(); // mov x29, sp
        a.mrs_tpidr(x16).unwrap(); // mrs x16, tpidr_el0
        a.add_imm(x16, x16, 0x10).unwrap(); // add x16, x16, #0x10
        a.add_imm(x16, x16, 0x3000).unwrap(); // add x16, x16, #0x3, lsl #12
        a.ldr_w(x17, x16, 0).unwrap(); // ldr w17, [x16]
        a.add_imm_w(x17, x17, 1).unwrap(); // add w17, w17, #0x1
        a.str_w(x17, x16, 0).unwrap(); // str w17, [x16]
        a.sub_imm_w(x17, x17, 1).unwrap(); // sub w17, w17, #0x1
        a.stlr_w(x17, x16).unwrap(); // stlr w17, [x16]
        a.mov_imm(x9, 0x1234_5678).unwrap(); // mov x9, #0x5678; movk x9, #0x1234, lsl #16
        a.ldr(x16, x16, 0x18).unwrap(); // ldr x16, [x16, #24]
        a.str(x9, SP, 16).unwrap(); // str x9, [sp, #16]
        a.blr(x16).unwrap(); // blr x16
        a.br(x16).unwrap(); // br x16
        a.ldp(FP, LR, SP, 16, Index::Post).unwrap(); // ldp x29, x30, [sp], #16
        a.stp(x0, x1, SP, 32, Index::Offset).unwrap(); // stp x0, x1, [sp, #32]
        a.ldp(x0, x1, SP, 32, Index::Offset).unwrap(); // ldp x0, x1, [sp, #32]
        a.stp_q(0, 1, SP, 192).unwrap(); // stp q0, q1, [sp, #192]
        a.ldp_q(6, 7, SP, 288).unwrap(); // ldp q6, q7, [sp, #288]
        a.sub_imm(SP, SP, 704).unwrap(); // sub sp, sp, #0x2c0
        a.add_imm(SP, SP, 704).unwrap(); // add sp, sp, #0x2c0
        a.cmp_imm_w(x0, 0).unwrap(); // cmp w0, #0x0
        a.mov(LR, x0).unwrap(); // mov x30, x0
        a.add(x16, x16, x17).unwrap(); // add x16, x16, x17
        a.ret().unwrap();
        let got = words(a, 0x1000);
        let want = [
            0xa9bf7bfd, 0x910003fd, 0xd53bd050, 0x91004210, 0x91400e10, 0xb9400211, 0x11000631, 0xb9000211, 0x51000631,
            0x889ffe11, 0xd28acf09, 0xf2a24689, 0xf9400e10, 0xf9000be9, 0xd63f0200, 0xd61f0200, 0xa8c17bfd, 0xa90207e0,
            0xa94207e0, 0xad0607e0, 0xad491fe6, 0xd10b03ff, 0x910b03ff, 0x7100001f, 0xaa0003fe, 0x8b110210, 0xd65f03c0,
        ];
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(g, w, "instruction {i}: {g:#010x} != {w:#010x}");
        }
        assert_eq!(got.len(), want.len());
    }

    /// The instructions of the recorder's fast paths (`textpoke-record`'s
    /// aarch64 codegen and the count, graph and return trampolines),
    /// against aarch64-linux-gnu-as 2.40 with `-march=armv8.1-a` (for
    /// `stadd`), then `objdump -d`.
    #[test]
    fn fast_path_encodings_match_gnu_as() {
        let r = Reg;
        let mut a = Assembler::new().unwrap();
        a.add_lsl(r(1), r(2), r(3), 3).unwrap(); // add x1, x2, x3, lsl #3
        a.sub(r(4), r(5), r(6)).unwrap(); // sub x4, x5, x6
        a.orr_lsl(r(7), r(8), r(9), 38).unwrap(); // orr x7, x8, x9, lsl #38
        a.mov_w(r(10), r(11)).unwrap(); // mov w10, w11
        a.mov_imm_w(r(12), 1).unwrap(); // mov w12, #1
        a.cmp(r(13), r(14)).unwrap(); // cmp x13, x14
        a.cmp_imm(r(15), 0x10).unwrap(); // cmp x15, #0x10
        a.csel(r(1), r(2), r(3), Cond::Hs).unwrap(); // csel x1, x2, x3, hs
        a.lsl_imm(r(4), r(5), 16).unwrap(); // lsl x4, x5, #16
        a.lsr_imm(r(6), r(7), 26).unwrap(); // lsr x6, x7, #26
        a.ubfx(r(8), r(9), 6, 26).unwrap(); // ubfx x8, x9, #6, #26
        a.ubfx(r(10), r(11), 0, 1).unwrap(); // ubfx x10, x11, #0, #1
        a.lsrv(r(12), r(13), r(14)).unwrap(); // lsr x12, x13, x14
        a.madd(r(15), r(16), r(17), r(1)).unwrap(); // madd x15, x16, x17, x1
        a.ldrb(r(2), r(3), 5).unwrap(); // ldrb w2, [x3, #5]
        a.ldr_index(r(4), r(5), r(6)).unwrap(); // ldr x4, [x5, x6, lsl #3]
        a.stlr(r(7), r(8)).unwrap(); // stlr x7, [x8]
        a.ldxr(r(9), r(10)).unwrap(); // ldxr x9, [x10]
        a.stxr(r(11), r(12), r(13)).unwrap(); // stxr w11, x12, [x13]
        a.stadd(r(14), r(15)).unwrap(); // stadd x14, [x15]
        a.mrs_cntvct(r(16)).unwrap(); // mrs x16, cntvct_el0
        a.isb().unwrap(); // isb
        a.brk(0x3e8).unwrap(); // brk #0x3e8
        a.csel(r(1), r(2), r(3), Cond::Lo).unwrap(); // csel x1, x2, x3, lo
        a.lsr_imm(r(2), r(3), 32).unwrap(); // lsr x2, x3, #32
        let want = [
            0x8b030c41, 0xcb0600a4, 0xaa099907, 0x2a0b03ea, 0x5280002c, 0xeb0e01bf, 0xf10041ff, 0x9a832041, 0xd370bca4,
            0xd35afce6, 0xd3467d28, 0xd340016a, 0x9ace25ac, 0x9b11060f, 0x39401462, 0xf86678a4, 0xc89ffd07, 0xc85f7d49,
            0xc80b7dac, 0xf82e01ff, 0xd53be050, 0xd5033fdf, 0xd4207d00, 0x9a833041, 0xd360fc62,
        ];
        let got = words(a, 0);
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(g, w, "instruction {i}: {g:#010x} != {w:#010x}");
        }
        assert_eq!(got.len(), want.len());
        // Branches to labels (`top:` before, `end:` after the eight).
        let mut a = Assembler::new().unwrap();
        let (top, end) = (a.create_label(), a.create_label());
        a.set_label(top).unwrap();
        a.cbz(r(3), end).unwrap(); // cbz x3, end
        a.cbnz(r(4), top).unwrap(); // cbnz x4, top
        a.cbz_w(r(5), end).unwrap(); // cbz w5, end
        a.cbnz_w(r(6), top).unwrap(); // cbnz w6, top
        a.b_cond(Cond::Hs, end).unwrap(); // b.hs end
        a.b_cond(Cond::Lo, top).unwrap(); // b.lo top
        a.b_cond(Cond::Hi, end).unwrap(); // b.hi end
        a.b_cond(Cond::Ls, top).unwrap(); // b.ls top
        a.set_label(end).unwrap();
        assert_eq!(
            words(a, 0x1000),
            [0xb4000103, 0xb5ffffe4, 0x340000c5, 0x35ffffa6, 0x54000082, 0x54ffff63, 0x54000048, 0x54ffff29]
        );
        let mut a = Assembler::new().unwrap();
        assert!(a.lsl_imm(r(0), r(0), 0).is_err() && a.ubfx(r(0), r(0), 60, 8).is_err());
    }

    #[test]
    fn branches_and_pages_resolve() {
        let mut a = Assembler::new().unwrap();
        let (top, end) = (a.create_label(), a.create_label());
        a.set_label(top).unwrap();
        a.tbnz_w(Reg(17), 31, end).unwrap(); // tbnz w17, #31, +12
        a.b_cond(Cond::Ne, top).unwrap(); // b.ne -4
        a.b(end).unwrap(); // b +4
        a.set_label(end).unwrap();
        a.b_to(0x2000).unwrap(); // at 0x100c: b 0x2000
        a.adrp(Reg(16), 0x5_4321).unwrap(); // at 0x1010: adrp x16, 0x54000 (0x53 pages up)
        let got = words(a, 0x1000);
        assert_eq!(got, [0x37f80071, 0x54ffffe1, 0x14000001, 0x140003fd, 0xf0000290]);
        let mut far = Assembler::new().unwrap();
        far.b_to(0x1000 + (128 << 20)).unwrap();
        assert!(far.assemble(0x1000).is_err(), "b beyond 128 MiB");
        let mut a = Assembler::new().unwrap();
        assert!(a.add_imm(Reg(0), Reg(0), 4097).is_err());
        assert!(a.ldr(Reg(0), Reg(0), 4).is_err(), "unaligned ldr x");
    }

    #[test]
    fn immediates_and_offsets() {
        let mut a = Assembler::new().unwrap();
        a.mov_imm(Reg(2), 0).unwrap(); // movz x2, #0
        a.mov_imm(Reg(2), 0xffff_0000_0000_0001).unwrap(); // movz x2, #1; movk x2, #0xffff, lsl #48
        a.add_offset(Reg(16), Reg(16), -0x40, Reg(17)).unwrap(); // sub x16, x16, #0x40
        a.add_offset(Reg(16), Reg(16), 0x12_3456, Reg(17)).unwrap(); // add #0x123, lsl 12; add #0x456
        a.add_offset(Reg(16), Reg(16), 0x1234_5678, Reg(17)).unwrap(); // mov x17, ...; add x16, x16, x17
        let got = words(a, 0);
        assert_eq!(
            got,
            [
                0xd2800002, 0xd2800022, 0xf2ffffe2, 0xd1010210, 0x91448e10, 0x91115a10, 0xd28acf11, 0xf2a24691,
                0x8b110210
            ]
        );
    }
}
