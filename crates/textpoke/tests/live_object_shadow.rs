//! Shadow variables (`live::shadow`) under concurrency: the kernel's
//! semantics (one constructor per variable, `alloc` refusing an existing
//! one, destructors on free), and lock-free `get` walking buckets while
//! other threads free and reallocate nodes in them.

use std::ffi::{c_int, c_ulong, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use textpoke::live::shadow;

/// Object addresses: distinct, never dereferenced.
fn obj(base: usize, i: usize) -> *mut c_void {
    (base + i * 64) as *mut c_void
}

static CTORS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

unsafe extern "C" fn counting_ctor(_obj: *mut c_void, data: *mut c_void, arg: *mut c_void) -> c_int {
    let key = arg as usize;
    CTORS[key].fetch_add(1, Ordering::SeqCst);
    // Widen the race: other threads reach the lock meanwhile.
    std::thread::yield_now();
    // SAFETY: the data is at least 8 bytes (the size asked for).
    unsafe { data.cast::<usize>().write(key * 3 + 1) };
    0
}

#[test]
fn racing_get_or_alloc_constructs_exactly_once() {
    const THREADS: usize = 12;
    const KEYS: usize = 256;
    let base = 0x5000_0000;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for k in 0..KEYS {
                    barrier.wait();
                    // SAFETY: counting_ctor is a valid constructor for 8 bytes.
                    let p = unsafe { shadow::get_or_alloc(obj(base, k), 11, 8, Some(counting_ctor), k as *mut c_void) };
                    assert!(!p.is_null());
                    // SAFETY: constructed before it was published; never freed here.
                    assert_eq!(unsafe { p.cast::<usize>().read() }, k * 3 + 1);
                    mine.push(p as usize);
                }
                mine
            })
        })
        .collect();
    let seen: Vec<Vec<usize>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for k in 0..KEYS {
        assert_eq!(CTORS[k].load(Ordering::SeqCst), 1, "variable {k}: one constructor");
        assert!(seen.iter().all(|v| v[k] == seen[0][k]), "variable {k}: the same data for every thread");
        assert_eq!(shadow::get(obj(base, k), 11) as usize, seen[0][k]);
    }
    // alloc refuses an existing variable, as klp_shadow_alloc does.
    // SAFETY: no constructor.
    assert!(unsafe { shadow::alloc(obj(base, 0), 11, 8, None, std::ptr::null_mut()) }.is_null());
    // SAFETY: no destructor; nobody uses the data any more.
    unsafe { shadow::free_all(11, None) };
    assert!((0..KEYS).all(|k| shadow::get(obj(base, k), 11).is_null()));
}

static DTORS: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn tagging_ctor(obj: *mut c_void, data: *mut c_void, _: *mut c_void) -> c_int {
    // SAFETY: 8 bytes asked for.
    unsafe { data.cast::<usize>().write(obj as usize ^ 0xa5a5) };
    0
}

unsafe extern "C" fn counting_dtor(obj: *mut c_void, data: *mut c_void) {
    // SAFETY: the destructor runs before the memory is retired.
    assert_eq!(unsafe { data.cast::<usize>().read() }, obj as usize ^ 0xa5a5);
    DTORS.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn failing_ctor(_: *mut c_void, _: *mut c_void, _: *mut c_void) -> c_int {
    -1
}

#[test]
fn get_walks_safely_while_other_threads_free_and_reallocate() {
    const STABLE: usize = 4096;
    const CHURN: usize = 4096;
    const READERS: usize = 8;
    const WRITERS: usize = 4;
    const ROUNDS: usize = 30;
    let (stable_base, churn_base) = (0x7000_0000, 0x9000_0000);
    let id: c_ulong = 21;
    for i in 0..STABLE {
        // SAFETY: tagging_ctor fills 8 bytes.
        let p = unsafe { shadow::alloc(obj(stable_base, i), id, 8, Some(tagging_ctor), std::ptr::null_mut()) };
        assert!(!p.is_null());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ t as u64;
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) || reads < 10_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Stable variables are always found, with their data:
                    // the walk passes nodes being freed and reallocated.
                    let o = obj(stable_base, x as usize % STABLE);
                    let p = shadow::get(o, id);
                    assert!(!p.is_null(), "stable variable {o:?} lost");
                    // SAFETY: stable variables are never freed during the test.
                    assert_eq!(unsafe { p.cast::<usize>().read() }, o as usize ^ 0xa5a5);
                    // Churned ones may or may not exist (never dereferenced).
                    let _ = shadow::get(obj(churn_base, (x >> 20) as usize % CHURN), id);
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            std::thread::spawn(move || {
                let mut freed = 0;
                for _ in 0..ROUNDS {
                    for i in (w..CHURN).step_by(WRITERS) {
                        let o = obj(churn_base, i);
                        // SAFETY: tagging_ctor fills 8 bytes.
                        let p = unsafe { shadow::get_or_alloc(o, id, 8, Some(tagging_ctor), std::ptr::null_mut()) };
                        assert!(!p.is_null());
                    }
                    for i in (w..CHURN).step_by(WRITERS) {
                        // SAFETY: counting_dtor checks the data; readers never
                        // dereference churned variables.
                        unsafe { shadow::free(obj(churn_base, i), id, Some(counting_dtor)) };
                        freed += 1;
                    }
                }
                freed
            })
        })
        .collect();
    let freed: usize = writers.into_iter().map(|h| h.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(reads >= (READERS * 10_000) as u64);
    assert_eq!(DTORS.load(Ordering::SeqCst), freed, "one destructor per free");
    assert_eq!(freed, CHURN * ROUNDS);
    assert_eq!(shadow::reclaim(), 0, "with no reader left, every retired node is freed");

    // A failing constructor leaves no variable.
    // SAFETY: failing_ctor touches nothing.
    let p = unsafe { shadow::get_or_alloc(obj(churn_base, 0), id, 8, Some(failing_ctor), std::ptr::null_mut()) };
    assert!(p.is_null() && shadow::get(obj(churn_base, 0), id).is_null());
    DTORS.store(0, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { shadow::free_all(id, Some(counting_dtor)) };
    assert_eq!(DTORS.load(Ordering::SeqCst), STABLE, "free_all: one destructor per variable of the id");
    assert!(shadow::get(obj(stable_base, 0), id).is_null());
}
