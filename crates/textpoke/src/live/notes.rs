//! The records a patch object carries: their format, and one parser over
//! bytes used both for a loaded patch (its memory) and for a patch file.
//!
//! # Format
//!
//! Each record is one ELF note in `.note.textpoke` (the section of the
//! static-key records, `keys/notes.rs`), owner `"textpoke"`, types 3 to 7.
//! Every descriptor field is 4 bytes. A field named `*_off` holds the
//! address it designates minus the address of the field itself (an `i32`,
//! as in the kernel's `jump_entry`): the assembler or the linker resolves
//! it, so the records need no dynamic relocation, and they mean the same in
//! the file (at link-time addresses) and in memory (at run-time ones). An
//! offset of 0 means "absent" (a field never points at itself). Strings
//! are NUL-terminated UTF-8, at most [`MAX_STRING`] bytes, anywhere in the
//! object's loadable segments.
//!
//! ```text
//!  type 3 LP_FUNC, 24 bytes: a replaced function
//!      name_off     target symbol, as the target's symbol table spells it
//!      repl_off     the replacement (a function of the patch)
//!      file_off     STT_FILE name scoping a local (static) target, or 0
//!      sympos       u32: 1-based position among same-named symbols, 0 = must be unique
//!      object_off   target object's name (SONAME / file name / path suffix), 0 = main executable
//!      flags        u32: 0 (reserved)
//!  type 4 LP_OBJECT, 12 bytes: a target object and its build-id
//!      object_off   as above (0 = main executable)
//!      build_id_off the GNU build-id as lowercase or uppercase hex text, 0 = not checked
//!      flags        u32: 0 (reserved)
//!  type 5 LP_CALLBACK, 8 bytes
//!      kind         u32: 1 pre-patch, 2 post-patch, 3 pre-unpatch, 4 post-unpatch
//!      fn_off       the callback (pre: `int (void)`, post: `void (void)`)
//!  type 6 LP_PATCH, 16 bytes: about the whole patch; several records merge
//!      abi_version  u32: 1
//!      flags        u32: bit 0 REPLACE (atomic replace), bit 1 RUST (built by rustc)
//!      name_off     the patch's name, or 0
//!      rustc_off    the compiler's version string, or 0 (then, for a RUST patch,
//!                   the `rustc version …` line of the patch file's `.comment`)
//!  type 7 LP_SYMBOL, 24 bytes: an address written into the patch before pre-patch
//!      slot_off     the pointer-sized slot in the patch's writable data
//!      name_off     target symbol (0 for kind API)
//!      file_off, sympos, object_off   as for LP_FUNC
//!      kind         u32: 1 SYMBOL (the target symbol's address), 2 ORIGINAL (reserved,
//!                   refused), 3 API (the engine's function table, `shadow::Api`)
//! ```
//!
//! The build-id is hex *text* rather than bytes (the design note's
//! proposal) because the C preprocessor cannot turn a string into bytes.
//!
//! # Refusing
//!
//! A record that is truncated, has the wrong size, an unknown type, kind or
//! flag, an offset pointing outside the object, a string that is not
//! terminated UTF-8, or that contradicts another record (two names, two
//! pre-patch callbacks, the same target twice) is a [`NoteError`] naming the
//! record; nothing of the patch is used then. The parser never indexes out
//! of bounds whatever the bytes (`fuzz`-safe): every read is checked.

use std::fmt;

/// Owner name of textpoke's notes, NUL included.
pub const NOTE_NAME: &[u8] = b"textpoke\0";
/// A replaced function.
pub const NT_LP_FUNC: u32 = 3;
/// A target object and its build-id.
pub const NT_LP_OBJECT: u32 = 4;
/// A pre/post (un)patch callback.
pub const NT_LP_CALLBACK: u32 = 5;
/// The patch's name and flags.
pub const NT_LP_PATCH: u32 = 6;
/// A slot filled with an address at load.
pub const NT_LP_SYMBOL: u32 = 7;
/// The record format this textpoke writes and reads.
pub const ABI_VERSION: u32 = 1;
/// `LP_PATCH` flag: atomic replace.
pub const PATCH_REPLACE: u32 = 1;
/// `LP_PATCH` flag: the patch was built by rustc (`livepatch!`).
pub const PATCH_RUST: u32 = 2;
/// Longest string a record may point to, NUL excluded.
pub const MAX_STRING: usize = 4096;

/// Note types of the static-key records, left to `keys`.
const KEY_TYPES: [u32; 2] = [1, 2];

/// Which callback an `LP_CALLBACK` record gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallbackKind {
    PrePatch = 1,
    PostPatch = 2,
    PreUnpatch = 3,
    PostUnpatch = 4,
}

impl CallbackKind {
    fn from_u32(v: u32) -> Option<CallbackKind> {
        Some(match v {
            1 => CallbackKind::PrePatch,
            2 => CallbackKind::PostPatch,
            3 => CallbackKind::PreUnpatch,
            4 => CallbackKind::PostUnpatch,
            _ => return None,
        })
    }
}

/// What an `LP_SYMBOL` slot receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolKind {
    /// The address of a symbol of a target object.
    Address,
    /// The address of the engine's function table ([`super::shadow::Api`]).
    Api,
}

/// A symbol of a target object, as a record names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetRef {
    /// The object: `None` for the main executable.
    pub object: Option<String>,
    /// The symbol's name.
    pub name: String,
    /// The STT_FILE name scoping a local symbol.
    pub file: Option<String>,
    /// 1-based position among same-named symbols; 0: must be unique.
    pub sympos: u32,
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.name)?;
        if let Some(file) = &self.file {
            write!(f, " of {file}")?;
        }
        if self.sympos != 0 {
            write!(f, " (position {})", self.sympos)?;
        }
        write!(f, " in {}", self.object.as_deref().unwrap_or("the main executable"))
    }
}

/// One `LP_FUNC` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuncRecord {
    pub target: TargetRef,
    /// The replacement's link-time address in the patch.
    pub replacement: u64,
}

/// One `LP_OBJECT` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    /// `None` for the main executable.
    pub object: Option<String>,
    /// The expected GNU build-id; empty: not checked.
    pub build_id: Vec<u8>,
}

/// One `LP_CALLBACK` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallbackRecord {
    pub kind: CallbackKind,
    /// The callback's link-time address in the patch.
    pub func: u64,
}

/// One `LP_SYMBOL` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolRecord {
    /// The slot's link-time address in the patch.
    pub slot: u64,
    pub kind: SymbolKind,
    /// The symbol (kind `Address`).
    pub target: Option<TargetRef>,
}

/// Everything a patch's records say, addresses at link time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatchNotes {
    pub name: Option<String>,
    pub replace: bool,
    /// Built by rustc (`livepatch!`).
    pub rust: bool,
    /// The compiler version the records give, if any.
    pub rustc: Option<String>,
    pub funcs: Vec<FuncRecord>,
    pub objects: Vec<ObjectRecord>,
    pub callbacks: Vec<CallbackRecord>,
    pub symbols: Vec<SymbolRecord>,
}

impl PatchNotes {
    /// The build-id expected for `object` (`None`: the main executable), if
    /// the patch gives one.
    pub fn build_id_of(&self, object: Option<&str>) -> Option<&[u8]> {
        self.objects.iter().find(|o| o.object.as_deref() == object && !o.build_id.is_empty()).map(|o| &o.build_id[..])
    }

    /// Every object the patch refers to, each once, in record order
    /// (`None`: the main executable).
    pub fn target_objects(&self) -> Vec<Option<&str>> {
        let mut out: Vec<Option<&str>> = Vec::new();
        let named = self.funcs.iter().map(|f| f.target.object.as_deref());
        let syms = self.symbols.iter().filter_map(|s| s.target.as_ref()).map(|t| t.object.as_deref());
        let declared = self.objects.iter().map(|o| o.object.as_deref());
        for o in named.chain(syms).chain(declared) {
            if !out.contains(&o) {
                out.push(o);
            }
        }
        out
    }
}

/// Which record a [`NoteError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    /// The note type.
    pub ty: u32,
    /// 0-based position among the object's textpoke notes.
    pub index: usize,
    /// Link-time address of the note's header.
    pub vaddr: u64,
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.ty {
            NT_LP_FUNC => "LP_FUNC",
            NT_LP_OBJECT => "LP_OBJECT",
            NT_LP_CALLBACK => "LP_CALLBACK",
            NT_LP_PATCH => "LP_PATCH",
            NT_LP_SYMBOL => "LP_SYMBOL",
            _ => "textpoke note",
        };
        write!(f, "{name} record #{} (note type {} at {:#x})", self.index, self.ty, self.vaddr)
    }
}

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoteProblem {
    /// The note runs past the end of its segment.
    Truncated,
    /// A note type this textpoke does not know.
    UnknownType,
    /// The descriptor has the wrong size.
    BadSize { expected: usize, found: usize },
    /// Written for another record format.
    AbiVersion { found: u32 },
    /// A required offset is 0.
    Missing { field: &'static str },
    /// An offset points outside the object's loadable segments.
    BadOffset { field: &'static str, addr: u64 },
    /// The string a field points to is not NUL-terminated UTF-8 of at most
    /// [`MAX_STRING`] bytes, or is empty.
    BadString { field: &'static str, addr: u64 },
    /// The build-id text is not an even number of hex digits.
    BadBuildId { text: String },
    /// A kind or flags value this textpoke does not know.
    UnknownValue { field: &'static str, value: u32 },
    /// A feature of the format this textpoke does not implement.
    Unsupported { what: &'static str },
    /// The record contradicts an earlier one.
    Conflict { what: String },
}

impl fmt::Display for NoteProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoteProblem::Truncated => write!(f, "runs past the end of its note segment"),
            NoteProblem::UnknownType => write!(f, "has a type this textpoke does not know (built by a newer version?)"),
            NoteProblem::BadSize { expected, found } => {
                write!(f, "has {found} descriptor bytes where {expected} are expected")
            }
            NoteProblem::AbiVersion { found } => {
                write!(f, "is of record format {found}; this textpoke reads format {ABI_VERSION}")
            }
            NoteProblem::Missing { field } => write!(f, "has no `{field}` (offset 0)"),
            NoteProblem::BadOffset { field, addr } => {
                write!(f, "`{field}` points to {addr:#x}, outside the object's loadable segments")
            }
            NoteProblem::BadString { field, addr } => write!(
                f,
                "`{field}` points to {addr:#x}, which is not a non-empty NUL-terminated UTF-8 string of at most \
                 {MAX_STRING} bytes"
            ),
            NoteProblem::BadBuildId { text } => {
                write!(f, "gives the build-id {text:?}, which is not an even number of hex digits")
            }
            NoteProblem::UnknownValue { field, value } => {
                write!(f, "has `{field}` = {value}, which this textpoke does not know")
            }
            NoteProblem::Unsupported { what } => write!(f, "asks for {what}, which this textpoke does not implement"),
            NoteProblem::Conflict { what } => write!(f, "contradicts an earlier record: {what}"),
        }
    }
}

/// A malformed record: nothing of the patch is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{record} {problem}; rebuild the patch with this textpoke's textpoke.h or livepatch!")]
pub struct NoteError {
    pub record: RecordId,
    pub problem: NoteProblem,
}

/// An object's loadable segments, at link-time addresses: where a record's
/// offsets may point, and the bytes its strings are read from. The same for
/// a file (its `PT_LOAD` file bytes) and a loaded object (its mapped memory).
#[derive(Debug, Default, Clone)]
pub struct Image<'a> {
    /// (link-time start, length, readable bytes from the start: possibly
    /// fewer than the length, or none)
    segments: Vec<(u64, u64, &'a [u8])>,
}

impl<'a> Image<'a> {
    /// An image with no segment.
    pub fn new() -> Image<'a> {
        Image { segments: Vec::new() }
    }

    /// Adds the bytes `bytes` found at link-time address `vaddr`.
    pub fn add(&mut self, vaddr: u64, bytes: &'a [u8]) {
        self.segments.push((vaddr, bytes.len() as u64, bytes));
    }

    /// Adds a segment of `len` bytes at `vaddr` of which the first
    /// `bytes.len()` may be read (the rest: `.bss`, or memory not to read).
    pub fn add_range(&mut self, vaddr: u64, len: u64, bytes: &'a [u8]) {
        self.segments.push((vaddr, len.max(bytes.len() as u64), bytes));
    }

    /// The `len` bytes at `vaddr`, if one segment's readable bytes hold them.
    pub fn bytes(&self, vaddr: u64, len: usize) -> Option<&'a [u8]> {
        self.segments.iter().find_map(|&(start, _, b)| {
            let off = usize::try_from(vaddr.checked_sub(start)?).ok()?;
            b.get(off..off.checked_add(len)?)
        })
    }

    /// The NUL-terminated string at `vaddr`, without its NUL.
    fn cstr(&self, vaddr: u64) -> Option<&'a str> {
        let &(start, _, b) =
            self.segments.iter().find(|&&(start, _, b)| vaddr >= start && vaddr - start < b.len() as u64)?;
        let rest = &b[(vaddr - start) as usize..];
        let rest = &rest[..rest.len().min(MAX_STRING + 1)];
        let nul = rest.iter().position(|&c| c == 0)?;
        std::str::from_utf8(&rest[..nul]).ok().filter(|s| !s.is_empty())
    }

    /// Whether `vaddr` lies in a segment.
    pub fn contains(&self, vaddr: u64) -> bool {
        self.segments.iter().any(|&(start, len, _)| vaddr >= start && vaddr - start < len)
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

/// One record being decoded: its descriptor and where it is.
struct Record<'i, 'a> {
    id: RecordId,
    desc: &'a [u8],
    desc_vaddr: u64,
    image: &'i Image<'a>,
}

impl<'a> Record<'_, 'a> {
    fn fail<T>(&self, problem: NoteProblem) -> Result<T, NoteError> {
        Err(NoteError { record: self.id, problem })
    }

    fn word(&self, i: usize) -> u32 {
        u32_at(self.desc, i * 4).expect("descriptor size checked")
    }

    /// The address field `i` designates (`None` when 0).
    fn offset(&self, i: usize, field: &'static str) -> Result<Option<u64>, NoteError> {
        let rel = self.word(i) as i32;
        if rel == 0 {
            return Ok(None);
        }
        let addr = self.desc_vaddr.wrapping_add(4 * i as u64).wrapping_add(rel as i64 as u64);
        if !self.image.contains(addr) {
            return self.fail(NoteProblem::BadOffset { field, addr });
        }
        Ok(Some(addr))
    }

    fn required(&self, i: usize, field: &'static str) -> Result<u64, NoteError> {
        match self.offset(i, field)? {
            Some(a) => Ok(a),
            None => self.fail(NoteProblem::Missing { field }),
        }
    }

    fn string(&self, i: usize, field: &'static str) -> Result<Option<String>, NoteError> {
        let Some(addr) = self.offset(i, field)? else { return Ok(None) };
        match self.image.cstr(addr) {
            Some(s) => Ok(Some(s.to_string())),
            None => self.fail(NoteProblem::BadString { field, addr }),
        }
    }

    fn required_string(&self, i: usize, field: &'static str) -> Result<String, NoteError> {
        match self.string(i, field)? {
            Some(s) => Ok(s),
            None => self.fail(NoteProblem::Missing { field }),
        }
    }

    fn zero_flags(&self, i: usize) -> Result<(), NoteError> {
        match self.word(i) {
            0 => Ok(()),
            value => self.fail(NoteProblem::UnknownValue { field: "flags", value }),
        }
    }

    /// name, file, sympos, object at these field indices.
    fn target(&self, name: usize, file: usize, sympos: usize, object: usize) -> Result<TargetRef, NoteError> {
        Ok(TargetRef {
            name: self.required_string(name, "name_off")?,
            file: self.string(file, "file_off")?,
            sympos: self.word(sympos),
            object: self.string(object, "object_off")?,
        })
    }
}

/// Decodes hex text ("3f2a…") into bytes.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// Lowercase hex text of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes the notes in `notes` (one `PT_NOTE` segment's bytes, found at
/// link-time address `vaddr`, aligned to `align`) into `out`, reading
/// strings from `image`. Foreign notes and static-key records are skipped;
/// `index` counts textpoke notes across calls (for [`RecordId`]).
pub fn parse_notes(
    notes: &[u8],
    vaddr: u64,
    align: u64,
    image: &Image<'_>,
    index: &mut usize,
    out: &mut PatchNotes,
) -> Result<(), NoteError> {
    let align = if align == 8 { 8 } else { 4 };
    let mut off = 0usize;
    while off.checked_add(12).is_some_and(|e| e <= notes.len()) {
        let (namesz, descsz, ty) = (
            u32_at(notes, off).unwrap_or(0) as usize,
            u32_at(notes, off + 4).unwrap_or(0) as usize,
            u32_at(notes, off + 8).unwrap_or(0),
        );
        let name_off = off + 12;
        let name = notes.get(name_off..name_off.saturating_add(namesz).min(notes.len())).unwrap_or(&[]);
        let ours = namesz == NOTE_NAME.len() && NOTE_NAME.starts_with(name);
        let id = RecordId { ty, index: *index, vaddr: vaddr.wrapping_add(off as u64) };
        let desc_off = name_off.checked_add(namesz).and_then(|e| align_up(e, align));
        let end = desc_off.and_then(|d| d.checked_add(descsz));
        let (Some(desc_off), Some(end)) = (desc_off, end.filter(|&e| e <= notes.len())) else {
            if ours {
                return Err(NoteError { record: id, problem: NoteProblem::Truncated });
            }
            return Ok(()); // a foreign note list we cannot follow further
        };
        if ours {
            *index += 1;
            if !KEY_TYPES.contains(&ty) {
                let rec =
                    Record { id, desc: &notes[desc_off..end], desc_vaddr: vaddr.wrapping_add(desc_off as u64), image };
                decode(&rec, out)?;
            }
        }
        off = align_up(end, align).unwrap_or(usize::MAX);
    }
    Ok(())
}

fn expect_size(rec: &Record<'_, '_>, expected: usize) -> Result<(), NoteError> {
    if rec.desc.len() != expected {
        return rec.fail(NoteProblem::BadSize { expected, found: rec.desc.len() });
    }
    Ok(())
}

fn decode(rec: &Record<'_, '_>, out: &mut PatchNotes) -> Result<(), NoteError> {
    match rec.id.ty {
        NT_LP_FUNC => {
            expect_size(rec, 24)?;
            rec.zero_flags(5)?;
            let f = FuncRecord { target: rec.target(0, 2, 3, 4)?, replacement: rec.required(1, "repl_off")? };
            if out.funcs.iter().any(|g| g.target == f.target) {
                return rec.fail(NoteProblem::Conflict { what: format!("{} is replaced twice", f.target) });
            }
            out.funcs.push(f);
        }
        NT_LP_OBJECT => {
            expect_size(rec, 12)?;
            rec.zero_flags(2)?;
            let object = rec.string(0, "object_off")?;
            let build_id = match rec.string(1, "build_id_off")? {
                None => Vec::new(),
                Some(text) => match parse_hex(&text) {
                    Some(b) => b,
                    None => return rec.fail(NoteProblem::BadBuildId { text }),
                },
            };
            if let Some(o) = out.objects.iter().find(|o| o.object == object) {
                if o.build_id != build_id {
                    let what = format!(
                        "{} has build-id {} and {}",
                        object.as_deref().unwrap_or("the main executable"),
                        hex(&o.build_id),
                        hex(&build_id)
                    );
                    return rec.fail(NoteProblem::Conflict { what });
                }
                return Ok(());
            }
            out.objects.push(ObjectRecord { object, build_id });
        }
        NT_LP_CALLBACK => {
            expect_size(rec, 8)?;
            let kind = rec.word(0);
            let Some(kind) = CallbackKind::from_u32(kind) else {
                return rec.fail(NoteProblem::UnknownValue { field: "kind", value: kind });
            };
            let func = rec.required(1, "fn_off")?;
            if out.callbacks.iter().any(|c| c.kind == kind) {
                return rec.fail(NoteProblem::Conflict { what: format!("a second {kind:?} callback") });
            }
            out.callbacks.push(CallbackRecord { kind, func });
        }
        NT_LP_PATCH => {
            expect_size(rec, 16)?;
            let (version, flags) = (rec.word(0), rec.word(1));
            if version != ABI_VERSION {
                return rec.fail(NoteProblem::AbiVersion { found: version });
            }
            if flags & !(PATCH_REPLACE | PATCH_RUST) != 0 {
                return rec.fail(NoteProblem::UnknownValue { field: "flags", value: flags });
            }
            out.replace |= flags & PATCH_REPLACE != 0;
            out.rust |= flags & PATCH_RUST != 0;
            merge_string(rec, &mut out.name, rec.string(2, "name_off")?, "name")?;
            merge_string(rec, &mut out.rustc, rec.string(3, "rustc_off")?, "compiler version")?;
        }
        NT_LP_SYMBOL => {
            expect_size(rec, 24)?;
            let slot = rec.required(0, "slot_off")?;
            let kind = match rec.word(5) {
                1 => SymbolKind::Address,
                2 => {
                    return rec
                        .fail(NoteProblem::Unsupported { what: "an ORIGINAL slot (the version below the patch)" })
                }
                3 => SymbolKind::Api,
                value => return rec.fail(NoteProblem::UnknownValue { field: "kind", value }),
            };
            let target = match kind {
                SymbolKind::Address => Some(rec.target(1, 2, 3, 4)?),
                SymbolKind::Api => None,
            };
            if let Some(s) = out.symbols.iter().find(|s| s.slot == slot) {
                if (s.kind, &s.target) != (kind, &target) {
                    let what = format!("the slot at {slot:#x} is to receive two different addresses");
                    return rec.fail(NoteProblem::Conflict { what });
                }
                return Ok(()); // the same slot, recorded by several files
            }
            out.symbols.push(SymbolRecord { slot, kind, target });
        }
        _ => return rec.fail(NoteProblem::UnknownType),
    }
    Ok(())
}

fn merge_string(
    rec: &Record<'_, '_>,
    into: &mut Option<String>,
    new: Option<String>,
    what: &str,
) -> Result<(), NoteError> {
    match (into.as_ref(), new) {
        (_, None) => Ok(()),
        (None, Some(n)) => {
            *into = Some(n);
            Ok(())
        }
        (Some(old), Some(n)) if *old == n => Ok(()),
        (Some(old), Some(n)) => rec.fail(NoteProblem::Conflict { what: format!("two {what}s, {old:?} and {n:?}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds notes at `base` and strings after them; field offsets are
    /// computed as the assembler would.
    struct Builder {
        base: u64,
        notes: Vec<u8>,
        /// (field position in `notes`, index of the string it points to)
        fixups: Vec<(usize, usize)>,
        strings: Vec<String>,
    }

    impl Builder {
        fn new() -> Builder {
            Builder { base: 0x1000, notes: Vec::new(), fixups: Vec::new(), strings: Vec::new() }
        }

        /// Fields: `Ok(v)` a plain word, `Err(s)` an offset to string `s`.
        fn note(&mut self, ty: u32, fields: &[Result<u32, &str>]) -> &mut Self {
            self.notes.extend_from_slice(&9u32.to_ne_bytes());
            self.notes.extend_from_slice(&(fields.len() as u32 * 4).to_ne_bytes());
            self.notes.extend_from_slice(&ty.to_ne_bytes());
            self.notes.extend_from_slice(b"textpoke\0\0\0\0");
            for f in fields {
                match f {
                    Ok(v) => self.notes.extend_from_slice(&v.to_ne_bytes()),
                    Err(s) => {
                        self.fixups.push((self.notes.len(), self.strings.len()));
                        self.strings.push(s.to_string());
                        self.notes.extend_from_slice(&[0; 4]);
                    }
                }
            }
            self
        }

        /// The whole segment (notes then strings) and the parse result.
        fn parse(&self) -> Result<PatchNotes, NoteError> {
            let mut seg = self.notes.clone();
            let mut at = Vec::new();
            for s in &self.strings {
                at.push(seg.len());
                seg.extend_from_slice(s.as_bytes());
                seg.push(0);
            }
            for &(field, s) in &self.fixups {
                let rel = (at[s] as i64 - field as i64) as i32;
                seg[field..field + 4].copy_from_slice(&rel.to_ne_bytes());
            }
            let mut image = Image::new();
            image.add(self.base, &seg);
            let mut out = PatchNotes::default();
            parse_notes(&seg[..self.notes.len()], self.base, 4, &image, &mut 0, &mut out).map(|()| out)
        }
    }

    #[test]
    fn decodes_every_record_type() {
        let mut b = Builder::new();
        b.note(NT_LP_PATCH, &[Ok(1), Ok(PATCH_REPLACE), Err("fix-1"), Ok(0)])
            .note(NT_LP_OBJECT, &[Err("libfoo.so.1"), Err("3F2a"), Ok(0)])
            .note(NT_LP_FUNC, &[Err("outer"), Err("outer_v2"), Ok(0), Ok(0), Err("libfoo.so.1"), Ok(0)])
            .note(NT_LP_FUNC, &[Err("helper"), Err("x"), Err("parse.c"), Ok(2), Ok(0), Ok(0)])
            .note(NT_LP_CALLBACK, &[Ok(1), Err("pre")])
            .note(NT_LP_SYMBOL, &[Err("slot"), Err("counter"), Ok(0), Ok(0), Ok(0), Ok(1)])
            .note(NT_LP_SYMBOL, &[Err("api"), Ok(0), Ok(0), Ok(0), Ok(0), Ok(3)]);
        let n = b.parse().unwrap();
        assert_eq!(n.name.as_deref(), Some("fix-1"));
        assert!(n.replace && !n.rust);
        assert_eq!(n.objects, vec![ObjectRecord { object: Some("libfoo.so.1".into()), build_id: vec![0x3f, 0x2a] }]);
        assert_eq!(n.build_id_of(Some("libfoo.so.1")), Some(&[0x3f, 0x2a][..]));
        assert_eq!(n.funcs.len(), 2);
        assert_eq!(n.funcs[0].target.object.as_deref(), Some("libfoo.so.1"));
        assert_eq!(
            n.funcs[1].target,
            TargetRef { object: None, name: "helper".into(), file: Some("parse.c".into()), sympos: 2 }
        );
        assert_eq!(n.callbacks[0].kind, CallbackKind::PrePatch);
        assert_eq!(n.symbols[0].target.as_ref().unwrap().name, "counter");
        assert_eq!(n.symbols[1].kind, SymbolKind::Api);
        assert_eq!(n.target_objects(), vec![Some("libfoo.so.1"), None]);
    }

    fn problem(b: &Builder) -> NoteProblem {
        let e = b.parse().unwrap_err();
        assert!(e.to_string().contains("record #"), "{e}");
        e.problem
    }

    #[test]
    fn malformed_records_are_refused_naming_them() {
        let mut b = Builder::new();
        b.note(NT_LP_FUNC, &[Err("f"), Err("g"), Ok(0), Ok(0), Ok(0)]);
        assert_eq!(problem(&b), NoteProblem::BadSize { expected: 24, found: 20 });
        let mut b = Builder::new();
        b.note(NT_LP_FUNC, &[Err("f"), Ok(0), Ok(0), Ok(0), Ok(0), Ok(0)]);
        assert_eq!(problem(&b), NoteProblem::Missing { field: "repl_off" });
        let mut b = Builder::new();
        b.note(NT_LP_FUNC, &[Err("f"), Ok(0x100000), Ok(0), Ok(0), Ok(0), Ok(0)]);
        assert!(matches!(problem(&b), NoteProblem::BadOffset { field: "repl_off", .. }));
        let mut b = Builder::new();
        b.note(NT_LP_FUNC, &[Err(""), Err("g"), Ok(0), Ok(0), Ok(0), Ok(0)]);
        assert!(matches!(problem(&b), NoteProblem::BadString { field: "name_off", .. }));
        let mut b = Builder::new();
        b.note(NT_LP_OBJECT, &[Ok(0), Err("abc"), Ok(0)]);
        assert_eq!(problem(&b), NoteProblem::BadBuildId { text: "abc".into() });
        let mut b = Builder::new();
        b.note(NT_LP_PATCH, &[Ok(2), Ok(0), Ok(0), Ok(0)]);
        assert_eq!(problem(&b), NoteProblem::AbiVersion { found: 2 });
        let mut b = Builder::new();
        b.note(NT_LP_CALLBACK, &[Ok(9), Err("f")]);
        assert_eq!(problem(&b), NoteProblem::UnknownValue { field: "kind", value: 9 });
        let mut b = Builder::new();
        b.note(NT_LP_CALLBACK, &[Ok(1), Err("f")]).note(NT_LP_CALLBACK, &[Ok(1), Err("g")]);
        assert!(matches!(problem(&b), NoteProblem::Conflict { .. }));
        let mut b = Builder::new();
        b.note(NT_LP_PATCH, &[Ok(1), Ok(0), Err("a"), Ok(0)]).note(NT_LP_PATCH, &[Ok(1), Ok(0), Err("b"), Ok(0)]);
        assert!(matches!(problem(&b), NoteProblem::Conflict { .. }));
        let mut b = Builder::new();
        b.note(NT_LP_SYMBOL, &[Err("s"), Ok(0), Ok(0), Ok(0), Ok(0), Ok(2)]);
        assert!(matches!(problem(&b), NoteProblem::Unsupported { .. }));
        let mut b = Builder::new();
        b.note(42, &[Ok(0)]);
        assert_eq!(problem(&b), NoteProblem::UnknownType);
    }

    #[test]
    fn static_key_records_and_foreign_notes_are_skipped() {
        let mut b = Builder::new();
        b.note(2, &[Ok(0), Ok(0)]).note(NT_LP_FUNC, &[Err("f"), Err("g"), Ok(0), Ok(0), Ok(0), Ok(0)]);
        // A GNU note in front.
        let mut gnu = Vec::new();
        for w in [4u32, 4, 3] {
            gnu.extend_from_slice(&w.to_ne_bytes());
        }
        gnu.extend_from_slice(b"GNU\0\x01\x02\x03\x04");
        b.notes.splice(0..0, gnu.iter().copied());
        for f in &mut b.fixups {
            f.0 += gnu.len();
        }
        let n = b.parse().unwrap();
        assert_eq!(n.funcs.len(), 1);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: mutate a valid segment byte by byte.
        let mut b = Builder::new();
        b.note(NT_LP_PATCH, &[Ok(1), Ok(0), Err("p"), Ok(0)])
            .note(NT_LP_FUNC, &[Err("outer"), Err("v2"), Err("a.c"), Ok(0), Ok(0), Ok(0)]);
        let mut x = 0x9e37_79b9u32;
        for _ in 0..20_000 {
            let mut c = Builder { base: b.base, notes: b.notes.clone(), fixups: vec![], strings: vec![] };
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % c.notes.len();
                c.notes[i] = (x >> 8) as u8;
            }
            let _ = c.parse();
        }
        for len in 0..b.notes.len() {
            let c = Builder { base: b.base, notes: b.notes[..len].to_vec(), fixups: vec![], strings: vec![] };
            let _ = c.parse();
        }
    }
}
