//! A pthread mutex that can be taken and released without a guard: the
//! lock of `sync::ForkLock`, which an `atfork` prepare handler takes and
//! the parent and child handlers release (a `std::sync::Mutex` cannot be
//! released by a handler that holds no guard).

use std::cell::UnsafeCell;

/// A process-private, default-kind pthread mutex.
pub struct RawMutex {
    m: UnsafeCell<libc::pthread_mutex_t>,
}

// SAFETY: a pthread mutex is made to be shared between threads; all access
// goes through the pthread functions.
unsafe impl Sync for RawMutex {}
// SAFETY: an unlocked default mutex has no thread affinity; moving a
// locked one is prevented by the borrows of `lock`'s callers.
unsafe impl Send for RawMutex {}

impl RawMutex {
    /// An unlocked mutex (`PTHREAD_MUTEX_INITIALIZER`).
    pub const fn new() -> RawMutex {
        RawMutex { m: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER) }
    }

    /// Takes the mutex, waiting for it. Taking it twice on one thread
    /// deadlocks.
    pub fn lock(&self) {
        // SAFETY: a valid, statically initialised mutex that lives as long
        // as `self`.
        unsafe { libc::pthread_mutex_lock(self.m.get()) };
    }

    /// Takes the mutex if nobody holds it.
    pub fn try_lock(&self) -> bool {
        // SAFETY: as in `lock`.
        unsafe { libc::pthread_mutex_trylock(self.m.get()) == 0 }
    }

    /// Releases the mutex.
    ///
    /// # Safety
    ///
    /// The calling thread holds it (or, in the child of a `fork`, the
    /// thread that forked held it).
    pub unsafe fn unlock(&self) {
        // SAFETY: the caller holds the mutex.
        unsafe { libc::pthread_mutex_unlock(self.m.get()) };
    }
}

impl Default for RawMutex {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RawMutex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMutex")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_until_unlocked() {
        static M: RawMutex = RawMutex::new();
        M.lock();
        assert!(!std::thread::spawn(|| M.try_lock()).join().unwrap(), "held by the test thread");
        // SAFETY: this thread holds it.
        unsafe { M.unlock() };
        assert!(std::thread::spawn(|| {
            let got = M.try_lock();
            if got {
                // SAFETY: taken just above on this thread.
                unsafe { M.unlock() };
            }
            got
        })
        .join()
        .unwrap());
    }
}
