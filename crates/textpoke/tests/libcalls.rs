//! Library calls through the PLT (`trace::plt`): a C library's calls to
//! `malloc`, `free`, `strlen` and `pthread_create` from 8 threads are
//! counted exactly, entries and exits; the GOT switch is turned off and on
//! while threads call through it; `-F`-style filters choose among them.
//! Once with a lazily bound library (the slots are resolved by textpoke),
//! once with a `-z now -z relro` one (a read-only GOT).

mod common;

use common::{compile_so, glob_filter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use textpoke::trace::{Entry, Exit, TraceOp, Tracer};

const SITES: usize = 1 << 16;

/// Counts entries and exits per site.
struct PerSite {
    entries: Vec<AtomicU64>,
    exits: Vec<AtomicU64>,
}

impl PerSite {
    fn new() -> PerSite {
        PerSite { entries: (0..SITES).map(|_| 0.into()).collect(), exits: (0..SITES).map(|_| 0.into()).collect() }
    }
    fn reset(&self) {
        self.entries.iter().chain(&self.exits).for_each(|c| c.store(0, Ordering::Relaxed));
    }
}

impl TraceOp for PerSite {
    fn entry(&self, e: &Entry<'_>) {
        if let Some(c) = self.entries.get(e.site as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn exit(&self, x: &Exit) {
        if let Some(c) = self.exits.get(x.site as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn wants_exit(&self) -> bool {
        true
    }
}

fn src(prefix: &str) -> String {
    format!(
        r#"
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
static volatile size_t sink;
static void *work(void *arg) {{
    long n = (long)arg;
    for (long i = 0; i < n; i++) {{
        char *p = malloc(16 + (i & 7));
        p[0] = 'a'; p[1] = 'b'; p[2] = 0;
        sink += strlen(p);
        free(p);
    }}
    return 0;
}}
/* Every thread makes n calls of malloc, strlen and free; returns the
   pthread_create calls made. */
int {prefix}_run(int threads, long n) {{
    pthread_t t[64];
    int made = 0;
    for (int i = 0; i < threads; i++) made += pthread_create(&t[i], 0, work, (void *)n) == 0;
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    return made;
}}
"#
    )
}

/// The calls counted at the sites of the functions named `name` of the
/// library at `[lo, hi)`... all PLT sites are named after the import, so
/// the count is over every site of that name (only the test's library
/// has PLT sites in this binary).
fn counts(op: &PerSite, name: &str) -> (u64, u64) {
    let mut sum = (0, 0);
    for f in Tracer::global().functions().iter().filter(|f| &*f.function == name) {
        sum.0 += op.entries[f.site as usize].load(Ordering::Relaxed);
        sum.1 += op.exits[f.site as usize].load(Ordering::Relaxed);
    }
    sum
}

type Run = unsafe extern "C" fn(i32, libc::c_long) -> i32;

fn open(path: &std::path::Path, mode: libc::c_int, sym: &str) -> Run {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the library stays loaded for the process.
    let h = unsafe { libc::dlopen(c.as_ptr(), mode) };
    assert!(!h.is_null(), "dlopen {path:?}");
    let s = std::ffi::CString::new(sym).unwrap();
    // SAFETY: valid handle and name.
    let f = unsafe { libc::dlsym(h, s.as_ptr()) };
    assert!(!f.is_null());
    // SAFETY: the C function's signature above.
    unsafe { std::mem::transmute::<*mut libc::c_void, Run>(f) }
}

const THREADS: i32 = 8;
const N: i64 = 2000;

fn scenario(prefix: &str, link: &[&str], mode: libc::c_int) {
    let mut flags = vec![common::PATCHABLE, "-O1", "-fno-builtin", "-pthread"];
    flags.extend_from_slice(link);
    let run = open(&compile_so(prefix, &src(prefix), &flags), mode, &format!("{prefix}_run"));
    let t = Tracer::global();
    t.refresh().unwrap();
    let op = Arc::new(PerSite::new());
    let h =
        t.register(op.clone(), glob_filter(["malloc", "free", "strlen", "pthread_create"], [""; 0]).unwrap()).unwrap();
    assert!(t.set_libcalls(true).unwrap() >= 5, "malloc, free, strlen, pthread_create, pthread_join switched");
    assert!(t.libcalls());
    let join = t.functions().into_iter().find(|f| &*f.function == "pthread_join").expect("a pthread_join PLT site");
    assert_eq!(join.ops, 0, "-F leaves pthread_join untraced");

    // Exact counts with 8 threads.
    // SAFETY: the library's function, called as declared.
    assert_eq!(unsafe { run(THREADS, N) }, THREADS);
    let calls = THREADS as u64 * N as u64;
    for (name, want) in [("malloc", calls), ("free", calls), ("strlen", calls), ("pthread_create", THREADS as u64)] {
        assert_eq!(counts(&op, name), (want, want), "{prefix}: {name} entries and exits");
    }

    // Off: the GOT holds the real targets again, nothing is counted.
    op.reset();
    assert!(t.set_libcalls(false).unwrap() >= 5);
    // SAFETY: as above.
    unsafe { run(THREADS, N) };
    assert_eq!(counts(&op, "malloc"), (0, 0), "{prefix}: off");

    // Switched off and on while 8 threads call through the slots: every
    // call still reaches malloc (the program's own count is right), every
    // entry seen has its exit.
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: as above.
                assert_eq!(unsafe { run(THREADS, 200) }, THREADS);
                rounds += 1;
            }
            rounds
        })
    };
    for i in 0..40 {
        t.set_libcalls(i % 2 == 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    t.set_libcalls(false).unwrap();
    stop.store(true, Ordering::Relaxed);
    let rounds = runner.join().unwrap();
    let (entries, exits) = counts(&op, "malloc");
    assert_eq!(entries, exits, "{prefix}: every traced malloc returned through its exit");
    assert!(entries <= rounds * THREADS as u64 * 200, "{prefix}: no call counted twice");

    // On again: exact again.
    op.reset();
    t.set_libcalls(true).unwrap();
    // SAFETY: as above.
    unsafe { run(THREADS, N) };
    assert_eq!(counts(&op, "strlen"), (calls, calls), "{prefix}: on again");
    assert_eq!(counts(&op, "pthread_create"), (THREADS as u64, THREADS as u64));

    // -N malloc while on: its site stops, the others go on.
    op.reset();
    t.set_filter(&h, glob_filter(["free", "strlen"], [""; 0]).unwrap()).unwrap();
    // SAFETY: as above.
    unsafe { run(THREADS, N) };
    assert_eq!(counts(&op, "malloc"), (0, 0));
    assert_eq!(counts(&op, "free"), (calls, calls));
    t.set_libcalls(false).unwrap();
    t.unregister(h).unwrap();
}

#[test]
fn libc_calls_counted_and_switched_while_running() {
    // Lazy binding: the slots still point into the PLT when switched on.
    scenario("lclazy", &[], libc::RTLD_LAZY);
    // BIND_NOW with full RELRO: the GOT is read-only.
    scenario("lcnow", &["-Wl,-z,now", "-Wl,-z,relro"], libc::RTLD_NOW);
}
