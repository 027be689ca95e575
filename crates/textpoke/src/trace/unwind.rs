//! Letting C++ exceptions unwind through frames whose return addresses the
//! function_graph tracer replaced.
//!
//! An unwinder walks the stack by return addresses and finds no unwind
//! information for the return trampoline: `_Unwind_RaiseException` gives
//! up and `std::terminate` aborts the program. uftrace hooks the unwinder
//! by symbol interposition from its preloaded library; textpoke may run
//! without one, so it hooks it in every loaded object's GOT instead: the
//! `JUMP_SLOT`/`GLOB_DAT` entries importing `_Unwind_RaiseException` and
//! `_Unwind_Resume_or_Rethrow` (used by `throw;`) are pointed at wrappers
//! that first put back this thread's original return addresses (marking
//! their shadow records) and then call the real function. `__cxa_begin_catch`
//! is hooked too: the catching frame's records and those above it are live
//! again and get their return addresses replaced anew; the frames the
//! exception unwound are dropped, their exits counted as lost. A GOT entry
//! is an aligned 8-byte word: replacing it is one atomic store, nothing
//! like cross-modifying code. It is written through `/proc/self/mem`, so a
//! RELRO (read-only) GOT needs no protection change.
//!
//! On aarch64 a replaced return address is not in the record's slot but
//! wherever the function's prologue saved x30: the hooks are assembly that
//! saves the callee-saved registers and walks the thread's frames with
//! their call frame information to find each saved x30
//! (`unwind_aarch64.rs`); the records and their marks are the same.
//!
//! `pthread_exit` and cancellation need nothing: glibc's forced unwind
//! stops at a frame it cannot unwind and still runs every cleanup handler
//! (tested).

use crate::sys;
#[cfg(target_arch = "aarch64")]
#[path = "unwind_aarch64.rs"]
mod unwind_aarch64;
use std::collections::HashSet;
#[cfg(target_arch = "x86_64")]
use std::ffi::c_void;
use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};

static ORIG_RAISE: AtomicUsize = AtomicUsize::new(0);
static ORIG_RETHROW: AtomicUsize = AtomicUsize::new(0);
static ORIG_BEGIN_CATCH: AtomicUsize = AtomicUsize::new(0);
/// `std::uncaught_exceptions()` (libstdc++ exports it mangled; libc++abi as
/// `__cxa_uncaught_exceptions`), found next to `__cxa_begin_catch`.
static UNCAUGHT: AtomicUsize = AtomicUsize::new(0);

const HOOKS: [&CStr; 3] = [c"_Unwind_RaiseException", c"_Unwind_Resume_or_Rethrow", c"__cxa_begin_catch"];

#[cfg(target_arch = "x86_64")]
extern "C-unwind" fn raise_hook(exc: *mut c_void) -> i32 {
    super::hot::restore_return_addresses();
    // SAFETY: ORIG_RAISE holds the real `_Unwind_RaiseException`, set before
    // any GOT entry points here.
    let f: extern "C-unwind" fn(*mut c_void) -> i32 =
        unsafe { std::mem::transmute(ORIG_RAISE.load(Ordering::Acquire)) }; // pairs with resolve_original
    f(exc)
}

#[cfg(target_arch = "x86_64")]
extern "C-unwind" fn rethrow_hook(exc: *mut c_void) -> i32 {
    super::hot::restore_return_addresses();
    // SAFETY: as above, the real `_Unwind_Resume_or_Rethrow`.
    let f: extern "C-unwind" fn(*mut c_void) -> i32 =
        unsafe { std::mem::transmute(ORIG_RETHROW.load(Ordering::Acquire)) }; // pairs with resolve_original
    f(exc)
}

/// An aarch64 hook: saves x19–x30 (its caller's frame's values) and x0/x1
/// in a save area (`unwind_aarch64::SaveArea`), calls `$walk(save area,
/// entry SP)`, which may rewrite saved x30 values in the stack and in the
/// save area, restores every register from it and continues in the real
/// function (`br x16`, a tail call: the real function returns to the
/// hook's caller).
#[cfg(target_arch = "aarch64")]
macro_rules! aarch64_hook {
    ($(#[$doc:meta])* $name:ident, $walk:path, $orig:path) => {
        $(#[$doc])*
        #[unsafe(naked)]
        extern "C" fn $name() {
            core::arch::naked_asm!(
                "sub sp, sp, #{size}",
                "stp x19, x20, [sp]",
                "stp x21, x22, [sp, #16]",
                "stp x23, x24, [sp, #32]",
                "stp x25, x26, [sp, #48]",
                "stp x27, x28, [sp, #64]",
                "stp x29, x30, [sp, #80]",
                "stp x0, x1, [sp, #96]",
                "mov x0, sp",
                "add x1, sp, #{size}",
                "bl {walk}",
                "ldp x19, x20, [sp]",
                "ldp x21, x22, [sp, #16]",
                "ldp x23, x24, [sp, #32]",
                "ldp x25, x26, [sp, #48]",
                "ldp x27, x28, [sp, #64]",
                "ldp x29, x30, [sp, #80]",
                "ldp x0, x1, [sp, #96]",
                "add sp, sp, #{size}",
                "adrp x16, {orig}",
                "ldr x16, [x16, :lo12:{orig}]",
                "br x16",
                size = const unwind_aarch64::SAVE_AREA,
                walk = sym $walk,
                orig = sym $orig,
            )
        }
    };
}

#[cfg(target_arch = "aarch64")]
aarch64_hook!(
    /// `_Unwind_RaiseException(exc)` on aarch64: hooked frames' return
    /// addresses put back where they saved x30 (`unwind_aarch64.rs`).
    raise_hook,
    restore_for_unwinder,
    ORIG_RAISE
);
#[cfg(target_arch = "aarch64")]
aarch64_hook!(
    /// `_Unwind_Resume_or_Rethrow(exc)` on aarch64, as `raise_hook`.
    rethrow_hook,
    restore_for_unwinder,
    ORIG_RETHROW
);
#[cfg(target_arch = "aarch64")]
aarch64_hook!(
    /// `__cxa_begin_catch(exc)` on aarch64: the hooked frames from the
    /// catching one outwards are hooked again.
    begin_catch_hook,
    rearm_unless_unwinding,
    ORIG_BEGIN_CATCH
);

#[cfg(target_arch = "aarch64")]
extern "C" fn restore_for_unwinder(save: *mut unwind_aarch64::SaveArea, sp: usize) {
    // SAFETY: the hook's save area and entry SP: the walk starts at the
    // hook's caller, whose frames are live until the hook returns.
    unsafe { unwind_aarch64::restore_for_unwinder(unwind_aarch64::Start { save, sp }) }
}

#[cfg(target_arch = "aarch64")]
extern "C" fn rearm_unless_unwinding(save: *mut unwind_aarch64::SaveArea, sp: usize) {
    if another_exception_in_flight() {
        return;
    }
    // SAFETY: as in restore_for_unwinder.
    unsafe { unwind_aarch64::rearm_after_catch(unwind_aarch64::Start { save, sp }) }
}

/// `__cxa_begin_catch(exc)`, called by the catching frame's handler: tell
/// the shadow stack where that frame is (the stack pointer just above our
/// return address), then continue in the real function.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
extern "C" fn begin_catch_hook() {
    core::arch::naked_asm!(
        "push rdi",          // the exception; also aligns the stack for the call
        "lea rdi, [rsp + 16]", // the catching frame's stack pointer
        "call {rehijack}",
        "pop rdi",
        "jmp qword ptr [rip + {orig}]",
        rehijack = sym rehijack_unless_unwinding,
        orig = sym ORIG_BEGIN_CATCH,
    )
}

/// Frames at or above a catching frame are live again — unless another
/// exception is still being unwound: one caught inside a destructor run
/// by that unwinding (`__cxa_begin_catch` has not yet counted this one
/// caught, so a count above one means another is in flight). The outer
/// exception's frames must keep their original return addresses until it
/// is caught in turn (re-arming them aborted the program in
/// `_Unwind_Resume`: the return trampoline has no unwind information).
#[cfg(target_arch = "x86_64")]
extern "C" fn rehijack_unless_unwinding(catch_sp: usize) {
    if another_exception_in_flight() {
        return;
    }
    super::hot::rehijack_after_catch(catch_sp)
}

/// Whether more than one exception is uncaught: the one being caught, and
/// another still being unwound (see above).
fn another_exception_in_flight() -> bool {
    // Pairs with the Release store in `resolve_original`.
    let f = UNCAUGHT.load(Ordering::Acquire);
    if f == 0 {
        return false;
    }
    // SAFETY: `int std::uncaught_exceptions() noexcept` (or the unsigned C
    // ABI twin): no arguments, a count in eax / w0.
    let uncaught: extern "C" fn() -> u32 = unsafe { std::mem::transmute(f) };
    uncaught() > 1
}

fn hook_for(name: &CStr) -> Option<(usize, &'static AtomicUsize)> {
    if name == HOOKS[0] {
        Some((raise_hook as *const () as usize, &ORIG_RAISE))
    } else if name == HOOKS[1] {
        Some((rethrow_hook as *const () as usize, &ORIG_RETHROW))
    } else if name == HOOKS[2] {
        Some((begin_catch_hook as *const () as usize, &ORIG_BEGIN_CATCH))
    } else {
        None
    }
}

/// GOT entries already pointed at our hooks.
#[derive(Default)]
pub(crate) struct UnwindHooks {
    hooked: HashSet<usize>,
}

use sys::loader::Dynamic as Dyn;

impl UnwindHooks {
    /// Points every loaded object's imports of the unwinder entry points at
    /// the hooks. Returns how many GOT entries were changed.
    pub fn install(&mut self) -> usize {
        let mut slots = Vec::new();
        let mut importers = Vec::new();
        for_each_dynamic(|name, bias, d| {
            let before = slots.len();
            collect_slots(bias, d, &mut slots);
            for &(_, _, orig) in &slots[before..] {
                importers.push((name.to_owned(), orig));
            }
        });
        // Outside dl_iterate_phdr: resolve_original calls dlopen.
        for (name, orig) in &importers {
            resolve_original(name, orig);
        }
        let Ok(mem) = sys::mem::ProcMem::open() else { return 0 };
        let mut n = 0;
        for (slot, hook, orig) in slots {
            // Pairs with `resolve_original`'s Release store (this thread's, or an
            // earlier install's).
            if orig.load(Ordering::Acquire) == 0 || !self.hooked.insert(slot) {
                continue;
            }
            if mem.write_all(slot, &hook.to_ne_bytes()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// The real function behind `orig`, looked up in the scope of the object
/// named `name` that imports it: a library opened with RTLD_LOCAL has its
/// dependencies (libstdc++) outside the global scope RTLD_DEFAULT sees.
fn resolve_original(name: &CStr, orig: &'static AtomicUsize) {
    // Pairs with the Release store below (an earlier call's).
    if orig.load(Ordering::Acquire) != 0 {
        return;
    }
    let sym = if std::ptr::eq(orig, &ORIG_RAISE) {
        HOOKS[0]
    } else if std::ptr::eq(orig, &ORIG_RETHROW) {
        HOOKS[1]
    } else {
        HOOKS[2]
    };
    // The object already loaded under `name` (a reference, dropped at the
    // end; loads nothing), or the global scope for the program itself.
    let held = if name.is_empty() { None } else { sys::loader::Handle::noload(Some(name)) };
    if !name.is_empty() && held.is_none() {
        return;
    }
    let lookup = |s: &CStr| match &held {
        Some(h) => h.symbol(s),
        None => sys::loader::global_symbol(s),
    };
    let p = lookup(sym).unwrap_or(0);
    if std::ptr::eq(orig, &ORIG_BEGIN_CATCH) {
        let f = lookup(c"_ZSt19uncaught_exceptionsv").or_else(|| lookup(c"__cxa_uncaught_exceptions"));
        // Pairs with the Acquire load in `rehijack_unless_unwinding`.
        UNCAUGHT.store(f.unwrap_or(0), Ordering::Release);
    }
    // Before any GOT slot points at a hook (`install` writes them
    // afterwards): pairs with the hooks' Acquire loads (`raise_hook`,
    // `rethrow_hook`; `begin_catch_hook`'s plain x86 load).
    orig.store(p, Ordering::Release);
}

/// Calls `f(name, bias, dynamic info)` for every loaded object with a
/// dynamic section.
fn for_each_dynamic(mut f: impl FnMut(&CStr, usize, &Dyn)) {
    sys::loader::for_each_object(|o| {
        for ph in o.phdrs.iter().filter(|p| p.p_type == libc::PT_DYNAMIC) {
            // SAFETY: the loaded dynamic section, terminated by DT_NULL;
            // the walk holds the loader's lock, so the object stays.
            let d = unsafe { sys::loader::read_dynamic(o.bias + ph.p_vaddr as usize, o.bias) };
            f(o.name, o.bias, &d);
        }
        std::ops::ControlFlow::Continue(())
    });
}

fn collect_slots(bias: usize, d: &Dyn, out: &mut Vec<(usize, usize, &'static AtomicUsize)>) {
    if d.symtab == 0 || d.strtab == 0 {
        return;
    }
    // R_X86_64_GLOB_DAT and _JUMP_SLOT; R_AARCH64_GLOB_DAT and _JUMP_SLOT.
    #[cfg(target_arch = "x86_64")]
    const GLOB_DAT_AND_JUMP_SLOT: [u32; 2] = [6, 7];
    #[cfg(target_arch = "aarch64")]
    const GLOB_DAT_AND_JUMP_SLOT: [u32; 2] = [1025, 1026];
    for (table, size) in [(d.rela, d.relasz), (d.jmprel, d.pltrelsz)] {
        if table == 0 {
            continue;
        }
        // SAFETY: DT_RELA/DT_JMPREL name `size` bytes of Elf64_Rela in memory.
        let relas = unsafe { std::slice::from_raw_parts(table as *const libc::Elf64_Rela, size / 24) };
        for r in relas {
            let (sym, ty) = ((r.r_info >> 32) as usize, (r.r_info & 0xffff_ffff) as u32);
            if sym == 0 || !GLOB_DAT_AND_JUMP_SLOT.contains(&ty) {
                continue;
            }
            // SAFETY: the symbol index comes from the object's own relocation.
            let name = unsafe {
                let s = &*((d.symtab + sym * 24) as *const libc::Elf64_Sym);
                CStr::from_ptr((d.strtab + s.st_name as usize) as *const libc::c_char)
            };
            if let Some((hook, orig)) = hook_for(name) {
                out.push((bias + r.r_offset as usize, hook, orig));
            }
        }
    }
}
