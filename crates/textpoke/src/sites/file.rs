//! The patchable functions of an ELF file on disk, without loading it.
//!
//! [`scan_file`] answers "what could textpoke trace in this program?"
//! before anything runs (`textpoke list PROG`, and `textpoke record`'s
//! check that a program has sites at all). It is the scan of
//! [`scan_object`](super::scan_object) with
//! [`RecordSource::File`] — the same code reads
//! the records, applies the file's dynamic relocations to them
//! (`elf::Relocs`), infers pads and NOP forms and decodes `textpoke_sites`
//! records — run over the file's `PT_LOAD` segments (zeros past a segment's
//! file part) instead of memory, with a bias of 0:
//!
//! - a record of `__patchable_function_entries` or `__mcount_loc` whose
//!   value only the loader knows (relocated against a symbol of another
//!   object) is skipped as [`SkipReason::RecordUnknown`];
//! - the name in a `#[textpoke::traced]` descriptor is a pointer, relocated
//!   by the same rule.
//!
//! Addresses are link-time addresses (what `nm` and `objdump` show). A site
//! that fails a check is reported in [`FileSites::skipped`] with the reason;
//! none is dropped silently.
//!
//! The file is read through `object`'s `ReadCache` (only the byte ranges
//! asked for), so a large library without site sections costs a few small
//! reads.
//!
//! [`probe_file`] reads only the headers: whether the file can be traced at
//! all (an x86-64 executable or shared object, its interpreter) and which
//! site sections it has, with their record counts, without reading a
//! record or a symbol (`textpoke record`'s check that a program has sites,
//! which a 100,000-function program would otherwise pay a full scan for).

use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader, ProgramHeader};
use object::read::{ReadCache, ReadRef};
use object::{Endianness, FileKind};

use super::elf::{machine, read_sites, record_count, site_sections, Relocs};
use super::marked::{self, MarkedPoint};
use super::{Image, NopForm, RecordSource, Scan, Segment, SiteKind, SitesError, SkipReason};

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

/// What [`probe_file`] finds in a file's headers.
#[derive(Clone, Debug)]
pub struct FileProbe {
    /// `ET_DYN` (PIE or shared object) rather than `ET_EXEC`.
    pub position_independent: bool,
    /// The program interpreter (`PT_INTERP`), if any.
    pub interpreter: Option<PathBuf>,
    /// The site sections present, with their record counts (from their
    /// sizes: records that will not give sites are counted too).
    pub sections: Vec<(&'static str, usize)>,
}

impl FileProbe {
    /// Whether a site section holds at least one record.
    pub fn has_records(&self) -> bool {
        self.sections.iter().any(|&(_, n)| n > 0)
    }
}

/// Reads the headers of the ELF file at `path` only (see the module
/// docs); errors as [`scan_file`] for a file that is not a 64-bit x86-64 (aarch64)
/// executable or shared object, or whose site section has a size that is
/// not a whole number of records.
pub fn probe_file(path: &Path) -> Result<FileProbe, SitesError> {
    let file = File::open(path).map_err(|source| SitesError::Open { path: path.to_path_buf(), source })?;
    let cache = ReadCache::new(file);
    let data = &cache;
    let (header, endian, probe) = probe_headers(path, data)?;
    let parse = |source| SitesError::Parse { path: path.to_path_buf(), source };
    let sections = header.sections(endian, data).map_err(parse)?;
    let mut out = probe;
    for (kind, sh) in site_sections(header, &sections, endian, data) {
        let bad =
            |what: String| SitesError::BadSection { path: path.to_path_buf(), section: kind.section_name(), what };
        out.sections.push((kind.section_name(), record_count(kind, sh, endian).map_err(bad)? as usize));
    }
    Ok(out)
}

/// The ELF header of a file checked to be a 64-bit x86-64 (aarch64) executable or
/// shared object, and what its program headers say (no sections yet).
fn probe_headers<'d>(
    path: &Path,
    data: &'d ReadCache<File>,
) -> Result<(&'d FileHeader64<Endianness>, Endianness, FileProbe), SitesError> {
    let parse = |source| SitesError::Parse { path: path.to_path_buf(), source };
    let unsupported = |what: String| SitesError::Unsupported { path: path.to_path_buf(), what };
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => {
            return Err(unsupported(format!("a 32-bit ELF file; textpoke handles {}", machine::NAME)))
        }
        Ok(kind) => return Err(unsupported(format!("not an ELF file ({kind:?})"))),
        Err(_) => return Err(unsupported("not an ELF file".into())),
    }
    let header = FileHeader64::<Endianness>::parse(data).map_err(parse)?;
    let endian = header.endian().map_err(parse)?;
    // The machine this build traces (x86-64 or aarch64), as for loaded
    // objects (`elf.rs`).
    if header.e_machine(endian) != machine::EM {
        return Err(unsupported(format!("e_machine {}, not {}", header.e_machine(endian), machine::NAME)));
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
        return Err(unsupported(format!("e_type {e_type}, not an executable or shared object")));
    }
    let phdrs = header.program_headers(endian, data).map_err(parse)?;
    let interpreter =
        phdrs.iter().find(|p| p.p_type(endian) == elf::PT_INTERP).and_then(|p| p.data(endian, data).ok()).map(
            |bytes| {
                let s = bytes.split(|&b| b == 0).next().unwrap_or_default();
                PathBuf::from(String::from_utf8_lossy(s).into_owned())
            },
        );
    Ok((header, endian, FileProbe { position_independent: e_type == elf::ET_DYN, interpreter, sections: Vec::new() }))
}

/// Finds the patchable sites of the ELF file at `path` (see the module
/// docs). A file without site sections gives an empty result; a file that
/// is not a 64-bit ELF executable or shared object of this build's machine
/// (x86-64 or aarch64) is an error.
pub fn scan_file(path: &Path) -> Result<FileSites, SitesError> {
    let file = File::open(path).map_err(|source| SitesError::Open { path: path.to_path_buf(), source })?;
    let cache = ReadCache::new(file);
    let data = &cache;
    let parse = |source| SitesError::Parse { path: path.to_path_buf(), source };
    let (header, endian, probe) = probe_headers(path, data)?;
    let phdrs = header.program_headers(endian, data).map_err(parse)?;
    let mut out = FileSites {
        path: path.to_path_buf(),
        position_independent: probe.position_independent,
        interpreter: probe.interpreter,
        sections: Vec::new(),
        sites: Vec::new(),
        skipped: Vec::new(),
        dynsym_only: false,
    };
    let facts = read_sites(path, header, endian, data)?;
    if facts.sections.is_empty() {
        return Ok(out);
    }
    out.dynsym_only = facts.dynsym_only;
    let relocs = match facts.relocs {
        Some(relocs) => relocs,
        None => Relocs::read_file(header, endian, data).map_err(parse)?,
    };
    let loads: Vec<_> = phdrs.iter().filter(|p| p.p_type(endian) == elf::PT_LOAD).collect();
    let segments: Vec<Segment> = loads
        .iter()
        .map(|p| Segment {
            vaddr: p.p_vaddr(endian) as usize,
            memsz: p.p_memsz(endian) as usize,
            flags: p.p_flags(endian),
        })
        .collect();
    let image = FileImage {
        data,
        loads: loads
            .iter()
            .map(|p| (p.p_vaddr(endian), p.p_memsz(endian), p.p_offset(endian), p.p_filesz(endian)))
            .collect(),
        relocs,
    };
    let scan = Scan { image: &image, path, bias: 0, segments: &segments, symbols: &facts.symbols };
    let (reports, results) = scan.sections(&facts.sections, RecordSource::File)?;
    out.sections = reports.iter().map(|r| (r.section, r.records)).collect();
    for r in results {
        match r {
            Ok(hit) => out.sites.push(FileSite {
                section: match hit.kind {
                    SiteKind::PatchableEntry(_) => "__patchable_function_entries",
                    SiteKind::Mcount => "__mcount_loc",
                    SiteKind::Marked(_) => marked::SECTION,
                },
                function: hit.function,
                raw_symbol: hit.raw_symbol,
                entry: hit.entry as u64,
                nop_addr: hit.nop_addr as u64,
                nop_form: hit.nop_form,
                marked: match hit.kind {
                    SiteKind::Marked(m) => Some(m.point),
                    _ => None,
                },
            }),
            Err(miss) => out.skipped.push(FileSkipped {
                section: miss.section,
                record: miss.record as u64,
                function: miss.function,
                reason: miss.reason,
            }),
        }
    }
    out.sites.sort_by_key(|s| (s.nop_addr, s.entry));
    out.skipped.sort_by_key(|s| (s.section, s.record));
    Ok(out)
}

/// The file's loadable image, at link-time addresses.
struct FileImage<'a> {
    data: &'a ReadCache<File>,
    /// (`p_vaddr`, `p_memsz`, `p_offset`, `p_filesz`) of each `PT_LOAD`.
    loads: Vec<(u64, u64, u64, u64)>,
    relocs: Relocs,
}

impl Image for FileImage<'_> {
    /// The bytes from the file part of the segment at `addr`; zeros past it.
    fn load_into(&self, addr: usize, out: &mut [u8]) -> Option<()> {
        let addr = addr as u64;
        let &(vaddr, _, offset, filesz) = self.loads.iter().find(|&&(v, m, _, _)| v <= addr && addr - v < m)?;
        out.fill(0);
        let start = addr - vaddr;
        if let Ok(bytes) = self.data.read_bytes_at(offset, filesz) {
            if let Some(part) = bytes.get(start as usize..) {
                let n = part.len().min(out.len());
                out[..n].copy_from_slice(&part[..n]);
            }
        }
        Some(())
    }

    fn pointer(&self, addr: usize, stored: [u8; 8]) -> Option<usize> {
        self.relocs.value(addr as u64, Some(u64::from_le_bytes(stored))).map(|v| v as usize)
    }
}
