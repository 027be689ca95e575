//! pad-enable: what tracing gcc's pads costs by their first byte
//! (`PadMode::OneByteOnly`, `trace::mirror`) against the stop-machine
//! rewrite (`PadMode::StopMachine`): N functions (default 3,000) of a
//! library built here with `-fpatchable-function-entry=5`, enabled and
//! disabled with one op (one batch each way), while 4 threads call them
//! and 2 wait in `nanosleep` counting every `EINTR` and early return.
//!
//! cargo run --release -p textpoke --example pad-enable [-- N]
//!
//! Each mode gets its own copy of the library (stop-machine leaves its
//! pads one 5-byte NOP). "first" is the first enable (stubs, adapters and
//! mirror slots made, the mirror regions mapped), "again" a later one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use textpoke::trace::{Entry, Filter, PadMode, TraceOp, Tracer};

struct Count(AtomicU64);
impl TraceOp for Count {
    fn entry(&self, _e: &Entry<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Builds and loads a library of `n` functions `pe_<tag>_<i>`; their
/// addresses.
fn load(tag: &str, n: usize) -> Vec<usize> {
    let dir = std::env::temp_dir().join(format!("textpoke-pad-enable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, so) = (dir.join(format!("{tag}.c")), dir.join(format!("lib{tag}.so")));
    let mut src = String::from("#define F __attribute__((noipa))\n");
    for i in 0..n {
        src.push_str(&format!("F long pe_{tag}_{i}(long x) {{ return x + {i}; }}\n"));
    }
    std::fs::write(&c, src).unwrap();
    let out = std::process::Command::new("gcc")
        .args(["-O2", "-shared", "-fPIC", "-fpatchable-function-entry=5", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .expect("gcc builds the library");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; the library is kept loaded.
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    assert!(!h.is_null());
    (0..n)
        .map(|i| {
            let name = std::ffi::CString::new(format!("pe_{tag}_{i}")).unwrap();
            // SAFETY: a valid handle and C string.
            unsafe { libc::dlsym(h, name.as_ptr()) as usize }
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn run(mode: PadMode, n: usize) {
    let tag = match mode {
        PadMode::StopMachine => "sm",
        _ => "ob",
    };
    let funcs = Arc::new(load(tag, n));
    let tracer = Tracer::global();
    tracer.set_pad_mode(mode);
    tracer.refresh().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, interrupted, waits) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut threads = Vec::new();
    for t in 0..4 {
        let (funcs, stop, calls) = (funcs.clone(), stop.clone(), calls.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = t * 7919;
            while !stop.load(Ordering::Relaxed) {
                let f = funcs[i % funcs.len()];
                // SAFETY: pe_*_i has this signature.
                let r = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(f)(1) };
                assert_eq!(r, 1 + (i % funcs.len()) as i64);
                calls.fetch_add(1, Ordering::Relaxed);
                i = i.wrapping_add(13);
            }
        }));
    }
    for _ in 0..2 {
        let (stop, interrupted, waits) = (stop.clone(), interrupted.clone(), waits.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let want = Duration::from_millis(5);
                let ts = libc::timespec { tv_sec: 0, tv_nsec: want.as_nanos() as _ };
                let t = Instant::now();
                // SAFETY: a valid timespec.
                let r = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
                if r != 0 || t.elapsed() < want {
                    interrupted.fetch_add(1, Ordering::Relaxed);
                }
                waits.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(50));
    let prefix = format!("pe_{tag}_");
    let traps = textpoke::text::traps_emulated();
    let mut times = Vec::new();
    for _ in 0..2 {
        let op = Arc::new(Count(AtomicU64::new(0)));
        let p = prefix.clone();
        let t = Instant::now();
        let h = tracer.register(op.clone(), Filter::new(move |f| f.starts_with(&p))).unwrap();
        let on = t.elapsed();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        tracer.unregister(h).unwrap();
        times.push((on, t.elapsed(), op.0.load(Ordering::Relaxed)));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let restored = funcs.iter().filter(|&&f| {
        // SAFETY: the library's code, mapped readable.
        let bytes = unsafe { std::slice::from_raw_parts(f as *const u8, 5) };
        bytes == [0x90; 5]
    });
    println!(
        "{mode:?}: {n} pads: first enable {}, disable {}; again: enable {}, disable {}; {} calls traced of {}; \
         {} traps emulated; waits interrupted or short: {} of {}; pads with their five NOPs after: {}",
        ms(times[0].0),
        ms(times[0].1),
        ms(times[1].0),
        ms(times[1].1),
        times[0].2 + times[1].2,
        calls.load(Ordering::Relaxed),
        textpoke::text::traps_emulated() - traps,
        interrupted.load(Ordering::Relaxed),
        waits.load(Ordering::Relaxed),
        restored.count(),
    );
}

fn main() {
    let n = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3000);
    run(PadMode::OneByteOnly, n);
    run(PadMode::StopMachine, n);
}
