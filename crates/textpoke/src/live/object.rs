//! Patch objects: loading a patch `.so` and resolving what it replaces in
//! this process ([`load`]), or checking a patch file against another
//! process before attaching to it ([`PatchFile`]).
//!
//! # Loading (`load`)
//!
//! 1. `dlopen(path, RTLD_NOW | RTLD_LOCAL)`: the patch's own references
//!    are bound now (a missing one fails here, not in a patched call), and
//!    its symbols stay out of the global scope. Its ELF constructors run.
//! 2. Its records (`notes.rs`) are read from its `PT_NOTE` segments in
//!    memory, strings from its read-only segments.
//! 3. Each target object is found among the loaded objects (the main
//!    executable when the record names none; else the object whose path is
//!    the name or ends with `/name` (the file name, or more path
//!    components; the executable may be named too), or whose `DT_SONAME`
//!    (read from its dynamic section in memory) is the name: `libssl.so.3`
//!    finds `/usr/lib/x86_64-linux-gnu/libssl.so.3.0.11`. Several matches
//!    are refused, listing them. Its GNU build-id (read from its notes in
//!    memory) is compared with the one the patch expects: a mismatch is
//!    refused, showing both.
//! 4. Each target symbol is looked up in the object's file on disk
//!    (`.symtab`; for a stripped file, its separate debug file's, found by
//!    build-id or `.gnu_debuglink` as gdb does and of the same build-id;
//!    else `.dynsym`), whose build-id must be the mapped one's:
//!    a local symbol by the `STT_FILE` symbol preceding it or by its
//!    position (`sympos`, 1-based, in symbol-table order, as the kernel's
//!    `klp_find_object_symbol`); a name that still matches several
//!    addresses is refused ("unresolvable ambiguity"), listing them.
//!    Its size is its `st_size`; its other fragments are the local
//!    functions `name.cold` / `name.cold.N` of the same `STT_FILE` scope
//!    (gcc's split-off unlikely blocks: a thread there is inside the
//!    target; [`FuncDesc::target_fragments`]). A Rust-ABI target (a
//!    Rust-mangled name) needs a patch built by the same rustc (both
//!    `.comment`s).
//! 5. Replacements' and callbacks' addresses come from the records; a
//!    replacement's size and `.cold` fragments from the patch file's
//!    symbols at that address.
//! 6. Only when everything resolved are the patch's slots written
//!    (`LP_SYMBOL`: target addresses, the engine's [`shadow::API`]), with
//!    Release stores that the slot readers' Acquire loads pair with.
//!
//! Any error drops the handle (`dlclose`) and writes nothing. The
//! [`PatchDesc`]'s `keep_alive` holds the patch's handle and a reference on
//! every target library (so neither is unloaded while patched).
//!
//! # Checking another process (`PatchFile::check_process`)
//!
//! The same records, read from the file (`PT_NOTE` segments, strings from
//! `PT_LOAD` file bytes), and the same object matching against the paths
//! of `/proc/PID/maps` (the executable: `/proc/PID/exe`) and their files'
//! `DT_SONAME`s; the matched files' `NT_GNU_BUILD_ID` are compared.
//! Symbols are resolved only by `load`, in the process itself.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SymbolKind};

use super::desc::{Callbacks, FuncDesc, PatchDesc, PostCallback, PreCallback};
use super::notes::{self, hex, CallbackKind, Image, NoteError, PatchNotes, SymbolKind as SlotKind, TargetRef};
use super::shadow;
use crate::sys::loader;

/// Why a patch cannot be loaded or does not fit a process. Every variant
/// names what was wrong and says what to do; nothing was patched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// `dlopen` refused the patch.
    #[error("cannot load patch {path}: {error} (a patch is a shared object: build it with -shared -fPIC)")]
    Open { path: PathBuf, error: String },
    /// A file could not be read or is not a 64-bit ELF file.
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: String },
    /// A malformed record.
    #[error("patch {path}: {error}")]
    Notes { path: PathBuf, error: NoteError },
    /// The patch has no `LP_FUNC` record.
    #[error(
        "{path} is not a textpoke patch: it replaces no function (write TEXTPOKE_LIVEPATCH(target, replacement) \
         lines, or use textpoke::livepatch!)"
    )]
    NoFunctions { path: PathBuf },
    /// A target object is not loaded in the process.
    #[error("patch {patch}: target object {object} is not loaded in {process}; nothing was patched")]
    ObjectNotLoaded { patch: PathBuf, object: String, process: String },
    /// Several loaded objects match a target object's name.
    #[error("patch {patch}: target object {object} matches several loaded objects ({}); name it by a longer path suffix", candidates.join(", "))]
    ObjectAmbiguous { patch: PathBuf, object: String, candidates: Vec<String> },
    /// A target's build-id is not the one the patch was built for.
    #[error(
        "patch {patch} was built for {object} with build-id {expected}, but {found_in} has build-id {found}; \
         refusing (nothing was patched): build the patch against this exact build of the target"
    )]
    BuildIdMismatch {
        patch: PathBuf,
        object: String,
        /// "PATH in process PID".
        found_in: String,
        expected: String,
        found: String,
    },
    /// The file on disk is not the one mapped (replaced since loading).
    #[error(
        "{path} on disk (build-id {on_disk}) is not the file loaded in this process (build-id {mapped}): it was \
         replaced since; symbols cannot be resolved from it"
    )]
    FileChanged { path: PathBuf, on_disk: String, mapped: String },
    /// No symbol matches a target.
    #[error("patch {patch}: no symbol {target} (is the file stripped? static functions need its .symtab)")]
    SymbolNotFound { patch: PathBuf, target: Box<TargetRef> },
    /// Several symbols match a target.
    #[error(
        "patch {patch}: unresolvable ambiguity for {target}: {} match ({}); name the file \
         (TEXTPOKE_LIVEPATCH_STATIC / `\"name\" in \"file.c\"`) or the position (TEXTPOKE_LIVEPATCH_POS / `@ N`)",
        candidates.len(), candidates.join(", ")
    )]
    Ambiguous { patch: PathBuf, target: Box<TargetRef>, candidates: Vec<String> },
    /// The symbol cannot be patched or pointed to.
    #[error("patch {patch}: {target} {what}")]
    BadTarget { patch: PathBuf, target: Box<TargetRef>, what: String },
    /// A replacement, callback or slot of the patch itself is unusable.
    #[error("patch {patch}: {what}")]
    BadPatch { patch: PathBuf, what: String },
    /// A Rust-ABI target and a patch from another compiler.
    #[error(
        "patch {patch}: {target} has the Rust ABI, which only the same compiler keeps: the target was built by \
         {target_rustc}, the patch by {patch_rustc}; rebuild the patch with the target's rustc (and flags)"
    )]
    Rustc { patch: PathBuf, target: Box<TargetRef>, target_rustc: String, patch_rustc: String },
    /// The process cannot be inspected.
    #[error("cannot inspect process {pid}: {error}")]
    Process { pid: i32, error: String },
}

// ------------------------------------------------------------ ELF files

/// What textpoke needs from an ELF file on disk.
struct FileFacts {
    build_id: Option<Vec<u8>>,
    /// `.symtab` if present, else `.dynsym`, in table order.
    symbols: Vec<Sym>,
    /// The `rustc version …` line of `.comment`.
    rustc: Option<String>,
}

#[derive(Clone)]
struct Sym {
    name: String,
    addr: u64,
    size: u64,
    kind: SymbolKind,
    local: bool,
    /// The `STT_FILE` symbol before it (locals only).
    file: Option<String>,
    /// The table index of that `STT_FILE` symbol: which object file's
    /// locals it is among (two files may share a name).
    scope: Option<usize>,
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> ObjectError {
    ObjectError::Read { path: path.to_path_buf(), error: e.to_string() }
}

fn parse_elf<'d>(path: &Path, data: &'d [u8]) -> Result<ElfFile64<'d, Endianness>, ObjectError> {
    ElfFile64::<Endianness>::parse(data).map_err(|e| read_err(path, format!("not a 64-bit ELF file: {e}")))
}

fn file_facts(path: &Path, elf: &ElfFile64<'_, Endianness>) -> Result<FileFacts, ObjectError> {
    let build_id = elf.build_id().map_err(|e| read_err(path, e))?.map(<[u8]>::to_vec);
    let mut symbols = table_symbols(elf.symbols());
    if symbols.is_empty() {
        // Stripped: its separate debug file's `.symtab`, else `.dynsym`.
        symbols = debug_symbols(path, elf, build_id.as_deref()).unwrap_or_else(|| table_symbols(elf.dynamic_symbols()));
    }
    let rustc = elf.section_by_name(".comment").and_then(|c| c.data().ok()).and_then(|d| {
        d.split(|&b| b == 0)
            .filter_map(|l| std::str::from_utf8(l).ok())
            .find(|l| l.starts_with("rustc version "))
            .map(str::to_string)
    });
    Ok(FileFacts { build_id, symbols, rustc })
}

/// The symbols of one table, in table order, each local with the
/// `STT_FILE` symbol before it.
fn table_symbols<'d: 'f, 'f>(
    table: impl Iterator<Item = object::read::elf::ElfSymbol64<'d, 'f, Endianness>>,
) -> Vec<Sym> {
    let mut symbols = Vec::new();
    let mut file = None;
    let mut scope = None;
    for s in table {
        let name = s.name().unwrap_or("");
        if s.kind() == SymbolKind::File {
            file = Some(name.to_string());
            scope = Some(s.index().0);
            continue;
        }
        if !s.is_local() {
            (file, scope) = (None, None); // globals follow every local: no file scope
        }
        if s.is_undefined() || name.is_empty() {
            continue;
        }
        let local = s.is_local();
        symbols.push(Sym {
            name: name.to_string(),
            addr: s.address(),
            size: s.size(),
            kind: s.kind(),
            local,
            file: if local { file.clone() } else { None },
            scope: if local { scope } else { None },
        });
    }
    symbols
}

/// Where distributions install separate debug files.
const DEBUG_DIR: &str = "/usr/lib/debug";

/// The `.symtab` of the separate debug file of the stripped object at
/// `path`, found as gdb finds it — by build-id
/// (`/usr/lib/debug/.build-id/ab/cdef….debug`), else by its
/// `.gnu_debuglink` name next to the object, in its `.debug/` directory,
/// or under `/usr/lib/debug` + its directory — and taken only if its
/// build-id is the object's. `None` if there is none.
fn debug_symbols(path: &Path, elf: &ElfFile64<'_, Endianness>, build_id: Option<&[u8]>) -> Option<Vec<Sym>> {
    let build_id = build_id?;
    let mut candidates = Vec::new();
    if build_id.len() >= 2 {
        let h = hex(build_id);
        candidates.push(PathBuf::from(format!("{DEBUG_DIR}/.build-id/{}/{}.debug", &h[..2], &h[2..])));
    }
    let link = elf.gnu_debuglink().ok().flatten().and_then(|(name, _)| std::str::from_utf8(name).ok());
    let dir = std::fs::canonicalize(path).ok().and_then(|p| p.parent().map(Path::to_path_buf));
    if let (Some(link), Some(dir)) = (link, dir) {
        candidates.push(dir.join(link));
        candidates.push(dir.join(".debug").join(link));
        candidates.push(PathBuf::from(format!("{DEBUG_DIR}{}/{link}", dir.display())));
    }
    candidates.into_iter().find_map(|c| {
        let data = std::fs::read(&c).ok()?;
        let debug = ElfFile64::<Endianness>::parse(&*data).ok()?;
        if debug.build_id().ok()?? != build_id {
            return None; // another build's
        }
        Some(table_symbols(debug.symbols())).filter(|s| !s.is_empty())
    })
}

fn read_facts(path: &Path) -> Result<FileFacts, ObjectError> {
    let data = std::fs::read(path).map_err(|e| read_err(path, e))?;
    file_facts(path, &parse_elf(path, &data)?)
}

/// Whether a record's file name designates the `STT_FILE` name `seen`.
fn file_matches(seen: &str, wanted: &str) -> bool {
    seen == wanted || seen.ends_with(&format!("/{wanted}")) || wanted.ends_with(&format!("/{seen}"))
}

/// Whether a record's object name designates the object at `path`.
fn object_matches(path: &str, wanted: &str) -> bool {
    path == wanted || path.ends_with(&format!("/{wanted}"))
}

/// The `DT_SONAME` of the ELF file at `path`, reading only its headers,
/// dynamic section and strings; `None` if it has none or cannot be read.
/// Only a regular file is opened (a process may map device files, whose
/// opening is not always harmless).
fn file_soname(path: &Path) -> Option<String> {
    use object::read::elf::Dyn;
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let cache = object::ReadCache::new(std::fs::File::open(path).ok()?);
    let elf = ElfFile64::<Endianness, _>::parse(&cache).ok()?;
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let (dynamic, link) = sections.dynamic(endian, &cache).ok()??;
    let strings = sections.strings(endian, &cache, link).ok()?;
    let soname = dynamic.iter().find(|d| d.d_tag(endian) == u64::from(object::elf::DT_SONAME))?;
    let offset = u32::try_from(soname.d_val(endian)).ok()?;
    strings.get(offset).ok().map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Resolves `t` among `facts`' symbols (addresses at link time).
fn find_symbol<'f>(patch: &Path, facts: &'f FileFacts, t: &TargetRef, want_func: bool) -> Result<&'f Sym, ObjectError> {
    let kind_ok = |k: SymbolKind| {
        if want_func {
            k == SymbolKind::Text
        } else {
            matches!(k, SymbolKind::Text | SymbolKind::Data)
        }
    };
    let named: Vec<&Sym> = facts.symbols.iter().filter(|s| s.name == t.name).collect();
    let mut cands: Vec<&Sym> = named
        .iter()
        .copied()
        .filter(|s| kind_ok(s.kind))
        .filter(|s| match &t.file {
            Some(f) => s.local && s.file.as_deref().is_some_and(|seen| file_matches(seen, f)),
            None => true,
        })
        .collect();
    if t.sympos != 0 {
        cands = cands.get(t.sympos as usize - 1).copied().into_iter().collect();
    }
    let mut addrs: Vec<&Sym> = Vec::new();
    for s in cands {
        if !addrs.iter().any(|a| a.addr == s.addr) {
            addrs.push(s);
        }
    }
    let describe = |s: &Sym| {
        format!("{:#x} size {}{}", s.addr, s.size, s.file.as_ref().map(|f| format!(" in {f}")).unwrap_or_default())
    };
    let target = Box::new(t.clone());
    match addrs[..] {
        [] => match named.iter().find(|s| !kind_ok(s.kind)) {
            Some(s) if t.file.is_none() && t.sympos == 0 => Err(ObjectError::BadTarget {
                patch: patch.into(),
                target,
                what: format!(
                    "is not a {} (symbol kind {:?})",
                    if want_func { "function" } else { "function or variable" },
                    s.kind
                ),
            }),
            _ => Err(ObjectError::SymbolNotFound { patch: patch.into(), target }),
        },
        [s] if want_func && s.size == 0 => Err(ObjectError::BadTarget {
            patch: patch.into(),
            target,
            what: "has no size in the symbol table (an assembly function without .size?)".into(),
        }),
        [s] => Ok(s),
        _ => Err(ObjectError::Ambiguous {
            patch: patch.into(),
            target,
            candidates: addrs.iter().map(|s| describe(s)).collect(),
        }),
    }
}

/// The other fragments of function `f`, `(address, size)` at link time:
/// gcc's `f.cold` and `f.cold.N` parts (its unlikely blocks, moved to
/// `.text.unlikely`; clang's `-fsplit-machine-functions` names them the
/// same). They are local functions among the locals of `f`'s object file
/// (the same `STT_FILE` scope, as for `f` itself); for a global `f`, of
/// every scope that has no local function of `f`'s name (whose `.cold`
/// parts would be that local's). Erring towards more fragments only makes
/// stack checks more conservative.
///
/// The parts are named after the function's own name, which may be an
/// alias of the name the patch gives (glibc's `read` is `__libc_read`):
/// every function symbol at `f`'s address is looked for.
fn fragments(facts: &FileFacts, f: &Sym) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = facts
        .symbols
        .iter()
        .filter(|a| a.addr == f.addr && a.kind == SymbolKind::Text)
        .flat_map(|a| fragments_named(facts, a))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// [`fragments`] named after `f`'s name.
fn fragments_named<'f>(facts: &'f FileFacts, f: &'f Sym) -> impl Iterator<Item = (u64, u64)> + 'f {
    let is_part = |name: &str| {
        let Some(rest) = name.strip_prefix(f.name.as_str()).and_then(|r| r.strip_prefix(".cold")) else {
            return false;
        };
        rest.is_empty()
            || rest.strip_prefix('.').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let same_scope = |p: &Sym| {
        if f.local {
            p.scope == f.scope
        } else {
            !facts.symbols.iter().any(|o| o.local && o.name == f.name && o.scope == p.scope)
        }
    };
    facts
        .symbols
        .iter()
        .filter(move |p| p.local && p.kind == SymbolKind::Text && is_part(&p.name) && same_scope(p))
        .map(|p| (p.addr, p.size.max(1)))
}

/// Whether `name` is a Rust-mangled symbol (legacy with its hash, or v0).
fn is_rust_symbol(name: &str) -> bool {
    if name.starts_with("_R") {
        return rustc_demangle::try_demangle(name).is_ok();
    }
    match rustc_demangle::try_demangle(name) {
        Ok(d) => name.starts_with("_ZN") && format!("{d}") != format!("{d:#}"),
        Err(_) => false,
    }
}

// ------------------------------------------------------------ loaded objects

/// One program header, copied.
#[derive(Clone, Copy, Debug)]
struct Seg {
    ty: u32,
    flags: u32,
    vaddr: u64,
    memsz: u64,
    filesz: u64,
    align: u64,
}

impl Seg {
    fn holds(&self, vaddr: u64, len: u64) -> bool {
        vaddr >= self.vaddr && vaddr.checked_add(len).is_some_and(|e| e <= self.vaddr + self.memsz)
    }
}

/// A loaded object of this process.
struct Loaded {
    /// The loader's name (the main executable: the path of /proc/self/exe).
    path: String,
    /// Its `DT_SONAME` (read from its dynamic section in memory; by
    /// `check_process`, from the file).
    soname: Option<String>,
    is_main: bool,
    bias: usize,
    segs: Vec<Seg>,
    /// Its GNU build-id, read from its notes in memory.
    build_id: Option<Vec<u8>>,
}

fn loaded_objects() -> Vec<Loaded> {
    let exe = std::fs::read_link("/proc/self/exe").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = Vec::new();
    loader::for_each_object(|o| {
        let segs: Vec<Seg> = o
            .phdrs
            .iter()
            .map(|p| Seg {
                ty: p.p_type,
                flags: p.p_flags,
                vaddr: p.p_vaddr,
                memsz: p.p_memsz,
                filesz: p.p_filesz,
                align: p.p_align,
            })
            .collect();
        let soname = segs.iter().find(|s| s.ty == libc::PT_DYNAMIC).and_then(|s| {
            // SAFETY: the loader's lock is held during the walk, so the
            // object stays mapped; its PT_DYNAMIC ends with DT_NULL.
            let d = unsafe { loader::read_dynamic(o.bias.wrapping_add(s.vaddr as usize), o.bias) };
            if d.soname == 0 || d.strtab == 0 {
                return None;
            }
            // SAFETY: as above; DT_SONAME is an offset of a NUL-terminated
            // string in the object's mapped DT_STRTAB.
            let name = unsafe { std::ffi::CStr::from_ptr((d.strtab + d.soname) as *const std::ffi::c_char) };
            Some(name.to_string_lossy().into_owned())
        });
        let mut build_id = None;
        for s in segs.iter().filter(|s| s.ty == libc::PT_NOTE) {
            // SAFETY: the loader's lock is held during the walk, so the
            // object stays mapped; a PT_NOTE segment lies in its mapped,
            // readable first PT_LOAD bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(o.bias.wrapping_add(s.vaddr as usize) as *const u8, s.filesz as usize)
            };
            build_id = build_id.or_else(|| gnu_build_id(bytes, s.align));
        }
        let is_main = out.is_empty();
        let path = if is_main { exe.clone() } else { o.name.to_string_lossy().into_owned() };
        out.push(Loaded { path, soname, is_main, bias: o.bias, segs, build_id });
        ControlFlow::Continue(())
    });
    out
}

/// The GNU build-id in a block of ELF notes (a `PT_NOTE` segment's bytes).
fn gnu_build_id(notes: &[u8], align: u64) -> Option<Vec<u8>> {
    let endian = Endianness::default();
    let mut it =
        object::read::elf::NoteIterator::<object::elf::FileHeader64<Endianness>>::new(endian, align, notes).ok()?;
    while let Ok(Some(note)) = it.next() {
        if note.name() == object::elf::ELF_NOTE_GNU && note.n_type(endian) == object::elf::NT_GNU_BUILD_ID {
            return Some(note.desc().to_vec());
        }
    }
    None
}

/// The object a record's name designates, among `objects` (main first).
fn pick<'o>(
    patch: &Path,
    objects: &'o [Loaded],
    wanted: Option<&str>,
    process: &str,
) -> Result<&'o Loaded, ObjectError> {
    let Some(wanted) = wanted else {
        return objects.first().ok_or_else(|| ObjectError::ObjectNotLoaded {
            patch: patch.into(),
            object: "the main executable".into(),
            process: process.into(),
        });
    };
    let by_soname = |o: &Loaded| o.soname.as_deref() == Some(wanted);
    let m: Vec<&Loaded> = objects.iter().filter(|o| object_matches(&o.path, wanted) || by_soname(o)).collect();
    match m[..] {
        [o] => Ok(o),
        [] => Err(ObjectError::ObjectNotLoaded { patch: patch.into(), object: wanted.into(), process: process.into() }),
        _ => Err(ObjectError::ObjectAmbiguous {
            patch: patch.into(),
            object: wanted.into(),
            candidates: m
                .iter()
                .map(|o| match &o.soname {
                    Some(soname) if by_soname(o) && !object_matches(&o.path, wanted) => {
                        format!("{} (SONAME {soname})", o.path)
                    }
                    _ => o.path.clone(),
                })
                .collect(),
        }),
    }
}

fn check_build_id(
    patch: &Path,
    notes: &PatchNotes,
    object: Option<&str>,
    path: &str,
    found: Option<&[u8]>,
    process: &str,
) -> Result<(), ObjectError> {
    let Some(expected) = notes.build_id_of(object) else { return Ok(()) };
    if found == Some(expected) {
        return Ok(());
    }
    Err(ObjectError::BuildIdMismatch {
        patch: patch.into(),
        object: object.unwrap_or("the main executable").into(),
        found_in: format!("{path} in {process}"),
        expected: hex(expected),
        found: found.map_or_else(|| "none (linked without --build-id)".into(), hex),
    })
}

// ------------------------------------------------------------ load()

/// A `dlopen` handle of a patch, closed when dropped.
struct PatchHandle(*mut c_void);

// SAFETY: a dlopen handle may be used and closed from any thread.
unsafe impl Send for PatchHandle {}
// SAFETY: as above; it is only ever closed, once, by Drop.
unsafe impl Sync for PatchHandle {}

impl PatchHandle {
    /// The load bias of the object (`l_addr` of its link map).
    fn load_bias(&self) -> Option<usize> {
        let mut map: *mut LinkMapHead = std::ptr::null_mut();
        // SAFETY: a live handle; RTLD_DI_LINKMAP stores one `struct
        // link_map *` through the pointer passed.
        let rc = unsafe { libc::dlinfo(self.0, libc::RTLD_DI_LINKMAP, (&mut map as *mut *mut LinkMapHead).cast()) };
        if rc != 0 || map.is_null() {
            return None;
        }
        // SAFETY: glibc's `struct link_map` starts with `ElfW(Addr) l_addr`;
        // the handle keeps the map alive.
        Some(unsafe { (*map).l_addr })
    }
}

/// The first field of glibc's `struct link_map`.
#[repr(C)]
struct LinkMapHead {
    l_addr: usize,
}

impl Drop for PatchHandle {
    fn drop(&mut self) {
        // SAFETY: a handle from a successful dlopen, closed once.
        unsafe { libc::dlclose(self.0) };
    }
}

/// References on target libraries, so they stay loaded while patched.
struct Pins(#[allow(dead_code)] Vec<loader::Handle>);

// SAFETY: loader handles may be closed from any thread.
unsafe impl Send for Pins {}
// SAFETY: never used, only dropped.
unsafe impl Sync for Pins {}

/// What `keep_alive` holds: the target pins are dropped after the patch.
struct KeepAlive {
    _patch: PatchHandle,
    _targets: Pins,
}

fn dlopen_local(path: &Path) -> Result<PatchHandle, ObjectError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| ObjectError::Open { path: path.into(), error: "the path contains a NUL byte".into() })?;
    // SAFETY: a NUL-terminated path. dlopen runs the patch's initialisers,
    // which is what loading a patch means.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns null or a NUL-terminated message valid
        // until the next dl call in this thread.
        let e = unsafe { libc::dlerror() };
        let error = if e.is_null() {
            "dlopen failed".into()
        } else {
            // SAFETY: see above.
            unsafe { std::ffi::CStr::from_ptr(e) }.to_string_lossy().into_owned()
        };
        return Err(ObjectError::Open { path: path.into(), error });
    }
    Ok(PatchHandle(h))
}

/// Reads the records of a loaded object from its memory.
///
/// # Safety
///
/// `obj` is loaded and stays loaded during the call.
unsafe fn notes_in_memory(patch: &Path, obj: &Loaded) -> Result<PatchNotes, ObjectError> {
    let mut image = Image::new();
    for s in obj.segs.iter().filter(|s| s.ty == libc::PT_LOAD) {
        // Only read-only segments are read (strings, notes); writable ones
        // only bound the offsets (slots), their bytes may change.
        let readable = s.flags & libc::PF_R != 0 && s.flags & libc::PF_W == 0;
        let bytes: &[u8] = if readable {
            // SAFETY: a mapped, readable, never-written segment of an object
            // the caller keeps loaded.
            unsafe {
                std::slice::from_raw_parts(obj.bias.wrapping_add(s.vaddr as usize) as *const u8, s.memsz as usize)
            }
        } else {
            &[]
        };
        image.add_range(s.vaddr, s.memsz, bytes);
    }
    let mut out = PatchNotes::default();
    let mut index = 0;
    for s in obj.segs.iter().filter(|s| s.ty == libc::PT_NOTE) {
        let Some(bytes) = image.bytes(s.vaddr, s.filesz as usize) else { continue };
        notes::parse_notes(bytes, s.vaddr, s.align, &image, &mut index, &mut out)
            .map_err(|error| ObjectError::Notes { path: patch.into(), error })?;
    }
    Ok(out)
}

/// A target object's facts, read once per load.
struct Target<'o> {
    obj: &'o Loaded,
    facts: FileFacts,
}

fn target<'o>(
    patch: &Path,
    notes: &PatchNotes,
    objects: &'o [Loaded],
    cache: &mut HashMap<Option<String>, Target<'o>>,
    wanted: Option<&str>,
) -> Result<(), ObjectError> {
    let key = wanted.map(str::to_string);
    if cache.contains_key(&key) {
        return Ok(());
    }
    let process = format!("this process ({})", std::process::id());
    let obj = pick(patch, objects, wanted, &process)?;
    check_build_id(patch, notes, wanted, &obj.path, obj.build_id.as_deref(), &process)?;
    let file = if obj.is_main { PathBuf::from("/proc/self/exe") } else { PathBuf::from(&obj.path) };
    let facts = read_facts(&file)?;
    if let (Some(disk), Some(mem)) = (&facts.build_id, &obj.build_id) {
        if disk != mem {
            return Err(ObjectError::FileChanged {
                path: obj.path.clone().into(),
                on_disk: hex(disk),
                mapped: hex(mem),
            });
        }
    }
    cache.insert(key, Target { obj, facts });
    Ok(())
}

/// Loads the patch at `path` into this process and resolves it (see the
/// module docs): the description the transition engine applies.
///
/// Writes the patch's `LP_SYMBOL` slots; patches nothing.
pub fn load(path: &Path) -> Result<PatchDesc, ObjectError> {
    // Absolute (dlopen searches the library path for a bare name), but not
    // canonical: an agent loads `/proc/self/fd/N`, which must stay that.
    let path = std::path::absolute(path).map_err(|e| read_err(path, e))?;
    let handle = dlopen_local(&path)?;
    let bias = handle
        .load_bias()
        .ok_or_else(|| ObjectError::Open { path: path.clone(), error: "loaded, but its link map is unknown".into() })?;
    let objects = loaded_objects();
    let me = objects.iter().find(|o| !o.is_main && o.bias == bias).ok_or_else(|| ObjectError::Open {
        path: path.clone(),
        error: "loaded, but not listed by the loader".into(),
    })?;
    // SAFETY: `handle` keeps the patch loaded.
    let notes = unsafe { notes_in_memory(&path, me) }?;
    if notes.funcs.is_empty() {
        return Err(ObjectError::NoFunctions { path });
    }
    let own = read_facts(&path)?;
    if let (Some(disk), Some(mem)) = (&own.build_id, &me.build_id) {
        if disk != mem {
            return Err(ObjectError::FileChanged { path, on_disk: hex(disk), mapped: hex(mem) });
        }
    }
    let mut cache = HashMap::new();
    for o in notes.target_objects() {
        target(&path, &notes, &objects, &mut cache, o)?;
    }
    let patch_rustc = notes.rustc.clone().or_else(|| own.rustc.clone().filter(|_| notes.rust));
    let mut funcs = Vec::new();
    for f in &notes.funcs {
        let t = &cache[&f.target.object];
        let sym = find_symbol(&path, &t.facts, &f.target, true)?;
        if is_rust_symbol(&f.target.name) {
            check_rustc(&path, &f.target, t.facts.rustc.as_deref(), patch_rustc.as_deref())?;
        }
        let repl = replacement_sym(&path, &own, f)?;
        let at = |bias: usize, parts: Vec<(u64, u64)>| -> Vec<(usize, usize)> {
            parts.into_iter().map(|(a, n)| (bias.wrapping_add(a as usize), n as usize)).collect()
        };
        funcs.push(FuncDesc {
            name: f.target.name.clone(),
            target: t.obj.bias.wrapping_add(sym.addr as usize),
            target_size: sym.size as usize,
            target_fragments: at(t.obj.bias, fragments(&t.facts, sym)),
            replacement: code_addr(&path, me, f.replacement, "replacement of", &f.target.to_string())?,
            replacement_size: repl.size as usize,
            replacement_fragments: at(me.bias, fragments(&own, repl)),
        });
    }
    for (i, f) in funcs.iter().enumerate() {
        if let Some(j) = funcs[..i].iter().position(|g| g.target == f.target) {
            let what = format!(
                "{} and {} are the same function ({:#x}); replace it once",
                notes.funcs[j].target, notes.funcs[i].target, f.target
            );
            return Err(ObjectError::BadPatch { patch: path, what });
        }
    }
    let callbacks = callbacks(&path, me, &notes)?;
    let mut writes = Vec::new();
    for s in &notes.symbols {
        let value = match (&s.kind, &s.target) {
            (SlotKind::Api, _) => &shadow::API as *const shadow::Api as usize,
            (SlotKind::Address, Some(t)) => {
                let tg = &cache[&t.object];
                tg.obj.bias.wrapping_add(find_symbol(&path, &tg.facts, t, false)?.addr as usize)
            }
            (SlotKind::Address, None) => unreachable!("the parser gives every SYMBOL slot a target"),
        };
        writes.push((slot_addr(&path, me, s.slot)?, value));
    }
    for (slot, value) in writes {
        // SAFETY: slot_addr checked that the slot is an aligned word of a
        // writable, non-RELRO segment of the patch, which `handle` keeps
        // loaded. Release pairs with the Acquire loads of the slot readers
        // (textpoke.h, shadow::ApiSlot/SymbolSlot).
        unsafe { (*(slot as *const AtomicUsize)).store(value, Ordering::Release) };
    }
    let pins = cache
        .values()
        .filter(|t| !t.obj.is_main)
        .filter_map(|t| loader::Handle::noload(CString::new(t.obj.path.clone()).ok().as_deref()))
        .collect();
    let name = notes.name.clone().unwrap_or_else(|| {
        path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
    });
    Ok(PatchDesc {
        name,
        replace: notes.replace,
        funcs,
        callbacks,
        keep_alive: Some(Box::new(KeepAlive { _patch: handle, _targets: Pins(pins) })),
    })
}

fn check_rustc(patch: &Path, t: &TargetRef, target: Option<&str>, mine: Option<&str>) -> Result<(), ObjectError> {
    let Some(target_rustc) = target else { return Ok(()) }; // not built by rustc: a C++/other mangling look-alike
    if mine == Some(target_rustc) {
        return Ok(());
    }
    Err(ObjectError::Rustc {
        patch: patch.into(),
        target: Box::new(t.clone()),
        target_rustc: target_rustc.into(),
        patch_rustc: mine.unwrap_or("no rustc (a C patch, or the patch's .comment is stripped)").into(),
    })
}

/// The run-time address of code at link-time `vaddr` of the patch, which
/// must lie in one of its executable segments.
fn code_addr(patch: &Path, me: &Loaded, vaddr: u64, what: &str, of: &str) -> Result<usize, ObjectError> {
    if me.segs.iter().any(|s| s.ty == libc::PT_LOAD && s.flags & libc::PF_X != 0 && s.holds(vaddr, 1)) {
        return Ok(me.bias.wrapping_add(vaddr as usize));
    }
    Err(ObjectError::BadPatch {
        patch: patch.into(),
        what: format!("the {what} {of} at {vaddr:#x} is not in an executable segment of the patch"),
    })
}

/// The patch's symbol of a replacement (the largest sized function at its
/// address): its size and its `.cold` fragments.
fn replacement_sym<'f>(patch: &Path, own: &'f FileFacts, f: &notes::FuncRecord) -> Result<&'f Sym, ObjectError> {
    own.symbols
        .iter()
        .filter(|s| s.addr == f.replacement && s.kind == SymbolKind::Text && s.size > 0)
        .max_by_key(|s| s.size)
        .ok_or_else(|| ObjectError::BadPatch {
            patch: patch.into(),
            what: format!(
                "the replacement of {} (at {:#x}) has no sized function symbol in the patch's symbol table (do not \
                 strip the patch)",
                f.target, f.replacement
            ),
        })
}

fn callbacks(patch: &Path, me: &Loaded, notes: &PatchNotes) -> Result<Callbacks, ObjectError> {
    let mut cb = Callbacks::default();
    for c in &notes.callbacks {
        let addr = code_addr(patch, me, c.func, "callback", &format!("{:?}", c.kind))?;
        if matches!(c.kind, CallbackKind::PrePatch | CallbackKind::PreUnpatch) {
            // SAFETY: the address is code of the patch, which the records
            // declare as a pre callback; the macros type-check its
            // signature (C: a function-pointer initialiser; Rust: a const of
            // the callback type).
            let f = unsafe { std::mem::transmute::<usize, PreCallback>(addr) };
            match c.kind {
                CallbackKind::PrePatch => cb.pre_patch = Some(f),
                _ => cb.pre_unpatch = Some(f),
            }
        } else {
            // SAFETY: as above, for a post callback.
            let f = unsafe { std::mem::transmute::<usize, PostCallback>(addr) };
            match c.kind {
                CallbackKind::PostPatch => cb.post_patch = Some(f),
                _ => cb.post_unpatch = Some(f),
            }
        }
    }
    Ok(cb)
}

/// The run-time address of a slot: an aligned word of a writable PT_LOAD
/// segment outside PT_GNU_RELRO.
fn slot_addr(patch: &Path, me: &Loaded, vaddr: u64) -> Result<usize, ObjectError> {
    let word = std::mem::size_of::<usize>() as u64;
    let writable = me.segs.iter().any(|s| s.ty == libc::PT_LOAD && s.flags & libc::PF_W != 0 && s.holds(vaddr, word));
    let relro = me.segs.iter().any(|s| s.ty == libc::PT_GNU_RELRO && s.holds(vaddr, 1));
    if vaddr.is_multiple_of(word) && writable && !relro {
        return Ok(me.bias.wrapping_add(vaddr as usize));
    }
    Err(ObjectError::BadPatch {
        patch: patch.into(),
        what: format!(
            "the LP_SYMBOL slot at {vaddr:#x} is not an aligned pointer in writable data (declare it as a non-const \
             pointer variable)"
        ),
    })
}

// ------------------------------------------------------------ PatchFile

/// A patch file read from disk alone: its records, for listing and for
/// [`PatchFile::check_process`] before attaching to a process.
#[derive(Debug, Clone)]
pub struct PatchFile {
    /// The file.
    pub path: PathBuf,
    /// Its records (addresses at link time).
    pub notes: PatchNotes,
}

/// A target object found in a process by [`PatchFile::check_process`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetMatch {
    /// The name the patch gives (`None`: the main executable).
    pub object: Option<String>,
    /// The file mapped in the process.
    pub path: PathBuf,
    /// Its build-id, if it has one.
    pub build_id: Option<Vec<u8>>,
}

impl PatchFile {
    /// Reads the patch's records from the file (its `PT_NOTE` segments).
    pub fn open(path: &Path) -> Result<PatchFile, ObjectError> {
        let data = std::fs::read(path).map_err(|e| read_err(path, e))?;
        let elf = parse_elf(path, &data)?;
        let endian = elf.endian();
        let mut segs = Vec::new();
        for p in elf.elf_program_headers() {
            let off = p.p_offset(endian) as usize;
            let filesz = p.p_filesz(endian) as usize;
            let bytes = data.get(off..off.saturating_add(filesz)).unwrap_or(&[]);
            segs.push((p.p_type(endian), p.p_vaddr(endian), p.p_memsz(endian), p.p_align(endian), bytes));
        }
        let mut image = Image::new();
        for &(ty, vaddr, memsz, _, bytes) in &segs {
            if ty == libc::PT_LOAD {
                image.add_range(vaddr, memsz, bytes);
            }
        }
        let mut out = PatchNotes::default();
        let mut index = 0;
        for &(ty, vaddr, _, align, bytes) in &segs {
            if ty == libc::PT_NOTE {
                notes::parse_notes(bytes, vaddr, align, &image, &mut index, &mut out)
                    .map_err(|error| ObjectError::Notes { path: path.into(), error })?;
            }
        }
        if out.funcs.is_empty() {
            return Err(ObjectError::NoFunctions { path: path.into() });
        }
        Ok(PatchFile { path: path.into(), notes: out })
    }

    /// Checks that process `pid` has every target object of the patch
    /// mapped, with the build-ids the patch expects (its files'
    /// `NT_GNU_BUILD_ID`): the CLI's refusal before attaching. Touches
    /// nothing in the process.
    pub fn check_process(&self, pid: i32) -> Result<Vec<TargetMatch>, ObjectError> {
        let perr = |e: std::io::Error| ObjectError::Process { pid, error: e.to_string() };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(perr)?;
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(perr)?;
        let mut objects = vec![Loaded {
            path: exe.to_string_lossy().into_owned(),
            soname: file_soname(Path::new(&format!("/proc/{pid}/exe"))),
            is_main: true,
            bias: 0,
            segs: vec![],
            build_id: None,
        }];
        for line in maps.lines() {
            // address perms offset dev inode pathname (which may hold spaces)
            let Some(p) = line.splitn(6, ' ').nth(5).map(str::trim_start) else { continue };
            if p.starts_with('/') && !objects.iter().any(|o| o.path == p) {
                let soname = file_soname(Path::new(p));
                objects.push(Loaded {
                    path: p.to_string(),
                    soname,
                    is_main: false,
                    bias: 0,
                    segs: vec![],
                    build_id: None,
                });
            }
        }
        let process = format!("process {pid}");
        let mut out = Vec::new();
        for wanted in self.notes.target_objects() {
            let obj = pick(&self.path, &objects, wanted, &process)?;
            if obj.path.ends_with(" (deleted)") {
                return Err(ObjectError::Process {
                    pid,
                    error: format!("{} was deleted on disk since it was mapped; its build-id cannot be read", obj.path),
                });
            }
            let file = if obj.is_main { PathBuf::from(format!("/proc/{pid}/exe")) } else { PathBuf::from(&obj.path) };
            let data = std::fs::read(&file).map_err(|e| read_err(&file, e))?;
            let build_id = parse_elf(&file, &data)?.build_id().map_err(|e| read_err(&file, e))?.map(<[u8]>::to_vec);
            check_build_id(&self.path, &self.notes, wanted, &obj.path, build_id.as_deref(), &process)?;
            out.push(TargetMatch { object: wanted.map(str::to_string), path: obj.path.clone().into(), build_id });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_paths_and_files() {
        assert!(object_matches("/usr/lib/libfoo.so.1", "libfoo.so.1"));
        assert!(object_matches("/usr/lib/libfoo.so.1", "lib/libfoo.so.1"));
        assert!(!object_matches("/usr/lib/libxfoo.so.1", "foo.so.1"));
        assert!(file_matches("src/parse.c", "parse.c"));
        assert!(file_matches("parse.c", "src/parse.c"));
        assert!(!file_matches("reparse.c", "parse.c"));
    }

    fn sym(name: &str, addr: u64, local: bool, scope: Option<usize>) -> Sym {
        let file = scope.map(|i| format!("f{i}.c"));
        Sym { name: name.into(), addr, size: 8, kind: SymbolKind::Text, local, file, scope }
    }

    #[test]
    fn cold_fragments_are_found_in_the_function_s_file_scope() {
        let symbols = vec![
            // file 1: a static `helper` split in two, a `run.cold` of the global `run`.
            sym("helper", 0x100, true, Some(1)),
            sym("helper.cold", 0x10, true, Some(1)),
            sym("run.cold", 0x20, true, Some(1)),
            // file 5: another static `helper`, in three parts.
            sym("helper", 0x200, true, Some(5)),
            sym("helper.cold.0", 0x30, true, Some(5)),
            sym("helper.cold.1", 0x40, true, Some(5)),
            // Not fragments of `helper`: a clone's, other names.
            sym("helper.part.0.cold", 0x50, true, Some(5)),
            sym("helper.coldx", 0x60, true, Some(5)),
            sym("helper.cold.", 0x70, true, Some(5)),
            sym("helperx.cold", 0x80, true, Some(5)),
            // Globals: `run`, and `read` aliasing `__libc_read`, whose part is
            // named after the latter.
            sym("run", 0x300, false, None),
            sym("__libc_read.cold", 0x90, true, Some(9)),
            sym("__libc_read", 0x400, false, None),
            sym("read", 0x400, false, None),
        ];
        let facts = FileFacts { build_id: None, symbols, rustc: None };
        let of = |i: usize| fragments(&facts, &facts.symbols[i]);
        assert_eq!(of(0), [(0x10, 8)], "file 1's helper");
        assert_eq!(of(3), [(0x30, 8), (0x40, 8)], "file 5's helper");
        assert_eq!(of(10), [(0x20, 8)], "the global run");
        assert_eq!(of(13), [(0x90, 8)], "read, through its alias");
        assert!(of(7).is_empty(), "helper.coldx has none");
    }

    #[test]
    fn rust_abi_targets_need_the_same_rustc() {
        let t = TargetRef { object: None, name: "_ZN1a1f17h0123456789abcdefE".into(), file: None, sympos: 0 };
        let p = Path::new("p.so");
        let v = "rustc version 1.95.0 (59807616e 2026-01-01)";
        assert!(check_rustc(p, &t, Some(v), Some(v)).is_ok());
        assert!(check_rustc(p, &t, None, None).is_ok(), "a target not built by rustc");
        let e = check_rustc(p, &t, Some(v), Some("rustc version 1.94.0")).unwrap_err().to_string();
        assert!(e.contains("1.95.0") && e.contains("1.94.0"), "{e}");
        let e = check_rustc(p, &t, Some(v), None).unwrap_err().to_string();
        assert!(e.contains("no rustc"), "{e}");
    }

    #[test]
    fn rust_symbols_are_told_from_cxx_ones() {
        assert!(is_rust_symbol("_ZN4core3fmt5write17h0123456789abcdefE"));
        assert!(!is_rust_symbol("_ZN3foo3barE"));
        assert!(!is_rust_symbol("outer"));
    }
}
