//! A mutex meant to be held across `fork`: its owner's `pthread_atfork`
//! prepare handler takes it (`raw_lock`) and the parent and child handlers
//! release it (`raw_unlock`), so a child never inherits it locked by a
//! thread that does not exist there. The recorder's state and the agent's
//! use it.

use crate::sys::mutex::RawMutex;
use std::cell::UnsafeCell;

/// A pthread mutex around `T`.
pub struct ForkLock<T> {
    m: RawMutex,
    v: UnsafeCell<T>,
    /// How many times the lock was taken (a diagnostic: tests count them).
    taken: std::sync::atomic::AtomicU64,
}

// SAFETY: access to `v` is serialised by the mutex.
unsafe impl<T: Send> Sync for ForkLock<T> {}

pub struct Guard<'a, T>(&'a ForkLock<T>);

impl<T> ForkLock<T> {
    pub const fn new(v: T) -> Self {
        ForkLock { m: RawMutex::new(), v: UnsafeCell::new(v), taken: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Counts one taking of the lock (a control path: the atomic costs
    /// nothing that matters there). Relaxed: a diagnostic count, ordering
    /// nothing.
    fn count(&self) {
        self.taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many times the lock was taken so far.
    #[cfg(feature = "testing")]
    pub fn times_taken(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn lock(&self) -> Guard<'_, T> {
        self.m.lock();
        self.count();
        Guard(self)
    }

    /// Locks if nobody holds the lock (for callers that must not wait: the
    /// `dlclose` wrapper, which may hold the loader's lock, and the panic
    /// path).
    pub fn try_lock(&self) -> Option<Guard<'_, T>> {
        self.m.try_lock().then(|| {
            self.count();
            Guard(self)
        })
    }

    /// Locks without a guard (the atfork prepare handler).
    ///
    /// # Safety
    ///
    /// Must be paired with [`Self::raw_unlock`] on this thread, or in the
    /// child of a fork made by this thread.
    pub unsafe fn raw_lock(&self) {
        self.m.lock();
        self.count();
    }

    /// # Safety
    ///
    /// The calling thread (or, in a forked child, the thread that forked)
    /// holds the lock through [`Self::raw_lock`].
    pub unsafe fn raw_unlock(&self) {
        // SAFETY: the caller holds the lock.
        unsafe { self.m.unlock() };
    }

    /// The value while the lock is held raw.
    ///
    /// # Safety
    ///
    /// The caller holds the lock through [`Self::raw_lock`] and makes no
    /// second reference.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_locked(&self) -> &mut T {
        // SAFETY: the caller holds the lock.
        unsafe { &mut *self.v.get() }
    }
}

impl<T> std::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.v.get() }
    }
}

impl<T> std::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.0.v.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the lock.
        unsafe { self.0.m.unlock() };
    }
}
