//! The dynamic symbol covering each of a sorted list of addresses, as
//! `dladdr1` finds it, reading each object's table once.
//!
//! # Why
//!
//! Validation checks that a poke inside a function starts at an
//! instruction boundary, and the function comes from the dynamic linker's
//! symbols. glibc's `dladdr1` finds the symbol covering an address by
//! walking every symbol of the object's dynamic symbol table
//! (`determine_info` in elf/dl-addr.c): a batch of n pokes in an object
//! exporting s symbols costs n·s. On this machine 20,000 `dladdr1` calls
//! in a library exporting 20,000 functions take 1.56 s; a batch of
//! 100,000 pokes in a library exporting as many would take minutes.
//!
//! # Algorithm
//!
//! 1. **Objects.** One `dl_iterate_phdr` walk. The loader holds its lock
//!    during each callback, so an object cannot be unloaded while its
//!    tables are read there; what is needed is copied out. An object is
//!    read only if some of the addresses lie in its `PT_LOAD` segments
//!    (the addresses are sorted: two binary searches per segment). An
//!    address in no object has no symbol (`dladdr1` fails there too).
//! 2. **Tables.** The dynamic section gives `DT_SYMTAB`, `DT_STRTAB`,
//!    `DT_STRSZ` and `DT_GNU_HASH` or `DT_HASH`. glibc relocates these
//!    pointers in place when the `PT_DYNAMIC` segment is writable and the
//!    load bias is not zero, and leaves link-time addresses otherwise
//!    (`l_ld_readonly`); that reading is tried first, the other one
//!    second, and a pointer is accepted only where its table starts inside
//!    a readable `PT_LOAD` segment of the object. Every read is checked to
//!    lie inside one.
//! 3. **Symbols.** Enumerated as `determine_info` does: through the GNU
//!    hash table's buckets and chains when there is one (it never
//!    references a local symbol), else the first `nchain` symbols of
//!    `DT_HASH` (or those before the string table), keeping global and
//!    weak ones not of hidden or internal visibility; in both cases not
//!    undefined with value 0, not absolute, not TLS, and named inside the
//!    string table.
//! 4. **Sweep.** The symbols are sorted by address and the addresses
//!    walked in order with a max-heap of the symbols starting at or before
//!    the address, ordered by value, then by enumeration order (earlier
//!    first). A symbol contains an address inside `[value, value + size)`,
//!    or, sizeless or undefined, exactly at its value (glibc's
//!    `DL_ADDR_SYM_MATCH`). The top is dropped while it does not contain
//!    the address: it cannot contain a later one. The top left is the
//!    symbol `dladdr1` returns: of those containing the address, the one
//!    with the greatest value, the first enumerated among equals.
//!
//! An object whose tables cannot be read so is left to `dladdr1`, address
//! by address. Cost: one walk of the objects, and for each object holding
//! addresses O((s + n) log s).

use crate::sys::loader::{self, LoadedObjectInfo};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;

/// What validation needs of the symbol covering an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Covering {
    /// Runtime address of the symbol.
    pub start: usize,
    pub size: usize,
    /// `STT_*` type.
    pub kind: u8,
}

/// Up to this many addresses, `dladdr1` each (see [`covering_sorted`]).
const FEW: usize = 16;

/// The symbol `dladdr1` gives for each of `addrs` (sorted ascending).
pub(crate) fn covering_sorted(addrs: &[usize]) -> Vec<Option<Covering>> {
    if addrs.len() <= FEW {
        // A few lookups walk the table a few times; reading, sorting and
        // sweeping it costs about as much as FEW walks (s log s), every
        // batch: a static key flip (two pokes) in a program exporting many
        // symbols spent most of its time here.
        return addrs.iter().map(|&a| by_dladdr(a)).collect();
    }
    let (mut out, fallback) = from_tables(addrs);
    for i in fallback {
        out[i] = by_dladdr(addrs[i]);
    }
    out
}

/// The symbols found in the objects' tables, and the indices of the
/// addresses whose object's tables could not be read.
fn from_tables(addrs: &[usize]) -> (Vec<Option<Covering>>, Vec<usize>) {
    debug_assert!(addrs.windows(2).all(|w| w[0] <= w[1]));
    let mut walk = Walk { addrs, out: vec![None; addrs.len()], fallback: Vec::new() };
    loader::for_each_object(|info| {
        walk.object(info);
        ControlFlow::Continue(())
    });
    (walk.out, walk.fallback)
}

struct Walk<'a> {
    addrs: &'a [usize],
    out: Vec<Option<Covering>>,
    /// Indices of addresses in objects whose tables could not be read.
    fallback: Vec<usize>,
}

impl Walk<'_> {
    /// The symbols of one object (as the loader's walk gives it, under its
    /// lock) for the addresses inside it. Never panics on bad data: every
    /// read is checked (a panic here would abort: the loader's frames
    /// cannot be unwound).
    fn object(&mut self, info: &LoadedObjectInfo<'_>) {
        let object = Object::new(info.bias, info.phdrs);
        let mut inside: Vec<usize> = Vec::new();
        for s in &object.loads {
            let lo = self.addrs.partition_point(|&a| a < s.start);
            let hi = self.addrs.partition_point(|&a| a < s.end);
            inside.extend(lo..hi);
        }
        if inside.is_empty() {
            return;
        }
        inside.sort_unstable();
        inside.dedup();
        match object.symbols(info.phdrs) {
            Some(syms) => sweep(syms, self.addrs, &inside, &mut self.out),
            None => self.fallback.extend(inside),
        }
    }
}

/// A `PT_LOAD` segment at its runtime address.
#[derive(Clone, Copy)]
struct Load {
    start: usize,
    end: usize,
    readable: bool,
}

struct Object {
    bias: usize,
    loads: Vec<Load>,
}

/// One enumerated symbol.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    size: usize,
    kind: u8,
    /// Undefined or sizeless: contains only its own address.
    exact: bool,
    /// Enumeration order (the first wins among equal values).
    order: u32,
}

impl Sym {
    fn contains(&self, addr: usize) -> bool {
        addr >= self.start && (addr - self.start < self.size || (self.exact && addr == self.start))
    }
}

const SYM_SIZE: usize = std::mem::size_of::<libc::Elf64_Sym>();
const DT_GNU_HASH: i64 = 0x6fff_fef5;

impl Object {
    fn new(bias: usize, phdrs: &[libc::Elf64_Phdr]) -> Object {
        let loads = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .map(|p| {
                let start = bias.wrapping_add(p.p_vaddr as usize);
                Load { start, end: start.saturating_add(p.p_memsz as usize), readable: p.p_flags & libc::PF_R != 0 }
            })
            .collect();
        Object { bias, loads }
    }

    /// Whether `[addr, addr + len)` lies in one readable segment.
    fn readable(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else { return false };
        self.loads.iter().any(|l| l.readable && l.start <= addr && end <= l.end)
    }

    fn read<T: Copy>(&self, addr: usize) -> Option<T> {
        // SAFETY: the bytes lie in a readable PT_LOAD segment of an object
        // the loader keeps mapped during this callback.
        self.readable(addr, std::mem::size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(addr as *const T) })
    }

    /// The runtime address of a dynamic-section pointer `value`, read as
    /// glibc does first (see the module docs), if its first `len` bytes lie
    /// in a readable segment.
    fn pointer(&self, value: u64, relocated: bool, len: usize) -> Option<usize> {
        let absolute = value as usize;
        let linked = self.bias.wrapping_add(value as usize);
        let order = if relocated { [absolute, linked] } else { [linked, absolute] };
        order.into_iter().find(|&a| self.readable(a, len))
    }

    /// The symbols `dladdr1` considers, in its order; `None` if a table
    /// cannot be read.
    fn symbols(&self, phdrs: &[libc::Elf64_Phdr]) -> Option<Vec<Sym>> {
        let dynamic = phdrs.iter().find(|p| p.p_type == libc::PT_DYNAMIC)?;
        let relocated = dynamic.p_flags & libc::PF_W != 0 && self.bias != 0;
        let at = self.bias.wrapping_add(dynamic.p_vaddr as usize);
        let (mut symtab, mut strtab, mut strsz, mut gnu_hash, mut hash) = (None, None, None, None, None);
        for i in 0..dynamic.p_memsz as usize / 16 {
            let tag: i64 = self.read(at + i * 16)?;
            let val: u64 = self.read(at + i * 16 + 8)?;
            match tag {
                0 => break, // DT_NULL
                6 => symtab = Some(val),
                5 => strtab = Some(val),
                10 => strsz = Some(val),
                4 => hash = Some(val),
                DT_GNU_HASH => gnu_hash = Some(val),
                _ => {}
            }
        }
        let symtab = self.pointer(symtab?, relocated, SYM_SIZE)?;
        let strsz = strsz? as u32;
        let mut out = Vec::new();
        let mut keep = |i: u32, local_check: bool| -> Option<()> {
            let s: libc::Elf64_Sym = self.read(symtab.checked_add(i as usize * SYM_SIZE)?)?;
            let (bind, kind, vis) = (s.st_info >> 4, s.st_info & 0xf, s.st_other & 3);
            const STB_GLOBAL: u8 = 1;
            const STB_WEAK: u8 = 2;
            const STV_INTERNAL: u8 = 1;
            const STV_HIDDEN: u8 = 2;
            const STT_TLS: u8 = 6;
            const SHN_UNDEF: u16 = 0;
            const SHN_ABS: u16 = 0xfff1;
            let global = matches!(bind, STB_GLOBAL | STB_WEAK) && !matches!(vis, STV_HIDDEN | STV_INTERNAL);
            if (!local_check || global)
                && kind != STT_TLS
                && (s.st_shndx != SHN_UNDEF || s.st_value != 0)
                && s.st_shndx != SHN_ABS
                && s.st_name < strsz
            {
                out.push(Sym {
                    start: self.bias.wrapping_add(s.st_value as usize),
                    size: s.st_size as usize,
                    kind,
                    exact: s.st_shndx == SHN_UNDEF || s.st_size == 0,
                    order: out.len() as u32,
                });
            }
            Some(())
        };
        if let Some(gnu) = gnu_hash {
            let gnu = self.pointer(gnu, relocated, 16)?;
            let nbuckets: u32 = self.read(gnu)?;
            let symoffset: u32 = self.read(gnu + 4)?;
            let bloom_size: u32 = self.read(gnu + 8)?;
            let buckets = gnu.checked_add(16)?.checked_add(bloom_size as usize * 8)?;
            let chains = buckets.checked_add(nbuckets as usize * 4)?;
            for b in 0..nbuckets as usize {
                let mut i: u32 = self.read(buckets + b * 4)?;
                if i == 0 {
                    continue;
                }
                if i < symoffset {
                    return None; // a chain before the chain array: not a table we know
                }
                loop {
                    keep(i, false)?;
                    let h: u32 = self.read(chains.checked_add((i - symoffset) as usize * 4)?)?;
                    i = i.checked_add(1)?;
                    if h & 1 != 0 {
                        break;
                    }
                }
            }
        } else {
            let count = match hash {
                Some(h) => {
                    let h = self.pointer(h, relocated, 8)?;
                    self.read::<u32>(h + 4)? as usize
                }
                // No hash table: glibc takes the string table as the end
                // of the symbol table.
                None => self.pointer(strtab?, relocated, 1)?.checked_sub(symtab)? / SYM_SIZE,
            };
            for i in 0..count {
                keep(u32::try_from(i).ok()?, true)?;
            }
        }
        Some(out)
    }
}

/// Fills `out[i]` for each index of `inside` (ascending addresses) from
/// one object's symbols (see the module docs, step 4).
fn sweep(mut syms: Vec<Sym>, addrs: &[usize], inside: &[usize], out: &mut [Option<Covering>]) {
    syms.sort_unstable_by_key(|s| (s.start, s.order));
    // (value, earlier first, index into syms)
    let mut heap: BinaryHeap<(usize, Reverse<u32>, usize)> = BinaryHeap::new();
    let mut next = 0;
    for &i in inside {
        let addr = addrs[i];
        while next < syms.len() && syms[next].start <= addr {
            heap.push((syms[next].start, Reverse(syms[next].order), next));
            next += 1;
        }
        while let Some(&(_, _, k)) = heap.peek() {
            if syms[k].contains(addr) {
                break;
            }
            heap.pop();
        }
        out[i] =
            heap.peek().map(|&(_, _, k)| Covering { start: syms[k].start, size: syms[k].size, kind: syms[k].kind });
    }
}

/// `dladdr1`'s answer for one address.
fn by_dladdr(addr: usize) -> Option<Covering> {
    let sym = loader::symbol_at(addr).filter(|s| s.has_entry)?;
    Some(Covering { start: sym.start, size: sym.size, kind: sym.kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every symbol dladdr1 finds for addresses in this test binary and
    /// libc, in and around functions, is what the sweep finds.
    #[test]
    fn agrees_with_dladdr1() {
        let mut addrs: Vec<usize> = Vec::new();
        let fns: [usize; 6] = [
            libc::malloc as *const () as usize,
            libc::free as *const () as usize,
            libc::dladdr as *const () as usize,
            libc::write as *const () as usize,
            libc::qsort as *const () as usize,
            agrees_with_dladdr1 as *const () as usize,
        ];
        for f in fns {
            for d in [0usize, 1, 4, 5, 17, 64, 300, 4096] {
                addrs.push(f + d);
                addrs.push(f.saturating_sub(d));
            }
        }
        addrs.push(addrs.as_ptr() as usize); // the heap: no object
        addrs.sort_unstable();
        addrs.dedup();
        let (swept, fallback) = from_tables(&addrs);
        assert!(fallback.is_empty(), "every table was read");
        for (a, got) in addrs.iter().zip(swept) {
            assert_eq!(got, by_dladdr(*a), "at {a:#x}");
        }
    }

    /// Aliases, nested and sizeless symbols, objects in the text, hidden
    /// ones, with either hash table: every byte around them answered as
    /// dladdr1 answers.
    #[test]
    fn agrees_with_dladdr1_on_tricky_tables() {
        const SRC: &str = r#"
__asm__(".text\n"
  ".globl outer\n.type outer,@function\nouter:\n nop\n nop\n"
  ".globl sizeless\n.type sizeless,@function\nsizeless:\n nop\n nop\n"
  ".globl inner\n.type inner,@function\ninner:\n nop\n nop\n ret\n.size inner, .-inner\n"
  " nop\n ret\n.size outer, .-outer\n"
  ".weak alias_short\n.type alias_short,@function\n.set alias_short, outer\n.size alias_short, 3\n"
  ".globl alias_same\n.type alias_same,@function\n.set alias_same, outer\n.size alias_same, 10\n"
  ".globl hidden_fn\n.hidden hidden_fn\n.type hidden_fn,@function\nhidden_fn:\n nop\n ret\n.size hidden_fn, .-hidden_fn\n"
  ".globl text_obj\n.type text_obj,@object\ntext_obj:\n .byte 0x90, 0x90, 0x90\n.size text_obj, 3\n"
  ".globl after\n.type after,@function\nafter:\n ret\n.size after, .-after\n");
int plain(int x) { return x * 3 + 1; }
int other(int x) { return plain(x) - 7; }
"#;
        let dir = std::env::temp_dir().join(format!("textpoke-dynsym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = dir.join("tricky.c");
        std::fs::write(&c, SRC).unwrap();
        for style in ["gnu", "sysv"] {
            let so = dir.join(format!("libtricky-{style}.so"));
            let out = std::process::Command::new("gcc")
                .args(["-O1", "-shared", "-fPIC", &format!("-Wl,--hash-style={style}"), "-o"])
                .arg(&so)
                .arg(&c)
                .output()
                .expect("gcc must be installed for this test");
            assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
            let path = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
            // SAFETY: valid C string; the library has no constructors.
            let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
            assert!(!h.is_null(), "dlopen {so:?}");
            // SAFETY: valid handle and name.
            let outer = unsafe { libc::dlsym(h, c"outer".as_ptr()) } as usize;
            assert_ne!(outer, 0);
            let addrs: Vec<usize> = (outer - 64..outer + 256).collect();
            let (swept, fallback) = from_tables(&addrs);
            assert!(fallback.is_empty(), "{style}: the table was read");
            let mut named = 0;
            for (a, got) in addrs.iter().zip(swept) {
                let want = by_dladdr(*a);
                assert_eq!(got, want, "{style}: at {a:#x} (outer{:+})", *a as isize - outer as isize);
                named += want.is_some() as usize;
            }
            assert!(named > 20, "{style}: the symbols were found ({named} addresses)");
            // SAFETY: our handle, closed once.
            unsafe { libc::dlclose(h) };
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
