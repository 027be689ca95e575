//! Tracing into the recorder, end to end: sites of every kind the
//! compilers make (`-pg -mfentry -mnop-mcount`, `-fpatchable-function-entry`
//! with N > 5 and M > 0; on aarch64 its two-NOP pads), 8 threads with
//! signal handlers, the trace read
//! back by the validating reader: exact counts, entries and exits balanced
//! per thread; count-only mode; sites forgotten on dlclose.

#[path = "../../textpoke/tests/common/mod.rs"]
mod common;

use common::{compile_so, Lib};
use std::collections::HashMap;
use std::sync::Arc;
use textpoke::trace::Tracer;
use textpoke_record::filter::glob_filter;
use textpoke_record::tracedata::{RecordKind, Trace};
use textpoke_record::RecordOp;
use textpoke_record::{self as record, RecorderConfig};

/// The recorder is one per process: its tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A library whose `P_run` calls `P_mid` (which calls `P_leaf`) and
/// raises `sig` 4 times; the handler (installed from Rust, as non-PIC code
/// cannot take a function's address in a shared object) calls `P_leaf`.
fn source(p: &str, sig: i32) -> String {
    format!(
        r#"
#include <signal.h>
static volatile int {p}_sink; /* keeps calls of leaf from being optimised away */
int {p}_leaf(int x) {{ {p}_sink = x; return x + 1; }}
int {p}_mid(int x) {{ return {p}_leaf(x) * 2; }}
void {p}_handler(int s) {{ {p}_leaf(s); }}
int {p}_run(int n) {{
    int s = 0;
    for (int i = 0; i < n; i++) {{ s += {p}_mid(i); if (i % 25 == 0) raise({sig}); }}
    return s;
}}
"#
    )
}

fn expected_run(n: i32) -> i32 {
    (0..n).map(|i| (i + 1) * 2).sum()
}

struct Libs {
    mcount: Lib,
    patchable: Lib,
}

fn load() -> Libs {
    // gcc refuses -mnop-mcount with PIC: a non-PIC shared library (TEXTREL).
    // On aarch64 (no mcount sites, and the tracer's entries are two NOPs)
    // both libraries have the plain pads.
    let (mflags, pflags): (&[&str], &[&str]) = if cfg!(target_arch = "x86_64") {
        (
            &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pic", "-O1", "-fno-inline"],
            &["-fpatchable-function-entry=8,3", "-O1", "-fno-inline"],
        )
    } else {
        (&[common::PATCHABLE, "-O1", "-fno-inline"], &[common::PATCHABLE, "-O1", "-fno-inline"])
    };
    let mcount = compile_so("recm", &source("recm", libc::SIGUSR1), mflags);
    let patchable = compile_so("recp", &source("recp", libc::SIGUSR2), pflags);
    let libs = Libs { mcount: Lib::open(&mcount), patchable: Lib::open(&patchable) };
    for (lib, handler, sig) in
        [(&libs.mcount, "recm_handler", libc::SIGUSR1), (&libs.patchable, "recp_handler", libc::SIGUSR2)]
    {
        // SAFETY: installing the library's `void handler(int)`.
        unsafe { libc::signal(sig, lib.sym(handler)) };
    }
    libs
}

fn run_threads(libs: &Arc<Libs>) {
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let libs = libs.clone();
            std::thread::spawn(move || {
                for (lib, name) in [(&libs.mcount, "recm_run"), (&libs.patchable, "recp_run")] {
                    // SAFETY: int f(int).
                    let f = unsafe { std::mem::transmute::<usize, extern "C" fn(i32) -> i32>(lib.sym(name)) };
                    assert_eq!(f(100), expected_run(100));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Per function name: (entries, exits), summed over threads; and checks
/// each thread's entries and exits balance per function.
fn tally(trace: &Trace) -> HashMap<String, (u64, u64)> {
    let mut total: HashMap<String, (u64, u64)> = HashMap::new();
    for th in trace.threads() {
        let mut mine: HashMap<String, i64> = HashMap::new();
        for r in trace.records(th).unwrap() {
            let r = r.unwrap();
            let name = trace.name(r.func).to_string();
            let t = total.entry(name.clone()).or_default();
            let m = mine.entry(name).or_default();
            match r.kind {
                RecordKind::Entry => {
                    t.0 += 1;
                    *m += 1;
                }
                RecordKind::Exit => {
                    t.1 += 1;
                    *m -= 1;
                }
                RecordKind::Gap => panic!("events lost: {r:?}"),
                RecordKind::Cut => {}
            }
        }
        for (f, bal) in mine {
            assert_eq!(bal, 0, "thread {}: {f} entries and exits do not balance", th.tid());
        }
    }
    total
}

#[test]
fn record_compiled_sites_end_to_end() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let libs = Arc::new(load());
    let t = Tracer::global();
    t.refresh().unwrap();
    let names: Vec<String> = t.functions().iter().map(|f| f.function.to_string()).collect();
    for f in ["recm_leaf", "recm_mid", "recm_run", "recm_handler", "recp_leaf", "recp_mid", "recp_run", "recp_handler"]
    {
        assert!(names.iter().any(|n| n == f), "site of {f} found: {names:?}");
    }
    let dir =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("trace-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // function_graph records.
    let rec = record::start(RecorderConfig::new(dir.join("graph"))).unwrap();
    let h = t.register(Arc::new(RecordOp::graph()), glob_filter(["rec?_*"], Vec::<String>::new()).unwrap()).unwrap();
    run_threads(&libs);
    t.unregister(h).unwrap();
    rec.stop().unwrap();
    let trace = Trace::open(dir.join("graph")).unwrap();
    assert!(trace.is_complete());
    assert_eq!(trace.dropped(), 0);
    let got = tally(&trace);
    for p in ["recm", "recp"] {
        // Per thread: run 1, mid 100, handler 4, leaf 100 + 4.
        assert_eq!(got[&format!("{p}_run")], (8, 8));
        assert_eq!(got[&format!("{p}_mid")], (800, 800));
        assert_eq!(got[&format!("{p}_handler")], (32, 32));
        assert_eq!(got[&format!("{p}_leaf")], (832, 832));
    }

    // Count-only.
    let rec = record::start(RecorderConfig::new(dir.join("counts")).count_only()).unwrap();
    let h = t.register(Arc::new(RecordOp::count_only()), glob_filter(["recp_*"], ["recp_handler"]).unwrap()).unwrap();
    run_threads(&libs);
    t.unregister(h).unwrap();
    rec.stop().unwrap();
    let trace = Trace::open(dir.join("counts")).unwrap();
    let counts: HashMap<String, u64> =
        trace.counts().iter().map(|&(f, n)| (trace.name(f).to_string(), n)).filter(|(_, n)| *n > 0).collect();
    let want: HashMap<String, u64> =
        [("recp_run", 8), ("recp_mid", 800), ("recp_leaf", 832)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(counts, want);

    // dlclose: the sites are forgotten at the next refresh.
    let libs = Arc::try_unwrap(libs).ok().expect("threads joined");
    // SAFETY: restoring the default dispositions before unloading the handlers.
    unsafe {
        libc::signal(libc::SIGUSR1, libc::SIG_DFL);
        libc::signal(libc::SIGUSR2, libc::SIG_DFL);
    }
    libs.mcount.close();
    libs.patchable.close();
    t.refresh().unwrap();
    assert!(!t.functions().iter().any(|f| f.function.starts_with("rec")), "sites of unloaded libraries are forgotten");
}

/// A count trampoline counts under the function's id, which its stub
/// pushes: not under the site's index (the stubs pushed the index, which
/// counted every call of `cid_a` for function 0 here).
#[test]
fn count_trampolines_count_the_function_of_the_site() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..3 {
        record::register_function(0x7000 + i, &format!("cid_dummy{i}"));
    }
    let lib = Lib::open(&compile_so(
        "cid",
        "__attribute__((noipa)) int cid_a(int x) { return x + 1; }\n\
         __attribute__((noipa)) int cid_b(int x) { return x + 2; }",
        &[common::PATCHABLE, "-O1"],
    ));
    let t = Tracer::global();
    t.refresh().unwrap();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("trace-cid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rec = record::start(RecorderConfig::new(&dir).count_only()).unwrap();
    let h =
        t.register(Arc::new(RecordOp::count_only()), glob_filter(["cid_?"], Vec::<String>::new()).unwrap()).unwrap();
    let f = |n: &str| t.functions().into_iter().find(|x| &*x.function == n).unwrap();
    assert_eq!(f("cid_a").trampoline, textpoke::trace::TrampolineKind::Count);
    type F = extern "C" fn(i32) -> i32;
    // SAFETY: both are `int f(int)`.
    let (a, b) = unsafe {
        (std::mem::transmute::<usize, F>(lib.sym("cid_a")), std::mem::transmute::<usize, F>(lib.sym("cid_b")))
    };
    for i in 0..10 {
        assert_eq!(a(i), i + 1);
    }
    assert_eq!(b(1), 3);
    t.unregister(h).unwrap();
    rec.stop().unwrap();
    let trace = Trace::open(&dir).unwrap();
    let counts: HashMap<String, u64> =
        trace.counts().iter().filter(|c| c.1 > 0).map(|&(id, n)| (trace.name(id).to_string(), n)).collect();
    assert_eq!(counts, HashMap::from([("cid_a".to_string(), 10), ("cid_b".to_string(), 1)]));
}
