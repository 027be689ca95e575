//! A small x86-64 assembler: the instructions and operands the tracer's
//! trampolines and the ops' inline code (the tracer's `InlineCode`)
//! are written with, and labels for their branches.
//!
//! It is textpoke's own face over iced-x86's `CodeAssembler`, which does
//! the encoding: what an op may emit is what is here, and nothing of the
//! encoder's much larger API becomes textpoke's. Operands are written as
//! in assembly text:
//!
//! ```
//! use textpoke::arch::asm::{dword_ptr, qword_ptr, Assembler, AsmError, Label, Reg64::*};
//!
//! /// `inc qword [rsi+rcx*8]` unless `busy` (a u32 at `rax+16`) is set.
//! fn emit(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
//!     a.cmp(dword_ptr(rax + 16), 0)?;
//!     a.jne(fail)?;
//!     a.inc(qword_ptr(rsi + rcx * 8))
//! }
//! ```
//!
//! An op's code receives an `Assembler` and the label to jump to when it
//! fails (the tracer's `EmitFn`); the trampoline around it says
//! which registers hold its inputs and which it may clobber.
//!
//! Immediates are sign-extended to the operand size, as the instructions
//! do: a 32-bit one fits `i32` (or, for a 32-bit operand, `u32`); only
//! `mov` into a 64-bit register takes a full 64-bit one. An operand
//! combination or immediate the instruction does not have is an
//! [`AsmError`], not a different instruction.

use iced_x86::code_asm as ia;
use std::fmt;
use std::ops::{Add, Mul, Sub};

/// A 64-bit general-purpose register.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg64 {
    rax,
    rcx,
    rdx,
    rbx,
    rsp,
    rbp,
    rsi,
    rdi,
    r8,
    r9,
    r10,
    r11,
    r12,
    r13,
    r14,
    r15,
}

/// The low 32 bits of a general-purpose register (writing one zeroes the
/// upper half).
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg32 {
    eax,
    ecx,
    edx,
    ebx,
    esp,
    ebp,
    esi,
    edi,
    r8d,
    r9d,
    r10d,
    r11d,
    r12d,
    r13d,
    r14d,
    r15d,
}

/// The low 8 bits of a general-purpose register.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg8 {
    al,
    cl,
    dl,
    bl,
    spl,
    bpl,
    sil,
    dil,
    r8b,
    r9b,
    r10b,
    r11b,
    r12b,
    r13b,
    r14b,
    r15b,
}

impl Reg64 {
    fn iced(self) -> ia::AsmRegister64 {
        use ia::registers::gpr64::*;
        [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15][self as usize]
    }
}

impl Reg32 {
    fn iced(self) -> ia::AsmRegister32 {
        use ia::registers::gpr32::*;
        [eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d][self as usize]
    }
}

impl Reg8 {
    fn iced(self) -> ia::AsmRegister8 {
        use ia::registers::gpr8::*;
        [al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b][self as usize]
    }
}

/// A vector register, for the trampolines that save and restore them:
/// xmm (16 bytes, SSE) or ymm (32 bytes, AVX), 0-15.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vector {
    Xmm(u8),
    Ymm(u8),
}

/// How many bytes a memory operand accesses, when the instruction does not
/// say (`inc`, `cmp` with an immediate...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    Unsized,
    Byte,
    Dword,
    Qword,
    Xmmword,
    Ymmword,
}

/// A memory operand, `[base + index*scale + disp]`, optionally sized
/// ([`qword_ptr`], [`dword_ptr`], [`byte_ptr`]) and `fs`-relative
/// ([`Mem::fs`]: thread-local data, at an offset from the thread pointer).
/// Made from registers and displacements with `+`, `-` and `*`:
/// `rax + 8`, `rsi + rcx * 8`, `rsi + r9 * 8 + 8`, or a bare displacement
/// (`qword_ptr(offset).fs()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mem {
    base: Option<Reg64>,
    index: Option<(Reg64, u8)>,
    disp: i64,
    size: Size,
    fs: bool,
}

impl Mem {
    const fn disp_only(disp: i64) -> Mem {
        Mem { base: None, index: None, disp, size: Size::Unsized, fs: false }
    }

    /// The same operand relative to the `fs` segment: with no base, its
    /// displacement is an offset from the thread pointer.
    pub fn fs(self) -> Mem {
        Mem { fs: true, ..self }
    }

    fn sized(self, size: Size) -> Mem {
        Mem { size, ..self }
    }

    /// iced's operand with exactly the fields iced's own expressions
    /// (`rax + 8`, `rsi + rcx * 8`, `qword_ptr(off).fs()`) give, so the
    /// encoding is the one those give.
    fn iced(self) -> ia::AsmMemoryOperand {
        let mut m = match (self.base, self.index) {
            (Some(b), None) => ia::AsmMemoryOperand::from(b.iced()),
            (Some(b), Some((i, s))) => b.iced() + i.iced() * s,
            (None, Some((i, s))) => i.iced() * s,
            (None, None) => ia::AsmMemoryOperand::from(0i64),
        };
        m = m + self.disp;
        m = match self.size {
            Size::Unsized => ia::ptr(m),
            Size::Byte => ia::byte_ptr(m),
            Size::Dword => ia::dword_ptr(m),
            Size::Qword => ia::qword_ptr(m),
            Size::Xmmword => ia::xmmword_ptr(m),
            Size::Ymmword => ia::ymmword_ptr(m),
        };
        if self.fs {
            m.fs()
        } else {
            m
        }
    }
}

impl From<Reg64> for Mem {
    fn from(base: Reg64) -> Mem {
        Mem { base: Some(base), ..Mem::disp_only(0) }
    }
}

/// `reg * scale`: an index (scale 1, 2, 4 or 8).
impl Mul<u8> for Reg64 {
    type Output = Mem;
    fn mul(self, scale: u8) -> Mem {
        Mem { index: Some((self, scale)), ..Mem::disp_only(0) }
    }
}

/// `base + index * scale`.
impl Add<Mem> for Reg64 {
    type Output = Mem;
    fn add(self, rhs: Mem) -> Mem {
        debug_assert!(rhs.base.is_none(), "one base register");
        Mem { base: Some(self), ..rhs }
    }
}

macro_rules! displacements {
    ($($t:ty)*) => {$(
        impl From<$t> for Mem {
            /// A bare displacement (an absolute address, or with
            /// [`Mem::fs`] an offset from the thread pointer).
            fn from(disp: $t) -> Mem {
                Mem::disp_only(disp as i64)
            }
        }
        impl Add<$t> for Reg64 {
            type Output = Mem;
            fn add(self, disp: $t) -> Mem {
                Mem::from(self) + disp
            }
        }
        impl Sub<$t> for Reg64 {
            type Output = Mem;
            fn sub(self, disp: $t) -> Mem {
                Mem::from(self) - disp
            }
        }
        impl Add<$t> for Mem {
            type Output = Mem;
            fn add(self, disp: $t) -> Mem {
                Mem { disp: self.disp.wrapping_add(disp as i64), ..self }
            }
        }
        impl Sub<$t> for Mem {
            type Output = Mem;
            fn sub(self, disp: $t) -> Mem {
                Mem { disp: self.disp.wrapping_sub(disp as i64), ..self }
            }
        }
    )*};
}
displacements!(i32 i64 u32 usize);

/// A byte in memory.
pub fn byte_ptr(m: impl Into<Mem>) -> Mem {
    m.into().sized(Size::Byte)
}

/// A 32-bit word in memory.
pub fn dword_ptr(m: impl Into<Mem>) -> Mem {
    m.into().sized(Size::Dword)
}

/// A 64-bit word in memory.
pub fn qword_ptr(m: impl Into<Mem>) -> Mem {
    m.into().sized(Size::Qword)
}

/// An instruction's operand: a register, memory, or an immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// A 64-bit register.
    R64(Reg64),
    /// A 32-bit register.
    R32(Reg32),
    /// An 8-bit register.
    R8(Reg8),
    /// A memory operand.
    Mem(Mem),
    /// An immediate (its bits; see the module docs for the sizes).
    Imm(i64),
}

macro_rules! operand_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Operand {
            fn from(x: $t) -> Operand {
                Operand::$v(x)
            }
        }
    )*};
}
operand_from!(Reg64 => R64, Reg32 => R32, Reg8 => R8, Mem => Mem);

macro_rules! operand_imm {
    ($($t:ty)*) => {$(
        impl From<$t> for Operand {
            fn from(x: $t) -> Operand {
                Operand::Imm(x as i64)
            }
        }
    )*};
}
operand_imm!(i32 u32 i64 u64);

/// Why code could not be assembled: an operand combination or immediate
/// an instruction does not have, a label set twice or never, a branch
/// the encoder cannot reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsmError(String);

impl AsmError {
    fn operands(what: &str, ops: &[Operand]) -> AsmError {
        AsmError(format!("{what}: no such operand combination ({ops:?})"))
    }
}

impl fmt::Display for AsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AsmError {}

fn iced_err(e: iced_x86::IcedError) -> AsmError {
    AsmError(e.to_string())
}

/// A branch target in the code being assembled: made by
/// [`Assembler::create_label`], placed once by [`Assembler::set_label`]
/// at the next instruction emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// Code being assembled for a known address (the trampolines place it).
pub struct Assembler {
    a: ia::CodeAssembler,
    /// Every label created, and whether it was placed.
    labels: Vec<(ia::CodeLabel, bool)>,
}

impl fmt::Debug for Assembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assembler").field("instructions", &self.a.instructions().len()).finish()
    }
}

/// An immediate of a 32-bit-immediate form, for an operand of `bits`
/// (sign-extended to it: beyond 32 bits it must fit `i32`).
fn imm32(what: &str, v: i64, bits: u32) -> Result<i32, AsmError> {
    match i32::try_from(v) {
        Ok(i) => Ok(i),
        Err(_) if bits <= 32 && u32::try_from(v).is_ok() => Ok(v as u32 as i32),
        Err(_) => Err(AsmError(format!("{what}: immediate {v:#x} does not fit 32 bits sign-extended"))),
    }
}

/// The width of a sized memory operand, for its immediates.
fn mem_bits(m: &Mem) -> u32 {
    match m.size {
        Size::Byte => 8,
        Size::Dword => 32,
        _ => 64,
    }
}

/// The two-operand integer instructions with the usual forms: register or
/// memory, and register, memory or a sign-extended 32-bit immediate.
macro_rules! alu {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&mut self, dst: impl Into<Operand>, src: impl Into<Operand>) -> Result<(), AsmError> {
            use Operand::*;
            let (d, s) = (dst.into(), src.into());
            let what = stringify!($name);
            match (d, s) {
                (R64(d), R64(s)) => self.a.$name(d.iced(), s.iced()),
                (R64(d), Mem(s)) => self.a.$name(d.iced(), s.iced()),
                (Mem(d), R64(s)) => self.a.$name(d.iced(), s.iced()),
                (R32(d), R32(s)) => self.a.$name(d.iced(), s.iced()),
                (R32(d), Mem(s)) => self.a.$name(d.iced(), s.iced()),
                (Mem(d), R32(s)) => self.a.$name(d.iced(), s.iced()),
                (R64(d), Imm(v)) => self.a.$name(d.iced(), imm32(what, v, 64)?),
                (R32(d), Imm(v)) => self.a.$name(d.iced(), imm32(what, v, 32)?),
                (Mem(d), Imm(v)) => self.a.$name(d.iced(), imm32(what, v, mem_bits(&d))?),
                _ => return Err(AsmError::operands(what, &[d, s])),
            }
            .map_err(iced_err)
        }
    )*};
}

/// One-operand instructions on a register or memory.
macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&mut self, dst: impl Into<Operand>) -> Result<(), AsmError> {
            match dst.into() {
                Operand::R64(d) => self.a.$name(d.iced()),
                Operand::R32(d) => self.a.$name(d.iced()),
                Operand::Mem(d) => self.a.$name(d.iced()),
                d => return Err(AsmError::operands(stringify!($name), &[d])),
            }
            .map_err(iced_err)
        }
    )*};
}

/// Shifts by an immediate count.
macro_rules! shift {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&mut self, dst: impl Into<Operand>, count: impl Into<Operand>) -> Result<(), AsmError> {
            let what = stringify!($name);
            match (dst.into(), count.into()) {
                (Operand::R64(d), Operand::Imm(n @ 0..64)) => self.a.$name(d.iced(), n as i32),
                (Operand::R32(d), Operand::Imm(n @ 0..32)) => self.a.$name(d.iced(), n as i32),
                (d, n) => return Err(AsmError::operands(what, &[d, n])),
            }
            .map_err(iced_err)
        }
    )*};
}

/// Conditional and unconditional jumps to a label.
macro_rules! jumps {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&mut self, to: Label) -> Result<(), AsmError> {
            let l = self.label(to)?;
            self.a.$name(l).map_err(iced_err)
        }
    )*};
}

/// Instructions without operands.
macro_rules! bare {
    ($($(#[$doc:meta])* $vis:vis $name:ident;)*) => {$(
        $(#[$doc])*
        $vis fn $name(&mut self) -> Result<(), AsmError> {
            self.a.$name().map_err(iced_err)
        }
    )*};
}

impl Assembler {
    /// An empty 64-bit assembler.
    pub(crate) fn new() -> Result<Assembler, AsmError> {
        Ok(Assembler { a: ia::CodeAssembler::new(64).map_err(iced_err)?, labels: Vec::new() })
    }

    /// Encodes everything emitted for address `at` (branches to absolute
    /// addresses are relative to it).
    pub(crate) fn assemble(mut self, at: usize) -> Result<Vec<u8>, AsmError> {
        if let Some(i) = self.labels.iter().position(|&(_, set)| !set) {
            return Err(AsmError(format!("label {i} was used but never set")));
        }
        self.a.assemble(at as u64).map_err(iced_err)
    }

    /// A new label, to branch to and to place with [`Assembler::set_label`].
    pub fn create_label(&mut self) -> Label {
        self.labels.push((self.a.create_label(), false));
        Label(self.labels.len() - 1)
    }

    /// Places `label` at the next instruction emitted (one label per
    /// instruction; a label is placed once).
    pub fn set_label(&mut self, label: Label) -> Result<(), AsmError> {
        let (mut l, set) = *self.labels.get(label.0).ok_or_else(|| AsmError("a label of another assembler".into()))?;
        if set {
            return Err(AsmError(format!("label {} set twice", label.0)));
        }
        self.a.set_label(&mut l).map_err(iced_err)?;
        self.labels[label.0] = (l, true);
        Ok(())
    }

    fn label(&self, label: Label) -> Result<ia::CodeLabel, AsmError> {
        self.labels.get(label.0).map(|&(l, _)| l).ok_or_else(|| AsmError("a label of another assembler".into()))
    }

    alu! {
        /// `add dst, src`.
        add;
        /// `sub dst, src`.
        sub;
        /// `and dst, src`.
        and;
        /// `or dst, src`.
        or;
        /// `cmp dst, src`.
        cmp;
    }

    /// `mov dst, src`: as the arithmetic instructions, and into a 64-bit
    /// register any 64-bit immediate (`mov r64, imm64`).
    pub fn mov(&mut self, dst: impl Into<Operand>, src: impl Into<Operand>) -> Result<(), AsmError> {
        use Operand::*;
        let (d, s) = (dst.into(), src.into());
        match (d, s) {
            (R64(d), R64(s)) => self.a.mov(d.iced(), s.iced()),
            (R64(d), Mem(s)) => self.a.mov(d.iced(), s.iced()),
            (Mem(d), R64(s)) => self.a.mov(d.iced(), s.iced()),
            (R32(d), R32(s)) => self.a.mov(d.iced(), s.iced()),
            (R32(d), Mem(s)) => self.a.mov(d.iced(), s.iced()),
            (Mem(d), R32(s)) => self.a.mov(d.iced(), s.iced()),
            (R64(d), Imm(v)) => self.a.mov(d.iced(), v),
            (R32(d), Imm(v)) => self.a.mov(d.iced(), imm32("mov", v, 32)?),
            (Mem(d), Imm(v)) => self.a.mov(d.iced(), imm32("mov", v, mem_bits(&d))?),
            _ => return Err(AsmError::operands("mov", &[d, s])),
        }
        .map_err(iced_err)
    }

    /// `test a, b` (a register or memory, and a register).
    pub fn test(&mut self, a: impl Into<Operand>, b: impl Into<Operand>) -> Result<(), AsmError> {
        use Operand::*;
        match (a.into(), b.into()) {
            (R64(x), R64(y)) => self.a.test(x.iced(), y.iced()),
            (Mem(x), R64(y)) => self.a.test(x.iced(), y.iced()),
            (R32(x), R32(y)) => self.a.test(x.iced(), y.iced()),
            (Mem(x), R32(y)) => self.a.test(x.iced(), y.iced()),
            (x, y) => return Err(AsmError::operands("test", &[x, y])),
        }
        .map_err(iced_err)
    }

    /// `lea dst, [address]`.
    pub fn lea(&mut self, dst: Reg64, address: Mem) -> Result<(), AsmError> {
        self.a.lea(dst.iced(), address.iced()).map_err(iced_err)
    }

    /// `movzx dst, src`: a byte register or a byte in memory, zero-extended.
    pub fn movzx(&mut self, dst: Reg32, src: impl Into<Operand>) -> Result<(), AsmError> {
        match src.into() {
            Operand::R8(s) => self.a.movzx(dst.iced(), s.iced()),
            Operand::Mem(s) => self.a.movzx(dst.iced(), s.iced()),
            s => return Err(AsmError::operands("movzx", &[Operand::R32(dst), s])),
        }
        .map_err(iced_err)
    }

    /// `cmovb dst, src`: moves if below (unsigned; carry set).
    pub fn cmovb(&mut self, dst: Reg64, src: Reg64) -> Result<(), AsmError> {
        self.a.cmovb(dst.iced(), src.iced()).map_err(iced_err)
    }

    /// `bt a, bit`: the carry flag becomes bit `bit` (modulo 64) of `a`.
    pub fn bt(&mut self, a: Reg64, bit: Reg64) -> Result<(), AsmError> {
        self.a.bt(a.iced(), bit.iced()).map_err(iced_err)
    }

    /// `setc dst`: 1 if the carry flag is set, else 0.
    pub fn setc(&mut self, dst: Reg8) -> Result<(), AsmError> {
        self.a.setc(dst.iced()).map_err(iced_err)
    }

    /// `imul dst, src, imm`: `dst = src * imm`.
    pub fn imul_3(&mut self, dst: Reg64, src: Reg64, imm: i32) -> Result<(), AsmError> {
        self.a.imul_3(dst.iced(), src.iced(), imm).map_err(iced_err)
    }

    unary! {
        /// `inc dst`.
        inc;
        /// `dec dst`.
        dec;
        /// `neg dst`.
        neg;
    }

    shift! {
        /// `shl dst, count`.
        shl;
        /// `shr dst, count`.
        shr;
    }

    jumps! {
        /// `jmp label`.
        jmp;
        /// `jz label`: if zero (equal).
        jz;
        /// `jne label`: if not equal (not zero).
        jne;
        /// `jae label`: if above or equal (unsigned; carry clear).
        jae;
        /// `ja label`: if above (unsigned).
        ja;
    }

    bare! {
        /// `nop` (one byte).
        pub nop;
        /// `lfence`: later instructions start once earlier ones completed
        /// (before `rdtsc`, an ordered clock read).
        pub lfence;
        /// `rdtsc`: the time-stamp counter into edx:eax.
        pub rdtsc;
        /// `ret`.
        pub(crate) ret;
    }

    /// `jmp to`, an absolute address (the encoder makes it an indirect
    /// jump if `to` is out of rel32 reach).
    pub(crate) fn jmp_to(&mut self, to: usize) -> Result<(), AsmError> {
        self.a.jmp(to as u64).map_err(iced_err)
    }

    /// `jmp [m]`.
    pub(crate) fn jmp_mem(&mut self, m: Mem) -> Result<(), AsmError> {
        self.a.jmp(m.iced()).map_err(iced_err)
    }

    /// `call reg`.
    pub(crate) fn call(&mut self, to: Reg64) -> Result<(), AsmError> {
        self.a.call(to.iced()).map_err(iced_err)
    }

    /// `push src`: a register, a qword in memory or a sign-extended 32-bit
    /// immediate.
    pub(crate) fn push(&mut self, src: impl Into<Operand>) -> Result<(), AsmError> {
        match src.into() {
            Operand::R64(s) => self.a.push(s.iced()),
            Operand::Mem(s) => self.a.push(s.iced()),
            Operand::Imm(v) => self.a.push(imm32("push", v, 64)?),
            s => return Err(AsmError::operands("push", &[s])),
        }
        .map_err(iced_err)
    }

    /// `pop dst`.
    pub(crate) fn pop(&mut self, dst: Reg64) -> Result<(), AsmError> {
        self.a.pop(dst.iced()).map_err(iced_err)
    }

    /// Stores vector register `v` at `to`, unaligned (`movdqu` for xmm,
    /// `vmovdqu` for ymm).
    pub(crate) fn store_vector(&mut self, to: Mem, v: Vector) -> Result<(), AsmError> {
        match v {
            Vector::Xmm(i) => self.a.movdqu(to.sized(Size::Xmmword).iced(), xmm(i)?),
            Vector::Ymm(i) => self.a.vmovdqu(to.sized(Size::Ymmword).iced(), ymm(i)?),
        }
        .map_err(iced_err)
    }

    /// Loads vector register `v` from `from`, unaligned.
    pub(crate) fn load_vector(&mut self, v: Vector, from: Mem) -> Result<(), AsmError> {
        match v {
            Vector::Xmm(i) => self.a.movdqu(xmm(i)?, from.sized(Size::Xmmword).iced()),
            Vector::Ymm(i) => self.a.vmovdqu(ymm(i)?, from.sized(Size::Ymmword).iced()),
        }
        .map_err(iced_err)
    }
}

fn xmm(i: u8) -> Result<ia::AsmRegisterXmm, AsmError> {
    use ia::registers::xmm::*;
    let regs = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15];
    regs.get(i as usize).copied().ok_or_else(|| AsmError(format!("no xmm{i}")))
}

fn ymm(i: u8) -> Result<ia::AsmRegisterYmm, AsmError> {
    use ia::registers::ymm::*;
    let regs = [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15];
    regs.get(i as usize).copied().ok_or_else(|| AsmError(format!("no ymm{i}")))
}

#[cfg(test)]
mod tests {
    use super::Reg32::*;
    use super::Reg64::*;
    use super::Reg8::*;
    use super::*;

    /// What iced's own assembler makes of the same instructions.
    fn iced(f: impl FnOnce(&mut ia::CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
        let mut a = ia::CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        a.assemble(0x1000).unwrap()
    }

    fn ours(f: impl FnOnce(&mut Assembler) -> Result<(), AsmError>) -> Vec<u8> {
        let mut a = Assembler::new().unwrap();
        f(&mut a).unwrap();
        a.assemble(0x1000).unwrap()
    }

    /// Every operand form gives the bytes iced's expressions give: the
    /// operands are translated, not re-encoded.
    #[test]
    fn encodes_as_iced_does() {
        use ia::registers::{gpr32 as i32r, gpr64 as i64r, gpr8 as i8r};
        let mine = ours(|a| {
            a.mov(rax, qword_ptr(-144).fs())?;
            a.mov(edx, dword_ptr(rax + 8usize))?;
            a.mov(dword_ptr(rax), 1)?;
            a.mov(rsi, 0x5555_0000_1234u64)?;
            a.mov(qword_ptr(rdx + 40), 0)?;
            a.mov(r10d, edx)?;
            a.cmp(rcx, qword_ptr(rax + 48))?;
            a.cmp(edx, 2u32)?;
            a.cmp(rdx, 1 << 26)?;
            a.inc(qword_ptr(rsi + rcx * 8))?;
            a.lea(rsi, qword_ptr(rsi + r9 * 8 + 8))?;
            a.lea(rsp, qword_ptr(rsp - 8))?;
            a.movzx(edx, byte_ptr(rdx))?;
            a.movzx(r9d, r9b)?;
            a.shl(rdx, 38u32)?;
            a.shr(r11, 32)?;
            a.or(rdx, 1)?;
            a.and(rsp, -32)?;
            a.cmovb(rax, rdx)?;
            a.bt(r9, r10)?;
            a.setc(r9b)?;
            a.imul_3(rdx, rcx, 48)?;
            a.neg(rdx)?;
            a.test(eax, eax)?;
            a.push(0)?;
            a.push(qword_ptr(r11 + 8))?;
            a.pop(rbp)?;
            a.store_vector(rsp + 96, Vector::Ymm(3))?;
            a.load_vector(Vector::Xmm(15), rsp + 128)?;
            a.call(rax)?;
            a.jmp_to(0x9000)?;
            a.jmp_mem(qword_ptr(r11))
        });
        let theirs = iced(|a| {
            use i32r::*;
            use i64r::*;
            use i8r::*;
            use ia::{byte_ptr, dword_ptr, qword_ptr, xmmword_ptr, ymmword_ptr};
            a.mov(rax, qword_ptr(-144).fs())?;
            a.mov(edx, dword_ptr(rax + 8usize))?;
            a.mov(dword_ptr(rax), 1)?;
            a.mov(rsi, 0x5555_0000_1234u64)?;
            a.mov(qword_ptr(rdx + 40), 0)?;
            a.mov(r10d, edx)?;
            a.cmp(rcx, qword_ptr(rax + 48))?;
            a.cmp(edx, 2u32)?;
            a.cmp(rdx, 1 << 26)?;
            a.inc(qword_ptr(rsi + rcx * 8))?;
            a.lea(rsi, qword_ptr(rsi + r9 * 8 + 8))?;
            a.lea(rsp, qword_ptr(rsp - 8))?;
            a.movzx(edx, byte_ptr(rdx))?;
            a.movzx(r9d, r9b)?;
            a.shl(rdx, 38u32)?;
            a.shr(r11, 32)?;
            a.or(rdx, 1)?;
            a.and(rsp, -32)?;
            a.cmovb(rax, rdx)?;
            a.bt(r9, r10)?;
            a.setc(r9b)?;
            a.imul_3(rdx, rcx, 48)?;
            a.neg(rdx)?;
            a.test(eax, eax)?;
            a.push(0)?;
            a.push(qword_ptr(r11 + 8))?;
            a.pop(rbp)?;
            a.vmovdqu(ymmword_ptr(rsp + 96), ia::ymm3)?;
            a.movdqu(ia::xmm15, xmmword_ptr(rsp + 128))?;
            a.call(rax)?;
            a.jmp(0x9000u64)?;
            a.jmp(qword_ptr(r11))
        });
        assert_eq!(mine, theirs);
    }

    #[test]
    fn labels_branch_forward_and_back() {
        let code = ours(|a| {
            let (top, out) = (a.create_label(), a.create_label());
            a.set_label(top)?;
            a.dec(ecx)?;
            a.jz(out)?;
            a.jmp(top)?;
            a.set_label(out)?;
            a.nop()
        });
        // dec ecx; jz +2; jmp -6; nop
        assert_eq!(code, [0xff, 0xc9, 0x74, 0x02, 0xeb, 0xfa, 0x90]);
    }

    #[test]
    fn refuses_what_the_instruction_does_not_have() {
        let mut a = Assembler::new().unwrap();
        assert!(a.mov(qword_ptr(rax), qword_ptr(rcx)).is_err(), "memory to memory");
        assert!(a.add(rax, 0x1_0000_0000u64).is_err(), "imm64 outside mov");
        assert!(a.cmp(rax, 0x8000_0000u32).is_err(), "sign extension would change the value");
        assert!(a.cmp(eax, 0x8000_0000u32).is_ok(), "a 32-bit operand takes it as is");
        assert!(a.shl(rax, 64).is_err());
        let l = a.create_label();
        a.set_label(l).unwrap();
        a.nop().unwrap();
        assert!(a.set_label(l).is_err(), "a label is placed once");
        let unset = a.create_label();
        a.jmp(unset).unwrap();
        assert!(a.assemble(0).is_err(), "a label used but never placed");
    }
}
