//! Following the loader (see the crate docs, step 3): the agent thread
//! rescans the loaded objects when the loader's object counters
//! (`dl_iterate_phdr`'s `dlpi_adds`/`dlpi_subs`) moved since the last
//! rescan.
//!
//! The counters are compared on every tick of the agent thread (50 ms).
//! The `dlopen` wrapper calls [`nudge`], after which the agent thread
//! looks every millisecond for [`DLOPEN_WATCH`], so that a library's
//! functions are traced soon after it is loaded; a process that was idle
//! gets its agent thread then.
//!
//! A rescan waits for the loader to be done first ([`wait_for_loader`]):
//! the counters move when an object joins the loader's list, before it is
//! relocated and initialised.

use crate::{refresh, AGENT};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// After a `dlopen` starts, how long the agent thread looks every
/// millisecond for the object to appear.
pub(super) const DLOPEN_WATCH: Duration = Duration::from_millis(250);

/// `dlopen` was called: rescan soon.
static NUDGED: AtomicBool = AtomicBool::new(false);

/// The loader's counters as of the last rescan (set just before it).
static SEEN_ADDS: AtomicU64 = AtomicU64::new(0);
static SEEN_SUBS: AtomicU64 = AtomicU64::new(0);

/// Called by the `dlopen` wrapper: rescan soon (starting the agent thread
/// in a process that was idle).
pub(crate) fn nudge() {
    NUDGED.store(true, Ordering::Release);
    if super::running() {
        super::wake::wake();
    } else {
        super::spawn();
    }
}

/// Notes the loader's counters before a rescan, so that the agent thread
/// rescans again when they move past them.
pub(crate) fn note_counters() {
    let (adds, subs) = dl_counters();
    SEEN_ADDS.store(adds, Ordering::Relaxed);
    SEEN_SUBS.store(subs, Ordering::Relaxed);
}

fn counters_moved() -> bool {
    dl_counters() != (SEEN_ADDS.load(Ordering::Relaxed), SEEN_SUBS.load(Ordering::Relaxed))
}

/// The loader's (objects added, objects removed) counters; (0, 0) when
/// the loader does not report them (every check then sees no change).
fn dl_counters() -> (u64, u64) {
    textpoke_sys::loader::counters().unwrap_or_default()
}

/// Waits until no `dlopen` or `dlclose` is in progress: the counters move
/// when an object joins the loader's list, before it is relocated and
/// initialised, all under the loader's lock, which a `dlopen` of the main
/// program (a no-op that loads nothing) takes and releases.
fn wait_for_loader() {
    // SAFETY: dlopen(NULL) returns the main program's handle, loading
    // nothing; it is closed at once.
    unsafe {
        let h = libc::dlopen(std::ptr::null(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if !h.is_null() {
            libc::dlclose(h);
        }
    }
}

/// The agent thread's side: when to look, and the rescans.
#[derive(Default)]
pub(super) struct Follower {
    /// Until when to look every millisecond for an object being loaded.
    watch_until: Option<Instant>,
}

impl Follower {
    /// Whether the agent thread should look every millisecond now (a
    /// `dlopen` is being watched).
    pub fn watching(&self, now: Instant) -> bool {
        self.watch_until.is_some_and(|t| now < t)
    }

    /// Rescans the loaded objects when the loader's counters moved; after
    /// a `dlopen` started, looks every millisecond for a while.
    pub fn follow(&mut self) {
        if NUDGED.swap(false, Ordering::AcqRel) {
            self.watch_until = Some(Instant::now() + DLOPEN_WATCH);
        }
        if counters_moved() {
            self.watch_until = None;
            wait_for_loader();
            if let Some(a) = AGENT.lock().as_mut() {
                refresh(a); // notes the counters first
            }
        }
    }
}
