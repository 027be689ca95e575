//! Retiring and freeing: what no thread can reach any more waits for a
//! grace period ([`super::grace`]) and is freed by a background reclaimer
//! thread (or by [`Tracer::reclaim`](super::Tracer::reclaim)), so that no
//! tracing change waits for other threads to leave tracer code.

use super::api::Tracer;
use super::grace;
use super::hot::OpBox;
use super::state::{Inner, Target};
use super::tramp_alloc::StubBlock;
use super::TraceError;
use crate::sites::ObjectId;
use crate::text::codemem::{CodeBlock, DataBlock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Something waiting for a grace period before it is freed.
pub(super) enum Retired {
    /// A trampoline block (munmapped when dropped).
    Block(#[allow(dead_code)] CodeBlock),
    /// The stubs of an unloaded object (munmapped when dropped).
    Stubs(#[allow(dead_code)] CodeBlock, #[allow(dead_code)] DataBlock),
    /// An unregistered op's data; its id becomes reusable.
    Op { id: usize, boxed: *mut OpBox },
}

// SAFETY: as OpInfo.
unsafe impl Send for Retired {}

/// How long the background reclaimer waits for one grace period.
const PATIENCE: Duration = Duration::from_millis(500);

/// The background reclaimer thread: its process (a forked child has none)
/// and the flag that asks it to end.
pub(super) struct Reclaimer {
    pid: i32,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Tracer {
    /// Starts the background reclaimer of this process if needed.
    fn wake_reclaimer(&'static self) {
        let pid = crate::sys::threads::getpid();
        // Acquire pairs with the Release stores below and in
        // `stop_reclaimer`. No data rides on it: a fast path for "this
        // process's reclaimer runs"; the mutex decides.
        if self.reclaimer_pid.load(Ordering::Acquire) == pid {
            return;
        }
        let mut r = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = r.take() {
            if old.pid == pid {
                *r = Some(old);
                self.reclaimer_pid.store(pid, Ordering::Release); // partner: the load above
                return;
            }
            // The parent's, before a fork: no such thread here. Its handle
            // names a thread of the parent; leave it be.
            std::mem::forget(old.handle);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new().name("textpoke-reclaim".into()).spawn(move || {
            // Acquire pairs with `stop_reclaimer`'s Release: nothing rides
            // on it but the request to end.
            while !flag.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(5));
                let pending = self.inner.lock().unwrap_or_else(|e| e.into_inner()).retired.len();
                if pending > 0 && !flag.load(Ordering::Acquire) {
                    let _ = self.reclaim_step(PATIENCE);
                }
            }
        });
        if let Ok(handle) = spawned {
            *r = Some(Reclaimer { pid, stop, handle });
            self.reclaimer_pid.store(pid, Ordering::Release); // partner: the load above
        } // else: tried again at the next change
    }

    /// Stops the background reclaimer thread and waits for it to end (at
    /// most one grace period's patience, half a second, if it is waiting
    /// for one). What is retired and not freed stays for the next
    /// [`Tracer::reclaim`] or the next reclaimer, which the next change
    /// that retires anything starts again (a change made by another thread
    /// while this waits may start it already). For a detach that must leave no
    /// thread of textpoke's behind. Refused from a tracing callback (the
    /// reclaimer may be waiting for that very thread to leave tracer
    /// code).
    pub fn stop_reclaimer(&self) -> Result<(), TraceError> {
        if super::hot::in_tracer() != 0 {
            return Err(TraceError::InCallback);
        }
        // Held briefly, never across the join: a fork meanwhile must not
        // leave the child a locked mutex.
        let old = {
            let mut r = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner());
            // Release pairs with `wake_reclaimer`'s Acquire load: a change
            // made after this starts a new reclaimer.
            self.reclaimer_pid.store(0, Ordering::Release);
            r.take()
        };
        let Some(old) = old else { return Ok(()) };
        if old.pid != crate::sys::threads::getpid() {
            std::mem::forget(old.handle); // the parent's thread (see `wake_reclaimer`)
            return Ok(());
        }
        // Release pairs with the reclaimer's Acquire loads of its flag.
        old.stop.store(true, Ordering::Release);
        old.handle.thread().unpark();
        let _ = old.handle.join(); // a panic in it was a panic in a reclaim step: nothing left to undo
        Ok(())
    }

    /// Whether this process's background reclaimer thread runs.
    pub fn reclaimer_running(&self) -> bool {
        let r = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner());
        r.as_ref().is_some_and(|r| r.pid == crate::sys::threads::getpid() && !r.handle.is_finished())
    }

    /// One grace period over everything retired now; frees it if it ends
    /// within `patience`. Returns how many items were freed.
    pub(super) fn reclaim_step(&self, patience: Duration) -> Result<usize, TraceError> {
        let _one = self.reclaiming.lock().unwrap_or_else(|e| e.into_inner());
        let (n, grace) = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            (g.retired.len(), g.grace_enabled)
        };
        // Everything counted in `n` was unpublished before the grace period.
        if n == 0 || (grace && !grace::wait(patience)?) {
            return Ok(0);
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let items: Vec<Retired> = g.retired.drain(..n).collect();
        g.free(items);
        Ok(n)
    }

    /// Frees at once without grace period (test switch), or hands retired
    /// items to the reclaimer.
    pub(super) fn after_change(&'static self, mut g: std::sync::MutexGuard<'_, Inner>) {
        if g.retired.is_empty() {
            return;
        }
        if !g.grace_enabled {
            let items = std::mem::take(&mut g.retired);
            g.free(items);
            return;
        }
        drop(g);
        self.wake_reclaimer();
    }
}

impl Inner {
    /// Retires the stub blocks of objects that are no longer loaded (their
    /// sites are dead and Off: step 4 pointed their words at the null
    /// paths).
    /// A thread can only be in such a stub if it ran the object's code
    /// after the object went, which the program does not do; one inside a
    /// stub past its raise is waited for like any.
    fn retire_stubs_of_unloaded_objects(&mut self) {
        if self.stub_blocks.iter().flatten().next().is_none() {
            return;
        }
        let loaded = self.loaded_objects();
        let dead = |sb: &StubBlock| !loaded.contains(&sb.object);
        let gone: Vec<usize> =
            (0..self.stub_blocks.len()).filter(|&k| self.stub_blocks[k].as_ref().is_some_and(dead)).collect();
        for k in gone {
            let sb = self.stub_blocks[k].take().expect("live stub block");
            let range = sb.code.addr()..sb.code.addr() + sb.code.len();
            for s in self.sites.iter_mut().filter(|s| !s.alive) {
                for stub in s.stubs.iter_mut().filter(|x| x.is_some_and(|st| range.contains(&st.code))) {
                    debug_assert!(
                        stub.is_some_and(|st| st.block.is_none()),
                        "a dead site's word points at its null path"
                    );
                    *stub = None;
                }
            }
            self.retired.push(Retired::Stubs(sb.code, sb.data));
        }
    }

    pub(super) fn retire(&mut self, items: Vec<Retired>) {
        self.retired.extend(items);
        self.retire_stubs_of_unloaded_objects();
        if self.has_mirrors() {
            // Mirror slots of unloaded objects: as their stubs.
            let loaded = self.loaded_objects();
            let gone = self.retire_mirrors(&loaded);
            self.retired.extend(gone.into_iter().map(Retired::Block));
        }
    }

    /// The objects whose sites are live (or whose stubs a site still
    /// calls).
    fn loaded_objects(&self) -> std::collections::HashSet<ObjectId> {
        self.sites.iter().filter(|s| s.alive || s.target != Target::Off).map(|s| s.object).collect()
    }

    /// Frees items whose grace period is over.
    pub(super) fn free(&mut self, items: Vec<Retired>) {
        for r in items {
            match r {
                Retired::Op { id, boxed } => {
                    // SAFETY: created by Box::into_raw in register; after the
                    // grace period no thread can hold it.
                    drop(unsafe { Box::from_raw(boxed) });
                    self.ids_pending &= !(1 << id);
                }
                Retired::Block(code) => drop(code),               // munmap
                Retired::Stubs(code, data) => drop((code, data)), // munmap
            }
        }
    }
}
