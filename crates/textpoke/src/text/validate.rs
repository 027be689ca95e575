//! Validation of a batch before anything is written (see the parent
//! module's docs for the list of checks).

use super::write::{page_runs, read_code};
use super::{Plan, Planned, Poke, Strategy};
use crate::arch;
use crate::error::{Location, PokeError};
use crate::sys::maps::Maps;
use std::ffi::CStr;

/// `dladdr1` flag asking for the symbol's `ElfW(Sym)` (glibc <dlfcn.h>).
const RTLD_DL_SYMENT: libc::c_int = 1;

/// The largest function prefix decoded to prove an instruction boundary.
const MAX_BOUNDARY_SCAN: usize = 1 << 20;

/// The function symbol covering an address, from the dynamic linker.
struct FuncSym {
    name: String,
    start: usize,
    size: usize,
}

fn func_symbol(addr: usize) -> Option<FuncSym> {
    // SAFETY: plain data out-parameters for dladdr1.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut sym: *const libc::Elf64_Sym = std::ptr::null();
    // SAFETY: RTLD_DL_SYMENT makes dladdr1 store an `const ElfW(Sym) *`.
    let ok = unsafe {
        libc::dladdr1(addr as *const _, &mut info, (&mut sym as *mut *const libc::Elf64_Sym).cast(), RTLD_DL_SYMENT)
    };
    if ok == 0 || info.dli_sname.is_null() || info.dli_saddr.is_null() {
        return None;
    }
    // SAFETY: dli_sname is a NUL-terminated string owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_sname) }.to_string_lossy().into_owned();
    // SAFETY: sym, when set, points into the object's dynamic symbol table.
    let (size, kind) = if sym.is_null() { (0, 0) } else { unsafe { ((*sym).st_size as usize, (*sym).st_info & 0xf) } };
    const STT_FUNC: u8 = 2;
    let start = info.dli_saddr as usize;
    (kind == STT_FUNC && start <= addr && addr < start + size).then_some(FuncSym { name, start, size })
}

fn location(p: &Poke, sym: Option<&FuncSym>) -> Location {
    let symbol = match (&p.name, sym) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(s)) => Some(format!("{}+{:#x}", s.name, p.addr - s.start)),
        (None, None) => None,
    };
    Location { addr: p.addr, symbol }
}

fn read_bytes(maps: &Maps, addr: usize, len: usize) -> Result<Vec<u8>, PokeError> {
    let readable = maps.covering(addr, len).is_some_and(|ms| ms.iter().all(|m| m.readable()));
    if readable {
        // SAFETY: every byte is in a readable mapping of this process.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec())
    } else {
        read_code(addr, len).map_err(|source| PokeError::Sys { what: "read code through /proc/self/mem", source })
    }
}

/// Checks every poke; returns the plan of what to write.
pub(crate) fn validate(pokes: &[Poke], strategy: Strategy) -> Result<Plan, PokeError> {
    for p in pokes {
        if p.expected.is_empty() {
            return Err(PokeError::Empty { at: location(p, None) });
        }
        if p.expected.len() != p.new.len() {
            return Err(PokeError::LengthMismatch {
                at: location(p, None),
                expected: p.expected.clone(),
                new: p.new.clone(),
            });
        }
    }
    let mut order: Vec<&Poke> = pokes.iter().collect();
    order.sort_by_key(|p| p.addr);
    for w in order.windows(2) {
        if w[0].addr.saturating_add(w[0].len()) > w[1].addr {
            return Err(PokeError::Overlap {
                at: location(w[0], None),
                len: w[0].len(),
                other: location(w[1], None),
                other_len: w[1].len(),
            });
        }
    }
    let maps = Maps::read().map_err(|source| PokeError::Sys { what: "read /proc/self/maps", source })?;
    let mut planned = Vec::with_capacity(order.len());
    for p in order {
        if let Some(pl) = validate_one(p, &maps, strategy)? {
            planned.push(pl);
        }
    }
    let runs =
        page_runs(&maps, planned.iter().map(|p| (p.addr, p.old.len()))).expect("validated pokes lie in mapped pages");
    Ok(Plan { pokes: planned, runs })
}

fn validate_one(p: &Poke, maps: &Maps, strategy: Strategy) -> Result<Option<Planned>, PokeError> {
    let sym = func_symbol(p.addr);
    let at = location(p, sym.as_ref());
    let len = p.len();
    let Some(mappings) = maps.covering(p.addr, len) else {
        return Err(PokeError::NotMapped { at, len });
    };
    if let Some(m) = mappings.iter().find(|m| !m.executable()) {
        return Err(PokeError::NotExecutable { at, perms: m.perms.clone() });
    }
    let found = read_bytes(maps, p.addr, len)?;
    if found != p.expected {
        return Err(PokeError::Mismatch { at, expected: p.expected.clone(), found });
    }
    check_instructions(p, &at)?;
    if let Some(s) = &sym {
        check_boundary(p, s, maps, &at)?;
    }
    let emu = match strategy {
        Strategy::StopMachine => None,
        Strategy::Breakpoint if p.region => return Err(PokeError::RegionNeedsStopMachine { at }),
        Strategy::Breakpoint => match arch::emulation_for(p.addr, &p.new) {
            Some(e) => Some(e),
            None => return Err(PokeError::NotEmulatable { at, new: p.new.clone() }),
        },
    };
    if p.expected == p.new {
        return Ok(None); // nothing to write
    }
    Ok(Some(Planned { addr: p.addr, old: p.expected.clone(), new: p.new.clone(), at, emu }))
}

fn check_instructions(p: &Poke, at: &Location) -> Result<(), PokeError> {
    for (which, bytes) in [("expected", &p.expected), ("new", &p.new)] {
        if p.region {
            if !arch::check_whole_instructions(p.addr, bytes) {
                return Err(PokeError::NotWholeInstructions {
                    at: at.clone(),
                    which,
                    bytes: bytes.clone(),
                    len: p.len(),
                });
            }
        } else if let Err(what) = arch::check_one_instruction(p.addr, bytes) {
            return Err(PokeError::NotOneInstruction {
                at: at.clone(),
                which,
                bytes: bytes.clone(),
                len: p.len(),
                what,
            });
        }
    }
    Ok(())
}

/// Decodes the covering function from its start up to the poke.
fn check_boundary(p: &Poke, s: &FuncSym, maps: &Maps, at: &Location) -> Result<(), PokeError> {
    let prefix = p.addr - s.start;
    if prefix == 0 || prefix > MAX_BOUNDARY_SCAN || s.size == 0 {
        return Ok(());
    }
    let code = read_bytes(maps, s.start, prefix)?;
    arch::check_boundary(s.start, &code, p.addr).map_err(|(insn_start, insn_end)| PokeError::NotAtBoundary {
        at: at.clone(),
        function: s.name.clone(),
        start: s.start,
        insn_start,
        insn_end,
    })
}
