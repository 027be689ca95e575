//! Anonymous private memory: the one place textpoke calls `mmap`,
//! `munmap` and `mincore`.
//!
//! - **Buffers** ([`map`], [`map_populated`], [`remap_zero`]): readable and
//!   writable, without swap reservation, for buffers that async-signal-safe
//!   code creates (mmap is async-signal-safe, malloc is not): the
//!   recorder's per-thread buffers and rings, the tracer's shadow stacks.
//!   [`resident_pages`] tells which pages were ever written.
//! - **Blocks at a place** ([`map_anywhere`], [`map_exactly`]): any
//!   protection, wherever the kernel likes or exactly at an address nothing
//!   is mapped at (`MAP_FIXED_NOREPLACE`, never replacing a mapping): the
//!   engine's code and data blocks, which must lie within rel32 reach of
//!   the code that uses them (`text::codemem` picks the address).

use std::io;

/// Maps `len` bytes of zeroed, private, anonymous memory (pages are
/// touched lazily; no swap reservation). `None` on failure.
pub fn map(len: usize) -> Option<*mut u8> {
    map_with(len, 0)
}

/// As [`map`], with every page faulted in now (`MAP_POPULATE`): code that
/// writes the memory later never takes a page fault.
pub fn map_populated(len: usize) -> Option<*mut u8> {
    map_with(len, libc::MAP_POPULATE)
}

fn map_with(len: usize, flags: libc::c_int) -> Option<*mut u8> {
    // SAFETY: anonymous mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        Some(p as *mut u8)
    }
}

/// As [`map`], `guard + len` bytes whose lowest `guard` bytes (a multiple
/// of the page size) are then made inaccessible (`mprotect(PROT_NONE)`,
/// best effort: its failure is ignored): a stack at `base + guard` that
/// overflows faults instead of writing below. Returns the base of the
/// whole mapping, which [`unmap`] takes with `guard + len`. `None` when
/// `mmap` fails. Async-signal-safe (one `mmap`, one `mprotect`): the
/// agent maps signal stacks with it from its thread hooks and handlers.
pub fn map_with_guard(len: usize, guard: usize) -> Option<*mut u8> {
    let p = map_with(guard + len, 0)?;
    // SAFETY: the lowest pages of a fresh mapping of our own, that nothing
    // uses yet.
    let _ = unsafe { super::mem::protect(p as usize, guard, libc::PROT_NONE) };
    Some(p)
}

/// Maps `len` bytes of zeroed, private, anonymous memory with protection
/// `prot` (`PROT_*` bits) wherever the kernel likes. Returns its address.
pub fn map_anywhere(len: usize, prot: libc::c_int) -> io::Result<usize> {
    // SAFETY: anonymous mapping at an address of the kernel's choosing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as usize)
}

/// Maps `len` bytes of zeroed, private, anonymous memory with protection
/// `prot` exactly at `addr` (page-aligned), if nothing is mapped in
/// `[addr, addr + len)`: `EEXIST` if something is (another thread may map
/// a gap between a look at the maps and this call). An existing mapping
/// is never replaced.
pub fn map_exactly(addr: usize, len: usize, prot: libc::c_int) -> io::Result<usize> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
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
    if p as usize != addr {
        // SAFETY: a kernel older than 4.17 ignores NOREPLACE and gave us a
        // fresh mapping elsewhere, which nothing uses yet.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "the kernel placed the mapping elsewhere"));
    }
    Ok(addr)
}

/// Replaces the mapping at `p` with fresh zero pages.
///
/// # Safety
///
/// `p..p+len` must be a mapping made by [`map`] that nothing else uses.
pub unsafe fn remap_zero(p: *mut u8, len: usize) -> bool {
    // SAFETY: MAP_FIXED over our own mapping (the caller's guarantee).
    let r = unsafe {
        libc::mmap(
            p as *mut libc::c_void,
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    r != libc::MAP_FAILED
}

/// Unmaps memory made by a function of this module.
///
/// # Safety
///
/// `p..p+len` must be a mapping made here that nothing uses any more (no
/// reference into it, no thread running or about to run code in it).
pub unsafe fn unmap(p: *mut u8, len: usize) {
    // SAFETY: the caller's guarantee.
    unsafe { libc::munmap(p as *mut libc::c_void, len.max(1)) };
}

/// The page size these mappings use.
pub const PAGE: usize = 4096;

/// The indexes of the pages of `p..p+len` that are resident (`mincore`):
/// the pages of an anonymous mapping that were ever written. Reading the
/// others would fault zero pages in for nothing. On failure, every page.
///
/// # Safety
///
/// `p..p+len` must be a mapping made by [`map`].
pub unsafe fn resident_pages(p: *mut u8, len: usize) -> Vec<usize> {
    let pages = len.div_ceil(PAGE);
    if p.is_null() || pages == 0 {
        return Vec::new();
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: a page-aligned mapping of `len` bytes (the caller's
    // guarantee) and a vector of one byte per page.
    let r = unsafe { libc::mincore(p.cast(), len, vec.as_mut_ptr()) };
    if r != 0 {
        return (0..pages).collect();
    }
    vec.iter().enumerate().filter(|(_, &v)| v & 1 != 0).map(|(i, _)| i).collect()
}

/// As [`resident_pages`], without allocating: one byte per page of
/// `p..p+len` into `out` (bit 0 set: resident). False if `mincore` failed
/// or `out` is too short. Async-signal-safe.
///
/// # Safety
///
/// `p..p+len` must be a mapping made by [`map`] (page-aligned).
pub unsafe fn resident_into(p: *mut u8, len: usize, out: &mut [u8]) -> bool {
    if p.is_null() || len == 0 || out.len() < len.div_ceil(PAGE) {
        return false;
    }
    // SAFETY: a page-aligned mapping of `len` bytes (the caller's
    // guarantee) and at least one byte per page in `out`.
    unsafe { libc::mincore(p.cast(), len, out.as_mut_ptr()) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_exactly_where_asked_and_never_over_a_mapping() {
        let len = 2 * PAGE;
        let free = map_anywhere(len, libc::PROT_READ).unwrap();
        // SAFETY: ours, unused: the range is free again (unless another
        // thread maps it meanwhile, which the EEXIST arm accepts).
        unsafe { unmap(free as *mut u8, len) };
        match map_exactly(free, len, libc::PROT_READ | libc::PROT_WRITE) {
            Ok(at) => {
                assert_eq!(at, free);
                assert_eq!(map_exactly(at, PAGE, libc::PROT_READ).unwrap_err().raw_os_error(), Some(libc::EEXIST));
                // SAFETY: the mapping is readable and writable, and ours.
                unsafe { (at as *mut u8).write(7) };
                // SAFETY: ours; nothing uses it any more.
                unsafe { unmap(at as *mut u8, len) };
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}"),
        }
    }
}
