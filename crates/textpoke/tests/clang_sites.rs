//! Entries compiled by clang with `-fpatchable-function-entry=5`: one
//! 5-byte NOP whose displacement byte is 8 (`0f 1f 44 00 08`), not gcc's
//! five one-byte NOPs nor `-mnop-mcount`'s `0f 1f 44 00 00`. The tracer
//! takes such a site as one instruction (no one-time rewrite), counts every
//! call while 8 threads call, and disabling it writes back clang's bytes
//! exactly; live patching jumps from it to a replacement and gives it
//! back as well. x86-64 only (clang's aarch64 pad is gcc's `nop; nop`).
#![cfg(target_arch = "x86_64")]

mod common;

use common::{glob_filter, peek, Lib};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use textpoke::live::{FuncDesc, PatchDesc, Patcher};
use textpoke::trace::{Entry, TraceOp, Tracer};

const SRC: &str = r#"
#define F __attribute__((noinline)) /* clang has no noipa */
F long cl_a(long x) { return x * 3 + 1; }
F long cl_b(long x) { return cl_a(x) + 2; }
F double cl_c(double x) { return x * 0.5 + 1.0; }
F long cl_a_v2(long x) { return x * 3 + 100; }
"#;

/// clang's NOP at a patchable entry (checked with objdump: clang 14 and 16).
const CLANG_NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x08];

/// Builds the fixture with clang (installed by `.ci/run`).
fn compile_with_clang(name: &str, extra: &[&str]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("textpoke-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{name}-{}.c", std::process::id()));
    let so = dir.join(format!("lib{name}-{}.so", std::process::id()));
    std::fs::write(&c, SRC).unwrap();
    let out = Command::new("clang")
        .args(["-O2", "-shared", "-fPIC", "-fpatchable-function-entry=5", "-o"])
        .arg(&so)
        .arg(&c)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("clang must be installed (.ci/run installs it): {e}"));
    assert!(out.status.success(), "clang failed: {}", String::from_utf8_lossy(&out.stderr));
    so
}

fn cl_filter() -> textpoke::trace::Filter {
    glob_filter(["cl_*"], Vec::<String>::new()).unwrap()
}

/// Entries seen, all threads.
static HITS: AtomicU64 = AtomicU64::new(0);

struct Counting;
impl TraceOp for Counting {
    fn entry(&self, _e: &Entry<'_>) {
        HITS.fetch_add(1, Ordering::Relaxed);
    }
}

struct Clang {
    lib: Lib,
    /// The NOP of cl_a, cl_b, cl_c (after `endbr64` when there is one).
    nops: [usize; 3],
    a: extern "C" fn(i64) -> i64,
    b: extern "C" fn(i64) -> i64,
    c: extern "C" fn(f64) -> f64,
}

fn load(name: &str, extra: &[&str], marker: usize) -> Clang {
    let lib = Lib::open(&compile_with_clang(name, extra));
    let syms = [lib.sym("cl_a"), lib.sym("cl_b"), lib.sym("cl_c")];
    let nops = syms.map(|f| f + marker);
    for &n in &nops {
        assert_eq!(peek(n, 5), CLANG_NOP5, "clang's patchable entry");
    }
    // SAFETY: the signatures match the C source.
    unsafe {
        Clang {
            nops,
            a: std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(syms[0]),
            b: std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(syms[1]),
            c: std::mem::transmute::<usize, extern "C" fn(f64) -> f64>(syms[2]),
            lib,
        }
    }
}

/// One call of each function, results checked: 4 entries (cl_b calls cl_a).
fn call_all(l: &Clang, x: i64) {
    assert_eq!((l.a)(x), x * 3 + 1);
    assert_eq!((l.b)(x), x * 3 + 3);
    assert_eq!((l.c)(x as f64), x as f64 * 0.5 + 1.0);
}

/// Enables and disables the three sites `rounds` times while 8 threads
/// call them; checks exact counts from this thread in each steady phase
/// and clang's bytes after each disable.
fn flip_under_load(l: Arc<Clang>, rounds: u32) {
    let tracer = Tracer::global();
    tracer.refresh().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (l, stop, calls) = (l.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut x = t;
                while !stop.load(Ordering::Relaxed) {
                    call_all(&l, x);
                    x += 1;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for _ in 0..rounds {
        let op = tracer.register(Arc::new(Counting), cl_filter()).unwrap();
        for &n in &l.nops {
            assert_eq!(peek(n, 1), [0xe8], "an enabled site calls its stub");
        }
        tracer.unregister(op).unwrap();
        for &n in &l.nops {
            assert_eq!(peek(n, 5), CLANG_NOP5, "clang's own bytes come back");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a worker saw a wrong result");
    }
    assert!(calls.load(Ordering::Relaxed) > 100, "the workers ran");
    // Exact from one thread once nothing else calls.
    let op = tracer.register(Arc::new(Counting), cl_filter()).unwrap();
    let before = HITS.load(Ordering::Relaxed);
    for x in 0..1000 {
        call_all(&l, x);
    }
    assert_eq!(HITS.load(Ordering::Relaxed) - before, 4000);
    tracer.unregister(op).unwrap();
    let before = HITS.load(Ordering::Relaxed);
    call_all(&l, 1);
    assert_eq!(HITS.load(Ordering::Relaxed), before, "off means off");
}

fn symbol_size(addr: usize) -> usize {
    textpoke_sys::loader::symbol_at(addr).map(|s| s.size).filter(|&s| s > 0).expect("a sized symbol")
}

/// Patches cl_a with cl_a_v2 and reverts, 20 times, while 8 threads call
/// it: the site jumps to the replacement once complete, and holds
/// clang's NOP again after each revert; the tracer can trace it after.
fn live_patch_and_revert(l: Arc<Clang>) {
    let (target, replacement) = (l.lib.sym("cl_a"), l.lib.sym("cl_a_v2"));
    let func = FuncDesc {
        name: "cl_a".into(),
        target,
        target_size: symbol_size(target),
        replacement,
        replacement_size: symbol_size(replacement),
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (l, stop) = (l.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = t;
                while !stop.load(Ordering::Relaxed) {
                    let got = (l.a)(x);
                    assert!(got == x * 3 + 1 || got == x * 3 + 100, "cl_a({x}) = {got}");
                    x += 1;
                }
            })
        })
        .collect();
    let p = Patcher::global();
    for _ in 0..20 {
        let desc = PatchDesc {
            name: "clang-v2".into(),
            replace: false,
            funcs: vec![func.clone()],
            callbacks: Default::default(),
            keep_alive: None,
        };
        p.apply(desc).unwrap();
        p.wait(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.a)(5), 115, "patched");
        assert_eq!(peek(l.nops[0], 1), [0xe9], "the site jumps to the replacement");
        p.revert(None).unwrap();
        p.wait(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.a)(5), 16, "reverted");
        assert_eq!(peek(l.nops[0], 5), CLANG_NOP5, "clang's own bytes after the revert");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a worker saw a wrong result");
    }
}

#[test]
fn clang_entries_are_traced_and_given_back_their_own_bytes() {
    let l = Arc::new(load("clang_sites", &[], 0));
    live_patch_and_revert(l.clone());
    flip_under_load(l, 200);
    // With `-fcf-protection` the NOP follows `endbr64`.
    let l = load("clang_sites_cet", &["-fcf-protection"], 4);
    assert_eq!(peek(l.nops[0] - 4, 4), [0xf3, 0x0f, 0x1e, 0xfa]);
    flip_under_load(Arc::new(l), 50);
}
