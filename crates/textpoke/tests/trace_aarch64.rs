//! The function tracer on aarch64 (run under qemu-aarch64 by `.ci/aarch64`):
//! C code compiled with `-fpatchable-function-entry=2` (`nop; nop` at each
//! entry), whose first NOP the tracer swaps with `b stub` and back
//! (`arch/tramp_aarch64.rs`). Exact counts, function_graph exits and
//! return values, arguments through the trampolines, branch protection,
//! eight threads calling while ops come and go. The function_graph
//! robustness tests (longjmp, signals, recursion, pthread_exit) are
//! `graph.rs`, shared with x86-64.
#![cfg(target_arch = "aarch64")]

mod common;

use common::{compile_so, glob_filter, peek, Lib, PATCHABLE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use textpoke::trace::{Entry, Exit, TraceOp, Tracer};

const NOP: [u8; 4] = [0x1f, 0x20, 0x03, 0xd5];

/// Counts entries and exits per site; remembers the last return values.
struct Counter {
    entries: Vec<AtomicU64>,
    exits: Vec<AtomicU64>,
    last_ret: AtomicU64,
    last_fret: AtomicU64,
    graph: bool,
}

impl Counter {
    fn new(graph: bool) -> Arc<Counter> {
        Arc::new(Counter {
            entries: (0..4096).map(|_| AtomicU64::new(0)).collect(),
            exits: (0..4096).map(|_| AtomicU64::new(0)).collect(),
            last_ret: AtomicU64::new(0),
            last_fret: AtomicU64::new(0),
            graph,
        })
    }
    fn entries_of(&self, site: u32) -> u64 {
        self.entries[site as usize].load(Ordering::Relaxed)
    }
    fn exits_of(&self, site: u32) -> u64 {
        self.exits[site as usize].load(Ordering::Relaxed)
    }
}

impl TraceOp for Counter {
    fn entry(&self, e: &Entry<'_>) {
        if let Some(c) = self.entries.get(e.site as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn exit(&self, x: &Exit) {
        if let Some(c) = self.exits.get(x.site as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.last_ret.store(x.retval, Ordering::Relaxed);
        self.last_fret.store(x.fretval.to_bits(), Ordering::Relaxed);
    }
    fn wants_exit(&self) -> bool {
        self.graph
    }
}

/// The tracer is process-wide: tests that register ops run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn site(t: &Tracer, name: &str) -> u32 {
    t.functions().iter().find(|f| &*f.function == name).unwrap_or_else(|| panic!("no site for {name}")).site
}

fn word(addr: usize) -> u32 {
    u32::from_le_bytes(peek(addr, 4).try_into().unwrap())
}

/// Whether the word at `at` is `b` (not `bl`) to somewhere.
fn is_b(at: usize) -> bool {
    word(at) & 0xfc00_0000 == 0x1400_0000
}

const TREE: &str = r#"
int tree_leaf(int x) { return x + 1; }
int tree_mid(int x) { return tree_leaf(x) + tree_leaf(x + 1); }
int tree_top(int n) { int s = 0; for (int i = 0; i < n; i++) s += tree_mid(i); return s; }
long tree_fact(long n) { return n <= 1 ? 1 : n * tree_fact(n - 1); }
"#;

#[test]
fn exact_counts_for_a_known_call_tree_and_graph_exits() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Lib::open(&compile_so("tree", TREE, &[PATCHABLE, "-O1", "-fno-inline"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    let (top, mid, leaf, fact) = (site(t, "tree_top"), site(t, "tree_mid"), site(t, "tree_leaf"), site(t, "tree_fact"));
    // SAFETY: signatures as in TREE.
    let tree_top = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym("tree_top")) };
    // SAFETY: as above.
    let tree_fact = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(lib.sym("tree_fact")) };
    let top_at = lib.sym("tree_top");
    assert_eq!(peek(top_at, 8), [NOP, NOP].concat(), "gcc's pad: two NOPs");
    assert_eq!(t.function(top).unwrap().addr, top_at, "the site is the first NOP");

    let c = Counter::new(true);
    let h = t.register(c.clone(), glob_filter(["tree_*"], ["tree_fact"]).unwrap()).unwrap();
    assert!(is_b(top_at), "the first NOP is now `b stub`: {:#010x}", word(top_at));
    assert_eq!(peek(top_at + 4, 4), NOP, "the second NOP is never written");
    assert_eq!(peek(lib.sym("tree_fact"), 8), [NOP, NOP].concat(), "excluded function untouched");
    assert_eq!(tree_top(10), (0..10).map(|i| 2 * i + 3).sum::<i32>());
    assert_eq!((c.entries_of(top), c.entries_of(mid), c.entries_of(leaf)), (1, 10, 20));
    assert_eq!((c.exits_of(top), c.exits_of(mid), c.exits_of(leaf)), (1, 10, 20));
    assert_eq!(c.last_ret.load(Ordering::Relaxed), 120, "exit sees tree_top's return value (x0)");
    assert_eq!(c.entries_of(fact), 0);

    // Re-filter: only the recursive function, 20 deep.
    t.set_filter(&h, glob_filter(["tree_fact"], Vec::<String>::new()).unwrap()).unwrap();
    assert_eq!(peek(top_at, 8), [NOP, NOP].concat(), "no longer traced: the two NOPs again");
    assert_eq!(tree_fact(20), 2_432_902_008_176_640_000);
    assert_eq!((c.entries_of(fact), c.exits_of(fact)), (20, 20));
    assert_eq!(c.entries_of(top), 1);

    t.unregister(h).unwrap();
    assert_eq!(peek(lib.sym("tree_fact"), 8), [NOP, NOP].concat());
    assert_eq!(tree_fact(5), 120);
    assert_eq!(c.entries_of(fact), 20);
}

const BTI: &str = r#"
int bti_leaf(int x) { return x * 3; }
int bti_top(int n) { int s = 0; for (int i = 0; i < n; i++) s += bti_leaf(i); return s; }
"#;

/// With `-mbranch-protection=standard` gcc puts `bti c` first and the pad
/// after it: the site is the NOP after the BTI, and the function still
/// works with its return address signed and checked (PAC) around a hooked
/// return.
#[test]
fn branch_protection_entries() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Lib::open(&compile_so("bti", BTI, &[PATCHABLE, "-O1", "-fno-inline", "-mbranch-protection=standard"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    let (top, leaf) = (site(t, "bti_top"), site(t, "bti_leaf"));
    let entry = lib.sym("bti_leaf");
    assert_eq!(word(entry), 0xd503_245f, "bti c");
    assert_eq!(t.function(leaf).unwrap().addr, entry + 4, "the site follows the BTI");
    // SAFETY: signature as in BTI.
    let bti_top = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym("bti_top")) };
    let c = Counter::new(true);
    let h = t.register(c.clone(), glob_filter(["bti_*"], Vec::<String>::new()).unwrap()).unwrap();
    assert!(is_b(entry + 4));
    for _ in 0..100 {
        assert_eq!(bti_top(10), 135);
    }
    assert_eq!((c.entries_of(top), c.exits_of(top), c.entries_of(leaf), c.exits_of(leaf)), (100, 100, 1000, 1000));
    t.unregister(h).unwrap();
    assert_eq!(peek(entry + 4, 8), [NOP, NOP].concat());
}

const THREADS: &str = r#"
int thr_leaf(int x) { return x * 2; }
int thr_work(int x) { return thr_leaf(x) + 1; }
"#;

const EXACT: &str = r#"
int ex8_leaf(int x) { return x * 2; }
int ex8_work(int x) { return ex8_leaf(x) + 1; }
"#;

/// Eight threads calling while registered: every call counted, entries and
/// exits exact, from threads the tracer has never seen before (each
/// registers on its first traced call).
#[test]
fn exact_counts_from_eight_threads() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Arc::new(Lib::open(&compile_so("exact8", EXACT, &[PATCHABLE, "-O1", "-fno-inline"])));
    let t = Tracer::global();
    t.refresh().unwrap();
    // Stubs raise the count in place (TPIDR_EL0 + offset), or with
    // TEXTPOKE_TEST_DYNAMIC_TLS=1 call the enter and leave routines.
    let dynamic = std::env::var_os("TEXTPOKE_TEST_DYNAMIC_TLS").is_some_and(|v| v == "1");
    assert_eq!(t.counter_mode(), if dynamic { "calls" } else { "tls" });
    let c = Counter::new(true);
    let h = t.register(c.clone(), glob_filter(["ex8_*"], Vec::<String>::new()).unwrap()).unwrap();
    const CALLS: u64 = 20_000;
    let workers: Vec<_> = (0..8)
        .map(|k| {
            let lib = lib.clone();
            std::thread::spawn(move || {
                // SAFETY: signature as in EXACT.
                let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym("ex8_work")) };
                for _ in 0..CALLS {
                    assert_eq!(f(k), 2 * k + 1);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker got a wrong result");
    }
    let (work, leaf) = (site(t, "ex8_work"), site(t, "ex8_leaf"));
    assert_eq!((c.entries_of(work), c.exits_of(work)), (8 * CALLS, 8 * CALLS));
    assert_eq!((c.entries_of(leaf), c.exits_of(leaf)), (8 * CALLS, 8 * CALLS));
    t.unregister(h).unwrap();
}

#[test]
fn ops_come_and_go_while_eight_threads_run() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Arc::new(Lib::open(&compile_so("threads", THREADS, &[PATCHABLE, "-O1", "-fno-inline"])));
    let t = Tracer::global();
    t.refresh().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|k| {
            let (lib, stop) = (lib.clone(), stop.clone());
            std::thread::spawn(move || {
                // SAFETY: signature as in THREADS.
                let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym("thr_work")) };
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(f(k), 2 * k + 1);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let leaf = site(t, "thr_leaf");
    // Each round costs ~0.3 s under qemu with eight busy threads on two cores.
    let rounds = 100;
    let mut seen = 0;
    for round in 0..rounds {
        let a = Counter::new(round % 2 == 0);
        let b = Counter::new(true);
        let ha = t.register(a.clone(), glob_filter(["thr_*"], Vec::<String>::new()).unwrap()).unwrap();
        let hb = t.register(b.clone(), glob_filter(["thr_leaf"], Vec::<String>::new()).unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200));
        t.unregister(hb).unwrap();
        t.unregister(ha).unwrap();
        // Exits never outnumber entries.
        assert!(b.exits_of(leaf) <= b.entries_of(leaf));
        seen += a.entries_of(leaf) + b.entries_of(leaf);
    }
    assert!(seen > 0, "the ops saw calls");
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().expect("worker got a wrong result")).sum();
    assert!(total > 1000);
    assert_eq!(peek(lib.sym("thr_work"), 8), [NOP, NOP].concat());
    t.reclaim(std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(t.retired(), 0, "everything retired was freed after a grace period");
}

const ABI: &str = r#"
#include <stdarg.h>
struct pair { long a; double b; };
struct big { long a, b, c, d; };
struct hfa { double a, b, c, d; };
double abi_mix(long a, long b, long c, long d, long e, long f, long g, long h, long i,
               double x0, double x1, double x2, double x3, double x4, double x5, double x6, double x7, double x8) {
    return a + 2*b + 3*c + 4*d + 5*e + 6*f + 7*g + 8*h + 9*i
         + x0 + 2*x1 + 3*x2 + 4*x3 + 5*x4 + 6*x5 + 7*x6 + 8*x7 + 9*x8;
}
long abi_var(int n, ...) {
    va_list ap; va_start(ap, n); long s = 0; double t = 0;
    for (int i = 0; i < n; i++) { s += va_arg(ap, long); t += va_arg(ap, double); }
    va_end(ap); return s * 1000 + (long)t;
}
double abi_pair(struct pair p, struct pair q) { return p.a * p.b + q.a * q.b; }
struct big abi_big(long x) { struct big r = { x, x + 1, x + 2, x + 3 }; return r; }
struct hfa abi_hfa(double x) { struct hfa r = { x, x * 2, x * 3, x * 4 }; return r; }
long abi_call_big(long x) { struct big r = abi_big(x); return r.a + r.b + r.c + r.d; }
double abi_call_hfa(double x) { struct hfa r = abi_hfa(x); return r.a + r.b + r.c + r.d; }
double abi_call_var(void) { return (double)abi_var(3, 1L, 1.5, 2L, 2.5, 3L, 3.0); }
"#;

/// Records the arguments it saw.
struct ArgSpy {
    ints: [AtomicU64; 8],
    float0: AtomicU64,
    float7: AtomicU64,
}

impl TraceOp for ArgSpy {
    fn entry(&self, e: &Entry<'_>) {
        for (i, v) in self.ints.iter().enumerate() {
            v.store(e.arg(i).unwrap_or(0), Ordering::Relaxed);
        }
        self.float0.store(e.float_arg(0).unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        self.float7.store(e.float_arg(7).unwrap_or(0.0).to_bits(), Ordering::Relaxed);
    }
}

/// x0–x8 (x8: the indirect result of `abi_big`), q0–q7 (and `abi_hfa`'s
/// four-double result in d0–d3) survive the stub, the trampoline and the
/// return trampoline.
#[test]
fn arguments_and_results_survive_the_trampolines() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Lib::open(&compile_so("abi", ABI, &[PATCHABLE, "-O2", "-fno-inline", "-fno-ipa-sra"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Pair {
        a: i64,
        b: f64,
    }
    type Mix =
        extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64, i64, f64, f64, f64, f64, f64, f64, f64, f64, f64) -> f64;
    // SAFETY: signatures as in ABI.
    let mix = unsafe { std::mem::transmute::<usize, Mix>(lib.sym("abi_mix")) };
    // SAFETY: as above.
    let pair = unsafe { std::mem::transmute::<usize, extern "C" fn(Pair, Pair) -> f64>(lib.sym("abi_pair")) };
    // SAFETY: as above.
    let var = unsafe { std::mem::transmute::<usize, extern "C" fn() -> f64>(lib.sym("abi_call_var")) };
    // SAFETY: as above.
    let big = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(lib.sym("abi_call_big")) };
    // SAFETY: as above.
    let hfa = unsafe { std::mem::transmute::<usize, extern "C" fn(f64) -> f64>(lib.sym("abi_call_hfa")) };
    let ints: i64 = (1..=9).map(|i| i * i).sum();
    let floats: f64 = (0..9).map(|i| (i as f64 + 0.5) * (i + 1) as f64).sum();
    let check = || {
        assert_eq!(mix(1, 2, 3, 4, 5, 6, 7, 8, 9, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5), ints as f64 + floats);
        assert_eq!(pair(Pair { a: 3, b: 0.5 }, Pair { a: 4, b: 0.25 }), 2.5);
        assert_eq!(var(), 6007.0);
        assert_eq!(big(10), 46);
        assert_eq!(hfa(1.5), 15.0);
    };
    check();
    // One op (direct trampoline), then two (list trampoline), with exits.
    let spy = Arc::new(ArgSpy { ints: Default::default(), float0: AtomicU64::new(0), float7: AtomicU64::new(0) });
    let g = Counter::new(true);
    let h1 = t.register(spy.clone(), glob_filter(["abi_mix"], Vec::<String>::new()).unwrap()).unwrap();
    check();
    let seen: Vec<u64> = spy.ints.iter().map(|v| v.load(Ordering::Relaxed)).collect();
    assert_eq!(seen, [1, 2, 3, 4, 5, 6, 7, 8], "Entry::arg(0..8) are x0-x7");
    assert_eq!(f64::from_bits(spy.float0.load(Ordering::Relaxed)), 0.5, "Entry::float_arg(0) is d0");
    assert_eq!(f64::from_bits(spy.float7.load(Ordering::Relaxed)), 7.5, "Entry::float_arg(7) is d7");
    let h2 = t.register(g.clone(), glob_filter(["abi_*"], Vec::<String>::new()).unwrap()).unwrap();
    for _ in 0..100 {
        check();
    }
    assert_eq!(g.entries_of(site(t, "abi_var")), 100);
    assert_eq!(g.exits_of(site(t, "abi_pair")), 100);
    assert_eq!(g.exits_of(site(t, "abi_hfa")), 100);

    t.unregister(h1).unwrap();
    t.unregister(h2).unwrap();
    check();
}

/// Counts entries, nothing else.
struct Entries(AtomicU64);

impl TraceOp for Entries {
    fn entry(&self, _e: &Entry<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Not a test: prints where the tracer's generated code is (the
/// executable anonymous mappings) and calls a traced function
/// `MEASURE_CALLS` times, for counting the instructions a traced call runs
/// there under `qemu-aarch64 -singlestep -d exec,nochain -dfilter <ranges>`
/// (ARCHITECTURE.md, "aarch64").
#[test]
#[ignore]
fn measure_traced_call() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Lib::open(&compile_so("measure", "int m_leaf(int x) { return x + 1; }\n", &[PATCHABLE, "-O2"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    let op = Arc::new(Entries(AtomicU64::new(0)));
    let h = t.register(op.clone(), glob_filter(["m_leaf"], Vec::<String>::new()).unwrap()).unwrap();
    // SAFETY: int m_leaf(int).
    let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym("m_leaf")) };
    let n: u64 = std::env::var("MEASURE_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    f(0); // the thread registers on its first traced call
    for i in 0..n {
        assert_eq!(f(i as i32), i as i32 + 1);
    }
    assert_eq!(op.0.load(Ordering::Relaxed), n + 1);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for l in maps.lines().filter(|l| l.split_whitespace().nth(1) == Some("r-xp") && l.split_whitespace().count() == 5) {
        println!("generated code: {}", l.split_whitespace().next().unwrap());
    }
    println!("site {:#x}", lib.sym("m_leaf"));
    t.unregister(h).unwrap();
}
