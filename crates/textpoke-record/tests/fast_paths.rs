//! The recorder's inline fast paths (count and graph trampolines running
//! the code of `codegen/x86_64.rs` or `codegen/aarch64.rs`) from 8
//! threads, on both architectures (under qemu on aarch64, `.ci/aarch64`):
//! exact counts; entries and exits paired, nested and timed in order; and
//! proof that the fast path did the work — every thread's calls after its
//! first take no slow call into the tracer's Rust handlers
//! (`slow_calls_of_this_thread`, which counts them in `testing` builds),
//! while the same calls with inline recording off take one per event.

#[path = "../../textpoke/tests/common/mod.rs"]
mod common;

use common::{compile_so, Lib};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use textpoke::trace::{slow_calls_of_this_thread, Tracer, TrampolineKind};
use textpoke_record::filter::glob_filter;
use textpoke_record::tracedata::{Record, RecordKind, Trace};
use textpoke_record::{self as record, ClockChoice, ClockSource, RecordOp, RecorderConfig};

/// The recorder and the tracer are one per process: tests take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const THREADS: usize = 8;
/// Calls of `fp_run` per thread after its first.
const CALLS: i64 = 300;

/// `fp_run(x)` calls `fp_mid` (which calls `fp_leaf` twice) and recurses
/// through `fp_rec` three levels deep.
const SRC: &str = r#"
#define F __attribute__((noipa))
static volatile long fp_sink;
F long fp_leaf(long x) { fp_sink = x; return x + 1; }
F long fp_mid(long x) { return fp_leaf(x) + fp_leaf(x + 1); }
F long fp_rec(long n) { if (n == 0) return 0; return fp_rec(n - 1) + 1; }
F long fp_run(long x) { return fp_mid(x) + fp_rec(3); }
"#;

const TRACED: [&str; 4] = ["fp_leaf", "fp_mid", "fp_rec", "fp_run"];

fn run_result(x: i64) -> i64 {
    2 * x + 3 + 3
}

fn lib() -> Lib {
    Lib::open(&compile_so("fastpaths", SRC, &[common::PATCHABLE, "-O1", "-fno-inline"]))
}

fn trace_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fast-paths-{name}-{}", std::process::id()))
}

/// The trampoline kind of every `fp_*` function.
fn kinds() -> HashMap<String, TrampolineKind> {
    Tracer::global()
        .functions()
        .iter()
        .filter(|f| f.function.starts_with("fp_"))
        .map(|f| (f.function.to_string(), f.trampoline))
        .collect()
}

fn assert_kinds(want: TrampolineKind) {
    let k = kinds();
    assert_eq!(k.len(), TRACED.len(), "sites of fp_*: {k:?}");
    assert!(k.values().all(|&t| t == want), "trampolines {k:?}, want {want:?}");
}

/// Runs `fp_run` on 8 fresh threads at once: a first call each (its
/// buffer's creation), then [`CALLS`] more; returns each thread's slow
/// calls during the latter. Inline, the recorder's own slow events (a
/// segment started or changed, a long gap between two events) are left
/// out: inline code hands those to the hot path by design.
fn on_threads(run: extern "C" fn(i64) -> i64, inline: bool) -> Vec<u64> {
    let start = Arc::new(std::sync::Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS as i64)
        .map(|t| {
            let start = start.clone();
            std::thread::spawn(move || {
                let base = t * 1_000_000;
                assert_eq!(run(base), run_result(base));
                start.wait();
                let slow = || {
                    let own = if inline { record::slow_events_of_this_thread() } else { 0 };
                    slow_calls_of_this_thread() - own
                };
                let s0 = slow();
                for i in 1..=CALLS {
                    assert_eq!(run(base + i), run_result(base + i));
                }
                slow() - s0
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Recording config: big segments (no segment change hands an event to
/// the slow path), the ordered counter (TSC, or CNTVCT_EL0 after an ISB),
/// which the fast paths read inline.
fn config(dir: &PathBuf) -> RecorderConfig {
    let mut cfg = RecorderConfig::new(dir);
    cfg.segment_bytes = 1 << 24;
    cfg.clock = ClockChoice::Force(ClockSource::Tsc);
    cfg
}

/// Exact counts from 8 threads through the count trampoline, none of
/// whose calls after the first reach the op's Rust callback; the same with
/// inline recording off, every call through it.
#[test]
fn count_fast_path_counts_exactly_from_8_threads() {
    let _s = serial();
    let lib = lib();
    // SAFETY: long (long).
    let run: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("fp_run")) };
    let t = Tracer::global();
    t.refresh().unwrap();
    for inline in [true, false] {
        t.set_inline_recording(inline);
        let dir = trace_dir(&format!("count-{inline}"));
        let _ = std::fs::remove_dir_all(&dir);
        let rec = record::start(config(&dir).count_only()).unwrap();
        let filter = glob_filter(["fp_*"], Vec::<String>::new()).unwrap();
        let h = t.register(Arc::new(RecordOp::count_only()), filter).unwrap();
        assert_kinds(if inline { TrampolineKind::Count } else { TrampolineKind::Direct });
        let slow = on_threads(run, inline);
        t.unregister(h).unwrap();
        rec.stop().unwrap();
        t.set_inline_recording(true);
        let calls_per_run = 1 + 1 + 2 + 4; // run, mid, two leaves, rec 3..0
        if inline {
            assert_eq!(slow, vec![0; THREADS], "inline: no call reaches the op's callback");
        } else {
            assert_eq!(slow, vec![(CALLS * calls_per_run) as u64; THREADS], "generic: every call does");
        }
        let trace = Trace::open(&dir).unwrap();
        let counts: HashMap<String, u64> =
            trace.counts().iter().filter(|c| c.1 > 0).map(|&(id, n)| (trace.name(id).to_string(), n)).collect();
        let runs = THREADS as u64 * (CALLS as u64 + 1);
        let want = HashMap::from([
            ("fp_run".to_string(), runs),
            ("fp_mid".to_string(), runs),
            ("fp_leaf".to_string(), 2 * runs),
            ("fp_rec".to_string(), 4 * runs),
        ]);
        assert_eq!(counts, want, "inline {inline}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// One thread's records: the expected sequence exactly (names, depths,
/// the leaves' return values), entries and exits paired, timestamps never
/// going back, and each call's duration at least its callees' sum.
fn check_thread(trace: &Trace, recs: &[Record], base: i64) {
    let name = |r: &Record| trace.name(r.func).to_string();
    let mut want: Vec<(bool, &str, u32, Option<u64>)> = Vec::new();
    for x in std::iter::once(base).chain((1..=CALLS).map(|i| base + i)) {
        want.push((false, "fp_run", 0, None));
        want.push((false, "fp_mid", 1, None));
        for l in [x, x + 1] {
            want.push((false, "fp_leaf", 2, None));
            want.push((true, "fp_leaf", 2, Some((l + 1) as u64)));
        }
        want.push((true, "fp_mid", 1, None));
        for d in 1..=4 {
            want.push((false, "fp_rec", d, None));
        }
        for d in (1..=4).rev() {
            want.push((true, "fp_rec", d, None));
        }
        want.push((true, "fp_run", 0, None));
    }
    let got: Vec<(bool, String, u32, Option<u64>)> =
        recs.iter().map(|r| (r.kind == RecordKind::Exit, name(r), r.depth, r.value)).collect();
    assert_eq!(got.len(), want.len(), "records of the thread of base {base}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.0 == w.0 && g.1 == w.1 && g.2 == w.2 && g.3 == w.3, "record {i}: {g:?}, want {w:?}");
    }
    // Pairing, nesting and time: a stack of open calls with their entry
    // time and the time their callees took.
    let mut open: Vec<(&Record, u64)> = Vec::new();
    let mut last = 0;
    for (i, r) in recs.iter().enumerate() {
        assert!(r.ts >= last, "record {i}: time {} before the previous {last}", r.ts);
        last = r.ts;
        if r.kind == RecordKind::Entry {
            assert_eq!(r.depth as usize, open.len(), "record {i}: an entry at the open depth");
            open.push((r, 0));
            continue;
        }
        let (e, inner) = open.pop().unwrap_or_else(|| panic!("record {i}: an exit with nothing open"));
        assert!(e.func == r.func && e.depth == r.depth, "record {i}: exit pairs with its entry");
        let took = r.ts - e.ts;
        assert!(took >= inner, "record {i}: a call took {took}, less than its callees' {inner}");
        if let Some(parent) = open.last_mut() {
            parent.1 += took;
        }
    }
    assert!(open.is_empty(), "every entry has its exit");
}

/// Entries and exits from 8 threads through the graph and return
/// trampolines: exact sequences (the leaves' return values included),
/// paired and nested, times in order, no slow call after each thread's
/// first; the same records with inline recording off, every event then
/// through the op's callbacks.
#[test]
fn graph_fast_path_records_exactly_from_8_threads() {
    let _s = serial();
    let lib = lib();
    // SAFETY: long (long).
    let run: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("fp_run")) };
    let t = Tracer::global();
    t.refresh().unwrap();
    for inline in [true, false] {
        t.set_inline_recording(inline);
        let dir = trace_dir(&format!("graph-{inline}"));
        let _ = std::fs::remove_dir_all(&dir);
        let rec = record::start(config(&dir)).unwrap();
        let filter = glob_filter(["fp_*"], Vec::<String>::new()).unwrap();
        let leaf = glob_filter(["fp_leaf"], Vec::<String>::new()).unwrap();
        let h = t.register(Arc::new(RecordOp::graph().with_retval(leaf)), filter).unwrap();
        assert_kinds(if inline { TrampolineKind::Graph } else { TrampolineKind::Direct });
        let slow = on_threads(run, inline);
        t.unregister(h).unwrap();
        rec.stop().unwrap();
        t.set_inline_recording(true);
        let events_per_run = 2 * (1 + 1 + 2 + 4);
        if inline {
            assert_eq!(slow, vec![0; THREADS], "inline: no event reaches the op's callbacks");
        } else {
            assert_eq!(slow, vec![(CALLS * events_per_run) as u64; THREADS], "generic: every event does");
        }
        let trace = Trace::open(&dir).unwrap();
        assert!(trace.is_complete());
        assert_eq!(trace.dropped(), 0);
        let mut bases = Vec::new();
        for th in trace.threads().iter().filter(|th| th.words > 0) {
            let recs: Vec<Record> = trace.records(th).unwrap().map(|r| r.unwrap()).collect();
            // The thread's first run says which worker it was.
            let first_leaf = recs.iter().find_map(|r| r.value).expect("a leaf's exit");
            let base = first_leaf as i64 - 1;
            check_thread(&trace, &recs, base);
            bases.push(base);
        }
        bases.sort();
        assert_eq!(bases, (0..THREADS as i64).map(|t| t * 1_000_000).collect::<Vec<_>>(), "inline {inline}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Not a test: records `MEASURE_CALLS` calls of a traced leaf (graph mode,
/// or count-only with `MEASURE_COUNT=1`; through the fast paths, or
/// through the op's callbacks with `MEASURE_INLINE=0`) and prints where the generated code is (the
/// executable anonymous mappings) and the leaf's address, for counting the
/// instructions a recorded call runs under `qemu-aarch64 -singlestep -d
/// exec,nochain -dfilter <ranges>` (ARCHITECTURE.md, "aarch64").
#[test]
#[ignore]
fn measure_recorded_call() {
    let _s = serial();
    let lib =
        Lib::open(&compile_so("measurerec", "long m_leaf(long x) { return x + 1; }\n", &[common::PATCHABLE, "-O2"]));
    // SAFETY: long (long).
    let f: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("m_leaf")) };
    let inline = std::env::var("MEASURE_INLINE").map_or(true, |v| v != "0");
    let n: i64 = std::env::var("MEASURE_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_inline_recording(inline);
    let dir = trace_dir("measure");
    let _ = std::fs::remove_dir_all(&dir);
    let count = std::env::var_os("MEASURE_COUNT").is_some();
    let (cfg, op) = match count {
        true => (config(&dir).count_only(), RecordOp::count_only()),
        false => (config(&dir), RecordOp::graph()),
    };
    let rec = record::start(cfg).unwrap();
    let h = t.register(Arc::new(op), glob_filter(["m_leaf"], Vec::<String>::new()).unwrap()).unwrap();
    f(0); // the thread registers, its buffer is made
    let s0 = slow_calls_of_this_thread();
    for i in 0..n {
        assert_eq!(f(i), i + 1);
    }
    let slow = slow_calls_of_this_thread() - s0;
    println!("inline {inline}, count-only {count}: {n} calls, {slow} slow calls");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for l in maps.lines().filter(|l| l.split_whitespace().nth(1) == Some("r-xp") && l.split_whitespace().count() == 5) {
        println!("generated code: {}", l.split_whitespace().next().unwrap());
    }
    println!("site {:#x}", lib.sym("m_leaf"));
    // Where this program is loaded: its callbacks' symbols (`nm`) are at
    // that base plus their value.
    let exe = std::env::current_exe().unwrap();
    let base = maps.lines().find(|l| l.ends_with(exe.to_str().unwrap())).and_then(|l| l.split('-').next());
    println!("program base 0x{}", base.unwrap_or("?"));
    t.unregister(h).unwrap();
    rec.stop().unwrap();
    t.set_inline_recording(true);
    let trace = Trace::open(&dir).unwrap();
    let words: u64 = trace.threads().iter().map(|th| th.words).sum();
    println!("trace: {words} words");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Functions built with branch protection (`bti c` before the pad): the
/// graph fast path finds the site after the BTI, goes on into the function
/// and records, from 8 threads. The loader maps such code guarded (an
/// indirect branch must land on a BTI: the toolchain's own crt objects,
/// which have none, fault here without `-nostartfiles`), which is why the
/// graph thunk goes on through the stub's direct `b`; but the engine's
/// text writes restore a patched page's protection from /proc/self/maps,
/// which does not show PROT_BTI, so today the patched page is no longer
/// guarded and this test cannot tell a thunk branching indirectly into
/// the function from one that does not.
#[cfg(target_arch = "aarch64")]
#[test]
fn graph_fast_path_into_bti_functions() {
    let _s = serial();
    let src = SRC.replace("fp_", "fb_");
    let lib = Lib::open(&compile_so(
        "fastpathsbti",
        &src,
        // The property that makes the loader guard the code (force-bti),
        // without the toolchain's crt objects, which have no BTI (the
        // loader calls their constructors indirectly).
        &[common::PATCHABLE, "-O1", "-fno-inline", "-mbranch-protection=standard", "-nostartfiles", "-Wl,-z,force-bti"],
    ));
    assert_eq!(
        // SAFETY: the function's first instruction, in its mapped code.
        unsafe { *(lib.sym("fb_leaf") as *const u32) },
        0xd503_245f,
        "bti c first"
    );
    // SAFETY: long (long).
    let run: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("fb_run")) };
    let t = Tracer::global();
    t.refresh().unwrap();
    let dir = trace_dir("bti");
    let _ = std::fs::remove_dir_all(&dir);
    let rec = record::start(config(&dir)).unwrap();
    let h = t.register(Arc::new(RecordOp::graph()), glob_filter(["fb_*"], Vec::<String>::new()).unwrap()).unwrap();
    let k: Vec<TrampolineKind> =
        t.functions().iter().filter(|f| f.function.starts_with("fb_")).map(|f| f.trampoline).collect();
    assert_eq!(k, vec![TrampolineKind::Graph; 4]);
    let slow = on_threads(run, true);
    t.unregister(h).unwrap();
    rec.stop().unwrap();
    assert_eq!(slow, vec![0; THREADS], "no event reaches the op's callbacks");
    let trace = Trace::open(&dir).unwrap();
    let runs = THREADS as u64 * (CALLS as u64 + 1);
    let counts: HashMap<String, u64> =
        trace.counts().iter().filter(|c| c.1 > 0).map(|&(id, n)| (trace.name(id).to_string(), n)).collect();
    assert_eq!(counts.get("fb_run"), Some(&runs));
    assert_eq!(counts.get("fb_rec"), Some(&(4 * runs)));
    let _ = std::fs::remove_dir_all(&dir);
}
