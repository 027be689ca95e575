//! The function table: a dense id for every function textpoke may trace,
//! below the tracer (which registers the functions it finds sites for) and
//! the recorder (which writes the names of the functions that appear in a
//! trace, and nothing of the others).
//!
//! # Algorithm
//!
//! Append-only. [`register`] takes a mutex (control path: the tracer's
//! scans, tests), looks the address up, and for a new function stores its
//! entry into the next free slot of a segmented array, then publishes the
//! new count with release. A `Registrar` holds the mutex for many
//! registrations (a scan's), and names are shared (`Arc<str>`) with the
//! caller, which keeps them too. Readers ([`get`], [`count`]) take no lock:
//! they load the count with acquire (pairing with that release) and read
//! slots below it, which never change and are never freed. So the
//! recorder's writer and a forked child (which may inherit the mutex held
//! by a thread that does not exist there) read names without waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A function id: dense from 0, stable for the life of the process (an
/// address registered again gets its old id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncId(pub u32);

/// What the table knows of a function.
#[derive(Debug)]
pub struct Function {
    /// The address it was registered with (its entry, or for a
    /// `#[traced]` function its descriptor).
    pub addr: u64,
    /// Its name as the registrar gave it.
    pub name: Arc<str>,
}

const SEG_BITS: u32 = 14;
const SEG_LEN: usize = 1 << SEG_BITS;
const SEGMENTS: usize = 1 << 10;

/// The most functions the table holds (16 Mi: ids fit the recorder's
/// compact events, see `textpoke_record::format`).
pub const MAX_FUNCTIONS: usize = SEG_LEN * SEGMENTS;

type Segment = [AtomicPtr<Function>; SEG_LEN];

static SEGS: [AtomicPtr<Segment>; SEGMENTS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; SEGMENTS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
static BY_ADDR: Mutex<Option<ByAddr>> = Mutex::new(None);

/// Function ids by address. The keys are code addresses of this process,
/// nobody's input: hashed with one multiplication (Fibonacci hashing), not
/// SipHash (registering 100,000 functions: 49 M instructions with SipHash,
/// 20 M with this; callgrind).
type ByAddr = HashMap<u64, u32, std::hash::BuildHasherDefault<AddrHasher>>;

#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        // The high bits pick the bucket (hashbrown) and the top 7 tag it:
        // a multiplication spreads the address's low bits into them.
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Registers a function and returns its id; an address already registered
/// keeps its id (and its first name). Control path. Panics if the table is
/// full ([`MAX_FUNCTIONS`]).
pub fn register(addr: usize, name: &str) -> FuncId {
    registrar().register(addr, &Arc::from(name))
}

/// Holds the table's lock for many registrations; see [`registrar`].
pub(crate) struct Registrar {
    map: MutexGuard<'static, Option<ByAddr>>,
}

/// Takes the table's lock until the returned [`Registrar`] is dropped
/// (readers never wait for it).
pub(crate) fn registrar() -> Registrar {
    Registrar { map: BY_ADDR.lock().unwrap_or_else(|e| e.into_inner()) }
}

impl Registrar {
    /// Makes room for `n` more functions in the address index.
    pub fn reserve(&mut self, n: usize) {
        self.map.get_or_insert_with(ByAddr::default).reserve(n);
    }

    /// As [`register`], keeping a reference to `name`.
    pub fn register(&mut self, addr: usize, name: &Arc<str>) -> FuncId {
        let map = self.map.get_or_insert_with(ByAddr::default);
        if let Some(&id) = map.get(&(addr as u64)) {
            return FuncId(id);
        }
        let id = COUNT.load(Ordering::Relaxed); // only Registrars store COUNT, under the mutex we hold
        assert!(id < MAX_FUNCTIONS, "more than {MAX_FUNCTIONS} functions registered");
        let seg = &SEGS[id >> SEG_BITS];
        // Relaxed: the segment and slot stores are published to readers by
        // the Release store of COUNT below.
        if seg.load(Ordering::Relaxed).is_null() {
            let fresh: Box<Segment> = Box::new([const { AtomicPtr::new(std::ptr::null_mut()) }; SEG_LEN]);
            seg.store(Box::into_raw(fresh), Ordering::Relaxed);
        }
        let f = Box::into_raw(Box::new(Function { addr: addr as u64, name: name.clone() }));
        // SAFETY: the segment was published above (or earlier) and is never
        // freed; only a Registrar, holding the mutex, writes slots.
        let slots = unsafe { &*seg.load(Ordering::Relaxed) };
        slots[id & (SEG_LEN - 1)].store(f, Ordering::Relaxed);
        // Release pairs with the acquire loads of COUNT in `count` and `get`:
        // a reader that sees the new count sees the slot and its segment.
        COUNT.store(id + 1, Ordering::Release);
        map.insert(addr as u64, id as u32);
        FuncId(id as u32)
    }
}

/// How many functions are registered.
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire) // pairs with Registrar::register's Release
}

/// The function with id `id`, if registered. Lock-free.
pub fn get(id: FuncId) -> Option<&'static Function> {
    let i = id.0 as usize;
    if i >= count() {
        return None;
    }
    // SAFETY: slots below the count were published (release in
    // `register`, acquire in `count`) and are never freed or changed; so
    // the loads are Relaxed.
    let seg = unsafe { &*SEGS[i >> SEG_BITS].load(Ordering::Relaxed) };
    // SAFETY: as above; the pointer comes from Box::into_raw, leaked.
    Some(unsafe { &*seg[i & (SEG_LEN - 1)].load(Ordering::Relaxed) })
}

/// The id of the function registered at `addr`, if any.
pub fn lookup(addr: usize) -> Option<FuncId> {
    let g = BY_ADDR.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()?.get(&(addr as u64)).map(|&i| FuncId(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_stable() {
        let a = register(0xdead_0000, "first");
        let b = register(0xdead_0010, "second");
        assert!(b.0 > a.0, "new ids come after older ones (other tests register too)");
        assert_eq!(register(0xdead_0000, "renamed"), a);
        let shared: Arc<str> = Arc::from("third");
        let mut r = registrar();
        r.reserve(2);
        let c = r.register(0xdead_0020, &shared);
        assert_eq!(r.register(0xdead_0020, &Arc::from("again")), c);
        drop(r);
        assert!(Arc::ptr_eq(&get(c).unwrap().name, &shared), "the name is shared, not copied");
        assert_eq!(&*get(a).unwrap().name, "first");
        assert_eq!(get(b).unwrap().addr, 0xdead_0010);
        assert_eq!(lookup(0xdead_0010), Some(b));
        assert!(get(FuncId(u32::MAX)).is_none());
    }

    #[test]
    fn concurrent_readers_see_whole_entries() {
        let base = 0xbeef_0000usize;
        let reader = std::thread::spawn(|| {
            for _ in 0..20_000 {
                let n = count();
                if n > 0 {
                    let f = get(FuncId(n as u32 - 1)).expect("below the count");
                    assert!(!f.name.is_empty());
                }
            }
        });
        for i in 0..20_000 {
            register(base + i * 16, &format!("f{i}"));
        }
        reader.join().unwrap();
    }
}
