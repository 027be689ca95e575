//! trace-bench: what a traced call costs, side by side in one run.
//!
//! cargo bench -p textpoke-record --bench trace-bench              # ns per call
//! cargo bench -p textpoke-record --bench trace-bench -- callgrind # instructions
//!
//! A C leaf function (`int leaf(int x) { return x + 1; }`) is called from a
//! C loop, built twice: plain, and with `-fpatchable-function-entry=5`
//! (its pad rewritten once to one 5-byte NOP, as the tracer does on first
//! use). Rows: plain; the site untraced; count-only tracing; entry+exit
//! records with timestamps (function_graph into the recorder); and two
//! reads of the recorder's clock, the floor any timestamped entry+exit
//! pays; and the same entry+exit records taken through the generic hot
//! path (the inline graph trampolines switched off), for comparison. Each
//! recorded row makes one call first, outside the timing, so the thread's
//! buffer (faulted in at creation) exists. Each figure is the minimum over
//! interleaved rounds.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use textpoke::trace::Tracer;
use textpoke_record::filter::glob_filter;
use textpoke_record::RecordOp;
use textpoke_record::{self as record, Clock, ClockChoice, ClockSource, RecorderConfig};

const SRC: &str = r#"
#define NOTRACE __attribute__((patchable_function_entry(0, 0), noinline))
__attribute__((noinline)) int PFX_leaf(int x) { return x + 1; }
NOTRACE long PFX_loop(long n) { long s = 0; for (long i = 0; i < n; i++) s += PFX_leaf((int)i); return s; }
"#;

fn build(name: &str, flags: &[&str]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trace-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{name}.c"));
    let so = dir.join(format!("lib{name}.so"));
    std::fs::write(&c, SRC.replace("PFX", name)).unwrap();
    let st = Command::new("gcc").args(["-O2", "-shared", "-fPIC", "-o"]).arg(&so).arg(&c).args(flags).status().unwrap();
    assert!(st.success(), "gcc failed");
    so
}

struct Lib {
    looper: extern "C" fn(i64) -> i64,
}

fn open(path: &std::path::Path, name: &str) -> Lib {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let sym = std::ffi::CString::new(format!("{name}_loop")).unwrap();
    // SAFETY: dlopen/dlsym with valid strings; the symbol is `long f(long)`.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW);
        assert!(!h.is_null());
        let f = libc::dlsym(h, sym.as_ptr());
        assert!(!f.is_null());
        Lib { looper: std::mem::transmute::<*mut libc::c_void, extern "C" fn(i64) -> i64>(f) }
    }
}

const N: i64 = 2_000_000;

fn ns_per_call(f: impl Fn()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as f64 / N as f64
}

fn clock_pair_loop() -> u64 {
    let mut acc = 0u64;
    for _ in 0..N {
        acc = acc.wrapping_add(Clock::now());
        acc = acc.wrapping_add(Clock::now());
    }
    acc
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--ir-run") {
        return ir_run(&args[i + 1], args[i + 2].parse().unwrap());
    }
    if args.iter().any(|a| a == "callgrind") {
        return callgrind();
    }
    let plain = open(&build("plain", &[]), "plain");
    let site = open(&build("site", &["-fpatchable-function-entry=5"]), "site");
    let t = Tracer::global();
    t.refresh().unwrap();
    let filter = || glob_filter(["site_leaf"], Vec::<String>::new()).unwrap();
    // Rewrite the gcc pad to one NOP once (first enable), then untrace.
    let h = t.register(Arc::new(RecordOp::count_only()), filter()).unwrap();
    t.unregister(h).unwrap();
    assert_eq!(t.functions().iter().find(|f| &*f.function == "site_leaf").unwrap().ops, 0);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trace-bench");
    let mut best = [f64::MAX; 7];
    for _round in 0..7 {
        best[0] = best[0].min(ns_per_call(|| assert!((plain.looper)(N) > 0)));
        best[1] = best[1].min(ns_per_call(|| assert!((site.looper)(N) > 0)));

        let rec = record::start(RecorderConfig::new(dir.join("count")).count_only()).unwrap();
        let h = t.register(Arc::new(RecordOp::count_only()), filter()).unwrap();
        (site.looper)(1);
        best[2] = best[2].min(ns_per_call(|| assert!((site.looper)(N) > 0)));
        t.unregister(h).unwrap();
        rec.stop().unwrap();

        for (row, inline, clock) in [(3, true, None), (5, false, None), (6, true, Some(ClockSource::TscUnordered))] {
            let name = match row {
                3 => "graph",
                5 => "graph-generic",
                _ => "graph-unordered",
            };
            let mut cfg = RecorderConfig::new(dir.join(name));
            if let Some(c) = clock {
                cfg.clock = ClockChoice::Force(c);
            }
            let rec = record::start(cfg).unwrap();
            t.set_inline_recording(inline);
            let h = t.register(Arc::new(RecordOp::graph()), filter()).unwrap();
            (site.looper)(1);
            best[row] = best[row].min(ns_per_call(|| assert!((site.looper)(N) > 0)));
            t.unregister(h).unwrap();
            rec.stop().unwrap();
        }
        t.set_inline_recording(true);

        best[4] = best[4].min(ns_per_call(|| assert!(clock_pair_loop() > 0)));
    }
    for d in ["graph", "graph-generic", "graph-unordered"] {
        let trace = textpoke_record::tracedata::Trace::open(dir.join(d)).unwrap();
        assert_eq!(trace.dropped(), 0, "the graph rows recorded every call");
    }
    println!(
        "trace-bench: {N} calls of a C leaf function, minimum of 7 rounds (clock: {})",
        record::clock::detect().source
    );
    let rows = [
        ("plain (no site)", best[0]),
        ("untraced site (one NOP)", best[1]),
        ("count-only", best[2]),
        ("entry+exit recorded", best[3]),
        ("  same, generic hot path", best[5]),
        ("  same, unordered TSC", best[6]),
        ("2 x clock read", best[4]),
    ];
    for (name, ns) in rows {
        println!("  {name:<26} {ns:>8.2} ns/call");
    }
    println!("  count-only above untraced  {:>8.2} ns (target < 5)", best[2] - best[1]);
    println!(
        "  entry+exit above untraced  {:>8.2} ns = {:.2} x two clock reads (target <= 1.3)",
        best[3] - best[1],
        (best[3] - best[1]) / best[4]
    );
}

/// Runs `n` calls of one variant (under callgrind).
fn ir_run(which: &str, n: i64) {
    let lib = match which {
        "plain" => open(&build("plain", &[]), "plain"),
        "graph" => {
            let l = open(&build("site", &["-fpatchable-function-entry=5"]), "site");
            let t = Tracer::global();
            t.refresh().unwrap();
            let cfg = RecorderConfig::new(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trace-bench/ir-graph"));
            let rec = record::start(cfg).unwrap();
            let h = t
                .register(Arc::new(RecordOp::graph()), glob_filter(["site_leaf"], Vec::<String>::new()).unwrap())
                .unwrap();
            std::hint::black_box((l.looper)(n));
            t.unregister(h).unwrap();
            rec.stop().unwrap();
            return;
        }
        _ => {
            let l = open(&build("site", &["-fpatchable-function-entry=5"]), "site");
            let t = Tracer::global();
            t.refresh().unwrap();
            let h = t
                .register(Arc::new(RecordOp::count_only()), glob_filter(["site_leaf"], Vec::<String>::new()).unwrap())
                .unwrap();
            t.unregister(h).unwrap(); // the pad is now one NOP
                                      // Free the retired stub now: the reclaimer thread sampling for
                                      // its grace period would add its instructions to the count.
            t.reclaim(std::time::Duration::from_secs(10)).unwrap();
            l
        }
    };
    std::hint::black_box((lib.looper)(n));
}

/// Instructions per call, by callgrind: (Ir at 2M calls - Ir at 1M) / 1M.
fn callgrind() {
    let exe = std::env::current_exe().unwrap();
    let ir = |which: &str, n: i64| -> u64 {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .args(["--ir-run", which, &n.to_string()])
            .output()
            .expect("valgrind must be installed");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().find(|l| l.contains("Collected :")).expect("callgrind summary");
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    let per_call = |which: &str| (ir(which, 2_000_000) as f64 - ir(which, 1_000_000) as f64) / 1_000_000.0;
    let (plain, site) = (per_call("plain"), per_call("site"));
    println!("trace-bench callgrind: instructions per call of the loop body");
    println!("  plain                {plain:.3}");
    println!("  untraced site        {site:.3}");
    println!("  extra                {:.3} (target: exactly 1, one NOP)", site - plain);
}
