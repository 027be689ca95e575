//! Patch objects (`live::notes`, `live::object`): C patches built with gcc
//! from `tests/fixtures/live_object` against a target library and a target
//! executable built here too; the Rust `livepatch!` macro's records read
//! back from this test executable.

use std::ffi::{c_void, CString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use textpoke::live::notes::{CallbackKind, SymbolKind, TargetRef};
use textpoke::live::object::{load, ObjectError, PatchFile};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/live_object");
const INCLUDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../textpoke-c/include");

fn dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("live_object-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(args).output().expect("gcc must be installed to build the test fixtures");
    assert!(out.status.success(), "gcc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn build_id(path: &Path) -> String {
    use object::Object;
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let id = file.build_id().unwrap().expect("linked with --build-id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The target library, built once and loaded into this process.
struct Target {
    path: PathBuf,
    handle: usize,
    build_id: String,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let path = dir().join("liblp_target.so.1");
        gcc(&[
            "-O2",
            "-shared",
            "-fPIC",
            "-flive-patching=inline-clone",
            "-Wl,--build-id",
            "-Wl,-soname,liblp_target.so.1",
            "-o",
            path.to_str().unwrap(),
            &fixture("target_a.c"),
            &fixture("target_b.c"),
        ]);
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; the library has no initialiser of its own.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) } as usize;
        assert_ne!(handle, 0, "dlopen {path:?}");
        let build_id = build_id(&path);
        Target { path, handle, build_id }
    })
}

fn sym(name: &str) -> usize {
    let c = CString::new(name).unwrap();
    // SAFETY: a live handle and a C string.
    let p = unsafe { libc::dlsym(target().handle as *mut c_void, c.as_ptr()) };
    assert!(!p.is_null(), "{name} in the target library");
    p as usize
}

/// Builds patch `src` into `lib<out>.so` with `defines`.
fn patch(src: &str, out: &str, defines: &[String]) -> PathBuf {
    let so = dir().join(format!("lib{out}.so"));
    let mut args: Vec<String> = vec!["-O2".into(), "-shared".into(), "-fPIC".into(), "-Wall".into(), "-Werror".into()];
    args.extend(["-I".into(), INCLUDE.into(), "-o".into(), so.to_str().unwrap().into(), fixture(src)]);
    args.extend(defines.iter().cloned());
    gcc(&args.iter().map(String::as_str).collect::<Vec<_>>());
    so
}

fn define(name: &str, string: &str) -> String {
    format!("-D{name}=\"{string}\"")
}

/// The error of loading `path` (PatchDesc is not Debug).
fn load_err(path: &Path) -> ObjectError {
    match load(path) {
        Ok(desc) => panic!("{path:?} loaded as {} with {} functions", desc.name, desc.funcs.len()),
        Err(e) => e,
    }
}

/// Calls `extern "C" fn(i32) -> i32` at `addr`.
fn call(addr: usize, x: i32) -> i32 {
    // SAFETY: the fixtures' functions all have this signature.
    unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(addr)(x) }
}

#[test]
fn c_patch_resolves_global_and_static_targets_slots_and_callbacks() {
    let t = target();
    let so = patch("patch.c", "lp_patch", &[define("TARGET_BUILD_ID", &t.build_id)]);
    let desc = load(&so).unwrap();
    assert_eq!(desc.name, "fix-1");
    assert!(!desc.replace);
    assert!(desc.keep_alive.is_some());
    assert_eq!(desc.funcs.len(), 2);
    let outer = &desc.funcs[0];
    assert_eq!((outer.name.as_str(), outer.target), ("lp_outer", sym("lp_outer")));
    assert!(outer.target_size > 0 && outer.replacement_size > 0);
    assert_eq!(call(outer.target, 1), 202, "the original lp_outer");
    assert_eq!(call(outer.replacement, 2), 6, "outer_v2");
    let helper = &desc.funcs[1];
    assert_eq!(helper.name, "helper");
    assert_eq!(call(helper.target, 1), 101, "target_a.c's helper, not target_b.c's");
    assert_eq!(call(helper.replacement, 1), 1001);

    // The slots were filled: the callbacks use the target's variable and
    // the engine's shadow variables through them.
    let counter = sym("lp_counter") as *mut i32;
    let pre = desc.callbacks.pre_patch.expect("pre-patch callback");
    // SAFETY: the fixture's callback, with its slots filled.
    assert_eq!(unsafe { pre() }, 0);
    // SAFETY: the target's `int lp_counter`.
    assert_eq!(unsafe { counter.read_volatile() }, 42);
    let data = textpoke::live::shadow::get(counter.cast(), 7);
    assert!(!data.is_null(), "the patch's shadow variable, in the engine's table");
    // SAFETY: the ctor stored a long there.
    assert_eq!(unsafe { *data.cast::<i64>() }, 1234);
    assert!(desc.callbacks.post_patch.is_none() && desc.callbacks.pre_unpatch.is_none());
    // SAFETY: as above.
    unsafe { desc.callbacks.post_unpatch.expect("post-unpatch callback")() };
    assert!(textpoke::live::shadow::get(counter.cast(), 7).is_null(), "freed by free_all");

    // The same records, read from the file alone.
    let file = PatchFile::open(&so).unwrap();
    let n = &file.notes;
    assert_eq!(n.name.as_deref(), Some("fix-1"));
    assert!(!n.rust);
    assert_eq!(n.objects.len(), 1);
    assert_eq!(n.objects[0].object.as_deref(), Some("liblp_target.so.1"));
    assert_eq!(textpoke::live::notes::hex(&n.objects[0].build_id), t.build_id);
    assert_eq!(
        n.funcs[1].target,
        TargetRef {
            object: Some("liblp_target.so.1".into()),
            name: "helper".into(),
            file: Some("target_a.c".into()),
            sympos: 0
        }
    );
    assert!(n.symbols.iter().any(|s| s.kind == SymbolKind::Api));
    assert!(n.symbols.iter().any(|s| s.target.as_ref().is_some_and(|t| t.name == "lp_counter")));
    let kinds: Vec<_> = n.callbacks.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [CallbackKind::PrePatch, CallbackKind::PostUnpatch]);
}

#[test]
fn a_static_by_position_and_the_replace_flag() {
    target();
    let desc = load(&patch("patch_pos.c", "lp_patch_pos", &[])).unwrap();
    assert!(desc.replace);
    assert_eq!(desc.name, "liblp_patch_pos.so", "no name record: the file's name");
    assert_eq!(call(desc.funcs[0].target, 1), 201, "the second `helper`: target_b.c's");
    assert_eq!(call(desc.funcs[0].replacement, 1), 3001);
    drop(desc);

    // As the agent loads it: through a descriptor, /proc/self/fd/N.
    let file = std::fs::File::open(dir().join("liblp_patch_pos.so")).unwrap();
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)));
    let desc = load(&by_fd).unwrap();
    assert_eq!(call(desc.funcs[0].target, 1), 201);
}

#[test]
fn an_ambiguous_static_is_refused_listing_the_candidates() {
    target();
    let err = load_err(&patch("patch_ambiguous.c", "lp_patch_ambiguous", &[]));
    let msg = err.to_string();
    assert!(matches!(&err, ObjectError::Ambiguous { candidates, .. } if candidates.len() == 2), "{msg}");
    assert!(msg.contains("unresolvable ambiguity"), "{msg}");
    assert!(msg.contains("target_a.c") && msg.contains("target_b.c"), "{msg}");
}

#[test]
fn one_function_named_twice_is_refused() {
    target();
    let err = load_err(&patch("patch_twice.c", "lp_patch_twice", &[]));
    let msg = err.to_string();
    assert!(matches!(err, ObjectError::BadPatch { .. }) && msg.contains("are the same function"), "{msg}");
}

#[test]
fn a_build_id_mismatch_is_refused_showing_both_ids() {
    let t = target();
    let wrong = "00112233445566778899aabbccddeeff00112233";
    let so = patch("patch.c", "lp_patch_wrong_id", &[define("TARGET_BUILD_ID", wrong)]);
    let err = load_err(&so);
    let msg = err.to_string();
    assert!(matches!(err, ObjectError::BuildIdMismatch { .. }), "{msg}");
    assert!(msg.contains(wrong) && msg.contains(&t.build_id), "{msg}");
    assert!(msg.contains("nothing was patched"), "{msg}");
}

#[test]
fn malformed_records_are_refused() {
    let so = patch("patch_malformed.c", "lp_patch_malformed", &[]);
    for err in [load_err(&so), PatchFile::open(&so).unwrap_err()] {
        let msg = err.to_string();
        let ObjectError::Notes { error, .. } = &err else { panic!("{msg}") };
        assert_eq!(error.problem, textpoke::live::notes::NoteProblem::BadSize { expected: 24, found: 20 });
        assert!(msg.contains("LP_FUNC record #0"), "{msg}");
    }
}

#[test]
fn a_library_without_records_is_not_a_patch() {
    let err = load_err(&target().path);
    assert!(matches!(err, ObjectError::NoFunctions { .. }), "{err}");
}

/// A function of this executable that a C patch targets by name.
#[no_mangle]
#[inline(never)]
pub extern "C" fn lp_test_main_target(x: i32) -> i32 {
    std::hint::black_box(x) * 5
}

#[test]
fn targets_in_the_main_executable_are_checked_and_resolved() {
    let t = target();
    let me = build_id(Path::new("/proc/self/exe"));
    let defines = [
        define("TARGET_BUILD_ID", &t.build_id),
        define("MAIN_BUILD_ID", &me),
        "-DMAIN_FUNC=lp_test_main_target".to_string(),
    ];
    let desc = load(&patch("patch_main.c", "lp_patch_main", &defines)).unwrap();
    assert_eq!(desc.funcs[0].target, lp_test_main_target as *const () as usize);
    assert_eq!(desc.funcs[1].target, sym("lp_outer"));
}

#[test]
fn patch_file_is_checked_against_a_running_process() {
    let t = target();
    let exe = dir().join("lp_target_main");
    let lib_dir = t.path.parent().unwrap().to_str().unwrap();
    gcc(&[
        "-O2",
        "-Wl,--build-id",
        "-o",
        exe.to_str().unwrap(),
        &fixture("target_main.c"),
        &format!("-L{lib_dir}"),
        "-l:liblp_target.so.1",
        &format!("-Wl,-rpath,{lib_dir}"),
    ]);
    let mut child = Command::new(&exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "7 202", "the child runs, its library loaded");
    let pid = child.id() as i32;
    let main_id = build_id(&exe);

    let good =
        [define("TARGET_BUILD_ID", &t.build_id), define("MAIN_BUILD_ID", &main_id), "-DMAIN_FUNC=lp_main_func".into()];
    let file = PatchFile::open(&patch("patch_main.c", "lp_patch_child", &good)).unwrap();
    let found = file.check_process(pid).unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].object, None);
    assert_eq!(found[1].path, t.path);

    let wrong = "ffeeddccbbaa99887766554433221100ffeeddcc";
    let bad =
        [define("TARGET_BUILD_ID", &t.build_id), define("MAIN_BUILD_ID", wrong), "-DMAIN_FUNC=lp_main_func".into()];
    let file = PatchFile::open(&patch("patch_main.c", "lp_patch_child_bad", &bad)).unwrap();
    let msg = file.check_process(pid).unwrap_err().to_string();
    assert!(msg.contains(wrong) && msg.contains(&main_id) && msg.contains(&format!("process {pid}")), "{msg}");

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let gone = PatchFile::open(&patch("patch_main.c", "lp_patch_child", &good)).unwrap().check_process(pid);
    assert!(matches!(gone, Err(ObjectError::Process { .. })), "{gone:?}");
}

#[test]
fn a_library_is_found_by_its_soname_in_process_and_by_the_file_check() {
    // Its file name is not its SONAME, as with distributions' libraries.
    let lib = dir().join("liblp_soname.so.1.2.3");
    gcc(&[
        "-O2",
        "-shared",
        "-fPIC",
        "-Wl,--build-id",
        "-Wl,-soname,liblp_soname.so.1",
        "-o",
        lib.to_str().unwrap(),
        &fixture("soname_target.c"),
    ]);
    let open = |path: &Path| {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; the library has no initialiser.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
        assert!(!h.is_null(), "dlopen {path:?}");
        h
    };
    let h = open(&lib);
    // SAFETY: a live handle and a C string.
    let func = unsafe { libc::dlsym(h, c"lps_func".as_ptr()) } as usize;
    assert_ne!(func, 0);
    let so = patch("soname_patch.c", "lp_patch_soname", &[define("TARGET_BUILD_ID", &build_id(&lib))]);

    // In this process: the loader's name is the path dlopen was given.
    let desc = load(&so).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(desc.funcs[0].target, func);
    assert_eq!(call(desc.funcs[0].replacement, 1), 3);
    drop(desc);
    // From the file and /proc/PID/maps (this process's, as `textpoke patch`
    // reads another's).
    let file = PatchFile::open(&so).unwrap();
    let found = file.check_process(std::process::id() as i32).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].path, std::fs::canonicalize(&lib).unwrap());
    assert_eq!(found[0].object.as_deref(), Some("liblp_soname.so.1"));

    // A second file with that SONAME: ambiguous, both listed, nothing done.
    let copy = dir().join("liblp_soname_copy.so");
    std::fs::copy(&lib, &copy).unwrap();
    open(&copy);
    for err in [load_err(&so), file.check_process(std::process::id() as i32).unwrap_err()] {
        let msg = err.to_string();
        assert!(matches!(&err, ObjectError::ObjectAmbiguous { candidates, .. } if candidates.len() == 2), "{msg}");
        assert!(msg.contains("liblp_soname.so.1.2.3") && msg.contains("liblp_soname_copy.so"), "{msg}");
        assert!(msg.contains("(SONAME liblp_soname.so.1)"), "{msg}");
    }
}

/// `(address, size)` of symbol `name` in the `.symtab` of the file at `path`.
fn file_symbol(path: &Path, name: &str) -> Option<(usize, usize)> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let found = file.symbols().find(|s| s.name() == Ok(name));
    found.map(|s| (s.address() as usize, s.size() as usize))
}

fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} (binutils): {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_stripped_target_is_resolved_with_its_debug_file() {
    // cold_target.c's lpc_outer has a .cold part, which only .symtab names:
    // stripped, with the symbols in a separate file found by .gnu_debuglink.
    let d = dir().join("stripped");
    std::fs::create_dir_all(&d).unwrap();
    let (lib, debug) = (d.join("liblp_cold.so"), d.join("liblp_cold.so.debug"));
    let (lib_s, debug_s) = (lib.to_str().unwrap(), debug.to_str().unwrap());
    gcc(&[
        "-O2",
        "-shared",
        "-fPIC",
        "-flive-patching=inline-clone",
        "-Wl,--build-id",
        "-o",
        lib_s,
        &fixture("cold_target.c"),
    ]);
    run("objcopy", &["--only-keep-debug", lib_s, debug_s]);
    run("objcopy", &["--strip-all", lib_s]);
    run("objcopy", &[&format!("--add-gnu-debuglink={debug_s}"), lib_s]);
    assert_eq!(file_symbol(&lib, "lpc_outer.cold"), None, "stripped");
    let cold = file_symbol(&debug, "lpc_outer.cold").expect("gcc -O2 split lpc_outer into lpc_outer.cold");
    let c = CString::new(lib_s).unwrap();
    // SAFETY: a valid path; the library has no initialiser.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
    assert!(!h.is_null());
    // SAFETY: a live handle and a C string.
    let outer = unsafe { libc::dlsym(h, c"lpc_outer".as_ptr()) } as usize;
    let bias = outer - file_symbol(&debug, "lpc_outer").unwrap().0;

    let so = patch("cold_patch.c", "lp_cold_patch_stripped", &[define("TARGET_BUILD_ID", &build_id(&lib))]);
    let desc = load(&so).unwrap_or_else(|e| panic!("{e}"));
    let f = desc.funcs.iter().find(|f| f.name == "lpc_outer").unwrap();
    assert_eq!(f.target, outer);
    assert_eq!(f.target_fragments, [(bias + cold.0, cold.1)], "the .cold part, from the debug file");
}

// ---------------------------------------------------------------- Rust

#[inline(never)]
extern "C" fn outer_rs_v2(x: i32) -> i32 {
    x + 2
}
#[inline(never)]
extern "C" fn helper_rs_v2(x: i32) -> i32 {
    x + 3
}
extern "C" fn rs_pre() -> std::ffi::c_int {
    0
}
extern "C" fn rs_post_unpatch() {}

textpoke::livepatch! {
    name = "rust-fix",
    replace = true,
    api = LP_API,
    "lp_test_main_target" => outer_rs_v2,
    symbol MAIN_COUNTER = "lp_test_counter",
    object = "liblp_target.so.1",
    build_id = "0a1b2c",
    "helper" in "target_b.c" => helper_rs_v2,
    "helper" @ 1 => helper_rs_v2,
    pre_patch = rs_pre,
    post_unpatch = rs_post_unpatch,
}

#[no_mangle]
#[allow(non_upper_case_globals)] // the C-style name the patch gives
pub static lp_test_counter: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

#[test]
fn the_rust_macro_emits_the_same_records() {
    let file = PatchFile::open(Path::new("/proc/self/exe")).unwrap();
    let n = &file.notes;
    assert_eq!(n.name.as_deref(), Some("rust-fix"));
    assert!(n.replace && n.rust);
    assert_eq!(n.objects.len(), 1);
    assert_eq!(n.objects[0].object.as_deref(), Some("liblp_target.so.1"));
    assert_eq!(n.objects[0].build_id, [0x0a, 0x1b, 0x2c]);
    let mut bias = 0;
    textpoke_sys::loader::for_each_object(|o| {
        bias = o.bias;
        std::ops::ControlFlow::Break(())
    });
    let mut names: Vec<_> = n.funcs.iter().map(|f| (f.target.clone(), f.replacement as usize + bias)).collect();
    let lib = Some("liblp_target.so.1".to_string());
    // global_asm! blocks are emitted in no particular order.
    names.sort_by_key(|(t, _)| (t.object.clone(), t.file.clone(), t.sympos));
    assert_eq!(
        names,
        [
            (
                TargetRef { object: None, name: "lp_test_main_target".into(), file: None, sympos: 0 },
                outer_rs_v2 as *const () as usize
            ),
            (
                TargetRef { object: lib.clone(), name: "helper".into(), file: None, sympos: 1 },
                helper_rs_v2 as *const () as usize
            ),
            (
                TargetRef { object: lib, name: "helper".into(), file: Some("target_b.c".into()), sympos: 0 },
                helper_rs_v2 as *const () as usize
            ),
        ]
    );
    let api = n.symbols.iter().find(|s| s.kind == SymbolKind::Api).expect("API slot record");
    assert_eq!(api.slot as usize + bias, &LP_API as *const _ as usize);
    let counter = n.symbols.iter().find(|s| s.kind == SymbolKind::Address).expect("symbol slot record");
    assert_eq!(counter.slot as usize + bias, &MAIN_COUNTER as *const _ as usize);
    assert_eq!(counter.target.as_ref().unwrap().name, "lp_test_counter");
    assert_eq!(counter.target.as_ref().unwrap().object, None, "declared before `object =`");
    let cbs: Vec<_> = n.callbacks.iter().map(|c| (c.kind, c.func as usize + bias)).collect();
    assert_eq!(
        cbs,
        [
            (CallbackKind::PrePatch, rs_pre as *const () as usize),
            (CallbackKind::PostUnpatch, rs_post_unpatch as *const () as usize)
        ]
    );
    // Empty until a loader fills them.
    assert!(LP_API.api().is_none() && MAIN_COUNTER.addr() == 0);
    assert!(LP_API.shadow_get(std::ptr::null(), 1).is_null());
}

// ------------------------------------------------- a Rust patch, end to end

/// A Rust-ABI function of this executable, replaced by a patch built with
/// `livepatch!` below.
#[inline(never)]
pub fn rust_abi_target(x: u64) -> u64 {
    std::hint::black_box(x) + 1
}

/// This executable's symbol for `rust_abi_target` (mangled, with its hash).
fn mangled_rust_abi_target() -> String {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read("/proc/self/exe").unwrap();
    let file = object::File::parse(&*data).unwrap();
    let found = file
        .symbols()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .find(|n| format!("{:#}", rustc_demangle::demangle(n)) == "live_object::rust_abi_target");
    found.expect("rust_abi_target in this executable's .symtab")
}

/// Builds a Rust `cdylib` patch from `src` with the `textpoke` this test
/// was built against (its rlib next to this executable) and the same rustc.
fn rust_patch(src: &str, name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let rlib = std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("libtextpoke-") && n.ends_with(".rlib")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("libtextpoke-*.rlib next to the test executable");
    let rs = dir().join(format!("{name}.rs"));
    let so = dir().join(format!("lib{name}.so"));
    std::fs::write(&rs, src).unwrap();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--edition", "2021", "--crate-type", "cdylib", "--crate-name", name, "-C", "debuginfo=0", "-o"])
        .arg(&so)
        .arg("--extern")
        .arg(format!("textpoke={}", rlib.display()))
        .arg("-L")
        .arg(format!("dependency={}", deps.display()))
        .arg(&rs)
        .output()
        .expect("rustc");
    assert!(out.status.success(), "rustc failed: {}", String::from_utf8_lossy(&out.stderr));
    so
}

#[test]
fn a_rust_patch_replaces_a_rust_abi_function_and_reaches_the_engine() {
    assert_eq!(rust_abi_target(1), 2);
    let src = format!(
        r#"
use std::ffi::c_int;
use std::sync::atomic::{{AtomicI32, Ordering}};

fn abi_v2(x: u64) -> u64 {{
    x * 1000
}}

extern "C" fn pre() -> c_int {{
    let counter = COUNTER.ptr::<AtomicI32>();
    if counter.is_null() {{
        return -1;
    }}
    // SAFETY: the loader pointed the slot at the target's AtomicI32.
    unsafe {{ (*counter).store(77, Ordering::SeqCst) }};
    // SAFETY: no constructor; 8 bytes.
    let p = unsafe {{ LP.shadow_get_or_alloc(counter.cast(), 5, 8, None, std::ptr::null_mut()) }};
    if p.is_null() {{
        return -2;
    }}
    // SAFETY: 8 zeroed bytes, ours.
    unsafe {{ *p.cast::<u64>() = 99 }};
    0
}}

textpoke::livepatch! {{
    name = "rust-e2e",
    api = LP,
    symbol COUNTER = "lp_test_counter",
    build_id = "{id}",
    "{target}" => abi_v2,
    pre_patch = pre,
}}
"#,
        id = build_id(Path::new("/proc/self/exe")),
        target = mangled_rust_abi_target()
    );
    let so = rust_patch(&src, "lp_rust_patch");
    let file = PatchFile::open(&so).unwrap();
    assert!(file.notes.rust);
    let desc = load(&so).unwrap();
    assert_eq!(desc.name, "rust-e2e");
    assert_eq!(desc.funcs.len(), 1);
    assert_eq!(desc.funcs[0].target, rust_abi_target as *const () as usize);
    // SAFETY: the replacement has the target's signature (Rust ABI, same rustc).
    let v2 = unsafe { std::mem::transmute::<usize, fn(u64) -> u64>(desc.funcs[0].replacement) };
    assert_eq!(v2(5), 5000);
    // SAFETY: the patch's callback, its slots filled by load().
    assert_eq!(unsafe { desc.callbacks.pre_patch.unwrap()() }, 0, "the callback found both slots filled");
    assert_eq!(lp_test_counter.load(std::sync::atomic::Ordering::SeqCst), 77);
    let data = textpoke::live::shadow::get(&lp_test_counter as *const _ as *const c_void, 5);
    assert!(!data.is_null(), "the patch's ApiSlot reached this process's shadow table, not its own copy");
    // SAFETY: the patch stored a u64 there.
    assert_eq!(unsafe { *data.cast::<u64>() }, 99);
}
