//! Executable memory near a given address, for trampolines.
//!
//! A `call rel32` reaches ±2 GiB, so trampolines for a site must live
//! within that distance. [`CodeBlock::near`] reads `/proc/self/maps`, picks
//! the free gap closest to the target that keeps the whole block in reach,
//! and maps it there with `MAP_FIXED_NOREPLACE` ([`sys::anon::map_exactly`](crate::sys::anon::map_exactly)),
//! readable and executable and never writable: code is written through
//! `/proc/self/mem` ([`ProcMem`]), so no page is ever writable and
//! executable (and it works under MDWE).
//!
//! Freeing a block that threads may still execute is the caller's problem:
//! the tracer frees trampolines only after a grace period.
//!
//! # Never guarded (arm64 BTI)
//!
//! Blocks are mapped without `PROT_BTI` and never `mprotect`ed, so on a
//! CPU with BTI their pages are not guarded: an indirect branch (`br`,
//! `blr`) may land on any instruction in them, and the aarch64 stubs and
//! trampolines (`arch/tramp_aarch64.rs`: a stub's `br x17` to its
//! trampoline, the graph thunk's `blr` to a stub's `b resume`) start with
//! no `bti`. What they branch to in guarded code keeps the rules: they go
//! back into a function with a direct `b` (any instruction may be its
//! target), return with `ret` (checked by no landing pad), and call
//! handlers and callbacks, function entries, with `blr` (a BTI-built
//! entry starts with `bti c`). Mapping a block with `PROT_BTI` would
//! require a landing pad at each of those targets first.
//!
//! # Many small writes
//!
//! Each `pwrite` to `/proc/self/mem` costs about a microsecond in the
//! kernel (it pins the page and maps it for the copy), and opening the file
//! about as much again: the tracer's 100,000 stubs of 10 to 28 bytes cost
//! 0.17 s written one by one. A [`WriteSession`] defers the writes its
//! thread makes to blocks and does them when it finishes, coalesced:
//!
//! 1. each write is copied into the session (the call returns `Ok`);
//! 2. at the end, per block and under the block's write lock (which every
//!    write to it takes), the written ranges are merged, and two of them
//!    are joined across the gap between them when the whole gap lies at or
//!    above the block's **high-water mark**, the end of every byte written
//!    to it so far, and is at most a page long: bytes never written, which
//!    nobody can be executing (code is reached only after it was written),
//!    rewritten with what they hold. Below the mark ranges are written as
//!    they are: a byte a thread may execute is never rewritten, not even
//!    with itself;
//! 3. one descriptor, one `pwrite` per joined range; later writes to the
//!    same bytes win, as if written at once; the mark is raised.
//!
//! The code written is not there until the session finishes: a session
//! suits code nothing can reach before then (the tracer's stubs and
//! trampolines, reached once their batch is committed). A block written in
//! a session that fails to finish is poisoned: its later writes fail,
//! so code it was believed to hold is never made reachable. A block stays
//! mapped while a session holds writes for it.

use crate::sys::anon;
use crate::sys::maps::Maps;
use crate::sys::mem::ProcMem;
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Farthest distance from a target that keeps `rel32` reach (with margin).
const REACH: usize = (1 << 31) - (1 << 20);

/// An anonymous executable mapping.
#[derive(Debug)]
pub struct CodeBlock {
    map: Arc<Mapping>,
}

/// The mapping itself, unmapped when the block and every session holding
/// writes for it are done with it.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
    /// End offset of every byte ever written (see the module docs);
    /// read and changed under `writing` only, so Relaxed.
    hwm: AtomicUsize,
    /// Taken by every write, and by a session writing its bytes.
    writing: std::sync::Mutex<()>,
    /// A session's writes to it failed: it refuses writes. Stored with
    /// Release, loaded with Acquire; the flag is the only datum it carries:
    /// nothing else is read on its strength.
    poisoned: AtomicBool,
}

impl Mapping {
    /// A block of the mapping at `addr`, `len` bytes.
    fn block(addr: usize, len: usize) -> CodeBlock {
        let writing = std::sync::Mutex::new(());
        CodeBlock {
            map: Arc::new(Mapping { addr, len, hwm: AtomicUsize::new(0), writing, poisoned: AtomicBool::new(false) }),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping; the block's owner guarantees no thread can
        // run it, and no session holds writes for it any more.
        unsafe { anon::unmap(self.addr as *mut u8, self.len) };
    }
}

impl CodeBlock {
    /// Maps `len` bytes (rounded up to pages) wherever the kernel likes.
    pub fn anywhere(len: usize) -> io::Result<CodeBlock> {
        let len = len.max(1).next_multiple_of(super::page_size());
        let addr = anon::map_anywhere(len, libc::PROT_READ | libc::PROT_EXEC)?;
        Ok(Mapping::block(addr, len))
    }

    /// Maps `len` bytes (rounded up to pages) within rel32 reach of every
    /// address in `[lo, hi]`. Another thread may map the chosen gap between
    /// our look at the maps and our `mmap` (`EEXIST`): then look again.
    pub fn near(lo: usize, hi: usize, len: usize) -> io::Result<CodeBlock> {
        Self::near_preferring(lo, hi, lo, len)
    }

    /// As [`CodeBlock::near`], as close to `prefer` as a free gap allows
    /// (`near` prefers `lo`): the tracer keeps the stubs of a gcc pad
    /// near its function, away from its mirror 1.74 GiB below, where other
    /// objects' mirrors are.
    pub fn near_preferring(lo: usize, hi: usize, prefer: usize, len: usize) -> io::Result<CodeBlock> {
        let (addr, len) = map_near(lo, hi, prefer, len, libc::PROT_READ | libc::PROT_EXEC)?;
        Ok(Mapping::block(addr, len))
    }

    /// Maps `len` bytes (rounded up to pages) exactly at `addr` (a page
    /// boundary), if nothing is mapped there (`MAP_FIXED_NOREPLACE`: an
    /// existing mapping is never replaced; `EEXIST` then). For code whose
    /// address is dictated, such as the tracer's mirrors of gcc's pads.
    pub fn exactly(addr: usize, len: usize) -> io::Result<CodeBlock> {
        let len = len.max(1).next_multiple_of(super::page_size());
        let addr = anon::map_exactly(addr, len, libc::PROT_READ | libc::PROT_EXEC)?;
        Ok(Mapping::block(addr, len))
    }

    pub fn addr(&self) -> usize {
        self.map.addr
    }
    pub fn len(&self) -> usize {
        self.map.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.addr() && addr < self.addr() + self.len()
    }

    /// Whether a session's writes to this block failed: the code put in it
    /// since may not be there, and it takes no more.
    pub fn is_poisoned(&self) -> bool {
        self.map.poisoned.load(Ordering::Acquire) // pairs with Pending::flush's Release
    }

    /// Writes code at `off` (no thread may be running those bytes); with a
    /// [`WriteSession`] open on this thread, when the session finishes.
    pub fn write(&self, off: usize, code: &[u8]) -> io::Result<()> {
        assert!(off + code.len() <= self.len(), "write past the block");
        // Acquire: pairs with Pending::flush's Release.
        if self.map.poisoned.load(Ordering::Acquire) {
            return Err(io::Error::other("an earlier write of code to this block failed; it takes no more"));
        }
        let deferred = SESSION.with(|s| match s.borrow_mut().as_mut() {
            Some(p) => {
                p.add(&self.map, off, code);
                true
            }
            None => false,
        });
        if deferred {
            return Ok(());
        }
        let _writing = self.map.writing.lock().unwrap_or_else(|e| e.into_inner());
        ProcMem::open()?.write_all(self.addr() + off, code)?;
        self.map.hwm.fetch_max(off + code.len(), Ordering::Relaxed); // under `writing`
        Ok(())
    }
}

/// Defers this thread's [`CodeBlock::write`]s and does them coalesced when
/// it finishes (see the module docs). One session per thread at a time: a
/// session opened inside another adds to the outer one.
#[derive(Debug)]
pub struct WriteSession {
    /// Whether this is the thread's outermost session (the one that writes).
    outer: bool,
    /// Finished (or handed over) on the thread that opened it.
    _thread_bound: std::marker::PhantomData<*const ()>,
}

thread_local! {
    static SESSION: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// The writes of a session, per block.
#[derive(Default)]
struct Pending {
    blocks: Vec<PendingBlock>,
    /// The bytes of every write, in order.
    bytes: Vec<u8>,
}

struct PendingBlock {
    map: Arc<Mapping>,
    /// (offset in the block, offset in `Pending::bytes`, length), in order.
    writes: Vec<(usize, usize, usize)>,
}

impl Pending {
    fn add(&mut self, map: &Arc<Mapping>, off: usize, code: &[u8]) {
        let i = match self.blocks.iter().rposition(|b| Arc::ptr_eq(&b.map, map)) {
            Some(i) => i,
            None => {
                self.blocks.push(PendingBlock { map: map.clone(), writes: Vec::new() });
                self.blocks.len() - 1
            }
        };
        self.blocks[i].writes.push((off, self.bytes.len(), code.len()));
        self.bytes.extend_from_slice(code);
    }

    /// Writes everything; poisons each block not written whole.
    fn flush(self) -> io::Result<()> {
        if self.blocks.is_empty() {
            return Ok(());
        }
        let file = ProcMem::open();
        let mut result = Ok(());
        for b in &self.blocks {
            let written = match &file {
                Ok(f) => b.flush(f, &self.bytes),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            if let Err(e) = written {
                b.map.poisoned.store(true, Ordering::Release); // pairs with `write`'s Acquire
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

impl PendingBlock {
    /// The ranges to write, each with its bytes: see the module docs, step 2.
    fn flush(&self, f: &ProcMem, bytes: &[u8]) -> io::Result<()> {
        let _writing = self.map.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mark = self.map.hwm.load(Ordering::Relaxed); // under `writing`

        // An empty write changes nothing and lies in no range: skipped.
        let mut ranges: Vec<(usize, usize)> =
            self.writes.iter().filter(|w| w.2 > 0).map(|&(off, _, len)| (off, off + len)).collect();
        ranges.sort_unstable();
        let mut joined: Vec<(usize, usize)> = Vec::new();
        for (start, end) in ranges {
            match joined.last_mut() {
                // Overlapping or touching, or a short gap of never-written bytes.
                Some(last) if start <= last.1 || (last.1 >= mark && start - last.1 <= MAX_JOINED_GAP) => {
                    last.1 = last.1.max(end)
                }
                _ => joined.push((start, end)),
            }
        }
        // Each range's image: what it holds now (the gaps keep it), then
        // the writes in it, in order (each but an empty one lies in exactly
        // one range: the first whose end is past its start).
        let mut images: Vec<Vec<u8>> = joined
            .iter()
            .map(|&(start, end)| {
                let mut image = vec![0u8; end - start];
                // SAFETY: [start, end) is inside the block (checked by
                // `write`), mapped readable (PROT_READ | PROT_EXEC) while
                // `self.map` is held.
                unsafe {
                    std::ptr::copy_nonoverlapping((self.map.addr + start) as *const u8, image.as_mut_ptr(), end - start)
                };
                image
            })
            .collect();
        for &(off, at, len) in self.writes.iter().filter(|w| w.2 > 0) {
            let r = joined.partition_point(|&(_, end)| end <= off);
            let start = joined[r].0;
            images[r][off - start..off - start + len].copy_from_slice(&bytes[at..at + len]);
        }
        for ((start, end), image) in joined.into_iter().zip(images) {
            f.write_all(self.map.addr + start, &image)?;
            self.map.hwm.fetch_max(end, Ordering::Relaxed); // under `writing`
        }
        Ok(())
    }
}

/// The longest gap of never-written bytes a session rewrites to join two
/// writes into one `pwrite`: a page at most is made resident for it (the
/// tracer's mirror slots lie as far apart as the functions they serve).
const MAX_JOINED_GAP: usize = 4096;

impl WriteSession {
    /// Opens a session on this thread.
    pub fn open() -> WriteSession {
        let outer = SESSION.with(|s| {
            let mut s = s.borrow_mut();
            if s.is_some() {
                return false;
            }
            *s = Some(Pending::default());
            true
        });
        WriteSession { outer, _thread_bound: std::marker::PhantomData }
    }

    /// Does the deferred writes (an inner session leaves them to the outer
    /// one). On an error, the blocks not written whole are poisoned.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.outer) {
            return Ok(());
        }
        match SESSION.with(|s| s.borrow_mut().take()) {
            Some(p) => p.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for WriteSession {
    /// Finishes an unfinished session (its error is lost; the blocks are
    /// poisoned as with [`WriteSession::finish`]).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Maps `len` bytes (rounded up to pages) with `prot` within rel32 reach of
/// every address in `[lo, hi]`, as close to `prefer` as a free gap allows.
/// Another thread may map the chosen gap between our look at the maps and
/// our `mmap` (`EEXIST`): then look again.
fn map_near(lo: usize, hi: usize, prefer: usize, len: usize, prot: libc::c_int) -> io::Result<(usize, usize)> {
    let mut tries = 0;
    loop {
        match try_map_near(lo, hi, prefer, len, prot) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 16 => tries += 1,
            r => return r,
        }
    }
}

fn try_map_near(lo: usize, hi: usize, prefer: usize, len: usize, prot: libc::c_int) -> io::Result<(usize, usize)> {
    let ps = super::page_size();
    let len = len.max(1).next_multiple_of(ps);
    let maps = Maps::read()?;
    // The block must satisfy: start >= hi - REACH and start + len <= lo + REACH.
    let min = hi.saturating_sub(REACH).max(0x10000).next_multiple_of(ps);
    let max_end = lo.saturating_add(REACH) & !(ps - 1);
    let mut best: Option<usize> = None;
    let mut consider = |start: usize| {
        if start >= min && start + len <= max_end {
            let d = start.abs_diff(prefer);
            if best.is_none_or(|b| b.abs_diff(prefer) > d) {
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
            // the point nearest `prefer`.
            let gap_lo = prev_end;
            let gap_hi = m.start - len;
            consider(gap_lo);
            consider(gap_hi);
            consider((prefer & !(ps - 1)).clamp(gap_lo, gap_hi));
            consider(min.clamp(gap_lo, gap_hi));
            consider((max_end - len).clamp(gap_lo, gap_hi));
        }
        prev_end = prev_end.max(m.end);
    }
    let start = best.ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "no free gap within ±2 GiB"))?;
    Ok((anon::map_exactly(start, len, prot)?, len))
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
        let (addr, len) = map_near(lo, hi, lo, len, libc::PROT_READ | libc::PROT_WRITE)?;
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
        unsafe { anon::unmap(self.addr as *mut u8, self.len) };
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
        #[cfg(target_arch = "x86_64")]
        b.write(0, &[0xc3]).unwrap();
        #[cfg(target_arch = "aarch64")]
        b.write(0, &crate::arch::RET.to_le_bytes()).unwrap();
        crate::arch::sync_icache(b.addr(), 4);
        // SAFETY: the block holds `ret`.
        unsafe { std::mem::transmute::<usize, extern "C" fn()>(b.addr())() };
    }

    fn peek(b: &CodeBlock, off: usize, len: usize) -> Vec<u8> {
        // SAFETY: the block is mapped readable.
        (off..off + len).map(|i| unsafe { ((b.addr() + i) as *const u8).read_volatile() }).collect()
    }

    #[test]
    fn sessions_defer_coalesce_and_nest() {
        let b = CodeBlock::anywhere(8192).unwrap();
        b.write(100, &[0xaa; 4]).unwrap(); // the mark is 104 now
        let s = WriteSession::open();
        b.write(0, &[1, 2]).unwrap(); // below the mark
        b.write(50, &[3]).unwrap(); // below the mark: the gap 2..50 is not rewritten
        b.write(200, &[4, 4, 4]).unwrap();
        b.write(300, &[5]).unwrap(); // joined with the one at 200 across never-written bytes
        b.write(201, &[6]).unwrap(); // later writes win
        {
            let inner = WriteSession::open();
            b.write(5000, &[7]).unwrap();
            inner.finish().unwrap(); // the outer session writes it
        }
        assert_eq!(peek(&b, 0, 2), [0, 0], "deferred");
        assert_eq!(peek(&b, 5000, 1), [0], "deferred to the outer session");
        s.finish().unwrap();
        assert_eq!(peek(&b, 0, 3), [1, 2, 0]);
        assert_eq!(peek(&b, 50, 1), [3]);
        assert_eq!(peek(&b, 100, 4), [0xaa; 4]);
        assert_eq!(peek(&b, 200, 3), [4, 6, 4]);
        assert_eq!(peek(&b, 300, 1), [5]);
        assert_eq!(peek(&b, 5000, 1), [7]);
        b.write(6000, &[8]).unwrap(); // no session: at once
        assert_eq!(peek(&b, 6000, 1), [8]);
    }

    #[test]
    fn joined_ranges_never_rewrite_written_bytes() {
        let b = CodeBlock::anywhere(4096).unwrap();
        let s = WriteSession::open();
        b.write(0, &[1]).unwrap();
        b.write(10, &[2]).unwrap();
        // Another writer (no session on its thread) writes in the gap
        // meanwhile: the mark moves past it, so the gap is not rewritten.
        std::thread::scope(|t| {
            t.spawn(|| b.write(5, &[9]).unwrap());
        });
        s.finish().unwrap();
        assert_eq!(peek(&b, 0, 11), [1, 0, 0, 0, 0, 9, 0, 0, 0, 0, 2]);
        // Below the mark now: written range by range.
        let s = WriteSession::open();
        b.write(1, &[3]).unwrap();
        b.write(9, &[4]).unwrap();
        s.finish().unwrap();
        assert_eq!(peek(&b, 0, 11), [1, 3, 0, 0, 0, 9, 0, 0, 0, 4, 2]);
    }

    /// Writes far apart are not joined: the pages between them are never
    /// written (a mirror region is as large as its object's code).
    #[test]
    fn far_writes_leave_the_pages_between_untouched() {
        let len = 64 * 4096;
        let b = CodeBlock::anywhere(len).unwrap();
        let s = WriteSession::open();
        b.write(10, &[1]).unwrap();
        b.write(40 * 4096 + 7, &[2, 3]).unwrap();
        b.write(40 * 4096 + 100, &[4]).unwrap(); // joined with the one before
        b.write(50 * 4096, &[]).unwrap(); // nothing (the routines' block writes an empty routine)
        s.finish().unwrap();
        assert_eq!(peek(&b, 40 * 4096 + 7, 2), [2, 3]);
        assert_eq!(peek(&b, 40 * 4096 + 100, 1), [4]);
        let mut resident = vec![0u8; 64];
        // SAFETY: a page-aligned mapping of `len` bytes, one byte per page.
        assert_eq!(unsafe { libc::mincore(b.addr() as *mut libc::c_void, len, resident.as_mut_ptr()) }, 0);
        let written: Vec<usize> = (0..64).filter(|&p| resident[p] & 1 != 0).collect();
        assert_eq!(written, [0, 40], "only the pages written are resident");
    }

    #[test]
    fn a_block_stays_mapped_while_a_session_holds_writes() {
        let s = WriteSession::open();
        let b = CodeBlock::anywhere(4096).unwrap();
        let addr = b.addr();
        b.write(0, &[0xc3]).unwrap();
        drop(b);
        let maps = Maps::read().unwrap();
        assert!(maps.find(addr).is_some(), "still mapped: the session holds it");
        s.finish().unwrap(); // and unmapped (another test may map the range again)
    }

    #[test]
    fn a_poisoned_block_refuses_writes() {
        let b = CodeBlock::anywhere(4096).unwrap();
        b.map.poisoned.store(true, Ordering::Release); // as Pending::flush does
        assert!(b.write(0, &[0xc3]).is_err());
    }
}
