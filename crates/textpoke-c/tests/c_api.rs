//! The C API, from C: `tests/c/keys_test.c` built with gcc (and clang when
//! installed), optimised and not, linked against `libtextpoke_c.a` and
//! against `libtextpoke_c.so`, each run with `tests/c/libckeys.c` built as a
//! shared library for its dlopen part. And C keys flipped from Rust, and a
//! disabled key's cost read from the disassembly: one NOP.
//!
//! Cross-built (`.ci/aarch64`, the tests running under qemu-aarch64), the
//! C side follows three variables: `TEXTPOKE_C_TEST_CC`, the compilers
//! (comma-separated commands with their arguments, such as
//! `aarch64-linux-gnu-gcc,clang --target=aarch64-linux-gnu`; the first is
//! the one for single-compiler tests), `TEXTPOKE_C_TEST_RUNNER`, the
//! command the built programs run under (`qemu-aarch64`), and
//! `TEXTPOKE_C_TEST_OBJDUMP` (`aarch64-linux-gnu-objdump`). Unset, they
//! are gcc and a clang if installed, nothing, and `objdump`.

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

/// `TEXTPOKE_C_TEST_CC`'s compilers (module docs); else gcc, and a clang
/// if one is installed.
fn compilers() -> Vec<String> {
    if let Ok(list) = std::env::var("TEXTPOKE_C_TEST_CC") {
        return list.split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect();
    }
    let mut v = vec!["gcc".to_string()];
    let found = |cc: &str| Command::new(cc).arg("--version").output().is_ok_and(|o| o.status.success());
    if let Some(clang) = ["clang", "clang-16", "clang-17", "clang-18", "clang-19", "clang-15", "clang-14"]
        .into_iter()
        .find(|cc| found(cc))
    {
        v.push(clang.to_string());
    }
    v
}

/// The compiler of single-compiler tests.
fn first_compiler() -> String {
    compilers().swap_remove(0)
}

/// A command line (a program and its arguments, split at spaces).
fn command(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let mut c = Command::new(words.next().expect("an empty command"));
    c.args(words);
    c
}

/// A compiler's command as a file name part.
fn file_part(compiler: &str) -> String {
    compiler.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn cc(compiler: &str, args: &[&std::ffi::OsStr]) {
    let out = command(compiler)
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
    let so = out_dir().join(format!("libckeys-{}.so", file_part(compiler)));
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
    let exe = out_dir().join(format!("keys_test-{}{opt}-{link:?}", file_part(compiler)));
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
    let mut c = match std::env::var("TEXTPOKE_C_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut c = command(&runner);
            c.arg(exe);
            c
        }
        _ => Command::new(exe),
    };
    // The program finds libtextpoke_c.so by its RUNPATH (lib_dir()); cargo's
    // LD_LIBRARY_PATH for tests would win over it and may name
    // target/<profile>/, where an older `cargo build` left an older copy.
    let out = c.arg(lib).env_remove("LD_LIBRARY_PATH").output().unwrap();
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
        let lib = build_lib(&compiler);
        for opt in ["-O2", "-O0"] {
            run(&build_test(&compiler, opt, Link::Static), &lib);
        }
    }
}

#[test]
fn c_program_with_the_shared_library() {
    for compiler in compilers() {
        let lib = build_lib(&compiler);
        for opt in ["-O2", "-O0"] {
            run(&build_test(&compiler, opt, Link::Shared), &lib);
        }
    }
}

#[test]
fn c_keys_flipped_from_rust() {
    let so = build_lib(&first_compiler());
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
        &first_compiler(),
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

/// One disassembled instruction: address, raw bytes, mnemonic and operands.
#[derive(Debug, Clone, PartialEq)]
struct Insn {
    addr: u64,
    bytes: Vec<u8>,
    text: String,
}

fn objdump(args: &[&str], file: &Path) -> String {
    let tool = std::env::var("TEXTPOKE_C_TEST_OBJDUMP").unwrap_or_else(|_| "objdump".into());
    let out = command(&tool).args(args).arg(file).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The instructions of `function` in `objdump -d` output. A line is
/// `ADDR:\tBYTES\tTEXT`; x86's long encodings continue on lines without
/// text, which add their bytes. The bytes are as objdump shows them: x86's
/// one by one, aarch64's as one little-endian word.
fn disassembly(dump: &str, function: &str) -> Vec<Insn> {
    let head = format!("<{function}>:");
    let mut insns: Vec<Insn> = Vec::new();
    for line in dump.lines().skip_while(|l| !l.ends_with(&head)).skip(1) {
        if line.trim().is_empty() {
            break;
        }
        let mut fields = line.split('\t');
        let (Some(addr), Some(hex)) = (fields.next(), fields.next()) else { continue };
        let Ok(addr) = u64::from_str_radix(addr.trim().trim_end_matches(':'), 16) else { continue };
        let mut bytes = Vec::new();
        for h in hex.split_whitespace() {
            let v = u64::from_str_radix(h, 16).unwrap();
            bytes.extend_from_slice(&v.to_le_bytes()[..h.len() / 2]);
        }
        match fields.next().map(|t| t.split_whitespace().collect::<Vec<_>>().join(" ")) {
            Some(text) => insns.push(Insn { addr, bytes, text }),
            None => insns.last_mut().expect("a continuation line first").bytes.extend(bytes),
        }
    }
    assert!(!insns.is_empty(), "{function} not found in the disassembly");
    insns
}

/// The instructions run from the entry when no branch is taken: up to the
/// first return.
fn fall_through(insns: &[Insn]) -> &[Insn] {
    let ret = insns.iter().position(|i| i.text.starts_with("ret")).expect("a return");
    &insns[..=ret]
}

/// The branch records (note type 1) of `.note.textpoke`: each site's
/// address, from `objdump -s` (`ADDR WORD WORD WORD WORD  ascii`).
fn site_records(dump: &str) -> Vec<u64> {
    let mut start = None;
    let mut bytes = Vec::new();
    for line in dump.lines().skip_while(|l| !l.contains("section .note.textpoke")).skip(1) {
        let mut words = line.split_whitespace();
        let Some(Ok(addr)) = words.next().map(|a| u64::from_str_radix(a, 16)) else { break };
        start.get_or_insert(addr);
        // Up to four groups of hex digits; the ascii column follows.
        for w in words.take(4).take_while(|w| w.len() % 2 == 0 && w.chars().all(|c| c.is_ascii_hexdigit())) {
            bytes.extend((0..w.len()).step_by(2).map(|i| u8::from_str_radix(&w[i..i + 2], 16).unwrap()));
        }
    }
    let start = start.expect("a .note.textpoke section");
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let mut sites = Vec::new();
    let mut off = 0;
    while off + 12 <= bytes.len() {
        let (namesz, descsz, kind) = (u32_at(off) as usize, u32_at(off + 4) as usize, u32_at(off + 8));
        let desc = off + 12 + namesz.div_ceil(4) * 4;
        if kind == 1 {
            sites.push((start + desc as u64).wrapping_add(u32_at(desc) as i32 as i64 as u64));
        }
        off = desc + descsz.div_ceil(4) * 4;
    }
    sites
}

/// The NOP a disabled site is (textpoke's SITE_NOP for this target).
fn site_nop() -> Vec<u8> {
    textpoke::arch::SITE_NOP.to_vec()
}

#[test]
fn a_disabled_key_costs_one_nop_in_the_disassembly() {
    for compiler in compilers() {
        let so = out_dir().join(format!("libcost-{}.so", file_part(&compiler)));
        let args = ["-O2", "-fPIC", "-shared", "-o"].map(std::ffi::OsStr::new);
        cc(&compiler, &[&args[..], &[so.as_os_str(), c_file("cost.c").as_os_str()]].concat());
        let dump = objdump(&["-d"], &so);
        let keyed = disassembly(&dump, "cost_keyed");
        let plain = disassembly(&dump, "cost_plain");
        let (keyed, plain) = (fall_through(&keyed), fall_through(&plain));
        // Exactly one NOP on the path, textpoke's site form, and the record's site.
        let nops: Vec<&Insn> = keyed.iter().filter(|i| i.text.starts_with("nop")).collect();
        assert_eq!(nops.len(), 1, "{compiler}: one NOP on the disabled path: {keyed:#?}");
        assert_eq!(nops[0].bytes, site_nop(), "{compiler}: the site's NOP: {keyed:#?}");
        assert_eq!(site_records(&objdump(&["-s", "-j", ".note.textpoke"], &so)), [nops[0].addr], "{compiler}");
        // Everything else is the function without the key, instruction for instruction.
        let rest: Vec<&str> = keyed.iter().filter(|i| i.addr != nops[0].addr).map(|i| i.text.as_str()).collect();
        let without: Vec<&str> = plain.iter().map(|i| i.text.as_str()).collect();
        assert_eq!(rest, without, "{compiler}: the disabled path is the plain one plus the NOP");
    }
}
