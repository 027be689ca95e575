//! Which keys and branch sites the loaded objects hold, kept in step with
//! `dlopen`/`dlclose` (see the parent module's "Objects" section).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::path::PathBuf;

use super::notes::{self, ObjectNotes, RawSite, SITE_INIT_JMP, SITE_LIKELY};
use super::StaticKey;
use crate::arch::{self, SiteInsn, SITE_NOP};
use crate::sites::objects::loader_counters;
use crate::sites::{LoadedObject, ObjectChanges, ObjectId, Objects, Pin};

/// How many times [`Registry::sync`] lists and pins the objects before
/// giving up because libraries keep coming and going.
pub(crate) const SYNC_ATTEMPTS: u32 = 16;

/// One branch site of a key.
#[derive(Debug, Clone)]
pub(crate) struct SiteRec {
    pub addr: usize,
    /// `jmp` to the branch's label, encoded at `addr`.
    pub jmp: SiteInsn,
    /// Belongs to a `likely` branch: a JMP when the key is disabled.
    pub likely: bool,
    /// Compiled in as a JMP (the record's flag).
    pub init_jmp: bool,
}

impl SiteRec {
    /// The instruction the site holds while its key is `enabled`.
    pub fn bytes(&self, enabled: bool) -> SiteInsn {
        if enabled != self.likely {
            self.jmp
        } else {
            SITE_NOP
        }
    }
}

/// One key of an object.
#[derive(Debug)]
pub(crate) struct KeyRec {
    pub addr: usize,
    /// From the key itself, once the object was pinned (empty before).
    pub name: String,
    pub default_enabled: bool,
    /// Sorted by address.
    pub sites: Vec<SiteRec>,
    /// A commit failed after writing some of its sites.
    pub poisoned: bool,
}

impl KeyRec {
    /// The key itself.
    ///
    /// # Safety
    ///
    /// The key's object must be loaded for as long as the reference is used
    /// (pinned, or the caller holds a reference to the key).
    pub unsafe fn key<'a>(&self) -> &'a StaticKey {
        // SAFETY: `addr` was checked to be a 16-byte, 8-aligned range of a
        // writable segment of the object, where the key macros put a
        // `StaticKey`; the caller keeps the object loaded.
        unsafe { &*(self.addr as *const StaticKey) }
    }
}

/// The records of one loaded object that has any.
#[derive(Debug)]
pub(crate) struct Table {
    pub path: PathBuf,
    /// Problems with the records; nothing in this object is patched.
    pub bad: Vec<String>,
    pub keys: Vec<KeyRec>,
    /// Names and defaults were read (the object was pinned).
    resolved: bool,
}

/// Every object's keys and sites, as of the last [`Registry::sync`].
#[derive(Debug, Default)]
pub(crate) struct Registry {
    objects: Objects,
    tables: HashMap<ObjectId, Table>,
    /// Key address -> its object and its index in that object's table.
    index: HashMap<usize, (ObjectId, usize)>,
    /// Listed objects whose notes are still to be read, in the order they
    /// were listed; read once pinned (see [`Registry::sync`]).
    unread: Vec<ObjectId>,
    /// The loader's counters when the tables were last known up to date;
    /// `None` forces a rescan, as on the first sync.
    counters: Option<(u64, u64)>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Brings the tables up to date with the loaded objects and pins every
    /// object that has records, so none can be unmapped until the pins are
    /// dropped. Every pin taken, by the attempt that succeeds or by one that
    /// is retried, goes into `keep`: drop them only after the keys lock is
    /// released (dropping the last reference to a library the application
    /// dlclosed meanwhile runs its destructors, which may flip keys).
    ///
    ///  1. read the loader's load/unload counters; if they moved since the
    ///     last sync (or on the first), rescan the objects: forget the
    ///     removed ones, note the added ones as unread (all of them, if an
    ///     object may have been reloaded at the same address);
    ///  2. pin every object with records (`dlopen(RTLD_NOLOAD)`, which also
    ///     waits for a `dlopen` in progress on another thread to finish);
    ///     one that is gone already means a retry from step 1; pin every
    ///     unread object too;
    ///  3. read the counters again: if they did not move since step 1, and
    ///     the last rescan saw them too, no object was loaded or unloaded
    ///     since that rescan, so the pinned objects are the ones it listed,
    ///     with the tables built from their records; otherwise retry;
    ///  4. read the records of the unread objects, in place, under their
    ///     pins; then the names and defaults of new keys, from the (pinned)
    ///     keys.
    ///
    /// In the common case — no dlopen or dlclose since the last flip — that
    /// is two walks of the loader's list that stop at the first object, and
    /// one pin per object with keys. Without the counters (not glibc), every
    /// sync rescans twice.
    pub fn sync(&mut self, keep: &mut Vec<Pin>) -> Result<(), u32> {
        for _ in 0..SYNC_ATTEMPTS {
            let before = loader_counters();
            if before.is_none() || before != self.counters {
                let changes = self.objects.rescan();
                self.apply(&changes);
            }
            let mut lost = false;
            for id in self.tables.keys() {
                match self.objects.get(*id).map(LoadedObject::pin) {
                    Some(Ok(pin)) => keep.push(pin),
                    _ => {
                        lost = true;
                        break;
                    }
                }
            }
            if lost {
                self.counters = None; // rescan next time round
                continue;
            }
            // An unread object that cannot be pinned is gone: step 3 sees
            // the counters move (or the rescan without them sees it go) and
            // retries. Should one be listed and still fail to pin, it is not
            // read: its notes cannot be read safely, nor its keys pinned for
            // a flip.
            let unread: Vec<(ObjectId, Option<Pin>)> =
                self.unread.iter().map(|&id| (id, self.objects.get(id).and_then(|o| o.pin().ok()))).collect();
            let after = loader_counters();
            let settled = match (before, after) {
                // No object was loaded or unloaded between `before` and
                // `after`, nor between the last rescan (which read
                // `objects.counters()` in its walk) and `after`: the objects
                // pinned are the ones it listed, as it listed them.
                (Some(b), Some(a)) => a == b && self.objects.counters() == Some(a),
                _ => {
                    // This rescan runs with the objects pinned: it describes
                    // them (the notes of a listed object are those it lists).
                    let late = self.objects.rescan();
                    let unchanged = late.is_empty();
                    self.apply(&late);
                    unchanged
                }
            };
            if !settled {
                keep.extend(unread.into_iter().filter_map(|(_, pin)| pin));
                self.counters = None;
                continue;
            }
            self.counters = before;
            self.read(&unread);
            keep.extend(unread.into_iter().filter_map(|(_, pin)| pin));
            self.resolve();
            return Ok(());
        }
        Err(SYNC_ATTEMPTS)
    }

    /// Takes in what a rescan found. The first rescan lists every object as
    /// added, so all are read.
    fn apply(&mut self, changes: &ObjectChanges) {
        for gone in &changes.removed {
            self.forget(gone.id);
        }
        if changes.possibly_reloaded {
            self.tables.clear();
            self.index.clear();
            self.unread = self.objects.iter().map(|o| o.id).collect();
        } else {
            self.unread.extend_from_slice(&changes.added);
        }
    }

    /// Reads the records of the unread objects, pinned as `unread` says,
    /// and builds their tables. Only once [`sync`](Self::sync) has checked
    /// that the pinned objects are the ones listed.
    fn read(&mut self, unread: &[(ObjectId, Option<Pin>)]) {
        for (id, pin) in unread {
            let (Some(obj), Some(pin)) = (self.objects.get(*id), pin) else { continue };
            // SAFETY: `pin` holds `obj`, and `obj.notes` describes the object
            // it holds: the rescan that recorded them ran while the pin was
            // held, or saw the loader's counters equal to those read after
            // the pin was taken (see `sync`, step 3). This is what reading
            // inside a dl_iterate_phdr callback, under the loader's lock,
            // guaranteed: the bytes read are mapped, and are those of the
            // object listed.
            let notes = unsafe { notes::read_object(obj, pin) };
            if notes.is_empty() {
                continue;
            }
            let mut table = build_table(obj, notes);
            for (i, k) in table.keys.iter().enumerate() {
                if let Some((other, _)) = self.index.get(&k.addr) {
                    table.bad.push(format!("key at {:#x} is also recorded by {other}", k.addr));
                    continue;
                }
                self.index.insert(k.addr, (*id, i));
            }
            self.tables.insert(*id, table);
        }
        self.unread.clear();
    }

    fn forget(&mut self, id: ObjectId) {
        self.unread.retain(|u| *u != id);
        if let Some(t) = self.tables.remove(&id) {
            for k in &t.keys {
                if self.index.get(&k.addr).is_some_and(|(o, _)| *o == id) {
                    self.index.remove(&k.addr);
                }
            }
        }
    }

    /// Reads names and defaults of the keys of tables not yet resolved.
    /// Only with the objects pinned.
    fn resolve(&mut self) {
        for (id, table) in self.tables.iter_mut().filter(|(_, t)| !t.resolved) {
            let obj = self.objects.get(*id).expect("table of a listed object");
            resolve_table(obj, table);
            table.resolved = true;
        }
    }

    /// The key at `addr` and its object's table.
    pub fn key(&self, addr: usize) -> Option<(&Table, &KeyRec)> {
        let (id, i) = self.index.get(&addr)?;
        let t = self.tables.get(id)?;
        Some((t, &t.keys[*i]))
    }

    pub fn key_mut(&mut self, addr: usize) -> Option<&mut KeyRec> {
        let (id, i) = self.index.get(&addr)?;
        self.tables.get_mut(id).map(|t| &mut t.keys[*i])
    }

    /// Every table, in no particular order.
    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.values()
    }
}

/// Checks the records of `obj` against its segments and groups the sites by
/// key. Every problem is described in `bad`.
fn build_table(obj: &LoadedObject, notes: ObjectNotes) -> Table {
    let mut bad = notes.bad;
    let mut keys: Vec<KeyRec> = Vec::with_capacity(notes.keys.len());
    let mut slot: HashMap<usize, usize> = HashMap::new();
    let key_size = std::mem::size_of::<StaticKey>();
    for addr in notes.keys {
        let writable = obj.segment_at(addr, key_size).is_some_and(|s| s.flags & libc::PF_W != 0);
        if !writable || addr % std::mem::align_of::<StaticKey>() != 0 {
            bad.push(format!("key record points to {addr:#x}, not an aligned key in a writable segment"));
            continue;
        }
        if slot.insert(addr, keys.len()).is_some() {
            bad.push(format!("key at {addr:#x} is recorded twice"));
            continue;
        }
        keys.push(KeyRec { addr, name: String::new(), default_enabled: false, sites: Vec::new(), poisoned: false });
    }
    for s in notes.sites {
        match check_site(obj, &s) {
            Err(what) => bad.push(what),
            Ok(jmp) => match slot.get(&s.key) {
                Some(&i) => keys[i].sites.push(SiteRec {
                    addr: s.addr,
                    jmp,
                    likely: s.flags & SITE_LIKELY != 0,
                    init_jmp: s.flags & SITE_INIT_JMP != 0,
                }),
                None => bad.push(format!(
                    "branch site at {:#x} refers to a key at {:#x} that the object does not record",
                    s.addr, s.key
                )),
            },
        }
    }
    let mut seen = HashSet::new();
    for k in &mut keys {
        k.sites.sort_by_key(|s| s.addr);
        for s in &k.sites {
            if !seen.insert(s.addr) {
                bad.push(format!("branch site at {:#x} is recorded twice", s.addr));
            }
        }
    }
    Table { path: obj.path.clone(), bad, keys, resolved: false }
}

fn check_site(obj: &LoadedObject, s: &RawSite) -> Result<SiteInsn, String> {
    let exec = |a: usize, len: usize| obj.segment_at(a, len).is_some_and(|seg| seg.is_executable());
    if !exec(s.addr, SITE_NOP.len()) {
        return Err(format!("branch site at {:#x} is not in an executable segment", s.addr));
    }
    if !exec(s.target, 1) {
        return Err(format!("branch site at {:#x} jumps to {:#x}, not in an executable segment", s.addr, s.target));
    }
    if s.flags & !(SITE_LIKELY | SITE_INIT_JMP) != 0 {
        return Err(format!("branch site at {:#x} has unknown flags {:#x}", s.addr, s.flags));
    }
    arch::encode_jmp(s.addr, s.target)
        .ok_or_else(|| format!("branch site at {:#x}: its label {:#x} is out of the jump's range", s.addr, s.target))
}

/// Longest key name read.
const MAX_NAME: usize = 4096;

/// Reads each key's name and default from the key itself (the name pointer
/// is relocated by the loader, hence only once the object is pinned), and
/// checks the compiled-in form of every site against the key's default:
/// a disagreement means the records do not describe this code.
fn resolve_table(obj: &LoadedObject, table: &mut Table) {
    for k in &mut table.keys {
        // SAFETY: the object is pinned (see `Registry::sync`), and `addr`
        // was checked to hold a key in a writable segment.
        let key = unsafe { k.key() };
        k.default_enabled = key.default_enabled();
        k.name = read_name(obj, key.name_ptr() as usize).unwrap_or_else(|| format!("<key at {:#x}>", k.addr));
        for s in k.sites.iter().filter(|s| s.init_jmp != (k.default_enabled != s.likely)) {
            table.bad.push(format!(
                "branch site at {:#x} of key `{}` was compiled in as {} but the key's default is {}",
                s.addr,
                k.name,
                if s.init_jmp { "a jmp" } else { "a nop" },
                if k.default_enabled { "true" } else { "false" },
            ));
        }
    }
}

/// The NUL-terminated name at `ptr`, if it lies in a readable segment of
/// `obj` (bounded by the segment's end and [`MAX_NAME`]).
fn read_name(obj: &LoadedObject, ptr: usize) -> Option<String> {
    let seg = obj.segment_at(ptr, 1).filter(|s| s.is_readable())?;
    let end = (seg.vaddr + seg.memsz).wrapping_add(obj.bias);
    let len = (end - ptr).min(MAX_NAME);
    // SAFETY: [ptr, ptr + len) lies in a readable segment of a pinned object.
    let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    let s = CStr::from_bytes_until_nul(bytes).ok()?;
    Some(s.to_string_lossy().into_owned())
}
