//! Sites of Rust functions marked with `#[textpoke::traced]`: the records
//! the attribute leaves in the `textpoke_sites` section, their format, and
//! how they are read back.
//!
//! # Example
//!
//! ```
//! use textpoke::sites::{MarkedPoint, SiteKind, SiteTable};
//!
//! #[textpoke::traced]
//! #[inline(never)]
//! fn parse(input: &str) -> usize {
//!     input.len()
//! }
//!
//! assert_eq!(parse("abc"), 3);
//! let mut table = SiteTable::new();
//! table.rescan();
//! let points: Vec<MarkedPoint> = table
//!     .sites()
//!     .filter(|s| s.function.ends_with("::parse"))
//!     .filter_map(|s| match s.kind {
//!         SiteKind::Marked(m) => Some(m.point),
//!         _ => None,
//!     })
//!     .collect();
//! assert!(points.contains(&MarkedPoint::Entry) && points.contains(&MarkedPoint::Exit));
//! ```
//!
//! What cannot be traced does not compile:
//!
//! ```compile_fail
//! #[textpoke::traced]
//! const fn answer() -> u32 { 42 }
//! ```
//!
//! ```compile_fail
//! #[textpoke::traced]
//! async fn fetch() -> u32 { 42 }
//! ```
//!
//! # What the attribute emits
//!
//! `#[textpoke::traced]` (crate `textpoke-macros`) rewrites
//!
//! ```text
//! fn f(args) -> R { body }
//! ```
//!
//! into
//!
//! ```text
//! fn f(args) -> R {
//!     static DESC: MarkedFunction = MarkedFunction::__new(concat!(module_path!(), "::f"));
//!     struct Exit;
//!     impl Drop for Exit {
//!         #[inline(always)]
//!         fn drop(&mut self) { __traced_site!(1, DESC) }   // the exit site
//!     }
//!     __traced_site!(0, DESC);                             // the entry site
//!     let exit = Exit;
//!     { body }
//! }
//! ```
//!
//! so every call runs the entry site first and the exit site last, also
//! when a panic unwinds through `f` (the guard's `drop` runs in the landing
//! pad). Each site is one `asm!` block ([`__traced_site!`](crate::__traced_site)):
//!
//! ```text
//! 2:  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00        # nopl 0x0(%rax,%rax,1): the site
//!     .pushsection textpoke_sites, "aR", @progbits
//!     .balign 4
//!     .long 2b - .                             # the record, see below
//!     .long DESC - .
//!     .byte KIND, 1, 0, 0
//!     .popsection
//! ```
//!
//! On aarch64 the site is `2: nop`, swapped with a `b` to a stub that saves
//! what it uses and branches back to the site + 4
//! (`arch/aarch64/body_stub.rs`).
//!
//! # Record format
//!
//! The section `textpoke_sites` (`SHT_PROGBITS`, `SHF_ALLOC |
//! SHF_GNU_RETAIN`, read-only, 4-byte aligned) is an array of 12-byte
//! records, one per site, in no particular order:
//!
//! ```text
//!  offset size
//!   0     i32   site      address of the NOP (5 bytes; aarch64: 4) - address of this field
//!   4     i32   function  address of the MarkedFunction descriptor - address of this field
//!   8     u8    kind      0 = entry, 1 = exit
//!   9     u8    version   1
//!  10     u16   reserved  0
//! ```
//!
//! Both addresses are 32-bit offsets relative to the field holding them (the
//! kernel's `jump_entry` style). The static linker resolves them, so the
//! section has **no dynamic relocation**: it can be read-only in a PIE or a
//! shared library, it is valid as soon as the object is mapped, and its
//! contents in memory are byte for byte those of the file.
//!
//! The descriptor ([`MarkedFunction`], `#[repr(C)]`, 24 bytes) is an
//! ordinary Rust `static`, one per marked function definition:
//!
//! ```text
//!   0  u32        magic     MarkedFunction::MAGIC ("TPfn")
//!   4  u32        version   1
//!   8  *const u8  name      the function's name, UTF-8, not NUL-terminated
//!  16  usize      name_len
//! ```
//!
//! The name is `module_path!()::fn_name` (`module_path!()::Type::method` when
//! the attribute is on an `impl` block, or what `#[traced(name = "...")]`
//! says). The name pointer is relocated by the loader like any pointer in a
//! static, so the descriptor is read from memory, after relocation.
//!
//! # Sites and functions
//!
//! A function's entry and exit sites are grouped by their descriptor, not
//! one-to-one:
//!
//! - each monomorphization of a generic function has its own sites (the
//!   `asm!` block is copied with the body), all pointing to the one
//!   descriptor of the generic definition;
//! - a function inlined into its callers has a copy of its sites in every
//!   caller; the numeric local label `2:` makes the copies assemble;
//! - a function through which a panic may unwind has a second exit site in
//!   its landing pad (the guard's drop on the unwind path), so there may be
//!   more exit sites than entry sites;
//! - without optimisation the guard's `drop` is not inlined and the exit
//!   site lives in `<Exit as Drop>::drop`, shared by all monomorphizations.
//!
//! Whatever the copies, every call executes exactly one entry site and,
//! when it returns or unwinds, exactly one exit site of its descriptor.
//!
//! # Why the `asm!` block is written this way
//!
//! - **No `nostack`.** The site may become a `call` to a trampoline, which
//!   pushes a return address below the stack pointer. Without `nostack` the
//!   compiler keeps nothing live in the red zone at the site (it gives the
//!   function a stack frame if it had none: in a leaf function that costs a
//!   `push`/`pop` pair besides the NOPs).
//! - **No `preserves_flags`.** A trampoline may change the flags.
//! - **No register operand or clobber.** The trampoline preserves every
//!   register; the compiler may keep anything in any register across the
//!   site.
//! - **Default memory effects** (neither `nomem` nor `readonly`): the
//!   compiler cannot move a site across the body's loads and stores or
//!   calls, so the entry site comes before the body's effects and the exit
//!   site after them. Work on registers (and loads of constants) may still
//!   be scheduled across a site: the entry NOP is not necessarily the first
//!   instruction after the prologue.
//! - **`"aR"`.** `R` (`SHF_GNU_RETAIN`) keeps the records through
//!   `--gc-sections` (nothing references them: they are found through the
//!   section headers). `a` without `w`: PC-relative records need no dynamic
//!   relocation, so the section is read-only. Rust does not put functions in
//!   COMDAT groups, so no `?` flag is needed for the records to follow their
//!   function; a record keeps its function alive through `--gc-sections`.
//!
//! # Reading
//!
//! The section is found in the object's file (its section header), like the
//! other site sections, and read from memory at its runtime address; every
//! record is compared byte for byte with the file (a difference is
//! [`SkipReason::RecordMismatch`]). Then, for each record: the kind and
//! version must be known ([`SkipReason::BadRecord`]), the descriptor must lie
//! in a readable segment of the same object, carry the magic and version, and
//! name a valid UTF-8 string inside the object
//! ([`SkipReason::BadDescriptor`]), and the bytes at the site must be
//! x86-64's 5-byte NOP (aarch64: one `nop`), in an executable segment
//! ([`SkipReason::UnexpectedBytes`], [`SkipReason::NotInCode`]).

use super::{Found, Hit, Miss, RecordSource, SectionReport, SiteKind, SitesError, SkipReason, NOP_LEN};
use crate::arch::{self, NopForm};

/// What a marked site holds: x86-64's 5-byte NOP (`NopForm::Single`), or
/// aarch64's one `nop` (swapped alone, not part of a patchable entry).
#[cfg(target_arch = "x86_64")]
pub(super) const MARKED_NOP: [u8; 5] = arch::NOP5;
#[cfg(target_arch = "aarch64")]
pub(super) const MARKED_NOP: [u8; 4] = arch::SITE_NOP;

/// Name of the section holding the records.
pub(crate) const SECTION: &str = "textpoke_sites";

/// Size of one record in bytes.
pub(crate) const RECORD_SIZE: usize = 12;

/// The record format's version (byte 9 of a record).
pub(crate) const RECORD_VERSION: u8 = 1;

/// Record kind of an entry site.
pub(crate) const KIND_ENTRY: u8 = 0;

/// Record kind of an exit site.
pub(crate) const KIND_EXIT: u8 = 1;

/// Which end of a marked function a site is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MarkedPoint {
    /// The first thing the function body does.
    Entry,
    /// The last thing the function does, on return or on unwinding.
    Exit,
}

/// What a `textpoke_sites` record says about a site
/// ([`SiteKind::Marked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Marked {
    /// Entry or exit.
    pub point: MarkedPoint,
    /// Runtime address of the function's [`MarkedFunction`] descriptor. The
    /// entry and exit sites of one function — of all its monomorphizations
    /// and inlined copies — share it: it is the function's identity.
    pub descriptor: usize,
    /// Runtime address of the record in `textpoke_sites`.
    pub record: usize,
}

/// The static descriptor of one function marked with `#[textpoke::traced]`
/// (see the [module docs](self) for its layout).
///
/// Built by the attribute only; its fields are private so that the layout
/// the sites layer reads from memory cannot be changed from outside.
#[repr(C)]
#[derive(Debug)]
pub struct MarkedFunction {
    magic: u32,
    version: u32,
    name: *const u8,
    name_len: usize,
}

// SAFETY: the descriptor is immutable; `name` points to a `&'static str`.
unsafe impl Sync for MarkedFunction {}

impl MarkedFunction {
    /// `"TPfn"` read as a little-endian `u32`.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"TPfn");
    /// The descriptor layout's version.
    pub const VERSION: u32 = 1;
    /// Size of the descriptor in bytes.
    pub const SIZE: usize = 24;

    /// The descriptor of the function called `name`. For the attribute's
    /// expansion only.
    #[doc(hidden)]
    pub const fn __new(name: &'static str) -> MarkedFunction {
        MarkedFunction { magic: Self::MAGIC, version: Self::VERSION, name: name.as_ptr(), name_len: name.len() }
    }

    /// The function's name.
    pub fn name(&self) -> &'static str {
        // SAFETY: built by `__new` from a `&'static str`.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.name, self.name_len)) }
    }
}

const _: () = assert!(std::mem::size_of::<MarkedFunction>() == MarkedFunction::SIZE);

/// The instruction of a marked site: one 5-byte NOP on x86-64, which the
/// sites layer patches into a `call` of a trampoline; on aarch64 one
/// `nop`, which the tracer swaps with `b stub` (NOP↔B, allowed while
/// other cores run it), the body stub branching back to the site + 4
/// (`arch/aarch64/body_stub.rs`). For [`__traced_site!`] only.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __traced_site_insn {
    () => {
        $crate::__nop5_asm!()
    };
}

/// See the x86-64 form.
#[cfg(target_arch = "aarch64")]
#[doc(hidden)]
#[macro_export]
macro_rules! __traced_site_insn {
    () => {
        "nop"
    };
}

/// One site of a marked function: its NOP ([`__traced_site_insn!`]) and
/// its record in `textpoke_sites` (see the
/// [`sites::marked`](crate::sites::marked) module docs). `$kind` is 0
/// (entry) or 1 (exit); `$desc` the path of the function's `static`
/// [`MarkedFunction`]. For the expansion of `#[textpoke::traced]` only.
#[doc(hidden)]
#[macro_export]
macro_rules! __traced_site {
    ($kind:literal, $desc:path) => {
        // SAFETY: the block executes one NOP; it reads and writes no
        // register and no memory. The sites layer only ever turns it into a
        // call (x86-64) or a branch (aarch64) to code that preserves every
        // register and the flags and that pushes or stores below the stack
        // pointer (aarch64 has no red zone, and moves it first), which is
        // why `nostack` and `preserves_flags` are not given. The record only
        // holds link-time constants.
        unsafe {
            ::core::arch::asm!(
                "2:",
                $crate::__traced_site_insn!(),
                ".pushsection textpoke_sites,\"aR\",@progbits",
                ".balign 4",
                ".long 2b - .",
                ".long {desc} - .",
                ".byte {kind}, 1, 0, 0",
                ".popsection",
                desc = sym $desc,
                kind = const $kind,
            )
        }
    };
}

/// One decoded record.
struct RawRecord {
    /// Runtime address of the record.
    at: usize,
    site: usize,
    descriptor: usize,
    kind: u8,
    version: u8,
}

fn decode(bytes: &[u8], at: usize) -> RawRecord {
    let rel = |off: usize| i32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as isize;
    RawRecord {
        at,
        site: at.wrapping_add_signed(rel(0)),
        descriptor: (at + 4).wrapping_add_signed(rel(4)),
        kind: bytes[8],
        version: bytes[9],
    }
}

impl<I: super::Image> super::Scan<'_, I> {
    /// The sites of a `textpoke_sites` section at runtime address `addr`,
    /// whose contents in the file are `file`. With [`RecordSource::Auto`]
    /// the records are read from memory and compared with the file.
    pub(super) fn marked(
        &self,
        addr: usize,
        file: &[u8],
        source: RecordSource,
    ) -> Result<(SectionReport, Vec<Found>), SitesError> {
        let count = file.len() / RECORD_SIZE;
        let memory = match source {
            RecordSource::Auto if count > 0 => {
                Some(self.read(addr, file.len()).ok_or_else(|| SitesError::BadSection {
                    path: self.path.to_path_buf(),
                    section: SECTION,
                    what: format!("{addr:#x}..{:#x} is not inside a readable loaded segment", addr + file.len()),
                })?)
            }
            _ => None,
        };
        let report = SectionReport {
            section: SECTION,
            records: count,
            from_memory: memory.is_some(),
            cross_checked: if memory.is_some() { count } else { 0 },
        };
        let results = (0..count)
            .map(|i| {
                let range = i * RECORD_SIZE..(i + 1) * RECORD_SIZE;
                let at = addr + range.start;
                let in_file = decode(&file[range.clone()], at);
                let Some(mem) = &memory else {
                    return self.marked_site(&in_file);
                };
                let in_memory = decode(&mem[range.clone()], at);
                if mem[range.clone()] != file[range] {
                    let reason = SkipReason::RecordMismatch { memory: in_memory.site, file: in_file.site };
                    return Err(self.marked_skip(&in_memory, reason));
                }
                self.marked_site(&in_memory)
            })
            .collect();
        Ok((report, results))
    }

    fn marked_skip(&self, raw: &RawRecord, reason: SkipReason) -> Miss {
        Miss { section: SECTION, record: raw.site, entry: None, function: String::new(), reason }
    }

    fn marked_site(&self, raw: &RawRecord) -> Result<Hit, Miss> {
        let mut skipped = self.marked_skip(raw, SkipReason::UnknownEntry);
        let point = match (raw.version, raw.kind) {
            (RECORD_VERSION, KIND_ENTRY) => MarkedPoint::Entry,
            (RECORD_VERSION, KIND_EXIT) => MarkedPoint::Exit,
            (version, kind) => {
                skipped.reason = SkipReason::BadRecord {
                    record: raw.at,
                    what: format!("version {version} kind {kind}, expected version {RECORD_VERSION} kind 0 or 1"),
                };
                return Err(skipped);
            }
        };
        // The machine function the site is in: the function itself, one of
        // its monomorphizations, or a caller it was inlined into.
        let containing = raw.site.checked_sub(self.bias).and_then(|link| self.symbols.containing(link as u64));
        let (entry, raw_symbol) = match containing {
            Some(sym) => (self.bias + sym.addr as usize, self.symbols.name(sym).into_owned()),
            None => (raw.site, String::new()),
        };
        skipped.entry = Some(entry);
        let function = self.descriptor_name(raw.descriptor).map_err(|what| {
            skipped.reason = SkipReason::BadDescriptor { addr: raw.descriptor, what };
            skipped.clone()
        })?;
        skipped.function = function.clone();
        if !self.in_code(raw.site, MARKED_NOP.len()) {
            skipped.reason = SkipReason::NotInCode { addr: raw.site };
            return Err(skipped);
        }
        let mut buf = [0u8; NOP_LEN as usize];
        let found = self.read_upto_into(raw.site, &mut buf[..MARKED_NOP.len()]);
        if found != MARKED_NOP {
            skipped.reason = SkipReason::UnexpectedBytes { addr: raw.site, found: found.to_vec() };
            return Err(skipped);
        }
        Ok(Hit {
            kind: SiteKind::Marked(Marked { point, descriptor: raw.descriptor, record: raw.at }),
            entry,
            nop_addr: raw.site,
            nop_form: NopForm::Single,
            function,
            raw_symbol,
        })
    }

    /// The name in the descriptor at `addr`, checked: magic and version, and
    /// the name inside a readable segment of this object, valid UTF-8.
    fn descriptor_name(&self, addr: usize) -> Result<String, String> {
        let bytes = self
            .read(addr, MarkedFunction::SIZE)
            .ok_or_else(|| "not inside a readable segment of the object".to_owned())?;
        let word = |off: usize, len: usize| {
            let mut w = [0u8; 8];
            w[..len].copy_from_slice(&bytes[off..off + len]);
            u64::from_le_bytes(w)
        };
        let (magic, version) = (word(0, 4) as u32, word(4, 4) as u32);
        if magic != MarkedFunction::MAGIC || version != MarkedFunction::VERSION {
            return Err(format!(
                "magic {magic:#x} version {version}, expected {:#x} version {}",
                MarkedFunction::MAGIC,
                MarkedFunction::VERSION
            ));
        }
        let stored = bytes[8..16].try_into().expect("8 bytes");
        let name = self.image.pointer(addr + 8, stored).ok_or_else(|| {
            format!("name pointer at {:#x} is relocated against a symbol the object does not define", addr + 8)
        })?;
        let len = word(16, 8) as usize;
        let name_bytes = if len == 0 {
            Vec::new()
        } else {
            self.read(name, len)
                .ok_or_else(|| format!("name {name:#x}+{len} is not inside a readable segment of the object"))?
        };
        String::from_utf8(name_bytes).map_err(|_| format!("name at {name:#x} is not UTF-8"))
    }
}
