//! Graph trampolines against the generic hot path: every scenario is
//! recorded twice, with inline recording on (function-entry sites whose only
//! op is `RecordOp::graph` record entry and exit in generated code) and off
//! (the same op called through the Rust hot path), each in its own
//! recording session, and the per-thread record sequences (kind, function,
//! depth, return value) must be the same — and the expected ones, exactly.
//!
//! Scenarios: a call tree with recursion and a sibling call; arguments and
//! return values of every kind the ABI has (stack arguments, floats,
//! varargs, structs by value); longjmp over traced frames; a signal storm
//! on 8 threads whose handler is traced; recursion deeper than the shadow
//! stack; C++ exceptions thrown through traced frames (and caught inside a
//! destructor while unwinding).
//!
//! The storm and the C++ scenarios run in a child process (`child_entry`):
//! a crash, an abort or std::terminate there fails the test with the
//! child's output instead of taking the test binary down.

#[path = "../../textpoke/tests/common/mod.rs"]
mod common;

use common::{child_scenario, compile_cxx_so, compile_so, Lib};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use textpoke::trace::{slow_calls_of_this_thread, OpHandle, Tracer, TrampolineKind};
use textpoke_record::filter::glob_filter;
use textpoke_record::tracedata::{RecordKind, Trace};
use textpoke_record::RecordOp;
use textpoke_record::{self as record, ClockChoice, ClockSource, Recorder, RecorderConfig};

/// Tests share the global tracer, the recorder and `lost_exits`.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Sessions and records.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Graph trampolines (the default).
    Inline,
    /// `set_inline_recording(false)`: the generic hot path.
    Generic,
}

const MODES: [Mode; 2] = [Mode::Inline, Mode::Generic];

/// Segments no scenario fills: the inline paths never hand over to the
/// slow one at a segment's end, so slow calls can be counted exactly.
const BIG_SEGMENT: usize = 1 << 24;

impl Mode {
    fn inline(self) -> bool {
        self == Mode::Inline
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Inline => "inline",
            Mode::Generic => "generic",
        }
    }
    /// What `functions()` must say of the traced functions.
    fn kind(self) -> TrampolineKind {
        match self {
            Mode::Inline => TrampolineKind::Graph,
            Mode::Generic => TrampolineKind::Direct,
        }
    }
}

/// One record, timestamps and tids left out.
#[derive(Clone, PartialEq, Eq)]
struct Ev {
    exit: bool,
    name: Arc<str>,
    depth: u32,
    value: Option<u64>,
}

impl Ev {
    fn entry(name: &Arc<str>, depth: usize) -> Ev {
        Ev { exit: false, name: name.clone(), depth: depth as u32, value: None }
    }
    fn exit(name: &Arc<str>, depth: usize, value: u64) -> Ev {
        Ev { exit: true, name: name.clone(), depth: depth as u32, value: Some(value) }
    }
    /// An exit whose return value (rax) means nothing (a double, a pointer).
    fn exit_opaque(name: &Arc<str>, depth: usize) -> Ev {
        Ev { exit: true, name: name.clone(), depth: depth as u32, value: None }
    }
}

impl fmt::Debug for Ev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}@{}", if self.exit { "X" } else { "E" }, self.name, self.depth)?;
        match self.value {
            Some(v) => write!(f, "={v:#x}"),
            None => Ok(()),
        }
    }
}

fn names<const N: usize>(n: [&str; N]) -> [Arc<str>; N] {
    n.map(Arc::from)
}

/// Undoes a session's changes even when the test fails inside it.
struct Cleanup {
    op: Option<OpHandle>,
    rec: Option<Recorder>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let t = Tracer::global();
        if let Some(h) = self.op.take() {
            let _ = t.unregister(h);
        }
        if let Some(r) = self.rec.take() {
            let _ = r.stop();
        }
        t.set_inline_recording(true);
    }
}

struct Session {
    trace: Trace,
    /// Threads with records: tid and records.
    threads: Vec<(i32, Vec<Ev>)>,
    dir: PathBuf,
}

impl Session {
    /// The records of the one thread that recorded.
    fn single(&self) -> &[Ev] {
        assert_eq!(self.threads.len(), 1, "exactly one thread recorded");
        &self.threads[0].1
    }
}

fn trace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("graph-record-{}", std::process::id()))
}

/// Checks that exactly the functions `traced` of `prefix` have sites, all
/// called through trampolines of kind `want`.
fn assert_kinds(prefix: &str, traced: &[&str], want: TrampolineKind) {
    let p = format!("{prefix}_");
    let got: BTreeMap<String, TrampolineKind> = Tracer::global()
        .functions()
        .iter()
        .filter(|f| f.function.starts_with(&p))
        .map(|f| (f.function.to_string(), f.trampoline))
        .collect();
    let names: BTreeSet<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(names, traced.iter().copied().collect::<BTreeSet<_>>(), "sites of {prefix}");
    for (f, k) in &got {
        assert_eq!(*k, want, "{f} is called through a {k:?} trampoline, want {want:?}");
    }
}

/// Records `body` in a session of its own with `RecordOp::graph()` tracing
/// `prefix_*`, inline recording as `mode` says; returns its result and the
/// trace read back (complete, every exit with its return value).
fn session<R>(
    scenario: &str,
    mode: Mode,
    prefix: &str,
    traced: &[&str],
    segment_bytes: usize,
    body: impl FnOnce() -> R,
) -> (R, Session) {
    let t = Tracer::global();
    t.refresh().unwrap();
    let mut c = Cleanup { op: None, rec: None };
    t.set_inline_recording(mode.inline());
    let dir = trace_root().join(format!("{scenario}-{}-{segment_bytes}", mode.name()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = RecorderConfig::new(&dir);
    // Small segments: the inline paths hand over to the slow one at every
    // segment's end, thousands of times per scenario.
    cfg.segment_bytes = segment_bytes;
    // Graph trampolines record inline only when the recorder reads the TSC
    // (this machine's clocksource); forced so the inline path is what runs.
    cfg.clock = ClockChoice::Force(ClockSource::Tsc);
    c.rec = Some(record::start(cfg).unwrap());
    let filter = glob_filter([format!("{prefix}_*")], Vec::<String>::new()).unwrap();
    // Every traced function's return value is asked for.
    let op = RecordOp::graph().with_retval(filter.clone());
    c.op = Some(t.register(Arc::new(op), filter).unwrap());
    assert_kinds(prefix, traced, mode.kind());
    let r = body();
    t.unregister(c.op.take().unwrap()).unwrap();
    c.rec.take().unwrap().stop().unwrap();
    drop(c);
    assert_kinds(prefix, traced, TrampolineKind::None);
    let trace = Trace::open(&dir).unwrap();
    assert!(trace.is_complete(), "{scenario} {}: trace complete", mode.name());
    let mut interned: HashMap<u32, Arc<str>> = HashMap::new();
    let mut threads = Vec::new();
    for th in trace.threads() {
        if th.words == 0 {
            continue;
        }
        let cut: u64 =
            trace.records(th).unwrap().map(|r| r.unwrap()).filter(|r| r.kind == RecordKind::Cut).map(|r| r.lost).sum();
        assert_eq!(cut, th.meta.dropped_nested, "{scenario}: every event a handler could not record is marked");
        let evs: Vec<Ev> = trace
            .records(th)
            .unwrap()
            .map(|r| r.unwrap())
            // A signal handler's calls inside the tracer are marked, not
            // recorded (the storm counts them as nested drops).
            .filter(|r| r.kind != RecordKind::Cut)
            .map(|r| {
                assert_ne!(r.kind, RecordKind::Gap, "{scenario}: events lost");
                let name = interned.entry(r.func.0).or_insert_with(|| Arc::from(trace.name(r.func))).clone();
                let exit = r.kind == RecordKind::Exit;
                assert_eq!(exit, r.value.is_some(), "{scenario}: every exit, and only exits, carry a return value");
                Ev { exit, name, depth: r.depth, value: r.value }
            })
            .collect();
        threads.push((th.tid(), evs));
    }
    (r, Session { trace, threads, dir })
}

/// Drops the return values of exits of `opaque` functions (whose rax is
/// not their result: doubles, hidden struct pointers).
fn mask(evs: &[Ev], opaque: &[&str]) -> Vec<Ev> {
    evs.iter()
        .map(|e| {
            let mut e = e.clone();
            if e.exit && opaque.contains(&&*e.name) {
                e.value = None;
            }
            e
        })
        .collect()
}

/// `got` must be `want`, record for record.
fn assert_seq(what: &str, got: &[Ev], want: impl IntoIterator<Item = Ev>) {
    let mut want = want.into_iter();
    let mut n = 0;
    loop {
        let (g, w) = (got.get(n), want.next());
        if g.is_none() && w.is_none() {
            return;
        }
        if g != w.as_ref() {
            let lo = n.saturating_sub(6);
            let ctx: Vec<String> = got[lo..(n + 4).min(got.len())].iter().map(|e| format!("{e:?}")).collect();
            panic!("{what}: record {n} of {} is {g:?}, want {w:?}; records {lo}..: {ctx:?}", got.len());
        }
        n += 1;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nesting {
    /// No frame is skipped: every entry is at the depth of the entries
    /// still open, every exit closes the newest one.
    Strict,
    /// Frames may be skipped (longjmp, exceptions): an entry or exit first
    /// closes the open entries at or below (deeper than) its depth.
    Skips,
    /// Entry depths are not checked against the open entries (a signal
    /// handler's may be one less: it ran between the interrupted function's
    /// entry record and its shadow push); exits must pair up exactly.
    Signals,
}

/// Pairs exits with entries: each exit closes an entry of the same function
/// and depth. Returns how many entries stay open.
fn check_nesting(what: &str, evs: &[Ev], how: Nesting) -> usize {
    let mut open: Vec<&Ev> = Vec::new();
    for (i, e) in evs.iter().enumerate() {
        if how == Nesting::Skips {
            let deeper = |o: &&Ev| if e.exit { o.depth > e.depth } else { o.depth >= e.depth };
            while open.last().is_some_and(deeper) {
                open.pop();
            }
        }
        if !e.exit {
            if how != Nesting::Signals {
                assert_eq!(e.depth as usize, open.len(), "{what}: record {i} {e:?}: depth of an entry");
            }
            open.push(e);
            continue;
        }
        let o = open.pop().unwrap_or_else(|| panic!("{what}: record {i} {e:?} exits with nothing open"));
        assert!(o.name == e.name && o.depth == e.depth, "{what}: record {i} {e:?} closes {o:?}");
    }
    open.len()
}

/// Runs `f` on a fresh thread (depth 0, no shadow stack or buffer yet).
/// This thread's calls through the tracer's hot path that the tracer
/// caused, in inline mode: the recorder's own slow path (a segment to
/// start or change, a long time gap between two events) also takes the
/// hot path from inline code, and those are subtracted.
fn slow_calls(mode: Mode) -> u64 {
    let all = slow_calls_of_this_thread();
    match mode {
        Mode::Inline => all - record::slow_events_of_this_thread(),
        Mode::Generic => all,
    }
}

fn on_thread<R: Send + 'static>(stack: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
    let h = std::thread::Builder::new().stack_size(stack).spawn(f).unwrap();
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The library's function `name` as a `F` (a function pointer type).
///
/// # Safety
/// `F` must be the C function's exact signature.
unsafe fn func<F: Copy>(lib: &Lib, name: &str) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<usize>());
    let p = lib.sym(name);
    // SAFETY: the caller's promise.
    unsafe { std::mem::transmute_copy::<usize, F>(&p) }
}

/// Runs `child_entry` in a child process with `TEXTPOKE_CHILD=scenario`;
/// returns whether it exited successfully and its output. A child hung
/// for 5 minutes is killed (a hang guard, not a timing assertion).
fn run_child(scenario: &str) -> (bool, String) {
    let out = trace_root().join(format!("child-{scenario}"));
    std::fs::create_dir_all(&out).unwrap();
    let (o, e) = (out.join("stdout"), out.join("stderr"));
    // Under qemu-user without binfmt_misc (`.ci/aarch64`) an emulated
    // process cannot exec an aarch64 program itself: the child runs under
    // the emulator the variable names (a host program, exec'd natively).
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match std::env::var_os("TEXTPOKE_TEST_CHILD_RUNNER") {
        Some(runner) => {
            let mut c = std::process::Command::new(runner);
            c.arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    let mut child = cmd
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("TEXTPOKE_CHILD", scenario)
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let mut hung = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            hung = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let text = format!(
        "child {scenario}: {status}{}\n--- stdout\n{}\n--- stderr\n{}",
        if hung { " (killed: hung for 5 minutes)" } else { "" },
        std::fs::read_to_string(&o).unwrap_or_default(),
        std::fs::read_to_string(&e).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir(trace_root());
    (status.success() && !hung, text)
}

const PATCHABLE: &str = "-fpatchable-function-entry=5";

// ---------------------------------------------------------------------------
// 1. A call tree.

const C1: &str = r#"
#define F __attribute__((noinline, noclone))
static volatile long c1_sink;
F long c1_leaf(long x) { c1_sink = x; return x + 1; }
F long c1_mid(long x) { return c1_leaf(x) * 2; }
F long c1_rec(long n) { if (n == 0) return 0; long r = c1_rec(n - 1); c1_sink = r; return r + 1; }
F long c1_tail_inner(long x) { c1_sink = x; return x * 3; }
F long c1_tail_outer(long x) { return c1_tail_inner(x + 1); } /* a sibling call: jmp c1_tail_inner */
F long c1_run(long n) {
    long s = 0;
    for (long i = 0; i < n; i++) s += c1_mid(i);
    s += c1_rec(3);
    s += c1_tail_outer(n);
    return s;
}
"#;

const C1_TRACED: [&str; 6] = ["c1_leaf", "c1_mid", "c1_rec", "c1_run", "c1_tail_inner", "c1_tail_outer"];

fn c1_result(n: i64) -> i64 {
    (0..n).map(|i| 2 * (i + 1)).sum::<i64>() + 3 + 3 * (n + 1)
}

/// Traced calls in one `c1_run(n)`.
fn c1_calls(n: usize) -> usize {
    1 + 2 * n + 4 + 2
}

fn c1_records(n: i64, out: &mut Vec<Ev>) {
    let [run, mid, leaf, rec, outer, inner] =
        names(["c1_run", "c1_mid", "c1_leaf", "c1_rec", "c1_tail_outer", "c1_tail_inner"]);
    out.push(Ev::entry(&run, 0));
    for i in 0..n {
        out.extend([Ev::entry(&mid, 1), Ev::entry(&leaf, 2)]);
        out.extend([Ev::exit(&leaf, 2, (i + 1) as u64), Ev::exit(&mid, 1, (2 * (i + 1)) as u64)]);
    }
    out.extend((1..=4).map(|d| Ev::entry(&rec, d)));
    out.extend((1..=4).rev().map(|d| Ev::exit(&rec, d, 4 - d as u64)));
    out.extend([Ev::entry(&outer, 1), Ev::entry(&inner, 2)]);
    out.extend([Ev::exit(&inner, 2, 3 * (n + 1) as u64), Ev::exit(&outer, 1, 3 * (n + 1) as u64)]);
    out.push(Ev::exit(&run, 0, c1_result(n) as u64));
}

/// Whether `outer`'s code (after its 5-byte site) jumps to `inner`.
fn is_sibling_call(outer: usize, inner: usize) -> bool {
    let code = common::peek(outer + 5, 16);
    (0..code.len()).any(|i| match code[i] {
        0xeb if i + 2 <= code.len() => (outer + 5 + i + 2).wrapping_add(code[i + 1] as i8 as isize as usize) == inner,
        0xe9 if i + 5 <= code.len() => {
            let rel = i32::from_le_bytes(code[i + 1..i + 5].try_into().unwrap());
            (outer + 5 + i + 5).wrapping_add(rel as isize as usize) == inner
        }
        _ => false,
    })
}

/// A known call tree (a loop, recursion, a sibling call) on a fresh thread:
/// the same records in both modes, exactly the expected ones; graph
/// trampolines while inline; no Rust call per traced call once the thread
/// has its buffer and shadow stack, where the generic path takes two.
#[test]
fn call_tree_records_the_same_inline() {
    let _s = serial();
    let so = compile_so("grec1", C1, &[PATCHABLE, "-O2", "-fno-inline", "-fno-semantic-interposition"]);
    let lib = Lib::open(&so);
    if !is_sibling_call(lib.sym("c1_tail_outer"), lib.sym("c1_tail_inner")) {
        eprintln!("note: gcc made no sibling call of c1_tail_inner; that case is not exercised");
    }
    // SAFETY: long (long).
    let run: extern "C" fn(i64) -> i64 = unsafe { func(&lib, "c1_run") };
    const N: usize = 200;
    let mut seqs = Vec::new();
    // Inline and generic with segments that never fill, then inline with
    // small ones: every segment's end hands over to the slow path once.
    for (mode, segment) in [(Mode::Inline, BIG_SEGMENT), (Mode::Generic, BIG_SEGMENT), (Mode::Inline, 8192)] {
        let ((warm, slow), s) = session("tree", mode, "c1", &C1_TRACED, segment, || {
            on_thread(1 << 20, move || {
                let s0 = slow_calls(mode);
                assert_eq!(run(1), c1_result(1));
                let s1 = slow_calls(mode);
                for _ in 0..N {
                    assert_eq!(run(10), c1_result(10));
                }
                (s1 - s0, slow_calls(mode) - s1)
            })
        });
        println!("tree {}: warm-up took {warm} slow calls, {N} calls {slow}", mode.name());
        let words = s.trace.threads().iter().map(|t| t.words).sum::<u64>();
        match (mode, segment) {
            (Mode::Inline, BIG_SEGMENT) => assert_eq!(slow, 0, "graph trampolines record without calling Rust"),
            (Mode::Inline, _) => {
                let segments = words / ((segment as u64 - 64) / 8);
                assert!(segments > 10, "{segments} segments filled");
                assert_eq!(slow, 0, "segment changes are the only slow calls");
            }
            (Mode::Generic, _) => assert_eq!(slow, (2 * c1_calls(10) * N) as u64, "an entry and a return per call"),
        }
        assert_eq!(s.trace.dropped(), 0);
        let evs = s.single();
        assert_eq!(check_nesting("tree", evs, Nesting::Strict), 0, "every entry has its exit");
        let mut want = Vec::new();
        c1_records(1, &mut want);
        for _ in 0..N {
            c1_records(10, &mut want);
        }
        assert_seq(&format!("tree {}", mode.name()), evs, want);
        seqs.push(evs.to_vec());
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir(trace_root());
    }
    assert!(seqs[0] == seqs[1] && seqs[0] == seqs[2]);
}

// ---------------------------------------------------------------------------
// 2. Arguments and return values.

const C2: &str = r#"
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#define F __attribute__((noipa))
struct c2_big { long v[8]; };
struct c2_pair { long a, b; };
struct c2_dpair { double x, y; };
struct c2_mix { long n; double d; };
F long c2_ten(long a, long b, long c, long d, long e, long f, long g, long h, long i, long j) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j;
}
F double c2_dbl(double a, double b, double c, double d, double e, double f, double g, double h, double i, double j) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j;
}
F double c2_mixed(int a, double b, long c, float d, int e, double f, long g, float h, int i, double j,
                  long k, float l, int m, double n, long o, float p, double q, double r, double s, long t) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j
         + 11 * k + 12 * l + 13 * m + 14 * n + 15 * o + 16 * p + 17 * q + 18 * r + 19 * s + 20 * t;
}
F long c2_vlist(int n, va_list ap) { long s = 0; for (int i = 0; i < n; i++) s += (i + 1) * va_arg(ap, long); return s; }
F long c2_vsum(int n, ...) { va_list ap; va_start(ap, n); long s = c2_vlist(n, ap); va_end(ap); return s; }
F double c2_vdsum(int n, ...) {
    va_list ap; va_start(ap, n);
    double s = 0;
    for (int i = 0; i < n; i++) s += (i + 1) * va_arg(ap, double);
    va_end(ap);
    return s;
}
F long c2_fmt(char *buf, unsigned long len, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    int r = vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    return r;
}
F struct c2_big c2_big(long seed) { struct c2_big b; for (int i = 0; i < 8; i++) b.v[i] = seed * (i + 1) + i; return b; }
F long c2_take_big(struct c2_big b, long k) { long s = k; for (int i = 0; i < 8; i++) s += b.v[i] * (i + 1); return s; }
F struct c2_pair c2_pair(long x, long y) { struct c2_pair p = { x + y, x - y }; return p; }
F struct c2_dpair c2_dpair(double x, double y) { struct c2_dpair p = { x * 2, y + 0.5 }; return p; }
F struct c2_mix c2_mix(long n, double d) { struct c2_mix m = { n * 3, d / 4 }; return m; }
F double c2_hyp(double x, double y) { return x * x + y * y; }
F float c2_halve(float x) { return x / 2; }
F unsigned __int128 c2_mul128(unsigned long a, unsigned long b) { return (unsigned __int128)a * b; }
/* The frame pointer is 16-aligned iff the function was entered with the
   stack aligned as the ABI says. */
F long c2_misaligned(void) { return (long)((uintptr_t)__builtin_frame_address(0) & 15); }
"#;

const C2_TRACED: [&str; 16] = [
    "c2_big",
    "c2_dbl",
    "c2_dpair",
    "c2_fmt",
    "c2_halve",
    "c2_hyp",
    "c2_misaligned",
    "c2_mix",
    "c2_mixed",
    "c2_mul128",
    "c2_pair",
    "c2_take_big",
    "c2_ten",
    "c2_vdsum",
    "c2_vlist",
    "c2_vsum",
];

/// Functions whose rax is not their result.
const C2_OPAQUE: [&str; 7] = ["c2_dbl", "c2_mixed", "c2_vdsum", "c2_big", "c2_dpair", "c2_hyp", "c2_halve"];

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Big([i64; 8]);
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pair(i64, i64);
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct DPair(f64, f64);
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Mix(i64, f64);

type Ten = extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64, i64, i64) -> i64;
type Dbl = extern "C" fn(f64, f64, f64, f64, f64, f64, f64, f64, f64, f64) -> f64;
#[rustfmt::skip]
type Mixed = extern "C" fn(i32, f64, i64, f32, i32, f64, i64, f32, i32, f64,
                           i64, f32, i32, f64, i64, f32, f64, f64, f64, i64) -> f64;

#[derive(Clone, Copy)]
struct C2Fns {
    ten: Ten,
    dbl: Dbl,
    mixed: Mixed,
    vsum: unsafe extern "C" fn(i32, ...) -> i64,
    vdsum: unsafe extern "C" fn(i32, ...) -> f64,
    fmt: unsafe extern "C" fn(*mut u8, u64, *const libc::c_char, ...) -> i64,
    big: extern "C" fn(i64) -> Big,
    take_big: extern "C" fn(Big, i64) -> i64,
    pair: extern "C" fn(i64, i64) -> Pair,
    dpair: extern "C" fn(f64, f64) -> DPair,
    mix: extern "C" fn(i64, f64) -> Mix,
    hyp: extern "C" fn(f64, f64) -> f64,
    halve: extern "C" fn(f32) -> f32,
    #[allow(improper_ctypes_definitions)]
    mul128: extern "C" fn(u64, u64) -> u128,
    misaligned: extern "C" fn() -> i64,
}

/// Traced calls per round of `c2_round`.
const C2_CALLS: usize = 16;

/// Calls every c2 function once with inputs from `x`; checks every result
/// exactly (all float values are small integers or dyadic: exact).
fn c2_round(f: &C2Fns, x: i64) {
    let k = |i: i64| x + i;
    let want_ten: i64 = (1..=10).map(|i| i * k(i - 1)).sum();
    assert_eq!((f.ten)(k(0), k(1), k(2), k(3), k(4), k(5), k(6), k(7), k(8), k(9)), want_ten, "ten({x})");
    let d = |i: i64| k(i) as f64;
    let got = (f.dbl)(d(0), d(1), d(2), d(3), d(4), d(5), d(6), d(7), d(8), d(9));
    assert_eq!(got, want_ten as f64, "dbl({x})");
    let (i, l, s) = (|i: i64| k(i) as i32, |i: i64| k(i), |i: i64| k(i) as f32);
    let got = (f.mixed)(
        i(0),
        d(1),
        l(2),
        s(3),
        i(4),
        d(5),
        l(6),
        s(7),
        i(8),
        d(9),
        l(10),
        s(11),
        i(12),
        d(13),
        l(14),
        s(15),
        d(16),
        d(17),
        d(18),
        l(19),
    );
    assert_eq!(got, (1..=20).map(|i| i * k(i - 1)).sum::<i64>() as f64, "mixed({x})");
    let want_vsum: i64 = (1..=12).map(|i| i * k(i - 1)).sum();
    // SAFETY: 12 longs, as n says.
    let got = unsafe { (f.vsum)(12, k(0), k(1), k(2), k(3), k(4), k(5), k(6), k(7), k(8), k(9), k(10), k(11)) };
    assert_eq!(got, want_vsum, "vsum({x})");
    // SAFETY: 12 doubles, as n says.
    let got = unsafe { (f.vdsum)(12, d(0), d(1), d(2), d(3), d(4), d(5), d(6), d(7), d(8), d(9), d(10), d(11)) };
    assert_eq!(got, want_vsum as f64, "vdsum({x})");
    let mut buf = [0u8; 128];
    let fmt = c"%ld|%d|%.3f|%s|%g|%ld|%c";
    let (a, b, c, g, h) = (x * 1_000_000_007, -(x as i32), x as f64 + 0.125, (x % 1000) as f64 + 0.25, x - 77);
    // SAFETY: the arguments match the format; the buffer and its length.
    let n = unsafe {
        (f.fmt)(buf.as_mut_ptr(), buf.len() as u64, fmt.as_ptr(), a, b, c, c"abc".as_ptr(), g, h, 'z' as i32)
    };
    let want = format!("{a}|{b}|{c:.3}|abc|{g}|{h}|z");
    assert_eq!((n, std::str::from_utf8(&buf[..n as usize]).unwrap()), (want.len() as i64, want.as_str()), "fmt({x})");
    let big = (f.big)(x);
    assert_eq!(big, Big(std::array::from_fn(|i| x * (i as i64 + 1) + i as i64)), "big({x})");
    let want_take = x + big.0.iter().enumerate().map(|(i, v)| v * (i as i64 + 1)).sum::<i64>();
    assert_eq!((f.take_big)(big, x), want_take, "take_big({x})");
    assert_eq!((f.pair)(x, 3), Pair(x + 3, x - 3), "pair({x})");
    assert_eq!((f.dpair)(x as f64, 1.0), DPair(2.0 * x as f64, 1.5), "dpair({x})");
    assert_eq!((f.mix)(x, x as f64), Mix(3 * x, x as f64 / 4.0), "mix({x})");
    assert_eq!((f.hyp)(x as f64, (x + 1) as f64), (x * x + (x + 1) * (x + 1)) as f64, "hyp({x})");
    assert_eq!((f.halve)(x as f32), x as f32 / 2.0, "halve({x})");
    let (p, q) = (u64::MAX - x as u64, x as u64 + 7);
    assert_eq!((f.mul128)(p, q), p as u128 * q as u128, "mul128({x})");
    assert_eq!((f.misaligned)(), 0, "the function was entered with an ABI-aligned stack");
}

fn c2_records(x: i64, out: &mut Vec<Ev>) {
    let n = names([
        "c2_ten",
        "c2_dbl",
        "c2_mixed",
        "c2_vsum",
        "c2_vlist",
        "c2_vdsum",
        "c2_fmt",
        "c2_big",
        "c2_take_big",
        "c2_pair",
        "c2_dpair",
        "c2_mix",
        "c2_hyp",
        "c2_halve",
        "c2_mul128",
        "c2_misaligned",
    ]);
    let [ten, dbl, mixed, vsum, vlist, vdsum, fmt, big, take_big, pair, dpair, mix, hyp, halve, mul128, mis] = n;
    let k = |i: i64| x + i;
    let call = |out: &mut Vec<Ev>, f: &Arc<str>, v: Option<i64>| {
        out.push(Ev::entry(f, 0));
        out.push(match v {
            Some(v) => Ev::exit(f, 0, v as u64),
            None => Ev::exit_opaque(f, 0),
        });
    };
    call(out, &ten, Some((1..=10).map(|i| i * k(i - 1)).sum()));
    call(out, &dbl, None);
    call(out, &mixed, None);
    let vs: i64 = (1..=12).map(|i| i * k(i - 1)).sum();
    out.extend([
        Ev::entry(&vsum, 0),
        Ev::entry(&vlist, 1),
        Ev::exit(&vlist, 1, vs as u64),
        Ev::exit(&vsum, 0, vs as u64),
    ]);
    call(out, &vdsum, None);
    let (a, b, c, g, h) = (x * 1_000_000_007, -(x as i32), x as f64 + 0.125, (x % 1000) as f64 + 0.25, x - 77);
    call(out, &fmt, Some(format!("{a}|{b}|{c:.3}|abc|{g}|{h}|z").len() as i64));
    call(out, &big, None);
    let bigv: [i64; 8] = std::array::from_fn(|i| x * (i as i64 + 1) + i as i64);
    call(out, &take_big, Some(x + bigv.iter().enumerate().map(|(i, v)| v * (i as i64 + 1)).sum::<i64>()));
    call(out, &pair, Some(x + 3));
    call(out, &dpair, None);
    call(out, &mix, Some(3 * x));
    call(out, &hyp, None);
    call(out, &halve, None);
    call(out, &mul128, Some((u64::MAX - x as u64).wrapping_mul(x as u64 + 7) as i64));
    call(out, &mis, Some(0));
}

/// Arguments in registers and on the stack, floats, varargs (with a
/// va_list handed on and vsnprintf), structs by value both ways: every
/// result exact through graph trampolines, and the same records as the
/// generic path's.
#[test]
fn arguments_and_return_values_survive() {
    let _s = serial();
    let lib = Lib::open(&compile_so("grec2", C2, &[PATCHABLE, "-O2", "-fno-inline"]));
    // SAFETY: each type is the C function's signature.
    let f = unsafe {
        C2Fns {
            ten: func(&lib, "c2_ten"),
            dbl: func(&lib, "c2_dbl"),
            mixed: func(&lib, "c2_mixed"),
            vsum: func(&lib, "c2_vsum"),
            vdsum: func(&lib, "c2_vdsum"),
            fmt: func(&lib, "c2_fmt"),
            big: func(&lib, "c2_big"),
            take_big: func(&lib, "c2_take_big"),
            pair: func(&lib, "c2_pair"),
            dpair: func(&lib, "c2_dpair"),
            mix: func(&lib, "c2_mix"),
            hyp: func(&lib, "c2_hyp"),
            halve: func(&lib, "c2_halve"),
            mul128: func(&lib, "c2_mul128"),
            misaligned: func(&lib, "c2_misaligned"),
        }
    };
    c2_round(&f, 5); // untraced: the expectations themselves are right
    const ROUNDS: i64 = 1500;
    let mut seqs = Vec::new();
    for mode in MODES {
        let (slow, s) = session("abi", mode, "c2", &C2_TRACED, BIG_SEGMENT, || {
            on_thread(1 << 20, move || {
                c2_round(&f, 0); // warm-up: the thread's buffer and shadow stack
                let s0 = slow_calls(mode);
                for x in 1..ROUNDS {
                    c2_round(&f, x);
                }
                slow_calls(mode) - s0
            })
        });
        match mode {
            Mode::Inline => assert_eq!(slow, 0, "graph trampolines record without calling Rust"),
            Mode::Generic => assert_eq!(slow, 2 * C2_CALLS as u64 * (ROUNDS as u64 - 1)),
        }
        assert_eq!(s.trace.dropped(), 0);
        let evs = s.single();
        assert_eq!(check_nesting("abi", evs, Nesting::Strict), 0);
        let mut want = Vec::new();
        for x in 0..ROUNDS {
            c2_records(x, &mut want);
        }
        let evs = mask(evs, &C2_OPAQUE);
        assert_seq(&format!("abi {}", mode.name()), &evs, want);
        seqs.push(evs);
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir(trace_root());
    }
    assert!(seqs[0] == seqs[1]);
}

// ---------------------------------------------------------------------------
// 3. longjmp.

const C3: &str = r#"
#include <setjmp.h>
#define F __attribute__((noipa))
static jmp_buf c3_jb;
F long c3_leaf(long x) { return x + 1; }
F void c3_jumper(int depth) { if (depth == 0) longjmp(c3_jb, 1); c3_jumper(depth - 1); c3_leaf(0); }
F long c3_test(void) { if (setjmp(c3_jb) == 0) { c3_jumper(5); return -1; } return c3_leaf(1); }
"#;

/// longjmp out of 6 traced frames: the program's result, their exits
/// counted as lost (none recorded), the rest recorded alike in both modes.
#[test]
fn longjmp_over_graph_traced_frames() {
    let _s = serial();
    let lib = Lib::open(&compile_so("grec3", C3, &[PATCHABLE, "-O1", "-fno-inline"]));
    // SAFETY: long (void).
    let test: extern "C" fn() -> i64 = unsafe { func(&lib, "c3_test") };
    const ROUNDS: u64 = 1000;
    let [t, jumper, leaf] = names(["c3_test", "c3_jumper", "c3_leaf"]);
    let mut seqs = Vec::new();
    for mode in MODES {
        let lost = Tracer::global().lost_exits();
        let (slow, s) = session("longjmp", mode, "c3", &["c3_jumper", "c3_leaf", "c3_test"], BIG_SEGMENT, || {
            on_thread(1 << 20, move || {
                assert_eq!(test(), 2);
                let s0 = slow_calls(mode);
                for _ in 0..ROUNDS {
                    assert_eq!(test(), 2);
                }
                slow_calls(mode) - s0
            })
        });
        assert_eq!(Tracer::global().lost_exits() - lost, 6 * (ROUNDS + 1), "the skipped frames' exits are lost");
        match mode {
            // c3_test returns over the stale records of the skipped frames:
            // the return trampoline's search is Rust's.
            Mode::Inline => assert_eq!(slow, ROUNDS, "only c3_test's return leaves the inline path"),
            Mode::Generic => assert_eq!(slow, 10 * ROUNDS, "8 entries and 2 returns per round"),
        }
        assert_eq!(s.trace.dropped(), 0);
        let evs = s.single();
        check_nesting("longjmp", evs, Nesting::Skips);
        let round = || {
            let mut r = vec![Ev::entry(&t, 0)];
            r.extend((1..=6).map(|d| Ev::entry(&jumper, d)));
            // The skipped frames' records are still on the shadow stack.
            r.extend([Ev::entry(&leaf, 7), Ev::exit(&leaf, 7, 2), Ev::exit(&t, 0, 2)]);
            r
        };
        assert_seq(&format!("longjmp {}", mode.name()), evs, (0..=ROUNDS).flat_map(|_| round()));
        seqs.push(evs.to_vec());
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir(trace_root());
    }
    assert!(seqs[0] == seqs[1]);
}

// ---------------------------------------------------------------------------
// 4. A signal storm.

const C4: &str = r#"
#include <stdatomic.h>
#define F __attribute__((noipa))
static volatile long c4_sink;
atomic_long c4_handled; /* handler runs */
atomic_long c4_plain;   /* runs that returned straight to the kernel's restorer: not traced */
void *c4_plain_ra;      /* the restorer (set by the test) */
void *c4_last_ra;
F long c4_leaf(long x) { c4_sink = x; return x + 1; }
F long c4_mid(long x) { return c4_leaf(x) * 2; }
F long c4_run(long x) { long s = 0; for (long k = 0; k < 4; k++) s += c4_mid(x + k); return s; }
F void c4_handler(int sig) {
    void *ra = __builtin_return_address(0);
    c4_last_ra = ra;
    atomic_fetch_add(&c4_handled, 1);
    if (ra == c4_plain_ra) atomic_fetch_add(&c4_plain, 1);
    c4_leaf(sig);
}
"#;

const STORM_THREADS: usize = 8;
const STORM_ITERS: i64 = 15_000;

/// Calls per storm worker: [`STORM_ITERS`] divided by
/// `TEXTPOKE_STORM_DIVISOR` (`.ci/aarch64` sets it: under qemu-user a
/// signal costs some thousand times what it costs natively; the checks are
/// the same).
fn storm_iters() -> i64 {
    let d = std::env::var("TEXTPOKE_STORM_DIVISOR").ok().and_then(|v| v.parse::<i64>().ok()).unwrap_or(1);
    (STORM_ITERS / d.max(1)).max(100)
}

fn c4_result(x: i64) -> i64 {
    8 * x + 20
}

/// The records of one `c4_run(x)` at depth 0.
fn c4_records(n: &[Arc<str>; 3], x: i64) -> impl Iterator<Item = Ev> + '_ {
    let [run, mid, leaf] = n;
    std::iter::once(Ev::entry(run, 0))
        .chain((0..4).flat_map(move |k| {
            let v = (x + k + 1) as u64;
            [Ev::entry(mid, 1), Ev::entry(leaf, 2), Ev::exit(leaf, 2, v), Ev::exit(mid, 1, 2 * v)]
        }))
        .chain(std::iter::once(Ev::exit(run, 0, c4_result(x) as u64)))
}

struct StormWorker {
    tid: i32,
    /// Slow calls after the warm-up.
    slow: u64,
    /// A failed result check, if any.
    failure: Option<String>,
}

/// Rounds of the storm (8 fresh threads each) in one session. The inline
/// path runs the same work many times faster than the generic one, so it
/// gets more rounds to take about as many signals; both run round 0, and
/// that round's records are compared across modes.
fn storm_rounds(mode: Mode) -> i64 {
    match mode {
        Mode::Inline => 6,
        Mode::Generic => 1,
    }
}

/// Worker `g` (round `g / 8`) calls `c4_run(base(g) + i)`.
fn storm_base(g: i64) -> i64 {
    g * 1_000_000
}

/// One session of the storm; returns the workers' reports (worker `g` at
/// index `g`) and the signals sent.
fn storm_session(lib: &Arc<Lib>, mode: Mode) -> (Vec<StormWorker>, u64, Session) {
    // SAFETY: long (long).
    let run: extern "C" fn(i64) -> i64 = unsafe { func(lib, "c4_run") };
    let traced = ["c4_handler", "c4_leaf", "c4_mid", "c4_run"];
    let ((workers, sent), s) = session("storm", mode, "c4", &traced, BIG_SEGMENT, || {
        let mut workers = Vec::new();
        let mut sent = 0u64;
        for round in 0..storm_rounds(mode) {
            let (w, n) = storm_round(run, round, mode);
            workers.extend(w);
            sent += n;
        }
        (workers, sent)
    });
    (workers, sent, s)
}

fn storm_round(run: extern "C" fn(i64) -> i64, round: i64, mode: Mode) -> (Vec<StormWorker>, u64) {
    let ready = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..STORM_THREADS as i64)
        .map(|w| {
            let (ready, done, go, stop) = (ready.clone(), done.clone(), go.clone(), stop.clone());
            let base = storm_base(round * STORM_THREADS as i64 + w);
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let mut failure = None;
                if run(base) != c4_result(base) {
                    failure = Some(format!("warm-up run({base})"));
                }
                let s0 = slow_calls(mode);
                ready.fetch_add(1, Ordering::SeqCst);
                while !go.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                for i in 1..=storm_iters() {
                    let x = base + i;
                    let r = run(x);
                    if r != c4_result(x) && failure.is_none() {
                        failure = Some(format!("run({x}) = {r}, want {}", c4_result(x)));
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
                // Signals keep coming until every worker is done: this
                // thread must live (and take them) until then.
                while !stop.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                // A signal sent before `stop` may still be pending here, to
                // be delivered at the thread's next return to user mode:
                // after its slow calls were read, its handler run would be
                // accounted for with none of them. Blocked, it never runs.
                // SAFETY: a signal set on the stack, this thread's mask.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGUSR1);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                StormWorker { tid, slow: slow_calls(mode) - s0, failure }
            })
        })
        .collect();
    use std::os::unix::thread::JoinHandleExt;
    let pts: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    while ready.load(Ordering::SeqCst) < STORM_THREADS {
        std::thread::yield_now();
    }
    go.store(true, Ordering::SeqCst);
    let mut sent = 0u64;
    while done.load(Ordering::SeqCst) < STORM_THREADS {
        for &pt in &pts {
            // SAFETY: the threads are alive until `stop`.
            assert_eq!(unsafe { libc::pthread_kill(pt, libc::SIGUSR1) }, 0);
            sent += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let workers = handles.into_iter().map(|h| h.join().unwrap()).collect();
    (workers, sent)
}

/// Splits a thread's records into its own and its signal handler's
/// (c4_handler and the c4_leaf it calls, records it made or none: a
/// handler's records are all dropped when it interrupts a record in
/// progress). Returns its own and how many handler runs were recorded.
fn split_handler(what: &str, evs: &[Ev], handler: &Arc<str>, leaf: &Arc<str>) -> (Vec<Ev>, u64) {
    let mut own = Vec::with_capacity(evs.len());
    let mut runs = 0;
    let mut i = 0;
    while i < evs.len() {
        let e = &evs[i];
        if e.name != *handler {
            own.push(e.clone());
            i += 1;
            continue;
        }
        let d = e.depth as usize;
        let want =
            [Ev::entry(handler, d), Ev::entry(leaf, d + 1), Ev::exit(leaf, d + 1, 11), Ev::exit_opaque(handler, d)];
        let got = mask(&evs[i..(i + 4).min(evs.len())], &["c4_handler"]);
        assert_eq!(got, want, "{what}: record {i}: a handler run's records");
        runs += 1;
        i += 4;
    }
    (own, runs)
}

/// The storm in one mode (a child process each, so that a crash names
/// its mode); prints a digest of the workers' own records.
fn storm(mode: Mode) {
    assert_eq!(libc::SIGUSR1, 10, "the handler's leaf returns SIGUSR1 + 1");
    let lib = Arc::new(Lib::open(&compile_so(
        "grec4",
        C4,
        &[PATCHABLE, "-O2", "-fno-inline", "-fno-optimize-sibling-calls"],
    )));
    let handled = lib.sym("c4_handled") as *const AtomicI64;
    let plain = lib.sym("c4_plain") as *const AtomicI64;
    let (plain_ra, last_ra) = (lib.sym("c4_plain_ra") as *mut usize, lib.sym("c4_last_ra") as *const usize);
    // SAFETY: installing the library's `void handler(int)` with sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = lib.sym("c4_handler");
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        // Untraced: the handler returns to the kernel's signal restorer.
        libc::raise(libc::SIGUSR1);
        *plain_ra = *last_ra;
        assert_ne!(*plain_ra, 0);
    }
    let n = names(["c4_run", "c4_mid", "c4_leaf"]);
    let handler: Arc<str> = Arc::from("c4_handler");
    {
        // SAFETY: the library's atomics.
        let (handled, plain) = unsafe { (&*handled, &*plain) };
        handled.store(0, Ordering::SeqCst);
        plain.store(0, Ordering::SeqCst);
        let lost = Tracer::global().lost_exits();
        let (workers, sent, s) = storm_session(&lib, mode);
        let what = format!("storm {}", mode.name());
        for w in &workers {
            assert!(w.failure.is_none(), "{what}: thread {}: {}", w.tid, w.failure.as_deref().unwrap());
        }
        let (handled, plain) = (handled.load(Ordering::SeqCst) as u64, plain.load(Ordering::SeqCst) as u64);
        assert_eq!(Tracer::global().lost_exits(), lost, "{what}: no exit lost");
        let tids: BTreeSet<i32> = workers.iter().map(|w| w.tid).collect();
        assert_eq!(s.threads.iter().map(|t| t.0).collect::<BTreeSet<_>>(), tids, "{what}: the workers recorded");
        let mut nested = 0;
        for th in s.trace.threads() {
            assert_eq!((th.meta.lost, th.meta.dropped_range), (0, 0), "{what}: thread {}", th.tid());
            nested += th.meta.dropped_nested;
        }
        assert_eq!(s.trace.dropped(), nested, "{what}: drops are nested records only");
        let mut recorded_runs = 0;
        let mut slow_calls = 0;
        let mut own = Vec::new();
        for (tid, evs) in &s.threads {
            let what = format!("{what}, thread {tid}");
            assert_eq!(check_nesting(&what, evs, Nesting::Signals), 0, "{what}: entries and exits balance");
            let (mine, runs) = split_handler(&what, evs, &handler, &n[2]);
            recorded_runs += runs;
            let w = workers.iter().position(|w| w.tid == *tid).unwrap() as i64;
            let base = storm_base(w);
            let want =
                std::iter::once(base).chain((1..=storm_iters()).map(|i| base + i)).flat_map(|x| c4_records(&n, x));
            assert_seq(&what, &mine, want);
            own.push((w, mine));
            let th = s.trace.threads().iter().find(|t| t.tid() == *tid).unwrap();
            let _ = th;
            slow_calls += workers[w as usize].slow;
        }
        own.sort_by_key(|o| o.0);
        own.truncate(STORM_THREADS); // round 0
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&format!("{own:?}"), &mut h);
        println!("own-records-digest: {:016x}", std::hash::Hasher::finish(&h));
        println!(
            "{what}: {sent} signals sent, {handled} handled: {recorded_runs} recorded, {} dropped as nested \
             ({nested} records), {plain} untraced",
            nested / 4
        );
        assert!(handled > 0, "{what}: signals were handled");
        assert_eq!(nested % 4, 0, "{what}: a handler run that is not recorded loses its 4 events");
        // Every handler run is recorded, or not recorded and its 4 events
        // counted: either it interrupted a record in progress, or it ran
        // inside tracer code (the recursion guard cuts its calls: its
        // return address is the kernel's restorer — a "plain" run).
        assert_eq!(recorded_runs + nested / 4, handled, "{what}: every handler run is accounted for");
        assert!(plain <= nested / 4, "{what}: the plain runs are among those not recorded");
        match mode {
            // Once the threads are warm, only handlers leave the inline
            // paths: a plain run (interrupting the graph trampoline, which
            // holds the recursion guard, as the hot path does) takes the
            // hot path for its two entries, cut; one interrupting the
            // return trampoline's record takes the hot path 4 times (2
            // entries, 2 returns), each dropping its event as nested.
            //
            // One interleaving adds a slow call no handler run above
            // explains: a thread's call finds the cut mark's lowered `end`
            // and heads for the hot path, and a handler that lands before
            // its record writes the mark itself (a recorded run): the call
            // then records through the hot path without a recorder slow
            // path to subtract. At most one per recorded run.
            Mode::Inline => {
                let handlers = nested - 2 * plain;
                assert!(
                    slow_calls >= handlers && slow_calls <= handlers + recorded_runs,
                    "{what}: slow calls are the handlers': {slow_calls}, expected {handlers} (+ at most {recorded_runs})"
                )
            }
            // The hot path records under its recursion guard: a handler
            // never finds a record in progress, only the guard.
            Mode::Generic => assert_eq!(nested, 4 * plain, "{what}: only the guard cuts"),
        }
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir(trace_root());
    }
    // SAFETY: restoring the default disposition; no thread signals anymore.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_DFL) };
    println!("storm-ok");
}

/// 8 threads (more than the cores) call traced functions 15,000 times each
/// (in rounds of fresh threads, see `storm_rounds`) while SIGUSR1 rains on
/// them from pthread_kill; the traced handler calls a traced leaf. Results
/// right, trace complete, balanced per thread and function, every handler
/// run accounted for, each worker's own records exact and the same in both
/// modes. Each mode in a child process: a crash fails the test.
#[test]
fn signal_storm_on_graph_traced_threads() {
    let _s = serial();
    let mut failed = Vec::new();
    let mut digests = Vec::new();
    for mode in MODES {
        let (ok, out) = run_child(&format!("storm-{}", mode.name()));
        println!("{out}");
        if !(ok && out.contains("storm-ok")) {
            failed.push(mode.name());
        }
        digests.push(out.lines().find(|l| l.starts_with("own-records-digest")).map(str::to_string));
    }
    assert!(failed.is_empty(), "storm failed in mode(s) {failed:?} (outputs above)");
    assert_eq!(digests[0], digests[1], "the workers' own records are the same in both modes");
}

// ---------------------------------------------------------------------------
// 5. Recursion deeper than the shadow stack.

const C5: &str = r#"
#define F __attribute__((noipa))
static volatile long c5_sink;
F long c5_rec(long n) { if (n == 0) return 0; long r = c5_rec(n - 1); c5_sink = r; return r + 1; }
"#;

/// 20,000 levels: the right result, an entry for each level, exits for the
/// levels the shadow stack held; the deeper levels entered through the
/// generic path (the shadow stack is full) and returned untouched.
#[test]
fn recursion_deeper_than_the_shadow_stack_inline() {
    let _s = serial();
    let lib = Lib::open(&compile_so("grec5", C5, &[PATCHABLE, "-O1", "-fno-inline"]));
    // SAFETY: long (long).
    let rec: extern "C" fn(i64) -> i64 = unsafe { func(&lib, "c5_rec") };
    const DEPTH: i64 = 20_000;
    let [name] = names(["c5_rec"]);
    let mut seqs = Vec::new();
    for mode in MODES {
        let lost = Tracer::global().lost_exits();
        let (slow, s) = session("deep", mode, "c5", &["c5_rec"], BIG_SEGMENT, || {
            on_thread(64 << 20, move || {
                let s0 = slow_calls(mode);
                assert_eq!(rec(DEPTH), DEPTH);
                slow_calls(mode) - s0
            })
        });
        assert_eq!(Tracer::global().lost_exits(), lost, "frames not in the shadow stack are not lost exits");
        assert_eq!(s.trace.dropped(), 0);
        let evs = s.single();
        let entries = evs.iter().filter(|e| !e.exit).count() as u64;
        let held = evs.iter().filter(|e| e.exit).count() as u64;
        assert_eq!(entries, DEPTH as u64 + 1, "an entry per level");
        assert!(held > 1000 && held < entries, "exits for the levels the shadow stack held: {held}");
        // Levels 0..held at their depth, the deeper ones at depth `held`
        // (the full stack's), then the held levels' exits.
        let want = (0..=DEPTH as u64)
            .map(|k| Ev::entry(&name, k.min(held) as usize))
            .chain((0..held).rev().map(|k| Ev::exit(&name, k as usize, DEPTH as u64 - k)));
        assert_seq(&format!("deep {}", mode.name()), evs, want);
        match mode {
            // The first entry makes the shadow stack; the levels past it
            // take the generic path; the held levels return inline.
            Mode::Inline => assert_eq!(slow, 1 + (entries - held)),
            Mode::Generic => assert_eq!(slow, entries + held),
        }
        seqs.push(evs.to_vec());
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir(trace_root());
    }
    assert!(seqs[0] == seqs[1]);
}

// ---------------------------------------------------------------------------
// 6. C++ exceptions.

const C6: &str = r#"
#include <stdexcept>
#include <string>
#define F __attribute__((noipa))
struct Guard { int *n; ~Guard() { ++*n; } };
extern "C" F long c6_leaf(long x) { return x + 1; }
extern "C" F long c6_thrower(int d, int *dtors) {
    Guard g{dtors};
    if (d == 0) throw std::runtime_error("deep");
    return c6_thrower(d - 1, dtors) + c6_leaf(d);
}
/* Caught at the bottom: nothing traced above the catch. */
extern "C" F long c6_catcher(int *dtors) {
    try { return c6_thrower(4, dtors); }
    catch (const std::exception &e) { return (long)std::string(e.what()).size() + c6_leaf(10); }
}
/* Caught in the middle: the traced frames above return normally after. */
extern "C" F long c6_mid(int *dtors) {
    long r;
    try { r = c6_thrower(2, dtors); } catch (const std::runtime_error &) { r = 100; }
    return r + c6_leaf(r);
}
extern "C" F long c6_top(int *dtors) { return c6_mid(dtors) + c6_leaf(1); }
"#;

fn cxx() {
    let so = compile_cxx_so("grec6", C6, &[PATCHABLE, "-O1", "-fno-inline"]);
    let lib = Lib::open(&so);
    // SAFETY: long (int *).
    let catcher: extern "C" fn(*mut i32) -> i64 = unsafe { func(&lib, "c6_catcher") };
    // SAFETY: long (int *).
    let top: extern "C" fn(*mut i32) -> i64 = unsafe { func(&lib, "c6_top") };
    const ROUNDS: u64 = 100;
    let [c, thrower, leaf, mid, tp] = names(["c6_catcher", "c6_thrower", "c6_leaf", "c6_mid", "c6_top"]);
    let traced = ["c6_catcher", "c6_leaf", "c6_mid", "c6_thrower", "c6_top"];
    let mut seqs = Vec::new();
    for mode in MODES {
        let lost = Tracer::global().lost_exits();
        let ((), s) = session("cxx", mode, "c6", &traced, 8192, || {
            on_thread(1 << 20, move || {
                for round in 1..=ROUNDS {
                    let mut dtors = 0;
                    assert_eq!(catcher(&mut dtors), 4 + 11, "the catch got the exception (round {round})");
                    assert_eq!(dtors, 5, "every Guard was destroyed (round {round})");
                    let mut dtors = 0;
                    assert_eq!(top(&mut dtors), 201 + 2, "caught midway (round {round})");
                    assert_eq!(dtors, 3, "every Guard was destroyed (round {round})");
                }
            })
        });
        let what = format!("cxx {}", mode.name());
        assert_eq!(Tracer::global().lost_exits() - lost, 8 * ROUNDS, "{what}: the unwound frames' exits are lost");
        assert_eq!(s.trace.dropped(), 0);
        let evs = s.single();
        assert_eq!(check_nesting(&what, evs, Nesting::Skips), 0);
        let round = || {
            let mut r = vec![Ev::entry(&c, 0)];
            r.extend((1..=5).map(|d| Ev::entry(&thrower, d)));
            r.extend([Ev::entry(&leaf, 1), Ev::exit(&leaf, 1, 11), Ev::exit(&c, 0, 15)]);
            r.extend([Ev::entry(&tp, 0), Ev::entry(&mid, 1)]);
            r.extend((2..=4).map(|d| Ev::entry(&thrower, d)));
            r.extend([Ev::entry(&leaf, 2), Ev::exit(&leaf, 2, 101), Ev::exit(&mid, 1, 201)]);
            r.extend([Ev::entry(&leaf, 1), Ev::exit(&leaf, 1, 2), Ev::exit(&tp, 0, 203)]);
            r
        };
        assert_seq(&what, evs, (0..ROUNDS).flat_map(|_| round()));
        seqs.push(evs.to_vec());
        let _ = std::fs::remove_dir_all(&s.dir);
        let _ = std::fs::remove_dir(trace_root());
    }
    assert!(seqs[0] == seqs[1]);
    println!("cxx-ok");
}

/// C++ exceptions unwind through frames entered through graph trampolines:
/// destructors run, the catch is reached, frames above a catch return and
/// are recorded, 100 rounds, the same records in both modes. In a child
/// process: std::terminate fails the test.
#[test]
fn cxx_exceptions_through_graph_traced_frames() {
    let _s = serial();
    let (ok, out) = run_child("cxx");
    println!("{out}");
    assert!(ok && out.contains("cxx-ok"), "{out}");
}

const C7: &str = r#"
#include <stdexcept>
#define F __attribute__((noipa))
/* Throws and catches inside: harmless on its own. */
extern "C" F long c7_quiet(long x) { try { if (x >= 0) throw (int)x; } catch (int v) { return v + 1; } return 0; }
/* Its destructor calls c7_quiet: an exception is caught while another unwinds. */
struct Noisy { long *log; ~Noisy() { *log += c7_quiet(1); } };
extern "C" F long c7_thrower(int d, long *log) {
    Noisy n{log};
    if (d == 0) throw std::runtime_error("x");
    return c7_thrower(d - 1, log) + 1;
}
extern "C" F long c7_outer(long *log) { try { return c7_thrower(2, log); } catch (const std::exception &) { return -1; } }
"#;

/// A destructor that throws and catches inside while an exception unwinds
/// (legal C++): with `mode` tracing c7_*, or untraced.
fn cxx_nested(mode: Option<Mode>) {
    let so = compile_cxx_so("grec7", C7, &[PATCHABLE, "-O1", "-fno-inline"]);
    let lib = Lib::open(&so);
    // SAFETY: long (long *).
    let outer: extern "C" fn(*mut i64) -> i64 = unsafe { func(&lib, "c7_outer") };
    let rounds = move || {
        for round in 0..20 {
            let mut log = 0;
            assert_eq!(outer(&mut log), -1, "round {round}");
            assert_eq!(log, 6, "3 destructors, each caught its own exception (round {round})");
        }
    };
    match mode {
        None => rounds(),
        Some(mode) => {
            let ((), s) = session("cxx-nested", mode, "c7", &["c7_outer", "c7_quiet", "c7_thrower"], 8192, || {
                on_thread(1 << 20, rounds)
            });
            let evs = s.single();
            check_nesting("cxx-nested", evs, Nesting::Skips);
        }
    }
    println!("cxx-nested-ok");
}

/// An exception caught inside a destructor run by the unwinding of another
/// one, through traced frames. Untraced first (the program is right), then
/// recorded inline and through the generic path, each in a child process.
#[test]
fn cxx_exception_caught_in_a_destructor_while_unwinding() {
    let _s = serial();
    let mut failed = Vec::new();
    for scenario in ["cxx-nested-untraced", "cxx-nested-inline", "cxx-nested-generic"] {
        let (ok, out) = run_child(scenario);
        println!("{out}");
        if !(ok && out.contains("cxx-nested-ok")) {
            failed.push(scenario);
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?} (outputs above)");
}

// ---------------------------------------------------------------------------

#[test]
fn child_entry() {
    match child_scenario().as_deref() {
        Some("storm-inline") => storm(Mode::Inline),
        Some("storm-generic") => storm(Mode::Generic),
        Some("cxx") => cxx(),
        Some("cxx-nested-untraced") => cxx_nested(None),
        Some("cxx-nested-inline") => cxx_nested(Some(Mode::Inline)),
        Some("cxx-nested-generic") => cxx_nested(Some(Mode::Generic)),
        _ => {}
    }
}
