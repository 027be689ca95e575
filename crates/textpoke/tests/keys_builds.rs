//! Builds that must keep working, and keys in libraries loaded later.
//!
//! The fixture workspace `tests/fixtures/keys-fixture` (a crate defining keys
//! and generic and inline branches, and a crate with a binary and a cdylib
//! branching on them) is built by cargo, debug and release (fat LTO,
//! `--gc-sections`), into `target/tmp/keys-fixture`; the first build of each
//! profile compiles textpoke's dependencies, later ones are incremental.
//!
//! - Each binary checks itself: defaults, flips, a key of another crate,
//!   generics, inlining, listing.
//! - Its `.note.textpoke` is retained, in a `PT_NOTE`, and needs no dynamic
//!   relocation.
//! - The cdylib works alone: a C program dlopens it and it flips its own keys.
//! - Loaded into this process with dlopen, the cdylib's keys are listed and
//!   flipped by name from here; after dlclose they are forgotten, and a
//!   reload starts from the defaults again; a loader thread dlopening and
//!   dlclosing it in a loop while flips and listings go on breaks nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object::{Object, ObjectSection, ObjectSegment};
use textpoke::keys::{self, KeyError, Update};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys-fixture")
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("keys-fixture")
}

/// Builds the fixture once per profile; returns the output directory.
fn build(release: bool) -> PathBuf {
    static DEBUG: OnceLock<PathBuf> = OnceLock::new();
    static RELEASE: OnceLock<PathBuf> = OnceLock::new();
    let cell = if release { &RELEASE } else { &DEBUG };
    cell.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--offline")
            .arg("--manifest-path")
            .arg(fixture_dir().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir())
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR");
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo");
        assert!(
            out.status.success(),
            "building the keys fixture ({}) failed:\n{}",
            if release { "release" } else { "debug" },
            String::from_utf8_lossy(&out.stderr)
        );
        target_dir().join(if release { "release" } else { "debug" })
    })
    .clone()
}

fn run_app(dir: &Path) {
    let out = Command::new(dir.join("keys-app")).output().expect("run keys-app");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("keys-app ok"),
        "keys-app failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `.note.textpoke` is in the file, allocated, inside a PT_NOTE segment, and
/// no dynamic relocation writes into it.
fn check_records(file: &Path) {
    let data = std::fs::read(file).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let sec = elf.section_by_name(".note.textpoke").unwrap_or_else(|| panic!("{file:?}: no .note.textpoke"));
    let (start, size) = (sec.address(), sec.size());
    assert!(size > 0);
    assert!(start != 0, "{file:?}: .note.textpoke is not allocated");
    let object::File::Elf64(elf64) = &elf else { panic!("not ELF64") };
    let in_note_segment = elf64.elf_program_headers().iter().any(|ph| {
        use object::read::elf::ProgramHeader;
        let e = elf64.endian();
        ph.p_type(e) == object::elf::PT_NOTE && ph.p_vaddr(e) <= start && start + size <= ph.p_vaddr(e) + ph.p_memsz(e)
    });
    assert!(in_note_segment, "{file:?}: .note.textpoke is not in a PT_NOTE segment");
    assert!(elf.segments().any(|s| s.address() <= start && start + size <= s.address() + s.size()));
    if let Some(relocs) = elf.dynamic_relocations() {
        for (off, _) in relocs {
            assert!(
                !(start..start + size).contains(&off),
                "{file:?}: dynamic relocation at {off:#x} in .note.textpoke"
            );
        }
    }
}

#[test]
fn release_binary_with_fat_lto_and_gc_sections_works() {
    let dir = build(true);
    run_app(&dir);
    check_records(&dir.join("keys-app"));
}

#[test]
fn debug_binary_works() {
    let dir = build(false);
    run_app(&dir);
    check_records(&dir.join("keys-app"));
}

/// A C program loads the cdylib and the cdylib flips its own keys.
fn cdylib_alone(release: bool) {
    let dir = build(release);
    let so = dir.join("libkeys_fixture.so");
    check_records(&so);
    // One driver per test: the debug and release tests run in parallel, and
    // running a file the other test is writing fails with ETXTBSY.
    let driver = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("keys-dlopen-driver-{}", if release { "release" } else { "debug" }));
    let out = Command::new("gcc")
        .arg("-O2")
        .arg("-o")
        .arg(&driver)
        .arg(fixture_dir().join("dlopen_driver.c"))
        .arg("-ldl")
        .output()
        .expect("gcc must be installed for the C test fixtures");
    assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(&driver).arg(&so).output().unwrap();
    assert!(
        out.status.success(),
        "{so:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn release_cdylib_works_alone() {
    cdylib_alone(true);
}

#[test]
fn debug_cdylib_works_alone() {
    cdylib_alone(false);
}

/// Serialises the tests that dlopen the fixture into this process.
static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lib_keys() -> Vec<keys::KeyInfo> {
    keys::list().unwrap().into_iter().filter(|k| k.name.starts_with("keys_fixture")).collect()
}

fn branches(lib: &common::Lib) -> u32 {
    // SAFETY: the fixture exports `uint32_t fixture_branches(void)`.
    let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(lib.sym("fixture_branches")) };
    f()
}

#[test]
fn cdylib_keys_are_flipped_from_here_and_forgotten_on_dlclose() {
    let _one = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    let so = build(true).join("libkeys_fixture.so");
    assert!(lib_keys().is_empty(), "nothing of the fixture is loaded yet");
    let lib = common::Lib::open(&so);
    let listed = lib_keys();
    let names: Vec<&str> = listed.iter().map(|k| k.name.as_str()).collect();
    for n in
        ["keys_fixture::LIB_KEY", "keys_fixture::LIB_TRUE", "keys_fixture::LIB_UNUSED", "keys_fixture_dep::DEP_KEY"]
    {
        assert!(names.contains(&n), "{n} listed: {names:?}");
    }
    for k in &listed {
        assert_eq!(k.object, so, "{} is in the library", k.name);
        assert!(k.problem.is_none(), "{k:?}");
    }
    assert_eq!(branches(&lib), 0b1010, "defaults, nothing patched at load");

    let st = Update::new()
        .enable_named("keys_fixture::LIB_KEY")
        .disable_named("keys_fixture::LIB_TRUE")
        .enable_named("keys_fixture_dep::DEP_KEY")
        .disable_named("keys_fixture_dep::DEP_TRUE")
        .commit()
        .unwrap();
    assert_eq!(st.keys_changed, 4);
    assert_eq!(st.commit.unwrap().sync_rounds, 3);
    assert_eq!(branches(&lib), 0b0101);
    let k = keys::find("keys_fixture::LIB_KEY").unwrap();
    assert!(k.enabled && k.count == 1 && k.sites >= 1);

    // Unloaded: its keys and sites are forgotten; nothing touches its memory.
    lib.close();
    assert!(lib_keys().is_empty(), "forgotten after dlclose: {:?}", lib_keys());
    let e = Update::new().enable_named("keys_fixture::LIB_KEY").commit().unwrap_err();
    assert!(matches!(e, KeyError::NotFound { .. }), "{e}");

    // Loaded again (possibly at the same address): fresh code, defaults.
    let lib = common::Lib::open(&so);
    assert_eq!(branches(&lib), 0b1010);
    assert!(!keys::find("keys_fixture::LIB_KEY").unwrap().enabled);
    Update::new().enable_named("keys_fixture::LIB_KEY").commit().unwrap();
    assert_eq!(branches(&lib), 0b1011);

    // Two copies loaded (release and debug builds): the name is ambiguous.
    let debug = common::Lib::open(&build(false).join("libkeys_fixture.so"));
    let e = Update::new().disable_named("keys_fixture::LIB_KEY").commit().unwrap_err();
    match &e {
        KeyError::Ambiguous { objects, .. } => assert_eq!(objects.len(), 2, "{e}"),
        other => panic!("expected Ambiguous, got {other}"),
    }
    assert_eq!(branches(&debug), 0b1010, "the debug copy has its own keys");
    assert_eq!(branches(&lib), 0b1011, "the ambiguous update changed nothing");
    debug.close();
    Update::new().disable_named("keys_fixture::LIB_KEY").commit().unwrap();
    assert_eq!(branches(&lib), 0b1010);
    lib.close();
    assert!(lib_keys().is_empty());
}

textpoke::define_static_key_false!(CHURN_OWN);

#[inline(never)]
fn churn_own() -> bool {
    textpoke::static_branch_unlikely!(CHURN_OWN)
}

#[test]
fn flips_and_listings_while_another_thread_loads_and_unloads_the_library() {
    let _one = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    let so = build(true).join("libkeys_fixture.so");
    let stop = Arc::new(AtomicBool::new(false));
    let loads = Arc::new(AtomicU64::new(0));
    let loader = {
        let (stop, loads, so) = (stop.clone(), loads.clone(), so.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let lib = common::Lib::open(&so);
                assert_eq!(branches(&lib) & 0b1000, 0b1000, "DEP_TRUE inlined: enabled at load");
                std::thread::sleep(Duration::from_micros(300));
                lib.close();
                loads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let (mut flipped, mut absent, mut unsettled) = (0, 0, 0);
    let start = std::time::Instant::now();
    let mut i = 0;
    while (i < 400 || loads.load(Ordering::Relaxed) < 60) && start.elapsed() < Duration::from_secs(60) {
        i += 1;
        let on = i % 2 == 0;
        match Update::new().set(&CHURN_OWN, on).set_named("keys_fixture::LIB_KEY", on).commit() {
            Ok(_) => flipped += 1,
            Err(KeyError::NotFound { .. }) => absent += 1,
            Err(KeyError::Unsettled { .. }) => unsettled += 1,
            Err(e) => panic!("flip {i}: {e}"),
        }
        if i % 10 == 0 {
            for k in keys::list().unwrap() {
                assert!(k.problem.is_none(), "{k:?}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    eprintln!(
        "churn: {} loads; {flipped} flips with the library loaded, {absent} without, {unsettled} unsettled",
        loads.load(Ordering::Relaxed)
    );
    assert!(loads.load(Ordering::Relaxed) >= 60);
    assert!(flipped > 0 && absent > 0, "both cases happened: {flipped} / {absent}");
    // Our own key is consistent, whatever happened to the library.
    CHURN_OWN.disable().unwrap();
    assert!(!churn_own());
    for s in keys::sites_of(&CHURN_OWN).unwrap() {
        assert_eq!(s.bytes, s.expected);
    }
    assert!(lib_keys().is_empty());
}
