//! Reading a loaded object's ELF file: the site sections, their values as
//! the file and its dynamic relocations give them, and function symbols.
//!
//! The file is read through `object`'s `ReadCache`, which reads only the
//! byte ranges asked for (headers, the site sections, the relocation
//! sections, the symbol table) instead of the whole file: shared libraries
//! without site sections cost a few small reads, and nothing is mapped that a
//! concurrent truncation of the file could turn into SIGBUS.

use std::fs::File;
use std::path::Path;

use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader, ProgramHeader, Rel, Rela, SectionHeader, SectionTable, Sym};
use object::read::{ReadCache, ReadRef};
use object::Endianness;

use super::error::SitesError;
use super::objects::{LoadedObject, Segment};
use super::symbols::{FuncSym, Symbols};

/// The ELF machine this build reads, and its relocation types for 8-byte
/// pointers (none, relative, symbol + addend).
#[cfg(target_arch = "x86_64")]
pub(super) mod machine {
    use object::elf;
    pub const EM: u16 = elf::EM_X86_64;
    pub const NAME: &str = "x86-64";
    pub const R_NONE: u32 = elf::R_X86_64_NONE;
    pub const R_RELATIVE: u32 = elf::R_X86_64_RELATIVE;
    pub const R_64: u32 = elf::R_X86_64_64;
}
#[cfg(target_arch = "aarch64")]
pub(super) mod machine {
    use object::elf;
    pub const EM: u16 = elf::EM_AARCH64;
    pub const NAME: &str = "aarch64";
    pub const R_NONE: u32 = elf::R_AARCH64_NONE;
    pub const R_RELATIVE: u32 = elf::R_AARCH64_RELATIVE;
    pub const R_64: u32 = elf::R_AARCH64_ABS64;
}

type Elf = FileHeader64<Endianness>;

/// Which array section a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RecordKind {
    /// `__patchable_function_entries`: pad starts.
    PatchableEntry,
    /// `__mcount_loc`: addresses of the 5-byte NOPs.
    Mcount,
    /// `textpoke_sites`: PC-relative records of `#[textpoke::traced]`
    /// (see `marked`).
    Marked,
}

impl RecordKind {
    pub fn section_name(self) -> &'static str {
        match self {
            RecordKind::PatchableEntry => "__patchable_function_entries",
            RecordKind::Mcount => "__mcount_loc",
            RecordKind::Marked => super::marked::SECTION,
        }
    }

    /// Size of one record in bytes.
    pub fn record_size(self) -> u64 {
        match self {
            RecordKind::PatchableEntry | RecordKind::Mcount => 8,
            RecordKind::Marked => super::marked::RECORD_SIZE as u64,
        }
    }
}

/// One site section as found in the file.
#[derive(Clone, Debug)]
pub(crate) struct RecordSection {
    pub kind: RecordKind,
    /// Link-time address of the section (`sh_addr`).
    pub addr: u64,
    /// Size in bytes (a multiple of the record size).
    pub size: u64,
    /// `SHF_ALLOC`: the section is part of the loaded image.
    pub alloc: bool,
    /// Link-time address each record points to, from the file: the RELA
    /// addend, or for RELR/REL and unrelocated entries the stored value.
    /// `None` where a relocation depends on a symbol that is not defined in
    /// this object (only the loader knows its value). Empty for
    /// [`RecordKind::Marked`], whose records need no relocation.
    pub file_values: Vec<Option<u64>>,
    /// The section's bytes in the file, for [`RecordKind::Marked`] (empty
    /// for the others).
    pub contents: Vec<u8>,
}

/// What is read from one object's file.
pub(crate) struct FileFacts {
    pub sections: Vec<RecordSection>,
    /// Function symbols (`.symtab`, else `.dynsym`); loaded only when the
    /// object has a site section.
    pub symbols: Symbols,
    /// Whether the symbols came from `.dynsym` only (`.symtab` stripped):
    /// static functions then have no name.
    pub dynsym_only: bool,
    /// The file's dynamic relocations, when they were read (for
    /// `__patchable_function_entries` or `__mcount_loc`).
    pub relocs: Option<Relocs>,
}

/// Read the site sections and symbols of `obj`'s file, after checking that the
/// file is the one that was loaded.
pub(crate) fn read_file(obj: &LoadedObject) -> Result<FileFacts, SitesError> {
    let path = || obj.path.clone();
    let file = File::open(obj.file_to_open()).map_err(|source| SitesError::Open { path: path(), source })?;
    let cache = ReadCache::new(file);
    let data = &cache;
    let parse = |source| SitesError::Parse { path: path(), source };
    let unsupported = |what: String| SitesError::Unsupported { path: path(), what };

    let header = Elf::parse(data).map_err(parse)?;
    let endian = header.endian().map_err(parse)?;
    let machine = header.e_machine(endian);
    if machine != machine::EM {
        return Err(unsupported(format!("e_machine {machine}, not {}", machine::NAME)));
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
        return Err(unsupported(format!("e_type {e_type}, not ET_EXEC or ET_DYN")));
    }

    check_same_file(obj, header, endian, data)?;
    read_sites(&obj.path, header, endian, data)
}

/// Read the site sections of an ELF file, and its symbols when it has one
/// (the header is checked by the caller). The records' file values are
/// computed with [`Relocs`], which is kept in [`FileFacts::relocs`] when it
/// was needed.
pub(crate) fn read_sites<'data, R: ReadRef<'data>>(
    path: &Path,
    header: &Elf,
    endian: Endianness,
    data: R,
) -> Result<FileFacts, SitesError> {
    let path = || path.to_path_buf();
    let parse = |source| SitesError::Parse { path: path(), source };
    let sections = header.sections(endian, data).map_err(parse)?;
    let mut relocs = None;
    let mut found = Vec::new();
    for (kind, sh) in site_sections(header, &sections, endian, data) {
        let name = kind.section_name();
        let bad = |what: String| SitesError::BadSection { path: path(), section: name, what };
        let addr = sh.sh_addr(endian);
        let size = record_count(kind, sh, endian).map_err(bad)? * kind.record_size();
        let alloc = sh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0;
        let (file_values, contents) = if kind == RecordKind::Marked {
            if !alloc || sh.sh_type(endian) != elf::SHT_PROGBITS {
                return Err(bad("not an allocated SHT_PROGBITS section".to_owned()));
            }
            let contents = sh.data(endian, data).map_err(|e| bad(format!("cannot read contents: {e}")))?;
            (Vec::new(), contents.to_vec())
        } else {
            let values = (|| {
                if relocs.is_none() {
                    relocs = Some(Relocs::read(&sections, endian, data)?);
                }
                file_values(relocs.as_ref().expect("just read"), endian, data, sh)
            })()
            .map_err(|e| bad(format!("cannot read contents or relocations: {e}")))?;
            (values, Vec::new())
        };
        found.push(RecordSection { kind, addr, size, alloc, file_values, contents });
    }
    if found.is_empty() {
        return Ok(FileFacts { sections: found, symbols: Symbols::default(), dynsym_only: false, relocs });
    }
    let mut dynsym_only = false;
    let mut symbols = func_symbols(&sections, endian, data, elf::SHT_SYMTAB).map_err(parse)?;
    if symbols.is_empty() {
        symbols = func_symbols(&sections, endian, data, elf::SHT_DYNSYM).map_err(parse)?;
        dynsym_only = true;
    }
    Ok(FileFacts { sections: found, symbols, dynsym_only, relocs })
}

/// The site sections of a file (the first of each name), in
/// [`RecordKind`] order. The section names are read in one piece, not one
/// read per name.
pub(crate) fn site_sections<'data, 's, R: ReadRef<'data>>(
    header: &Elf,
    sections: &'s SectionTable<'data, Elf, R>,
    endian: Endianness,
    data: R,
) -> Vec<(RecordKind, &'s <Elf as FileHeader>::SectionHeader)> {
    const KINDS: [RecordKind; 3] = [RecordKind::PatchableEntry, RecordKind::Mcount, RecordKind::Marked];
    let names: Option<&[u8]> = header
        .shstrndx(endian, data)
        .ok()
        .and_then(|i| sections.section(object::SectionIndex(i as usize)).ok())
        .and_then(|sh| sh.data(endian, data).ok());
    let Some(names) = names else {
        // Let `object` read them name by name.
        return KINDS
            .into_iter()
            .filter_map(|k| sections.section_by_name(endian, k.section_name().as_bytes()).map(|(_, sh)| (k, sh)))
            .collect();
    };
    let mut found: [Option<&<Elf as FileHeader>::SectionHeader>; 3] = [None; 3];
    for sh in sections.iter() {
        let Some(rest) = names.get(sh.sh_name(endian) as usize..) else { continue };
        let name = &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())];
        if let Some(k) = KINDS.iter().position(|k| k.section_name().as_bytes() == name) {
            found[k].get_or_insert(sh);
        }
    }
    KINDS.into_iter().zip(found).filter_map(|(k, sh)| Some((k, sh?))).collect()
}

/// The number of records in a site section, or why its size is wrong.
pub(crate) fn record_count(
    kind: RecordKind,
    sh: &<Elf as FileHeader>::SectionHeader,
    endian: Endianness,
) -> Result<u64, String> {
    let size = sh.sh_size(endian);
    let record_size = kind.record_size();
    if size % record_size != 0 {
        return Err(format!("size {size} is not a multiple of {record_size}"));
    }
    Ok(size / record_size)
}

/// Refuse a file that is not the loaded object: its `PT_LOAD` layout must be
/// the one the loader reported, and the build-ids, when both exist, equal.
fn check_same_file<'data, R: ReadRef<'data>>(
    obj: &LoadedObject,
    header: &Elf,
    endian: Endianness,
    data: R,
) -> Result<(), SitesError> {
    let mismatch = |what: String| SitesError::FileMismatch { path: obj.path.clone(), what };
    let phdrs =
        header.program_headers(endian, data).map_err(|source| SitesError::Parse { path: obj.path.clone(), source })?;
    let file_loads: Vec<Segment> = phdrs
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| Segment {
            vaddr: p.p_vaddr(endian) as usize,
            memsz: p.p_memsz(endian) as usize,
            flags: p.p_flags(endian),
        })
        .collect();
    if file_loads != obj.segments {
        return Err(mismatch(format!("PT_LOAD segments differ (file {file_loads:x?}, loaded {:x?})", obj.segments)));
    }
    let mut file_id = None;
    for p in phdrs.iter().filter(|p| p.p_type(endian) == elf::PT_NOTE) {
        if let Ok(bytes) = p.data(endian, data) {
            if let Some(id) = gnu_build_id(bytes, p.p_align(endian)) {
                file_id = Some(id);
                break;
            }
        }
    }
    if let (Some(file_id), Some(mem_id)) = (&file_id, &obj.build_id) {
        if file_id != mem_id {
            return Err(mismatch(format!("build-id {} on disk, {} loaded", hex(file_id), hex(mem_id))));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The GNU build-id in a block of ELF notes (a `PT_NOTE` segment's bytes).
pub(crate) fn gnu_build_id(notes: &[u8], align: u64) -> Option<Vec<u8>> {
    let endian = Endianness::default();
    let mut it = object::read::elf::NoteIterator::<Elf>::new(endian, align, notes).ok()?;
    while let Ok(Some(note)) = it.next() {
        if note.name() == elf::ELF_NOTE_GNU && note.n_type(endian) == elf::NT_GNU_BUILD_ID {
            return Some(note.desc().to_vec());
        }
    }
    None
}

/// The dynamic relocations of a file that touch 8-byte pointers, by the
/// link-time address they relocate: what they say about the pointer stored
/// there.
///
/// What linkers emit for these sections in a PIE or a shared object (checked
/// with gcc 12.2, GNU ld 2.40 and rust-lld):
///
/// - GNU ld: one `R_X86_64_RELATIVE` per record in `.rela.dyn`, and the same
///   value also stored in the section (the addend written twice);
/// - GNU ld `-z pack-relative-relocs`: the record's address in `.relr.dyn`
///   (implicit addend: the stored value), no RELA entry;
/// - lld: one `R_X86_64_RELATIVE` per record, and **zeros** in the section
///   (lld applies no dynamic relocation to the file by default);
/// - a non-PIC shared object (`-mnop-mcount` forces `-fno-pic`): RELATIVE
///   relocations against the read-only `__mcount_loc` (a DT_TEXTREL object);
/// - a non-PIE executable: the absolute values, no relocation.
///
/// So: a RELA addend wins over the stored value; REL and RELR keep the stored
/// value; `R_X86_64_64` against a defined symbol is its value plus the addend;
/// against an undefined one the value is unknown (`None`).
pub(crate) struct Relocs {
    /// (place, relocation), sorted by place; a place's relocations in file
    /// order.
    by_place: Vec<(u64, Reloc)>,
}

/// What one relocation makes of the pointer stored at its place.
#[derive(Clone, Copy)]
enum Reloc {
    /// Keeps the stored value (`R_X86_64_NONE`; REL `R_X86_64_RELATIVE`).
    Keep,
    /// Replaces it (RELA; `None`: only the loader knows the value).
    Set(Option<u64>),
    /// Adds a symbol's value to it (REL `R_X86_64_64`; `None`: the symbol
    /// is not defined in the file).
    AddSymbol(Option<u64>),
}

impl Relocs {
    /// The dynamic relocations of the file with header `header`.
    pub fn read_file<'data, R: ReadRef<'data>>(
        header: &Elf,
        endian: Endianness,
        data: R,
    ) -> object::read::Result<Relocs> {
        Relocs::read(&header.sections(endian, data)?, endian, data)
    }

    fn read<'data, R: ReadRef<'data>>(
        sections: &SectionTable<'data, Elf, R>,
        endian: Endianness,
        data: R,
    ) -> object::read::Result<Relocs> {
        let mut by_place = Vec::new();
        for rsh in sections.iter() {
            // Only dynamic relocations (in the loaded image) are applied by
            // the loader; link-time ones kept with --emit-relocs are not.
            if rsh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) == 0 {
                continue;
            }
            match rsh.sh_type(endian) {
                elf::SHT_RELA => {
                    let Some((relas, symtab_index)) = rsh.rela(endian, data)? else {
                        continue;
                    };
                    let symtab = sections.symbol_table_by_index(endian, data, symtab_index)?;
                    for r in relas {
                        let addend = r.r_addend(endian) as u64;
                        let reloc = match r.r_type(endian, false) {
                            machine::R_NONE => Reloc::Keep,
                            machine::R_RELATIVE => Reloc::Set(Some(addend)),
                            machine::R_64 => Reloc::Set(
                                symtab
                                    .symbol(object::SymbolIndex(r.r_sym(endian, false) as usize))
                                    .ok()
                                    .filter(|s| !s.is_undefined(endian))
                                    .map(|s| s.st_value(endian).wrapping_add(addend)),
                            ),
                            _ => Reloc::Set(None),
                        };
                        by_place.push((r.r_offset(endian), reloc));
                    }
                }
                elf::SHT_REL => {
                    let Some((rels, symtab_index)) = rsh.rel(endian, data)? else {
                        continue;
                    };
                    let symtab = sections.symbol_table_by_index(endian, data, symtab_index)?;
                    for r in rels {
                        let reloc = match r.r_type(endian) {
                            machine::R_NONE | machine::R_RELATIVE => Reloc::Keep,
                            machine::R_64 => Reloc::AddSymbol(
                                symtab
                                    .symbol(object::SymbolIndex(r.r_sym(endian) as usize))
                                    .ok()
                                    .filter(|s| !s.is_undefined(endian))
                                    .map(|s| s.st_value(endian)),
                            ),
                            _ => Reloc::Set(None),
                        };
                        by_place.push((r.r_offset(endian), reloc));
                    }
                }
                // RELR entries are RELATIVE with the stored value as addend:
                // nothing to change.
                _ => {}
            }
        }
        // Stable: a place's relocations stay in file order.
        by_place.sort_by_key(|&(place, _)| place);
        Ok(Relocs { by_place })
    }

    /// The link-time value of the pointer at `place` whose stored value is
    /// `stored` (`None`: not in the file), after its relocations; `None` if
    /// only the loader knows it.
    pub fn value(&self, place: u64, stored: Option<u64>) -> Option<u64> {
        let first = self.by_place.partition_point(|&(p, _)| p < place);
        let relocs = self.by_place[first..].iter().take_while(|&&(p, _)| p == place);
        relocs.fold(stored, |value, &(_, r)| match r {
            Reloc::Keep => value,
            Reloc::Set(v) => v,
            Reloc::AddSymbol(sym) => Some(sym?.wrapping_add(value?)),
        })
    }
}

/// The link-time value of each 8-byte record of section `sh` ([`Relocs`]).
fn file_values<'data, R: ReadRef<'data>>(
    relocs: &Relocs,
    endian: Endianness,
    data: R,
    sh: &<Elf as FileHeader>::SectionHeader,
) -> object::read::Result<Vec<Option<u64>>> {
    let addr = sh.sh_addr(endian);
    let size = sh.sh_size(endian);
    let contents: &[u8] = if sh.sh_type(endian) == elf::SHT_NOBITS { &[] } else { sh.data(endian, data)? };
    Ok((0..size / 8)
        .map(|i| {
            let at = (i * 8) as usize;
            let stored = contents.get(at..at + 8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")));
            relocs.value(addr + i * 8, stored)
        })
        .collect())
}

/// The defined function symbols of the symbol table of type `sh_type`.
/// The symbols and their string table are read whole, once each (not one
/// read per name).
fn func_symbols<'data, R: ReadRef<'data>>(
    sections: &SectionTable<'data, Elf, R>,
    endian: Endianness,
    data: R,
    sh_type: u32,
) -> object::read::Result<Symbols> {
    let table = sections.symbols(endian, data, sh_type)?;
    if table.is_empty() {
        return Ok(Symbols::default());
    }
    let strings: &[u8] = sections.section(table.string_section())?.data(endian, data)?;
    let mut out = Vec::new();
    for s in table.iter() {
        let st_type = s.st_type();
        if (st_type != elf::STT_FUNC && st_type != elf::STT_GNU_IFUNC) || s.is_undefined(endian) {
            continue;
        }
        // A name must end inside the table (as `object`'s lookup requires).
        let at = s.st_name(endian) as usize;
        let Some(len) = strings.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0)) else {
            continue;
        };
        let (Ok(at), Ok(len)) = (u32::try_from(at), u32::try_from(len)) else { continue };
        let rank = match s.st_bind() {
            elf::STB_GLOBAL => 0,
            elf::STB_WEAK => 1,
            _ => 2,
        };
        out.push(FuncSym::new(s.st_value(endian), s.st_size(endian), at, len, rank));
    }
    Ok(Symbols::new(out, strings.into()))
}
