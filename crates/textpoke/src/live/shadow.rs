//! Shadow variables: new data attached to existing objects, for patches
//! that need a field the old structure does not have (the kernel's
//! `kernel/livepatch/shadow.c`, same semantics).
//!
//! A shadow variable is a block of zeroed memory identified by the pair
//! `<obj, id>`: `obj` is any address (usually the structure the data
//! extends), `id` a number the patch chooses. [`get`] finds it;
//! [`alloc`] / [`get_or_alloc`] create it, running an optional constructor;
//! [`free`] / [`free_all`] remove it, running an optional destructor.
//!
//! # Algorithm
//!
//! A fixed table of [`SHARDS`] buckets, each a singly linked list of nodes
//! (`obj`, `id`, the data) with its own mutex and reader count.
//!
//! - **get** (lock-free, async-signal-safe: no allocation, no lock, a
//!   bounded walk of one bucket): raise the bucket's reader count, walk the
//!   list, lower the count. It returns the data's address; using the data
//!   after a `free` of the same variable is the caller's bug, as in the
//!   kernel.
//! - **alloc / get_or_alloc**: allocate and zero the node *outside* the
//!   lock (allocation is not async-signal-safe: do not call these from a
//!   signal handler), take the bucket's mutex, look again: if the variable
//!   appeared meanwhile, drop the new node and return the existing data
//!   (`get_or_alloc`) or null (`alloc`, which the kernel also refuses with
//!   a warning); else run the constructor *under the mutex* (so racing
//!   `get_or_alloc`s construct exactly once), and publish the node at the
//!   head of the list; a constructor returning non-zero drops the node and
//!   the call returns null.
//! - **free / free_all**: under the mutex, unlink the node(s), run the
//!   destructor, and *retire* the node: its memory is freed only once no
//!   reader may still walk through it (below).
//!
//! # Retiring nodes
//!
//! The kernel frees shadow nodes with `kfree_rcu`. The tracer's grace
//! periods (`trace/grace.rs`) cover only threads inside tracer code, which
//! a caller of `get` need not be, so buckets count their own readers, and a
//! node is freed when a writer sees its bucket with no reader *after* the
//! node was unlinked:
//!
//! - a reader raises the count (SeqCst read-modify-write) before it loads
//!   the list head, and every link it loads afterwards is a SeqCst load;
//! - a writer unlinks with a SeqCst store, then reads the count (SeqCst).
//!
//! All four are in the single total order of SeqCst operations. If the
//! writer reads 0, every reader that raised the count before that read has
//! lowered it again (it left the list), and every reader that raises it
//! later loads the links after the unlink and cannot reach the node: it may
//! be freed (Dekker's pattern; on x86 the raise is a `lock xadd`, the unlink
//! an `xchg`, both full barriers). A writer that sees readers keeps its
//! retired nodes on the bucket's list; the next write on that bucket (any
//! alloc or free) tries again, as does [`reclaim`]. Memory is therefore
//! bounded by the nodes freed while readers were walking the same bucket.
//!
//! # Reaching the functions from a patch
//!
//! A patch `.so` may not link against the engine: when the engine lives in
//! an agent loaded with `dlopen(RTLD_LOCAL)` its symbols are invisible to
//! other objects. So the patch keeps a slot (an `LP_SYMBOL` record of kind
//! API), which the loader fills with the address of [`API`] before the
//! pre-patch callback; the C header's `textpoke_shadow_*` and
//! [`ApiSlot`]'s methods call through it. This works the same whether the
//! engine is `LD_PRELOAD`ed, `dlopen`ed or part of the program.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_int, c_ulong, c_void};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Number of buckets (a power of two).
pub const SHARDS: usize = 256;
/// Alignment of a shadow variable's data.
pub const DATA_ALIGN: usize = 16;

/// A constructor: fills the new (zeroed) `shadow_data` of `obj`; non-zero
/// cancels the allocation. Runs under the bucket's lock: it must not call
/// the shadow functions.
pub type Ctor = unsafe extern "C" fn(obj: *mut c_void, shadow_data: *mut c_void, ctor_data: *mut c_void) -> c_int;
/// A destructor: releases what `shadow_data` holds, before its memory is
/// retired. Runs under the bucket's lock: it must not call the shadow
/// functions.
pub type Dtor = unsafe extern "C" fn(obj: *mut c_void, shadow_data: *mut c_void);

/// One shadow variable; the data follows the header at [`DATA_OFFSET`].
#[repr(C)]
struct Node {
    next: AtomicPtr<Node>,
    obj: usize,
    id: c_ulong,
    size: usize,
}

const DATA_OFFSET: usize = std::mem::size_of::<Node>().next_multiple_of(DATA_ALIGN);

impl Node {
    fn layout(size: usize) -> Option<Layout> {
        Layout::from_size_align(DATA_OFFSET.checked_add(size)?, DATA_ALIGN).ok()
    }

    fn data(node: *mut Node) -> *mut c_void {
        node.cast::<u8>().wrapping_add(DATA_OFFSET).cast()
    }

    /// Frees a node from [`new_node`].
    ///
    /// # Safety
    ///
    /// `node` came from `new_node`, is reachable by no list and by no reader.
    unsafe fn free(node: *mut Node) {
        // SAFETY: per the contract, nothing else refers to the node; its
        // layout is the one it was allocated with.
        unsafe {
            let layout = Node::layout((*node).size).expect("layout was valid at allocation");
            dealloc(node.cast(), layout)
        }
    }
}

/// A new zeroed, unlinked node, or null if the allocation failed.
fn new_node(obj: usize, id: c_ulong, size: usize) -> *mut Node {
    let Some(layout) = Node::layout(size) else { return std::ptr::null_mut() };
    // SAFETY: the layout has a non-zero size (the header).
    let node = unsafe { alloc_zeroed(layout) }.cast::<Node>();
    if !node.is_null() {
        // SAFETY: freshly allocated, large enough and aligned for a Node.
        unsafe { node.write(Node { next: AtomicPtr::new(std::ptr::null_mut()), obj, id, size }) };
    }
    node
}

struct Shard {
    head: AtomicPtr<Node>,
    /// Readers walking the list (see "Retiring nodes").
    readers: AtomicUsize,
    /// Writers' lock; holds the retired nodes (as addresses).
    lock: Mutex<Vec<usize>>,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below
const EMPTY_SHARD: Shard =
    Shard { head: AtomicPtr::new(std::ptr::null_mut()), readers: AtomicUsize::new(0), lock: Mutex::new(Vec::new()) };
static TABLE: [Shard; SHARDS] = [EMPTY_SHARD; SHARDS];

fn shard(obj: usize, id: c_ulong) -> &'static Shard {
    let h = (obj as u64 ^ id.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    &TABLE[(h >> (64 - SHARDS.trailing_zeros())) as usize]
}

/// Finds `<obj, id>` in `s`, lock-free.
fn find(s: &Shard, obj: usize, id: c_ulong) -> *mut Node {
    // Raise before the first link load: pairs with the writers' SeqCst
    // unlink and count read (see "Retiring nodes").
    s.readers.fetch_add(1, Ordering::SeqCst);
    let mut n = s.head.load(Ordering::SeqCst);
    while !n.is_null() {
        // SAFETY: a node reachable from the list after our raise is not
        // freed before we lower the count ("Retiring nodes"); obj and id are
        // written before the node is published (SeqCst store, which this
        // SeqCst load reads from or follows).
        let node = unsafe { &*n };
        if node.obj == obj && node.id == id {
            break;
        }
        n = node.next.load(Ordering::SeqCst);
    }
    // Release: our reads of the nodes happen before a writer that reads
    // the lowered count frees them.
    s.readers.fetch_sub(1, Ordering::Release);
    n
}

/// The data of `<obj, id>`, or null. Lock-free and async-signal-safe.
pub fn get(obj: *const c_void, id: c_ulong) -> *mut c_void {
    let n = find(shard(obj as usize, id), obj as usize, id);
    if n.is_null() {
        std::ptr::null_mut()
    } else {
        Node::data(n)
    }
}

/// Frees the retired nodes of `s` if no reader can reach them. Caller
/// holds `s.lock` (`retired` is its content) and unlinked them before.
fn try_reclaim(s: &Shard, retired: &mut Vec<usize>) {
    if retired.is_empty() {
        return;
    }
    // Pairs with the readers' SeqCst raise (see "Retiring nodes").
    if s.readers.load(Ordering::SeqCst) != 0 {
        return;
    }
    for n in retired.drain(..) {
        // SAFETY: unlinked before this count read saw no reader.
        unsafe { Node::free(n as *mut Node) };
    }
}

fn lock(s: &Shard) -> std::sync::MutexGuard<'_, Vec<usize>> {
    // A panic under the lock leaves the list consistent (every change is
    // one store); keep going.
    s.lock.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared by [`alloc`] and [`get_or_alloc`].
///
/// # Safety
///
/// As for [`get_or_alloc`].
unsafe fn alloc_common(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    ctor: Option<Ctor>,
    ctor_data: *mut c_void,
    return_existing: bool,
) -> *mut c_void {
    let s = shard(obj as usize, id);
    let found = find(s, obj as usize, id);
    if !found.is_null() {
        return if return_existing { Node::data(found) } else { std::ptr::null_mut() };
    }
    // Allocated outside the lock, as the kernel's kzalloc.
    let node = new_node(obj as usize, id, size);
    if node.is_null() {
        return std::ptr::null_mut();
    }
    let mut retired = lock(s);
    let existing = find(s, obj as usize, id);
    if !existing.is_null() {
        // SAFETY: `node` was never published.
        unsafe { Node::free(node) };
        return if return_existing { Node::data(existing) } else { std::ptr::null_mut() };
    }
    if let Some(ctor) = ctor {
        // SAFETY: the caller's contract on `ctor`; the data is `size` zeroed
        // bytes nobody else sees yet.
        if unsafe { ctor(obj, Node::data(node), ctor_data) } != 0 {
            // SAFETY: never published.
            unsafe { Node::free(node) };
            return std::ptr::null_mut();
        }
    }
    // SAFETY: unpublished, ours.
    unsafe { (*node).next.store(s.head.load(Ordering::Relaxed), Ordering::Relaxed) };
    // Publish (SeqCst, at least Release: the header, the zeroing and the
    // constructor's writes happen before): pairs with the readers' loads.
    s.head.store(node, Ordering::SeqCst);
    try_reclaim(s, &mut retired);
    Node::data(node)
}

/// Creates `<obj, id>` with `size` zeroed bytes, runs `ctor` on them
/// (under the bucket's lock) and returns the data; null if the variable
/// already exists (the kernel's `klp_shadow_alloc` warns), if `ctor`
/// returned non-zero, or if memory ran out. Not async-signal-safe.
///
/// # Safety
///
/// `ctor`, if any, is safe to call with `obj`, the new data and
/// `ctor_data`, and does not call the shadow functions.
pub unsafe fn alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    ctor: Option<Ctor>,
    ctor_data: *mut c_void,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { alloc_common(obj, id, size, ctor, ctor_data, false) }
}

/// The data of `<obj, id>`, created as by [`alloc`] if it does not exist:
/// of several racing calls exactly one runs `ctor`, and all return the
/// same data (or null if that `ctor` failed or memory ran out). Not
/// async-signal-safe.
///
/// # Safety
///
/// As for [`alloc`].
pub unsafe fn get_or_alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    ctor: Option<Ctor>,
    ctor_data: *mut c_void,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { alloc_common(obj, id, size, ctor, ctor_data, true) }
}

/// Unlinks one node under the lock, runs `dtor`, retires it.
///
/// # Safety
///
/// As for [`free`]; caller holds the bucket's lock (`retired`), `prev`
/// links to `n`.
unsafe fn unlink(retired: &mut Vec<usize>, prev: &AtomicPtr<Node>, n: *mut Node, dtor: Option<Dtor>) {
    // SAFETY: `n` is linked and we hold the lock: no writer frees it.
    let node = unsafe { &*n };
    // The unlink (SeqCst, see "Retiring nodes").
    prev.store(node.next.load(Ordering::Relaxed), Ordering::SeqCst);
    if let Some(dtor) = dtor {
        // SAFETY: the caller's contract on `dtor`.
        unsafe { dtor(node.obj as *mut c_void, Node::data(n)) };
    }
    retired.push(n as usize);
}

/// Removes `<obj, id>` if it exists, running `dtor` on its data first
/// (under the bucket's lock). The memory is freed once no `get` can be
/// reading it. Not async-signal-safe.
///
/// # Safety
///
/// `dtor`, if any, is safe to call with `obj` and the data, and does not
/// call the shadow functions. No thread uses the data afterwards.
pub unsafe fn free(obj: *mut c_void, id: c_ulong, dtor: Option<Dtor>) {
    let s = shard(obj as usize, id);
    let mut retired = lock(s);
    let mut prev = &s.head;
    let mut n = prev.load(Ordering::Relaxed);
    while !n.is_null() {
        // SAFETY: linked nodes live while we hold the lock.
        let node = unsafe { &*n };
        if node.obj == obj as usize && node.id == id {
            // SAFETY: forwarded contract; lock held.
            unsafe { unlink(&mut retired, prev, n, dtor) };
            break;
        }
        prev = &node.next;
        n = node.next.load(Ordering::Relaxed);
    }
    try_reclaim(s, &mut retired);
}

/// Removes every shadow variable with this `id` (whatever its object), as
/// [`free`] does. Patches call it from their post-unpatch callback.
///
/// # Safety
///
/// As for [`free`], for each variable removed.
pub unsafe fn free_all(id: c_ulong, dtor: Option<Dtor>) {
    for s in &TABLE {
        let mut retired = lock(s);
        let mut prev = &s.head;
        let mut n = prev.load(Ordering::Relaxed);
        while !n.is_null() {
            // SAFETY: linked nodes live while we hold the lock.
            let node = unsafe { &*n };
            let next = node.next.load(Ordering::Relaxed);
            if node.id == id {
                // SAFETY: forwarded contract; lock held. `prev` stays: it
                // now links to `next`.
                unsafe { unlink(&mut retired, prev, n, dtor) };
            } else {
                prev = &node.next;
            }
            n = next;
        }
        try_reclaim(s, &mut retired);
    }
}

/// Frees retired nodes no reader can reach any more; returns how many
/// remain retired (buckets that had readers at that instant).
pub fn reclaim() -> usize {
    TABLE
        .iter()
        .map(|s| {
            let mut retired = lock(s);
            try_reclaim(s, &mut retired);
            retired.len()
        })
        .sum()
}

// ------------------------------------------------------------ the API table

/// The engine's function table, which the loader writes into a patch's API
/// slot. `#[repr(C)]`: the C header's `struct textpoke_lp_api` has the same
/// layout. Fields are only ever appended; `size` tells which exist.
#[repr(C)]
pub struct Api {
    /// [`API_VERSION`].
    pub version: u32,
    /// `size_of::<Api>()`.
    pub size: u32,
    pub shadow_get: unsafe extern "C" fn(obj: *mut c_void, id: c_ulong) -> *mut c_void,
    pub shadow_alloc: unsafe extern "C" fn(*mut c_void, c_ulong, usize, Option<Ctor>, *mut c_void) -> *mut c_void,
    pub shadow_get_or_alloc:
        unsafe extern "C" fn(*mut c_void, c_ulong, usize, Option<Ctor>, *mut c_void) -> *mut c_void,
    pub shadow_free: unsafe extern "C" fn(obj: *mut c_void, id: c_ulong, dtor: Option<Dtor>),
    pub shadow_free_all: unsafe extern "C" fn(id: c_ulong, dtor: Option<Dtor>),
}

/// Version of [`Api`].
pub const API_VERSION: u32 = 1;

unsafe extern "C" fn api_get(obj: *mut c_void, id: c_ulong) -> *mut c_void {
    get(obj, id)
}
unsafe extern "C" fn api_alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    ctor: Option<Ctor>,
    data: *mut c_void,
) -> *mut c_void {
    // SAFETY: the C contract of textpoke_shadow_alloc is alloc's.
    unsafe { alloc(obj, id, size, ctor, data) }
}
unsafe extern "C" fn api_get_or_alloc(
    obj: *mut c_void,
    id: c_ulong,
    size: usize,
    ctor: Option<Ctor>,
    data: *mut c_void,
) -> *mut c_void {
    // SAFETY: as above.
    unsafe { get_or_alloc(obj, id, size, ctor, data) }
}
unsafe extern "C" fn api_free(obj: *mut c_void, id: c_ulong, dtor: Option<Dtor>) {
    // SAFETY: as above.
    unsafe { free(obj, id, dtor) }
}
unsafe extern "C" fn api_free_all(id: c_ulong, dtor: Option<Dtor>) {
    // SAFETY: as above.
    unsafe { free_all(id, dtor) }
}

/// The table the loader gives patches.
pub static API: Api = Api {
    version: API_VERSION,
    size: std::mem::size_of::<Api>() as u32,
    shadow_get: api_get,
    shadow_alloc: api_alloc,
    shadow_get_or_alloc: api_get_or_alloc,
    shadow_free: api_free,
    shadow_free_all: api_free_all,
};

/// A patch's API slot (`livepatch! { api = NAME, … }` defines one): empty
/// until the loader fills it, then the engine's [`Api`]. Its methods are
/// the shadow functions, called through the table, so that a Rust patch
/// uses the engine's shadow variables and not a copy linked into the patch.
#[repr(transparent)]
pub struct ApiSlot(AtomicPtr<Api>);

impl ApiSlot {
    /// An empty slot.
    pub const fn new() -> ApiSlot {
        ApiSlot(AtomicPtr::new(std::ptr::null_mut()))
    }

    /// The engine's table, once the loader filled the slot.
    pub fn api(&self) -> Option<&'static Api> {
        // Acquire pairs with the loader's Release store (object.rs).
        let p = self.0.load(Ordering::Acquire);
        // SAFETY: the loader stores only the address of the static API.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// [`get`] through the table; null while the slot is empty.
    pub fn shadow_get(&self, obj: *const c_void, id: c_ulong) -> *mut c_void {
        // SAFETY: api_get has no precondition.
        self.api().map_or(std::ptr::null_mut(), |a| unsafe { (a.shadow_get)(obj.cast_mut(), id) })
    }

    /// [`alloc`] through the table; null while the slot is empty.
    ///
    /// # Safety
    ///
    /// As for [`alloc`].
    pub unsafe fn shadow_alloc(
        &self,
        obj: *mut c_void,
        id: c_ulong,
        size: usize,
        ctor: Option<Ctor>,
        ctor_data: *mut c_void,
    ) -> *mut c_void {
        // SAFETY: forwarded contract.
        self.api().map_or(std::ptr::null_mut(), |a| unsafe { (a.shadow_alloc)(obj, id, size, ctor, ctor_data) })
    }

    /// [`get_or_alloc`] through the table; null while the slot is empty.
    ///
    /// # Safety
    ///
    /// As for [`get_or_alloc`].
    pub unsafe fn shadow_get_or_alloc(
        &self,
        obj: *mut c_void,
        id: c_ulong,
        size: usize,
        ctor: Option<Ctor>,
        ctor_data: *mut c_void,
    ) -> *mut c_void {
        // SAFETY: forwarded contract.
        self.api().map_or(std::ptr::null_mut(), |a| unsafe { (a.shadow_get_or_alloc)(obj, id, size, ctor, ctor_data) })
    }

    /// [`free`] through the table; nothing while the slot is empty.
    ///
    /// # Safety
    ///
    /// As for [`free`].
    pub unsafe fn shadow_free(&self, obj: *mut c_void, id: c_ulong, dtor: Option<Dtor>) {
        if let Some(a) = self.api() {
            // SAFETY: forwarded contract.
            unsafe { (a.shadow_free)(obj, id, dtor) }
        }
    }

    /// [`free_all`] through the table; nothing while the slot is empty.
    ///
    /// # Safety
    ///
    /// As for [`free_all`].
    pub unsafe fn shadow_free_all(&self, id: c_ulong, dtor: Option<Dtor>) {
        if let Some(a) = self.api() {
            // SAFETY: forwarded contract.
            unsafe { (a.shadow_free_all)(id, dtor) }
        }
    }
}

impl Default for ApiSlot {
    fn default() -> Self {
        ApiSlot::new()
    }
}

/// A patch's `LP_SYMBOL` slot (`livepatch! { symbol NAME = "target", … }`):
/// the target symbol's address once the loader filled it, else 0.
#[repr(transparent)]
pub struct SymbolSlot(AtomicUsize);

impl SymbolSlot {
    /// An empty slot.
    pub const fn new() -> SymbolSlot {
        SymbolSlot(AtomicUsize::new(0))
    }

    /// The address (0 until the loader filled the slot).
    pub fn addr(&self) -> usize {
        // Acquire pairs with the loader's Release store (object.rs).
        self.0.load(Ordering::Acquire)
    }

    /// The address as a pointer to `T`.
    pub fn ptr<T>(&self) -> *mut T {
        self.addr() as *mut T
    }
}

impl Default for SymbolSlot {
    fn default() -> Self {
        SymbolSlot::new()
    }
}
