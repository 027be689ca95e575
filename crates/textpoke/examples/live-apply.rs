//! Live patching: time from `Patcher::apply` to a completed transition,
//! with busy threads none of which is inside a patched function (issue 12's
//! target: under 10 ms with 8 busy threads), and the cost of a patched
//! call once the transition is complete.
//!
//! ```text
//! cargo run --release -p textpoke --example live-apply [-- THREADS CYCLES]
//! valgrind --tool=callgrind cargo-built-binary calls   # instructions per call (see `calls` below)
//! ```
//!
//! The busy threads call `work()`, a function with a patchable entry that
//! no patch replaces, in a loop: they switch at the checkpoint op (note
//! §5.3), registered once running threads have been pending 2 ms (pads
//! enabled by their first byte: no thread is signalled). A first
//! apply/revert cycle is not timed.
//!
//! With the argument `calls`: calls the patched `target()` (a `jmp
//! replacement` at its entry) and `replacement()` directly, 10^6 times
//! each, so that callgrind's per-function instruction counts compare them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use textpoke::live::{FuncDesc, PatchDesc, Patcher};

const SRC: &str = r#"
#define V __attribute__((noipa))
V long work(long x) { return x * 3 + 1; }
V long target(long x) { return x + 1; }
V long replacement(long x) { return x + 2; }
"#;

fn build() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("textpoke-live-apply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, so) = (dir.join("f.c"), dir.join("libf.so"));
    std::fs::write(&c, SRC).unwrap();
    let out = std::process::Command::new("gcc")
        .args(["-O2", "-shared", "-fPIC", "-fpatchable-function-entry=5", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .expect("gcc builds the fixture");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    so
}

fn sym(h: *mut libc::c_void, name: &str) -> usize {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid handle and C string.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "{name}");
    p as usize
}

fn size(addr: usize) -> usize {
    textpoke_sys::loader::symbol_at(addr).map(|s| s.size).filter(|&s| s > 0).expect("a sized symbol")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let so = build();
    let path = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    assert!(!h.is_null());
    let (work, target, repl) = (sym(h, "work"), sym(h, "target"), sym(h, "replacement"));
    let desc = || PatchDesc {
        name: "target".into(),
        replace: false,
        funcs: vec![FuncDesc {
            name: "target".into(),
            target,
            target_size: size(target),
            replacement: repl,
            replacement_size: size(repl),
            ..Default::default()
        }],
        callbacks: Default::default(),
        keep_alive: None,
    };
    let p = Patcher::global();
    // As the preloaded agent does (a stop-machine batch, if one ever runs,
    // makes every gcc pad one 5-byte NOP); live patching itself enables
    // pads by their first byte and stops no thread.
    textpoke::Tracer::global().set_prepare_pads(true);
    // The untimed first cycle (mirror slots, stubs).
    let id = p.apply(desc()).unwrap();
    p.wait(Duration::from_secs(10)).unwrap();
    p.revert(Some(id)).unwrap();
    p.wait(Duration::from_secs(10)).unwrap();

    if args.first().map(String::as_str) == Some("calls") {
        p.apply(desc()).unwrap();
        p.wait(Duration::from_secs(10)).unwrap();
        // SAFETY: long (long).
        let (t, r) = unsafe {
            (
                std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(target),
                std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(repl),
            )
        };
        let mut sum = 0;
        for i in 0..1_000_000 {
            sum += t(std::hint::black_box(i));
        }
        for i in 0..1_000_000 {
            sum += r(std::hint::black_box(i));
        }
        println!("patched target() and replacement() called 10^6 times each (sum {sum})");
        let direct = textpoke::arch::encode_jmp(target, repl).is_some();
        println!("target's site: {}", if direct { "jmp replacement (in reach)" } else { "jmp to a far-jump stub" });
        return;
    }

    let threads: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(8);
    let cycles: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    // SAFETY: long (long).
    let work = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(work) };
    let busy: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(work(std::hint::black_box(n)));
                    n += 1;
                }
                calls.fetch_add(n as u64, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut apply = Vec::with_capacity(cycles);
    let mut revert = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        let t0 = Instant::now();
        let id = p.apply(desc()).unwrap();
        p.wait(Duration::from_secs(10)).unwrap();
        apply.push(t0.elapsed());
        let t0 = Instant::now();
        p.revert(Some(id)).unwrap();
        p.wait(Duration::from_secs(10)).unwrap();
        revert.push(t0.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    apply.sort();
    revert.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{threads} busy threads, {cycles} cycles: apply->complete median {:.2} ms (min {:.2}, max {:.2}); revert->complete median {:.2} ms",
        ms(apply[cycles / 2]),
        ms(apply[0]),
        ms(apply[cycles - 1]),
        ms(revert[cycles / 2])
    );
    println!("busy calls meanwhile: {}", calls.load(Ordering::Relaxed));
}
