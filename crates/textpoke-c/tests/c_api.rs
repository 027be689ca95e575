//! The C API, from C: `tests/c/keys_test.c` built with gcc (and clang when
//! installed), optimised and not, linked against `libtextpoke_c.a` and
//! against `libtextpoke_c.so`, each run with `tests/c/libckeys.c` built as a
//! shared library for its dlopen part. And C keys flipped from Rust.

use std::path::{Path, PathBuf};
use std::process::Command;

use textpoke::keys::{self, Update};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where cargo put `libtextpoke_c.{a,so}` for this test run: next to the
/// test binary, in `target/<profile>/deps/` (a `cargo build` also copies
/// them one level up).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let found = [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|d| d.join("libtextpoke_c.a").exists() && d.join("libtextpoke_c.so").exists())
        .map(Path::to_path_buf);
    found.unwrap_or_else(|| panic!("libtextpoke_c.a/.so not built next to {exe:?}"))
}

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("textpoke-c-tests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// gcc, and a clang if one is installed.
fn compilers() -> Vec<&'static str> {
    let mut v = vec!["gcc"];
    let found = |cc: &str| Command::new(cc).arg("--version").output().is_ok_and(|o| o.status.success());
    if let Some(clang) = ["clang", "clang-16", "clang-17", "clang-18", "clang-19", "clang-15", "clang-14"]
        .into_iter()
        .find(|cc| found(cc))
    {
        v.push(clang);
    }
    v
}

fn cc(compiler: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(compiler)
        .arg("-I")
        .arg(crate_dir().join("include"))
        .args(["-Wall", "-Werror", "-std=gnu11"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(out.status.success(), "{compiler} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn c_file(name: &str) -> PathBuf {
    crate_dir().join("tests/c").join(name)
}

fn build_lib(compiler: &str) -> PathBuf {
    let so = out_dir().join(format!("libckeys-{compiler}.so"));
    cc(
        compiler,
        &[
            "-O2".as_ref(),
            "-fPIC".as_ref(),
            "-shared".as_ref(),
            "-o".as_ref(),
            so.as_os_str(),
            c_file("libckeys.c").as_os_str(),
        ],
    );
    so
}

#[derive(Clone, Copy, Debug)]
enum Link {
    Static,
    Shared,
}

fn build_test(compiler: &str, opt: &str, link: Link) -> PathBuf {
    let exe = out_dir().join(format!("keys_test-{compiler}{opt}-{link:?}"));
    let lib = lib_dir();
    let mut args: Vec<std::ffi::OsString> =
        vec![opt.into(), "-o".into(), exe.clone().into(), c_file("keys_test.c").into()];
    match link {
        Link::Static => {
            args.push(lib.join("libtextpoke_c.a").into());
            // Export textpoke_* to the library loaded with dlopen.
            args.extend(["-rdynamic", "-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s"].map(Into::into));
        }
        Link::Shared => {
            args.push(format!("-L{}", lib.display()).into());
            args.push(format!("-Wl,-rpath,{}", lib.display()).into());
            args.extend(["-ltextpoke_c", "-lpthread", "-ldl"].map(Into::into));
        }
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    cc(compiler, &refs);
    exe
}

fn run(exe: &Path, lib: &Path) {
    let out = Command::new(exe).arg(lib).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().last() == Some("ok"),
        "{exe:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn c_program_with_the_static_library() {
    for compiler in compilers() {
        let lib = build_lib(compiler);
        for opt in ["-O2", "-O0"] {
            run(&build_test(compiler, opt, Link::Static), &lib);
        }
    }
}

#[test]
fn c_program_with_the_shared_library() {
    for compiler in compilers() {
        let lib = build_lib(compiler);
        for opt in ["-O2", "-O0"] {
            run(&build_test(compiler, opt, Link::Shared), &lib);
        }
    }
}

#[test]
fn c_keys_flipped_from_rust() {
    let so = build_lib("gcc");
    let c = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // RTLD_LAZY: lib_set's textpoke_* references stay unresolved (this
    // process does not export them); only lib_branch/lib_likely are called.
    // SAFETY: a valid path; the library has no constructors.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY) };
    assert!(!h.is_null());
    let sym = |n: &str| {
        let n = std::ffi::CString::new(n).unwrap();
        // SAFETY: valid handle and name; the symbols are `int f(void)`.
        let p = unsafe { libc::dlsym(h, n.as_ptr()) };
        assert!(!p.is_null());
        // SAFETY: a non-null address of such a function (above).
        unsafe { std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> i32>(p) }
    };
    let (branch, likely) = (sym("lib_branch"), sym("lib_likely"));
    assert_eq!((branch(), likely()), (0, 1));
    let k = keys::find("lib_key").unwrap();
    assert_eq!((k.enabled, k.default_enabled, k.sites), (false, false, 1));
    assert_eq!(k.object, so);
    let st = Update::new().enable_named("lib_key").disable_named("lib_true").commit().unwrap();
    assert_eq!((st.keys_changed, st.sites_patched), (2, 2));
    assert_eq!((branch(), likely()), (1, 0));
    Update::new().disable_named("lib_key").enable_named("lib_true").commit().unwrap();
    assert_eq!((branch(), likely()), (0, 1));
    // SAFETY: our handle.
    assert_eq!(unsafe { libc::dlclose(h) }, 0);
    assert!(matches!(keys::find("lib_key"), Err(keys::KeyError::NotFound { .. })));
}

#[test]
fn status_codes_match_the_header() {
    let header = std::fs::read_to_string(crate_dir().join("include/textpoke.h")).unwrap();
    for (name, value) in [
        ("TEXTPOKE_OK", textpoke_c::TEXTPOKE_OK),
        ("TEXTPOKE_EMISUSE", textpoke_c::TEXTPOKE_EMISUSE),
        ("TEXTPOKE_ENOTFOUND", textpoke_c::TEXTPOKE_ENOTFOUND),
        ("TEXTPOKE_EAMBIGUOUS", textpoke_c::TEXTPOKE_EAMBIGUOUS),
        ("TEXTPOKE_EPATCH", textpoke_c::TEXTPOKE_EPATCH),
        ("TEXTPOKE_EAGAIN", textpoke_c::TEXTPOKE_EAGAIN),
        ("TEXTPOKE_EBROKEN", textpoke_c::TEXTPOKE_EBROKEN),
        ("TEXTPOKE_EINVAL", textpoke_c::TEXTPOKE_EINVAL),
        ("TEXTPOKE_EINTERNAL", textpoke_c::TEXTPOKE_EINTERNAL),
    ] {
        assert!(header.contains(&format!("{name} = {value}")), "{name} = {value} in textpoke.h");
    }
}

#[test]
fn keys_of_an_object_with_bad_records_are_refused_and_nothing_is_patched() {
    let so = out_dir().join("libbadrecords.so");
    cc(
        "gcc",
        &[
            "-O2".as_ref(),
            "-fPIC".as_ref(),
            "-shared".as_ref(),
            "-o".as_ref(),
            so.as_os_str(),
            c_file("badrecords.c").as_os_str(),
        ],
    );
    let c = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the library has no constructors.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
    assert!(!h.is_null());
    let n = std::ffi::CString::new("bad_branch").unwrap();
    // SAFETY: valid handle and name; `int bad_branch(void)`.
    let branch: extern "C" fn() -> i32 = unsafe { std::mem::transmute(libc::dlsym(h, n.as_ptr())) };
    assert_eq!(branch(), 0);

    let k = keys::find("bad_key").unwrap();
    let problem = k.problem.expect("the key's object is reported as malformed");
    assert!(problem.contains("compiled in as a jmp"), "{problem}");
    assert!(problem.contains("type 9"), "{problem}");

    let e = Update::new().enable_named("bad_key").commit().unwrap_err();
    assert!(matches!(e, keys::KeyError::BadObject { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("bad_key") && msg.contains("libbadrecords.so") && msg.contains("nothing was patched"),
        "{msg}"
    );
    assert_eq!(branch(), 0, "nothing patched");
    assert!(!keys::find("bad_key").unwrap().enabled, "the count was restored");
    // SAFETY: our handle.
    assert_eq!(unsafe { libc::dlclose(h) }, 0);
}
