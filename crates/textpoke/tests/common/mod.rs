//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// gcc's flag for the tracer's patchable entries: five 1-byte NOPs on
/// x86-64, two NOPs on aarch64 (whose first the tracer swaps with `b`).
pub const PATCHABLE: &str =
    if cfg!(target_arch = "aarch64") { "-fpatchable-function-entry=2" } else { "-fpatchable-function-entry=5" };

/// Compiles C source into a shared library with extra gcc flags; returns
/// its path. Panics with gcc's output on failure.
pub fn compile_so(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    compile_so_with(&compiler("gcc"), "c", name, src, flags)
}

/// Compiles C++ source (g++) into a shared library.
pub fn compile_cxx_so(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    compile_so_with(&compiler("g++"), "cc", name, src, flags)
}

/// The compiler for this test binary's target: on aarch64, the cross
/// compiler when there is one (the tests run under qemu-aarch64 on an
/// x86-64 host, and exec the host's compilers natively), else the native one.
fn compiler(base: &str) -> String {
    if cfg!(target_arch = "aarch64") {
        let cross = format!("aarch64-linux-gnu-{base}");
        if Command::new(&cross).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return cross;
        }
    }
    base.to_string()
}

fn compile_so_with(compiler: &str, ext: &str, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("textpoke-tests");
    std::fs::create_dir_all(&dir).unwrap();
    // Per process: a test may run its own binary as a child that builds
    // the same fixtures meanwhile.
    let c = dir.join(format!("{name}-{}.{ext}", std::process::id()));
    let so = dir.join(format!("lib{name}-{}.so", std::process::id()));
    std::fs::write(&c, src).unwrap();
    let out = Command::new(compiler)
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .args(flags)
        .output()
        .unwrap_or_else(|e| panic!("{compiler} must be installed to build the test fixtures: {e}"));
    assert!(out.status.success(), "{compiler} failed: {}", String::from_utf8_lossy(&out.stderr));
    so
}

/// A dlopen'ed library.
pub struct Lib(*mut libc::c_void);

// SAFETY: dlopen handles may be used from any thread.
unsafe impl Send for Lib {}
// SAFETY: as for Send: dlsym and dlclose are thread-safe.
unsafe impl Sync for Lib {}

impl Lib {
    pub fn open(path: &std::path::Path) -> Lib {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
        assert!(!h.is_null(), "dlopen {path:?} failed");
        Lib(h)
    }

    pub fn sym(&self, name: &str) -> usize {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid handle and C string.
        let p = unsafe { libc::dlsym(self.0, c.as_ptr()) };
        assert!(!p.is_null(), "symbol {name} not found");
        p as usize
    }

    /// dlclose: the library is unmapped if this was its last reference.
    pub fn close(self) {
        // SAFETY: a handle from dlopen, closed once (self is consumed).
        let rc = unsafe { libc::dlclose(self.0) };
        assert_eq!(rc, 0, "dlclose failed");
    }
}

/// Reads `len` bytes of this process at `addr`.
pub fn peek(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: tests only peek at code they mapped or loaded.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

/// The permission string of the mapping containing `addr`.
pub fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let range = it.next().unwrap();
        let perms = it.next().unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (usize::from_str_radix(s, 16).unwrap(), usize::from_str_radix(e, 16).unwrap());
        if s <= addr && addr < e {
            return perms.to_string();
        }
    }
    panic!("{addr:#x} is not mapped")
}

/// Whether any mapping of this process is writable and executable.
pub fn wx_mappings() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.starts_with("rwx")))
        .map(str::to_string)
        .collect()
}

/// Runs this test binary again with only test `name`, with `TEXTPOKE_CHILD`
/// set to `scenario`; returns its exit status and output.
pub fn rerun_self(name: &str, scenario: &str) -> std::process::Output {
    rerun_self_with(name, scenario, &[])
}

/// [`rerun_self`] with more environment variables.
///
/// An aarch64 test binary under qemu-user on another host (no binfmt_misc)
/// cannot exec itself: the child exits 127 before it runs, saying nothing
/// (an exec failure, as qemu reports it); it is run under `qemu-aarch64`
/// then.
pub fn rerun_self_with(name: &str, scenario: &str, env: &[(&str, &str)]) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let args = ["--exact", name, "--nocapture", "--test-threads=1"];
    let run =
        |cmd: &mut Command| cmd.args(args).env("TEXTPOKE_CHILD", scenario).envs(env.iter().copied()).output().unwrap();
    let out = run(&mut Command::new(&exe));
    let not_run = out.status.code() == Some(127) && out.stdout.is_empty() && out.stderr.is_empty();
    if cfg!(target_arch = "aarch64") && not_run {
        return run(Command::new("qemu-aarch64").arg(&exe));
    }
    out
}

/// The child scenario this process runs, if it is a re-run child.
pub fn child_scenario() -> Option<String> {
    std::env::var("TEXTPOKE_CHILD").ok()
}

/// A tracing op counting entries and exits (function_graph).
pub struct EntryExitCounts {
    pub entries: std::sync::atomic::AtomicU64,
    pub exits: std::sync::atomic::AtomicU64,
}

impl EntryExitCounts {
    pub fn new() -> std::sync::Arc<EntryExitCounts> {
        std::sync::Arc::new(EntryExitCounts { entries: 0.into(), exits: 0.into() })
    }
}

impl textpoke::trace::TraceOp for EntryExitCounts {
    fn entry(&self, _e: &textpoke::trace::Entry<'_>) {
        self.entries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn exit(&self, _x: &textpoke::trace::Exit) {
        self.exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn wants_exit(&self) -> bool {
        true
    }
}

/// The target of the rel32 call or jmp at `at` (5 bytes).
pub fn branch_target(at: usize) -> usize {
    let b = peek(at + 1, 4);
    (at + 5).wrapping_add(i32::from_le_bytes(b.try_into().unwrap()) as isize as usize)
}

/// The stub a traced site calls, and the trampoline its word points to now
/// (`textpoke::arch::tramp::call_stub`: the word is read by the
/// `call [rip+disp32]` after the stub's `push imm32`).
#[cfg(target_arch = "x86_64")]
pub fn stub_and_trampoline(site: usize) -> (usize, usize) {
    let stub = branch_target(site);
    let code = peek(stub, 32);
    // `inc dword fs:[..]; js; push` (static TLS), or `call [enter]; push`.
    let push = if code[0] == 0x64 { 10 } else { 6 };
    assert_eq!(code[push], 0x68, "the stub's push: {code:02x?}");
    let call = push + 5;
    assert_eq!(&code[call..call + 2], &[0xff, 0x15], "call [rip+disp32] after the push: {code:02x?}");
    let disp = i32::from_le_bytes(code[call + 2..call + 6].try_into().unwrap());
    let word = (stub + call + 6).wrapping_add(disp as isize as usize);
    // SAFETY: the word is an aligned usize in the stub's data page.
    let tramp =
        unsafe { (*(word as *const std::sync::atomic::AtomicUsize)).load(std::sync::atomic::Ordering::Acquire) };
    (stub, tramp)
}

/// The stub a traced site branches to (`b stub`, the site's first word),
/// and the trampoline its word points to now (aarch64's
/// `arch::tramp::call_stub`: the word is loaded by the `adrp x16; ldr x16,
/// [x16, #lo12]` right after the `movz`/`movk` of x9, then `blr x16`).
#[cfg(target_arch = "aarch64")]
pub fn stub_and_trampoline(site: usize) -> (usize, usize) {
    let word = |at: usize| u32::from_le_bytes(peek(at, 4).try_into().unwrap());
    let b = word(site);
    assert_eq!(b & 0xfc00_0000, 0x1400_0000, "the site is `b stub`: {b:#010x}");
    let stub = site.wrapping_add_signed((((b & 0x03ff_ffff) << 6) as i32 >> 6) as isize * 4);
    let code: Vec<u32> = (0..32).map(|i| word(stub + 4 * i)).collect();
    // movz x9 or movk x9 (the assembler's mov_imm).
    let is_mov_x9 = |w: u32| w & 0xff80_001f == 0xd280_0009 || w & 0xff80_001f == 0xf280_0009;
    let k = (1..code.len() - 2)
        .find(|&k| {
            is_mov_x9(code[k - 1])
                && code[k] & 0x9f00_001f == 0x9000_0010 // adrp x16
                && code[k + 1] & 0xffc0_03ff == 0xf940_0210 // ldr x16, [x16, #imm]
                && code[k + 2] == 0xd63f_0200 // blr x16
        })
        .unwrap_or_else(|| panic!("no load of the stub's word after mov x9: {code:08x?}"));
    let adrp = code[k];
    let page = ((((adrp >> 5) & 0x7_ffff) << 2 | (adrp >> 29) & 3) as i32) << 11 >> 11;
    let base = ((stub + 4 * k) & !0xfff).wrapping_add_signed(page as isize * 4096);
    let word_at = base + ((code[k + 1] >> 10) & 0xfff) as usize * 8;
    // SAFETY: the word is an aligned usize in the stub's data page.
    let tramp =
        unsafe { (*(word_at as *const std::sync::atomic::AtomicUsize)).load(std::sync::atomic::Ordering::Acquire) };
    (stub, tramp)
}

/// Whether `addr` is in a mapping of this process.
pub fn mapped(addr: usize) -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| {
        let (s, e) = l.split_whitespace().next().unwrap().split_once('-').unwrap();
        let (s, e) = (usize::from_str_radix(s, 16).unwrap(), usize::from_str_radix(e, 16).unwrap());
        s <= addr && addr < e
    })
}

/// A tracer filter from include and exclude globs, as the recorder crate's
/// `textpoke_record::filter::glob_filter` builds it: the engine knows no
/// glob syntax, and its own tests, below the recorder, compile globs here
/// (globset is their dev-dependency).
pub fn glob_filter<I, E>(include: I, exclude: E) -> Result<textpoke::trace::Filter, textpoke::trace::FilterError>
where
    I: IntoIterator,
    I::Item: Into<String>,
    E: IntoIterator,
    E::Item: Into<String>,
{
    use textpoke::trace::FilterError;
    let set = |globs: &[String]| {
        let mut b = globset::GlobSetBuilder::new();
        for g in globs {
            b.add(globset::Glob::new(g).map_err(|e| FilterError { glob: g.clone(), reason: e.kind().to_string() })?);
        }
        b.build().map_err(|e| FilterError { glob: globs.join(","), reason: e.to_string() })
    };
    let include: Vec<String> = include.into_iter().map(Into::into).collect();
    let exclude: Vec<String> = exclude.into_iter().map(Into::into).collect();
    let (all, inc, exc) = (include.is_empty(), set(&include)?, set(&exclude)?);
    Ok(textpoke::trace::Filter::new(move |f: &str| (all || inc.is_match(f)) && !exc.is_match(f)))
}
