//! `sites::scan_file` (the sites of an ELF file on disk, nothing loaded)
//! against `sites::scan_object` (the sites of the same file once dlopened,
//! read from memory): for every flag set and linker the site tests cover,
//! both must find the same functions, at the same link-time addresses, with
//! the same NOP forms, and skip the same records.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use textpoke::sites::{probe_file, scan_file, scan_object, NopForm, Objects, RecordSource, SkipReason};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const NAMES: [&str; 5] = ["tp_add", "tp_mul", "tp_call_hidden", "tp_hidden", "tp::scale(int, double)"];

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The fixture library built with `cflags` and linked with `ldflags`.
fn build(tag: &str, cflags: &[&str], ldflags: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-file-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let (c_obj, cpp_obj) = (dir.join(format!("{tag}_c.o")), dir.join(format!("{tag}_cpp.o")));
    let so = dir.join(format!("lib{tag}.so"));
    run(Command::new("gcc")
        .args(["-O2", "-c", "-o"])
        .arg(&c_obj)
        .args(cflags)
        .arg(Path::new(FIXTURES).join("sites_c.c")));
    run(Command::new("g++")
        .args(["-O2", "-fno-exceptions", "-fno-rtti", "-c", "-o"])
        .arg(&cpp_obj)
        .args(cflags)
        .arg(Path::new(FIXTURES).join("sites_cpp.cpp")));
    run(Command::new("gcc").args(["-shared", "-o"]).arg(&so).args([&c_obj, &cpp_obj]).args(ldflags));
    so
}

/// (function, link-time NOP address, NOP bytes).
type Found = BTreeSet<(String, usize, [u8; 5])>;

/// Scans `path` from the file, then dlopens it and scans it from memory;
/// returns both (link-time addresses).
fn both(path: &Path) -> (Found, Found, usize, usize) {
    let file = scan_file(path).unwrap();
    assert!(file.interpreter.is_none(), "a shared library has no PT_INTERP");
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the fixture has no initialisers of its own.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null());
    let mut objects = Objects::new();
    objects.rescan();
    let obj = objects.by_path(path).unwrap();
    let mem = scan_object(obj, RecordSource::Auto).unwrap();
    let from_mem: Found =
        mem.sites.iter().map(|s| (s.function.clone(), s.nop_addr - obj.bias, s.nop_form.bytes())).collect();
    let from_file: Found =
        file.sites.iter().map(|s| (s.function.clone(), s.nop_addr as usize, s.nop_form.bytes())).collect();
    let skipped = (file.skipped.len(), mem.skipped.len());
    // SAFETY: the handle from above, closed once.
    assert_eq!(unsafe { libc::dlclose(h) }, 0);
    (from_file, from_mem, skipped.0, skipped.1)
}

fn check(path: &Path, form: NopForm) {
    // The headers alone tell the same sections and record counts.
    let (probe, scan) = (probe_file(path).unwrap(), scan_file(path).unwrap());
    assert_eq!(probe.sections, scan.sections);
    assert!(probe.has_records());
    assert_eq!((probe.interpreter, probe.position_independent), (scan.interpreter, scan.position_independent));
    let (file, mem, skipped_file, skipped_mem) = both(path);
    assert_eq!(file, mem);
    assert_eq!(skipped_file, skipped_mem);
    let names: BTreeSet<&str> = file.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, BTreeSet::from(NAMES));
    assert!(file.iter().all(|(_, _, f)| *f == form.bytes()));
}

const SPLIT: NopForm = NopForm::Split { insns: 5 };

#[test]
fn gcc_pads_with_and_without_prefix_and_endbr() {
    let _g = serial();
    check(&build("f5", &["-fPIC", "-fpatchable-function-entry=5", "-fcf-protection=none"], &[]), SPLIT);
    check(&build("f8_3", &["-fPIC", "-fpatchable-function-entry=8,3", "-fcf-protection=none"], &[]), SPLIT);
    check(&build("f8_3cet", &["-fPIC", "-fpatchable-function-entry=8,3", "-fcf-protection=full"], &[]), SPLIT);
}

#[test]
fn mcount_nops_of_a_non_pic_library() {
    let _g = serial();
    let flags = ["-fno-pic", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fcf-protection=none"];
    check(&build("mc", &flags, &[]), NopForm::Single);
}

#[test]
fn relr_and_lld_relocations() {
    let _g = serial();
    let pfe = ["-fPIC", "-fpatchable-function-entry=5", "-fcf-protection=none"];
    check(&build("relr", &pfe, &["-Wl,-z,pack-relative-relocs"]), SPLIT);
    let out = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let lld = Path::new(String::from_utf8(out.stdout).unwrap().trim())
        .join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld");
    if lld.join("ld.lld").exists() {
        let b = format!("-B{}", lld.display());
        check(&build("lld", &pfe, &["-fuse-ld=lld", &b]), SPLIT);
    } else {
        eprintln!("no rust-lld gcc-ld wrapper: lld not checked");
    }
}

#[test]
fn stripped_symbols_and_executables() {
    let _g = serial();
    // .symtab stripped: the static function's pad is found through the
    // other pads' M, unnamed, in both scans.
    let so = build("stripped", &["-fPIC", "-fpatchable-function-entry=5", "-fcf-protection=none"], &["-s"]);
    let (file, mem, _, _) = both(&so);
    assert_eq!(file, mem);
    assert!(scan_file(&so).unwrap().dynsym_only);

    // An executable, PIE and not: entries at link-time addresses, the
    // interpreter named.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-file-fixtures");
    let c = dir.join("exe.c");
    std::fs::write(
        &c,
        "__attribute__((noinline)) int f(int x) { return x + 1; }\nint main(void) { return f(0) - 1; }\n",
    )
    .unwrap();
    for (tag, flags) in [("pie", &["-fPIE", "-pie"][..]), ("nopie", &["-fno-pie", "-no-pie"][..])] {
        let exe = dir.join(format!("exe-{tag}"));
        run(Command::new("gcc").args(["-O1", "-fpatchable-function-entry=5", "-o"]).arg(&exe).arg(&c).args(flags));
        let found = scan_file(&exe).unwrap();
        let probe = probe_file(&exe).unwrap();
        assert_eq!((probe.sections, probe.interpreter), (found.sections.clone(), found.interpreter.clone()));
        assert_eq!(found.position_independent, tag == "pie");
        assert!(found.interpreter.as_ref().is_some_and(|i| i.to_string_lossy().contains("ld-linux")));
        assert_eq!(found.function_names(), ["f", "main"]);
        // Without the flag: no site section, which the headers tell.
        let plain = dir.join(format!("exe-{tag}-plain"));
        run(Command::new("gcc").args(["-O1", "-o"]).arg(&plain).arg(&c).args(flags));
        let probe = probe_file(&plain).unwrap();
        assert!(probe.sections.is_empty() && !probe.has_records() && probe.interpreter.is_some(), "{probe:?}");
        let data = std::fs::read(&exe).unwrap();
        use object::{Object, ObjectSymbol};
        let file = object::File::parse(&*data).unwrap();
        for s in &found.sites {
            let sym = file.symbols().find(|y| y.name() == Ok(s.function.as_str())).unwrap();
            assert_eq!(s.entry, sym.address());
            assert_eq!(s.nop_addr, sym.address());
        }
    }
}

/// What is not an x86-64 executable or shared object is refused by the
/// headers as by a full scan.
#[test]
fn probing_refuses_what_scanning_refuses() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-file-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("not-elf.txt");
    std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
    for p in [text.as_path(), Path::new("/nonexistent/textpoke-probe")] {
        let (a, b) = (probe_file(p).unwrap_err().to_string(), scan_file(p).unwrap_err().to_string());
        assert_eq!(a, b);
    }
}

/// Hand-written `textpoke_sites` records (`tests/fixtures/traced_bad.c`:
/// bad kinds and versions, bad descriptors, bytes that are not the NOP, a
/// site outside the code): the file skips the same records, for the same
/// reasons, as memory.
#[test]
fn bad_marked_records_are_skipped_as_in_memory() {
    let _g = serial();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-file-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join("libtraced_bad.so");
    run(Command::new("gcc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(Path::new(FIXTURES).join("traced_bad.c")));
    let (file, mem, skipped_file, skipped_mem) = both(&so);
    assert_eq!(file, mem);
    assert_eq!(file.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(), ["c::good", "c::good"]);
    assert_eq!((skipped_file, skipped_mem), (6, 6));
    let c = CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the fixture has no initialisers.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null());
    let mut objects = Objects::new();
    objects.rescan();
    let obj = objects.by_path(&so).unwrap();
    let mem = scan_object(obj, RecordSource::Auto).unwrap();
    // (link-time record, the reason without its address)
    let from_mem: BTreeSet<(usize, String)> =
        mem.skipped.iter().map(|s| (s.record - obj.bias, without_addr(&s.reason))).collect();
    // SAFETY: the handle from above, closed once.
    assert_eq!(unsafe { libc::dlclose(h) }, 0);
    let from_file: BTreeSet<(usize, String)> =
        scan_file(&so).unwrap().skipped.iter().map(|s| (s.record as usize, without_addr(&s.reason))).collect();
    assert_eq!(from_file, from_mem);
    assert_eq!(from_file.len(), 6, "{from_file:#?}");
}

fn without_addr(r: &SkipReason) -> String {
    match r {
        SkipReason::BadRecord { what, .. } => format!("record: {what}"),
        SkipReason::BadDescriptor { what, .. } => format!("descriptor: {what}"),
        SkipReason::UnexpectedBytes { found, .. } => format!("bytes: {found:02x?}"),
        SkipReason::NotInCode { .. } => "not in code".to_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn not_elf_and_missing_files_are_errors() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-file-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let e = scan_file(&script).unwrap_err().to_string();
    assert!(e.contains("not an ELF file"), "{e}");
    let e = scan_file(&dir.join("missing")).unwrap_err().to_string();
    assert!(e.contains("cannot open"), "{e}");
}

#[textpoke::traced]
fn traced_here(x: u64) -> u64 {
    std::hint::black_box(x) * 3
}

#[test]
fn traced_rust_functions_of_this_test_binary() {
    assert_eq!(traced_here(2), 6);
    let exe = std::env::current_exe().unwrap();
    let file = scan_file(&exe).unwrap();
    let mine: BTreeSet<(String, usize, Option<textpoke::sites::MarkedPoint>)> = file
        .sites
        .iter()
        .filter(|s| s.function.ends_with("traced_here"))
        .map(|s| (s.function.clone(), s.nop_addr as usize, s.marked))
        .collect();
    assert!(mine.len() >= 2, "an entry and an exit site: {mine:?}");
    let mut objects = Objects::new();
    objects.rescan();
    let main = objects.main().unwrap();
    let mem = scan_object(main, RecordSource::Auto).unwrap();
    let in_mem: BTreeSet<(String, usize, Option<textpoke::sites::MarkedPoint>)> = mem
        .sites
        .iter()
        .filter(|s| s.function.ends_with("traced_here"))
        .map(|s| {
            let point = match s.kind {
                textpoke::sites::SiteKind::Marked(m) => Some(m.point),
                _ => None,
            };
            (s.function.clone(), s.nop_addr - main.bias, point)
        })
        .collect();
    assert_eq!(mine, in_mem);
    assert!(mine.iter().all(|(n, _, _)| n == "sites_file::traced_here"), "{mine:?}");
}
