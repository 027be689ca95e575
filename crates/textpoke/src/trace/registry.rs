//! The threads that have entered the tracer, and where their quiescence
//! counts are, for grace periods to read without disturbing them.
//!
//! # Algorithm
//!
//! 1. **Claim** (the thread itself, the first time one of its stubs finds
//!    its count still [`UNREGISTERED`]; async-signal-safe, lock-free): take
//!    the first free slot (compare-and-swap `FREE -> CLAIMING`), fill in
//!    the thread id and the address of its count, publish it (`LIVE`,
//!    SeqCst). Slots live in chunks that are never freed: the first is
//!    static, the others are mapped (mmap is async-signal-safe) and linked
//!    on demand.
//! 2. **Scan** (the grace period, one at a time): announce the scan in
//!    [`SCAN`] (SeqCst: this process's id, a sequence number, odd while
//!    scanning), then read the count of each `LIVE` slot, then announce
//!    the end. Counts are read in place (they are in the threads' TLS),
//!    or through `process_vm_readv` for slots whose thread cannot promise
//!    step 3 (see below).
//! 3. **Release** (the thread's exit destructor): mark the slot
//!    `RELEASING` (SeqCst), then wait while a scan announced before that
//!    mark is running, then free the slot. This is Dekker's handshake: a
//!    scan that saw the slot `LIVE` announced itself before the mark, so
//!    the releasing thread sees the announcement and waits for the scan
//!    to end; a scan announced later sees the mark and does not read. So
//!    no scan reads a count whose thread's TLS is gone.
//! 4. **Reap** (the grace period): a `LIVE` slot whose thread no longer
//!    exists (no destructor ran: a raw exit system call, a forked child's
//!    copy of another thread's slot) is freed.
//!
//! The destructor is a pthread key's, set when the thread registers.
//! glibc keeps the values of keys below 32 in the thread descriptor, so
//! setting one never allocates, which registration (possibly inside a
//! signal handler) needs. If the tracer's key is 32 or more, slots are
//! read through `process_vm_readv`, which fails cleanly on memory that is
//! gone instead of faulting, and reaped once their thread is gone.

use crate::arch::tramp::UNREGISTERED;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

const CHUNK: usize = 256;

const FREE: u32 = 0;
const CLAIMING: u32 = 1;
const LIVE: u32 = 2;
const RELEASING: u32 = 3;

/// One registered thread. All-zero is a free slot (mapped chunks start so).
struct Slot {
    state: AtomicU32,
    tid: AtomicI32,
    count: AtomicPtr<AtomicU32>,
    /// The thread's exit destructor releases the slot (step 3): its count
    /// may be read in place.
    released_at_exit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU32::new(FREE),
    tid: AtomicI32::new(0),
    count: AtomicPtr::new(std::ptr::null_mut()),
    released_at_exit: AtomicBool::new(false),
};

struct Chunk {
    slots: [Slot; CHUNK],
    next: AtomicPtr<Chunk>,
}

static FIRST: Chunk = Chunk { slots: [EMPTY; CHUNK], next: AtomicPtr::new(std::ptr::null_mut()) };

/// This process's id << 32 | a sequence number, odd while a scan reads
/// counts (step 2).
static SCAN: AtomicU64 = AtomicU64::new(0);

fn pid() -> u32 {
    crate::sys::threads::getpid() as u32
}

/// The chunk after `c`, mapped and linked if there is none yet. `None` if
/// no memory could be mapped. Async-signal-safe.
fn next_chunk(c: &Chunk) -> Option<&'static Chunk> {
    let mut next = c.next.load(Ordering::Acquire); // pairs with the Release below
    if next.is_null() {
        let fresh = crate::sys::anon::map(std::mem::size_of::<Chunk>())?.cast::<Chunk>();
        // Zeroed memory is a chunk of free slots with no successor.
        // Release (success) pairs with the Acquire loads of `next` (above,
        // `slots`, `slot`): the chunk is mapped before it is linked; Acquire
        // (failure) with the winner's Release.
        match c.next.compare_exchange(std::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => next = fresh,
            Err(won) => {
                // SAFETY: our own mapping, never published.
                unsafe { crate::sys::anon::unmap(fresh.cast(), std::mem::size_of::<Chunk>()) };
                next = won;
            }
        }
    }
    // SAFETY: chunks are never freed once linked.
    Some(unsafe { &*next })
}

/// Every slot ever made, with its index.
fn slots() -> impl Iterator<Item = (u32, &'static Slot)> {
    let mut chunk: Option<&'static Chunk> = Some(&FIRST);
    let mut base = 0u32;
    std::iter::from_fn(move || {
        let c = chunk?;
        // Pairs with the linking CAS in `next_chunk`.
        let n = c.next.load(Ordering::Acquire);
        // SAFETY: chunks are never freed once linked.
        chunk = (!n.is_null()).then(|| unsafe { &*n });
        let b = base;
        base += CHUNK as u32;
        Some(c.slots.iter().enumerate().map(move |(i, s)| (b + i as u32, s)))
    })
    .flatten()
}

fn slot(i: u32) -> Option<&'static Slot> {
    let mut chunk: &'static Chunk = &FIRST;
    for _ in 0..i as usize / CHUNK {
        // SAFETY: chunks are never freed once linked.
        chunk = unsafe { chunk.next.load(Ordering::Acquire).as_ref() }?; // pairs with next_chunk's CAS
    }
    Some(&chunk.slots[i as usize % CHUNK])
}

/// Step 1: registers thread `tid` whose count is at `count`. Returns its
/// slot, or `None` when no slot could be made. Async-signal-safe.
pub(crate) fn claim(tid: i32, count: *const AtomicU32, released_at_exit: bool) -> Option<u32> {
    let mut chunk: &'static Chunk = &FIRST;
    let mut base = 0u32;
    loop {
        for (i, s) in chunk.slots.iter().enumerate() {
            if s.state.load(Ordering::Relaxed) == FREE
                // Acquire pairs with the Release store of FREE in `release` or
                // `Scan::reap`: the slot's last owner is done with it.
                && s.state.compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                s.tid.store(tid, Ordering::Relaxed);
                s.count.store(count.cast_mut(), Ordering::Relaxed);
                s.released_at_exit.store(released_at_exit, Ordering::Relaxed);
                // Publishes the fields; pairs with the SeqCst load of a scan.
                s.state.store(LIVE, Ordering::SeqCst);
                return Some(base + i as u32);
            }
        }
        chunk = next_chunk(chunk)?;
        base += CHUNK as u32;
    }
}

/// Step 3: frees slot `i` of a thread that is exiting and will not run
/// tracer code again; waits for a scan that may be reading its count.
pub(crate) fn release(i: u32) {
    let Some(s) = slot(i) else { return };
    // Dekker, before reading SCAN: the store and the load pair with
    // `Scan::start`'s SeqCst store and its SeqCst loads of the state.
    s.state.store(RELEASING, Ordering::SeqCst);
    let seen = SCAN.load(Ordering::SeqCst); // pairs with Scan::start, as above
    if seen & 1 == 1 && (seen >> 32) as u32 == pid() {
        // Pairs with the SeqCst store in `Scan::drop`: the scan is over.
        while SCAN.load(Ordering::SeqCst) == seen {
            std::thread::yield_now(); // a scan is between its reads; they are short
        }
    }
    s.tid.store(0, Ordering::Relaxed);
    s.count.store(std::ptr::null_mut(), Ordering::Relaxed);
    s.state.store(FREE, Ordering::Release); // pairs with claim's Acquire CAS
}

/// In a forked child: slot `i` belongs to the calling thread, which has a
/// new thread id.
pub(crate) fn set_tid(i: u32, tid: i32) {
    if let Some(s) = slot(i) {
        s.tid.store(tid, Ordering::Relaxed);
    }
}

/// What a slot's count says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    /// The thread's nesting count (0: outside tracer code).
    Nesting(u32),
    /// The slot no longer belongs to that thread (released, or reused).
    Gone,
    /// The count could not be read (`process_vm_readv` refused).
    Unknown,
}

/// A scan in progress (step 2): counts may be read while it lives. Keep
/// it short: exiting threads wait for it.
pub(crate) struct Scan {
    v: u64,
}

/// The process whose thread is scanning (0: none). One scan at a time,
/// since [`SCAN`] announces one; a forked child does not inherit its
/// parent's scan (another process id).
static SCANNER: AtomicU32 = AtomicU32::new(0);

impl Scan {
    /// Announces a scan (waits for another thread's to end).
    pub(crate) fn start() -> Scan {
        let me = pid();
        loop {
            let cur = SCANNER.load(Ordering::Relaxed);
            // Acquire pairs with the Release in drop: the last scan is over.
            if cur != me && SCANNER.compare_exchange(cur, me, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                break;
            }
            std::thread::yield_now();
        }
        let seq = SCAN.load(Ordering::Relaxed) as u32;
        let v = (me as u64) << 32 | (seq.wrapping_add(1) | 1) as u64;
        SCAN.store(v, Ordering::SeqCst); // Dekker, before reading any state: pairs with release
        Scan { v }
    }

    /// Every live slot: its index and thread id.
    pub(crate) fn live(&self) -> Vec<(u32, i32)> {
        slots()
            // SeqCst pairs with `claim`'s LIVE store (the fields are published)
            // and, Dekker, with `release`'s RELEASING store.
            .filter(|(_, s)| s.state.load(Ordering::SeqCst) == LIVE)
            .map(|(i, s)| (i, s.tid.load(Ordering::Relaxed)))
            .collect()
    }

    /// The count of thread `tid` in slot `i`.
    pub(crate) fn count(&self, i: u32, tid: i32) -> Count {
        let Some(s) = slot(i) else { return Count::Gone };
        // SeqCst: the Dekker read of step 2 (after the announcement); pairs
        // with `claim`'s LIVE store and `release`'s RELEASING store.
        if s.state.load(Ordering::SeqCst) != LIVE || s.tid.load(Ordering::Relaxed) != tid {
            return Count::Gone;
        }
        let p = s.count.load(Ordering::Relaxed);
        let raw = if s.released_at_exit.load(Ordering::Relaxed) {
            // SAFETY: the slot is LIVE after our announcement, so its thread
            // waits for this scan before its TLS can go (step 3).
            // Acquire pairs with the Release store of a decrement in Rust
            // code (x86 plain stores in the stubs are releases too): what
            // the thread did inside tracer code happened before.
            unsafe { (*p).load(Ordering::Acquire) }
        } else {
            let mut b = [0u8; 4];
            if crate::sys::read_memory(p as usize, &mut b) != 4 {
                return Count::Unknown;
            }
            // Pairs with the Release store of a decrement, as the Acquire load
            // above (the copy was a plain read).
            std::sync::atomic::fence(Ordering::Acquire);
            u32::from_ne_bytes(b)
        };
        Count::Nesting(raw & !UNREGISTERED)
    }

    /// Step 4: frees slot `i` if it still holds `tid`, whose thread is gone.
    pub(crate) fn reap(&self, i: u32, tid: i32) {
        if let Some(s) = slot(i) {
            if s.tid.load(Ordering::Relaxed) == tid
                // SeqCst like `release`'s mark; it pairs with `claim`'s LIVE store
                // (the thread is gone: no handshake is needed).
                && s.state.compare_exchange(LIVE, RELEASING, Ordering::SeqCst, Ordering::Relaxed).is_ok()
            {
                s.tid.store(0, Ordering::Relaxed);
                s.count.store(std::ptr::null_mut(), Ordering::Relaxed);
                s.state.store(FREE, Ordering::Release); // pairs with claim's Acquire CAS
            }
        }
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        // Even: over. Pairs with `release`'s SeqCst loads of SCAN.
        SCAN.store(self.v.wrapping_add(1), Ordering::SeqCst);
        // Pairs with the Acquire CAS in `Scan::start`.
        SCANNER.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_read_release_reuse() {
        let counts: Vec<&'static AtomicU32> = (0..300).map(|_| &*Box::leak(Box::new(AtomicU32::new(0)))).collect();
        let ids: Vec<u32> =
            counts.iter().enumerate().map(|(k, c)| claim(1_000_000 + k as i32, *c, true).unwrap()).collect();
        assert!(ids.iter().any(|&i| i >= CHUNK as u32), "a second chunk was linked");
        counts[299].store(3 | UNREGISTERED, Ordering::Relaxed);
        {
            let scan = Scan::start();
            assert_eq!(scan.count(ids[299], 1_000_299), Count::Nesting(3));
            assert_eq!(scan.count(ids[299], 7), Count::Gone, "another thread's id");
            assert!(scan.live().contains(&(ids[5], 1_000_005)));
        }
        release(ids[5]);
        let scan = Scan::start();
        assert_eq!(scan.count(ids[5], 1_000_005), Count::Gone);
        drop(scan);
        let again = claim(42, counts[5], false).unwrap();
        assert_eq!(again, ids[5], "a released slot is reused");
        let scan = Scan::start();
        assert_eq!(scan.count(again, 42), Count::Nesting(0), "read through process_vm_readv");
        scan.reap(again, 42);
        assert_eq!(scan.count(again, 42), Count::Gone);
        drop(scan);
        for &i in &ids {
            release(i);
        }
    }
}
