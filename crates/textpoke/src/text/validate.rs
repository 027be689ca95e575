//! Validation of a batch before anything is written (see the parent
//! module's docs for the list of checks).
//!
//! # One pass
//!
//! The pokes are sorted by address once; then the mappings and the
//! dynamic symbols are looked up for all of them together: one read of
//! `/proc/self/maps`, one walk of the loaded objects for the symbols
//! covering the pokes ([`dynsym`]: each object's table read once, not
//! once per poke as `dladdr1` does), and one loop over the pokes that
//! compares their bytes in place. Nothing is allocated per poke: a
//! [`Planned`] borrows its [`Poke`], and a refusal's [`Location`] (the
//! symbol name, from `dladdr1`) is made only for the poke refused.
//!
//! # What a poke's bytes may be
//!
//! - [`Poke::new`]: expected and new bytes are each exactly one whole
//!   instruction. Rule 1 of DESIGN.md holds trivially: no thread can be
//!   between two instructions of a single one.
//! - [`Poke::region`]: each side is whole instructions covering the poke
//!   exactly. A thread may be between two of them, so only the
//!   stop-machine strategy may commit it (which checks that no parked
//!   thread is strictly inside).
//! - [`Poke::first_byte`]: each side is whole instructions covering the
//!   poke exactly, **and the two differ in their first byte only**. It
//!   may be committed by the breakpoint protocol while threads run, the
//!   trap handler standing in for the *first instruction* of the new
//!   bytes. This is how gcc's pad `90 90 90 90 90` (five instructions)
//!   becomes `e9 90 90 90 90` (one `jmp rel32`, whose displacement is the
//!   four unchanged NOPs) and back, without parking anyone (attach.md
//!   §6.3; the tracer puts the jump's target, the site's *mirror*, where
//!   that displacement leads: `trace::mirror`).
//!
//! ## Why a first-byte poke is safe
//!
//! Let the poke cover `[S, S+n)`, old bytes `o0 t1..t(n-1)`, new bytes
//! `w0 t1..t(n-1)` (the same tail `t`), each side whole instructions
//! ending exactly at `S+n`, `S` an instruction boundary.
//!
//! 1. *No instruction of the tail is modified.* Only the byte at `S` is
//!    ever written (the breakpoint protocol skips a tail equal to the old
//!    one): first `int3`, then `w0`. The bytes `t` are the same at every
//!    instant, before, during and after.
//! 2. *A thread at `S+k`, `0 < k < n`,* is there because it executed the
//!    first instruction(s) of one side and was preempted, interrupted by
//!    a signal whose frame saved that PC, or because code jumps there: in
//!    each case `S+k` is a boundary of the old or the new decoding. It
//!    decodes from `S+k` onward bytes of `t` only, which both sides share,
//!    so it runs the same instructions it would have run had nothing
//!    changed, and those end exactly at `S+n` (both sides decode as whole
//!    instructions ending there) — whatever the byte at `S` holds.
//! 3. *A thread at `S`* decodes the byte there: `o0` (the old first
//!    instruction, `o0` followed by unchanged tail bytes: whole and old;
//!    then point 2), `int3` (the trap handler emulates the new first
//!    instruction, rule 2 of DESIGN.md), or `w0` (the new first
//!    instruction, `w0` followed by unchanged tail bytes: whole and new).
//!    An instruction mixing old and new bytes cannot be decoded: the one
//!    byte that differs is read once, and every other byte it may be
//!    combined with is the same on both sides.
//! 4. *Cross-modification* of the byte at `S` follows the breakpoint
//!    protocol with every core synced between steps, as for any poke.
//!
//! Rule 1 of DESIGN.md forbids combining instructions "while another
//! thread may be between them" because that thread would resume in the
//! middle of the new instruction, or run a mix of the two; by 2 and 3
//! neither can happen when only the first byte changes. The same holds in
//! the other direction (one instruction becomes several), and the
//! stop-machine strategy may commit a first-byte poke too (it writes
//! while every thread is parked; its check that none is inside is more
//! than this needs). A first-byte poke whose tails differ is refused
//! ([`PokeError::TailChanged`]).

use super::dynsym::{self, Covering};
use super::write::{page_runs, read_code};
use super::{Plan, Planned, Poke, Shape, Strategy};
use crate::arch;
use crate::error::{Location, PokeError};
use crate::sys::loader;
use crate::sys::maps::{Mapping, Maps};

/// The largest function prefix decoded to prove an instruction boundary.
const MAX_BOUNDARY_SCAN: usize = 1 << 20;

/// The function symbol covering an address, with its name, from the
/// dynamic linker (for messages).
struct FuncSym {
    name: String,
    start: usize,
}

fn func_symbol(addr: usize) -> Option<FuncSym> {
    let (name, sym) = loader::named_symbol_at(addr)?;
    let covering = Covering { start: sym.start, size: sym.size, kind: sym.kind };
    function_range(addr, covering).map(|_| FuncSym { name, start: sym.start })
}

/// A covering symbol that is a function holding `addr`: its start and size.
fn function_range(addr: usize, c: Covering) -> Option<(usize, usize)> {
    const STT_FUNC: u8 = 2;
    (c.kind == STT_FUNC && c.start <= addr && addr - c.start < c.size).then_some((c.start, c.size))
}

/// Where a poke is, for a message: its name, else `symbol+offset` when the
/// dynamic linker knows a function there. Asks the linker: never while
/// threads are parked.
#[cold]
pub(super) fn locate(p: &Poke) -> Location {
    if let Some(n) = &p.name {
        return Location { addr: p.addr, symbol: Some(n.to_string()) };
    }
    let symbol = func_symbol(p.addr).map(|s| format!("{}+{:#x}", s.name, p.addr - s.start));
    Location { addr: p.addr, symbol }
}

/// Where a poke is without asking the linker (for refusals of the batch's
/// shape, before any lookup).
fn named_location(p: &Poke) -> Location {
    Location { addr: p.addr, symbol: p.name.as_deref().map(str::to_owned) }
}

/// Checks every poke; returns the plan of what to write.
pub(crate) fn validate(pokes: &[Poke], strategy: Strategy) -> Result<Plan<'_>, PokeError> {
    for p in pokes {
        if p.expected.is_empty() {
            return Err(PokeError::Empty { at: named_location(p) });
        }
        if p.expected.len() != p.new.len() {
            return Err(PokeError::LengthMismatch {
                at: named_location(p),
                expected: p.expected.to_vec(),
                new: p.new.to_vec(),
            });
        }
    }
    let mut order: Vec<&Poke> = pokes.iter().collect();
    order.sort_by_key(|p| p.addr);
    for w in order.windows(2) {
        if w[0].addr.saturating_add(w[0].len()) > w[1].addr {
            return Err(PokeError::Overlap {
                at: named_location(w[0]),
                len: w[0].len(),
                other: named_location(w[1]),
                other_len: w[1].len(),
            });
        }
    }
    let addrs: Vec<usize> = order.iter().map(|p| p.addr).collect();
    let symbols = dynsym::covering_sorted(&addrs);
    drop(addrs);
    // `/proc/self/maps` is read in several system calls, between which other
    // threads may map and unmap: an emulator's view (qemu-user builds it
    // from its own page table) has been seen missing a stable mapping while
    // other threads mapped memory. A poke found outside every mapping is
    // checked against a second reading before it is refused.
    let maps = read_maps()?;
    match plan_with(&order, &symbols, &maps, strategy) {
        Err(PokeError::NotMapped { .. }) => plan_with(&order, &symbols, &read_maps()?, strategy),
        plan => plan,
    }
}

fn read_maps() -> Result<Maps, PokeError> {
    Maps::read().map_err(|source| PokeError::Sys { what: "read /proc/self/maps", source })
}

fn plan_with<'a>(
    order: &[&'a Poke],
    symbols: &[Option<dynsym::Covering>],
    maps: &Maps,
    strategy: Strategy,
) -> Result<Plan<'a>, PokeError> {
    let mut planned = Vec::with_capacity(order.len());
    for (p, sym) in order.iter().zip(symbols) {
        let function = sym.and_then(|c| function_range(p.addr, c));
        if let Some(pl) = validate_one(p, maps, function, strategy)? {
            planned.push(pl);
        }
    }
    let runs =
        page_runs(maps, planned.iter().map(|p| (p.addr, p.old().len()))).expect("validated pokes lie in mapped pages");
    Ok(Plan { pokes: planned, runs })
}

/// The mappings of `[addr, addr + len)` in order, or the first byte that
/// is not mapped. Allocation-free.
fn for_each_mapping<'m>(
    maps: &'m Maps,
    addr: usize,
    len: usize,
    mut f: impl FnMut(&'m Mapping) -> bool,
) -> Result<bool, ()> {
    let end = addr.checked_add(len).ok_or(())?;
    let mut at = addr;
    while at < end {
        let m = maps.find(at).ok_or(())?;
        if !f(m) {
            return Ok(false);
        }
        at = m.end;
    }
    Ok(true)
}

/// Whether every byte of `[addr, addr + len)` is in a readable mapping.
fn readable(maps: &Maps, addr: usize, len: usize) -> bool {
    for_each_mapping(maps, addr, len, |m| m.readable()) == Ok(true)
}

/// Calls `f` with the `len` bytes at `addr` (a copy on the stack for a
/// short read; `/proc/self/mem` for pages that are not readable).
fn with_bytes<R>(maps: &Maps, addr: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R, PokeError> {
    if !readable(maps, addr, len) {
        let bytes = read_code(addr, len)
            .map_err(|source| PokeError::Sys { what: "read code through /proc/self/mem", source })?;
        return Ok(f(&bytes));
    }
    let mut small = [0u8; 32];
    if len <= small.len() {
        // SAFETY: every byte is in a readable mapping of this process.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, small.as_mut_ptr(), len) };
        return Ok(f(&small[..len]));
    }
    // SAFETY: as above.
    Ok(f(unsafe { std::slice::from_raw_parts(addr as *const u8, len) }))
}

fn validate_one<'a>(
    p: &'a Poke,
    maps: &Maps,
    function: Option<(usize, usize)>,
    strategy: Strategy,
) -> Result<Option<Planned<'a>>, PokeError> {
    let len = p.len();
    let mut not_executable = None;
    let mapped = for_each_mapping(maps, p.addr, len, |m| {
        if !m.executable() {
            not_executable = Some(m.perms.clone());
        }
        m.executable()
    });
    if mapped.is_err() {
        return Err(PokeError::NotMapped { at: locate(p), len });
    }
    if let Some(perms) = not_executable {
        return Err(PokeError::NotExecutable { at: locate(p), perms });
    }
    let found = with_bytes(maps, p.addr, len, |b| (b != &*p.expected).then(|| b.to_vec()))?;
    if let Some(found) = found {
        return Err(PokeError::Mismatch { at: locate(p), expected: p.expected.to_vec(), found });
    }
    check_instructions(p)?;
    if let Some((start, size)) = function {
        check_boundary(p, start, size, maps)?;
    }
    let emu = match strategy {
        Strategy::StopMachine => None,
        Strategy::Breakpoint if p.shape == Shape::Region => {
            return Err(PokeError::RegionNeedsStopMachine { at: locate(p) })
        }
        Strategy::Breakpoint => match emulation(p, &p.new) {
            Some(e) => Some(e),
            None => return Err(PokeError::NotEmulatable { at: locate(p), new: p.new.to_vec() }),
        },
    };
    if p.expected == p.new {
        return Ok(None); // nothing to write
    }
    Ok(Some(Planned { addr: p.addr, poke: p, emu }))
}

fn check_instructions(p: &Poke) -> Result<(), PokeError> {
    if p.shape == Shape::FirstByte && p.expected[1..] != p.new[1..] {
        return Err(PokeError::TailChanged { at: locate(p), expected: p.expected.to_vec(), new: p.new.to_vec() });
    }
    for (which, bytes) in [("expected", &p.expected), ("new", &p.new)] {
        match p.shape {
            Shape::Region | Shape::FirstByte => {
                if !arch::check_whole_instructions(p.addr, bytes) {
                    return Err(PokeError::NotWholeInstructions {
                        at: locate(p),
                        which,
                        bytes: bytes.to_vec(),
                        len: p.len(),
                    });
                }
            }
            Shape::One => {
                if let Err(what) = arch::check_one_instruction(p.addr, bytes) {
                    return Err(PokeError::NotOneInstruction {
                        at: locate(p),
                        which,
                        bytes: bytes.to_vec(),
                        len: p.len(),
                        what,
                    });
                }
            }
        }
    }
    Ok(())
}

/// How the trap handler stands in for `bytes` (a side of `p`) while `p`
/// is committed by the breakpoint protocol: for a first-byte poke the
/// first instruction of `bytes` (a thread that traps at the first byte
/// runs only that one; the rest is unchanged code it then runs itself),
/// otherwise the one instruction `bytes` are.
pub(super) fn emulation(p: &Poke, bytes: &[u8]) -> Option<arch::Emulation> {
    let len = match p.shape {
        Shape::FirstByte => first_instruction_len(p.addr, bytes)?,
        Shape::One | Shape::Region => bytes.len(),
    };
    arch::emulation_for(p.addr, &bytes[..len])
}

/// The length of the first instruction of `bytes` at `ip`: the shortest
/// prefix that decodes as exactly one instruction.
fn first_instruction_len(ip: usize, bytes: &[u8]) -> Option<usize> {
    (1..=bytes.len()).find(|&n| arch::check_one_instruction(ip, &bytes[..n]).is_ok())
}

/// Decodes the covering function from its start up to the poke.
fn check_boundary(p: &Poke, start: usize, size: usize, maps: &Maps) -> Result<(), PokeError> {
    let prefix = p.addr - start;
    if prefix == 0 || prefix > MAX_BOUNDARY_SCAN || size == 0 {
        return Ok(());
    }
    let decoded = with_bytes(maps, start, prefix, |code| arch::check_boundary(start, code, p.addr))?;
    decoded.map_err(|(insn_start, insn_end)| PokeError::NotAtBoundary {
        at: locate(p),
        function: func_symbol(p.addr).map(|s| s.name).unwrap_or_default(),
        start,
        insn_start,
        insn_end,
    })
}
