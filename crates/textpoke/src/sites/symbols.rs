//! Function symbols of one object, looked up by link-time address, and
//! demangling.
//!
//! The names stay in the object's string table, read whole once: a symbol
//! is 24 bytes and no allocation, and only the names of sites become
//! strings.
//!
//! # Lookup
//!
//! The symbols are sorted once by address, then by rank (global, weak,
//! local: the best alias first), then by name among aliases of one rank,
//! and exact duplicates dropped. Every lookup is a binary search for the
//! first symbol at or after an address: [`Symbols::starting_at`] (a pad's
//! or an entry's function), [`Symbols::first_in`] (the entry a few bytes
//! after a pad's start), [`Symbols::containing`] (the function around an
//! `__mcount_loc` NOP: only the symbols at the greatest address at or
//! below it are considered, since functions do not nest).

use std::borrow::Cow;

/// One function symbol (`STT_FUNC` or `STT_GNU_IFUNC`, defined).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FuncSym {
    /// Link-time address (`st_value`).
    pub addr: u64,
    /// `st_size` (0 when the assembler did not say).
    pub size: u64,
    /// The raw (mangled) name: where it is in [`Symbols`]' string table.
    name_at: u32,
    name_len: u32,
    /// Preference among aliases at one address: 0 global, 1 weak, 2 local.
    pub rank: u8,
}

impl FuncSym {
    /// A symbol named by `strings[name_at..name_at + name_len]`.
    pub fn new(addr: u64, size: u64, name_at: u32, name_len: u32, rank: u8) -> FuncSym {
        FuncSym { addr, size, name_at, name_len, rank }
    }
}

/// Function symbols sorted by address, best alias first at each address.
#[derive(Clone, Debug, Default)]
pub(crate) struct Symbols {
    syms: Vec<FuncSym>,
    /// The string table the names are in.
    strings: Box<[u8]>,
}

impl Symbols {
    /// `syms` named in `strings` (a string table: offsets and lengths).
    pub fn new(syms: Vec<FuncSym>, strings: Box<[u8]>) -> Self {
        let raw = |s: &FuncSym| &strings[s.name_at as usize..][..s.name_len as usize];
        // Sorted by (address, rank), stably, as plain integers (address,
        // rank and position in one u128: a symbol table's global symbols
        // come in hash order, and this is the sort a 100,000-function
        // program spends its scan on), then by name only among aliases.
        let mut keys: Vec<u128> = syms
            .iter()
            .enumerate()
            .map(|(i, s)| (u128::from(s.addr) << 40) | (u128::from(s.rank) << 32) | i as u128)
            .collect();
        keys.sort_unstable();
        let mut syms: Vec<FuncSym> = keys.iter().map(|&k| syms[(k & 0xffff_ffff) as usize]).collect();
        drop(keys);
        let mut i = 0;
        while i < syms.len() {
            let key = (syms[i].addr, syms[i].rank);
            let run = syms[i..].iter().take_while(|s| (s.addr, s.rank) == key).count();
            if run > 1 {
                syms[i..i + run].sort_by(|a, b| raw(a).cmp(raw(b)));
            }
            i += run;
        }
        syms.dedup_by(|a, b| a.addr == b.addr && raw(a) == raw(b));
        Symbols { syms, strings }
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// The raw (mangled) name of `s`, a symbol of this table; invalid UTF-8
    /// replaced.
    pub fn name(&self, s: &FuncSym) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.strings[s.name_at as usize..][..s.name_len as usize])
    }

    /// The best symbol starting exactly at `addr`.
    pub fn starting_at(&self, addr: u64) -> Option<&FuncSym> {
        let i = self.syms.partition_point(|s| s.addr < addr);
        self.syms.get(i).filter(|s| s.addr == addr)
    }

    /// The first symbol starting in `[addr, addr + window]`.
    pub fn first_in(&self, addr: u64, window: u64) -> Option<&FuncSym> {
        let i = self.syms.partition_point(|s| s.addr < addr);
        self.syms.get(i).filter(|s| s.addr - addr <= window)
    }

    /// The symbol containing `addr`: among the symbols at the greatest
    /// address `<= addr`, the best one whose `[addr, addr + size)` holds it
    /// (a symbol of size 0 holds only its own address). Symbols further
    /// below are not considered: functions do not nest.
    pub fn containing(&self, addr: u64) -> Option<&FuncSym> {
        let end = self.syms.partition_point(|s| s.addr <= addr);
        let start_addr = self.syms.get(end.checked_sub(1)?)?.addr;
        self.syms[..end]
            .iter()
            .rev()
            .take_while(|s| s.addr == start_addr)
            .filter(|s| addr - s.addr < s.size.max(1))
            .min_by_key(|s| s.rank)
    }
}

/// Demangle a symbol name: Rust (legacy and v0) with rustc-demangle, without
/// the hash; C++ (Itanium ABI) with cpp_demangle; anything else, C included,
/// as it is.
pub fn demangle(raw: &str) -> String {
    // Rust names (`_ZN`, `_R`, with zero, one or two underscores first, as
    // rustc-demangle accepts them) and C++ names (`_Z`) start with one of
    // these; a C name mostly does not, and is itself.
    if !raw.starts_with(['_', 'Z', 'R']) {
        return raw.to_owned();
    }
    // rustc-demangle recognises only Rust symbols (`_R...`, and `_ZN...E`
    // legacy paths, which it rejects when C++ parameter types follow the E),
    // so it goes first; a C++ name falls through to cpp_demangle.
    if let Ok(d) = rustc_demangle::try_demangle(raw) {
        return format!("{d:#}");
    }
    if raw.starts_with("_Z") {
        if let Ok(sym) = cpp_demangle::Symbol::new(raw) {
            if let Ok(s) = sym.demangle(&cpp_demangle::DemangleOptions::default()) {
                return s;
            }
        }
    }
    raw.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of `(addr, size, name, rank)`.
    fn table(syms: &[(u64, u64, &str, u8)]) -> Symbols {
        let mut strings = Vec::new();
        let mut out = Vec::new();
        for &(addr, size, name, rank) in syms {
            out.push(FuncSym::new(addr, size, strings.len() as u32, name.len() as u32, rank));
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
        }
        Symbols::new(out, strings.into())
    }

    #[test]
    fn demangles_each_language() {
        assert_eq!(demangle("_ZN2tp5scaleEid"), "tp::scale(int, double)");
        assert_eq!(demangle("_ZN4core3fmt5write17h0123456789abcdefE"), "core::fmt::write");
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(demangle("tp_add"), "tp_add");
        assert_eq!(demangle("f2.constprop.0"), "f2.constprop.0");
        assert_eq!(demangle("_Znot a symbol"), "_Znot a symbol");
        // rustc-demangle's forms without the leading underscore.
        assert_eq!(demangle("ZN4core3fmt5write17h0123456789abcdefE"), "core::fmt::write");
        assert_eq!(demangle("RNvCs1234_7mycrate3foo"), "mycrate::foo");
    }

    #[test]
    fn lookups() {
        let s = table(&[
            (0x1000, 0x10, "local_alias", 2),
            (0x1000, 0x10, "global", 0),
            (0x1010, 0, "sizeless", 0),
            (0x1040, 0x20, "next", 0),
            (0x1040, 0x20, "next", 0),
        ]);
        let name = |f: Option<&FuncSym>| s.name(f.expect("a symbol")).into_owned();
        assert_eq!(name(s.starting_at(0x1000)), "global");
        assert!(s.starting_at(0x1001).is_none());
        assert_eq!(name(s.containing(0x100f)), "global");
        assert_eq!(name(s.containing(0x1010)), "sizeless");
        assert!(s.containing(0x1011).is_none());
        assert!(s.containing(0xfff).is_none());
        assert_eq!(name(s.containing(0x105f)), "next");
        assert!(s.containing(0x1060).is_none());
        assert_eq!(name(s.first_in(0x103d, 3)), "next");
        assert!(s.first_in(0x103c, 3).is_none());
        assert_eq!(s.syms.len(), 4, "a duplicate is dropped");
    }
}
