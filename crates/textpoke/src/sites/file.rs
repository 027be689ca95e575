//! The patchable functions of an ELF file on disk, without loading it.
//!
//! [`scan_file`] answers "what could textpoke trace in this program?"
//! before anything runs (`textpoke list PROG`, and `textpoke record`'s
//! check that a program has sites at all). It reads the same three
//! sections as [`scan_object`](super::scan_object) — but from the file
//! only, so what the loader would compute is computed here:
//!
//! - a record of `__patchable_function_entries` or `__mcount_loc` is the
//!   8 bytes stored in the section, unless a dynamic relocation of the
//!   file targets it: `R_X86_64_RELATIVE` gives its addend (GNU ld stores
//!   the value as well, lld stores zeros), `R_X86_64_64` against a symbol
//!   the file defines gives the symbol plus the addend, and any other
//!   relocation (against a symbol of another object) makes the record
//!   unknown. `.relr.dyn` entries keep the stored value, so they need no
//!   handling;
//! - a `textpoke_sites` record is PC-relative and needs nothing; the
//!   function's name is the string its descriptor points to (a pointer
//!   relocated like a record), else the symbol containing the site.
//!
//! Addresses are link-time addresses (what `nm` and `objdump` show). Code
//! bytes come from the file's `PT_LOAD` segments, and each site is checked
//! exactly as in memory: a known NOP at the entry (after `endbr64`), in an
//! executable segment. A site that fails a check is reported in
//! [`FileSites::skipped`] with the reason; none is dropped silently.
//!
//! The file is read through `object`'s `ReadCache` (only the byte ranges
//! asked for), so a large library without site sections costs a few small
//! reads.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::read::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, RelocationFlags, RelocationTarget};
use object::{Endianness, FileKind, SymbolKind};

use super::elf::RecordKind;
use super::marked::{self, MarkedFunction, MarkedPoint};
use super::symbols::{FuncSym, Symbols};
use super::{demangle, x86_64, NopForm, SitesError, SkipReason, MAX_PREFIX, NOP_LEN};

/// One patchable function (or, for `#[textpoke::traced]`, one entry or
/// exit site) found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSite {
    /// The section the record is in.
    pub section: &'static str,
    /// The function's name, demangled; empty if no symbol names it.
    pub function: String,
    /// The symbol as in the symbol table; empty if none.
    pub raw_symbol: String,
    /// Link-time address of the function's entry.
    pub entry: u64,
    /// Link-time address of the 5-byte NOP.
    pub nop_addr: u64,
    /// How the NOP is made.
    pub nop_form: NopForm,
    /// For `textpoke_sites`: entry or exit site.
    pub marked: Option<MarkedPoint>,
}

/// A record of a file that is not a patchable site, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSkipped {
    /// The section the record is in.
    pub section: &'static str,
    /// The record's value (link-time address), when known.
    pub record: u64,
    /// The function's demangled name, when known.
    pub function: String,
    /// Why it is not a site (addresses in it are link-time).
    pub reason: SkipReason,
}

/// What [`scan_file`] found.
#[derive(Clone, Debug)]
pub struct FileSites {
    /// The file.
    pub path: PathBuf,
    /// `ET_DYN` (PIE or shared object) rather than `ET_EXEC`.
    pub position_independent: bool,
    /// The program interpreter (`PT_INTERP`), if any: a file without one
    /// is statically linked (or a shared library).
    pub interpreter: Option<PathBuf>,
    /// The site sections present, with their record counts.
    pub sections: Vec<(&'static str, usize)>,
    /// Patchable sites, by NOP address.
    pub sites: Vec<FileSite>,
    /// Records that are not patchable sites.
    pub skipped: Vec<FileSkipped>,
    /// Symbols came from `.dynsym` only (`.symtab` stripped).
    pub dynsym_only: bool,
}

impl FileSites {
    /// The distinct function names of the sites (sorted; unnamed sites
    /// left out).
    pub fn function_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.sites.iter().filter(|s| !s.function.is_empty()).map(|s| s.function.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

type Elf64<'a> = ElfFile64<'a, Endianness, &'a ReadCache<File>>;

/// Finds the patchable sites of the ELF file at `path` (see the module
/// docs). A file without site sections gives an empty result; a file that
/// is not a 64-bit x86-64 ELF executable or shared object is an error.
pub fn scan_file(path: &Path) -> Result<FileSites, SitesError> {
    let file = File::open(path).map_err(|source| SitesError::Open { path: path.to_path_buf(), source })?;
    let cache = ReadCache::new(file);
    let parse = |source| SitesError::Parse { path: path.to_path_buf(), source };
    let unsupported = |what: String| SitesError::Unsupported { path: path.to_path_buf(), what };
    match FileKind::parse(&cache) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => return Err(unsupported("a 32-bit ELF file; textpoke handles x86-64".into())),
        Ok(kind) => return Err(unsupported(format!("not an ELF file ({kind:?})"))),
        Err(_) => return Err(unsupported("not an ELF file".into())),
    }
    let elf: Elf64<'_> = ElfFile64::parse(&cache).map_err(parse)?;
    let endian = elf.endian();
    let header = elf.elf_header();
    use object::read::elf::FileHeader;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(unsupported(format!("e_machine {}, not x86-64", header.e_machine(endian))));
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
        return Err(unsupported(format!("e_type {e_type}, not an executable or shared object")));
    }
    let interpreter = elf
        .elf_program_headers()
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_INTERP)
        .and_then(|p| p.data(endian, elf.data()).ok())
        .map(|bytes| {
            let s = bytes.split(|&b| b == 0).next().unwrap_or_default();
            PathBuf::from(String::from_utf8_lossy(s).into_owned())
        });
    let mut out = FileSites {
        path: path.to_path_buf(),
        position_independent: e_type == elf::ET_DYN,
        interpreter,
        sections: Vec::new(),
        sites: Vec::new(),
        skipped: Vec::new(),
        dynsym_only: false,
    };
    let kinds = [RecordKind::PatchableEntry, RecordKind::Mcount, RecordKind::Marked];
    let found: Vec<_> = kinds.iter().filter_map(|&k| elf.section_by_name(k.section_name()).map(|s| (k, s))).collect();
    if found.is_empty() {
        return Ok(out);
    }
    let image = Image::new(&elf);
    let mut symbols = image.func_symbols(false);
    if symbols.is_empty() {
        symbols = image.func_symbols(true);
        out.dynsym_only = true;
    }
    let scan = FileScan { image: &image, symbols: &Symbols::new(symbols) };
    for (kind, section) in found {
        let name = kind.section_name();
        let bad = |what: String| SitesError::BadSection { path: path.to_path_buf(), section: name, what };
        let data = section.data().map_err(|e| bad(format!("cannot read contents: {e}")))?;
        let size = kind.record_size() as usize;
        if data.len() % size != 0 {
            return Err(bad(format!("size {} is not a multiple of {size}", data.len())));
        }
        out.sections.push((name, data.len() / size));
        let results: Vec<Result<FileSite, FileSkipped>> = match kind {
            RecordKind::Marked => (0..data.len() / size)
                .map(|i| scan.marked(section.address() + (i * size) as u64, &data[i * size..(i + 1) * size]))
                .collect(),
            _ => {
                let mut results = Vec::new();
                let mut located = Vec::new();
                for i in 0..data.len() / size {
                    let at = section.address() + (i * size) as u64;
                    match image.pointer(at, &data[i * size..(i + 1) * size]) {
                        Some(v) => located.push(v),
                        None => results.push(Err(FileSkipped {
                            section: name,
                            record: 0,
                            function: String::new(),
                            reason: SkipReason::RecordUnknown { index: i },
                        })),
                    }
                }
                match kind {
                    RecordKind::PatchableEntry => results.extend(scan.pads(&located)),
                    _ => results.extend(located.iter().map(|&n| scan.mcount(n))),
                }
                results
            }
        };
        for r in results {
            match r {
                Ok(site) => out.sites.push(site),
                Err(skip) => out.skipped.push(skip),
            }
        }
    }
    out.sites.sort_by_key(|s| (s.nop_addr, s.entry));
    out.skipped.sort_by_key(|s| (s.section, s.record));
    Ok(out)
}

/// A relocated pointer value in the file, by link-time address.
#[derive(Clone, Copy)]
enum Reloc {
    Value(u64),
    Unknown,
}

/// The file's loadable image: segments, dynamic relocations, symbols.
struct Image<'a> {
    elf: &'a Elf64<'a>,
    /// (vaddr, memsz, executable) of each `PT_LOAD`.
    segments: Vec<(u64, u64, bool)>,
    relocs: HashMap<u64, Reloc>,
}

impl<'a> Image<'a> {
    fn new(elf: &'a Elf64<'a>) -> Image<'a> {
        let endian = elf.endian();
        let segments = elf
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .map(|p| (p.p_vaddr(endian), p.p_memsz(endian), p.p_flags(endian) & elf::PF_X != 0))
            .collect();
        let mut relocs = HashMap::new();
        let dynsyms = elf.dynamic_symbol_table();
        for (offset, r) in elf.dynamic_relocations().into_iter().flatten() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                continue;
            };
            let value = match r_type {
                elf::R_X86_64_NONE => continue,
                elf::R_X86_64_RELATIVE => Reloc::Value(r.addend() as u64),
                elf::R_X86_64_64 => match r.target() {
                    RelocationTarget::Symbol(index) => dynsyms
                        .as_ref()
                        .and_then(|t| {
                            use object::read::ObjectSymbolTable;
                            t.symbol_by_index(index).ok()
                        })
                        .filter(|s| s.is_definition())
                        .map_or(Reloc::Unknown, |s| Reloc::Value(s.address().wrapping_add(r.addend() as u64))),
                    RelocationTarget::Absolute => Reloc::Value(r.addend() as u64),
                    _ => Reloc::Unknown,
                },
                _ => Reloc::Unknown,
            };
            relocs.insert(offset, value);
        }
        Image { elf, segments, relocs }
    }

    /// The pointer stored at link-time address `at`, whose 8 bytes in the
    /// file are `stored`, after the file's dynamic relocations.
    fn pointer(&self, at: u64, stored: &[u8]) -> Option<u64> {
        match self.relocs.get(&at) {
            Some(Reloc::Value(v)) => Some(*v),
            Some(Reloc::Unknown) => None,
            None => Some(u64::from_le_bytes(stored.get(..8)?.try_into().ok()?)),
        }
    }

    /// Up to `len` bytes at link-time address `addr` from the segment that
    /// holds it (fewer at the segment's end; zeros past its file part).
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let seg = self.elf.segments().find(|s| s.address() <= addr && addr < s.address() + s.size())?;
        let len = (len as u64).min(seg.address() + seg.size() - addr);
        let mut out = vec![0u8; len as usize];
        if let Ok(data) = seg.data() {
            let start = (addr - seg.address()) as usize;
            if start < data.len() {
                let n = (data.len() - start).min(out.len());
                out[..n].copy_from_slice(&data[start..start + n]);
            }
        }
        Some(out)
    }

    fn in_code(&self, addr: u64, len: u64) -> bool {
        self.segments.iter().any(|&(v, m, x)| x && addr >= v && addr.saturating_add(len) <= v.saturating_add(m))
    }

    fn in_image(&self, addr: u64, len: u64) -> bool {
        self.segments.iter().any(|&(v, m, _)| addr >= v && addr.saturating_add(len) <= v.saturating_add(m))
    }

    /// Function symbols of `.symtab` (or `.dynsym` when `dynamic`).
    fn func_symbols(&self, dynamic: bool) -> Vec<FuncSym> {
        let syms: Vec<_> = if dynamic { self.elf.dynamic_symbols().collect() } else { self.elf.symbols().collect() };
        syms.into_iter()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
            .filter_map(|s| {
                let name = s.name().ok()?.to_owned();
                let rank = if s.is_global() {
                    0
                } else if s.is_weak() {
                    1
                } else {
                    2
                };
                Some(FuncSym { addr: s.address(), size: s.size(), name, rank })
            })
            .collect()
    }
}

struct FileScan<'a> {
    image: &'a Image<'a>,
    symbols: &'a Symbols,
}

impl FileScan<'_> {
    fn skip(&self, section: &'static str, record: u64, function: &str, reason: SkipReason) -> FileSkipped {
        FileSkipped { section, record, function: function.to_owned(), reason }
    }

    fn name_at(&self, entry: u64) -> (String, String) {
        self.symbols.starting_at(entry).map_or((String::new(), String::new()), |s| (demangle(&s.name), s.name.clone()))
    }

    /// The NOP at `entry` (after `endbr64`): its address, form and run length.
    fn nop_at_entry(&self, entry: u64, max: usize) -> Result<(u64, NopForm, usize), SkipReason> {
        let head = self.image.read(entry, 4).unwrap_or_default();
        let nop_addr = if x86_64::starts_with_endbr64(&head) { entry + 4 } else { entry };
        if !self.image.in_code(nop_addr, NOP_LEN as u64) {
            return Err(SkipReason::NotInCode { addr: nop_addr as usize });
        }
        let bytes = self.image.read(nop_addr, max.max(NOP_LEN as usize)).unwrap_or_default();
        let found = &bytes[..bytes.len().min(NOP_LEN as usize)];
        if let Some(form) = x86_64::classify(found) {
            return Ok((nop_addr, form, x86_64::nop_run_len(&bytes)));
        }
        let nops = x86_64::nop_run_len(&bytes);
        if nops > 0 && nops < NOP_LEN as usize {
            return Err(SkipReason::PadTooShort { addr: nop_addr as usize, nops });
        }
        Err(SkipReason::UnexpectedBytes { addr: nop_addr as usize, found: found.to_vec() })
    }

    /// The entry of the function whose pad starts at `p`, if a symbol
    /// shows it.
    fn entry_of_pad(&self, p: u64) -> Option<u64> {
        if self.symbols.starting_at(p).is_some() {
            return Some(p);
        }
        let sym = self.symbols.first_in(p, MAX_PREFIX as u64)?;
        let between = self.image.read(p, (sym.addr - p) as usize)?;
        x86_64::all_nops(&between).then_some(sym.addr)
    }

    /// `__patchable_function_entries` records (pad starts). A pad no symbol
    /// shows (a static function of a stripped file) takes the M of all the
    /// other pads when they agree, as in memory.
    fn pads(&self, pads: &[u64]) -> Vec<Result<FileSite, FileSkipped>> {
        let entries: Vec<Option<u64>> = pads.iter().map(|&p| self.entry_of_pad(p)).collect();
        let mut ms = entries.iter().zip(pads).filter_map(|(e, p)| e.map(|e| e - p));
        let consensus = ms.next().filter(|&m| ms.all(|x| x == m));
        pads.iter()
            .zip(entries)
            .map(|(&p, entry)| {
                let entry = entry.or_else(|| {
                    let m = consensus?;
                    (m == 0 || self.image.read(p, m as usize).is_some_and(|b| x86_64::all_nops(&b))).then_some(p + m)
                });
                self.pad(p, entry)
            })
            .collect()
    }

    /// The site of the pad starting at `p` whose function starts at `entry`.
    fn pad(&self, p: u64, entry: Option<u64>) -> Result<FileSite, FileSkipped> {
        let section = RecordKind::PatchableEntry.section_name();
        if !self.image.in_code(p, 1) {
            return Err(self.skip(section, p, "", SkipReason::NotInCode { addr: p as usize }));
        }
        let Some(entry) = entry else {
            return Err(self.skip(section, p, "", SkipReason::UnknownEntry));
        };
        let (function, raw_symbol) = self.name_at(entry);
        let m = (entry - p) as usize;
        let (nop_addr, nop_form, _) =
            self.nop_at_entry(entry, MAX_PREFIX - m).map_err(|r| self.skip(section, p, &function, r))?;
        Ok(FileSite { section, function, raw_symbol, entry, nop_addr, nop_form, marked: None })
    }

    /// A `__mcount_loc` record: the NOP at `n`.
    fn mcount(&self, n: u64) -> Result<FileSite, FileSkipped> {
        let section = RecordKind::Mcount.section_name();
        if !self.image.in_code(n, NOP_LEN as u64) {
            return Err(self.skip(section, n, "", SkipReason::NotInCode { addr: n as usize }));
        }
        let endbr_before = n >= 4 && self.image.read(n - 4, 4).is_some_and(|b| x86_64::starts_with_endbr64(&b));
        let (entry, function, raw_symbol) = match self.symbols.containing(n) {
            Some(sym) => {
                let offset = n - sym.addr;
                let function = demangle(&sym.name);
                if offset != 0 && !(offset == 4 && endbr_before) {
                    let reason = SkipReason::NotAtEntry { offset: offset as usize };
                    return Err(self.skip(section, n, &function, reason));
                }
                (sym.addr, function, sym.name.clone())
            }
            None if endbr_before => (n - 4, String::new(), String::new()),
            None => (n, String::new(), String::new()),
        };
        let (nop_addr, nop_form, _) =
            self.nop_at_entry(entry, NOP_LEN as usize).map_err(|r| self.skip(section, n, &function, r))?;
        Ok(FileSite { section, function, raw_symbol, entry, nop_addr, nop_form, marked: None })
    }

    /// A `textpoke_sites` record at link-time address `at`.
    fn marked(&self, at: u64, bytes: &[u8]) -> Result<FileSite, FileSkipped> {
        let section = marked::SECTION;
        let rel = |off: usize| i32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as i64;
        let site = at.wrapping_add_signed(rel(0));
        let descriptor = (at + 4).wrapping_add_signed(rel(4));
        let point = match (bytes[9], bytes[8]) {
            (marked::RECORD_VERSION, marked::KIND_ENTRY) => MarkedPoint::Entry,
            (marked::RECORD_VERSION, marked::KIND_EXIT) => MarkedPoint::Exit,
            (version, kind) => {
                let what = format!("version {version} kind {kind}");
                return Err(self.skip(section, site, "", SkipReason::BadRecord { record: at as usize, what }));
            }
        };
        let containing = self.symbols.containing(site);
        let (entry, raw_symbol) = containing.map_or((site, String::new()), |s| (s.addr, s.name.clone()));
        let function =
            self.descriptor_name(descriptor).or_else(|| containing.map(|s| demangle(&s.name))).unwrap_or_default();
        if !self.image.in_code(site, NOP_LEN as u64) {
            return Err(self.skip(section, site, &function, SkipReason::NotInCode { addr: site as usize }));
        }
        let found = self.image.read(site, NOP_LEN as usize).unwrap_or_default();
        if x86_64::classify(&found) != Some(NopForm::Single) {
            let reason = SkipReason::UnexpectedBytes { addr: site as usize, found };
            return Err(self.skip(section, site, &function, reason));
        }
        Ok(FileSite {
            section,
            function,
            raw_symbol,
            entry,
            nop_addr: site,
            nop_form: NopForm::Single,
            marked: Some(point),
        })
    }

    /// The name in the `MarkedFunction` descriptor at `addr`, if it checks.
    fn descriptor_name(&self, addr: u64) -> Option<String> {
        if !self.image.in_image(addr, MarkedFunction::SIZE as u64) {
            return None;
        }
        let d = self.image.read(addr, MarkedFunction::SIZE)?;
        let word = |off: usize| u32::from_le_bytes(d[off..off + 4].try_into().expect("4 bytes"));
        if word(0) != MarkedFunction::MAGIC || word(4) != MarkedFunction::VERSION {
            return None;
        }
        let name = self.image.pointer(addr + 8, &d[8..16])?;
        let len = u64::from_le_bytes(d[16..24].try_into().expect("8 bytes"));
        if len > 4096 || !self.image.in_image(name, len) {
            return None;
        }
        String::from_utf8(self.image.read(name, len as usize)?).ok()
    }
}
