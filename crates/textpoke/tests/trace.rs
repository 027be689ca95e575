//! The function tracer on C code compiled with patchable entries (x86-64:
//! these tests check gcc's 5-byte pads; aarch64's are in trace_aarch64.rs).
#![cfg(target_arch = "x86_64")]

mod common;

use common::{compile_so, glob_filter, peek, Lib};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use textpoke::arch::NOP5;
use textpoke::trace::{Entry, Exit, TraceError, TraceOp, Tracer};
use textpoke::{Batch, CommitOptions, Poke, PokeError, Strategy};

/// Counts entries and exits per site; remembers the last return value.
struct Counter {
    entries: Vec<AtomicU64>,
    exits: Vec<AtomicU64>,
    last_ret: AtomicU64,
    graph: bool,
}

impl Counter {
    fn new(graph: bool) -> Arc<Counter> {
        Arc::new(Counter {
            entries: (0..4096).map(|_| AtomicU64::new(0)).collect(),
            exits: (0..4096).map(|_| AtomicU64::new(0)).collect(),
            last_ret: AtomicU64::new(0),
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

const TREE: &str = r#"
int tree_leaf(int x) { return x + 1; }
int tree_mid(int x) { return tree_leaf(x) + tree_leaf(x + 1); }
int tree_top(int n) { int s = 0; for (int i = 0; i < n; i++) s += tree_mid(i); return s; }
long tree_fact(long n) { return n <= 1 ? 1 : n * tree_fact(n - 1); }
"#;

#[test]
fn exact_counts_for_a_known_call_tree_and_graph_exits() {
    let _s = SERIAL.lock().unwrap();
    let lib = Lib::open(&compile_so("tree", TREE, &["-fpatchable-function-entry=5", "-O1", "-fno-inline"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    let (top, mid, leaf, fact) = (site(t, "tree_top"), site(t, "tree_mid"), site(t, "tree_leaf"), site(t, "tree_fact"));
    // SAFETY: signatures as in TREE.
    let tree_top = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym("tree_top")) };
    // SAFETY: as above.
    let tree_fact = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(lib.sym("tree_fact")) };
    assert_eq!(peek(lib.sym("tree_top"), 5), [0x90; 5]);

    let c = Counter::new(true);
    let h = t.register(c.clone(), glob_filter(["tree_*"], ["tree_fact"]).unwrap()).unwrap();
    assert_eq!(peek(lib.sym("tree_top"), 1), [0xe8], "entry is now a call");
    assert_eq!(peek(lib.sym("tree_fact"), 5), [0x90; 5], "excluded function untouched");
    assert_eq!(tree_top(10), (0..10).map(|i| 2 * i + 3).sum::<i32>());
    assert_eq!((c.entries_of(top), c.entries_of(mid), c.entries_of(leaf)), (1, 10, 20));
    assert_eq!((c.exits_of(top), c.exits_of(mid), c.exits_of(leaf)), (1, 10, 20));
    assert_eq!(c.last_ret.load(Ordering::Relaxed), 120, "exit sees tree_top's return value");
    assert_eq!(c.entries_of(fact), 0);

    // Re-filter: only the recursive function, 20 deep.
    t.set_filter(&h, glob_filter(["tree_fact"], Vec::<String>::new()).unwrap()).unwrap();
    assert_eq!(peek(lib.sym("tree_top"), 5), NOP5, "no longer traced: one NOP");
    assert_eq!(tree_fact(20), 2_432_902_008_176_640_000);
    assert_eq!((c.entries_of(fact), c.exits_of(fact)), (20, 20));
    assert_eq!(c.entries_of(top), 1);

    t.unregister(h).unwrap();
    assert_eq!(peek(lib.sym("tree_fact"), 5), NOP5);
    assert_eq!(tree_fact(5), 120);
    assert_eq!(c.entries_of(fact), 20);
}

const REFUSE: &str = r#"
int ref_a(int x) { return x + 1; }
int ref_b(int x) { return x + 2; }
int ref_c(int x) { return x + 3; }
"#;

/// gcc's pads get their calls in one stop-machine batch: a pad whose
/// bytes changed after the scan refuses the whole batch, and no other pad
/// is written.
#[test]
fn a_batch_refused_for_one_pad_writes_no_pad() {
    let _s = SERIAL.lock().unwrap();
    let lib = Lib::open(&compile_so("refuse", REFUSE, &["-fpatchable-function-entry=5", "-O1", "-fno-inline"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    let names = ["ref_a", "ref_b", "ref_c"];
    let addrs: Vec<usize> = names.iter().map(|n| lib.sym(n)).collect();
    for &a in &addrs {
        assert_eq!(peek(a, 5), [0x90; 5], "gcc's pad");
    }
    let stop_machine = CommitOptions::strategy(Strategy::StopMachine);
    // Someone else makes ref_b's pad one NOP after the tracer found it.
    Batch::from_iter([Poke::region(addrs[1], [0x90; 5], NOP5)]).commit_with(stop_machine).unwrap();
    let filter = || glob_filter(["ref_*"], Vec::<String>::new()).unwrap();
    let c = Counter::new(true);
    let err = t.register(c.clone(), filter()).expect_err("the batch is refused");
    assert!(matches!(err, TraceError::Poke(PokeError::Mismatch { .. })), "{err:?}");
    assert!(err.to_string().contains("ref_b"), "names the site: {err}");
    assert_eq!(
        (peek(addrs[0], 5), peek(addrs[1], 5), peek(addrs[2], 5)),
        ([0x90; 5].into(), NOP5.into(), [0x90; 5].into())
    );
    assert!(t.functions().iter().filter(|f| names.contains(&&*f.function)).all(|f| f.ops == 0), "nothing traced");
    // SAFETY: signature as in REFUSE.
    let call = |i: usize| unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(addrs[i])(10) };
    assert_eq!((call(0), call(1), call(2)), (11, 12, 13));
    assert_eq!(c.entries_of(site(t, "ref_a")), 0);

    // The pad put back, the same registration goes through.
    Batch::from_iter([Poke::region(addrs[1], NOP5, [0x90; 5])]).commit_with(stop_machine).unwrap();
    let h = t.register(c.clone(), filter()).unwrap();
    for &a in &addrs {
        assert_eq!(peek(a, 1), [0xe8], "each pad is one call now");
    }
    assert_eq!((call(0), call(1), call(2)), (11, 12, 13));
    for n in names {
        assert_eq!((c.entries_of(site(t, n)), c.exits_of(site(t, n))), (1, 1), "{n}");
    }
    t.unregister(h).unwrap();
    for &a in &addrs {
        assert_eq!(peek(a, 5), NOP5, "back to one NOP (by the breakpoint protocol)");
    }
}

const THREADS: &str = r#"
int thr_leaf(int x) { return x * 2; }
int thr_work(int x) { return thr_leaf(x) + 1; }
"#;

#[test]
fn ops_come_and_go_while_eight_threads_run() {
    let _s = SERIAL.lock().unwrap();
    let lib =
        Arc::new(Lib::open(&compile_so("threads", THREADS, &["-fpatchable-function-entry=5", "-O1", "-fno-inline"])));
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
    for round in 0..1000 {
        let a = Counter::new(round % 2 == 0);
        let b = Counter::new(true);
        let ha = t.register(a.clone(), glob_filter(["thr_*"], Vec::<String>::new()).unwrap()).unwrap();
        let hb = t.register(b.clone(), glob_filter(["thr_leaf"], Vec::<String>::new()).unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200));
        t.unregister(hb).unwrap();
        t.unregister(ha).unwrap();
        // Both saw calls while registered (the workers never stop), and
        // exits never outnumber entries.
        assert!(b.exits_of(leaf) <= b.entries_of(leaf));
        if round == 999 {
            assert!(a.entries_of(leaf) + b.entries_of(leaf) > 0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().expect("worker got a wrong result")).sum();
    assert!(total > 1000);
    assert_eq!(peek(lib.sym("thr_work"), 5), NOP5);
    t.reclaim(std::time::Duration::from_secs(2)).unwrap();
    assert_eq!(t.retired(), 0, "everything retired was freed after a grace period");
}

const ABI: &str = r#"
#include <stdarg.h>
struct pair { long a; double b; };
double abi_mix(long a, long b, long c, long d, long e, long f,
               double x0, double x1, double x2, double x3, double x4, double x5, double x6, double x7) {
    return a + 2*b + 3*c + 4*d + 5*e + 6*f + x0 + 2*x1 + 3*x2 + 4*x3 + 5*x4 + 6*x5 + 7*x6 + 8*x7;
}
long abi_var(int n, ...) {
    va_list ap; va_start(ap, n); long s = 0; double t = 0;
    for (int i = 0; i < n; i++) { s += va_arg(ap, long); t += va_arg(ap, double); }
    va_end(ap); return s * 1000 + (long)t;
}
double abi_pair(struct pair p, struct pair q) { return p.a * p.b + q.a * q.b; }
double abi_call_var(void) { return (double)abi_var(3, 1L, 1.5, 2L, 2.5, 3L, 3.0); }
"#;

/// Records the first integer and float arguments it saw.
struct ArgSpy {
    int0: AtomicU64,
    float0: AtomicU64,
}

impl TraceOp for ArgSpy {
    fn entry(&self, e: &Entry<'_>) {
        self.int0.store(e.arg(0).unwrap_or(0), Ordering::Relaxed);
        self.float0.store(e.float_arg(0).unwrap_or(0.0).to_bits(), Ordering::Relaxed);
    }
}

#[test]
fn arguments_and_results_survive_the_trampolines() {
    let _s = SERIAL.lock().unwrap();
    let lib = Lib::open(&compile_so("abi", ABI, &["-fpatchable-function-entry=5", "-O2", "-fno-inline"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Pair {
        a: i64,
        b: f64,
    }
    // SAFETY: signatures as in ABI.
    let mix = unsafe {
        std::mem::transmute::<
            usize,
            extern "C" fn(i64, i64, i64, i64, i64, i64, f64, f64, f64, f64, f64, f64, f64, f64) -> f64,
        >(lib.sym("abi_mix"))
    };
    // SAFETY: signatures as in the C source above.
    let pair = unsafe { std::mem::transmute::<usize, extern "C" fn(Pair, Pair) -> f64>(lib.sym("abi_pair")) };
    // SAFETY: as above.
    let var = unsafe { std::mem::transmute::<usize, extern "C" fn() -> f64>(lib.sym("abi_call_var")) };
    let check = || {
        assert_eq!(mix(1, 2, 3, 4, 5, 6, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5), 91.0 + 186.0);
        assert_eq!(pair(Pair { a: 3, b: 0.5 }, Pair { a: 4, b: 0.25 }), 2.5);
        assert_eq!(var(), 6007.0);
    };
    check();
    // One op (direct trampoline), then two (list trampoline), with exits.
    let spy = Arc::new(ArgSpy { int0: AtomicU64::new(0), float0: AtomicU64::new(0) });
    let g = Counter::new(true);
    let h1 = t.register(spy.clone(), glob_filter(["abi_mix"], Vec::<String>::new()).unwrap()).unwrap();
    check();
    assert_eq!(spy.int0.load(Ordering::Relaxed), 1, "Entry::arg(0) is the first integer argument");
    assert_eq!(f64::from_bits(spy.float0.load(Ordering::Relaxed)), 0.5, "Entry::float_arg(0)");
    let h2 = t.register(g.clone(), glob_filter(["abi_*"], Vec::<String>::new()).unwrap()).unwrap();
    for _ in 0..100 {
        check();
    }
    assert_eq!(g.entries_of(site(t, "abi_var")), 100);
    assert_eq!(g.exits_of(site(t, "abi_pair")), 100);
    t.unregister(h1).unwrap();
    t.unregister(h2).unwrap();
    check();
}
