//! Function symbols of one object, looked up by link-time address, and
//! demangling.

/// One function symbol (`STT_FUNC` or `STT_GNU_IFUNC`, defined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FuncSym {
    /// Link-time address (`st_value`).
    pub addr: u64,
    /// `st_size` (0 when the assembler did not say).
    pub size: u64,
    /// The raw (mangled) name.
    pub name: String,
    /// Preference among aliases at one address: 0 global, 1 weak, 2 local.
    pub rank: u8,
}

/// Function symbols sorted by address, best alias first at each address.
#[derive(Clone, Debug, Default)]
pub(crate) struct Symbols {
    syms: Vec<FuncSym>,
}

impl Symbols {
    pub fn new(mut syms: Vec<FuncSym>) -> Self {
        syms.sort_by(|a, b| (a.addr, a.rank, &a.name).cmp(&(b.addr, b.rank, &b.name)));
        syms.dedup_by(|a, b| a.addr == b.addr && a.name == b.name);
        Symbols { syms }
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
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

    fn sym(addr: u64, size: u64, name: &str, rank: u8) -> FuncSym {
        FuncSym { addr, size, name: name.into(), rank }
    }

    #[test]
    fn demangles_each_language() {
        assert_eq!(demangle("_ZN2tp5scaleEid"), "tp::scale(int, double)");
        assert_eq!(demangle("_ZN4core3fmt5write17h0123456789abcdefE"), "core::fmt::write");
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(demangle("tp_add"), "tp_add");
        assert_eq!(demangle("f2.constprop.0"), "f2.constprop.0");
        assert_eq!(demangle("_Znot a symbol"), "_Znot a symbol");
    }

    #[test]
    fn lookups() {
        let s = Symbols::new(vec![
            sym(0x1000, 0x10, "local_alias", 2),
            sym(0x1000, 0x10, "global", 0),
            sym(0x1010, 0, "sizeless", 0),
            sym(0x1040, 0x20, "next", 0),
        ]);
        assert_eq!(s.starting_at(0x1000).unwrap().name, "global");
        assert!(s.starting_at(0x1001).is_none());
        assert_eq!(s.containing(0x100f).unwrap().name, "global");
        assert_eq!(s.containing(0x1010).unwrap().name, "sizeless");
        assert!(s.containing(0x1011).is_none());
        assert!(s.containing(0xfff).is_none());
        assert_eq!(s.containing(0x105f).unwrap().name, "next");
        assert!(s.containing(0x1060).is_none());
        assert_eq!(s.first_in(0x103d, 3).unwrap().name, "next");
        assert!(s.first_in(0x103c, 3).is_none());
    }
}
