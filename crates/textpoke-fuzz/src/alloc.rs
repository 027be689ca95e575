//! Measuring the memory a reader command uses: a counting global
//! allocator.
//!
//! [`Counting`] wraps the system allocator and keeps, per thread, the
//! bytes currently allocated and their peak. A program that installs it
//! (`#[global_allocator] static A: Counting = Counting;`, as the fuzzer
//! binary and the corpus test do) measures one command with
//! [`Measure::start`] … [`Measure::peak`]: the most heap the thread held
//! above what it held at the start. Per thread rather than global, so
//! that tests running in parallel do not add to each other's figures;
//! the readers and analyses run on the calling thread.
//!
//! A [`Measure`] can also set a hard cap: an allocation that would take
//! the thread past it fails (the process aborts with "memory allocation
//! failed"), so that a memory bomb found by the fuzzer stops the fuzzer
//! instead of the machine, which other people share.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The counting allocator (see the module docs).
pub struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LIMIT: Cell<isize> = const { Cell::new(isize::MAX) };
}

/// Adds `n` bytes to this thread's count; `false` (nothing counted) if
/// that would pass the cap. During thread teardown, when the counters are
/// gone, everything is allowed.
fn add(n: isize) -> bool {
    CURRENT
        .try_with(|c| {
            let v = c.get().saturating_add(n);
            if n > 0 && v > LIMIT.with(Cell::get) {
                return false;
            }
            c.set(v);
            PEAK.with(|p| p.set(p.get().max(v)));
            true
        })
        .unwrap_or(true)
}

fn sub(n: isize) {
    let _ = CURRENT.try_with(|c| c.set(c.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only
// counters are kept besides (thread-locals with const initialisers and no
// destructors, which never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !add(layout.size() as isize) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, forwarded.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            sub(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !add(layout.size() as isize) {
            return std::ptr::null_mut();
        }
        // SAFETY: as in alloc.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            sub(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size() as isize);
        // SAFETY: the caller's pointer and layout, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grow = new_size as isize - layout.size() as isize;
        if grow > 0 && !add(grow) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's arguments, forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        match (p.is_null(), grow > 0) {
            (true, true) => sub(grow),
            (false, false) => sub(-grow),
            _ => {}
        }
        p
    }
}

/// Bytes this thread holds now (0 when [`Counting`] is not the global
/// allocator).
pub fn current() -> isize {
    CURRENT.with(Cell::get)
}

/// Whether [`Counting`] is the global allocator of this program.
pub fn installed() -> bool {
    let before = current();
    let v = std::hint::black_box(vec![0u8; 4096]);
    let during = current();
    drop(v);
    during - before >= 4096
}

/// One measurement on this thread.
#[derive(Debug)]
pub struct Measure {
    start: isize,
    old_limit: isize,
}

impl Measure {
    /// Starts measuring; with `cap`, allocations beyond `cap` bytes more
    /// than now fail until the measure is dropped.
    pub fn start(cap: Option<u64>) -> Measure {
        let start = current();
        PEAK.with(|p| p.set(start));
        let old_limit = LIMIT.with(Cell::get);
        if let Some(cap) = cap {
            LIMIT.with(|l| l.set(start.saturating_add(cap.min(isize::MAX as u64) as isize)));
        }
        Measure { start, old_limit }
    }

    /// The most bytes held above the start so far.
    pub fn peak(&self) -> u64 {
        (PEAK.with(Cell::get) - self.start).max(0) as u64
    }
}

impl Drop for Measure {
    fn drop(&mut self) {
        let old = self.old_limit;
        LIMIT.with(|l| l.set(old));
    }
}
