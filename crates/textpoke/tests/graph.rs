//! function_graph robustness: longjmp, signal handlers, deep recursion,
//! pthread_exit and cancellation, with exits hooked by return-address
//! replacement. The program must behave exactly as untraced.

mod common;

use common::{child_scenario, compile_cxx_so, compile_so, glob_filter, rerun_self, Lib, PATCHABLE};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use textpoke::trace::Tracer;

use common::EntryExitCounts as Counts;

static SERIAL: Mutex<()> = Mutex::new(());

const SRC: &str = r#"
#include <setjmp.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#define NOTRACE __attribute__((patchable_function_entry(0, 0)))
static jmp_buf jb;
int g_leaf(int x) { return x + 1; }
void g_jumper(int depth) { if (depth == 0) longjmp(jb, 1); g_jumper(depth - 1); g_leaf(0); }
int g_longjmp_test(void) { if (setjmp(jb) == 0) { g_jumper(5); return -1; } return g_leaf(1); }
long g_recurse(long n) { return n == 0 ? 0 : 1 + g_recurse(n - 1); }
static void g_handler(int s) { g_leaf(s); }
int g_with_signal(void) { signal(SIGUSR1, g_handler); raise(SIGUSR1); return g_leaf(2); }
void g_exiter(int d) { if (d == 0) pthread_exit((void *)42); g_exiter(d - 1); }
static void *g_exit_thread(void *arg) { g_exiter(3); return 0; }
static int cleanups;
static void g_cleanup(void *p) { (*(int *)p)++; }
void g_wait_cancel(void) { for (;;) { pthread_testcancel(); g_leaf(1); usleep(100); } }
static void *g_cancel_thread(void *arg) {
    pthread_cleanup_push(g_cleanup, &cleanups);
    g_wait_cancel();
    pthread_cleanup_pop(0);
    return 0;
}
NOTRACE long g_run_exit(void) { pthread_t t; void *r; pthread_create(&t, 0, g_exit_thread, 0); pthread_join(t, &r); return (long)r; }
NOTRACE int g_run_cancel(void) {
    pthread_t t; void *r; cleanups = 0;
    pthread_create(&t, 0, g_cancel_thread, 0); usleep(5000); pthread_cancel(t); pthread_join(t, &r);
    return (r == PTHREAD_CANCELED) * 10 + cleanups;
}
"#;

fn setup() -> (Lib, Arc<Counts>, textpoke::trace::OpHandle) {
    let lib = Lib::open(&compile_so("graph", SRC, &[PATCHABLE, "-O1", "-fno-inline", "-pthread"]));
    let t = Tracer::global();
    t.refresh().unwrap();
    let c = Counts::new();
    let h = t.register(c.clone(), glob_filter(["g_*"], Vec::<String>::new()).unwrap()).unwrap();
    (lib, c, h)
}

fn call<R>(lib: &Lib, name: &str) -> R {
    // SAFETY: the test names functions taking no arguments returning R.
    unsafe { std::mem::transmute::<usize, extern "C" fn() -> R>(lib.sym(name))() }
}

#[test]
fn longjmp_over_traced_frames() {
    let _s = SERIAL.lock().unwrap();
    let (lib, c, h) = setup();
    let lost = Tracer::global().lost_exits();
    for _ in 0..1000 {
        assert_eq!(call::<i32>(&lib, "g_longjmp_test"), 2);
    }
    // Per round: g_longjmp_test, 6 g_jumper, g_leaf = 8 entries; the 6
    // jumper frames never return.
    assert_eq!(c.entries.load(Ordering::Relaxed), 8000);
    assert_eq!(c.exits.load(Ordering::Relaxed), 2000);
    assert_eq!(Tracer::global().lost_exits() - lost, 6000, "skipped frames are counted as lost exits");
    Tracer::global().unregister(h).unwrap();
}

#[test]
fn traced_functions_in_signal_handlers() {
    let _s = SERIAL.lock().unwrap();
    let (lib, c, h) = setup();
    for _ in 0..1000 {
        assert_eq!(call::<i32>(&lib, "g_with_signal"), 3);
    }
    // g_with_signal, the (static, traced) handler, g_leaf in it, g_leaf:
    // all balanced.
    assert_eq!(c.entries.load(Ordering::Relaxed), 4000);
    assert_eq!(c.exits.load(Ordering::Relaxed), 4000);
    Tracer::global().unregister(h).unwrap();
}

#[test]
fn recursion_deeper_than_the_shadow_stack() {
    let _s = SERIAL.lock().unwrap();
    let (lib, c, h) = setup();
    // SAFETY: g_recurse(long) -> long.
    let rec = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(lib.sym("g_recurse")) };
    let depth = 20_000; // deeper than a shadow stack holds
    let r = std::thread::Builder::new().stack_size(64 << 20).spawn(move || rec(depth)).unwrap().join().unwrap();
    assert_eq!(r, depth);
    let (n, x) = (c.entries.load(Ordering::Relaxed), c.exits.load(Ordering::Relaxed));
    assert_eq!(n, depth as u64 + 1);
    assert!(x > 1000 && x < n, "frames past the shadow stack's depth get no exit: {x} of {n}");
    Tracer::global().unregister(h).unwrap();
}

#[test]
fn pthread_exit_and_cancellation_through_traced_frames() {
    let _s = SERIAL.lock().unwrap();
    let (lib, c, h) = setup();
    for _ in 0..50 {
        assert_eq!(call::<i64>(&lib, "g_run_exit"), 42, "pthread_exit's value arrives");
        assert_eq!(call::<i32>(&lib, "g_run_cancel"), 11, "cancelled, and the cleanup handler ran once");
    }
    assert!(c.entries.load(Ordering::Relaxed) > 0);
    Tracer::global().unregister(h).unwrap();
}

const CXX: &str = r#"
#include <stdexcept>
#include <string>
struct Guard { int *n; ~Guard() { ++*n; } };
extern "C" int x_leaf(int x) { return x + 1; }
extern "C" int x_thrower(int d, int *dtors) {
    Guard g{dtors};
    if (d == 0) throw std::runtime_error("deep");
    return x_thrower(d - 1, dtors) + x_leaf(d);
}
extern "C" int x_catcher(int *dtors) {
    try { return x_thrower(4, dtors); } catch (const std::exception &e) { return std::string(e.what()).size(); }
}
extern "C" int x_rethrower(int *dtors) {
    try { return x_thrower(2, dtors); } catch (...) { ++*dtors; throw; }
}
extern "C" int x_outer(int *dtors) {
    try { return x_rethrower(dtors); } catch (const std::exception &e) { return 10; }
}
"#;

/// C++ exceptions unwind through traced frames whose return addresses were
/// replaced: destructors run, the catch is reached, a rethrow from a catch
/// too, the program goes on. `flags`: extra compiler flags (aarch64:
/// return addresses signed with pointer authentication).
fn cxx_exceptions(name: &str, flags: &[&str]) {
    let lib = Lib::open(&compile_cxx_so(name, CXX, &[&[PATCHABLE, "-O1", "-fno-inline"], flags].concat()));
    let t = Tracer::global();
    t.refresh().unwrap();
    let c = Counts::new();
    let h = t.register(c.clone(), glob_filter(["x_*"], Vec::<String>::new()).unwrap()).unwrap();
    // SAFETY: x_catcher(int *) -> int, x_outer(int *) -> int.
    let (catcher, outer) = unsafe {
        let f = |s| std::mem::transmute::<usize, extern "C" fn(*mut i32) -> i32>(lib.sym(s));
        (f("x_catcher"), f("x_outer"))
    };
    let lost = t.lost_exits();
    for round in 1..=100 {
        let mut dtors = 0;
        assert_eq!(catcher(&mut dtors), 4, "the catch got the exception");
        assert_eq!(dtors, 5, "every Guard was destroyed (round {round})");
        let mut dtors = 0;
        assert_eq!(outer(&mut dtors), 10, "the outer catch got the rethrown exception");
        assert_eq!(dtors, 4, "every Guard was destroyed and the first catch ran (round {round})");
    }
    // Per round: x_catcher and 5 x_thrower, of which x_catcher returns;
    // x_outer, x_rethrower and 3 x_thrower, of which x_outer returns.
    assert_eq!(c.entries.load(Ordering::Relaxed), 1100);
    assert_eq!(c.exits.load(Ordering::Relaxed), 200);
    assert_eq!(t.lost_exits() - lost, 900, "the unwound frames' exits are lost");
    t.unregister(h).unwrap();
    println!("cxx-ok");
}

#[test]
fn child_entry() {
    match child_scenario().as_deref() {
        Some("cxx") => cxx_exceptions("cxxgraph", &[]),
        Some("cxx-pac") => cxx_exceptions("cxxgraph-pac", &["-mbranch-protection=standard"]),
        _ => {}
    }
}

/// Runs a C++ scenario in a child process: if unwinding broke,
/// std::terminate would abort.
fn cxx_child(scenario: &str) {
    let out = rerun_self("child_entry", scenario);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("cxx-ok"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cxx_exceptions_through_traced_frames() {
    cxx_child("cxx");
}

/// aarch64: functions that sign their return address (`paciasp`) keep the
/// signed return trampoline in their frame; the unwinder hooks put back
/// the original signed the same way.
#[cfg(target_arch = "aarch64")]
#[test]
fn cxx_exceptions_through_frames_with_signed_return_addresses() {
    cxx_child("cxx-pac");
}
