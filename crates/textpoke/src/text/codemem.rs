//! Executable memory near a given address, for trampolines.
//!
//! A `call rel32` reaches ±2 GiB, so trampolines for a site must live
//! within that distance. [`CodeBlock::near`] reads `/proc/self/maps`, picks
//! the free gap closest to the target that keeps the whole block in reach,
//! and maps it there with `MAP_FIXED_NOREPLACE`, readable and executable
//! and never writable: code is written through `/proc/self/mem`, so no page
//! is ever writable and executable (and it works under MDWE).
//!
//! Freeing a block that threads may still execute is the caller's problem:
//! the tracer frees trampolines only after a grace period.

use crate::sys::maps::Maps;
use std::io;

/// Farthest distance from a target that keeps `rel32` reach (with margin).
const REACH: usize = (1 << 31) - (1 << 20);

/// An anonymous executable mapping.
#[derive(Debug)]
pub struct CodeBlock {
    addr: usize,
    len: usize,
}

impl CodeBlock {
    /// Maps `len` bytes (rounded up to pages) wherever the kernel likes.
    pub fn anywhere(len: usize) -> io::Result<CodeBlock> {
        let len = len.max(1).next_multiple_of(super::page_size());
        // SAFETY: a fresh anonymous mapping, readable and executable.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(CodeBlock { addr: p as usize, len })
    }

    /// Maps `len` bytes (rounded up to pages) within rel32 reach of every
    /// address in `[lo, hi]`. Another thread may map the chosen gap between
    /// our look at the maps and our `mmap` (`EEXIST`): then look again.
    pub fn near(lo: usize, hi: usize, len: usize) -> io::Result<CodeBlock> {
        let (addr, len) = map_near(lo, hi, len, libc::PROT_READ | libc::PROT_EXEC)?;
        Ok(CodeBlock { addr, len })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.addr && addr < self.addr + self.len
    }

    /// Writes code at `off` (no thread may be running those bytes).
    pub fn write(&self, off: usize, code: &[u8]) -> io::Result<()> {
        assert!(off + code.len() <= self.len, "write past the block");
        let f = std::fs::OpenOptions::new().write(true).open("/proc/self/mem")?;
        std::os::unix::fs::FileExt::write_all_at(&f, code, (self.addr + off) as u64)
    }
}

/// Maps `len` bytes (rounded up to pages) with `prot` within rel32 reach of
/// every address in `[lo, hi]`. Another thread may map the chosen gap
/// between our look at the maps and our `mmap` (`EEXIST`): then look again.
fn map_near(lo: usize, hi: usize, len: usize, prot: libc::c_int) -> io::Result<(usize, usize)> {
    let mut tries = 0;
    loop {
        match try_map_near(lo, hi, len, prot) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 16 => tries += 1,
            r => return r,
        }
    }
}

fn try_map_near(lo: usize, hi: usize, len: usize, prot: libc::c_int) -> io::Result<(usize, usize)> {
    let ps = super::page_size();
    let len = len.max(1).next_multiple_of(ps);
    let maps = Maps::read()?;
    // The block must satisfy: start >= hi - REACH and start + len <= lo + REACH.
    let min = hi.saturating_sub(REACH).max(0x10000).next_multiple_of(ps);
    let max_end = lo.saturating_add(REACH) & !(ps - 1);
    let mut best: Option<usize> = None;
    let mut consider = |start: usize| {
        if start >= min && start + len <= max_end {
            let d = start.abs_diff(lo);
            if best.is_none_or(|b| b.abs_diff(lo) > d) {
                best = Some(start);
            }
        }
    };
    let mut prev_end = 0x10000;
    for m in maps.0.iter().chain(std::iter::once(&crate::sys::maps::Mapping {
        start: 0x7fff_ffff_f000,
        end: 0x7fff_ffff_f000,
        perms: String::new(),
        path: String::new(),
    })) {
        if m.start >= prev_end + len {
            // Candidates in the gap [prev_end, m.start): its two ends and
            // the point nearest `lo`.
            let gap_lo = prev_end;
            let gap_hi = m.start - len;
            consider(gap_lo);
            consider(gap_hi);
            consider((lo & !(ps - 1)).clamp(gap_lo, gap_hi));
            consider(min.clamp(gap_lo, gap_hi));
            consider((max_end - len).clamp(gap_lo, gap_hi));
        }
        prev_end = prev_end.max(m.end);
    }
    let start = best.ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "no free gap within ±2 GiB"))?;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            start as *mut _,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if p as usize != start {
        // SAFETY: an old kernel ignoring NOREPLACE gave us another address.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "kernel placed the block elsewhere"));
    }
    Ok((start, len))
}

/// An anonymous mapping that is readable and writable and never
/// executable: the data of code that must be changed by plain atomic
/// stores while other threads run it (the tracer's stub words), within
/// rel32 reach of that code.
#[derive(Debug)]
pub struct DataBlock {
    addr: usize,
    len: usize,
}

impl DataBlock {
    /// Maps `len` bytes (rounded up to pages) within rel32 reach of every
    /// address in `[lo, hi]`.
    pub fn near(lo: usize, hi: usize, len: usize) -> io::Result<DataBlock> {
        let (addr, len) = map_near(lo, hi, len, libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(DataBlock { addr, len })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for DataBlock {
    fn drop(&mut self) {
        // SAFETY: our mapping; the owner guarantees no thread can read it.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

impl Drop for CodeBlock {
    fn drop(&mut self) {
        // SAFETY: our mapping; the owner guarantees no thread can run it.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_within_reach() {
        let target = maps_within_reach as fn() as usize;
        let b = CodeBlock::near(target, target, 10_000).unwrap();
        assert!(b.addr().abs_diff(target) < 1 << 31);
        assert!(crate::arch::encode_call(target, b.addr()).is_some());
        b.write(0, &[0xc3]).unwrap();
        // SAFETY: the block holds `ret`.
        unsafe { std::mem::transmute::<usize, extern "C" fn()>(b.addr())() };
    }
}
