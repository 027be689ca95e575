//! Finding `dlopen` and `pthread_create` in the target's own C library,
//! from its own memory.
//!
//! Never textpoke's libc, never a path that may only exist in our mount
//! namespace (kubo/injector #21): everything is read from the target.
//!
//! 1. `/proc/PID/auxv` gives `AT_PHDR`, `AT_PHNUM` and `AT_BASE` (the
//!    dynamic loader's base; 0 for a static program, refused earlier).
//! 2. The main program's `PT_PHDR` gives its load bias, its `PT_DYNAMIC`
//!    the `DT_DEBUG` entry, which the dynamic loader pointed at its
//!    `struct r_debug` (libpulp `dig_main_link_map`). Without `DT_DEBUG`
//!    the loader's own exported `_r_debug` is used (Frida
//!    `frida_probe_process`).
//! 3. `r_state` must be `RT_CONSISTENT`; otherwise a `dlopen`/`dlclose`
//!    is changing the list and the caller retries.
//! 4. The link map (`l_addr, l_name, l_ld, l_next`) is walked; the C
//!    library is the object whose `DT_SONAME` is `libc.so.6` (not a path
//!    match), the loader the one whose base is `AT_BASE`.
//! 5. Symbols are looked up with the object's `DT_GNU_HASH` (or
//!    `DT_HASH`), `DT_SYMTAB`, `DT_STRTAB` and `DT_VERSYM`, read from
//!    memory: only defined functions (`STT_FUNC`; an `STT_GNU_IFUNC` is a
//!    resolver, not the function), only the default version (versym
//!    without the hidden bit: `pthread_create@@GLIBC_2.34`, not the
//!    `@GLIBC_2.2.5` compat one). A name missing from libc is looked up in
//!    the other objects in link-map order (glibc < 2.34 keeps `dlopen` in
//!    `libdl.so.2` and `pthread_create` in `libpthread.so.0`).
//! 6. Each address must lie in an executable `PT_LOAD` of its object.
//!
//! Besides the calls the loader makes, [`LibcApi`] records the address
//! ranges the thread check refuses a thread inside (malloc, thread
//! creation and exit, fork, set*id, the dl* functions, the whole dynamic
//! loader): a thread holding one of their locks would deadlock the
//! `pthread_create` we make it run.

use iced_x86::{Code, Decoder, DecoderOptions};

use crate::error::{InjectError, Result};
use crate::remote::Mem;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_PHDR: u32 = 6;
const PF_X: u32 = 1;
const DT_NULL: u64 = 0;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_STRSZ: u64 = 10;
const DT_SONAME: u64 = 14;
const DT_DEBUG: u64 = 21;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const DT_VERSYM: u64 = 0x6fff_fff0;
const STT_FUNC: u8 = 2;
const STT_OBJECT: u8 = 1;
const STT_GNU_IFUNC: u8 = 10;
const AT_PHDR: u64 = 3;
const AT_PHNUM: u64 = 5;
const AT_BASE: u64 = 7;
const AT_ENTRY: u64 = 9;
/// `r_debug.r_state` when the list is consistent.
const RT_CONSISTENT: u32 = 0;
/// Guard against a corrupt or cyclic list.
const MAX_OBJECTS: usize = 100_000;

/// The auxiliary vector entries we use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Auxv {
    /// `AT_PHDR`.
    pub phdr: u64,
    /// `AT_PHNUM`.
    pub phnum: u64,
    /// `AT_BASE`: the dynamic loader's base (0: statically linked).
    pub base: u64,
    /// `AT_ENTRY`.
    pub entry: u64,
}

impl Auxv {
    /// Parses the raw `/proc/PID/auxv` bytes (pairs of native `u64`).
    pub fn parse(raw: &[u8]) -> Auxv {
        let mut a = Auxv::default();
        for pair in raw.chunks_exact(16) {
            let key = u64::from_le_bytes(pair[..8].try_into().unwrap());
            let val = u64::from_le_bytes(pair[8..].try_into().unwrap());
            match key {
                AT_PHDR => a.phdr = val,
                AT_PHNUM => a.phnum = val,
                AT_BASE => a.base = val,
                AT_ENTRY => a.entry = val,
                _ => {}
            }
        }
        a
    }
}

/// A program header.
#[derive(Debug, Clone, Copy)]
struct Phdr {
    p_type: u32,
    flags: u32,
    vaddr: u64,
    memsz: u64,
}

fn read_phdrs(mem: &Mem, at: u64, n: u64) -> Result<Vec<Phdr>> {
    let raw = mem.read_vec(at, 56 * n.min(256) as usize)?;
    Ok(raw
        .chunks_exact(56)
        .map(|p| Phdr {
            p_type: u32::from_le_bytes(p[0..4].try_into().unwrap()),
            flags: u32::from_le_bytes(p[4..8].try_into().unwrap()),
            vaddr: u64::from_le_bytes(p[16..24].try_into().unwrap()),
            memsz: u64::from_le_bytes(p[40..48].try_into().unwrap()),
        })
        .collect())
}

/// One loaded object of the link map.
#[derive(Debug, Clone)]
pub struct Object {
    /// `l_addr`: the load bias.
    pub base: u64,
    /// `l_name` (may be empty for the main program).
    pub name: String,
    /// `DT_SONAME`, if any.
    pub soname: Option<String>,
    /// `l_ld`: its dynamic section.
    pub dynamic: u64,
    /// Its executable `PT_LOAD` ranges (absolute), from its ELF header in
    /// memory (empty when the header is not mapped).
    pub exec: Vec<(u64, u64)>,
}

/// Dynamic-section entries needed for symbol lookup.
#[derive(Debug, Default, Clone, Copy)]
struct DynInfo {
    strtab: u64,
    strsz: u64,
    symtab: u64,
    gnu_hash: u64,
    hash: u64,
    versym: u64,
    soname: Option<u64>,
    debug: u64,
}

fn read_dynamic(mem: &Mem, at: u64, base: u64) -> Result<DynInfo> {
    let mut d = DynInfo::default();
    // glibc relocates most d_ptr entries in place (elf_get_dynamic_info);
    // the vDSO's read-only dynamic section keeps link-time addresses.
    // An address below the base is a link-time one.
    let fix = |v: u64| if v < base { v + base } else { v };
    for i in 0..4096u64 {
        let e = mem.read_vec(at + i * 16, 16)?;
        let tag = u64::from_le_bytes(e[..8].try_into().unwrap());
        let val = u64::from_le_bytes(e[8..].try_into().unwrap());
        match tag {
            DT_NULL => break,
            DT_STRTAB => d.strtab = fix(val),
            DT_STRSZ => d.strsz = val,
            DT_SYMTAB => d.symtab = fix(val),
            DT_GNU_HASH => d.gnu_hash = fix(val),
            DT_HASH => d.hash = fix(val),
            DT_VERSYM => d.versym = fix(val),
            DT_SONAME => d.soname = Some(val),
            DT_DEBUG => d.debug = val,
            _ => {}
        }
    }
    Ok(d)
}

/// A dynamic symbol found by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symbol {
    /// Absolute address.
    pub addr: u64,
    /// `st_size`.
    pub size: u64,
}

/// The GNU hash of a symbol name (the `DT_GNU_HASH` function).
pub fn gnu_hash(name: &[u8]) -> u32 {
    name.iter().fold(5381u32, |h, &c| h.wrapping_mul(33).wrapping_add(c as u32))
}

/// The SysV hash of a symbol name (the `DT_HASH` function).
pub fn sysv_hash(name: &[u8]) -> u32 {
    let mut h = 0u32;
    for &c in name {
        h = (h << 4).wrapping_add(c as u32);
        let g = h & 0xf000_0000;
        if g != 0 {
            h ^= g >> 24;
        }
        h &= !g;
    }
    h
}

/// An object with its dynamic symbol table, ready for lookups.
struct SymbolTable<'m> {
    mem: &'m Mem,
    base: u64,
    d: DynInfo,
}

impl SymbolTable<'_> {
    /// Checks symbol `idx`: defined, a function (or data when `data`),
    /// default version, named `name`.
    fn matches(&self, idx: u64, name: &[u8], data: bool) -> Result<Option<Symbol>> {
        let s = self.mem.read_vec(self.d.symtab + idx * 24, 24)?;
        let st_name = u32::from_le_bytes(s[0..4].try_into().unwrap()) as u64;
        let st_type = s[4] & 0xf;
        let shndx = u16::from_le_bytes(s[6..8].try_into().unwrap());
        let value = u64::from_le_bytes(s[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(s[16..24].try_into().unwrap());
        if shndx == 0 || value == 0 {
            return Ok(None);
        }
        if self.d.strsz != 0 && st_name >= self.d.strsz {
            return Ok(None);
        }
        let found = self.mem.read_cstr(self.d.strtab + st_name, name.len() + 1)?;
        if found != name {
            return Ok(None);
        }
        if self.d.versym != 0 {
            let v = u16::from_le_bytes(self.mem.read_vec(self.d.versym + idx * 2, 2)?.try_into().unwrap());
            if v & 0x8000 != 0 {
                return Ok(None); // a hidden, non-default version
            }
        }
        let wanted = if data { st_type == STT_OBJECT } else { st_type == STT_FUNC };
        if !wanted && st_type != STT_GNU_IFUNC {
            return Ok(None);
        }
        if st_type == STT_GNU_IFUNC {
            // The value is the resolver; none of the functions we call is
            // one. Treat it as absent rather than call a resolver.
            return Ok(None);
        }
        Ok(Some(Symbol { addr: self.base + value, size }))
    }

    fn lookup(&self, name: &str, data: bool) -> Result<Option<Symbol>> {
        let name = name.as_bytes();
        if self.d.symtab == 0 || self.d.strtab == 0 {
            return Ok(None);
        }
        if self.d.gnu_hash != 0 {
            return self.lookup_gnu(name, data);
        }
        if self.d.hash != 0 {
            return self.lookup_sysv(name, data);
        }
        Ok(None)
    }

    fn lookup_gnu(&self, name: &[u8], data: bool) -> Result<Option<Symbol>> {
        let at = self.d.gnu_hash;
        let hdr = self.mem.read_vec(at, 16)?;
        let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap()) as u64;
        let (nbuckets, symoffset, bloom_size) = (word(0), word(1), word(2));
        if nbuckets == 0 {
            return Ok(None);
        }
        let h = gnu_hash(name);
        let buckets = at + 16 + bloom_size * 8;
        let chains = buckets + nbuckets * 4;
        let first = self.mem.read_u32(buckets + (h as u64 % nbuckets) * 4)? as u64;
        if first < symoffset {
            return Ok(None);
        }
        // The chain of this bucket ends at the first entry with bit 0 set.
        for idx in first..first + MAX_OBJECTS as u64 {
            let ch = self.mem.read_u32(chains + (idx - symoffset) * 4)?;
            if (ch | 1) == (h | 1) {
                if let Some(s) = self.matches(idx, name, data)? {
                    return Ok(Some(s));
                }
            }
            if ch & 1 != 0 {
                break;
            }
        }
        Ok(None)
    }

    fn lookup_sysv(&self, name: &[u8], data: bool) -> Result<Option<Symbol>> {
        let at = self.d.hash;
        let nbucket = self.mem.read_u32(at)? as u64;
        let nchain = self.mem.read_u32(at + 4)? as u64;
        if nbucket == 0 {
            return Ok(None);
        }
        let mut idx = self.mem.read_u32(at + 8 + (sysv_hash(name) as u64 % nbucket) * 4)? as u64;
        let mut steps = 0;
        while idx != 0 && idx < nchain && steps < MAX_OBJECTS {
            if let Some(s) = self.matches(idx, name, data)? {
                return Ok(Some(s));
            }
            idx = self.mem.read_u32(at + 8 + nbucket * 4 + idx * 4)? as u64;
            steps += 1;
        }
        Ok(None)
    }
}

/// The functions the loader calls, with the object each came from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Calls {
    /// `pthread_create`.
    pub pthread_create: u64,
    /// `pthread_detach`.
    pub pthread_detach: u64,
    /// `pthread_self`.
    pub pthread_self: u64,
    /// `dlopen`.
    pub dlopen: u64,
    /// `dlsym`.
    pub dlsym: u64,
    /// `dlerror`.
    pub dlerror: u64,
    /// `dlclose`.
    pub dlclose: u64,
    /// `close`.
    pub close: u64,
    /// `send`.
    pub send: u64,
    /// `recv`.
    pub recv: u64,
    /// `__errno_location`.
    pub errno_location: u64,
}

/// Functions a thread must not be inside when it is made to call
/// `pthread_create` (their locks: malloc's arenas, the stack cache, the
/// loader's locks, fork's and set*id's all-thread locks). Looked up in
/// libc; the dynamic loader's text is refused as a whole.
pub const DENY: &[&str] = &[
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "posix_memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
    "malloc_trim",
    "malloc_usable_size",
    "malloc_info",
    "malloc_stats",
    "mallinfo",
    "mallinfo2",
    "mallopt",
    "pthread_create",
    "pthread_join",
    "pthread_tryjoin_np",
    "pthread_timedjoin_np",
    "pthread_clockjoin_np",
    "pthread_detach",
    "pthread_exit",
    "fork",
    "_Fork",
    "vfork",
    "system",
    "popen",
    "pclose",
    "exit",
    "quick_exit",
    "__cxa_finalize",
    "__cxa_thread_atexit_impl",
    "setuid",
    "setgid",
    "seteuid",
    "setegid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "dlopen",
    "dlmopen",
    "dlclose",
    "dlsym",
    "dlvsym",
    "dladdr",
    "dladdr1",
    "dlinfo",
    "dlerror",
    "dl_iterate_phdr",
    "__libc_dlopen_mode",
    "__libc_dlsym",
    "__libc_dlclose",
];

/// What the injection needs from the target's libc and loader.
#[derive(Debug, Clone)]
pub struct LibcApi {
    /// The functions the loader calls.
    pub calls: Calls,
    /// The `syscall` instruction inside libc's `syscall()` function: the
    /// remote-call gadget for a thread not stopped in a system call.
    pub syscall_insn: u64,
    /// Address ranges no stack word of the chosen thread may point into
    /// (name, start, end).
    pub deny: Vec<(String, u64, u64)>,
    /// libc's executable ranges.
    pub libc_exec: Vec<(u64, u64)>,
    /// libc's path as the link map names it.
    pub libc_name: String,
    /// `struct r_debug` in the target.
    pub r_debug: u64,
}

/// The link map of process `pid`.
pub struct LinkMap {
    mem: Mem,
    pid: i32,
    /// The objects, in link-map order (main program first).
    pub objects: Vec<Object>,
    /// `struct r_debug` address.
    pub r_debug: u64,
    auxv: Auxv,
}

impl LinkMap {
    /// Reads the link map of `pid` (steps 1–4). `Err(LoaderBusy)` when
    /// `r_state` is not `RT_CONSISTENT`.
    pub fn read(pid: i32, auxv: Auxv) -> Result<LinkMap> {
        let mem = Mem::new(pid);
        let lerr = |what: String| InjectError::LinkMap { pid, what };
        if auxv.phdr == 0 || auxv.phnum == 0 {
            return Err(lerr("its auxiliary vector has no AT_PHDR".into()));
        }
        let phdrs = read_phdrs(&mem, auxv.phdr, auxv.phnum)?;
        let bias = match phdrs.iter().find(|p| p.p_type == PT_PHDR) {
            Some(p) => auxv.phdr.wrapping_sub(p.vaddr),
            None => return Err(lerr("the main program has no PT_PHDR".into())),
        };
        let mut r_debug = 0;
        if let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) {
            r_debug = read_dynamic(&mem, bias + dynamic.vaddr, bias)?.debug;
        }
        if r_debug == 0 {
            // No DT_DEBUG: ask the loader for its _r_debug.
            let ld = object_at(&mem, auxv.base, String::new(), 0)?;
            let d = read_dynamic(&mem, ld.dynamic, ld.base)?;
            let t = SymbolTable { mem: &mem, base: auxv.base, d };
            r_debug = t.lookup("_r_debug", true)?.map(|s| s.addr).unwrap_or(0);
        }
        if r_debug == 0 {
            return Err(lerr("no r_debug (neither DT_DEBUG nor the loader's _r_debug)".into()));
        }
        let state = mem.read_u32(r_debug + 24)?;
        if state != RT_CONSISTENT {
            return Err(InjectError::LoaderBusy { pid });
        }
        let mut objects = Vec::new();
        let mut lm = mem.read_u64(r_debug + 8)?;
        while lm != 0 {
            if objects.len() >= MAX_OBJECTS {
                return Err(lerr("its link map does not end".into()));
            }
            let l_addr = mem.read_u64(lm)?;
            let l_name = mem.read_u64(lm + 8)?;
            let l_ld = mem.read_u64(lm + 16)?;
            let name = if l_name != 0 {
                String::from_utf8_lossy(&mem.read_cstr(l_name, 4096)?).into_owned()
            } else {
                String::new()
            };
            objects.push(object_at(&mem, l_addr, name, l_ld)?);
            lm = mem.read_u64(lm + 24)?;
        }
        Ok(LinkMap { mem, pid, objects, r_debug, auxv })
    }

    fn table(&self, o: &Object) -> Result<SymbolTable<'_>> {
        Ok(SymbolTable { mem: &self.mem, base: o.base, d: read_dynamic(&self.mem, o.dynamic, o.base)? })
    }

    /// The index of the object with `DT_SONAME` `soname`.
    pub fn by_soname(&self, soname: &str) -> Option<usize> {
        self.objects.iter().position(|o| o.soname.as_deref() == Some(soname))
    }

    /// Looks `name` up in object `first`, then in every object in order.
    fn resolve(&self, first: usize, name: &str) -> Result<Option<(usize, Symbol)>> {
        let order = std::iter::once(first).chain((0..self.objects.len()).filter(|&i| i != first));
        for i in order {
            if let Some(s) = self.table(&self.objects[i])?.lookup(name, false)? {
                return Ok(Some((i, s)));
            }
        }
        Ok(None)
    }

    /// Steps 5–6: the libc functions and ranges the injection needs.
    pub fn libc_api(&self) -> Result<LibcApi> {
        let pid = self.pid;
        let lerr = |what: String| InjectError::LinkMap { pid, what };
        let libc_i = self.by_soname("libc.so.6").ok_or_else(|| {
            lerr(format!(
                "no libc.so.6 in its link map ({} objects: {}); only glibc programs can be injected",
                self.objects.len(),
                self.objects
                    .iter()
                    .map(|o| o.soname.clone().unwrap_or_else(|| o.name.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let need = |name: &str, hint: &str| -> Result<u64> {
            let (i, s) = self
                .resolve(libc_i, name)?
                .ok_or_else(|| lerr(format!("{name} not found in its libc or any loaded object{hint}")))?;
            let o = &self.objects[i];
            if !o.exec.is_empty() && !o.exec.iter().any(|&(a, b)| (a..b).contains(&s.addr)) {
                return Err(lerr(format!("{name} at {:#x} is outside the executable text of {}", s.addr, o.name)));
            }
            Ok(s.addr)
        };
        let dl_hint = " (glibc before 2.34 keeps it in libdl.so.2, which this program has not loaded)";
        let pt_hint = " (glibc before 2.34 keeps it in libpthread.so.0, which this program has not loaded)";
        let calls = Calls {
            pthread_create: need("pthread_create", pt_hint)?,
            pthread_detach: need("pthread_detach", pt_hint)?,
            pthread_self: need("pthread_self", "")?,
            dlopen: need("dlopen", dl_hint)?,
            dlsym: need("dlsym", dl_hint)?,
            dlerror: need("dlerror", dl_hint)?,
            dlclose: need("dlclose", dl_hint)?,
            close: need("close", "")?,
            send: need("send", "")?,
            recv: need("recv", "")?,
            errno_location: need("__errno_location", "")?,
        };
        let libc = &self.objects[libc_i];
        let table = self.table(libc)?;
        let sys = table.lookup("syscall", false)?.ok_or_else(|| lerr("libc has no syscall() function".into()))?;
        let syscall_insn = find_syscall_insn(&self.mem, sys)?
            .ok_or_else(|| lerr(format!("no syscall instruction in libc's syscall() at {:#x}", sys.addr)))?;
        let mut deny = Vec::new();
        for name in DENY {
            if let Some(s) = table.lookup(name, false)? {
                deny.push((name.to_string(), s.addr, s.addr + s.size.max(1)));
            }
        }
        if let Some(ld) = self.objects.iter().find(|o| o.base == self.auxv.base) {
            for &(a, b) in &ld.exec {
                deny.push(("the dynamic loader".to_string(), a, b));
            }
        }
        Ok(LibcApi {
            calls,
            syscall_insn,
            deny,
            libc_exec: libc.exec.clone(),
            libc_name: libc.name.clone(),
            r_debug: self.r_debug,
        })
    }
}

/// Reads the object at `base` (ELF header, executable ranges, soname).
fn object_at(mem: &Mem, base: u64, name: String, l_ld: u64) -> Result<Object> {
    let mut exec = Vec::new();
    let mut dynamic = l_ld;
    // The ELF header is at the base when the first PT_LOAD has vaddr 0
    // (every shared object and PIE); for a non-PIE main program base is 0
    // and the header is not at address 0: skip it then.
    let mut ehdr = [0u8; 64];
    if base != 0 && mem.read(base, &mut ehdr).unwrap_or(0) == 64 && ehdr[..4] == *b"\x7fELF" {
        let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap());
        let phnum = u16::from_le_bytes(ehdr[56..58].try_into().unwrap()) as u64;
        for p in read_phdrs(mem, base + phoff, phnum)? {
            if p.p_type == PT_LOAD && p.flags & PF_X != 0 {
                exec.push((base + p.vaddr, base + p.vaddr + p.memsz));
            }
            if p.p_type == PT_DYNAMIC && dynamic == 0 {
                dynamic = base + p.vaddr;
            }
        }
    }
    let mut soname = None;
    if dynamic != 0 {
        let d = read_dynamic(mem, dynamic, base)?;
        if let (Some(off), true) = (d.soname, d.strtab != 0) {
            soname = Some(String::from_utf8_lossy(&mem.read_cstr(d.strtab + off, 256)?).into_owned());
        }
    }
    Ok(Object { base, name, soname, dynamic, exec })
}

/// The first `syscall` instruction of function `f`, decoded with iced-x86
/// from the target's memory.
fn find_syscall_insn(mem: &Mem, f: Symbol) -> Result<Option<u64>> {
    let len = f.size.clamp(16, 256) as usize;
    let bytes = mem.read_vec(f.addr, len)?;
    let mut dec = Decoder::with_ip(64, &bytes, f.addr, DecoderOptions::NONE);
    while dec.can_decode() {
        let insn = dec.decode();
        if insn.code() == Code::Syscall {
            return Ok(Some(insn.ip()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_the_elf_spec() {
        // Values from the ELF gABI / GNU hash write-ups.
        assert_eq!(gnu_hash(b""), 5381);
        assert_eq!(gnu_hash(b"printf"), 0x156b_2bb8);
        assert_eq!(gnu_hash(b"exit"), 0x7c96_7e3f);
        assert_eq!(sysv_hash(b"printf"), 0x077905a6);
        assert_eq!(sysv_hash(b"exit"), 0x0006_cf04);
    }

    /// Resolves our own libc from our own memory and compares with what
    /// our dynamic loader says.
    #[test]
    fn finds_our_own_libc_functions() {
        let pid = std::process::id() as i32;
        let auxv = Auxv::parse(&std::fs::read("/proc/self/auxv").unwrap());
        let lm = LinkMap::read(pid, auxv).unwrap();
        let api = lm.libc_api().unwrap();
        let ours = |name: &str| {
            let c = std::ffi::CString::new(name).unwrap();
            // SAFETY: a valid C string; RTLD_DEFAULT lookup.
            unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) as u64 }
        };
        assert_eq!(api.calls.pthread_create, ours("pthread_create"));
        assert_eq!(api.calls.dlopen, ours("dlopen"));
        assert_eq!(api.calls.dlerror, ours("dlerror"));
        assert_eq!(api.calls.close, ours("close"));
        assert_eq!(api.calls.recv, ours("recv"));
        let sys = ours("syscall");
        assert!(api.syscall_insn > sys && api.syscall_insn < sys + 64);
        assert_eq!(Mem::new(pid).read_vec(api.syscall_insn, 2).unwrap(), [0x0f, 0x05]);
        assert!(api.deny.iter().any(|(n, a, _)| n == "malloc" && *a == ours("malloc")));
        assert!(api.deny.iter().any(|(n, _, _)| n == "the dynamic loader"));
    }
}
