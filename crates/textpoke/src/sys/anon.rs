//! Anonymous private memory for buffers that async-signal-safe code
//! creates (mmap is async-signal-safe, malloc is not): the recorder's
//! per-thread buffers and rings, the tracer's shadow stacks.

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

/// Unmaps memory made by [`map`].
///
/// # Safety
///
/// `p..p+len` must be a mapping made by [`map`] that nothing uses any more.
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
