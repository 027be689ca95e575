//! The patchable sites of an ELF file that is **not loaded** in this
//! process: what `textpoke list PROG` shows before anything runs.
//!
//! # What differs from a loaded object
//!
//! [`scan_object`](super::scan_object) reads the record arrays from memory
//! (where the loader applied every relocation) and checks the bytes at each
//! site in memory. Here there is no memory: everything comes from the file,
//! at link-time addresses.
//!
//! 1. The file is read whole and parsed with `object`; it must be an x86-64
//!    ELF executable or shared object.
//! 2. **Record values.** Each 8-byte record of `__patchable_function_entries`
//!    and `__mcount_loc` is the value stored in the section, unless a
//!    dynamic relocation applies to it: `R_X86_64_RELATIVE` gives its addend
//!    (lld stores zeros and relies on it), `R_X86_64_64` against a defined
//!    symbol the symbol's value plus the addend; against an undefined symbol
//!    or with another type the value is unknown and the record is skipped
//!    ([`SkipReason::RecordUnknown`]). RELR relocations keep the stored
//!    value, which is what the section holds. This is the
//!    [`RecordSource::File`](super::RecordSource::File) reading, done with
//!    `object`'s generic relocation iterator.
//! 3. **`textpoke_sites` records** are PC-relative and need no relocation;
//!    the name pointer in each function descriptor does (a RELATIVE
//!    relocation in a PIE), and is resolved as in step 2.
//! 4. **From a record to a site**, exactly as for a loaded object (see the
//!    [module docs](super)): a pad's entry is the symbol at the pad or the
//!    first one at most 255 bytes after it with only NOPs between (else the
//!    M the other pads agree on); an `__mcount_loc` NOP must be at its
//!    function's entry (or after `endbr64`); the site follows an `endbr64`.
//! 5. **The bytes at each site** are read from the file-backed part of the
//!    executable `PT_LOAD` segment that holds it and must be a NOP this
//!    layer knows ([`NopForm`]); anything else is a [`FileSkipped`] with the
//!    bytes found.
//!
//! Addresses in the result are link-time addresses (a PIE's are relative to
//! its load address).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object::read::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable};
use object::{Architecture, BinaryFormat, ObjectKind, RelocationFlags, RelocationTarget, SectionKind, SymbolKind};

use super::marked::{self, MarkedFunction, MarkedPoint};
use super::symbols::{demangle, FuncSym, Symbols};
use super::x86_64::{self, NopForm};
use super::{SitesError, SkipReason, MAX_PREFIX, NOP_LEN};

/// What kind of record a [`FileSite`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileSiteKind {
    /// `__patchable_function_entries`.
    PatchableEntry {
        /// Link-time address of the pad's first byte.
        pad_start: u64,
        /// M: pad bytes before the entry.
        entry_offset: u8,
    },
    /// `__mcount_loc`.
    Mcount,
    /// `textpoke_sites` (`#[textpoke::traced]`): the entry or exit site.
    Marked(MarkedPoint),
}

impl FileSiteKind {
    /// A short name: `patchable`, `mcount`, `traced-entry`, `traced-exit`.
    pub fn short_name(self) -> &'static str {
        match self {
            FileSiteKind::PatchableEntry { .. } => "patchable",
            FileSiteKind::Mcount => "mcount",
            FileSiteKind::Marked(MarkedPoint::Entry) => "traced-entry",
            FileSiteKind::Marked(MarkedPoint::Exit) => "traced-exit",
        }
    }
}

/// A patchable site found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSite {
    /// Where it was recorded.
    pub kind: FileSiteKind,
    /// Link-time address of the function's entry.
    pub entry: u64,
    /// Link-time address of the 5-byte NOP.
    pub nop_addr: u64,
    /// How the NOP is made.
    pub nop_form: NopForm,
    /// The function's name, demangled (for a marked site, the name in its
    /// descriptor); empty if no symbol names it.
    pub function: String,
    /// The symbol as in the symbol table; empty if none.
    pub raw_symbol: String,
}

/// A record that did not give a site, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSkipped {
    /// The section the record is in.
    pub section: &'static str,
    /// The record's value (link-time address), 0 when unknown.
    pub record: u64,
    /// The function's demangled name, when known.
    pub function: String,
    /// Why it is not a site.
    pub reason: SkipReason,
}

/// The sites of one ELF file.
#[derive(Clone, Debug)]
pub struct FileSites {
    /// The file.
    pub path: PathBuf,
    /// Patchable sites, by NOP address.
    pub sites: Vec<FileSite>,
    /// Records that are not sites.
    pub skipped: Vec<FileSkipped>,
    /// Each site section found and its number of records.
    pub sections: Vec<(&'static str, usize)>,
    /// Symbols came from `.dynsym` only: static functions are unnamed.
    pub dynsym_only: bool,
}

/// The section names looked for, pointer arrays first.
const ARRAYS: [&str; 2] = ["__patchable_function_entries", "__mcount_loc"];

/// Finds the patchable sites of the ELF file at `path` without loading it
/// (see the module docs).
pub fn scan_file(path: &Path) -> Result<FileSites, SitesError> {
    let p = || path.to_path_buf();
    let data = std::fs::read(path).map_err(|source| SitesError::Open { path: p(), source })?;
    let file = object::File::parse(&*data).map_err(|source| SitesError::Parse { path: p(), source })?;
    let unsupported = |what: String| SitesError::Unsupported { path: p(), what };
    if file.format() != BinaryFormat::Elf {
        return Err(unsupported(format!("{:?} file, not ELF", file.format())));
    }
    if file.architecture() != Architecture::X86_64 || !file.is_64() {
        return Err(unsupported(format!("{:?}, not x86-64", file.architecture())));
    }
    match file.kind() {
        ObjectKind::Executable | ObjectKind::Dynamic => {}
        k => return Err(unsupported(format!("{k:?} file, not an executable or a shared object"))),
    }
    let img = Image::new(&file);
    let mut out =
        FileSites { path: p(), sites: Vec::new(), skipped: Vec::new(), sections: Vec::new(), dynsym_only: false };
    let mut arrays = Vec::new();
    for name in ARRAYS {
        let Some(sec) = file.section_by_name(name) else {
            continue;
        };
        let bad = |what: String| SitesError::BadSection { path: p(), section: name, what };
        let size = sec.size();
        if size % 8 != 0 {
            return Err(bad(format!("size {size} is not a multiple of 8")));
        }
        let contents: &[u8] = if sec.kind() == SectionKind::UninitializedData {
            &[]
        } else {
            sec.data().map_err(|e| bad(format!("cannot read contents: {e}")))?
        };
        let values: Vec<Option<u64>> = (0..size / 8)
            .map(|i| img.pointer(sec.address() + 8 * i, contents.get(8 * i as usize..8 * i as usize + 8)))
            .collect();
        out.sections.push((name, values.len()));
        arrays.push((name, values));
    }
    let marked_sec = file.section_by_name(marked::SECTION);
    if let Some(sec) = &marked_sec {
        let bad = |what: String| SitesError::BadSection { path: p(), section: marked::SECTION, what };
        if sec.size() % marked::RECORD_SIZE as u64 != 0 {
            return Err(bad(format!("size {} is not a multiple of {}", sec.size(), marked::RECORD_SIZE)));
        }
        out.sections.push((marked::SECTION, (sec.size() / marked::RECORD_SIZE as u64) as usize));
    }
    if out.sections.is_empty() {
        return Ok(out);
    }
    let (symbols, dynsym_only) = func_symbols(&file);
    out.dynsym_only = dynsym_only;
    let scan = Scan { img: &img, symbols: &symbols };
    for (name, values) in arrays {
        let mut located = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            match v {
                Some(v) => located.push(v),
                None => out.skipped.push(FileSkipped {
                    section: name,
                    record: 0,
                    function: String::new(),
                    reason: SkipReason::RecordUnknown { index: i },
                }),
            }
        }
        let results: Vec<Result<FileSite, FileSkipped>> = if name == ARRAYS[0] {
            scan.patchable_entries(&located)
        } else {
            located.iter().map(|&n| scan.mcount(n)).collect()
        };
        for r in results {
            match r {
                Ok(s) => out.sites.push(s),
                Err(s) => out.skipped.push(s),
            }
        }
    }
    if let Some(sec) = marked_sec {
        let contents = sec.data().map_err(|source| SitesError::Parse { path: p(), source })?;
        for (i, rec) in contents.chunks_exact(marked::RECORD_SIZE).enumerate() {
            let at = sec.address() + (i * marked::RECORD_SIZE) as u64;
            match scan.marked(at, rec) {
                Ok(s) => out.sites.push(s),
                Err(s) => out.skipped.push(s),
            }
        }
    }
    out.sites.sort_by_key(|s| (s.nop_addr, s.entry));
    out.skipped.sort_by_key(|s| (s.section, s.record));
    Ok(out)
}

/// The function symbols: `.symtab`, else `.dynsym`.
fn func_symbols(file: &object::File<'_>) -> (Symbols, bool) {
    let collect = |syms: &mut dyn Iterator<Item = object::Symbol<'_, '_>>| -> Vec<FuncSym> {
        syms.filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
            .filter_map(|s| {
                let name = s.name().ok()?.to_string();
                let rank = if s.is_global() && !s.is_weak() {
                    0
                } else if s.is_weak() {
                    1
                } else {
                    2
                };
                Some(FuncSym { addr: s.address(), size: s.size(), name, rank })
            })
            .collect()
    };
    let from_symtab = collect(&mut file.symbols());
    if !from_symtab.is_empty() {
        return (Symbols::new(from_symtab), false);
    }
    (Symbols::new(collect(&mut file.dynamic_symbols())), true)
}

/// The file's loadable image at link-time addresses.
struct Image<'d> {
    /// `(vaddr, file bytes, executable)` of each `PT_LOAD` segment.
    segments: Vec<(u64, &'d [u8], bool)>,
    /// Dynamic relocations by place: the value they give, `None` when only
    /// the loader can know it.
    relocs: HashMap<u64, Option<u64>>,
}

impl<'d> Image<'d> {
    fn new(file: &object::File<'d>) -> Image<'d> {
        let segments = file
            .segments()
            .filter_map(|s| {
                let exec = match s.flags() {
                    object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                    _ => false,
                };
                Some((s.address(), s.data().ok()?, exec))
            })
            .collect();
        let mut relocs = HashMap::new();
        let dynsyms = file.dynamic_symbol_table();
        for (place, r) in file.dynamic_relocations().into_iter().flatten() {
            let r_type = match r.flags() {
                RelocationFlags::Elf { r_type } => r_type,
                _ => continue,
            };
            let value = match r_type {
                object::elf::R_X86_64_NONE => continue,
                object::elf::R_X86_64_RELATIVE if !r.has_implicit_addend() => Some(r.addend() as u64),
                // REL form: the stored value is the addend.
                object::elf::R_X86_64_RELATIVE => continue,
                object::elf::R_X86_64_64 if !r.has_implicit_addend() => match (r.target(), &dynsyms) {
                    (RelocationTarget::Symbol(i), Some(t)) => t
                        .symbol_by_index(i)
                        .ok()
                        .filter(|s| s.is_definition())
                        .map(|s| s.address().wrapping_add(r.addend() as u64)),
                    _ => None,
                },
                _ => None,
            };
            relocs.insert(place, value);
        }
        Image { segments, relocs }
    }

    /// The link-time value of the pointer at `place`, whose stored bytes
    /// are `stored`.
    fn pointer(&self, place: u64, stored: Option<&[u8]>) -> Option<u64> {
        if let Some(v) = self.relocs.get(&place) {
            return *v;
        }
        Some(u64::from_le_bytes(stored?.try_into().ok()?))
    }

    /// `len` file-backed bytes at `addr`, inside one segment.
    fn read(&self, addr: u64, len: usize) -> Option<&'d [u8]> {
        self.segments.iter().find_map(|&(vaddr, bytes, _)| {
            let off = usize::try_from(addr.checked_sub(vaddr)?).ok()?;
            bytes.get(off..off.checked_add(len)?)
        })
    }

    /// Up to `max` bytes at `addr`, stopping at the end of its segment's
    /// file-backed part.
    fn read_upto(&self, addr: u64, max: usize) -> &'d [u8] {
        self.segments
            .iter()
            .find_map(|&(vaddr, bytes, _)| {
                let off = usize::try_from(addr.checked_sub(vaddr)?).ok()?;
                let rest = bytes.get(off..)?;
                (!rest.is_empty()).then(|| &rest[..rest.len().min(max)])
            })
            .unwrap_or(&[])
    }

    fn in_code(&self, addr: u64, len: usize) -> bool {
        self.segments.iter().any(|&(vaddr, bytes, exec)| {
            exec && addr >= vaddr && addr.checked_add(len as u64).is_some_and(|end| end <= vaddr + bytes.len() as u64)
        })
    }
}

struct Scan<'a, 'd> {
    img: &'a Image<'d>,
    symbols: &'a Symbols,
}

impl Scan<'_, '_> {
    fn name_of(&self, addr: u64) -> (String, String) {
        match self.symbols.starting_at(addr) {
            Some(s) => (demangle(&s.name), s.name.clone()),
            None => (String::new(), String::new()),
        }
    }

    fn patchable_entries(&self, pads: &[u64]) -> Vec<Result<FileSite, FileSkipped>> {
        let entries: Vec<Option<u64>> = pads.iter().map(|&p| self.entry_of_pad(p)).collect();
        let mut ms = entries.iter().zip(pads).filter_map(|(e, p)| e.map(|e| e - p));
        let consensus = ms.next().filter(|&m| ms.all(|x| x == m));
        pads.iter()
            .zip(entries)
            .map(|(&p, entry)| {
                let entry = entry.or_else(|| {
                    let m = consensus?;
                    (m == 0 || self.img.read(p, m as usize).is_some_and(x86_64::all_nops)).then_some(p + m)
                });
                self.pad_site(p, entry)
            })
            .collect()
    }

    fn entry_of_pad(&self, p: u64) -> Option<u64> {
        if self.symbols.starting_at(p).is_some() {
            return Some(p);
        }
        let sym = self.symbols.first_in(p, MAX_PREFIX as u64)?;
        let m = sym.addr - p;
        let between = self.img.read(p, m as usize)?;
        x86_64::all_nops(between).then_some(p + m)
    }

    fn pad_site(&self, p: u64, entry: Option<u64>) -> Result<FileSite, FileSkipped> {
        let mut skipped =
            FileSkipped { section: ARRAYS[0], record: p, function: String::new(), reason: SkipReason::UnknownEntry };
        if !self.img.in_code(p, 1) {
            skipped.reason = SkipReason::NotInCode { addr: p as usize };
            return Err(skipped);
        }
        let Some(entry) = entry else {
            return Err(skipped);
        };
        let (function, raw_symbol) = self.name_of(entry);
        skipped.function = function.clone();
        let m = (entry - p) as usize;
        let (nop_addr, nop_form) = self.nop_at_entry(entry, MAX_PREFIX - m).map_err(|reason| {
            skipped.reason = reason;
            skipped.clone()
        })?;
        Ok(FileSite {
            kind: FileSiteKind::PatchableEntry { pad_start: p, entry_offset: m as u8 },
            entry,
            nop_addr,
            nop_form,
            function,
            raw_symbol,
        })
    }

    fn nop_at_entry(&self, entry: u64, max: usize) -> Result<(u64, NopForm), SkipReason> {
        let head = self.img.read_upto(entry, 4);
        let nop_addr = if x86_64::starts_with_endbr64(head) { entry + 4 } else { entry };
        let bytes = self.img.read_upto(nop_addr, max.max(NOP_LEN as usize));
        self.check_nop(nop_addr, bytes).map(|form| (nop_addr, form))
    }

    fn check_nop(&self, addr: u64, bytes: &[u8]) -> Result<NopForm, SkipReason> {
        if !self.img.in_code(addr, NOP_LEN as usize) {
            return Err(SkipReason::NotInCode { addr: addr as usize });
        }
        let found = &bytes[..bytes.len().min(NOP_LEN as usize)];
        if let Some(form) = x86_64::classify(found) {
            return Ok(form);
        }
        let nops = x86_64::nop_run_len(bytes);
        if nops > 0 && nops < NOP_LEN as usize {
            return Err(SkipReason::PadTooShort { addr: addr as usize, nops });
        }
        Err(SkipReason::UnexpectedBytes { addr: addr as usize, found: found.to_vec() })
    }

    fn mcount(&self, n: u64) -> Result<FileSite, FileSkipped> {
        let mut skipped = FileSkipped {
            section: ARRAYS[1],
            record: n,
            function: String::new(),
            reason: SkipReason::NotInCode { addr: n as usize },
        };
        if !self.img.in_code(n, NOP_LEN as usize) {
            return Err(skipped);
        }
        let endbr_before =
            || n.checked_sub(4).and_then(|e| self.img.read(e, 4)).is_some_and(x86_64::starts_with_endbr64);
        let (entry, function, raw_symbol) = match self.symbols.containing(n) {
            Some(sym) => {
                let offset = n - sym.addr;
                skipped.function = demangle(&sym.name);
                if offset != 0 && !(offset == 4 && endbr_before()) {
                    skipped.reason = SkipReason::NotAtEntry { offset: offset as usize };
                    return Err(skipped);
                }
                (sym.addr, skipped.function.clone(), sym.name.clone())
            }
            None if endbr_before() => (n - 4, String::new(), String::new()),
            None => (n, String::new(), String::new()),
        };
        let bytes = self.img.read_upto(n, NOP_LEN as usize);
        let nop_form = self.check_nop(n, bytes).map_err(|reason| {
            skipped.reason = reason;
            skipped.clone()
        })?;
        Ok(FileSite { kind: FileSiteKind::Mcount, entry, nop_addr: n, nop_form, function, raw_symbol })
    }

    /// One `textpoke_sites` record at link-time address `at`.
    fn marked(&self, at: u64, rec: &[u8]) -> Result<FileSite, FileSkipped> {
        let rel = |off: usize| i32::from_le_bytes([rec[off], rec[off + 1], rec[off + 2], rec[off + 3]]) as i64;
        let site = at.wrapping_add_signed(rel(0));
        let descriptor = (at + 4).wrapping_add_signed(rel(4));
        let (kind, version) = (rec[8], rec[9]);
        let mut skipped = FileSkipped {
            section: marked::SECTION,
            record: site,
            function: String::new(),
            reason: SkipReason::UnknownEntry,
        };
        let point = match (version, kind) {
            (marked::RECORD_VERSION, marked::KIND_ENTRY) => MarkedPoint::Entry,
            (marked::RECORD_VERSION, marked::KIND_EXIT) => MarkedPoint::Exit,
            (version, kind) => {
                skipped.reason = SkipReason::BadRecord {
                    record: at as usize,
                    what: format!(
                        "version {version} kind {kind}, expected version {} kind 0 or 1",
                        marked::RECORD_VERSION
                    ),
                };
                return Err(skipped);
            }
        };
        let (entry, raw_symbol) = match self.symbols.containing(site) {
            Some(sym) => (sym.addr, sym.name.clone()),
            None => (site, String::new()),
        };
        let function = self.descriptor_name(descriptor).map_err(|what| {
            skipped.reason = SkipReason::BadDescriptor { addr: descriptor as usize, what };
            skipped.clone()
        })?;
        skipped.function = function.clone();
        if !self.img.in_code(site, NOP_LEN as usize) {
            skipped.reason = SkipReason::NotInCode { addr: site as usize };
            return Err(skipped);
        }
        let found = self.img.read_upto(site, NOP_LEN as usize);
        if x86_64::classify(found) != Some(NopForm::Single) {
            skipped.reason = SkipReason::UnexpectedBytes { addr: site as usize, found: found.to_vec() };
            return Err(skipped);
        }
        Ok(FileSite {
            kind: FileSiteKind::Marked(point),
            entry,
            nop_addr: site,
            nop_form: NopForm::Single,
            function,
            raw_symbol,
        })
    }

    fn descriptor_name(&self, addr: u64) -> Result<String, String> {
        let bytes = self
            .img
            .read(addr, MarkedFunction::SIZE)
            .ok_or_else(|| "not inside the file-backed part of a loadable segment".to_owned())?;
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
        let name = self
            .img
            .pointer(addr + 8, Some(&bytes[8..16]))
            .ok_or_else(|| "its name pointer is relocated against a symbol only the loader knows".to_owned())?;
        let len = word(16, 8) as usize;
        if len > 1 << 16 {
            return Err(format!("name length {len} is implausible"));
        }
        let name_bytes =
            self.img.read(name, len).ok_or_else(|| format!("name {name:#x}+{len} is not inside the file"))?;
        String::from_utf8(name_bytes.to_vec()).map_err(|_| format!("name at {name:#x} is not UTF-8"))
    }
}
