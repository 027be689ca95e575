//! The dynamic loader's view of this process: the one place textpoke
//! calls `dl_iterate_phdr`, `dladdr1`, `dlopen`/`dlinfo`/`dlclose` and
//! `getauxval`.
//!
//! # Walking the objects
//!
//! [`for_each_object`] is `dl_iterate_phdr` with a closure: the loader
//! calls it once per loaded object (the main executable first, with an
//! empty name; the vdso among them) while holding its lock, so the object
//! cannot be unloaded during the call and its program headers and mapped
//! memory may be read there. What is needed later must be copied out. The
//! closure must not unwind (a panic aborts the process: the loader's
//! frames cannot be unwound through) and must not call back into the
//! loader (`dlopen`, `dlclose`: its lock is held).
//!
//! # The load and unload counters
//!
//! glibc's `dl_phdr_info` ends with `dlpi_adds` and `dlpi_subs`, the counts
//! of objects loaded and unloaded since the process started, the same in
//! every callback of a walk. [`counters`] reads them from the first object
//! only (a walk of one step): equal values at two moments mean that no
//! object was loaded or unloaded in between. They are absent when the
//! loader's struct is too short to hold them (then `None`).
//!
//! # Pinning an object
//!
//! [`Handle::noload`] is `dlopen(name, RTLD_NOLOAD)`: a reference on an
//! object already loaded (it never loads one nor runs an initialiser),
//! which keeps it loaded until the handle is dropped (`dlclose`);
//! [`Handle::load_bias`] says which object it is (`dlinfo(RTLD_DI_LINKMAP)`).

use std::ffi::{c_void, CStr};
use std::ops::ControlFlow;

/// One loaded object as the loader describes it during a walk.
#[derive(Clone, Copy)]
pub struct LoadedObjectInfo<'a> {
    /// The name the loader knows it by (empty for the main executable).
    pub name: &'a CStr,
    /// The load bias: runtime address = link-time address + bias.
    pub bias: usize,
    /// Its program headers.
    pub phdrs: &'a [libc::Elf64_Phdr],
    /// `(dlpi_adds, dlpi_subs)`, when the loader reports them (see the
    /// module docs).
    pub counters: Option<(u64, u64)>,
}

/// Calls `f` with every loaded object, in the loader's order, under the
/// loader's lock, until it returns `Break` (see the module docs).
pub fn for_each_object(mut f: impl FnMut(&LoadedObjectInfo<'_>) -> ControlFlow<()>) {
    let mut f: &mut Visit<'_> = &mut f;
    // SAFETY: the callback only reads the `dl_phdr_info` it is given and
    // calls the closure passed as `data`, which outlives the walk.
    unsafe { libc::dl_iterate_phdr(Some(walk_callback), (&mut f as *mut &mut Visit<'_>).cast()) };
}

/// The closure of a walk, behind the callback's `data` pointer.
type Visit<'f> = dyn FnMut(&LoadedObjectInfo<'_>) -> ControlFlow<()> + 'f;

/// `dl_iterate_phdr`'s callback for [`for_each_object`].
///
/// # Safety
///
/// Only for `dl_iterate_phdr` from [`for_each_object`]: `info` must point
/// to a valid `dl_phdr_info` of `size` bytes describing an object kept
/// loaded during the call, and `data` to the walk's closure.
unsafe extern "C" fn walk_callback(
    info: *mut libc::dl_phdr_info,
    size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid `info` for the duration of the
    // call and our own `data` pointer (see for_each_object).
    let (info, f) = unsafe { (&*info, &mut *data.cast::<&mut Visit<'_>>()) };
    let name = if info.dlpi_name.is_null() {
        c""
    } else {
        // SAFETY: a non-null dlpi_name is a NUL-terminated string the loader
        // keeps during the call.
        unsafe { CStr::from_ptr(info.dlpi_name) }
    };
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
        &[]
    } else {
        // SAFETY: the loader gives `dlpi_phnum` program headers at dlpi_phdr.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
    };
    let object = LoadedObjectInfo { name, bias: info.dlpi_addr as usize, phdrs, counters: counters_of(info, size) };
    match f(&object) {
        ControlFlow::Continue(()) => 0,
        ControlFlow::Break(()) => 1,
    }
}

/// `dlpi_adds` and `dlpi_subs` of a `dl_phdr_info` of `size` bytes: they
/// exist only if the loader's struct is long enough to hold them.
fn counters_of(info: &libc::dl_phdr_info, size: libc::size_t) -> Option<(u64, u64)> {
    let end = std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + std::mem::size_of::<u64>();
    (size >= end).then_some((info.dlpi_adds, info.dlpi_subs))
}

/// The loader's counters of objects loaded and unloaded so far (`dlpi_adds`,
/// `dlpi_subs`), read now (see the module docs). `None` if the loader does
/// not report them. Cheap: the walk stops at the first object.
pub fn counters() -> Option<(u64, u64)> {
    let mut counters = None;
    for_each_object(|o| {
        counters = o.counters;
        ControlFlow::Break(())
    });
    counters
}

/// Where the vdso's ELF header is mapped (`getauxval(AT_SYSINFO_EHDR)`), if
/// the kernel gave the process one.
pub fn vdso_base() -> Option<usize> {
    // SAFETY: getauxval has no preconditions; 0 means "not present".
    let at = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    (at != 0).then_some(at)
}

/// The dynamic symbol `dladdr1` finds covering an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolAt {
    /// Runtime address of the symbol.
    pub start: usize,
    /// `st_size` (0 when the loader gave no symbol entry).
    pub size: usize,
    /// The `STT_*` type (0 when the loader gave no symbol entry).
    pub kind: u8,
    /// Whether the loader gave the symbol's entry (`size` and `kind` are
    /// real).
    pub has_entry: bool,
}

/// `dladdr1` flag asking for the symbol's `ElfW(Sym)` (glibc <dlfcn.h>).
const RTLD_DL_SYMENT: libc::c_int = 1;

/// `dladdr1(addr, RTLD_DL_SYMENT)`: the loader's answer and the symbol's
/// entry (null if it gave none). `None` if no symbol covers `addr`.
fn dladdr1(addr: usize) -> Option<(libc::Dl_info, *const libc::Elf64_Sym)> {
    // SAFETY: plain data out-parameters for dladdr1.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut sym: *const libc::Elf64_Sym = std::ptr::null();
    // SAFETY: RTLD_DL_SYMENT makes dladdr1 store an `const ElfW(Sym) *`.
    let ok = unsafe {
        libc::dladdr1(addr as *const _, &mut info, (&mut sym as *mut *const libc::Elf64_Sym).cast(), RTLD_DL_SYMENT)
    };
    (ok != 0 && !info.dli_saddr.is_null()).then_some((info, sym))
}

fn symbol_of(info: &libc::Dl_info, sym: *const libc::Elf64_Sym) -> SymbolAt {
    let start = info.dli_saddr as usize;
    if sym.is_null() {
        return SymbolAt { start, size: 0, kind: 0, has_entry: false };
    }
    // SAFETY: a non-null `sym` points into the object's dynamic symbol
    // table, which the loader keeps while the object is loaded; read at
    // once.
    let (size, kind) = unsafe { ((*sym).st_size as usize, (*sym).st_info & 0xf) };
    SymbolAt { start, size, kind, has_entry: true }
}

/// The dynamic symbol covering `addr`, as `dladdr1` finds it (it walks the
/// object's whole table). Allocation-free.
pub fn symbol_at(addr: usize) -> Option<SymbolAt> {
    let (info, sym) = dladdr1(addr)?;
    Some(symbol_of(&info, sym))
}

/// The base address of the loaded object that contains `addr` (dladdr's
/// `dli_fbase`), if any.
pub fn object_base(addr: usize) -> Option<usize> {
    let (info, _) = dladdr1(addr)?;
    (!info.dli_fbase.is_null()).then_some(info.dli_fbase as usize)
}

/// As [`symbol_at`], with the symbol's name; `None` also when the loader
/// knows no name.
pub fn named_symbol_at(addr: usize) -> Option<(String, SymbolAt)> {
    let (info, sym) = dladdr1(addr)?;
    if info.dli_sname.is_null() {
        return None;
    }
    // SAFETY: dli_sname is a NUL-terminated string owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_sname) }.to_string_lossy().into_owned();
    Some((name, symbol_of(&info, sym)))
}

/// The address `dlsym(RTLD_DEFAULT, name)` gives: the definition of `name`
/// the program's own references resolve to.
pub fn global_symbol(name: &CStr) -> Option<usize> {
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p as usize)
}

/// `dlvsym(RTLD_DEFAULT, name, version)`, or [`global_symbol`] without a
/// version: the definition of that version of `name` in the global scope.
pub fn global_symbol_version(name: &CStr, version: Option<&CStr>) -> Option<usize> {
    lookup(libc::RTLD_DEFAULT, name, version)
}

fn lookup(handle: *mut c_void, name: &CStr, version: Option<&CStr>) -> Option<usize> {
    // SAFETY: a live handle or RTLD_DEFAULT, and NUL-terminated strings.
    let p = unsafe {
        match version {
            Some(v) => libc::dlvsym(handle, name.as_ptr(), v.as_ptr()),
            None => libc::dlsym(handle, name.as_ptr()),
        }
    };
    (!p.is_null()).then_some(p as usize)
}

/// A reference that keeps one loaded object loaded (see the module docs);
/// `dlclose`d when dropped.
#[derive(Debug)]
pub struct Handle {
    handle: *mut c_void,
}

impl Handle {
    /// A reference on the object already loaded under `name` (`None`: the
    /// main executable), or `None` if there is none. Loads nothing.
    pub fn noload(name: Option<&CStr>) -> Option<Handle> {
        let name = name.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: `name` is null or a NUL-terminated string that lives
        // across the call. RTLD_NOLOAD never loads an object nor runs its
        // initialisers; it only takes a reference on one already loaded.
        let handle = unsafe { libc::dlopen(name, libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        // `then`, not `then_some`: a null handle must never be dropped (closed).
        (!handle.is_null()).then(|| Handle { handle })
    }

    /// The load bias of the object held (`l_addr` of its link map).
    pub fn load_bias(&self) -> Option<usize> {
        let mut map: *mut LinkMapHead = std::ptr::null_mut();
        // SAFETY: `handle` is a live handle from dlopen; RTLD_DI_LINKMAP
        // stores one `struct link_map *` through the pointer we pass.
        let rc =
            unsafe { libc::dlinfo(self.handle, libc::RTLD_DI_LINKMAP, (&mut map as *mut *mut LinkMapHead).cast()) };
        if rc != 0 || map.is_null() {
            return None;
        }
        // SAFETY: glibc's `struct link_map` starts with `ElfW(Addr) l_addr`
        // (the load bias); the handle keeps the object, so the map, alive.
        Some(unsafe { (*map).l_addr })
    }

    /// The address of the symbol `name` in the object held (`dlsym`).
    pub fn symbol(&self, name: &CStr) -> Option<usize> {
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    }
}

impl Handle {
    /// As [`global_symbol_version`], in the object held and its
    /// dependencies.
    pub fn symbol_version(&self, name: &CStr, version: Option<&CStr>) -> Option<usize> {
        lookup(self.handle, name, version)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `handle` came from a successful dlopen and is closed once.
        unsafe { libc::dlclose(self.handle) };
    }
}

/// The first field of glibc's `struct link_map`; the rest is not read.
#[repr(C)]
struct LinkMapHead {
    l_addr: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_counts_and_pins() {
        let mut names = Vec::new();
        let mut first_counters = None;
        for_each_object(|o| {
            if names.is_empty() {
                first_counters = o.counters;
            }
            names.push(o.name.to_owned());
            assert!(o.phdrs.iter().any(|p| p.p_type == libc::PT_LOAD), "{:?} has a PT_LOAD", o.name);
            ControlFlow::Continue(())
        });
        assert!(names[0].is_empty(), "the main executable first");
        assert!(names.iter().any(|n| n.to_bytes().windows(4).any(|w| w == b"libc")));
        let (adds, subs) = counters().expect("glibc reports the counters");
        assert!(adds > subs, "{adds} loaded, {subs} unloaded");
        assert_eq!(first_counters, Some((adds, subs)), "nothing loaded meanwhile");
        assert!(vdso_base().is_some());

        let main = Handle::noload(None).unwrap();
        assert!(main.load_bias().is_some());
        let libc_name = names.iter().find(|n| n.to_bytes().ends_with(b"libc.so.6")).unwrap();
        let libc = Handle::noload(Some(libc_name)).unwrap();
        let malloc = libc.symbol(c"malloc").unwrap();
        assert_eq!(malloc, libc::malloc as *const () as usize);
        assert_eq!(global_symbol(c"malloc"), Some(malloc));
        assert_eq!(global_symbol(c"textpoke_no_such_symbol"), None);
        let (name, sym) = named_symbol_at(malloc + 1).unwrap();
        assert!(name.contains("malloc"), "{name}");
        assert_eq!(symbol_at(malloc + 1), Some(sym));
        assert!(sym.has_entry && sym.start == malloc && sym.size > 1);
        assert_eq!(Handle::noload(Some(c"libtextpoke-no-such-library.so")).map(|h| h.handle), None);
    }
}

/// The entries of a loaded object's dynamic section that textpoke reads
/// (0 when absent), addresses at run time: the relocation tables, the
/// dynamic symbols and strings, the symbol versions, and the `DT_SONAME`
/// string's offset in the strings.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dynamic {
    pub rela: usize,
    pub relasz: usize,
    pub jmprel: usize,
    pub pltrelsz: usize,
    pub symtab: usize,
    pub strtab: usize,
    pub versym: usize,
    pub verneed: usize,
    pub verneednum: usize,
    /// `DT_SONAME`: an offset in `strtab`, 0 when the object has none.
    pub soname: usize,
}

/// Reads the dynamic section at `at` of an object loaded at `bias`.
///
/// # Safety
///
/// `at` is a loaded object's `PT_DYNAMIC`, terminated by `DT_NULL`, and the
/// object stays loaded during the call.
pub unsafe fn read_dynamic(at: usize, bias: usize) -> Dynamic {
    const DT_NULL: i64 = 0;
    const DT_PLTRELSZ: i64 = 2;
    const DT_STRTAB: i64 = 5;
    const DT_SYMTAB: i64 = 6;
    const DT_RELA: i64 = 7;
    const DT_RELASZ: i64 = 8;
    const DT_SONAME: i64 = 14;
    const DT_JMPREL: i64 = 23;
    const DT_VERSYM: i64 = 0x6fff_fff0;
    const DT_VERNEED: i64 = 0x6fff_fffe;
    const DT_VERNEEDNUM: i64 = 0x6fff_ffff;
    /// `Elf64_Dyn` (elf.h).
    #[repr(C)]
    struct Elf64Dyn {
        d_tag: i64,
        d_val: u64,
    }
    let mut d = Dynamic::default();
    let mut p = at as *const Elf64Dyn;
    // SAFETY: the caller's promise: entries up to DT_NULL are readable.
    unsafe {
        while (*p).d_tag != DT_NULL {
            let v = (*p).d_val as usize;
            match (*p).d_tag {
                DT_RELA => d.rela = v,
                DT_RELASZ => d.relasz = v,
                DT_JMPREL => d.jmprel = v,
                DT_PLTRELSZ => d.pltrelsz = v,
                DT_SYMTAB => d.symtab = v,
                DT_STRTAB => d.strtab = v,
                DT_VERSYM => d.versym = v,
                DT_VERNEED => d.verneed = v,
                DT_VERNEEDNUM => d.verneednum = v,
                DT_SONAME => d.soname = v,
                _ => {}
            }
            p = p.add(1);
        }
    }
    // The loader relocates these addresses in place for most objects; the
    // vdso keeps them relative.
    for a in [&mut d.rela, &mut d.jmprel, &mut d.symtab, &mut d.strtab, &mut d.versym, &mut d.verneed] {
        if *a != 0 && *a < bias {
            *a += bias;
        }
    }
    d
}
