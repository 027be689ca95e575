//! The ELF objects loaded in this process, as the dynamic loader lists them.
//!
//! # Enumeration
//!
//! `dl_iterate_phdr` calls back once per loaded object with its name, its
//! load bias (`dlpi_addr`: runtime address = link-time address + bias) and
//! its program headers, while holding the loader's lock, so the object
//! cannot be unloaded during the callback. The callback copies what it needs
//! (name, `PT_LOAD` segments, where the mapped `PT_NOTE` segments are, the GNU
//! build-id read from them, the loader's counters) and returns; nothing is
//! kept that points into the loader's data.
//!
//! - The main executable is the entry with an empty name; its file is
//!   `/proc/self/exe`, which stays openable even if the path was replaced.
//! - The vdso is skipped: it has no file. It is recognised by its ELF header
//!   being at `getauxval(AT_SYSINFO_EHDR)`, not by its name.
//! - Any other entry without a name is skipped too (no file to read).
//!
//! # Identity and rescans
//!
//! An object is identified by `(path, bias)`. [`Objects::rescan`] lists the
//! objects again and compares: an object whose key is new gets a fresh
//! [`ObjectId`] (ids are never reused), one whose key is gone is reported as
//! removed, the others keep their id. The generation counts rescans that
//! changed something.
//!
//! A library dlclosed and dlopened again at the same address between two
//! rescans has the same key, so it looks unchanged, although its code was
//! loaded afresh. The loader's own counters (`dlpi_adds`, `dlpi_subs`) catch
//! that case without telling which object it was: when they moved by more
//! than what the rescan saw, [`ObjectChanges::possibly_reloaded`] is set.
//! An object that keeps its id keeps what was first recorded of it, except
//! its note segments ([`LoadedObject::notes`]), which are those of the
//! latest rescan: they are read from memory (see "Reading notes").
//!
//! The counters are read in the same walk as the objects, under the same
//! lock; `Objects::counters` keeps them, and `loader_counters` reads them
//! again later, from the first object only: equal values mean that no object
//! was loaded or unloaded in between.
//!
//! # Pinning
//!
//! Between the enumeration and the reading of an object's memory, another
//! thread may dlclose it. [`LoadedObject::pin`] takes a reference on it with
//! `dlopen(name, RTLD_NOLOAD)` (which never loads anything), checks through
//! `dlinfo(RTLD_DI_LINKMAP)` that it is the same object at the same bias, and
//! holds it loaded until the [`Pin`] is dropped.
//!
//! # Reading notes
//!
//! The `PT_NOTE` segments of an object are in its memory, as the loader
//! mapped them; [`LoadedObject::notes`] records where (only those inside a
//! readable `PT_LOAD` segment: the others are not mapped). Reading them later
//! needs more than a pin: the path and bias a pin checks are those of the
//! listing, but an object unloaded and another loaded from the same path at
//! the same address (a library replaced on disk, say) passes that check with
//! other program headers. The recorded segments describe the pinned object
//! when no object was loaded or unloaded between the rescan that recorded
//! them and the pin (the counters read after the pin equal
//! `Objects::counters`), or when the rescan ran while the pin was held.
//! `LoadedObject::note_bytes` reads them on that condition, which its
//! caller establishes.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::SitesError;
use crate::sys::loader::{self, LoadedObjectInfo};

/// Source of [`ObjectId`]s (a plain counter: no ordering with other data).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Identity of one loaded object for as long as it stays loaded. Ids come
/// from one process-wide counter and are never reused; two [`Objects`] lists
/// give the same object different ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(u64);

impl ObjectId {
    /// The number behind the id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "object#{}", self.0)
    }
}

/// One `PT_LOAD` segment, at its link-time address (add the object's bias for
/// the runtime address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Link-time virtual address (`p_vaddr`).
    pub vaddr: usize,
    /// Size in memory (`p_memsz`).
    pub memsz: usize,
    /// `PF_R`, `PF_W`, `PF_X` bits (`p_flags`).
    pub flags: u32,
}

impl Segment {
    /// Readable (`PF_R`).
    pub fn is_readable(&self) -> bool {
        self.flags & libc::PF_R != 0
    }

    /// Executable (`PF_X`).
    pub fn is_executable(&self) -> bool {
        self.flags & libc::PF_X != 0
    }

    /// Whether `[link_addr, link_addr + len)` lies inside this segment.
    pub(crate) fn covers(&self, link_addr: usize, len: usize) -> bool {
        link_addr >= self.vaddr
            && link_addr.checked_add(len).is_some_and(|end| end <= self.vaddr.saturating_add(self.memsz))
    }
}

/// One `PT_NOTE` segment, at its link-time address (add the object's bias
/// for the runtime address). Only those inside a readable `PT_LOAD` segment
/// are recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoteSegment {
    /// Link-time virtual address (`p_vaddr`).
    pub vaddr: usize,
    /// Size in memory (`p_memsz`).
    pub memsz: usize,
    /// Alignment of the notes in it (`p_align`: 4 or 8).
    pub align: usize,
}

/// An ELF object loaded in this process.
#[derive(Clone, Debug)]
pub struct LoadedObject {
    /// This object's id.
    pub id: ObjectId,
    /// Its file: the name the loader knows it by, or for the main executable
    /// the target of `/proc/self/exe`.
    pub path: PathBuf,
    /// Load bias: runtime address minus link-time address (0 for a non-PIE
    /// executable).
    pub bias: usize,
    /// Whether this is the main executable.
    pub is_main: bool,
    /// Its `PT_LOAD` segments as the loader mapped them.
    pub segments: Vec<Segment>,
    /// The GNU build-id read from the loaded object's memory, if it has one.
    pub build_id: Option<Vec<u8>>,
    /// Its mapped `PT_NOTE` segments, in program-header order, as the latest
    /// rescan listed them (see the module doc, "Reading notes").
    pub notes: Vec<NoteSegment>,
    /// What `dlpi_name` said (empty for the main executable).
    pub(crate) dl_name: CString,
}

impl LoadedObject {
    /// The path to open to read this object's file: `/proc/self/exe` for the
    /// main executable (valid even if its path was since replaced).
    pub fn file_to_open(&self) -> &Path {
        if self.is_main {
            Path::new("/proc/self/exe")
        } else {
            &self.path
        }
    }

    /// The segment containing `[addr, addr + len)` (runtime addresses).
    pub fn segment_at(&self, addr: usize, len: usize) -> Option<&Segment> {
        let link = addr.checked_sub(self.bias)?;
        self.segments.iter().find(|s| s.covers(link, len))
    }

    /// Keep this object loaded (see the module doc). Fails with
    /// [`SitesError::Unloaded`] if it is no longer loaded at the same bias.
    pub fn pin(&self) -> Result<Pin, SitesError> {
        let unloaded = || SitesError::Unloaded { path: self.path.clone(), bias: self.bias };
        let name = (!self.is_main).then_some(self.dl_name.as_c_str());
        let handle = loader::Handle::noload(name).ok_or_else(unloaded)?;
        if handle.load_bias() != Some(self.bias) {
            return Err(unloaded());
        }
        Ok(Pin { _handle: handle, object: self.id })
    }

    /// Each of this object's [`notes`](Self::notes) segments with its bytes,
    /// read in place from the object's memory.
    ///
    /// # Safety
    ///
    /// `pin` keeps this object loaded, and `notes` must describe the object
    /// it holds (see the module doc, "Reading notes"): the rescan that
    /// recorded them ran while `pin` was held, or no object was loaded or
    /// unloaded between that rescan and the taking of `pin`.
    ///
    /// # Panics
    ///
    /// If `pin` is not a pin of this object.
    pub(crate) unsafe fn note_bytes<'p>(&self, pin: &'p Pin) -> Vec<(NoteSegment, &'p [u8])> {
        assert_eq!(pin.object, self.id, "a pin of {} used to read {}", pin.object, self.id);
        self.notes
            .iter()
            .map(|n| {
                // SAFETY: the listing checked that the segment lies inside a
                // readable PT_LOAD segment of the object it listed; per the
                // contract that is the object `pin` holds, so the bytes stay
                // mapped for as long as the pin is borrowed. Notes are file
                // contents, never written after mapping.
                let bytes =
                    unsafe { std::slice::from_raw_parts(self.bias.wrapping_add(n.vaddr) as *const u8, n.memsz) };
                (*n, bytes)
            })
            .collect()
    }
}

/// A reference that keeps one object loaded; see [`LoadedObject::pin`].
#[derive(Debug)]
pub struct Pin {
    /// Closed (`dlclose`) when the pin is dropped.
    _handle: loader::Handle,
    /// The object it was taken for.
    object: ObjectId,
}

/// What one [`Objects::rescan`] found changed.
#[derive(Clone, Debug, Default)]
pub struct ObjectChanges {
    /// The generation after this rescan.
    pub generation: u64,
    /// Objects that appeared, in the loader's order.
    pub added: Vec<ObjectId>,
    /// Objects that disappeared (dlclosed), with what was known of them.
    pub removed: Vec<LoadedObject>,
    /// The loader loaded or unloaded more objects since the previous rescan
    /// than `added`/`removed` show: some object was unloaded and loaded
    /// again at the same address, or loaded and unloaded in between. Objects
    /// that kept their id may hold freshly loaded code.
    pub possibly_reloaded: bool,
}

impl ObjectChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && !self.possibly_reloaded
    }
}

/// The loaded objects of this process, as of the last rescan.
#[derive(Debug, Default)]
pub struct Objects {
    objects: Vec<LoadedObject>,
    generation: u64,
    /// `(dlpi_adds, dlpi_subs)` seen at the last rescan.
    counters: Option<(u64, u64)>,
}

impl Objects {
    /// An empty list; call [`rescan`](Self::rescan) to fill it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The objects loaded now, with what changed since the last rescan.
    pub fn rescan(&mut self) -> ObjectChanges {
        let listing = enumerate();
        let mut old: HashMap<(PathBuf, usize), LoadedObject> =
            self.objects.drain(..).map(|o| ((o.path.clone(), o.bias), o)).collect();
        let mut added = Vec::new();
        for raw in listing.objects {
            if let Some(mut kept) = old.remove(&(raw.path.clone(), raw.bias)) {
                // The same unless it was reloaded: then these are the ones
                // mapped now (see "Reading notes").
                kept.notes = raw.notes;
                self.objects.push(kept);
                continue;
            }
            let id = ObjectId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
            added.push(id);
            self.objects.push(LoadedObject {
                id,
                path: raw.path,
                bias: raw.bias,
                is_main: raw.is_main,
                segments: raw.segments,
                build_id: raw.build_id,
                notes: raw.notes,
                dl_name: raw.dl_name,
            });
        }
        let mut removed: Vec<LoadedObject> = old.into_values().collect();
        removed.sort_by_key(|o| o.id);

        let possibly_reloaded = match (self.counters, listing.counters) {
            (Some((adds0, subs0)), Some((adds1, subs1))) => {
                adds1.wrapping_sub(adds0) != added.len() as u64 || subs1.wrapping_sub(subs0) != removed.len() as u64
            }
            _ => false,
        };
        self.counters = listing.counters;
        if !added.is_empty() || !removed.is_empty() || possibly_reloaded {
            self.generation += 1;
        }
        ObjectChanges { generation: self.generation, added, removed, possibly_reloaded }
    }

    /// Number of rescans that changed something.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The loader's counters (`dlpi_adds`, `dlpi_subs`) as the last rescan
    /// read them, in the same walk as the objects. `None` before the first
    /// rescan, or if the loader does not report them.
    pub(crate) fn counters(&self) -> Option<(u64, u64)> {
        self.counters
    }

    /// The objects, in the loader's order (main executable first).
    pub fn iter(&self) -> impl Iterator<Item = &LoadedObject> {
        self.objects.iter()
    }

    /// The object with this id, if still loaded as of the last rescan.
    pub fn get(&self, id: ObjectId) -> Option<&LoadedObject> {
        self.objects.iter().find(|o| o.id == id)
    }

    /// The main executable.
    pub fn main(&self) -> Option<&LoadedObject> {
        self.objects.iter().find(|o| o.is_main)
    }

    /// The object loaded from `path` (compared as given to dlopen, or
    /// canonicalised: both are tried).
    pub fn by_path(&self, path: &Path) -> Option<&LoadedObject> {
        let canonical = std::fs::canonicalize(path).ok();
        self.objects.iter().find(|o| {
            o.path == path
                || canonical
                    .as_deref()
                    .is_some_and(|c| o.path == c || std::fs::canonicalize(&o.path).ok().as_deref() == Some(c))
        })
    }
}

/// One object as the enumeration saw it.
struct RawObject {
    path: PathBuf,
    dl_name: CString,
    bias: usize,
    is_main: bool,
    segments: Vec<Segment>,
    build_id: Option<Vec<u8>>,
    notes: Vec<NoteSegment>,
}

struct Listing {
    objects: Vec<RawObject>,
    counters: Option<(u64, u64)>,
}

/// What the callback copies out of one `dl_phdr_info`.
struct Entry {
    name: CString,
    bias: usize,
    segments: Vec<Segment>,
    /// Runtime address of the ELF header (the segment with file offset 0).
    ehdr: Option<usize>,
    build_id: Option<Vec<u8>>,
    notes: Vec<NoteSegment>,
    counters: Option<(u64, u64)>,
}

fn enumerate() -> Listing {
    let mut entries: Vec<Entry> = Vec::new();
    loader::for_each_object(|info| {
        entries.push(Entry::of(info));
        ControlFlow::Continue(())
    });
    let vdso = loader::vdso_base();
    let counters = entries.last().and_then(|e| e.counters);
    let mut objects = Vec::new();
    let mut seen_main = false;
    for e in entries {
        if vdso.is_some() && e.ehdr == vdso {
            continue;
        }
        let (path, is_main) = if e.name.as_bytes().is_empty() {
            if seen_main {
                continue; // nameless and not the executable: no file to read
            }
            seen_main = true;
            let exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
            (exe, true)
        } else {
            (PathBuf::from(OsStr::from_bytes(e.name.as_bytes())), false)
        };
        objects.push(RawObject {
            path,
            dl_name: e.name,
            bias: e.bias,
            is_main,
            segments: e.segments,
            build_id: e.build_id,
            notes: e.notes,
        });
    }
    Listing { objects, counters }
}

impl Entry {
    /// One object's facts, copied during the loader's walk (under its lock:
    /// the object stays loaded meanwhile). Never panics (a panic here would
    /// abort: the loader's frames cannot be unwound).
    fn of(info: &LoadedObjectInfo<'_>) -> Entry {
        let (name, bias, phdrs) = (info.name.to_owned(), info.bias, info.phdrs);
        let segments: Vec<Segment> = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .map(|p| Segment { vaddr: p.p_vaddr as usize, memsz: p.p_memsz as usize, flags: p.p_flags })
            .collect();
        let ehdr = phdrs
            .iter()
            .find(|p| p.p_type == libc::PT_LOAD && p.p_offset == 0)
            .map(|p| bias.wrapping_add(p.p_vaddr as usize));
        let notes: Vec<NoteSegment> = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_NOTE)
            .map(|p| NoteSegment { vaddr: p.p_vaddr as usize, memsz: p.p_memsz as usize, align: p.p_align as usize })
            .filter(|n| segments.iter().any(|s| s.is_readable() && s.covers(n.vaddr, n.memsz)))
            .collect();
        let mut build_id = None;
        for note in &notes {
            // SAFETY: the note lies inside a readable PT_LOAD segment of an
            // object the loader holds loaded during this callback.
            let bytes = unsafe { std::slice::from_raw_parts(bias.wrapping_add(note.vaddr) as *const u8, note.memsz) };
            if let Some(id) = super::elf::gnu_build_id(bytes, note.align as u64) {
                build_id = Some(id);
                break;
            }
        }
        Entry { name, bias, segments, ehdr, build_id, notes, counters: info.counters }
    }
}

/// The loader's counters of objects loaded and unloaded so far (`dlpi_adds`,
/// `dlpi_subs`), read now: equal values at two moments mean that no object
/// was loaded or unloaded in between. `None` if the loader does not report
/// them. Cheaper than a rescan: the walk stops at the first object.
pub(crate) fn loader_counters() -> Option<(u64, u64)> {
    loader::counters()
}
