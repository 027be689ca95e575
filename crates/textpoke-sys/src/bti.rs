//! arm64 guarded pages (`PROT_BTI`): which code pages of this process
//! enforce branch-target identification, so that a protection change
//! gives them back their guard.
//!
//! On a CPU with BTI (`getauxval(AT_HWCAP2) & HWCAP2_BTI`) a page mapped
//! with `PROT_BTI` (0x10, arm64's `asm/mman.h`) is *guarded*: an indirect
//! branch (`br`, `blr`) into it must land on a `bti` (or `paciasp`-like)
//! landing pad, or the core raises a Branch Target exception (the kernel
//! sends `SIGILL`, `ILL_ILLOPC`). The kernel guards the
//! main executable's and the interpreter's executable segments, and glibc's
//! loader every other object's, exactly when the object's
//! `PT_GNU_PROPERTY` note carries `GNU_PROPERTY_AARCH64_FEATURE_1_BTI` and
//! the CPU has BTI (glibc `_dl_bti_protect`, kernel
//! `arch_elf_adjust_prot`). `/proc/self/maps` does not show the bit, and
//! `mprotect` replaces all of a page's protection: whoever changes a
//! code page's protection and restores it from `/proc/self/maps` alone
//! drops the guard for good.
//!
//! [`Guarded::read`] says which ranges are guarded now:
//!
//! - no BTI in the CPU (every x86-64 and pre-Armv8.5 machine): none, at the
//!   cost of one `getauxval` (and `mprotect` would refuse `PROT_BTI`);
//! - natively: the kernel's own word, `/proc/self/smaps`' `VmFlags: ... bt`
//!   (`VM_ARM64_BTI`; every kernel that reports `HWCAP2_BTI` prints it).
//!   Exact whoever set the bit, a JIT that maps its code with `PROT_BTI`
//!   included. Reading smaps walks the page tables of every mapping: it
//!   costs more than `/proc/self/maps`, and is done once per batch, only on
//!   BTI hardware;
//! - under a user-mode emulator (qemu-user), whose `/proc/self/smaps` is
//!   the *host's* view (guest text shows as `rd` without `ex`, never `bt`):
//!   the loader's rule above, applied to the objects `dl_iterate_phdr`
//!   lists (the executable segments of objects whose note says BTI). The
//!   same fallback when smaps cannot be read.
//!
//! Neither way ever reports a page the loader or the program did not
//! guard: an object built without BTI, a JIT's anonymous code or
//! textpoke's own trampoline blocks (mapped without `PROT_BTI`) are never
//! in the set, so a restored protection never *adds* the guard.

use std::ops::ControlFlow;

/// `PROT_BTI` (arm64 `asm/mman.h`): the page is guarded.
pub const PROT_BTI: libc::c_int = 0x10;

/// `HWCAP2_BTI` (arm64 `asm/hwcap.h`): the CPU and kernel support BTI.
const HWCAP2_BTI: u64 = 1 << 17;

/// `PT_GNU_PROPERTY`: the program header of `.note.gnu.property`.
const PT_GNU_PROPERTY: u32 = 0x6474_e553;
/// `NT_GNU_PROPERTY_TYPE_0`.
const NT_GNU_PROPERTY_TYPE_0: u32 = 5;
/// `GNU_PROPERTY_AARCH64_FEATURE_1_AND` and its BTI bit.
const GNU_PROPERTY_AARCH64_FEATURE_1_AND: u32 = 0xc000_0000;
const GNU_PROPERTY_AARCH64_FEATURE_1_BTI: u32 = 1;

/// Whether this CPU (and kernel) enforce BTI on guarded pages.
pub fn supported() -> bool {
    cfg!(target_arch = "aarch64") && {
        // SAFETY: getauxval has no preconditions; 0 means "not present".
        let hwcap2 = unsafe { libc::getauxval(libc::AT_HWCAP2) } as u64;
        hwcap2 & HWCAP2_BTI != 0
    }
}

/// How [`Guarded::read`] found the guarded ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The CPU has no BTI: nothing is guarded.
    Unsupported,
    /// `/proc/self/smaps` `VmFlags` (natively).
    Smaps,
    /// The loader's rule: objects whose property note says BTI.
    Loader,
}

/// The guarded ranges of this process at one moment, sorted by address.
#[derive(Debug, Clone)]
pub struct Guarded {
    ranges: Vec<(usize, usize)>,
    source: Source,
}

impl Guarded {
    /// Which ranges are guarded now (see the module docs). Allocates; calls
    /// `dl_iterate_phdr` under a user-mode emulator: not for a thread that
    /// has others parked.
    pub fn read() -> Guarded {
        if !supported() {
            return Guarded { ranges: Vec::new(), source: Source::Unsupported };
        }
        if !crate::emulation::user_mode_emulator() {
            if let Ok(text) = std::fs::read_to_string("/proc/self/smaps") {
                return Guarded { ranges: from_smaps(&text), source: Source::Smaps };
            }
        }
        Guarded { ranges: from_loader(), source: Source::Loader }
    }

    /// A set of guarded ranges `[start, end)` given by the caller (tests of
    /// the layers above), as if found by `source`.
    pub fn from_ranges(mut ranges: Vec<(usize, usize)>, source: Source) -> Guarded {
        ranges.sort_unstable();
        Guarded { ranges, source }
    }

    /// Whether the page at `addr` is guarded.
    pub fn contains(&self, addr: usize) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end <= addr);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= addr)
    }

    /// Where the answer came from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Whether no page is guarded.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The ranges whose `VmFlags` hold `bt`, from the text of `/proc/*/smaps`.
pub fn from_smaps(text: &str) -> Vec<(usize, usize)> {
    smaps_with_flag(text, "bt")
}

/// The ranges of `/proc/*/smaps` text whose `VmFlags` hold `flag`.
pub fn smaps_with_flag(text: &str, flag: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(range) = current.take() {
                if flags.split_ascii_whitespace().any(|f| f == flag) {
                    out.push(range);
                }
            }
        } else if let Some(range) = mapping_header(line) {
            current = Some(range);
        }
    }
    out.sort_unstable();
    out
}

/// The range of a mapping's header line (`start-end perms offset ...`);
/// `None` for a field line (`Name:   value`).
fn mapping_header(line: &str) -> Option<(usize, usize)> {
    let (s, e) = line.split_ascii_whitespace().next()?.split_once('-')?;
    Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?))
}

/// The loader's rule: the executable `PT_LOAD` segments (page-rounded, as
/// glibc protects them) of every object whose property note says BTI.
fn from_loader() -> Vec<(usize, usize)> {
    let ps = crate::mem::page_size();
    let mut out = Vec::new();
    crate::loader::for_each_object(|o| {
        if object_has_bti(o) {
            for ph in o.phdrs.iter().filter(|ph| ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0) {
                let start = o.bias.wrapping_add(ph.p_vaddr as usize);
                let end = start + ph.p_memsz as usize;
                out.push((start & !(ps - 1), end.next_multiple_of(ps)));
            }
        }
        ControlFlow::Continue(())
    });
    out.sort_unstable();
    out
}

/// Whether a loaded object's `PT_GNU_PROPERTY` note says BTI (the loader
/// and the kernel look at that header only).
fn object_has_bti(o: &crate::loader::LoadedObjectInfo<'_>) -> bool {
    o.phdrs.iter().filter(|ph| ph.p_type == PT_GNU_PROPERTY).any(|ph| {
        let at = o.bias.wrapping_add(ph.p_vaddr as usize);
        // SAFETY: the note lies in the object's first (read-only) PT_LOAD
        // segment, mapped readable while the loader's walk holds its lock.
        let note = unsafe { std::slice::from_raw_parts(at as *const u8, ph.p_memsz as usize) };
        note_says_bti(note)
    })
}

/// Whether the bytes of a `.note.gnu.property` section (one or more ELF64
/// notes) set `GNU_PROPERTY_AARCH64_FEATURE_1_BTI`. Malformed notes say no.
pub fn note_says_bti(mut notes: &[u8]) -> bool {
    let word = |b: &[u8], at: usize| b.get(at..at + 4).map(|w| u32::from_le_bytes(w.try_into().unwrap()));
    while let (Some(namesz), Some(descsz), Some(kind)) = (word(notes, 0), word(notes, 4), word(notes, 8)) {
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let desc_at = 12 + namesz.next_multiple_of(4);
        let next = desc_at + descsz.next_multiple_of(8);
        let (Some(name), Some(desc)) = (notes.get(12..12 + namesz), notes.get(desc_at..desc_at + descsz)) else {
            return false;
        };
        if kind == NT_GNU_PROPERTY_TYPE_0 && name == b"GNU\0" && properties_say_bti(desc) {
            return true;
        }
        notes = notes.get(next..).unwrap_or(&[]);
    }
    false
}

/// The properties of one `NT_GNU_PROPERTY_TYPE_0` descriptor: (type, size,
/// data padded to 8 bytes) each.
fn properties_say_bti(mut desc: &[u8]) -> bool {
    while desc.len() >= 8 {
        let kind = u32::from_le_bytes(desc[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(desc[4..8].try_into().unwrap()) as usize;
        let Some(data) = desc.get(8..8 + size) else { return false };
        if kind == GNU_PROPERTY_AARCH64_FEATURE_1_AND && size >= 4 {
            let features = u32::from_le_bytes(data[0..4].try_into().unwrap());
            return features & GNU_PROPERTY_AARCH64_FEATURE_1_BTI != 0;
        }
        desc = desc.get(8 + size.next_multiple_of(8)..).unwrap_or(&[]);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.note.gnu.property` as ld writes it for `-mbranch-protection`:
    /// one note, "GNU", one AARCH64_FEATURE_1_AND property.
    fn note(features: u32, extra_property_first: bool) -> Vec<u8> {
        let mut desc = Vec::new();
        if extra_property_first {
            // An x86 ISA property (type 0xc0008002), 4 bytes padded to 8.
            desc.extend_from_slice(&0xc000_8002u32.to_le_bytes());
            desc.extend_from_slice(&4u32.to_le_bytes());
            desc.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        }
        desc.extend_from_slice(&GNU_PROPERTY_AARCH64_FEATURE_1_AND.to_le_bytes());
        desc.extend_from_slice(&4u32.to_le_bytes());
        desc.extend_from_slice(&features.to_le_bytes());
        desc.extend_from_slice(&[0; 4]);
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&NT_GNU_PROPERTY_TYPE_0.to_le_bytes());
        n.extend_from_slice(b"GNU\0");
        n.extend_from_slice(&desc);
        n
    }

    #[test]
    fn reads_the_bti_property() {
        assert!(note_says_bti(&note(1, false)), "BTI");
        assert!(note_says_bti(&note(3, false)), "BTI and PAC");
        assert!(note_says_bti(&note(1, true)), "after another property");
        assert!(!note_says_bti(&note(2, false)), "PAC only");
        assert!(!note_says_bti(&[]));
        let n = note(1, false);
        assert!(!note_says_bti(&n[..n.len() - 8]), "truncated");
        let mut other = n.clone();
        other[12..16].copy_from_slice(b"XYZ\0");
        assert!(!note_says_bti(&other), "not a GNU note");
    }

    #[test]
    fn reads_smaps_flags() {
        let text = "\
5502a30000-5502a31000 r-xp 00000000 fe:00 10043971                       /tmp/libbti.so
Size:                  4 kB
VmFlags: rd ex mr mw me bt
5502a4f000-5502a50000 r--p 0000f000 fe:00 10043971                       /tmp/libbti.so
VmFlags: rd mr mw me ac
7f0000000000-7f0000002000 r-xp 00000000 00:00 0
Rss:                   0 kB
VmFlags: rd ex mr mw me bt sd
";
        assert_eq!(from_smaps(text), [(0x55_02a3_0000, 0x55_02a3_1000), (0x7f00_0000_0000, 0x7f00_0000_2000)]);
        let g = Guarded { ranges: from_smaps(text), source: Source::Smaps };
        assert!(g.contains(0x55_02a3_0000) && g.contains(0x55_02a3_0fff) && g.contains(0x7f00_0000_1000));
        assert!(!g.contains(0x55_02a3_1000) && !g.contains(0x55_02a4_f000) && !g.contains(0));
    }

    /// The parser against this kernel's own smaps (natively): the mapping
    /// of this test's code is `ex`, and no writable data mapping is.
    #[test]
    fn finds_this_code_in_the_real_smaps() {
        if crate::emulation::user_mode_emulator() {
            return; // qemu-user shows the host's smaps (module docs)
        }
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let ex = smaps_with_flag(&text, "ex");
        let here = finds_this_code_in_the_real_smaps as fn() as usize;
        assert!(ex.iter().any(|&(s, e)| s <= here && here < e));
        let stack_local = 0u8;
        let at = &stack_local as *const u8 as usize;
        assert!(!ex.iter().any(|&(s, e)| s <= at && at < e));
    }

    /// Without BTI in the CPU nothing is guarded; with it, this test
    /// binary (Rust's std is built without BTI here) is not guarded.
    #[test]
    fn this_binary_is_not_guarded() {
        let g = Guarded::read();
        assert_eq!(g.source() == Source::Unsupported, !supported());
        assert!(!g.contains(this_binary_is_not_guarded as fn() as usize));
    }
}
