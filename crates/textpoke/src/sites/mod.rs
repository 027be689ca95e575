//! Where the patchable places are: the function-entry sites of every ELF
//! object loaded in this process, each mapped to its function.
//!
//! # Objects
//!
//! [`Objects`] lists the loaded objects with `dl_iterate_phdr` (main
//! executable, shared libraries, the loader; not the vdso) and, on each
//! [`Objects::rescan`], tells which appeared (dlopen) and which went
//! (dlclose), keyed by `(path, load bias)`. See [`objects`]
//! for the details, including how an object is kept loaded while it is read.
//!
//! # Site sections
//!
//! Compilers record the patchable places of a function in an array of
//! pointers, in a section of the object:
//!
//! - `__patchable_function_entries` (gcc and clang
//!   `-fpatchable-function-entry=N[,M]`): one pointer per function, to the
//!   start of its pad of N NOP bytes, of which M are before the function's
//!   symbol and N-M after it;
//! - `__mcount_loc` (`-pg -mfentry -mnop-mcount -mrecord-mcount`): one
//!   pointer per function, to the 5-byte NOP at its entry;
//! - `textpoke_sites`: Rust functions marked with `#[textpoke::traced]`
//!   ([`SiteKind::Marked`]): one 12-byte PC-relative record per entry or exit
//!   site, pointing to the function's static descriptor. These need no
//!   relocation and are read and checked as the [`marked`] module describes;
//!   what follows is about the two pointer arrays.
//!
//! # Reading the arrays: memory first, the file to check
//!
//! The pointers are link-time addresses that the loader relocates. The file
//! says so in several ways (see `elf::Relocs`): GNU ld stores the value
//! and adds an `R_X86_64_RELATIVE` with the same addend; lld stores zeros and
//! only the RELA addend has the value; `-z pack-relative-relocs` puts the
//! place in `.relr.dyn` and keeps the value; a non-PIC library (which
//! `-mnop-mcount` forces) relocates its read-only `__mcount_loc` as a text
//! relocation.
//!
//! The section is `SHF_ALLOC`, so it is mapped with the object and the loader
//! has applied all of that by the time the object is visible to
//! `dl_iterate_phdr`. So the records are read **from the process's memory**
//! at `section address + bias`, once it is checked that the whole array lies
//! in a readable `PT_LOAD` segment of the (pinned) object. This is the robust
//! choice: memory holds what the loader actually computed, whatever the
//! relocation format (RELA, REL, RELR, TEXTREL, and ones this code does not
//! know), where reimplementing the loader from the file can only lag behind
//! it.
//!
//! The file is still read — the symbols come from it — and every record whose
//! value the file determines is compared with memory. A disagreement means
//! something is not understood (the program wrote into the array, or the file
//! is not what was loaded despite the checks below), and that record is
//! skipped with both values: refuse, don't guess. Reading from the file alone
//! ([`RecordSource::File`]) stays available for a section that is not in a
//! loaded segment, and is what [`scan_file`] does for a file that is not
//! loaded: the scan below is generic over where the bytes come from (an
//! `Image`: this process's memory, or the file's segments), so both read
//! records, infer pads and check NOPs with the same code.
//!
//! Before anything is read, the file is checked to be the loaded object: its
//! `PT_LOAD` segments must be those the loader reported, and the GNU
//! build-ids, when both exist, equal. A library upgraded on disk under a
//! running process is refused with [`SitesError::FileMismatch`].
//!
//! # From a record to a site
//!
//! For `__patchable_function_entries` the record is the pad start P; the
//! function entry E is the symbol at P (M = 0) or the first symbol at most
//! 255 bytes after P when only NOP instructions lie between (M = E - P). A
//! pad without such a symbol (a static function in a stripped object) takes
//! the M of all the object's other pads when they agree, and is skipped
//! otherwise. If E holds `endbr64` (`-fcf-protection`), the NOPs follow it:
//! the 5-byte site is at E + 4. N is inferred as M plus the length of the
//! run of NOPs at the site (the file does not record N).
//!
//! For `__mcount_loc` the record is the NOP itself; E is the start of the
//! function symbol containing it, and the NOP must be at E (or E + 4 after
//! `endbr64`): a NOP further in (`-pg` without `-mfentry` puts it after the
//! prologue) is skipped, as a tracer entered there would find the stack
//! already changed.
//!
//! Names come from `.symtab`, else `.dynsym`, demangled ([`demangle`]).
//!
//! # Checking the bytes
//!
//! The five bytes at each site are read from memory and must be one of the
//! NOPs the compilers emit ([`NopForm`]): gcc's pads are five 1-byte NOPs
//! ([`NopForm::Split`], which needs a one-time rewrite with all threads
//! parked before it can be patched live), `-mnop-mcount` gives the single
//! 5-byte NOP ([`NopForm::Single`]). Any other bytes (the site is already
//! patched, or the record is wrong) put the site in
//! [`ObjectSites::skipped`] with the bytes found; no record is dropped
//! silently.
//!
//! # Concurrency
//!
//! Scanning allocates, reads files and takes the loader's lock: it is a cold
//! path, never to run in a signal handler. The code bytes are read with
//! volatile byte loads: another thread may be patching them, and a single
//! byte load is never torn.

pub mod error;
pub mod file;
pub mod marked;
pub mod objects;

mod elf;
mod symbols;

use std::collections::BTreeMap;
use std::fmt;

pub use crate::arch::NopForm;
pub use error::SitesError;
pub use file::{probe_file, scan_file, FileProbe, FileSite, FileSites};
pub use marked::{Marked, MarkedFunction, MarkedPoint};
pub use objects::{LoadedObject, ObjectChanges, ObjectId, Objects, Pin, Segment};
pub use symbols::demangle;

use crate::arch;
use elf::{RecordKind, RecordSection};
use symbols::Symbols;

/// Length of the patchable NOP at every site, in bytes.
pub const NOP_LEN: u8 = arch::SITE_NOPS[0].len() as u8;

/// Largest M (bytes of pad before the function symbol) looked for.
const MAX_PREFIX: usize = 255;

/// The pad of a `-fpatchable-function-entry=N,M` function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pad {
    /// Runtime address of the first pad byte (the record's value).
    pub start: usize,
    /// N: the pad's length, inferred as M plus the run of NOP bytes at the
    /// site (an over-estimate if the function body starts with a NOP
    /// instruction of the pad's kind).
    pub len: u8,
    /// M: how many pad bytes are before the function's entry.
    pub entry_offset: u8,
}

/// What kind of record a site comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// `__patchable_function_entries`.
    PatchableEntry(Pad),
    /// `__mcount_loc`.
    Mcount,
    /// A Rust function marked with `#[textpoke::traced]`, recorded in the
    /// `textpoke_sites` section: its entry or its exit site (see
    /// [`marked`]). For such a site, [`Site::function`] is the name in the
    /// function's descriptor, and [`Site::entry`] and [`Site::raw_symbol`]
    /// are those of the machine function that contains the NOP — the
    /// function itself, one of its monomorphizations, or a caller it was
    /// inlined into. The NOP is in the body, not at the entry: the compiler
    /// may have set up the frame and moved register-only work before it, so
    /// a tracer must not read arguments or replace the return address
    /// there; the exit site is where the function ends.
    Marked(Marked),
}

/// A patchable function-entry site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The object it is in.
    pub object: ObjectId,
    /// Where it was recorded.
    pub kind: SiteKind,
    /// Runtime address of the function's entry (its symbol).
    pub entry: usize,
    /// Runtime address of the 5-byte NOP to patch: `entry`, or `entry + 4`
    /// after an `endbr64`.
    pub nop_addr: usize,
    /// Length of the NOP ([`NOP_LEN`]).
    pub nop_len: u8,
    /// How the NOP is made; only [`NopForm::Single`] is ready for live
    /// patching.
    pub nop_form: NopForm,
    /// The function's name, demangled; empty if no symbol names it.
    pub function: String,
    /// The function's symbol as in the symbol table; empty if none.
    pub raw_symbol: String,
}

/// A record that did not give a patchable site, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedSite {
    /// The object it is in.
    pub object: ObjectId,
    /// The section the record is in.
    pub section: &'static str,
    /// The record's value (runtime address), when it could be read.
    pub record: usize,
    /// The function's entry, when known.
    pub entry: Option<usize>,
    /// The function's demangled name, when known (else empty).
    pub function: String,
    /// Why it is not a site.
    pub reason: SkipReason,
}

/// Why a record is not a patchable site.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// The address is not inside an executable segment of the object.
    NotInCode { addr: usize },
    /// Memory and the file give different values for the record.
    RecordMismatch { memory: usize, file: usize },
    /// Read from the file only, record number `index` is relocated against
    /// a symbol this object does not define: only the loader knows its value.
    RecordUnknown { index: usize },
    /// No symbol shows where the function starts, so the pad's M is unknown.
    UnknownEntry,
    /// The NOP is not at the function's entry (`offset` bytes into it).
    NotAtEntry { offset: usize },
    /// The bytes at the site are not a NOP this layer knows.
    UnexpectedBytes { addr: usize, found: Vec<u8> },
    /// Fewer than five NOP bytes at the site (N - M < 5).
    PadTooShort { addr: usize, nops: usize },
    /// A `textpoke_sites` record (at runtime address `record`) of an
    /// unknown version or kind.
    BadRecord { record: usize, what: String },
    /// The descriptor a `textpoke_sites` record points to (at `addr`) is not
    /// one: outside the object, wrong magic or version, or a bad name.
    BadDescriptor { addr: usize, what: String },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotInCode { addr } => {
                write!(f, "{addr:#x} is not in an executable segment")
            }
            SkipReason::RecordMismatch { memory, file } => {
                write!(f, "record is {memory:#x} in memory but {file:#x} from the file")
            }
            SkipReason::RecordUnknown { index } => {
                write!(f, "record {index} depends on a symbol resolved by the loader; read it from memory")
            }
            SkipReason::UnknownEntry => f.write_str("no symbol shows where the function starts"),
            SkipReason::NotAtEntry { offset } => {
                write!(f, "the NOP is {offset} bytes into the function, not at its entry")
            }
            SkipReason::UnexpectedBytes { addr, found } => {
                write!(f, "bytes at {addr:#x} are {}, expected ", Hex(found))?;
                for (i, nop) in arch::SITE_NOPS.iter().enumerate() {
                    let sep = if i == 0 { "" } else { " or " };
                    write!(f, "{sep}{}", Hex(nop))?;
                }
                Ok(())
            }
            SkipReason::PadTooShort { addr, nops } => {
                write!(f, "only {nops} NOP bytes at {addr:#x}, need {NOP_LEN}")
            }
            SkipReason::BadRecord { record, what } => write!(f, "record at {record:#x}: {what}"),
            SkipReason::BadDescriptor { addr, what } => write!(f, "function descriptor at {addr:#x}: {what}"),
        }
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{b:02x}")?;
        }
        Ok(())
    }
}

/// Where the record arrays are read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RecordSource {
    /// Memory when the array is in a loaded segment, checked against the
    /// file; else the file.
    #[default]
    Auto,
    /// The file and its relocations only.
    File,
}

/// How one site section of an object was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionReport {
    /// The section's name.
    pub section: &'static str,
    /// Number of records in it.
    pub records: usize,
    /// Whether the records were read from memory (else from the file).
    pub from_memory: bool,
    /// Records whose memory value was compared with (and equal to or
    /// different from) a value derived from the file.
    pub cross_checked: usize,
}

/// The sites of one object.
#[derive(Clone, Debug)]
pub struct ObjectSites {
    /// The object.
    pub object: ObjectId,
    /// Patchable sites, by address.
    pub sites: Vec<Site>,
    /// Records that are not patchable sites, with the reason.
    pub skipped: Vec<SkippedSite>,
    /// How each site section was read (empty: the object has none).
    pub sections: Vec<SectionReport>,
    /// Symbols came from `.dynsym` only: static functions are unnamed.
    pub dynsym_only: bool,
}

/// Find the sites of one loaded object.
///
/// Pins the object for the duration (see [`LoadedObject::pin`]), reads its
/// file, reads its site arrays, maps each record to its function and checks
/// the bytes. An object without site sections gives an empty result.
pub fn scan_object(obj: &LoadedObject, source: RecordSource) -> Result<ObjectSites, SitesError> {
    let pin = obj.pin()?;
    let facts = elf::read_file(obj)?;
    let memory = Memory { obj, _pin: &pin };
    let scan =
        Scan { image: &memory, path: &obj.path, bias: obj.bias, segments: &obj.segments, symbols: &facts.symbols };
    let (sections, results) = scan.sections(&facts.sections, source)?;
    let mut out = ObjectSites {
        object: obj.id,
        sites: Vec::new(),
        skipped: Vec::new(),
        sections,
        dynsym_only: facts.dynsym_only,
    };
    // Collected in place: the results' buffer holds the sites.
    out.sites = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(hit) => Some(hit.site(obj.id)),
            Err(miss) => {
                out.skipped.push(miss.skipped(obj.id));
                None
            }
        })
        .collect();
    out.sites.sort_by_key(|s| (s.nop_addr, s.entry));
    out.skipped.sort_by_key(|s| (s.section, s.record));
    Ok(out)
}

/// A site as a scan finds it: a [`Site`] before the object is named.
struct Hit {
    kind: SiteKind,
    entry: usize,
    nop_addr: usize,
    nop_form: NopForm,
    function: String,
    raw_symbol: String,
}

impl Hit {
    fn site(self, object: ObjectId) -> Site {
        let Hit { kind, entry, nop_addr, nop_form, function, raw_symbol } = self;
        // aarch64: a marked site is one `nop`, not a patchable entry's two.
        let nop_len = if matches!(kind, SiteKind::Marked(_)) { marked::MARKED_NOP.len() as u8 } else { NOP_LEN };
        Site { object, kind, entry, nop_addr, nop_len, nop_form, function, raw_symbol }
    }
}

/// A skipped record as a scan finds it: a [`SkippedSite`] before the object
/// is named.
#[derive(Clone)]
struct Miss {
    section: &'static str,
    record: usize,
    entry: Option<usize>,
    function: String,
    reason: SkipReason,
}

impl Miss {
    fn skipped(self, object: ObjectId) -> SkippedSite {
        let Miss { section, record, entry, function, reason } = self;
        SkippedSite { object, section, record, entry, function, reason }
    }
}

/// What a scan makes of one record.
type Found = Result<Hit, Miss>;

/// A record that gives no address: its value (when known) and why.
type Unknown = (usize, SkipReason);

/// Where a scan reads an object's bytes: the loaded object's memory
/// ([`Memory`]), or its file (`file::FileImage`, at link-time addresses).
trait Image {
    /// Copy the bytes at `addr` into `out`, which [`Scan::read`] has found
    /// in one readable segment of the object.
    fn load_into(&self, addr: usize, out: &mut [u8]) -> Option<()>;
    /// Copy `len` bytes at `addr` (as [`Image::load_into`]).
    fn load(&self, addr: usize, len: usize) -> Option<Vec<u8>> {
        let mut out = vec![0; len];
        self.load_into(addr, &mut out).map(|()| out)
    }
    /// The pointer at `addr` whose bytes are `stored`, as the loader
    /// relocates it; `None` if only the loader can know.
    fn pointer(&self, addr: usize, stored: [u8; 8]) -> Option<usize>;
}

/// The most bytes a scan reads per site: a pad's `M` and the NOP run after
/// its entry are each at most [`MAX_PREFIX`].
const SMALL_READ: usize = MAX_PREFIX + 1;
/// The bytes first read to measure a run of NOPs.
const RUN_CHUNK: usize = 32;

/// The memory of a loaded object, kept loaded by a [`Pin`].
struct Memory<'a> {
    obj: &'a LoadedObject,
    _pin: &'a Pin,
}

impl Image for Memory<'_> {
    fn load_into(&self, addr: usize, out: &mut [u8]) -> Option<()> {
        // Checked again here, so that this safe function reads nothing else
        // whoever calls it.
        if !self.obj.segment_at(addr, out.len())?.is_readable() {
            return None;
        }
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: [addr, addr + len) lies in a readable PT_LOAD segment
            // of an object that `_pin` keeps loaded, so it is mapped and
            // readable. Volatile: the bytes may be rewritten by another
            // thread; a byte load cannot tear.
            *b = unsafe { std::ptr::read_volatile((addr + i) as *const u8) };
        }
        Some(())
    }

    fn pointer(&self, _addr: usize, stored: [u8; 8]) -> Option<usize> {
        Some(usize::from_le_bytes(stored))
    }
}

/// One object's sites, found in `image`: memory at runtime addresses
/// (`bias` the load bias), or the file at link-time addresses (`bias` 0).
struct Scan<'a, I> {
    image: &'a I,
    /// The object's file, for errors.
    path: &'a std::path::Path,
    bias: usize,
    /// The object's `PT_LOAD` segments (link-time addresses).
    segments: &'a [Segment],
    symbols: &'a Symbols,
}

impl<I: Image> Scan<'_, I> {
    /// The sites of every site section, and how each section was read.
    fn sections(
        &self,
        sections: &[RecordSection],
        source: RecordSource,
    ) -> Result<(Vec<SectionReport>, Vec<Found>), SitesError> {
        let mut reports = Vec::new();
        let mut out = Vec::new();
        for sec in sections {
            if sec.kind == RecordKind::Marked {
                let addr = (sec.addr as usize).wrapping_add(self.bias);
                let (report, results) = self.marked(addr, &sec.contents, source)?;
                reports.push(report);
                out.extend(results);
                continue;
            }
            let (located, unknown, report) = self.records(sec, source)?;
            reports.push(report);
            let section = sec.kind.section_name();
            for (record, reason) in unknown {
                out.push(Err(Miss { section, record, entry: None, function: String::new(), reason }));
            }
            match sec.kind {
                RecordKind::PatchableEntry => out.extend(self.patchable_entries(&located)),
                RecordKind::Mcount => out.extend(located.iter().map(|&n| self.mcount(n))),
                RecordKind::Marked => unreachable!("handled above"),
            }
        }
        Ok((reports, out))
    }

    /// The segment holding `[addr, addr + len)`.
    fn segment_at(&self, addr: usize, len: usize) -> Option<&Segment> {
        let link = addr.checked_sub(self.bias)?;
        self.segments.iter().find(|s| s.covers(link, len))
    }

    /// Copy `len` bytes at `addr`, if they lie in one readable segment of
    /// the object.
    fn read(&self, addr: usize, len: usize) -> Option<Vec<u8>> {
        let seg = self.segment_at(addr, len)?;
        if !seg.is_readable() {
            return None;
        }
        self.image.load(addr, len)
    }

    /// As [`Scan::read`], into `buf` (its length), e.g. on the stack.
    fn read_into<'b>(&self, addr: usize, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        if !self.segment_at(addr, buf.len())?.is_readable() {
            return None;
        }
        self.image.load_into(addr, buf)?;
        Some(buf)
    }

    /// Up to `buf.len()` bytes at `addr`, stopping at the end of its
    /// segment, into `buf`.
    fn read_upto_into<'b>(&self, addr: usize, buf: &'b mut [u8]) -> &'b [u8] {
        let Some(seg) = self.segment_at(addr, 1) else {
            return &[];
        };
        let seg_end = self.bias + seg.vaddr + seg.memsz;
        let len = buf.len().min(seg_end - addr);
        match self.read_into(addr, &mut buf[..len]) {
            Some(b) => b,
            None => &[],
        }
    }

    fn in_code(&self, addr: usize, len: usize) -> bool {
        self.segment_at(addr, len).is_some_and(|s| s.is_executable() && s.is_readable())
    }

    /// The records of one section as addresses, and those that give none
    /// (with the record's value, when known, and why).
    fn records(
        &self,
        sec: &RecordSection,
        source: RecordSource,
    ) -> Result<(Vec<usize>, Vec<Unknown>, SectionReport), SitesError> {
        let bias = self.bias;
        let count = (sec.size / 8) as usize;
        let runtime = (sec.addr as usize).wrapping_add(bias);
        let memory = match source {
            RecordSource::Auto if sec.alloc && count > 0 => {
                match self.read(runtime, sec.size as usize) {
                    Some(bytes) => Some(bytes),
                    // An SHF_ALLOC section outside every loaded segment: the file
                    // is not laid out as the loader mapped it, which the file
                    // check should have caught.
                    None => {
                        return Err(SitesError::BadSection {
                            path: self.path.to_path_buf(),
                            section: sec.kind.section_name(),
                            what: format!(
                                "{:#x}..{:#x} is not inside a readable loaded segment",
                                runtime,
                                runtime.wrapping_add(sec.size as usize)
                            ),
                        })
                    }
                }
            }
            _ => None,
        };
        let from_file = |i: usize| sec.file_values[i].map(|v| (v as usize).wrapping_add(bias));
        let mut report = SectionReport {
            section: sec.kind.section_name(),
            records: count,
            from_memory: memory.is_some(),
            cross_checked: 0,
        };
        let mut located = Vec::with_capacity(count);
        let mut unknown = Vec::new();
        for i in 0..count {
            let record = match &memory {
                Some(bytes) => {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
                    let mem = u64::from_ne_bytes(word) as usize;
                    match from_file(i) {
                        Some(file) => {
                            report.cross_checked += 1;
                            if file == mem {
                                Ok(mem)
                            } else {
                                Err((mem, SkipReason::RecordMismatch { memory: mem, file }))
                            }
                        }
                        None => Ok(mem),
                    }
                }
                None => from_file(i).ok_or((0, SkipReason::RecordUnknown { index: i })),
            };
            match record {
                Ok(addr) => located.push(addr),
                Err(e) => unknown.push(e),
            }
        }
        Ok((located, unknown, report))
    }

    fn name_of(&self, link_addr: u64) -> (String, String) {
        match self.symbols.starting_at(link_addr) {
            Some(s) => {
                let raw = self.symbols.name(s);
                (demangle(&raw), raw.into_owned())
            }
            None => (String::new(), String::new()),
        }
    }

    /// Sites of `__patchable_function_entries` records (pad starts).
    fn patchable_entries(&self, pads: &[usize]) -> Vec<Found> {
        // aarch64 `-mbranch-protection`: gcc records the pad after the
        // function's `bti c`; the pad is taken to start at the entry, whose
        // marker `nop_at_entry` steps over.
        let pads: Vec<usize> = pads.iter().map(|&p| self.marker_before_pad(p).unwrap_or(p)).collect();
        let pads = &pads[..];
        // First pass: the pads whose entry a symbol shows.
        let entries: Vec<Option<usize>> = pads.iter().map(|&p| self.entry_of_pad(p)).collect();
        // M of every located pad; used for the others when they all agree.
        let mut ms = entries.iter().zip(pads).filter_map(|(e, p)| e.map(|e| e - p));
        let consensus = ms.next().filter(|&m| ms.all(|x| x == m));
        pads.iter()
            .zip(entries)
            .map(|(&p, entry)| {
                let entry = entry.or_else(|| {
                    let m = consensus?;
                    let mut buf = [0u8; SMALL_READ];
                    let nops =
                        m == 0 || buf.get_mut(..m).and_then(|b| self.read_into(p, b)).is_some_and(arch::all_nops);
                    nops.then_some(p + m)
                });
                self.pad_site(p, entry)
            })
            .collect()
    }

    /// The function entry just before a pad recorded at `p`, when a symbol
    /// starts there with a branch-target marker and none starts at `p`.
    fn marker_before_pad(&self, p: usize) -> Option<usize> {
        const MARKER: usize = arch::BRANCH_TARGET_LEN;
        let e = p.checked_sub(MARKER)?;
        let (link, elink) = (p.checked_sub(self.bias)? as u64, e.checked_sub(self.bias)? as u64);
        if self.symbols.starting_at(link).is_some() || self.symbols.starting_at(elink).is_none() {
            return None;
        }
        let mut marker = [0u8; MARKER];
        let marker = self.read_into(e, &mut marker)?;
        (arch::branch_target_len(marker) == MARKER).then_some(e)
    }

    /// The entry of the function whose pad starts at `p`, if a symbol shows
    /// it.
    fn entry_of_pad(&self, p: usize) -> Option<usize> {
        let link = p.checked_sub(self.bias)? as u64;
        if self.symbols.starting_at(link).is_some() {
            return Some(p);
        }
        let sym = self.symbols.first_in(link, MAX_PREFIX as u64)?;
        let m = (sym.addr - link) as usize;
        let mut buf = [0u8; SMALL_READ];
        let between = self.read_into(p, buf.get_mut(..m)?)?;
        arch::all_nops(between).then_some(p + m)
    }

    fn pad_site(&self, p: usize, entry: Option<usize>) -> Result<Hit, Miss> {
        let section = RecordKind::PatchableEntry.section_name();
        let miss = |entry, function, reason| Miss { section, record: p, entry, function, reason };
        if !self.in_code(p, 1) {
            return Err(miss(entry, String::new(), SkipReason::NotInCode { addr: p }));
        }
        let Some(entry) = entry else {
            return Err(miss(None, String::new(), SkipReason::UnknownEntry));
        };
        let (function, raw_symbol) = self.name_of((entry - self.bias) as u64);
        let m = entry - p;
        let (nop_addr, form, run) = match self.nop_at_entry(entry, MAX_PREFIX - m) {
            Ok(found) => found,
            Err(reason) => return Err(miss(Some(entry), function, reason)),
        };
        Ok(Hit {
            kind: SiteKind::PatchableEntry(Pad {
                start: p,
                len: (m + run).min(u8::MAX as usize) as u8,
                entry_offset: m as u8,
            }),
            entry,
            nop_addr,
            nop_form: form,
            function,
            raw_symbol,
        })
    }

    /// The NOP at a function entry (after its branch-target marker,
    /// `endbr64`, if there is one): its address, form and the length of the
    /// NOP run there (up to `max`).
    fn nop_at_entry(&self, entry: usize, max: usize) -> Result<(usize, NopForm, usize), SkipReason> {
        let mut marker = [0u8; arch::BRANCH_TARGET_LEN];
        let nop_addr = entry + arch::branch_target_len(self.read_upto_into(entry, &mut marker));
        let max = max.max(NOP_LEN as usize).min(SMALL_READ);
        // The run is measured in a first chunk; read on only when it may go
        // past it (an instruction cut by the chunk's end ends a run too).
        let mut chunk = [0u8; RUN_CHUNK];
        let bytes = self.read_upto_into(nop_addr, &mut chunk[..max.min(RUN_CHUNK)]);
        let form = self.check_nop(nop_addr, bytes)?;
        let mut run = arch::nop_run_len(bytes);
        if bytes.len() == RUN_CHUNK && max > RUN_CHUNK && run > RUN_CHUNK - arch::MAX_INSN_LEN {
            run = arch::nop_run_len(self.read_upto_into(nop_addr, &mut [0u8; SMALL_READ][..max]));
        }
        Ok((nop_addr, form, run))
    }

    /// Check the bytes at a site (`bytes` starts at `addr`).
    fn check_nop(&self, addr: usize, bytes: &[u8]) -> Result<NopForm, SkipReason> {
        if !self.in_code(addr, NOP_LEN as usize) {
            return Err(SkipReason::NotInCode { addr });
        }
        let found = &bytes[..bytes.len().min(NOP_LEN as usize)];
        if let Some(form) = arch::classify_site_nop(found) {
            return Ok(form);
        }
        let nops = arch::nop_run_len(bytes);
        if nops > 0 && nops < NOP_LEN as usize {
            return Err(SkipReason::PadTooShort { addr, nops });
        }
        Err(SkipReason::UnexpectedBytes { addr, found: found.to_vec() })
    }

    /// The site of one `__mcount_loc` record (the NOP's address).
    fn mcount(&self, n: usize) -> Result<Hit, Miss> {
        let section = RecordKind::Mcount.section_name();
        let miss = |entry, function, reason| Miss { section, record: n, entry, function, reason };
        if !self.in_code(n, NOP_LEN as usize) {
            return Err(miss(None, String::new(), SkipReason::NotInCode { addr: n }));
        }
        let link = (n - self.bias) as u64;
        // The entry when the NOP follows a branch-target marker (`endbr64`).
        const MARKER: usize = arch::BRANCH_TARGET_LEN;
        let marker_before = || {
            n.checked_sub(MARKER)
                .and_then(|e| self.read_into(e, &mut [0u8; MARKER]).map(|b| arch::branch_target_len(b) == MARKER))
                == Some(true)
        };
        let (entry, function, raw_symbol) = match self.symbols.containing(link) {
            Some(sym) => {
                let entry = self.bias + sym.addr as usize;
                let offset = n - entry;
                let raw = self.symbols.name(sym);
                let function = demangle(&raw);
                if offset != 0 && !(offset == MARKER && marker_before()) {
                    return Err(miss(Some(entry), function, SkipReason::NotAtEntry { offset }));
                }
                (entry, function, raw.into_owned())
            }
            None if marker_before() => (n - MARKER, String::new(), String::new()),
            None => (n, String::new(), String::new()),
        };
        let mut buf = [0u8; NOP_LEN as usize];
        let bytes = self.read_upto_into(n, &mut buf);
        let form = match self.check_nop(n, bytes) {
            Ok(form) => form,
            Err(reason) => return Err(miss(Some(entry), function, reason)),
        };
        Ok(Hit { kind: SiteKind::Mcount, entry, nop_addr: n, nop_form: form, function, raw_symbol })
    }
}

/// The sites of every object loaded in this process, kept up to date by
/// [`rescan`](Self::rescan).
#[derive(Debug, Default)]
pub struct SiteTable {
    objects: Objects,
    scanned: BTreeMap<ObjectId, Result<ObjectSites, SitesError>>,
    source: RecordSource,
}

impl SiteTable {
    /// An empty table; call [`rescan`](Self::rescan) to fill it.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table that reads records from `source`.
    pub fn with_source(source: RecordSource) -> Self {
        SiteTable { source, ..Self::default() }
    }

    /// List the loaded objects again; scan those that appeared, forget those
    /// that went. If the loader's counters show an unload and reload the
    /// rescan cannot pin down ([`ObjectChanges::possibly_reloaded`]), every
    /// object is scanned again.
    pub fn rescan(&mut self) -> ObjectChanges {
        let changes = self.objects.rescan();
        for gone in &changes.removed {
            self.scanned.remove(&gone.id);
        }
        let to_scan: Vec<ObjectId> =
            if changes.possibly_reloaded { self.objects.iter().map(|o| o.id).collect() } else { changes.added.clone() };
        for id in to_scan {
            self.rescan_object(id);
        }
        changes
    }

    /// Scan one object again (its bytes may have changed). `None` if the
    /// object is not in the table.
    pub fn rescan_object(&mut self, id: ObjectId) -> Option<&Result<ObjectSites, SitesError>> {
        let obj = self.objects.get(id)?;
        let result = scan_object(obj, self.source);
        self.scanned.insert(id, result);
        self.scanned.get(&id)
    }

    /// The loaded objects as of the last rescan.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The objects' generation (see [`Objects::generation`]).
    pub fn generation(&self) -> u64 {
        self.objects.generation()
    }

    /// Moves the sites of one object out of the table, leaving its skipped
    /// records and section reports: for a caller that keeps the sites its
    /// own way (the tracer), so that they are not held twice. `None` if the
    /// object is not in the table or its scan failed.
    pub fn take_sites(&mut self, id: ObjectId) -> Option<Vec<Site>> {
        Some(std::mem::take(&mut self.scanned.get_mut(&id)?.as_mut().ok()?.sites))
    }

    /// What the last scan of one object gave.
    pub fn object_sites(&self, id: ObjectId) -> Option<Result<&ObjectSites, &SitesError>> {
        self.scanned.get(&id).map(|r| r.as_ref())
    }

    /// All patchable sites, object by object.
    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.scanned.values().filter_map(|r| r.as_ref().ok()).flat_map(|o| o.sites.iter())
    }

    /// All records that are not patchable sites.
    pub fn skipped(&self) -> impl Iterator<Item = &SkippedSite> {
        self.scanned.values().filter_map(|r| r.as_ref().ok()).flat_map(|o| o.skipped.iter())
    }

    /// The objects whose sites could not be found, with the reason.
    pub fn errors(&self) -> impl Iterator<Item = (&LoadedObject, &SitesError)> {
        self.scanned.iter().filter_map(|(id, r)| {
            let err = r.as_ref().err()?;
            Some((self.objects.get(*id)?, err))
        })
    }
}
