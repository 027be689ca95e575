//! `/proc/self/maps`: which ranges are mapped and with what protection.
//!
//! [`Maps::read`] parses the file once into a vector sorted by address (the
//! kernel lists mappings in order); [`Maps::find`] is a binary search for
//! the first mapping ending after an address, and `Maps::covering` (tests only) walks
//! from there, mapping to adjacent mapping, until a range is covered or a
//! hole shows. A snapshot: another thread may map or unmap meanwhile.

use std::io;

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
    /// `rwxp`-style permission string.
    pub perms: String,
    pub path: String,
}

impl Mapping {
    pub fn readable(&self) -> bool {
        self.perms.as_bytes()[0] == b'r'
    }
    pub fn writable(&self) -> bool {
        self.perms.as_bytes()[1] == b'w'
    }
    pub fn executable(&self) -> bool {
        self.perms.as_bytes()[2] == b'x'
    }
    /// The protection as `PROT_*` bits.
    pub fn prot(&self) -> libc::c_int {
        let mut p = libc::PROT_NONE;
        if self.readable() {
            p |= libc::PROT_READ;
        }
        if self.writable() {
            p |= libc::PROT_WRITE;
        }
        if self.executable() {
            p |= libc::PROT_EXEC;
        }
        p
    }
}

/// A snapshot of this process's mappings, sorted by address.
#[derive(Debug, Clone)]
pub struct Maps(pub Vec<Mapping>);

impl Maps {
    pub fn read() -> io::Result<Maps> {
        let text = std::fs::read_to_string("/proc/self/maps")?;
        Ok(Maps(text.lines().filter_map(parse_line).collect()))
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: usize) -> Option<&Mapping> {
        let i = self.0.partition_point(|m| m.end <= addr);
        self.0.get(i).filter(|m| m.start <= addr)
    }

    /// The mappings covering `[addr, addr+len)`, or `None` if any byte is
    /// unmapped. (Validation walks the mappings itself; kept for tests.)
    #[cfg(test)]
    pub fn covering(&self, addr: usize, len: usize) -> Option<Vec<&Mapping>> {
        let end = addr.checked_add(len)?;
        let mut out = Vec::new();
        let mut at = addr;
        while at < end {
            let m = self.find(at)?;
            out.push(m);
            at = m.end;
        }
        Some(out)
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.split_ascii_whitespace();
    let (s, e) = it.next()?.split_once('-')?;
    let perms = it.next()?.to_string();
    let path = it.nth(3).unwrap_or("").to_string();
    Some(Mapping { start: usize::from_str_radix(s, 16).ok()?, end: usize::from_str_radix(e, 16).ok()?, perms, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds() {
        let l = "7f00-8f00 r-xp 00000000 08:01 123 /usr/lib/libc.so.6";
        let m = parse_line(l).unwrap();
        assert_eq!((m.start, m.end, m.prot()), (0x7f00, 0x8f00, libc::PROT_READ | libc::PROT_EXEC));
        let maps = Maps::read().unwrap();
        let f = parses_and_finds as fn() as usize;
        assert!(maps.find(f).unwrap().executable());
        assert!(maps.find(0).is_none());
        assert!(maps.covering(f, 16).is_some());
    }
}
