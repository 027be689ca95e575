//! Hazards of the graph trampolines found in review, each reproduced on
//! purpose: a signal handler that throws and catches a C++ exception while
//! a traced function returns (the return slot must stay untouched until
//! the shadow entry is popped), and a graph stub retired while a thread is
//! still inside the graph trampoline that reads it (a site's stubs are
//! never freed nor given to another site).
//!
//! Both run on x86-64 and aarch64 (under qemu-aarch64 in `.ci/aarch64`);
//! what differs is read from each architecture's site, stub and signal
//! context below.

#[path = "../../textpoke/tests/common/mod.rs"]
mod common;

use common::{compile_cxx_so, compile_so, Lib, PATCHABLE};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use textpoke::trace::{Filter, Tracer, TrampolineKind};
use textpoke_record::filter::glob_filter;
use textpoke_record::RecordOp;
use textpoke_record::{self as record, ClockChoice, ClockSource, RecorderConfig};

static SERIAL: Mutex<()> = Mutex::new(());

fn filter(names: &[&str]) -> Filter {
    glob_filter(names.iter().map(|s| s.to_string()), Vec::<String>::new()).unwrap()
}

fn session(name: &str) -> record::Recorder {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let mut cfg = RecorderConfig::new(&dir);
    cfg.clock = ClockChoice::Force(ClockSource::Tsc); // the graph trampolines' clock
    record::start(cfg).unwrap()
}

fn install(sig: i32, handler: usize) {
    // SAFETY: installing an `SA_SIGINFO` handler of the right signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

const THROWING_HANDLER: &str = r#"
#define F extern "C" __attribute__((noipa))
#include <signal.h>
static volatile long sink;
F long h1_leaf(long x) { sink = x; return x + 1; }
F void h1_handler(int, siginfo_t *, void *) { try { throw 1; } catch (int) { sink = 0; } }
"#;

/// Signals the storm sends (two threads, one each in turn): 40,000
/// divided by `TEXTPOKE_STORM_DIVISOR` (`.ci/aarch64` sets it: under
/// qemu-user a signal costs some thousand times what it costs natively;
/// the check is the same).
fn storm_signals() -> usize {
    let d = std::env::var("TEXTPOKE_STORM_DIVISOR").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(1);
    (40_000 / d.max(1)).max(200)
}

/// Two threads call a traced leaf while SIGUSR1 rains on them; the handler
/// throws and catches, which makes the unwinder hooks restore and re-arm
/// every replaced return address of the thread. Every result stays right.
fn throwing_handler(inline: bool) {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = Tracer::global();
    t.set_inline_recording(inline);
    let lib = Lib::open(&compile_cxx_so("hz1", THROWING_HANDLER, &[PATCHABLE, "-O1"]));
    // SAFETY: long (long).
    let leaf: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("h1_leaf")) };
    install(libc::SIGUSR1, lib.sym("h1_handler"));
    t.refresh().unwrap();
    let rec = session("hz1");
    let op = t.register(Arc::new(RecordOp::graph()), filter(&["h1_leaf"])).unwrap();
    let kind = t.functions().into_iter().find(|f| &*f.function == "h1_leaf").unwrap().trampoline;
    assert_eq!(kind, if inline { TrampolineKind::Graph } else { TrampolineKind::Direct });
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, bad, tx) = (stop.clone(), bad.clone(), tx.clone());
            std::thread::spawn(move || {
                // SAFETY: no preconditions.
                tx.send(unsafe { libc::pthread_self() }).unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if leaf(i) != i + 1 {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let threads: Vec<libc::pthread_t> = (0..2).map(|_| rx.recv().unwrap()).collect();
    let start = Instant::now();
    let (mut sent, signals) = (0, storm_signals());
    while sent < signals && start.elapsed() < Duration::from_secs(8) && bad.load(Ordering::Relaxed) == 0 {
        for &th in &threads {
            // SAFETY: the workers run until `stop`.
            unsafe { libc::pthread_kill(th, libc::SIGUSR1) };
            sent += 1;
        }
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    t.unregister(op).unwrap();
    rec.stop().unwrap();
    t.set_inline_recording(true);
    assert_eq!(bad.load(Ordering::Relaxed), 0, "return values corrupted ({sent} signals sent)");
}

#[test]
fn handler_throwing_while_graph_traced_functions_return() {
    throwing_handler(true);
}

#[test]
fn handler_throwing_while_traced_functions_return_generic() {
    throwing_handler(false);
}

const REUSED_STUB: &str = r#"
#define F __attribute__((noipa))
static volatile long sink;
F long h2_a(long x) { sink = x; return x + 1; }
F long h2_b(long x) { sink = x; return x + 2; }
F long h2_c(long x) { sink = x; return x * 1000 + 7; }
"#;

static TRAMP: AtomicUsize = AtomicUsize::new(0);
static HELD_AT: AtomicUsize = AtomicUsize::new(0);
static GO: AtomicBool = AtomicBool::new(false);

/// Holds the thread when it interrupted the first 16 bytes of the graph
/// trampoline (before the recursion guard: nothing marks it as inside; on
/// aarch64 its first four instructions, the guard's `cmp w9, #1; b.ne` and
/// what follows, all with x16 on the stub's data).
extern "C" fn hold_in_trampoline(_: i32, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let pc = interrupted_pc(unsafe { &*(uc as *const libc::ucontext_t) });
    let t = TRAMP.load(Ordering::Relaxed);
    if t != 0 && pc >= t && pc < t + 0x10 && HELD_AT.load(Ordering::Relaxed) == 0 {
        HELD_AT.store(pc, Ordering::SeqCst);
        while !GO.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    }
}

/// Where the signal interrupted the thread.
#[cfg(target_arch = "x86_64")]
fn interrupted_pc(uc: &libc::ucontext_t) -> usize {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize
}

/// Where the signal interrupted the thread.
#[cfg(target_arch = "aarch64")]
fn interrupted_pc(uc: &libc::ucontext_t) -> usize {
    uc.uc_mcontext.pc as usize
}

/// The target of the rel32 branch ending at `at + len`.
#[cfg(target_arch = "x86_64")]
fn rel_target(at: usize, len: usize) -> usize {
    let b = common::peek(at + len - 4, 4);
    (at + len).wrapping_add(i32::from_le_bytes(b.try_into().unwrap()) as isize as usize)
}

/// The graph stub a traced site jumps to: the site is `jmp rel32` (5 bytes).
#[cfg(target_arch = "x86_64")]
fn site_stub(site: usize) -> usize {
    rel_target(site, 5)
}

/// The graph stub's data (what r11 points to in the graph trampoline): the
/// stub starts with `lea r11, [rip+disp32]` (7 bytes).
#[cfg(target_arch = "x86_64")]
fn stub_data(stub: usize) -> usize {
    rel_target(stub, 7)
}

/// The instruction word at `at`.
#[cfg(target_arch = "aarch64")]
fn word(at: usize) -> u32 {
    u32::from_le_bytes(common::peek(at, 4).try_into().unwrap())
}

/// The graph stub a traced site branches to: the site's first word is
/// `b stub`.
#[cfg(target_arch = "aarch64")]
fn site_stub(site: usize) -> usize {
    let b = word(site);
    assert_eq!(b & 0xfc00_0000, 0x1400_0000, "the site is `b stub`: {b:#010x}");
    site.wrapping_add_signed((((b & 0x03ff_ffff) << 6) as i32 >> 6) as isize * 4)
}

/// The graph stub's data (what x16 points to in the graph trampoline): the
/// stub starts with `adrp x16, data; add x16, x16, #:lo12:data`
/// (`arch::tramp::graph_stub`).
#[cfg(target_arch = "aarch64")]
fn stub_data(stub: usize) -> usize {
    let (adrp, add) = (word(stub), word(stub + 4));
    assert_eq!(adrp & 0x9f00_001f, 0x9000_0010, "the stub starts with adrp x16: {adrp:#010x}");
    assert_eq!(add & 0xffc0_03ff, 0x9100_0210, "then add x16, x16, #imm12: {add:#010x}");
    let pages = ((((adrp >> 5) & 0x7_ffff) << 2 | (adrp >> 29) & 3) as i32) << 11 >> 11;
    (stub & !0xfff).wrapping_add_signed(pages as isize * 4096) + ((add >> 10) & 0xfff) as usize
}

/// A thread is held inside the graph trampoline, its r11 (aarch64: x16) on
/// `h2_a`'s stub data, while `h2_a` stops being traced and `h2_c` starts:
/// the grace period must keep the stub from being freed and reused for
/// `h2_c` until the thread moves on; then it must still run `h2_a`.
#[test]
fn graph_stub_outlives_threads_in_its_trampoline() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lib = Lib::open(&compile_so("hz2", REUSED_STUB, &[PATCHABLE, "-O1"]));
    // SAFETY: long (long).
    let a: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("h2_a")) };
    install(libc::SIGUSR2, hold_in_trampoline as *const () as usize);
    let t = Tracer::global();
    t.refresh().unwrap();
    let rec = session("hz2");
    let op = t.register(Arc::new(RecordOp::graph()), filter(&["h2_a", "h2_b"])).unwrap();
    let site_of = |name: &str| t.functions().into_iter().find(|x| &*x.function == name).unwrap();
    let site_a = site_of("h2_a");
    assert_eq!(site_a.trampoline, TrampolineKind::Graph);
    let stub_a = site_stub(site_a.addr);
    // The stub's data's word (at 16) holds the graph trampoline.
    let data = stub_data(stub_a);
    TRAMP.store(u64::from_le_bytes(common::peek(data + 16, 8).try_into().unwrap()) as usize, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let (stop2, bad2) = (stop.clone(), bad.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        // SAFETY: no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        let mut i = 0;
        while !stop2.load(Ordering::Relaxed) {
            let r = a(i);
            if r != i + 1 {
                bad2.lock().unwrap().push((i, r));
            }
            i += 1;
        }
    });
    let th = rx.recv().unwrap();
    let start = Instant::now();
    while HELD_AT.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(30) {
        // SAFETY: the worker runs until `stop`.
        unsafe { libc::pthread_kill(th, libc::SIGUSR2) };
        std::thread::sleep(Duration::from_micros(50));
    }
    assert_ne!(HELD_AT.load(Ordering::SeqCst), 0, "the worker was never caught in the trampoline's first bytes");
    t.set_filter(&op, filter(&["h2_b"])).unwrap(); // retires h2_a's stub
    t.reclaim(Duration::from_millis(300)).unwrap();
    t.set_filter(&op, filter(&["h2_b", "h2_c"])).unwrap();
    let stub_c = site_stub(site_of("h2_c").addr);
    assert_ne!(stub_c, stub_a, "h2_a's stub was reused while a thread was in its trampoline");
    GO.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    t.unregister(op).unwrap();
    rec.stop().unwrap();
    let bad = bad.lock().unwrap();
    assert!(bad.is_empty(), "h2_a returned another function's results: {:?}", &bad[..bad.len().min(5)]);
}
