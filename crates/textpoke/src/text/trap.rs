//! The SIGTRAP handler of the breakpoint protocol.
//!
//! # In-flight descriptor
//!
//! Like the kernel's `bp_desc`, one static descriptor holds the sites of the
//! batch in flight (sorted by address) and a reference count. The patcher
//! sets the sites, then `refs = 1` (Release), and only then writes trap
//! bytes. The handler takes a reference only if `refs != 0`
//! (`inc_not_zero`), binary-searches the faulting address, emulates, and
//! drops its reference. After the last sync the patcher drops its own
//! reference and waits for `refs == 0` before freeing the sites.
//!
//! # Late traps
//!
//! Unlike an in-kernel int3, a user-space SIGTRAP can be delivered later
//! than the trap: a thread may be preempted between the `int3` and its
//! handler, and run the handler after the batch is over. Every address that
//! ever held one of our trap bytes goes into a grow-only, lock-free set that
//! is never freed; a trap at such an address that no descriptor claims, and
//! where the trap byte is gone, is re-executed from the site (PC = site):
//! the thread then runs whatever instruction is there now.
//!
//! # Memory ordering
//!
//! - The ever-set: a table is published by a Release store of `EVER`
//!   (its zeroed slots and its link to the older tables), an address by a
//!   Release store into its slot; the handler loads both with Acquire.
//!   Every address is stored before its batch's descriptor is published
//!   and so before its trap byte is written.
//! - The descriptor: the sites and their count are stored Relaxed and
//!   published by the Release store `refs = 1`, which the handler's
//!   Acquire compare-exchange (`get_desc`) pairs with; a handler drops its
//!   reference with a Release decrement, which the patcher's Acquire loads
//!   in `unpublish` pair with before the sites are freed.
//! - The previous disposition: stored (Release) before our handler is
//!   installed, loaded (Acquire) by the handler.
//! - The counters of emulated and replayed traps are statistics (Relaxed).
//!
//! # Chaining
//!
//! Traps that are not ours go to the disposition the application had before
//! we installed: its handler (with or without SA_SIGINFO), `SIG_DFL`
//! (terminate with a core dump, as if we were not there), or `SIG_IGN`
//! (ignored when sent by kill/raise; a real trap cannot be ignored and
//! terminates, as the kernel does). A handler installed after ours is
//! detected at the next commit ([`check_installed`]).

use crate::arch::{self, Emulation};
use crate::error::PokeError;
use crate::sys::signals;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One site of the batch in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrapSite {
    pub addr: usize,
    pub emu: Emulation,
}

struct Desc {
    refs: AtomicUsize,
    sites: AtomicPtr<TrapSite>,
    len: AtomicUsize,
}

static DESC: Desc =
    Desc { refs: AtomicUsize::new(0), sites: AtomicPtr::new(std::ptr::null_mut()), len: AtomicUsize::new(0) };

/// Traps emulated since start (all batches); for statistics and tests.
pub(crate) static TRAPS_EMULATED: AtomicU64 = AtomicU64::new(0);
/// Late traps re-executed since start.
pub(crate) static TRAPS_REPLAYED: AtomicU64 = AtomicU64::new(0);

/// The disposition we chain to, leaked so the handler can always read it.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Mutex<bool> = Mutex::new(false);

/// Total traps emulated by the handler since the process started.
pub fn traps_emulated() -> u64 {
    TRAPS_EMULATED.load(Ordering::Relaxed) // statistics: orders nothing
}

// ---------------------------------------------------------------- ever-set

/// Grow-only open-addressing set of addresses; one writer (the patcher,
/// under the commit lock), lock-free readers. Tables are never freed.
struct Table {
    slots: Box<[AtomicUsize]>,
    count: AtomicUsize,
    older: *mut Table,
}

static EVER: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

fn hash(addr: usize, mask: usize) -> usize {
    (addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) & mask
}

fn table_contains(t: &Table, addr: usize) -> bool {
    let mask = t.slots.len() - 1;
    let mut i = hash(addr, mask);
    loop {
        // Acquire: pairs with remember's Release store of the slot.
        match t.slots[i].load(Ordering::Acquire) {
            0 => return false,
            a if a == addr => return true,
            _ => i = (i + 1) & mask,
        }
    }
}

fn ever_contains(addr: usize) -> bool {
    let mut p = EVER.load(Ordering::Acquire); // pairs with remember's Release: the table's slots and link
    while !p.is_null() {
        // SAFETY: tables are leaked and never freed.
        let t = unsafe { &*p };
        if table_contains(t, addr) {
            return true;
        }
        p = t.older;
    }
    false
}

/// Records addresses that will hold trap bytes. Caller holds the commit lock.
pub(crate) fn remember(addrs: impl ExactSizeIterator<Item = usize>) {
    // Only this function stores EVER, under the commit lock (which orders
    // it with the last store): the Acquire is more than needed here.
    let mut head = EVER.load(Ordering::Acquire);
    // SAFETY: tables are leaked; the single writer holds the commit lock.
    let need = addrs.len() + if head.is_null() { 0 } else { unsafe { (*head).count.load(Ordering::Relaxed) } };
    // SAFETY: as above: a leaked table, read under the commit lock.
    if head.is_null() || need * 2 > unsafe { &*head }.slots.len() {
        let cap = (need * 4).next_power_of_two().max(1024);
        let t =
            Table { slots: (0..cap).map(|_| AtomicUsize::new(0)).collect(), count: AtomicUsize::new(0), older: head };
        head = Box::into_raw(Box::new(t));
        // Release: publishes the zeroed slots and the link to the older
        // tables; pairs with ever_contains's Acquire.
        EVER.store(head, Ordering::Release);
    }
    // SAFETY: as above.
    let t = unsafe { &*head };
    let mask = t.slots.len() - 1;
    for addr in addrs {
        if ever_contains(addr) {
            continue;
        }
        let mut i = hash(addr, mask);
        // Relaxed: the single writer reads its own stores.
        while t.slots[i].load(Ordering::Relaxed) != 0 {
            i = (i + 1) & mask;
        }
        t.slots[i].store(addr, Ordering::Release); // pairs with table_contains's Acquire
        t.count.fetch_add(1, Ordering::Relaxed); // read only by this writer
    }
}

// ---------------------------------------------------------------- descriptor

/// Publishes the sites of the batch in flight. Must be called before any
/// trap byte is written; `sites` sorted by address.
pub(crate) fn publish(sites: Box<[TrapSite]>) {
    debug_assert!(sites.windows(2).all(|w| w[0].addr < w[1].addr));
    debug_assert_eq!(DESC.refs.load(Ordering::Relaxed), 0);
    let len = sites.len();
    // Relaxed: published by the Release store of `refs` below.
    DESC.len.store(len, Ordering::Relaxed);
    DESC.sites.store(Box::into_raw(sites).cast(), Ordering::Relaxed);
    // Pairs with the Acquire in `get_desc`: a handler that sees refs != 0
    // sees the sites. The trap bytes are written after this store (TSO).
    DESC.refs.store(1, Ordering::Release);
}

/// Ends the batch: drops the patcher's reference, waits until no handler
/// holds one, and frees the sites. Call after the final sync.
pub(crate) fn unpublish() {
    // AcqRel and Acquire: pair with the Release decrement of every handler
    // that held a reference (`put_desc`): it is done reading the sites.
    DESC.refs.fetch_sub(1, Ordering::AcqRel);
    while DESC.refs.load(Ordering::Acquire) != 0 {
        std::thread::yield_now(); // a handler is between get_desc and put_desc
    }
    // Relaxed: only the patcher stores these; no handler reads them now
    // (a late one sees refs == 0 and takes no reference).
    let len = DESC.len.load(Ordering::Relaxed);
    let p = DESC.sites.swap(std::ptr::null_mut(), Ordering::Relaxed);
    if !p.is_null() {
        // SAFETY: p came from Box::into_raw of a boxed slice of `len` sites in
        // `publish`, and no handler holds a reference any more.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len)) });
    }
}

/// The emulation of `site` in the batch in flight, if any.
#[inline(always)]
fn lookup(site: usize) -> Option<Emulation> {
    let sites = get_desc()?;
    let found = sites.binary_search_by_key(&site, |s| s.addr).ok().map(|i| sites[i].emu);
    put_desc();
    found
}

/// Takes a reference if a batch is in flight (the kernel's try_get_desc).
#[inline(always)]
fn get_desc() -> Option<&'static [TrapSite]> {
    let mut r = DESC.refs.load(Ordering::Relaxed); // a guess; the compare-exchange below orders
    loop {
        if r == 0 {
            return None;
        }
        // Acquire on success: pairs with publish's Release of `refs`.
        match DESC.refs.compare_exchange_weak(r, r + 1, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => break,
            Err(now) => r = now,
        }
    }
    let p = DESC.sites.load(Ordering::Relaxed); // ordered by the Acquire above
                                                // SAFETY: refs != 0 keeps `unpublish` from freeing the sites; the
                                                // Acquire above pairs with publish's Release, so p and len are set.
    Some(unsafe { std::slice::from_raw_parts(p, DESC.len.load(Ordering::Relaxed)) })
}

#[inline(always)]
fn put_desc() {
    DESC.refs.fetch_sub(1, Ordering::Release); // the sites are read; pairs with unpublish's Acquire
}

// ---------------------------------------------------------------- handler

/// The SIGTRAP handler. Async-signal-safe: atomics and a binary search.
extern "C" fn on_sigtrap(sig: i32, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    let ctx = uctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes valid info and context to SA_SIGINFO handlers.
    if unsafe { (*info).si_code } == libc::SI_KERNEL {
        // An int3 (the kernel reports it with SI_KERNEL).
        // SAFETY: ctx is valid.
        let site = arch::trap_site(unsafe { arch::context_pc(ctx) });
        // Every site is remembered before its batch is published, so an
        // address outside the set is not ours. One of ours is never passed
        // on: emulate it if a batch in flight has it; a trap byte with no
        // descriptor seen means a batch is being published (the descriptor
        // goes out before any trap byte): look again; otherwise (a late
        // trap, the byte is gone) re-execute from the site, which runs the
        // instruction there now or traps again once a descriptor is visible.
        if ever_contains(site) {
            for _ in 0..64 {
                if let Some(emu) = lookup(site) {
                    // SAFETY: ctx is valid; `emu` was computed from the new
                    // instruction of this very site.
                    unsafe { arch::emulate(ctx, site, emu) };
                    TRAPS_EMULATED.fetch_add(1, Ordering::Relaxed); // statistics
                    crate::sync::note_held();
                    return;
                }
                // SAFETY: the thread just executed a byte at this site of
                // ours, so it is mapped.
                if unsafe { (site as *const u8).read_volatile() } != arch::TRAP_BYTE {
                    break;
                }
                std::hint::spin_loop();
            }
            // SAFETY: ctx is valid; the site is an instruction boundary.
            unsafe { arch::set_context_pc(ctx, site) };
            TRAPS_REPLAYED.fetch_add(1, Ordering::Relaxed); // statistics
            crate::sync::note_held();
            return;
        }
    }
    chain(sig, info, uctx);
}

/// Hands a trap that is not ours to the previous disposition.
fn chain(sig: i32, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    let prev = PREVIOUS.load(Ordering::Acquire); // pairs with take_over's Release
                                                 // SAFETY: PREVIOUS is set before our handler is installed, never freed.
    let prev = unsafe { &*prev };
    // SAFETY: info is valid.
    let from_kernel = unsafe { (*info).si_code } > 0;
    match prev.sa_sigaction {
        libc::SIG_DFL => default_action(sig),
        libc::SIG_IGN if from_kernel => default_action(sig),
        libc::SIG_IGN => {}
        f if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the application installed `f` as an SA_SIGINFO handler.
            let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(f) };
            f(sig, info, uctx)
        }
        f => {
            // SAFETY: the application installed `f` as a plain handler.
            let f: extern "C" fn(i32) = unsafe { std::mem::transmute(f) };
            f(sig)
        }
    }
}

/// What SIG_DFL does for SIGTRAP: terminate with a core dump. Restore the
/// default and re-send; the signal is not blocked (SA_NODEFER), so it is
/// delivered before this returns.
#[cold]
fn default_action(sig: i32) {
    signals::raise_default(sig);
}

// ---------------------------------------------------------------- install

fn handler_addr() -> usize {
    on_sigtrap as *const () as usize
}

/// Our handler, with asynchronous signals blocked while it runs (they wait
/// until the short handler is done; see `sys::signals`). SA_NODEFER: a
/// signal handler interrupting nothing of ours may still hit a site while
/// a trap is being handled further up this thread's stack; a forced
/// SIGTRAP while SIGTRAP is blocked would kill the process.
fn our_action() -> libc::sigaction {
    signals::handler_action(on_sigtrap, libc::SA_NODEFER | libc::SA_RESTART | libc::SA_ONSTACK)
}

fn current_handler() -> usize {
    signals::action(libc::SIGTRAP).sa_sigaction
}

/// Installs our handler once, chaining to whatever was there. If it was
/// installed and the application replaced it since, refuses.
pub(crate) fn check_installed() -> Result<(), PokeError> {
    let mut installed = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        let cur = current_handler();
        if cur != handler_addr() {
            return Err(PokeError::TrapHandlerReplaced { found: cur });
        }
        return Ok(());
    }
    take_over()?;
    *installed = true;
    Ok(())
}

fn take_over() -> Result<(), PokeError> {
    // The current disposition, leaked: the handler may read it any time.
    let prev = Box::into_raw(Box::new(signals::action(libc::SIGTRAP)));
    // Release, before the handler can run: pairs with chain's Acquire (the
    // leaked action's contents).
    PREVIOUS.store(prev, Ordering::Release);
    // A handler installed between the query and here would be lost; the
    // commit lock makes textpoke's own calls exclusive and applications
    // install handlers at start-up.
    let ours = our_action();
    // SAFETY: our action runs `on_sigtrap`, an SA_SIGINFO handler that lives
    // as long as the process.
    unsafe { signals::set_action(libc::SIGTRAP, &ours) }.map_err(|source| PokeError::TrapInstall { source })
}

/// Takes SIGTRAP back after the application installed its own handler over
/// ours: our handler is installed again and chains to the application's.
/// (The previous chain target is leaked; this is rare.)
pub fn reinstall_trap_handler() -> Result<(), PokeError> {
    let _lock = crate::text::commit_lock();
    let mut installed = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if *installed && current_handler() == handler_addr() {
        return Ok(());
    }
    take_over()?;
    *installed = true;
    Ok(())
}
