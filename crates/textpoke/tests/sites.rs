//! Tests of `textpoke::sites` on shared libraries built here with gcc/g++ from
//! `tests/fixtures/`, once per flag set, dlopened into the test process.
//!
//! The fixture library defines four C functions (one static) and one C++
//! function; every test checks the exact set of names found, each entry
//! against `dlsym`, the NOP bytes, and that the sites go away after dlclose.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// `endbr64`, which `-fcf-protection` puts at a function's entry (spelled
/// out here: the test checks the library's knowledge of it).
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

use textpoke::sites::{
    scan_object, NopForm, ObjectSites, Objects, Pad, RecordSource, Site, SiteKind, SiteTable, SitesError, SkipReason,
};

/// dlopen/dlclose and byte patching tests run one at a time: a rescan in one
/// test pins (briefly holds loaded) the libraries of the others, which would
/// make "gone after dlclose" racy.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// The functions of the fixture, demangled.
const NAMES: [&str; 5] = ["tp_add", "tp_mul", "tp_call_hidden", "tp_hidden", "tp::scale(int, double)"];

/// How a fixture library is compiled and linked.
struct Flags<'a> {
    /// For both compilers.
    cflags: &'a [&'a str],
    /// For the link.
    ldflags: &'a [&'a str],
}

const PIC: &[&str] = &["-fPIC"];

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Build the fixture library `lib<tag>.so` with `flags`; returns its path.
fn build(tag: &str, flags: &Flags) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let c_obj = dir.join(format!("{tag}_c.o"));
    let cpp_obj = dir.join(format!("{tag}_cpp.o"));
    let so = dir.join(format!("lib{tag}.so"));
    run(Command::new("gcc")
        .args(["-O2", "-c", "-o"])
        .arg(&c_obj)
        .args(flags.cflags)
        .arg(Path::new(FIXTURES).join("sites_c.c")));
    run(Command::new("g++")
        .args(["-O2", "-fno-exceptions", "-fno-rtti", "-c", "-o"])
        .arg(&cpp_obj)
        .args(flags.cflags)
        .arg(Path::new(FIXTURES).join("sites_cpp.cpp")));
    run(Command::new("gcc").args(["-shared", "-o"]).arg(&so).args([&c_obj, &cpp_obj]).args(flags.ldflags));
    so
}

struct Lib {
    handle: *mut c_void,
    path: PathBuf,
}

impl Lib {
    fn open(path: &Path) -> Lib {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; the fixture has no initialisers of its own.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen {} failed", path.display());
        Lib { handle, path: path.to_owned() }
    }

    fn sym(&self, name: &str) -> usize {
        let c = CString::new(name).unwrap();
        // SAFETY: a live handle and a valid name.
        let addr = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        assert!(!addr.is_null(), "dlsym {name} failed");
        addr as usize
    }

    /// The expected entry of each fixture function.
    fn entries(&self) -> BTreeMap<&'static str, usize> {
        let hidden_ptr = self.sym("tp_hidden_ptr") as *const usize;
        // SAFETY: tp_hidden_ptr is a `int (*const)(int)` in the library.
        let hidden = unsafe { hidden_ptr.read() };
        BTreeMap::from([
            ("tp_add", self.sym("tp_add")),
            ("tp_mul", self.sym("tp_mul")),
            ("tp_call_hidden", self.sym("tp_call_hidden")),
            ("tp_hidden", hidden),
            ("tp::scale(int, double)", self.sym("_ZN2tp5scaleEid")),
        ])
    }

    fn close(self) {
        // SAFETY: a live handle, closed once; nothing of the library is used
        // after this.
        assert_eq!(unsafe { libc::dlclose(self.handle) }, 0);
    }
}

fn bytes_at(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: callers pass addresses inside the loaded fixture's code.
    (0..len).map(|i| unsafe { ((addr + i) as *const u8).read_volatile() }).collect()
}

/// Overwrite code bytes (test-only: mprotect the pages writable and back).
fn poke(addr: usize, bytes: &[u8]) {
    let page = addr & !4095;
    let len = addr + bytes.len() - page;
    // SAFETY: the range is code of the loaded fixture; no thread runs it.
    unsafe {
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        assert_eq!(libc::mprotect(page as *mut c_void, len, prot), 0);
        for (i, b) in bytes.iter().enumerate() {
            ((addr + i) as *mut u8).write_volatile(*b);
        }
        let prot = libc::PROT_READ | libc::PROT_EXEC;
        assert_eq!(libc::mprotect(page as *mut c_void, len, prot), 0);
    }
}

/// What a flag set should give.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Pad { n: u8, m: u8 },
    Mcount,
}

/// Load the library at `path`, scan, check every site, dlclose, rescan and
/// check the sites are gone. Returns the object's sites.
fn check_library(path: &Path, expect: Expect) -> ObjectSites {
    let lib = Lib::open(path);
    let mut table = SiteTable::new();
    let changes = table.rescan();
    let obj = table
        .objects()
        .by_path(path)
        .unwrap_or_else(|| panic!("{} not among the loaded objects", path.display()))
        .clone();
    assert!(changes.added.contains(&obj.id));
    assert!(!obj.is_main);
    let sites = match table.object_sites(obj.id) {
        Some(Ok(s)) => s.clone(),
        other => panic!("scan of {} failed: {other:?}", path.display()),
    };
    assert!(sites.skipped.is_empty(), "unexpected skipped: {:#?}", sites.skipped);

    let names: BTreeSet<&str> = sites.sites.iter().map(|s| s.function.as_str()).collect();
    assert_eq!(names, BTreeSet::from(NAMES));
    assert_eq!(sites.sites.len(), NAMES.len(), "{:#?}", sites.sites);

    let entries = lib.entries();
    for site in &sites.sites {
        check_site(site, &entries, expect);
        assert_eq!(site.object, obj.id);
    }

    // One section, read from memory and every record checked against the
    // file's relocations.
    assert_eq!(sites.sections.len(), 1, "{:?}", sites.sections);
    let report = &sites.sections[0];
    assert_eq!(report.records, NAMES.len());
    assert!(report.from_memory);
    assert_eq!(report.cross_checked, NAMES.len());
    let section = match expect {
        Expect::Pad { .. } => "__patchable_function_entries",
        Expect::Mcount => "__mcount_loc",
    };
    assert_eq!(report.section, section);

    // The file and its relocations alone give the same sites.
    let from_file = scan_object(&obj, RecordSource::File).expect("file-only scan");
    assert_eq!(from_file.sites, sites.sites);
    assert!(!from_file.sections[0].from_memory);

    // The whole table has these sites and no errors in this process.
    let errors: Vec<_> = table.errors().map(|(o, e)| (o.path.clone(), e.to_string())).collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(table.sites().filter(|s| s.object == obj.id).count(), 5);

    // After dlclose the object and its sites are gone.
    let generation = table.generation();
    lib.close();
    let changes = table.rescan();
    assert!(changes.removed.iter().any(|o| o.id == obj.id), "not removed: {changes:?}");
    assert!(table.generation() > generation);
    assert!(table.objects().get(obj.id).is_none());
    assert!(table.objects().by_path(path).is_none());
    assert!(table.object_sites(obj.id).is_none());
    assert_eq!(table.sites().filter(|s| s.object == obj.id).count(), 0);
    sites
}

fn check_site(site: &Site, entries: &BTreeMap<&str, usize>, expect: Expect) {
    let entry = entries[site.function.as_str()];
    assert_eq!(site.entry, entry, "{site:#?}");
    let raw = if site.function.starts_with("tp::") { "_ZN2tp5scaleEid" } else { site.function.as_str() };
    assert_eq!(site.raw_symbol, raw);
    assert_eq!(site.nop_len, 5);
    let endbr = bytes_at(entry, 4) == ENDBR64;
    assert_eq!(site.nop_addr, entry + if endbr { 4 } else { 0 }, "{site:#?}");
    let nop = bytes_at(site.nop_addr, 5);
    match expect {
        Expect::Pad { n, m } => {
            let pad = Pad { start: entry - m as usize, len: n, entry_offset: m };
            assert_eq!(site.kind, SiteKind::PatchableEntry(pad), "{site:#?}");
            // gcc's pad: M one-byte NOPs before the entry, N - M after it.
            assert_eq!(bytes_at(pad.start, m as usize), vec![0x90; m as usize]);
            assert_eq!(bytes_at(site.nop_addr, (n - m) as usize), vec![0x90; (n - m) as usize]);
            assert_eq!(site.nop_form, NopForm::Split { insns: 5 });
            assert_eq!(nop, [0x90; 5]);
        }
        Expect::Mcount => {
            assert_eq!(site.kind, SiteKind::Mcount);
            assert_eq!(site.nop_form, NopForm::Single);
            assert_eq!(nop, [0x0f, 0x1f, 0x44, 0x00, 0x00]);
        }
    }
}

const MCOUNT: &[&str] = &[
    "-fno-pic", // -mnop-mcount is "not implemented for -fPIC" (nor -fPIE)
    "-pg",
    "-mfentry",
    "-mnop-mcount",
    "-mrecord-mcount",
];

fn with(base: &[&'static str], more: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(more).copied().collect()
}

#[test]
fn patchable_entry_5() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=5", "-fcf-protection=none"]);
    let path = build("pfe5", &Flags { cflags: &cflags, ldflags: &[] });
    check_library(&path, Expect::Pad { n: 5, m: 0 });
}

#[test]
fn patchable_entry_16() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=16", "-fcf-protection=none"]);
    let path = build("pfe16", &Flags { cflags: &cflags, ldflags: &[] });
    check_library(&path, Expect::Pad { n: 16, m: 0 });
}

/// A run of NOPs longer than the first chunk the scan reads is measured
/// whole (N inferred as 60, with 10 before the entry).
#[test]
fn patchable_entry_60_10() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=60,10", "-fcf-protection=none"]);
    let path = build("pfe60_10", &Flags { cflags: &cflags, ldflags: &[] });
    check_library(&path, Expect::Pad { n: 60, m: 10 });
}

#[test]
fn patchable_entry_8_3() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=8,3", "-fcf-protection=none"]);
    let path = build("pfe8_3", &Flags { cflags: &cflags, ldflags: &[] });
    check_library(&path, Expect::Pad { n: 8, m: 3 });
}

#[test]
fn patchable_entry_8_3_with_endbr64() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=8,3", "-fcf-protection=full"]);
    let path = build("pfe8_3_cet", &Flags { cflags: &cflags, ldflags: &[] });
    let sites = check_library(&path, Expect::Pad { n: 8, m: 3 });
    // Every fixture function has its address taken or is global: all start
    // with endbr64, and the NOP follows it.
    assert!(sites.sites.iter().all(|s| s.nop_addr == s.entry + 4), "{sites:#?}");
}

#[test]
fn mcount_loc() {
    let _g = serial();
    let cflags = with(MCOUNT, &["-fcf-protection=none"]);
    let path = build("mcount", &Flags { cflags: &cflags, ldflags: &[] });
    check_library(&path, Expect::Mcount);
}

#[test]
fn mcount_loc_with_endbr64() {
    let _g = serial();
    let cflags = with(MCOUNT, &["-fcf-protection=full"]);
    let path = build("mcount_cet", &Flags { cflags: &cflags, ldflags: &[] });
    let sites = check_library(&path, Expect::Mcount);
    assert!(sites.sites.iter().all(|s| s.nop_addr == s.entry + 4), "{sites:#?}");
}

/// The section's contents in the file, as stored (before relocation).
fn section_words(path: &Path, name: &str) -> Vec<u64> {
    use object::{Object, ObjectSection};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let sec = file.section_by_name(name).unwrap();
    sec.data().unwrap().chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn has_section(path: &Path, name: &str) -> bool {
    use object::Object;
    let data = std::fs::read(path).unwrap();
    object::File::parse(&*data).unwrap().section_by_name(name).is_some()
}

#[test]
fn gnu_ld_stores_values_and_rela() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=5"]);
    let path = build("pfe5_bfd", &Flags { cflags: &cflags, ldflags: &[] });
    assert!(section_words(&path, "__patchable_function_entries").iter().all(|&w| w != 0));
    check_library(&path, Expect::Pad { n: 5, m: 0 });
}

#[test]
fn relr_relocations() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=5", "-fcf-protection=none"]);
    let ldflags = ["-Wl,-z,pack-relative-relocs"];
    let path = build("pfe5_relr", &Flags { cflags: &cflags, ldflags: &ldflags });
    assert!(has_section(&path, ".relr.dyn"));
    check_library(&path, Expect::Pad { n: 5, m: 0 });
}

/// rust-lld through the toolchain's `gcc-ld/ld.lld` wrapper, if present.
fn lld_dir() -> Option<PathBuf> {
    let out = Command::new("rustc").args(["--print", "sysroot"]).output().ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let dir = Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld");
    dir.join("ld.lld").exists().then_some(dir)
}

#[test]
fn lld_leaves_zeros_and_rela_addends() {
    let _g = serial();
    let Some(dir) = lld_dir() else {
        eprintln!("SKIPPED: no rust-lld gcc-ld wrapper in the toolchain");
        return;
    };
    let cflags = with(PIC, &["-fpatchable-function-entry=5", "-fcf-protection=none"]);
    let b = format!("-B{}", dir.display());
    let ldflags = ["-fuse-ld=lld", b.as_str()];
    let path = build("pfe5_lld", &Flags { cflags: &cflags, ldflags: &ldflags });
    // lld keeps the values only in the RELA addends.
    let words = section_words(&path, "__patchable_function_entries");
    assert_eq!(words, vec![0; NAMES.len()]);
    check_library(&path, Expect::Pad { n: 5, m: 0 });
}

#[test]
fn pad_too_short_is_skipped_with_reason() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=3", "-fcf-protection=none"]);
    let path = build("pfe3", &Flags { cflags: &cflags, ldflags: &[] });
    let lib = Lib::open(&path);
    let mut objects = Objects::new();
    objects.rescan();
    let obj = objects.by_path(&path).unwrap();
    let sites = scan_object(obj, RecordSource::Auto).unwrap();
    assert!(sites.sites.is_empty(), "{:#?}", sites.sites);
    let entries = lib.entries();
    let skipped: BTreeSet<&str> = sites.skipped.iter().map(|s| s.function.as_str()).collect();
    assert_eq!(skipped, BTreeSet::from(NAMES));
    for s in &sites.skipped {
        let entry = entries[s.function.as_str()];
        assert_eq!(s.entry, Some(entry));
        assert_eq!(s.reason, SkipReason::PadTooShort { addr: entry, nops: 3 });
    }
    lib.close();
}

#[test]
fn changed_bytes_are_skipped_not_dropped() {
    let _g = serial();
    let cflags = with(MCOUNT, &["-fcf-protection=none"]);
    let path = build("changed", &Flags { cflags: &cflags, ldflags: &[] });
    let lib = Lib::open(&path);
    let target = lib.sym("tp_mul");
    let mut table = SiteTable::new();
    table.rescan();
    let id = table.objects().by_path(&path).unwrap().id;
    let before = table.object_sites(id).unwrap().unwrap().clone();
    assert_eq!(before.sites.len(), 5);

    // As if the site were already turned into a CALL.
    let call = [0xe8, 0x11, 0x22, 0x33, 0x44];
    let original = bytes_at(target, 5);
    poke(target, &call);
    let after = table.rescan_object(id).unwrap().as_ref().unwrap().clone();
    poke(target, &original);

    assert_eq!(after.sites.len(), 4);
    assert!(after.sites.iter().all(|s| s.function != "tp_mul"));
    assert_eq!(after.skipped.len(), 1, "{:#?}", after.skipped);
    let s = &after.skipped[0];
    assert_eq!(s.function, "tp_mul");
    assert_eq!(s.section, "__mcount_loc");
    assert_eq!(s.record, target);
    assert_eq!(s.entry, Some(target));
    assert_eq!(s.reason, SkipReason::UnexpectedBytes { addr: target, found: call.to_vec() });
    assert!(s.reason.to_string().contains("e8 11 22 33 44"), "{}", s.reason);

    // Restored: patchable again.
    let restored = table.rescan_object(id).unwrap().as_ref().unwrap();
    assert_eq!(restored.sites, before.sites);
    lib.close();
}

#[test]
fn missing_file_is_a_typed_error() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=5"]);
    let path = build("deleted", &Flags { cflags: &cflags, ldflags: &[] });
    let lib = Lib::open(&path);
    std::fs::remove_file(&path).unwrap();
    let mut table = SiteTable::new();
    table.rescan();
    let id = table.objects().by_path(&lib.path).unwrap().id;
    match table.object_sites(id) {
        Some(Err(SitesError::Open { path: p, .. })) => assert_eq!(p, &path),
        other => panic!("expected an Open error, got {other:?}"),
    }
    let errors: Vec<_> = table.errors().map(|(o, _)| o.id).collect();
    assert_eq!(errors, vec![id]);
    lib.close();
}

#[test]
fn replaced_file_is_refused() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=5"]);
    let path = build("replaced", &Flags { cflags: &cflags, ldflags: &[] });
    let lib = Lib::open(&path);
    // Replace the file on disk by another build (other pad size): the
    // mapping keeps the old inode, the path now names a different file.
    let cflags16 = with(PIC, &["-fpatchable-function-entry=16"]);
    let other = build("replacement", &Flags { cflags: &cflags16, ldflags: &[] });
    std::fs::rename(&other, &path).unwrap();
    let mut objects = Objects::new();
    objects.rescan();
    let obj = objects.by_path(&path).unwrap();
    match scan_object(obj, RecordSource::Auto) {
        Err(SitesError::FileMismatch { .. }) => {}
        other => panic!("expected FileMismatch, got {other:?}"),
    }
    lib.close();
}

#[test]
fn main_executable_has_no_sites() {
    let mut objects = Objects::new();
    let changes = objects.rescan();
    assert!(!changes.added.is_empty());
    let main = objects.main().expect("main executable listed");
    assert_eq!(objects.iter().next().map(|o| o.id), Some(main.id));
    assert_eq!(main.path, std::env::current_exe().unwrap());
    let sites = scan_object(main, RecordSource::Auto).expect("main executable scans");
    assert!(sites.sites.is_empty(), "{:#?}", sites.sites);
    assert!(sites.skipped.is_empty(), "{:#?}", sites.skipped);
    assert!(sites.sections.is_empty());
    // The vdso has no file and is not listed.
    assert!(objects.iter().all(|o| !o.path.to_string_lossy().contains("vdso")));
}

#[test]
fn rescan_without_change_keeps_ids() {
    let _g = serial();
    let mut objects = Objects::new();
    objects.rescan();
    let ids: Vec<_> = objects.iter().map(|o| o.id).collect();
    let generation = objects.generation();
    let changes = objects.rescan();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(objects.generation(), generation);
    assert_eq!(objects.iter().map(|o| o.id).collect::<Vec<_>>(), ids);
}

#[test]
fn unload_and_reload_between_rescans_is_flagged() {
    let _g = serial();
    let cflags = with(PIC, &["-fpatchable-function-entry=5", "-fcf-protection=none"]);
    let path = build("reload", &Flags { cflags: &cflags, ldflags: &[] });
    let mut table = SiteTable::new();
    let lib = Lib::open(&path);
    table.rescan();
    let id = table.objects().by_path(&path).unwrap().id;
    let generation = table.generation();

    // dlclose and dlopen again with no rescan in between: the key (path,
    // bias) may well be the same, but the loader counted one unload and one
    // load.
    lib.close();
    let lib = Lib::open(&path);
    let changes = table.rescan();
    assert!(changes.possibly_reloaded, "{changes:?}");
    assert!(table.generation() > generation);
    // Whatever the new bias, the table holds the reloaded object's sites.
    let obj = table.objects().by_path(&path).unwrap().clone();
    if changes.added.is_empty() {
        assert_eq!(obj.id, id, "same key keeps its id");
    }
    let sites = table.object_sites(obj.id).unwrap().unwrap();
    let entries = lib.entries();
    assert_eq!(sites.sites.len(), NAMES.len());
    for site in &sites.sites {
        check_site(site, &entries, Expect::Pad { n: 5, m: 0 });
    }

    // A later rescan with no change is quiet again.
    assert!(table.rescan().is_empty());
    lib.close();
}
