//! Sites in C functions compiled with `-fpatchable-function-entry=5`.
//!
//! gcc pads each entry with five one-byte NOPs: five instructions, which
//! must never be replaced by one CALL while a thread may be between them
//! (rule 1). So the pads are first rewritten to one 5-byte NOP with the
//! stop-machine strategy (a region poke: it retries while any thread is
//! stopped inside a pad), and from then on flipped NOP<->CALL with the
//! breakpoint strategy while 8 threads call the functions.

mod common;

use common::{compile_so, peek, Lib};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use textpoke::arch::{encode_call, NOP5};
use textpoke::{Batch, CommitOptions, Poke, Strategy};

const SRC: &str = r#"
__thread long tp_hits __attribute__((tls_model("initial-exec")));
#define NOTRACE __attribute__((patchable_function_entry(0, 0)))
NOTRACE long tp_get_hits(void) { return tp_hits; }
/* The counting trampoline: preserves every register the callee relies on. */
__asm__(".globl tp_count\n.type tp_count,@function\ntp_count:\n"
        "  pushq %rax\n  movq tp_hits@gottpoff(%rip), %rax\n  incq %fs:(%rax)\n"
        "  popq %rax\n  ret\n.size tp_count, .-tp_count\n");
int tp_work0(int x) { return x * 3 + 1; }
int tp_work1(int x) { return x * 5 + 2; }
long tp_work2(long a, long b, long c, long d, long e, long f) { return a + 2*b + 3*c + 4*d + 5*e + 6*f; }
double tp_work3(double x, double y) { return x * y + 0.5; }
"#;

struct CLib {
    _lib: Lib,
    funcs: [usize; 4],
    tramp: usize,
    hits: extern "C" fn() -> i64,
}

fn load() -> CLib {
    let so = compile_so("csites", SRC, &["-fpatchable-function-entry=5"]);
    let lib = Lib::open(&so);
    let funcs = [lib.sym("tp_work0"), lib.sym("tp_work1"), lib.sym("tp_work2"), lib.sym("tp_work3")];
    // SAFETY: tp_get_hits has this signature.
    let hits = unsafe { std::mem::transmute::<usize, extern "C" fn() -> i64>(lib.sym("tp_get_hits")) };
    CLib { tramp: lib.sym("tp_count"), funcs, hits, _lib: lib }
}

/// Calls function `i` with fixed arguments; checks its result.
fn call(c: &CLib, i: usize) {
    // SAFETY: the signatures match the C source.
    unsafe {
        match i {
            0 => assert_eq!(std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(c.funcs[0])(7), 22),
            1 => assert_eq!(std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(c.funcs[1])(7), 37),
            2 => {
                let f = std::mem::transmute::<usize, extern "C" fn(i64, i64, i64, i64, i64, i64) -> i64>(c.funcs[2]);
                assert_eq!(f(1, 2, 3, 4, 5, 6), 91)
            }
            _ => assert_eq!(std::mem::transmute::<usize, extern "C" fn(f64, f64) -> f64>(c.funcs[3])(1.5, 3.0), 5.0),
        }
    }
}

#[test]
fn c_patchable_entries_flip_under_load() {
    let c = Arc::new(load());
    for &f in &c.funcs {
        assert_eq!(peek(f, 5), [0x90; 5], "gcc pads entries with one-byte NOPs");
    }
    // Calls keep working while the pads are rewritten.
    let phase = Arc::new(AtomicU64::new(2)); // 0 flipping, 1 on, 2 off; + epoch << 2
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (c, phase, stop, violations, calls) =
                (c.clone(), phase.clone(), stop.clone(), violations.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut i = t;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let ph = phase.load(Ordering::Acquire);
                    let before = (c.hits)();
                    call(&c, i % 4);
                    let after = (c.hits)();
                    if ph == phase.load(Ordering::Acquire) && ph & 3 != 0 {
                        let want = if ph & 3 == 1 { 1 } else { 0 };
                        if after - before != want {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();

    let prepare: Batch = c.funcs.iter().map(|&f| Poke::region(f, [0x90; 5], NOP5)).collect();
    let st = prepare.commit_with(CommitOptions::strategy(Strategy::StopMachine)).unwrap();
    assert_eq!(st.written, 4);
    let on: Batch = c.funcs.iter().map(|&f| Poke::new(f, NOP5, encode_call(f, c.tramp).unwrap())).collect();
    let off: Batch = on.pokes().iter().map(Poke::reversed).collect();
    let mut epoch = 0u64;
    for round in 0..1000u64 {
        phase.store(0, Ordering::Release);
        let enable = round % 2 == 0;
        let st = if enable { on.commit() } else { off.commit() }.unwrap();
        assert_eq!(st.sync_rounds, 3);
        epoch += 1;
        phase.store((epoch << 2) | if enable { 1 } else { 2 }, Ordering::Release);
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_micros(100) {
            std::hint::spin_loop();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a worker saw a wrong result");
    }
    assert_eq!(violations.load(Ordering::Relaxed), 0, "miscounted calls in steady phases");
    assert!(calls.load(Ordering::Relaxed) > 10_000);
    for &f in &c.funcs {
        assert_eq!(peek(f, 5), NOP5);
    }
    // From this thread: one enabled call counts once, with results intact.
    on.commit().unwrap();
    let before = (c.hits)();
    for i in 0..4 {
        call(&c, i);
    }
    assert_eq!((c.hits)() - before, 4);
    off.commit().unwrap();
}
