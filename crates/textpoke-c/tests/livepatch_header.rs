//! The live-patching part of `textpoke.h`: a two-file C patch (both files
//! using the shadow functions, so both emitting the API slot) built with
//! gcc and clang, as C and as C++, optimised and not, with `-Wall
//! -Werror`; loaded with `textpoke::live::object::load`, its pre-patch
//! callback reaches the engine's shadow variables through the one slot.
//!
//! x86-64 only: `textpoke::live` is (its fixtures are host objects too).
#![cfg(target_arch = "x86_64")]

use std::ffi::{c_void, CString, OsStr};
use std::path::{Path, PathBuf};
use std::process::Command;

use textpoke::live::notes::SymbolKind;
use textpoke::live::object::{load, PatchFile};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("textpoke-c-livepatch-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(compiler: &str, args: &[&OsStr]) {
    let out = Command::new(compiler).args(args).output().unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(out.status.success(), "{compiler} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn installed(cc: &str) -> bool {
    Command::new(cc).arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn a_c_patch_builds_loads_and_uses_shadow_variables() {
    let dir = out_dir();
    let c = |n: &str| crate_dir().join("tests/c").join(n);
    let target = dir.join("liblp_c_target.so");
    run(
        "gcc",
        &[
            "-O2".as_ref(),
            "-shared".as_ref(),
            "-fPIC".as_ref(),
            "-o".as_ref(),
            target.as_os_str(),
            c("lp_target.c").as_os_str(),
        ],
    );
    let ct = CString::new(target.to_str().unwrap()).unwrap();
    // SAFETY: a valid path to a library without initialisers.
    let handle = unsafe { libc::dlopen(ct.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null());
    // SAFETY: a live handle and C strings.
    let (target_fn, value) =
        unsafe { (libc::dlsym(handle, c"lp_c_target".as_ptr()), libc::dlsym(handle, c"lp_c_value".as_ptr())) };
    assert!(!target_fn.is_null() && !value.is_null());

    let mut builds = vec![("gcc", "c", "-O0"), ("gcc", "c", "-O2"), ("g++", "c++", "-O2")];
    if installed("clang") {
        builds.extend([("clang", "c", "-O0"), ("clang", "c", "-O2")]);
    }
    for (i, (cc, lang, opt)) in builds.into_iter().enumerate() {
        let so = dir.join(format!("liblp_c_patch{i}.so"));
        let include = crate_dir().join("include");
        run(
            cc,
            &[
                "-x".as_ref(),
                lang.as_ref(),
                opt.as_ref(),
                "-Wall".as_ref(),
                "-Wextra".as_ref(),
                "-Werror".as_ref(),
                "-shared".as_ref(),
                "-fPIC".as_ref(),
                "-I".as_ref(),
                include.as_os_str(),
                "-o".as_ref(),
                so.as_os_str(),
                c("lp_patch_a.c").as_os_str(),
                c("lp_patch_b.c").as_os_str(),
            ],
        );
        let what = format!("{cc} {lang} {opt}");
        let file = PatchFile::open(&so).unwrap_or_else(|e| panic!("{what}: {e}"));
        let apis = file.notes.symbols.iter().filter(|s| s.kind == SymbolKind::Api).count();
        assert_eq!(apis, 1, "{what}: one API slot for both files");
        assert_eq!(file.notes.name.as_deref(), Some("c-header-test"));

        let desc = load(&so).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(desc.funcs.len(), 1);
        assert_eq!(desc.funcs[0].target, target_fn as usize, "{what}");
        // SAFETY: the replacement has the target's signature.
        let v2 = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(desc.funcs[0].replacement) };
        assert_eq!(v2(3), 30, "{what}");
        // SAFETY: the fixture's callbacks, slots filled by load().
        assert_eq!(unsafe { desc.callbacks.pre_patch.unwrap()() }, 0, "{what}: pre-patch callback");
        let data = textpoke::live::shadow::get(value as *const c_void, 99);
        assert!(!data.is_null(), "{what}");
        // SAFETY: the patch stored a long there (lp_c_value + 1).
        assert_eq!(unsafe { *data.cast::<i64>() }, 6, "{what}: both files reached the same variable");
        // SAFETY: as above.
        unsafe { desc.callbacks.post_unpatch.unwrap()() };
        assert!(textpoke::live::shadow::get(value as *const c_void, 99).is_null(), "{what}");
    }
}
