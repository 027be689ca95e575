//! The records the branch and key macros leave in every object: their
//! format, and how they are read back from the process's memory.
//!
//! # Format
//!
//! Each record is one ELF note in the section `.note.textpoke`
//! (`SHT_NOTE`, `SHF_ALLOC | SHF_GNU_RETAIN`, 4-byte aligned), with the
//! owner name `"textpoke"`:
//!
//! ```text
//!  namesz = 9 | descsz | type | "textpoke\0" + 3 bytes of padding | desc
//!
//!  type 1, a branch site (the kernel's jump_entry), descsz 16:
//!      i32 code    site   - &code      the 5-byte NOP or JMP rel32
//!      i32 target  label  - &target    where the JMP goes
//!      i32 key     key    - &key       the StaticKey it follows
//!      u32 flags   bit 0: the site belongs to a `likely` branch
//!                  bit 1: compiled in as a JMP (key default XOR bit 0)
//!
//!  type 2, a key, descsz 8:
//!      i32 key     key    - &key
//!      u32 0       reserved
//! ```
//!
//! Every address is an offset relative to the field that holds it, as in
//! the kernel's `jump_entry`: the assembler or the linker resolves it, so the
//! section has no dynamic relocation, can be read-only, and is valid as soon
//! as the object is mapped, before the loader has relocated anything.
//!
//! # Why notes
//!
//! The linker groups `SHT_NOTE` sections into `PT_NOTE` segments, which the
//! dynamic loader reports with the other program headers through
//! `dl_iterate_phdr` (the object table, [`crate::sites::Objects`], records
//! where they are). So the records of every loaded object — the main
//! executable, each shared library, each library loaded later — are found in
//! memory, without reading any file and without `__start_`/`__stop_` symbols
//! (which exist once per object and are not exported). `SHF_GNU_RETAIN` (the
//! `R` flag) keeps the section through `--gc-sections`; the `?` flag puts a
//! site's record in the section group of the function containing it, so a
//! record of a discarded COMDAT copy (a C++ inline function, a duplicated
//! generic) is discarded with it instead of failing the link.
//!
//! # Reading
//!
//! [`read_object`] decodes the notes of one object in place, from the
//! `PT_NOTE` segments the object table recorded for it (those inside a
//! readable `PT_LOAD` segment), while the object is pinned so that it cannot
//! be unmapped during the read. The pin alone does not say that the pinned
//! object is the one the table listed (one unloaded and another loaded from
//! the same path at the same address passes its check); the caller checks
//! that too, with the loader's counters (see `Registry::sync`). Reading under
//! a pin rather than inside a `dl_iterate_phdr` callback also means that an
//! object another thread's `dlopen` has mapped but not finished loading is
//! read only once that `dlopen` is done: pinning waits for it.

use crate::sites::{LoadedObject, Pin};

/// Owner name of textpoke's notes, NUL included.
pub(crate) const NOTE_NAME: &[u8] = b"textpoke\0";
/// Note type of a branch site.
pub(crate) const NT_BRANCH: u32 = 1;
/// Note type of a key.
pub(crate) const NT_KEY: u32 = 2;
/// Size of a branch site's descriptor.
const BRANCH_DESC: usize = 16;
/// Size of a key's descriptor.
const KEY_DESC: usize = 8;

/// Site flag: the site belongs to a `likely` branch (the kernel's "branch"
/// bit): it is a JMP when the key is disabled.
pub const SITE_LIKELY: u32 = 1;
/// Site flag: the site was compiled in as a JMP.
pub const SITE_INIT_JMP: u32 = 2;

/// One branch-site record, decoded to absolute addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawSite {
    pub addr: usize,
    pub target: usize,
    pub key: usize,
    pub flags: u32,
}

/// The records of one object.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ObjectNotes {
    /// Addresses of the keys it defines.
    pub keys: Vec<usize>,
    pub sites: Vec<RawSite>,
    /// Malformed records, described; an object with any is not patched.
    pub bad: Vec<String>,
}

impl ObjectNotes {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.sites.is_empty() && self.bad.is_empty()
    }
}

fn read_u32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// Field at runtime address `field` holding `rel` (relative to itself).
fn resolve(field: usize, rel: u32) -> usize {
    field.wrapping_add(rel as i32 as isize as usize)
}

fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

/// Decodes the notes in `bytes`, which are mapped at runtime address `addr`,
/// with the segment's alignment `align` (4 or 8); appends textpoke's records
/// to `out` and ignores everybody else's.
pub(crate) fn parse_notes(bytes: &[u8], addr: usize, align: usize, out: &mut ObjectNotes) {
    let align = if align == 8 { 8 } else { 4 };
    let mut off = 0;
    while off + 12 <= bytes.len() {
        let namesz = read_u32(bytes, off) as usize;
        let descsz = read_u32(bytes, off + 4) as usize;
        let ty = read_u32(bytes, off + 8);
        let name_off = off + 12;
        let Some(desc_off) = name_off.checked_add(namesz).map(|e| align_up(e, align)) else { return };
        let Some(end) = desc_off.checked_add(descsz).map(|e| align_up(e, align)) else { return };
        let name_seen = &bytes[name_off..(name_off + namesz).min(bytes.len())];
        let ours = namesz == NOTE_NAME.len() && NOTE_NAME.starts_with(name_seen);
        if desc_off + descsz > bytes.len() {
            if ours {
                out.bad.push(format!("note at {:#x} runs past the end of its segment", addr + off));
            }
            return; // not a note list we can follow any further
        }
        if ours {
            let desc = &bytes[desc_off..desc_off + descsz];
            let at = addr + desc_off;
            match (ty, descsz) {
                (NT_BRANCH, BRANCH_DESC) => out.sites.push(RawSite {
                    addr: resolve(at, read_u32(desc, 0)),
                    target: resolve(at + 4, read_u32(desc, 4)),
                    key: resolve(at + 8, read_u32(desc, 8)),
                    flags: read_u32(desc, 12),
                }),
                (NT_KEY, KEY_DESC) => out.keys.push(resolve(at, read_u32(desc, 0))),
                // A live patch's records (`live::notes`), not the keys' concern.
                (3..=7, _) => {}
                _ => out.bad.push(format!(
                    "note at {:#x} has type {ty} and {descsz} descriptor bytes, which this textpoke does not know \
                     (built by a newer version?)",
                    addr + off
                )),
            }
        }
        off = end;
    }
}

/// Decodes the textpoke notes of `obj`, in place in its memory. An object
/// with none gives empty notes.
///
/// # Safety
///
/// As for [`LoadedObject::note_bytes`]: `pin` is a pin of `obj`, taken when
/// `obj.notes` describes the object it holds.
pub(crate) unsafe fn read_object(obj: &LoadedObject, pin: &Pin) -> ObjectNotes {
    let mut notes = ObjectNotes::default();
    // SAFETY: per this function's contract.
    for (seg, bytes) in unsafe { obj.note_bytes(pin) } {
        parse_notes(bytes, obj.bias.wrapping_add(seg.vaddr), seg.align, &mut notes);
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&9u32.to_ne_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(b"textpoke\0\0\0\0");
        v.extend_from_slice(desc);
        v
    }

    fn rel(from: usize, to: usize) -> [u8; 4] {
        (to.wrapping_sub(from) as i32).to_ne_bytes()
    }

    #[test]
    fn decodes_relative_fields_and_skips_foreign_notes() {
        let base = 0x10_000;
        // A GNU build-id note first (namesz 4 "GNU\0", 4 bytes of id).
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&4u32.to_ne_bytes());
        bytes.extend_from_slice(&4u32.to_ne_bytes());
        bytes.extend_from_slice(&3u32.to_ne_bytes());
        bytes.extend_from_slice(b"GNU\0\x01\x02\x03\x04");
        let desc_at = base + bytes.len() + 24;
        let mut desc = Vec::new();
        desc.extend_from_slice(&rel(desc_at, 0x5000));
        desc.extend_from_slice(&rel(desc_at + 4, 0x5020));
        desc.extend_from_slice(&rel(desc_at + 8, 0x9000));
        desc.extend_from_slice(&SITE_LIKELY.to_ne_bytes());
        bytes.extend(note(NT_BRANCH, &desc));
        let key_at = base + bytes.len() + 24;
        let mut kd = rel(key_at, 0x9000).to_vec();
        kd.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend(note(NT_KEY, &kd));
        let mut out = ObjectNotes::default();
        parse_notes(&bytes, base, 4, &mut out);
        assert_eq!(out.bad, Vec::<String>::new());
        assert_eq!(out.sites, vec![RawSite { addr: 0x5000, target: 0x5020, key: 0x9000, flags: SITE_LIKELY }]);
        assert_eq!(out.keys, vec![0x9000]);
    }

    #[test]
    fn unknown_record_kinds_and_truncation_are_reported() {
        let mut out = ObjectNotes::default();
        parse_notes(&note(99, &[0; 4]), 0x1000, 4, &mut out);
        assert_eq!(out.bad.len(), 1, "{:?}", out.bad);
        assert!(out.bad[0].contains("type 99"));
        let mut out = ObjectNotes::default();
        parse_notes(&note(3, &[0; 24]), 0x1000, 4, &mut out);
        assert!(out.is_empty(), "live-patch records are left to live::notes: {out:?}");
        let mut out = ObjectNotes::default();
        let mut b = note(NT_KEY, &[0; 8]);
        b.truncate(b.len() - 2);
        parse_notes(&b, 0x1000, 4, &mut out);
        assert_eq!(out.bad.len(), 1, "{:?}", out.bad);
        assert!(out.keys.is_empty());
    }

    crate::define_static_key_false!(NOTES_TEST_KEY);

    #[inline(never)]
    fn notes_test_branch() -> bool {
        crate::static_branch_unlikely!(NOTES_TEST_KEY)
    }

    #[test]
    fn reads_this_executables_records_where_the_object_table_lists_them() {
        use crate::sites::objects::loader_counters;
        let key = &*NOTES_TEST_KEY as *const crate::keys::StaticKey as usize;
        let mut objects = crate::sites::Objects::new();
        for _ in 0..100 {
            objects.rescan();
            let main = objects.main().expect("main executable listed");
            let pin = main.pin().expect("main executable pinned");
            let seen = objects.counters().expect("glibc reports the loader's counters");
            if loader_counters() != Some(seen) {
                continue; // another test thread loaded or unloaded something
            }
            // SAFETY: `pin` holds the main executable, and no object was
            // loaded or unloaded between the rescan that listed it and the pin.
            let notes = unsafe { read_object(main, &pin) };
            assert!(notes.bad.is_empty(), "{:?}", notes.bad);
            assert!(notes.keys.contains(&key), "{key:#x} in {:x?}", notes.keys);
            assert!(notes.sites.iter().any(|s| s.key == key), "{:x?}", notes.sites);
            assert!(!notes_test_branch());
            return;
        }
        panic!("libraries kept being loaded or unloaded");
    }

    #[test]
    #[should_panic(expected = "a pin of")]
    fn a_pin_of_another_object_is_refused() {
        let mut objects = crate::sites::Objects::new();
        objects.rescan();
        let main = objects.main().expect("main executable listed");
        let other = objects.iter().find(|o| !o.is_main).expect("a library listed (libc, at least)");
        let pin = other.pin().expect("library pinned");
        // SAFETY: not upheld, on purpose: the pin is checked against the
        // object before anything is read, and the call panics.
        let _ = unsafe { read_object(main, &pin) };
    }
}
