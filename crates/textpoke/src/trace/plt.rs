//! Library calls: calls from traced objects into shared libraries through
//! the PLT, traced like any function (uftrace's default, turned off there
//! with `--no-libcall`; here [`Tracer::set_libcalls`]).
//!
//! # The PLT site
//!
//! A call `malloc(n)` in a position-independent object is `call
//! malloc@plt`, and the PLT entry is `jmp *GOT[malloc]`: the loader keeps
//! the target in the object's GOT, one 8-byte word per imported function
//! (a `JUMP_SLOT` relocation). For every such slot of every object with
//! patchable sites (textpoke's own object excepted) the tracer makes a
//! *thunk*, 32 bytes of code in a block near the object:
//!
//! ```text
//!  0: nop5               ; the site: the tracer's ordinary NOP5 <-> call stub
//!  5: jmp [rip + 5]      ; on to the real function
//! 11: int3 ...
//! 16: .quad target       ; the slot's resolved target, written once
//! ```
//!
//! and one site at offset 0 named as uftrace names the call (`malloc`).
//! Entered through the slot, the thunk looks exactly like the entry of a
//! function: the caller's return address on top of the stack, the
//! arguments in their registers, `r10`/`r11` free. So the site is an
//! ordinary [`SitePlace::FunctionEntry`] site: ops' filters (`-F`/`-N`)
//! match its name, its NOP becomes a call to its stub (or a jump to a
//! graph stub) by the breakpoint protocol like any other, and exits come
//! from the same return address replacement. Nothing here knows an op.
//!
//! # The switch
//!
//! Switching a slot on is one aligned 8-byte store of the thunk's address
//! into the GOT word; off, one store of the resolved target back. These
//! are data writes, not code: an x86 store of an aligned quadword is
//! single-copy atomic, so a thread running the PLT entry loads either the
//! old target or the new one, both valid and both jumping to the same
//! function in the end. No instruction changes, so no breakpoint protocol.
//! What must hold is that the thunk's code is visible before any thread
//! can read its address: the code is written first, cores are synced
//! (`membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`, cross-modifying code as for
//! new trampolines), and only then is the word stored (Release; its
//! partner is the PLT's `jmp [GOT]`, a plain x86 load).
//!
//! The store is made by this thread, not through `/proc/self/mem` (the
//! kernel's copy there is a `memcpy` that promises no single 8-byte
//! store). A GOT under RELRO is read-only after relocation: its page is
//! made writable for the store and given its permissions back at once;
//! other threads only read it, and reading stays allowed throughout.
//!
//! # Reverting, and what is never freed
//!
//! Switching off stores the resolved target back: a thread that loaded
//! the thunk's address before may still run the thunk, its stub or its
//! trampoline. Nothing is freed then: thunks are never freed or reused
//! (a thread can sit on a thunk's first instruction for as long as the
//! scheduler likes), and a thunk's site keeps its stubs under the usual
//! rules (`trace` module docs). Switching on again reuses the same thunk.
//! An object unloaded by `dlclose` takes its GOT with it: its slots are
//! forgotten at the next rescan and never written again (its thunks stay
//! mapped: a few bytes per import, leaked so that no late thread can run
//! freed memory). Stores are made with the object pinned (`dlopen`
//! `RTLD_NOLOAD`), so it cannot be unloaded mid-switch.
//!
//! # Lazy binding
//!
//! With lazy binding a slot first points back into its own PLT, and the
//! loader's `_dl_fixup` writes the resolved target there on the first
//! call. Jumping through the original value would let the loader
//! overwrite the thunk's address on the first call; so a thunk always
//! jumps to the *resolved* function (BIND_NOW semantics): a slot still
//! unresolved is resolved here with `dlvsym` (the version the object asks
//! for, from its `DT_VERSYM`/`DT_VERNEED`) or `dlsym` for an unversioned
//! symbol, in the global scope and then in the object's own (a library
//! opened `RTLD_LOCAL`). A slot that resolves to nothing is left alone.
//! Once switched, the slot never goes back to its lazy value: off stores
//! the resolved target, so the loader never writes it again. The one race
//! left is a thread already inside `_dl_fixup` for that very slot when it
//! is first switched on: its store of the resolved target may land after
//! ours. That value is a correct one (the same function, untraced): the
//! calls through that slot go untraced until the next switch. The loader
//! writes the slot without a lock we could take (`dl_load_lock` is not
//! held by `_dl_fixup`), so this is stated rather than prevented.
//!
//! # Slots left alone
//!
//! - `IRELATIVE` relocations (an object's own ifuncs) have no symbol and
//!   are not calls into a library; imported ifuncs (`strlen`, `memcpy`)
//!   are ordinary `JUMP_SLOT`s whose resolved value is the implementation
//!   the resolver chose, and `dlsym` runs the resolver the same way.
//! - Functions that return twice or never, or that look at their own
//!   return address: `setjmp` and `longjmp` families, `vfork`, `fork`,
//!   `clone`, the `exec` and `posix_spawn` families (the agent flushes
//!   the trace around them), the
//!   `*context` family, `exit` and friends, `pthread_exit`, the unwinder
//!   and `__cxa_throw` family (textpoke's unwind hooks own some of those
//!   slots, `trace::unwind`), `dlopen`/`dlsym` (which find their caller's
//!   object by its return address), `__tls_get_addr` (the tracer's own
//!   hot path may need it), `__libc_start_main` and profiling hooks.
//! - Slots of textpoke's own object (the agent's, or a program's that
//!   links textpoke): the tracer's own calls are not the program's.
//! - `GLOB_DAT` imports (`-fno-plt`, and Rust's default): a call through
//!   `call [GOT]` has no PLT entry; uftrace does not show them either.

use super::api::Tracer;
use super::hot::{self, SitePlace};
use super::state::{Inner, SiteInfo, Target};
use super::TraceError;
use crate::sites::ObjectId;
use crate::sys;
use crate::text::codemem::CodeBlock;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes per thunk (code, then its target at [`TARGET_AT`]).
const THUNK: usize = 32;
const TARGET_AT: usize = 16;
/// Thunks per block.
const THUNKS_PER_BLOCK: usize = 128;

/// The library-call state of the tracer.
#[derive(Default)]
pub(super) struct PltState {
    /// Whether slots are switched to their thunks.
    on: bool,
    slots: Vec<Slot>,
    /// Thunk blocks with the bytes used in the last one; never freed (see
    /// the module docs).
    blocks: Vec<CodeBlock>,
    used: usize,
    /// Objects whose slots were read.
    scanned: HashSet<ObjectId>,
    /// Thunk code was written since cores were last synced.
    fresh: bool,
}

/// One `JUMP_SLOT` and its thunk.
struct Slot {
    got: usize,
    object: ObjectId,
    resolved: usize,
    thunk: usize,
    /// Whether the GOT word holds the thunk's address (as far as we know:
    /// see "Lazy binding").
    switched: bool,
}

/// Imports never switched (see "Slots left alone").
const SKIP: &[&str] = &[
    "setjmp",
    "_setjmp",
    "sigsetjmp",
    "__sigsetjmp",
    "longjmp",
    "_longjmp",
    "siglongjmp",
    "__longjmp_chk",
    "vfork",
    "__vfork",
    "fork",
    "clone",
    "execve",
    "execv",
    "execvp",
    "execvpe",
    "execl",
    "execlp",
    "execle",
    "fexecve",
    "posix_spawn",
    "posix_spawnp",
    "getcontext",
    "setcontext",
    "swapcontext",
    "makecontext",
    "exit",
    "_exit",
    "_Exit",
    "quick_exit",
    "abort",
    "pthread_exit",
    "__stack_chk_fail",
    "__assert_fail",
    "__libc_start_main",
    "__cxa_finalize",
    "__cxa_throw",
    "__cxa_rethrow",
    "__cxa_begin_catch",
    "__cxa_end_catch",
    "__cxa_call_unexpected",
    "dlopen",
    "dlmopen",
    "dlsym",
    "dlvsym",
    "dlclose",
    "dladdr",
    "dladdr1",
    "dlinfo",
    "__tls_get_addr",
    "__gmon_start__",
    "mcount",
    "_mcount",
    "__fentry__",
    "__cyg_profile_func_enter",
    "__cyg_profile_func_exit",
];

fn skipped(name: &str) -> bool {
    SKIP.contains(&name)
        || name.starts_with("_Unwind_")
        || name.starts_with("__textpoke")
        || name.starts_with("textpoke")
}

/// An import read from an object's relocations, not yet resolved.
struct Import {
    got: usize,
    name: CString,
    version: Option<CString>,
    /// What the slot held when read.
    value: usize,
}

impl Tracer {
    /// Turns library calls on or off: with `on`, every `JUMP_SLOT` of the
    /// objects with patchable sites (and of those loaded later, at
    /// [`Tracer::refresh`]) gets a site named after the imported function
    /// (`malloc`), which registered ops' filters match like any other, and
    /// its GOT word is pointed at the site's thunk; off, the GOT words get
    /// their resolved targets back (the sites stay, unreached). See the
    /// module docs of `trace::plt` for why the switch is safe while
    /// threads call through the slots. Returns how many slots changed.
    pub fn set_libcalls(&'static self, on: bool) -> Result<usize, TraceError> {
        let mut g = self.lock()?;
        g.plt.on = on;
        let before = g.plt.slots.iter().filter(|s| s.switched == on).count();
        let r = if on {
            // Adds the PLT sites (and switches the new slots), gives them to
            // the ops whose filters match them, switches the others.
            g.refresh();
            g.apply(Vec::new())
        } else {
            Ok(())
        };
        g.plt_switch();
        let after = g.plt.slots.iter().filter(|s| s.switched == on).count();
        self.after_change(g);
        r.map(|()| after.saturating_sub(before))
    }

    /// Whether library calls are on ([`Tracer::set_libcalls`]).
    pub fn libcalls(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).plt.on
    }
}

impl Inner {
    /// After a rescan: forgets the slots of unloaded objects, and with
    /// library calls on, makes the sites and thunks of the slots of new
    /// objects with patchable sites and switches them.
    pub(super) fn plt_scan(&mut self) {
        let objects = self.table.objects();
        self.plt.slots.retain(|s| objects.get(s.object).is_some());
        self.plt.scanned.retain(|&id| objects.get(id).is_some());
        // The thunks are x86-64 code (aarch64: to do, with its own
        // `JUMP_SLOT` type and an `ldr x16`/`br x16` thunk).
        if !self.plt.on || !cfg!(target_arch = "x86_64") {
            return;
        }
        let mut owners: Vec<ObjectId> = self.sites.iter().filter(|s| s.alive).map(|s| s.object).collect();
        owners.sort_unstable_by_key(|o| o.get());
        owners.dedup();
        let own = plt_scan_marker as *const () as usize;
        for id in owners {
            if self.plt.scanned.contains(&id) {
                continue;
            }
            let Some(o) = self.table.objects().get(id) else { continue };
            if o.segment_at(own, 1).is_some() {
                self.plt.scanned.insert(id); // textpoke's own object
                continue;
            }
            let (dl_name, bias) = (o.dl_name.clone(), o.bias);
            let in_object = |a: usize| o.segment_at(a, 1).is_some();
            let imports = read_imports(&dl_name, bias);
            let lazy: Vec<bool> = imports.iter().map(|i| in_object(i.value)).collect();
            self.plt.scanned.insert(id);
            let held = (!o.is_main).then(|| sys::loader::Handle::noload(Some(&dl_name))).flatten();
            for (imp, lazy) in imports.into_iter().zip(lazy) {
                let Some(resolved) = resolve(&imp, lazy, held.as_ref()) else { continue };
                if self.sites.len() >= hot::MAX_SITES || self.add_slot(id, bias, &imp, resolved).is_err() {
                    break;
                }
            }
        }
        self.plt_switch();
    }

    /// Makes the thunk and the site of one slot.
    fn add_slot(&mut self, object: ObjectId, near: usize, imp: &Import, resolved: usize) -> std::io::Result<()> {
        let thunk = self.new_thunk(near)?;
        let mut code = [0xccu8; THUNK];
        code[..crate::arch::SITE_NOP.len()].copy_from_slice(&crate::arch::SITE_NOP);
        code[5..11].copy_from_slice(&[0xff, 0x25, (TARGET_AT - 11) as u8, 0, 0, 0]); // jmp [rip + 5]
        code[TARGET_AT..TARGET_AT + 8].copy_from_slice(&(resolved as u64).to_le_bytes());
        let b = self.plt.blocks.last().expect("new_thunk made one");
        b.write(thunk - b.addr(), &code)?;
        self.plt.fresh = true;
        let function: Arc<str> = Arc::from(imp.name.to_string_lossy().as_ref());
        let i = self.sites.len() as u32;
        let slot = hot::ensure_site(i);
        slot.mask.store(0, Ordering::Relaxed);
        // The thunk's address is the function's identity: never reused.
        let func = crate::funcs::register(thunk, &function);
        slot.func.store(func.0, Ordering::Relaxed);
        slot.pair.store(thunk, Ordering::Relaxed);
        slot.place.store(SitePlace::FunctionEntry as u8, Ordering::Relaxed);
        self.by_addr.insert(thunk, i);
        self.sites.push(SiteInfo {
            addr: thunk,
            function,
            object,
            place: SitePlace::FunctionEntry,
            prepared: true,
            nop: crate::arch::SITE_NOP,
            mask: 0,
            target: Target::Off,
            stubs: [None; 3],
            alive: true,
            live: false,
        });
        self.plt.slots.push(Slot { got: imp.got, object, resolved, thunk, switched: false });
        Ok(())
    }

    /// Room for one thunk within rel32 reach of `near` (where its stubs
    /// will be made too).
    fn new_thunk(&mut self, near: usize) -> std::io::Result<usize> {
        let p = &mut self.plt;
        let fits = p.blocks.last().is_some_and(|b| p.used + THUNK <= b.len() && b.addr().abs_diff(near) < 1 << 30);
        if !fits {
            p.blocks.push(CodeBlock::near(near, near, THUNK * THUNKS_PER_BLOCK)?);
            p.used = 0;
        }
        let at = p.blocks.last().expect("pushed").addr() + p.used;
        p.used += THUNK;
        Ok(at)
    }

    /// Brings every slot's GOT word to the thunk (on) or to the resolved
    /// target (off). Returns how many words were written.
    pub(super) fn plt_switch(&mut self) -> usize {
        let on = self.plt.on;
        if !self.plt.slots.iter().any(|s| s.switched != on) {
            return 0;
        }
        if on && std::mem::take(&mut self.plt.fresh) {
            // The thunks' code before any word leads a thread there (see
            // "The switch").
            if crate::sync::sync_cores(crate::sync::best_method()).is_err() {
                self.plt.fresh = true;
                return 0;
            }
        }
        let Ok(maps) = sys::maps::Maps::read() else { return 0 };
        let mut n = 0;
        let objects = self.table.objects();
        for s in self.plt.slots.iter_mut().filter(|s| s.switched != on) {
            // Pinned: a dlclose cannot unmap the GOT under the store.
            let Some(Ok(_pin)) = objects.get(s.object).map(|o| o.pin()) else { continue };
            let value = if on { s.thunk } else { s.resolved };
            if store_word(&maps, s.got, value).is_ok() {
                s.switched = on;
                n += 1;
            }
        }
        n
    }
}

/// Only its address: which object holds textpoke's own code.
#[inline(never)]
fn plt_scan_marker() {}

/// Stores `value` into the GOT word at `got` with one aligned 8-byte
/// store, making a read-only (RELRO) page writable around it.
fn store_word(maps: &sys::maps::Maps, got: usize, value: usize) -> std::io::Result<()> {
    let m = maps.find(got).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))?;
    if !got.is_multiple_of(8) || got + 8 > m.end {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let page = got & !(sys::mem::page_size() - 1);
    let restore = (!m.writable()).then(|| m.prot());
    if restore.is_some() {
        // SAFETY: the page holds the object's GOT (pinned by the caller);
        // adding write permission takes nothing away from its readers.
        unsafe { sys::mem::protect(page, sys::mem::page_size(), libc::PROT_READ | libc::PROT_WRITE)? };
    }
    // SAFETY: an aligned, mapped and now writable word the loader made for
    // this slot; other threads only read it (the loader's lazy writes
    // aside, see "Lazy binding"). Release: the thunk's code and target are
    // written (and cores synced) before; pairs with the PLT entry's `jmp
    // [GOT]`, a plain x86 load.
    unsafe { AtomicUsize::from_ptr(got as *mut usize) }.store(value, Ordering::Release);
    if let Some(prot) = restore {
        // SAFETY: as above: the page's own permissions back.
        unsafe { sys::mem::protect(page, sys::mem::page_size(), prot)? };
    }
    Ok(())
}

/// The function a slot calls: its value if the loader bound it, else the
/// symbol looked up as the loader would (see "Lazy binding").
fn resolve(imp: &Import, lazy: bool, held: Option<&sys::loader::Handle>) -> Option<usize> {
    if !lazy {
        return Some(imp.value);
    }
    let version = imp.version.as_deref();
    let exact = sys::loader::global_symbol_version(&imp.name, version)
        .or_else(|| held.and_then(|h| h.symbol_version(&imp.name, version)));
    // An unversioned definition earlier in the search order (a preloaded
    // interposer: the agent's `signal`, `sigaction`, `execve`, `_exit`...)
    // satisfies a versioned reference for the loader, but not for dlvsym,
    // which wants the exact version: the loader would bind the first one
    // (dlsym's answer) when it lies in another object than the exact one.
    let first = version.and_then(|_| sys::loader::global_symbol(&imp.name));
    match (first, exact) {
        (Some(f), Some(e))
            if sys::loader::object_base(f).is_some() && sys::loader::object_base(f) != sys::loader::object_base(e) =>
        {
            Some(f)
        }
        (_, Some(e)) => Some(e),
        (f, None) => f,
    }
}

use sys::loader::Dynamic as Dyn;

/// The relocation type of a PLT slot (elf.h).
const R_X86_64_JUMP_SLOT: u32 = 7;

/// The `JUMP_SLOT` imports of the loaded object `dl_name` at `bias`,
/// those in [`SKIP`] left out.
fn read_imports(dl_name: &CStr, bias: usize) -> Vec<Import> {
    let mut out = Vec::new();
    sys::loader::for_each_object(|o| {
        if o.bias != bias || o.name != dl_name {
            return ControlFlow::Continue(());
        }
        for ph in o.phdrs.iter().filter(|p| p.p_type == libc::PT_DYNAMIC) {
            // SAFETY: the object's loaded dynamic section; the walk holds
            // the loader's lock, so the object stays.
            let d = unsafe { sys::loader::read_dynamic(o.bias + ph.p_vaddr as usize, o.bias) };
            // SAFETY: the tables `d` names, in the same loaded object.
            unsafe { collect(bias, &d, &mut out) };
        }
        ControlFlow::Break(())
    });
    out
}

/// Appends the `JUMP_SLOT` imports `d` lists.
///
/// # Safety
///
/// `d` describes a loaded object that stays loaded during the call.
unsafe fn collect(bias: usize, d: &Dyn, out: &mut Vec<Import>) {
    if d.jmprel == 0 || d.symtab == 0 || d.strtab == 0 {
        return;
    }
    // SAFETY: DT_JMPREL names `pltrelsz` bytes of Elf64_Rela in memory.
    let relas = unsafe { std::slice::from_raw_parts(d.jmprel as *const libc::Elf64_Rela, d.pltrelsz / 24) };
    for r in relas {
        let (sym, ty) = ((r.r_info >> 32) as usize, (r.r_info & 0xffff_ffff) as u32);
        if sym == 0 || ty != R_X86_64_JUMP_SLOT {
            continue; // IRELATIVE and the like: no import
        }
        // SAFETY: the symbol index and its name come from the object's own
        // relocation and tables.
        let name = unsafe {
            let s = &*((d.symtab + sym * 24) as *const libc::Elf64_Sym);
            CStr::from_ptr((d.strtab + s.st_name as usize) as *const libc::c_char)
        };
        let Ok(text) = name.to_str() else { continue };
        if text.is_empty() || skipped(text) {
            continue;
        }
        let got = bias + r.r_offset as usize;
        // SAFETY: the slot is the object's own GOT word, mapped and aligned.
        let value = unsafe { AtomicUsize::from_ptr(got as *mut usize) }.load(Ordering::Relaxed);
        // SAFETY: as above: the object's own version tables.
        let version = unsafe { version_of(d, sym) };
        out.push(Import { got, name: name.to_owned(), version, value });
    }
}

/// The version symbol `sym` asks for (`DT_VERSYM` index, named in
/// `DT_VERNEED`), if any.
///
/// # Safety
///
/// As [`collect`].
unsafe fn version_of(d: &Dyn, sym: usize) -> Option<CString> {
    if d.versym == 0 || d.verneed == 0 {
        return None;
    }
    // SAFETY: DT_VERSYM has one u16 per dynamic symbol.
    let idx = unsafe { *((d.versym + sym * 2) as *const u16) } & 0x7fff;
    if idx <= 1 {
        return None; // local or global: unversioned
    }
    let mut need = d.verneed;
    for _ in 0..d.verneednum {
        // SAFETY: Elf64_Verneed entries chained by vn_next; Elf64_Vernaux by
        // vna_next (elf.h layouts: Verneed u16,u16,u32,u32,u32; Vernaux
        // u32,u16,u16,u32,u32).
        unsafe {
            let cnt = *((need + 2) as *const u16);
            let mut aux = need + *((need + 8) as *const u32) as usize;
            for _ in 0..cnt {
                let other = *((aux + 6) as *const u16);
                if other & 0x7fff == idx {
                    let name = *((aux + 8) as *const u32) as usize;
                    return Some(CStr::from_ptr((d.strtab + name) as *const libc::c_char).to_owned());
                }
                aux += *((aux + 12) as *const u32) as usize;
            }
            let next = *((need + 12) as *const u32) as usize;
            if next == 0 {
                break;
            }
            need += next;
        }
    }
    None
}
