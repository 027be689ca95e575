//! Anonymous private memory for buffers that async-signal-safe code
//! creates (mmap is async-signal-safe, malloc is not): the recorder's
//! per-thread buffers and rings, the tracer's shadow stacks.

/// Maps `len` bytes of zeroed, private, anonymous memory (pages are
/// touched lazily; no swap reservation). `None` on failure.
pub(crate) fn map(len: usize) -> Option<*mut u8> {
    map_with(len, 0)
}

/// As [`map`], with every page faulted in now (`MAP_POPULATE`): code that
/// writes the memory later never takes a page fault.
pub(crate) fn map_populated(len: usize) -> Option<*mut u8> {
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
pub(crate) unsafe fn remap_zero(p: *mut u8, len: usize) -> bool {
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
pub(crate) unsafe fn unmap(p: *mut u8, len: usize) {
    // SAFETY: the caller's guarantee.
    unsafe { libc::munmap(p as *mut libc::c_void, len.max(1)) };
}
