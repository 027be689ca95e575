//! Functions split by gcc into `name` and `name.cold` (the unlikely blocks,
//! moved to `.text.unlikely`): a thread executing in the `.cold` part, or
//! holding a return address into it, is inside the function. The patch
//! loader finds the fragments (`live::object::load`: the target's and the
//! replacement's), and the transition engine checks them: a thread blocked
//! in `read()` inside `lpc_outer.cold` keeps the old `lpc_inner()` until it
//! returns, and one blocked inside the replacement's `outer_v2.cold` keeps
//! the new one through a revert.
//!
//! The fixtures are `tests/fixtures/live_object/cold_{target,patch}.c`,
//! built here with gcc (`-fpatchable-function-entry=5`, whose pads the
//! patcher enables by their first byte: no thread is signalled). One test
//! runs both scenarios in turn: the process has one patcher.
#![cfg(target_arch = "x86_64")]

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use textpoke::live::object::load;
use textpoke::live::{Held, LiveError, Patcher};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/live_object");
const INCLUDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../textpoke-c/include");

fn dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("live_object_cold-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(args).output().expect("gcc must be installed to build the test fixtures");
    assert!(out.status.success(), "gcc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `(address, size)` of symbol `name` in the `.symtab` of the file at
/// `path` (link-time address).
fn file_symbol(path: &Path, name: &str) -> Option<(usize, usize)> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let found = file.symbols().find(|s| s.name() == Ok(name));
    found.map(|s| (s.address() as usize, s.size() as usize))
}

fn build_id(path: &Path) -> String {
    use object::Object;
    let data = std::fs::read(path).unwrap();
    let id = object::File::parse(&*data).unwrap().build_id().unwrap().expect("linked with --build-id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn write_byte(fd: i32) {
    // SAFETY: one byte from a valid buffer.
    assert_eq!(unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) }, 1);
}

/// Calls `int lpc_outer(int fd, int *got)` at `addr`.
fn outer(addr: usize, fd: i32, got: &mut i32) -> i32 {
    // SAFETY: the fixture's signature.
    let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32, *mut i32) -> i32>(addr) };
    f(fd, got)
}

/// A thread calling `lpc_outer` with a pipe, so that it blocks in `read()`
/// in the function's `.cold` part, until a byte is written; returns its
/// tid, the pipe's write end, and its handle giving (result, read's result).
fn blocked_in_cold_part(outer_addr: usize) -> (i32, i32, std::thread::JoinHandle<(i32, i32)>) {
    let (rd, wr) = pipe();
    let tid = Arc::new(AtomicI32::new(0));
    let t2 = tid.clone();
    let h = std::thread::Builder::new()
        .name("lp-cold-sleeper".into())
        .spawn(move || {
            t2.store(textpoke_sys::threads::gettid(), Ordering::SeqCst);
            let mut got = -7;
            let r = outer(outer_addr, rd, &mut got);
            // SAFETY: our descriptor.
            unsafe { libc::close(rd) };
            (r, got)
        })
        .unwrap();
    while tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let tid = tid.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if s.split_whitespace().next().and_then(|n| n.parse::<i64>().ok()) == Some(libc::SYS_read) {
            break;
        }
        assert!(Instant::now() < deadline, "thread {tid} never blocked in read: {s}");
        std::thread::sleep(Duration::from_millis(2));
    }
    (tid, wr, h)
}

/// Asserts the transition is pending with thread `tid` holding `lpc_outer`
/// in version `held`.
fn assert_pending_on_outer(p: &'static Patcher, tid: i32, held: Held) {
    let report = match p.wait(Duration::from_millis(300)) {
        Err(LiveError::Pending(r)) => r,
        other => panic!("expected a pending transition (thread {tid} is inside lpc_outer's .cold part), got {other:?}"),
    };
    let t = report.pending.iter().find(|t| t.tid == tid).unwrap_or_else(|| panic!("{report}"));
    let holds = t.holds.as_ref().unwrap_or_else(|| panic!("{report}"));
    assert_eq!((holds.function.as_str(), holds.version), ("lpc_outer", held), "{report}");
    assert!(report.to_string().contains("lpc_outer"), "{report}");
}

#[test]
fn a_thread_in_a_cold_fragment_holds_its_function() {
    let dir = dir();
    let lib = dir.join("liblp_cold.so");
    gcc(&[
        "-O2",
        "-shared",
        "-fPIC",
        "-fpatchable-function-entry=5",
        "-flive-patching=inline-clone",
        "-Wl,--build-id",
        "-o",
        lib.to_str().unwrap(),
        &format!("{FIXTURES}/cold_target.c"),
    ]);
    let so = dir.join("liblp_cold_patch.so");
    gcc(&[
        "-O2",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-I",
        INCLUDE,
        &format!("-DTARGET_BUILD_ID=\"{}\"", build_id(&lib)),
        "-o",
        so.to_str().unwrap(),
        &format!("{FIXTURES}/cold_patch.c"),
    ]);
    // The fixtures really are split (else this test would test nothing).
    let cold = file_symbol(&lib, "lpc_outer.cold").expect("gcc -O2 split lpc_outer into lpc_outer.cold");
    let cold_v2 = file_symbol(&so, "outer_v2.cold").expect("gcc -O2 split outer_v2 into outer_v2.cold");
    let (outer_at, outer_size) = file_symbol(&lib, "lpc_outer").unwrap();
    assert!(cold.0 + cold.1 <= outer_at || cold.0 >= outer_at + outer_size, "the .cold part lies outside lpc_outer");

    let c = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the library has no initialiser.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
    assert!(!h.is_null());
    // SAFETY: a live handle and a C string.
    let outer_addr = unsafe { libc::dlsym(h, c"lpc_outer".as_ptr()) } as usize;
    let bias = outer_addr - outer_at;

    // The loader found both fragments, at their run-time addresses.
    let desc = load(&so).unwrap_or_else(|e| panic!("{e}"));
    let f = desc.funcs.iter().find(|f| f.name == "lpc_outer").unwrap();
    assert_eq!(f.target_fragments, [(bias + cold.0, cold.1)]);
    let patch_bias = f.replacement - file_symbol(&so, "outer_v2").unwrap().0;
    assert_eq!(f.replacement_fragments, [(patch_bias + cold_v2.0, cold_v2.1)]);
    let inner = desc.funcs.iter().find(|f| f.name == "lpc_inner").unwrap();
    assert!(inner.target_fragments.is_empty() && inner.replacement_fragments.is_empty());

    let p = Patcher::global();
    let mut got = 0;
    assert_eq!(outer(outer_addr, -1, &mut got), 11);

    // 1. Patching: a thread blocked in old lpc_outer.cold holds old
    //    lpc_outer; woken, it calls the old lpc_inner from there.
    let (tid, wr, sleeper) = blocked_in_cold_part(outer_addr);
    let id = p.apply(desc).unwrap();
    assert_pending_on_outer(p, tid, Held::Old);
    let fresh = std::thread::spawn(move || outer(outer_addr, -1, &mut 0));
    assert_eq!(fresh.join().unwrap(), 22, "other threads run the new versions meanwhile");
    write_byte(wr);
    let (r, read) = sleeper.join().unwrap();
    assert_eq!(read, 1, "read returned {read}: interrupted?");
    assert_eq!(r, 11, "the thread in old lpc_outer.cold mixed versions");
    let done = p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!done.forced && done.patch == id);
    assert_eq!(outer(outer_addr, -1, &mut got), 22);
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };

    // 2. Reverting: a thread blocked in outer_v2.cold holds the new
    //    lpc_outer; woken, it calls the new lpc_inner from there.
    let (tid, wr, sleeper) = blocked_in_cold_part(outer_addr);
    p.revert(Some(id)).unwrap();
    assert_pending_on_outer(p, tid, Held::New);
    write_byte(wr);
    let (r, read) = sleeper.join().unwrap();
    assert_eq!(read, 1, "read returned {read}: interrupted?");
    assert_eq!(r, 22, "the thread in outer_v2.cold mixed versions");
    let done = p.wait(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!done.forced);
    assert_eq!(outer(outer_addr, -1, &mut got), 11);
    assert!(p.patches().is_empty());
    // SAFETY: our descriptor.
    unsafe { libc::close(wr) };
}
