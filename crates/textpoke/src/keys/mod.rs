//! Static keys (the kernel's jump labels) for Rust and C, flipped safely
//! while other threads run through their branches.
//!
//! ```
//! textpoke::define_static_key_false!(pub TRACING);
//!
//! fn handle(req: u32) -> u32 {
//!     if textpoke::static_branch_unlikely!(TRACING) {
//!         eprintln!("request {req}"); // off the hot path: one NOP when disabled
//!     }
//!     req + 1
//! }
//!
//! assert_eq!(handle(1), 2);
//! TRACING.enable()?; // patches every branch on TRACING, in one batch
//! assert!(textpoke::static_branch_unlikely!(TRACING));
//! TRACING.disable()?;
//! # Ok::<(), textpoke::keys::KeyError>(())
//! ```
//!
//! # Branch sites
//!
//! A key is a [`StaticKey`] static: a reference count (`enabled`), its
//! default and its name, laid out as C's `struct textpoke_static_key`.
//! [`define_static_key_false!`](crate::define_static_key_false) and
//! [`define_static_key_true!`](crate::define_static_key_true) wrap it in
//! [`StaticKeyFalse`] or [`StaticKeyTrue`], so the default is known from
//! the type at compile time, as the kernel does with `__builtin_types_compatible_p`.
//!
//! [`static_branch_unlikely!`](crate::static_branch_unlikely) and
//! [`static_branch_likely!`](crate::static_branch_likely) expand to an
//! `asm!` goto block holding one 5-byte instruction, the *site*: either the
//! NOP `0f 1f 44 00 00`, falling through, or `jmp rel32` to the block's
//! label. The block reads no register and writes none, so a disabled
//! `unlikely` branch costs exactly that NOP: no load of the key, no compare.
//!
//! A site is a JMP exactly when `enabled XOR likely` (the kernel's
//! `jump_label_type`): an `unlikely` branch jumps to its body while its key
//! is enabled, a `likely` one jumps *around* its body while its key is
//! disabled. The form compiled in is the one for the key's default, so
//! nothing is patched at start-up: an `unlikely` branch on a false key is a
//! NOP, on a true key a JMP.
//!
//! The block has `options(nostack)`: the site only ever holds a NOP or a JMP,
//! neither touches the stack, and the trap handler that stands in for it
//! during a flip runs on a signal frame the kernel puts below the red zone.
//! (Without it the compiler must keep the stack aligned for a call that never
//! comes, which costs instructions in leaf functions.) It is `readonly`, so
//! the compiler keeps it ordered after acquire loads like any other read of
//! the key.
//!
//! # Records
//!
//! Each site and each key leaves a record in the section `.note.textpoke`:
//! a site's address, its label and its key, as offsets relative to the
//! record (like the kernel's `jump_entry`), so the section needs no
//! dynamic relocation. The section is a retained (`SHF_GNU_RETAIN`) note,
//! which `--gc-sections` keeps; the linker puts it in a `PT_NOTE` segment,
//! which the loader lists for every object. The format, and why notes, is
//! in the `notes` submodule.
//!
//! # Objects
//!
//! Keys and sites live in the executable and in shared libraries, including
//! ones loaded later with `dlopen`. A record's offsets reach only within one
//! object, so a key and all its sites are in the same object (a key defined
//! in one crate and branched on in another is fine: crates are linked into
//! one object). The keys layer keeps a table per object that has records,
//! built from the loaded objects as [`crate::sites::Objects`] lists them.
//!
//! There is no hook that runs when a library is unloaded and could forget
//! its sites (a destructor would run under the loader's lock, while a flip
//! waits for that lock holding the keys lock). So every operation that
//! needs the tables first brings them up to date and **pins** the objects:
//!
//!  1. read the loader's load and unload counters (`dlpi_adds`,
//!     `dlpi_subs`); if they moved since the tables were last up to date,
//!     rescan the loaded objects: forget the tables of the removed ones,
//!     note the added ones as unread;
//!  2. pin each object with records and each unread one
//!     (`dlopen(RTLD_NOLOAD)`): from now on it cannot be unmapped; an object
//!     with records already gone means a retry;
//!  3. read the counters again: if they did not move since step 1 (nor
//!     since the rescan), the pinned objects are the ones the rescan listed,
//!     as it listed them; otherwise retry;
//!  4. read the records of the unread objects from their memory, where the
//!     object table recorded their `PT_NOTE` segments;
//!  5. patch; drop the pins once the keys lock is released.
//!
//! So the sites of an unloaded library are forgotten at the first operation
//! after its `dlclose`, and no operation touches an object whose memory may
//! go away during it. With no `dlopen` or `dlclose` since the last flip, the
//! check costs two short walks of the loader's list and one pin per object
//! with keys.
//!
//! # Flipping
//!
//! A flip computes, for every site of every key that changes state, the
//! pair (bytes now, bytes wanted) — NOP and JMP — and commits them as **one
//! [`Batch`]** with the breakpoint strategy: three sync rounds
//! whatever the number of sites and keys. The engine checks that every site
//! holds exactly the expected bytes before writing anything, so a site that
//! is not what the records say refuses the whole flip, naming the key and
//! the site, and nothing is written.
//!
//! The reference count follows the kernel's `static_key_slow_inc/dec`:
//!
//! - [`inc`](StaticKey::inc): if the count is positive, increment it
//!   (lock-free). Otherwise, under the keys lock: from 0, set it to -1
//!   ("being enabled": the lock-free paths all step aside), patch, then
//!   publish 1 (Release). So when `inc()` returns, every site is patched.
//! - [`dec`](StaticKey::dec): if the count is above 1, decrement it
//!   (lock-free). Otherwise, under the lock: from 1, set it to 0 and patch;
//!   from 0, refuse with [`KeyError::Underflow`] and patch nothing.
//! - [`enable`](StaticKey::enable) / [`disable`](StaticKey::disable) set the
//!   count to 1 or 0 (no-ops if it already is), under the lock; disabling a
//!   key that `inc()` references hold is refused ([`KeyError::Shared`]).
//! - [`Update`] flips several keys, by reference or by name, in one batch.
//!
//! Every transition that patches happens under one process-wide keys lock
//! (then the engine's commit lock), so concurrent flips are serialised and
//! the last one to take the lock decides the final state; no update is
//! lost. If the commit fails, the count is restored. A failure after some
//! bytes were written (the engine's `WriteFailed`) *poisons* the key: its
//! sites are in an unknown state, and later flips refuse to touch them.
//!
//! # Rules
//!
//! - Branches may run anywhere, in any thread, in signal handlers.
//! - Flips take locks and allocate: not from a signal handler, and not from
//!   an ELF constructor or destructor while another thread may flip (the
//!   keys lock and the loader's lock would be taken in opposite orders).
//! - One copy of textpoke per process manages keys. A Rust `cdylib` that
//!   links textpoke and is loaded into a process that has its own textpoke
//!   has two; let one of them do all the flipping (the C library
//!   `textpoke-c` is meant to be that one for C code).

mod error;
mod notes;
mod registry;

#[doc(hidden)]
pub mod macros;

pub use error::KeyError;

use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sites::Pin;
use crate::text::{CommitOptions, CommitStats, Poke};
use crate::Batch;
use registry::Registry;

/// `StaticKey::flags` bit: the key is enabled by default.
const KEY_DEFAULT_TRUE: u32 = 1;

/// A static key: a reference count deciding which way its branch sites go.
///
/// Define keys with [`define_static_key_false!`](crate::define_static_key_false)
/// or [`define_static_key_true!`](crate::define_static_key_true), which also
/// record them for the keys layer; a `StaticKey` reached through them derefs
/// here. Same layout as C's `struct textpoke_static_key`.
#[repr(C)]
pub struct StaticKey {
    /// Reference count; -1 while being enabled (under the keys lock).
    enabled: AtomicI32,
    /// [`KEY_DEFAULT_TRUE`].
    flags: u32,
    /// NUL-terminated name, in the same object.
    name: *const c_char,
}

// SAFETY: the count is atomic; `flags` and `name` are never written after
// construction, and `name` points to an immutable string.
unsafe impl Sync for StaticKey {}
// SAFETY: as above; a key holds no thread-affine data.
unsafe impl Send for StaticKey {}

impl StaticKey {
    const fn new(default_enabled: bool, name: &'static CStr) -> StaticKey {
        StaticKey {
            enabled: AtomicI32::new(default_enabled as i32),
            flags: if default_enabled { KEY_DEFAULT_TRUE } else { 0 },
            name: name.as_ptr(),
        }
    }

    /// The key's name: `module::path::NAME` for Rust keys, the identifier
    /// for C keys.
    pub fn name(&self) -> &str {
        // SAFETY: `name` is a NUL-terminated string that lives as long as the
        // key (both are in the same object); the macros make it valid UTF-8,
        // C identifiers are ASCII.
        let c = unsafe { CStr::from_ptr(self.name) };
        c.to_str().unwrap_or("<non-UTF-8 key name>")
    }

    pub(crate) fn name_ptr(&self) -> *const c_char {
        self.name
    }

    /// Whether the key is enabled (its reference count is positive).
    #[inline]
    pub fn is_enabled(&self) -> bool {
        // Pairs with the Release stores of a positive count (`inc`,
        // `Update::commit`), made once the sites are patched.
        self.enabled.load(Ordering::Acquire) > 0
    }

    /// The reference count: 0 disabled, positive enabled.
    pub fn count(&self) -> i32 {
        self.enabled.load(Ordering::Acquire).max(0) // pairs as in is_enabled
    }

    /// Whether the key is enabled when its object is loaded.
    pub fn default_enabled(&self) -> bool {
        self.flags & KEY_DEFAULT_TRUE != 0
    }

    /// Enables the key: count 0 becomes 1 and every site is patched; a
    /// positive count is left alone. When this returns `Ok`, every branch
    /// on the key is taken (by threads that start it afterwards).
    pub fn enable(&self) -> Result<(), KeyError> {
        // Pairs as in `is_enabled`: a positive count means patched sites.
        if self.enabled.load(Ordering::Acquire) > 0 {
            return Ok(());
        }
        Update::new().enable(self).commit().map(drop)
    }

    /// Disables the key: count 1 becomes 0 and every site is patched; 0 is
    /// left alone; a count above 1 (held by `inc()`) is refused with
    /// [`KeyError::Shared`].
    pub fn disable(&self) -> Result<(), KeyError> {
        // Pairs with the stores that make the count 0 (the CASes of `dec`
        // and `begin_transition`, `rollback`, a failed `inc`).
        if self.enabled.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        Update::new().disable(self).commit().map(drop)
    }

    /// Enables (`true`) or disables the key.
    pub fn set(&self, enabled: bool) -> Result<(), KeyError> {
        if enabled {
            self.enable()
        } else {
            self.disable()
        }
    }

    /// Takes a reference (`static_key_slow_inc`): the first enables the key.
    pub fn inc(&self) -> Result<(), KeyError> {
        if self.try_inc_fast()? {
            return Ok(());
        }
        locked(|reg, pins| loop {
            // Pairs with every Release store and CAS of the count (other
            // lock holders, the lock-free paths).
            let v = self.enabled.load(Ordering::Acquire);
            if v > 0 {
                if self.try_inc_fast()? {
                    return Ok(());
                }
                continue;
            }
            debug_assert_eq!(v, 0, "only the keys lock holder sets -1");
            self.enabled.store(-1, Ordering::Relaxed);
            let flipped = sync_locked(reg, pins, || names([self]))
                .and_then(|()| flip_locked(reg, &[(self, true)], CommitOptions::default()));
            return match flipped {
                Ok(_) => {
                    // Pairs with the Acquire loads of the lock-free paths and
                    // is_enabled(): a positive count means patched sites.
                    self.enabled.store(1, Ordering::Release);
                    Ok(())
                }
                Err(e) => {
                    // Nothing patched: 0 again (partner as for 1 above).
                    self.enabled.store(0, Ordering::Release);
                    Err(e)
                }
            };
        })
    }

    /// Drops a reference (`static_key_slow_dec`): the last disables the key.
    /// Below zero is refused with [`KeyError::Underflow`].
    pub fn dec(&self) -> Result<(), KeyError> {
        if self.try_dec_fast() {
            return Ok(());
        }
        locked(|reg, pins| loop {
            // Pairs as in `inc`.
            let v = self.enabled.load(Ordering::Acquire);
            if v > 1 {
                if self.try_dec_fast() {
                    return Ok(());
                }
                continue;
            }
            if v <= 0 {
                return Err(KeyError::Underflow { key: self.name().to_string() });
            }
            // 1 -> 0; a lock-free inc() may have made it 2 meanwhile.
            // Acquire pairs with the Release that made it 1; Release with
            // the Acquire loads of `is_enabled` and the lock-free paths,
            // which from now on see 0 and leave the count to us.
            if self.enabled.compare_exchange(1, 0, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            let flipped = sync_locked(reg, pins, || names([self]))
                .and_then(|()| flip_locked(reg, &[(self, false)], CommitOptions::default()));
            return match flipped {
                Ok(_) => Ok(()),
                Err(e) => {
                    // While the count is 0 no lock-free path changes it.
                    // Back to 1, the sites still patched: pairs with the
                    // Acquire loads of `is_enabled` and the lock-free paths.
                    self.enabled.store(1, Ordering::Release);
                    Err(e)
                }
            };
        })
    }

    /// Increments a positive count; `Ok(false)` if it is not positive.
    fn try_inc_fast(&self) -> Result<bool, KeyError> {
        // Pairs with the Release that made the count positive: the sites
        // are patched.
        let mut v = self.enabled.load(Ordering::Acquire);
        while v > 0 {
            if v == i32::MAX {
                return Err(KeyError::Overflow { key: self.name().to_string() });
            }
            // Acquire pairs as the load above; Release pairs with the next
            // change's Acquire (every change of the count is a Release store
            // or an AcqRel RMW, so each sees the ones before).
            match self.enabled.compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(true),
                Err(now) => v = now,
            }
        }
        Ok(false)
    }

    /// Decrements a count above 1; `false` if it is not above 1.
    fn try_dec_fast(&self) -> bool {
        // Pairs as in `try_inc_fast`.
        let mut v = self.enabled.load(Ordering::Acquire);
        while v > 1 {
            // AcqRel: partners as in `try_inc_fast`.
            match self.enabled.compare_exchange_weak(v, v - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
        false
    }

    fn addr(&self) -> usize {
        self as *const StaticKey as usize
    }
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey")
            .field("name", &self.name())
            .field("count", &self.enabled.load(Ordering::Relaxed))
            .field("default_enabled", &self.default_enabled())
            .finish()
    }
}

/// A key disabled by default; see [`define_static_key_false!`](crate::define_static_key_false).
#[repr(transparent)]
#[derive(Debug)]
pub struct StaticKeyFalse(StaticKey);

/// A key enabled by default; see [`define_static_key_true!`](crate::define_static_key_true).
#[repr(transparent)]
#[derive(Debug)]
pub struct StaticKeyTrue(StaticKey);

impl StaticKeyFalse {
    #[doc(hidden)]
    pub const fn __new(name: &'static CStr) -> StaticKeyFalse {
        StaticKeyFalse(StaticKey::new(false, name))
    }
}

impl StaticKeyTrue {
    #[doc(hidden)]
    pub const fn __new(name: &'static CStr) -> StaticKeyTrue {
        StaticKeyTrue(StaticKey::new(true, name))
    }
}

impl std::ops::Deref for StaticKeyFalse {
    type Target = StaticKey;
    fn deref(&self) -> &StaticKey {
        &self.0
    }
}

impl std::ops::Deref for StaticKeyTrue {
    type Target = StaticKey;
    fn deref(&self) -> &StaticKey {
        &self.0
    }
}

impl AsRef<StaticKey> for StaticKeyFalse {
    fn as_ref(&self) -> &StaticKey {
        &self.0
    }
}

impl AsRef<StaticKey> for StaticKeyTrue {
    fn as_ref(&self) -> &StaticKey {
        &self.0
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::StaticKeyFalse {}
    impl Sealed for super::StaticKeyTrue {}
}

/// The two kinds of key the branch macros accept, with their default known
/// at compile time.
pub trait KeyKind: sealed::Sealed {
    const DEFAULT_ENABLED: bool;
}

impl KeyKind for StaticKeyFalse {
    const DEFAULT_ENABLED: bool = false;
}

impl KeyKind for StaticKeyTrue {
    const DEFAULT_ENABLED: bool = true;
}

/// What the branch macros need at compile time. Not public API.
#[doc(hidden)]
pub mod __private {
    use super::notes::{SITE_INIT_JMP, SITE_LIKELY};
    use super::KeyKind;

    /// 1 if a site of `likely`-ness `likely` on a key of kind `K` is compiled
    /// in as a JMP, 0 for a NOP.
    pub const fn site_init_jmp<K: KeyKind>(_key: &K, likely: bool) -> u32 {
        (K::DEFAULT_ENABLED != likely) as u32
    }

    /// The flags of the site's record.
    pub const fn site_flags<K: KeyKind>(key: &K, likely: bool) -> u32 {
        (if likely { SITE_LIKELY } else { 0 }) | if site_init_jmp(key, likely) == 1 { SITE_INIT_JMP } else { 0 }
    }

    pub use core::ffi::CStr;

    /// The key's name as a C string, at compile time.
    pub const fn name(with_nul: &'static str) -> &'static CStr {
        match CStr::from_bytes_with_nul(with_nul.as_bytes()) {
            Ok(c) => c,
            Err(_) => panic!("a static key name contains a NUL byte"),
        }
    }
}

// ------------------------------------------------------------------ locking

/// The keys lock (the kernel's `jump_label_mutex`) and the tables it guards.
static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// Runs `f` under the keys lock; pins it collects are dropped after the
/// lock is released.
fn locked<R>(f: impl FnOnce(&mut Registry, &mut Vec<Pin>) -> R) -> R {
    let mut pins = Vec::new();
    let r = {
        let mut guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.get_or_insert_with(Registry::new), &mut pins)
    };
    drop(pins);
    r
}

fn names<'a>(keys: impl IntoIterator<Item = &'a StaticKey>) -> String {
    keys.into_iter().map(|k| format!("`{}`", k.name())).collect::<Vec<_>>().join(", ")
}

/// Brings the tables up to date and pins the objects (see "Objects").
fn sync_locked(reg: &mut Registry, pins: &mut Vec<Pin>, what: impl FnOnce() -> String) -> Result<(), KeyError> {
    reg.sync(pins).map_err(|attempts| KeyError::Unsettled { keys: what(), attempts })
}

/// Patches the sites of each key, going to the state paired with it, as one
/// batch. Caller holds the keys lock, has synced and pinned the objects
/// ([`sync_locked`]) and set the counts in transition.
fn flip_locked(
    reg: &mut Registry,
    changes: &[(&StaticKey, bool)],
    opts: CommitOptions,
) -> Result<(usize, Option<CommitStats>), KeyError> {
    let mut batch = Batch::new();
    for (key, to) in changes {
        let Some((table, rec)) = reg.key(key.addr()) else {
            return Err(KeyError::Unregistered { key: key.name().to_string(), addr: key.addr() });
        };
        if !table.bad.is_empty() {
            return Err(KeyError::BadObject {
                key: key.name().to_string(),
                path: table.path.clone(),
                what: table.bad.join("; "),
            });
        }
        if rec.poisoned {
            return Err(KeyError::Poisoned { key: key.name().to_string() });
        }
        let name = format!("a branch site of static key `{}`", rec.name);
        for s in &rec.sites {
            batch.push(Poke::new(s.addr, s.bytes(!to), s.bytes(*to)).named(name.clone()));
        }
    }
    if batch.is_empty() {
        return Ok((0, None));
    }
    let sites = batch.len();
    match batch.commit_with(opts) {
        Ok(stats) => Ok((sites, Some(stats))),
        Err(source) => {
            if matches!(source, crate::PokeError::WriteFailed { .. }) {
                for (key, _) in changes {
                    if let Some(rec) = reg.key_mut(key.addr()) {
                        rec.poisoned = true;
                    }
                }
            }
            Err(KeyError::Patch { keys: names(changes.iter().map(|c| c.0)), sites, source: Box::new(source) })
        }
    }
}

// ------------------------------------------------------------------ updates

enum Target<'a> {
    Key(&'a StaticKey),
    Named(String),
}

/// Flips several keys at once: all their sites are patched in one batch.
///
/// Each key is enabled or disabled with the semantics of
/// [`StaticKey::enable`]/[`StaticKey::disable`]; keys already in the wanted
/// state are left alone. If any key refuses (e.g. [`KeyError::Shared`]) or
/// the batch fails, no key changes.
///
/// ```
/// textpoke::define_static_key_false!(A);
/// textpoke::define_static_key_true!(B);
/// # fn f() -> (bool, bool) { (textpoke::static_branch_unlikely!(A), textpoke::static_branch_likely!(B)) }
/// let stats = textpoke::keys::Update::new().enable(&A).disable(&B).commit()?;
/// assert_eq!(stats.keys_changed, 2);
/// assert_eq!(f(), (true, false));
/// # Ok::<(), textpoke::keys::KeyError>(())
/// ```
pub struct Update<'a> {
    items: Vec<(Target<'a>, bool)>,
    options: CommitOptions,
}

/// What an [`Update`] (or any flip) did.
#[derive(Debug, Clone)]
pub struct UpdateStats {
    /// Keys whose state changed.
    pub keys_changed: usize,
    /// Branch sites patched.
    pub sites_patched: usize,
    /// The engine's statistics of the batch, if there was one.
    pub commit: Option<CommitStats>,
    /// Total time, including bringing the tables up to date.
    pub elapsed: Duration,
}

impl Default for Update<'_> {
    fn default() -> Self {
        Update::new()
    }
}

impl<'a> Update<'a> {
    pub fn new() -> Update<'a> {
        Update { items: Vec::new(), options: CommitOptions::default() }
    }

    /// Enables `key` (a `&StaticKeyFalse`/`&StaticKeyTrue` derefs to it).
    pub fn enable(self, key: &'a StaticKey) -> Self {
        self.set(key, true)
    }

    pub fn disable(self, key: &'a StaticKey) -> Self {
        self.set(key, false)
    }

    pub fn set(mut self, key: &'a StaticKey, enabled: bool) -> Self {
        self.items.push((Target::Key(key), enabled));
        self
    }

    /// Enables the key of this exact name in whichever loaded object
    /// defines it ([`KeyError::NotFound`], [`KeyError::Ambiguous`]).
    pub fn enable_named(self, name: &str) -> Self {
        self.set_named(name, true)
    }

    pub fn disable_named(self, name: &str) -> Self {
        self.set_named(name, false)
    }

    pub fn set_named(mut self, name: &str, enabled: bool) -> Self {
        self.items.push((Target::Named(name.to_string()), enabled));
        self
    }

    /// Commit options for the batch (the breakpoint strategy by default).
    pub fn options(mut self, options: CommitOptions) -> Self {
        self.options = options;
        self
    }

    fn describe(&self) -> String {
        let v: Vec<String> = self
            .items
            .iter()
            .map(|(t, _)| match t {
                Target::Key(k) => format!("`{}`", k.name()),
                Target::Named(n) => format!("`{n}`"),
            })
            .collect();
        v.join(", ")
    }

    /// Applies the update; on `Err`, no key changed.
    pub fn commit(self) -> Result<UpdateStats, KeyError> {
        let start = Instant::now();
        locked(|reg, pins| {
            sync_locked(reg, pins, || self.describe())?;
            let mut items: Vec<(&StaticKey, bool)> = Vec::with_capacity(self.items.len());
            for (t, on) in &self.items {
                let key = match t {
                    Target::Key(k) => *k,
                    // SAFETY: the key's object is pinned until after the
                    // lock is released, and the reference does not escape.
                    Target::Named(n) => unsafe { find_locked(reg, n)?.key() },
                };
                if items.iter().any(|(k, _)| std::ptr::eq(*k, key)) {
                    return Err(KeyError::Duplicate { key: key.name().to_string() });
                }
                items.push((key, *on));
            }
            let mut moving: Vec<(&StaticKey, bool)> = Vec::new();
            for &(key, on) in &items {
                match begin_transition(key, on) {
                    Ok(true) => moving.push((key, on)),
                    Ok(false) => {}
                    Err(e) => {
                        rollback(&moving);
                        return Err(e);
                    }
                }
            }
            let mut stats =
                UpdateStats { keys_changed: moving.len(), sites_patched: 0, commit: None, elapsed: Duration::ZERO };
            if !moving.is_empty() {
                match flip_locked(reg, &moving, self.options) {
                    Ok((sites, commit)) => {
                        for &(key, on) in &moving {
                            if on {
                                // The sites are patched: pairs with the Acquire
                                // loads of `is_enabled` and the lock-free paths.
                                key.enabled.store(1, Ordering::Release);
                            }
                        }
                        stats.sites_patched = sites;
                        stats.commit = commit;
                    }
                    Err(e) => {
                        rollback(&moving);
                        return Err(e);
                    }
                }
            }
            stats.elapsed = start.elapsed();
            Ok(stats)
        })
    }
}

/// Under the keys lock: moves `key` into transition towards `on`.
/// `Ok(false)` if it already is in that state.
fn begin_transition(key: &StaticKey, on: bool) -> Result<bool, KeyError> {
    loop {
        // Pairs as in `StaticKey::inc`.
        let v = key.enabled.load(Ordering::Acquire);
        match (on, v) {
            (true, v) if v > 0 => return Ok(false),
            (true, _) => {
                // 0: no lock-free path changes a count that is not positive.
                key.enabled.store(-1, Ordering::Relaxed);
                return Ok(true);
            }
            (false, 0) => return Ok(false),
            (false, 1) => {
                // AcqRel: partners as in `StaticKey::dec`.
                if key.enabled.compare_exchange(1, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return Ok(true);
                } // a lock-free inc() made it 2: look again
            }
            (false, count) => return Err(KeyError::Shared { key: key.name().to_string(), count }),
        }
    }
}

/// Undoes [`begin_transition`] for keys whose flip did not happen.
fn rollback(moving: &[(&StaticKey, bool)]) {
    for &(key, on) in moving {
        // The count before the transition, nothing patched: pairs with the
        // Acquire loads of `is_enabled` and the lock-free paths.
        key.enabled.store(if on { 0 } else { 1 }, Ordering::Release);
    }
}

fn find_locked<'r>(reg: &'r Registry, name: &str) -> Result<&'r registry::KeyRec, KeyError> {
    let mut found = Vec::new();
    for t in reg.tables() {
        for k in t.keys.iter().filter(|k| k.name == name) {
            found.push((t, k));
        }
    }
    match found.len() {
        0 => Err(KeyError::NotFound { name: name.to_string() }),
        1 => Ok(found[0].1),
        _ => Err(KeyError::Ambiguous {
            name: name.to_string(),
            objects: found.iter().map(|f| f.0.path.clone()).collect(),
        }),
    }
}

// ------------------------------------------------------------------ listing

/// One key of the process, as [`list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub name: String,
    pub enabled: bool,
    /// Reference count (0 disabled).
    pub count: i32,
    pub default_enabled: bool,
    /// Number of branch sites on the key.
    pub sites: usize,
    /// The object (executable or library) that defines it.
    pub object: PathBuf,
    /// The key's address.
    pub addr: usize,
    /// Why the key cannot be flipped, if it cannot (malformed records in its
    /// object, or an earlier flip that failed part-way).
    pub problem: Option<String>,
}

/// Every key of every loaded object, sorted by object and name.
pub fn list() -> Result<Vec<KeyInfo>, KeyError> {
    locked(|reg, pins| {
        sync_locked(reg, pins, || "(listing)".to_string())?;
        let mut out = Vec::new();
        for t in reg.tables() {
            for k in &t.keys {
                // SAFETY: the object is pinned until after the lock is released.
                // Pairs as in `StaticKey::is_enabled`.
                let count = unsafe { k.key() }.enabled.load(Ordering::Acquire);
                let problem = if !t.bad.is_empty() {
                    Some(format!("malformed records in {}: {}", t.path.display(), t.bad.join("; ")))
                } else if k.poisoned {
                    Some("an earlier flip failed part-way".to_string())
                } else {
                    None
                };
                out.push(KeyInfo {
                    name: k.name.clone(),
                    enabled: count > 0,
                    count: count.max(0),
                    default_enabled: k.default_enabled,
                    sites: k.sites.len(),
                    object: t.path.clone(),
                    addr: k.addr,
                    problem,
                });
            }
        }
        out.sort_by(|a, b| (&a.object, &a.name, a.addr).cmp(&(&b.object, &b.name, b.addr)));
        Ok(out)
    })
}

/// One branch site of a key, as [`sites_of`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchSite {
    /// Address of the instruction (5 bytes on x86-64, 4 on aarch64).
    pub addr: usize,
    /// Where its JMP goes (the branch's label).
    pub target: usize,
    /// Whether it belongs to a `static_branch_likely!`.
    pub likely: bool,
    /// The bytes there now.
    pub bytes: crate::arch::SiteInsn,
    /// The bytes the key's state calls for (NOP or JMP).
    pub expected: crate::arch::SiteInsn,
}

/// The branch sites of `key`, with the bytes they hold now.
pub fn sites_of(key: &StaticKey) -> Result<Vec<BranchSite>, KeyError> {
    locked(|reg, pins| {
        sync_locked(reg, pins, || names([key]))?;
        let Some((_, rec)) = reg.key(key.addr()) else {
            return Err(KeyError::Unregistered { key: key.name().to_string(), addr: key.addr() });
        };
        let enabled = key.is_enabled();
        Ok(rec
            .sites
            .iter()
            .map(|s| {
                let mut bytes = crate::arch::SiteInsn::default();
                for (i, b) in bytes.iter_mut().enumerate() {
                    // SAFETY: the site lies in an executable segment of its
                    // pinned object; single-byte volatile loads are never torn
                    // by a concurrent patch (there is none: we hold the lock).
                    *b = unsafe { ((s.addr + i) as *const u8).read_volatile() };
                }
                let target = match crate::arch::emulation_for(s.addr, &s.jmp) {
                    Some(crate::arch::Emulation::Jmp { target }) => target,
                    _ => unreachable!("SiteRec::jmp is encode_jmp's"),
                };
                BranchSite { addr: s.addr, target, likely: s.likely, bytes, expected: s.bytes(enabled) }
            })
            .collect())
    })
}

/// The key of this exact name, in whichever loaded object defines it.
pub fn find(name: &str) -> Result<KeyInfo, KeyError> {
    let all = list()?;
    let mut hits: Vec<KeyInfo> = all.into_iter().filter(|k| k.name == name).collect();
    match hits.len() {
        0 => Err(KeyError::NotFound { name: name.to_string() }),
        1 => Ok(hits.remove(0)),
        _ => Err(KeyError::Ambiguous { name: name.to_string(), objects: hits.into_iter().map(|k| k.object).collect() }),
    }
}
