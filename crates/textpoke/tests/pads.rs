//! gcc's pads (`-fpatchable-function-entry=5`: five one-byte NOPs) traced
//! by their first byte (`trace::mirror`, attach.md §6.3): `90` becomes `e9`,
//! a jump to the site's mirror slot, and back, by the breakpoint protocol
//! while threads run, signalling nobody. Checked here: thousands of
//! changes, through every trampoline kind (direct, list, count, graph:
//! slots pointed at graph stubs and at adapters while the site stays
//! enabled), while 8 threads call the functions and count their own
//! entries exactly in steady phases, and 3 others wait in `nanosleep`,
//! `clock_nanosleep` and `epoll_wait`, which must never fail with EINTR
//! nor return early; every disabled pad holds exactly its five NOPs again.
//! Then the pads whose mirror cannot be placed: refused with a reason, or
//! converted by stop-machine, as the pad mode says. And the reclaimer
//! thread, stopped and started again.

mod common;

use common::{compile_so, glob_filter, peek, Lib};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use textpoke::arch::asm::{AsmError, Assembler, Label};
use textpoke::trace::{Entry, Filter, InlineCode, PadMode, TraceOp, Tracer, TrampolineKind};

/// The tests share the process's tracer and its pad mode.
static SERIAL: Mutex<()> = Mutex::new(());

const PAD: [u8; 5] = [0x90; 5];
const PAD_JMP: [u8; 5] = [0xe9, 0x90, 0x90, 0x90, 0x90];
/// Where `e9 90 90 90 90` at a site jumps: `site + 5 + (0x90909090 as i32)`.
const MIRROR_DISTANCE: usize = 0x6f6f_6f6b;

thread_local! {
    /// Entries the ops saw on this thread.
    static HITS: Cell<u64> = const { Cell::new(0) };
}

fn hit() {
    HITS.with(|h| h.set(h.get() + 1));
}

fn hits() -> u64 {
    HITS.with(Cell::get)
}

/// Counts entries on the calling thread, as the hot path calls it.
struct Plain;
impl TraceOp for Plain {
    fn entry(&self, _e: &Entry<'_>) {
        hit();
    }
}

/// Inline code that always gives up: the trampoline then takes its slow
/// path, which calls the op (so a count trampoline and a graph trampoline
/// are used, and the op still sees every call).
fn give_up(a: &mut Assembler, fail: Label) -> Result<(), AsmError> {
    a.jmp(fail)
}
fn nothing(_a: &mut Assembler, _fail: Label) -> Result<(), AsmError> {
    Ok(())
}

/// An op with count code: sites it traces alone get the count
/// trampoline (reached from a pad through its adapter).
struct Counting;
impl TraceOp for Counting {
    fn entry(&self, _e: &Entry<'_>) {
        hit();
    }
    fn call_counted(&self, _func: u32) {
        hit();
    }
    fn inline(&self) -> Option<InlineCode> {
        Some(InlineCode::Count { count: give_up })
    }
}

/// An op with graph code: sites it traces alone get the graph trampoline
/// (reached from a pad's slot directly, by a jump).
struct Graphing;
impl TraceOp for Graphing {
    fn entry(&self, _e: &Entry<'_>) {
        hit();
    }
    fn wants_exit(&self) -> bool {
        true
    }
    fn inline(&self) -> Option<InlineCode> {
        Some(InlineCode::Graph { entry: give_up, exit: nothing })
    }
}

const SRC: &str = r#"
#define F __attribute__((noipa))
F long pd_a(long x) { return x * 3 + 1; }
F long pd_b(long x) { return pd_a(x) + 2; }
F long pd_c(long x, long y) { return x * y - 1; }
F double pd_d(double x) { return x * 0.5 + 1.0; }
"#;

struct Pads {
    /// Kept loaded.
    _lib: Lib,
    /// pd_a, pd_b, pd_c, pd_d.
    funcs: [usize; 4],
}

fn load(name: &str) -> Pads {
    let so = compile_so(name, SRC, &["-fpatchable-function-entry=5"]);
    let lib = Lib::open(&so);
    let funcs = [lib.sym("pd_a"), lib.sym("pd_b"), lib.sym("pd_c"), lib.sym("pd_d")];
    for &f in &funcs {
        assert_eq!(peek(f, 5), PAD, "gcc pads entries with one-byte NOPs");
    }
    Pads { _lib: lib, funcs }
}

/// Calls function `i` with arguments from `x`, checks its result; the
/// entries it makes (pd_b calls pd_a).
fn call(p: &Pads, i: usize, x: i64) -> u64 {
    // SAFETY: the signatures match the C source.
    unsafe {
        match i {
            0 => assert_eq!(std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(p.funcs[0])(x), x * 3 + 1),
            1 => {
                assert_eq!(std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(p.funcs[1])(x), x * 3 + 3);
                return 2;
            }
            2 => assert_eq!(std::mem::transmute::<usize, extern "C" fn(i64, i64) -> i64>(p.funcs[2])(x, 7), x * 7 - 1),
            _ => {
                let got = std::mem::transmute::<usize, extern "C" fn(f64) -> f64>(p.funcs[3])(x as f64);
                assert_eq!(got, x as f64 * 0.5 + 1.0);
            }
        }
    }
    1
}

fn matching(globs: &[&str]) -> Filter {
    glob_filter(globs.iter().map(|s| s.to_string()), Vec::<String>::new()).unwrap()
}

fn none() -> Filter {
    matching(&["no_such_function_anywhere"])
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ }
}

/// One wait of `kind` for `d`: an error if it failed (EINTR among others)
/// or returned early.
fn wait_once(kind: usize, d: Duration, epfd: i32) -> Result<(), String> {
    let t0 = Instant::now();
    // SAFETY: plain system calls with valid pointers to locals and a
    // descriptor this test owns.
    let (r, errno) = unsafe {
        let r = match kind {
            0 => libc::nanosleep(&timespec(d), std::ptr::null_mut()),
            1 => -libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &timespec(d), std::ptr::null_mut()),
            _ => {
                let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 1];
                libc::epoll_wait(epfd, ev.as_mut_ptr(), 1, d.as_millis() as i32)
            }
        };
        (r, std::io::Error::last_os_error())
    };
    if r != 0 {
        return Err(format!("wait {kind} returned {r} ({errno})"));
    }
    if t0.elapsed() < d {
        return Err(format!("wait {kind} returned after {:?}, before {d:?}", t0.elapsed()));
    }
    Ok(())
}

/// The bytes of every function's pad.
fn pads_of(p: &Pads) -> Vec<Vec<u8>> {
    p.funcs.iter().map(|&f| peek(f, 5)).collect()
}

/// Which ops match in each step of a cycle (A plain, B counting, C
/// graphing, D plain): each step changes one op, the site's trampoline
/// kind changes while it stays enabled (its slot is pointed elsewhere),
/// and the cycle ends with every pad off.
const CYCLE: [[bool; 4]; 8] = [
    [true, false, false, false],  // direct (call stub, through the adapter)
    [true, true, false, false],   // list (same stub)
    [false, true, false, false],  // count (the count stub's adapter)
    [false, true, true, false],   // list
    [false, false, true, false],  // graph (the graph stub, jumped to)
    [false, false, true, true],   // list
    [false, false, false, true],  // direct
    [false, false, false, false], // off: the pads back
];

#[test]
fn pads_flip_by_their_first_byte_under_load_and_no_wait_is_interrupted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Arc::new(load("pads_flip"));
    let tracer = Tracer::global();
    tracer.set_pad_mode(PadMode::OneByteOnly);
    tracer.refresh().unwrap();

    // 0: a change in flight; else (epoch << 3) | (1 + entries per entry).
    let phase = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let (violations, calls, checked) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (p, phase, stop) = (p.clone(), phase.clone(), stop.clone());
            let (violations, calls, checked) = (violations.clone(), calls.clone(), checked.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = (t + n as usize) % 4;
                    // Acquire: pairs with the main thread's Release after
                    // each change returned.
                    let ph = phase.load(Ordering::Acquire);
                    let before = hits();
                    let entries = call(&p, i, n as i64 % 1000);
                    let got = hits() - before;
                    if ph != 0 && ph == phase.load(Ordering::Acquire) {
                        checked.fetch_add(1, Ordering::Relaxed);
                        if got != entries * ((ph & 7) - 1) {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    // SAFETY: a new epoll descriptor, closed at the end.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epfd >= 0);
    let wait_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let waits = Arc::new(AtomicU64::new(0));
    let waiters: Vec<_> = (0..3)
        .map(|kind| {
            let (stop, errors, waits) = (stop.clone(), wait_errors.clone(), waits.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = wait_once(kind, Duration::from_millis(2), epfd) {
                        errors.lock().unwrap().push(e);
                    }
                    waits.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let ops = [
        tracer.register(Arc::new(Plain), none()).unwrap(),
        tracer.register(Arc::new(Counting), none()).unwrap(),
        tracer.register(Arc::new(Graphing), none()).unwrap(),
        tracer.register(Arc::new(Plain), none()).unwrap(),
    ];
    let site = tracer.site_at(p.funcs[0]).expect("pd_a's pad is a site");
    let mirror = p.funcs[0] - MIRROR_DISTANCE;
    let mut kinds_seen = std::collections::BTreeSet::new();
    let (mut epoch, mut changes, mut enabled_ns, mut enables) = (0u64, 0u64, 0u128, 0u32);
    let t0 = Instant::now();
    for _cycle in 0..300 {
        let mut now = [false; 4];
        for step in CYCLE {
            let k = (0..4).find(|&k| now[k] != step[k]).expect("each step changes one op");
            phase.store(0, Ordering::Release); // partner: the workers' Acquire
            let was_off = now.iter().all(|on| !on);
            let t = Instant::now();
            let filter = if step[k] { matching(&["pd_*"]) } else { none() };
            tracer.set_filter(&ops[k], filter).unwrap();
            if was_off {
                enabled_ns += t.elapsed().as_nanos();
                enables += 1;
            }
            changes += 1;
            now = step;
            let m = now.iter().filter(|&&on| on).count() as u64;
            kinds_seen.insert(format!("{:?}", tracer.function(site).unwrap().trampoline));
            if m == 0 {
                assert_eq!(pads_of(&p), vec![PAD.to_vec(); 4], "every pad off is gcc's five NOPs again");
            } else {
                let refused = tracer.refused_pads();
                assert_eq!(pads_of(&p), vec![PAD_JMP.to_vec(); 4], "an enabled pad jumps to its mirror: {refused:?}");
                assert_eq!(peek(mirror, 1), [0xe9], "the mirror slot is a jmp");
            }
            assert_eq!(tracer.is_gcc_pad(site), Some(true));
            epoch += 1;
            phase.store((epoch << 3) | (1 + m), Ordering::Release); // partner: the workers' Acquire
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(200) {
                std::hint::spin_loop();
            }
        }
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a worker saw a wrong result");
    }
    for w in waiters {
        w.join().unwrap();
    }
    for op in ops {
        tracer.unregister(op).unwrap();
    }
    // SAFETY: ours.
    unsafe { libc::close(epfd) };
    let errors = wait_errors.lock().unwrap();
    assert!(errors.is_empty(), "{} interrupted or short waits: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    assert_eq!(violations.load(Ordering::Relaxed), 0, "miscounted entries in steady phases");
    assert!(checked.load(Ordering::Relaxed) > 10_000, "{} calls checked", checked.load(Ordering::Relaxed));
    assert!(waits.load(Ordering::Relaxed) > 100);
    assert_eq!(pads_of(&p), vec![PAD.to_vec(); 4]);
    assert!(tracer.refused_pads().is_empty(), "{:?}", tracer.refused_pads());
    let want: std::collections::BTreeSet<String> =
        ["None", "Direct", "List", "Count", "Graph"].iter().map(|s| s.to_string()).collect();
    assert_eq!(kinds_seen, want, "every trampoline kind was reached through a mirror");
    println!(
        "{changes} changes in {took:?} ({:?} each; enabling the 4 pads: {:?} each), {} calls, {} checked, {} waits, \
         {} traps emulated",
        took / changes as u32,
        Duration::from_nanos((enabled_ns / enables as u128) as u64),
        calls.load(Ordering::Relaxed),
        checked.load(Ordering::Relaxed),
        waits.load(Ordering::Relaxed),
        textpoke::text::traps_emulated(),
    );
}

/// One thread, one pad: the bytes at each step, the slot, and exact counts.
#[test]
fn a_disabled_pad_holds_its_original_bytes_and_counts_are_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = load("pads_exact");
    let tracer = Tracer::global();
    tracer.set_pad_mode(PadMode::OneByteOnly);
    tracer.refresh().unwrap();
    let before = peek(p.funcs[2], 5);
    let op = tracer.register(Arc::new(Plain), matching(&["pd_c"])).unwrap();
    assert_eq!(peek(p.funcs[2], 5), PAD_JMP);
    assert_eq!(peek(p.funcs[0], 5), PAD, "a pad no op wants is untouched");
    let site = tracer.site_at(p.funcs[2]).unwrap();
    assert_eq!(tracer.function(site).unwrap().trampoline, TrampolineKind::Direct);
    let h = hits();
    for x in 0..1000 {
        call(&p, 2, x);
    }
    assert_eq!(hits() - h, 1000);
    tracer.unregister(op).unwrap();
    assert_eq!(peek(p.funcs[2], 5), before, "the pad's original bytes, exactly");
    let h = hits();
    call(&p, 2, 1);
    assert_eq!(hits(), h);
    // Again: the slot and adapter made the first time serve.
    let op = tracer.register(Arc::new(Plain), matching(&["pd_c"])).unwrap();
    let h = hits();
    call(&p, 2, 1);
    assert_eq!(hits() - h, 1);
    tracer.unregister(op).unwrap();
    assert_eq!(peek(p.funcs[2], 5), PAD);
    assert_eq!(tracer.is_gcc_pad(site), Some(true));
}

/// Maps a page at `addr` (page-aligned) so that nothing else can.
fn occupy(addr: usize) -> usize {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, addr, "the mirror page of the test was free");
    addr
}

/// A pad whose mirror address is taken: refused (and named, with why)
/// with `OneByteOnly`; converted by stop-machine with `OneByte`.
#[test]
fn a_pad_whose_mirror_is_taken_is_refused_or_converted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = load("pads_taken");
    let tracer = Tracer::global();
    tracer.refresh().unwrap();
    // Every pad's slot page taken before the library's first enable.
    let mut pages: Vec<usize> = p.funcs.iter().map(|f| (f - MIRROR_DISTANCE) & !4095).collect();
    pages.extend(p.funcs.iter().map(|f| (f - MIRROR_DISTANCE + 4) & !4095));
    pages.sort_unstable();
    pages.dedup();
    let taken: Vec<usize> = pages.into_iter().map(occupy).collect();

    tracer.set_pad_mode(PadMode::OneByteOnly);
    let op = tracer.register(Arc::new(Plain), matching(&["pd_a", "pd_c"])).unwrap();
    let refused = tracer.refused_pads();
    let mut names: Vec<&str> = refused.iter().map(|r| &*r.function).collect();
    names.sort_unstable();
    assert_eq!(names, ["pd_a", "pd_c"], "{refused:?}");
    assert!(refused.iter().all(|r| r.reason.contains("is taken")), "{refused:?}");
    assert_eq!(pads_of(&p), vec![PAD.to_vec(); 4], "refused pads are left alone");
    let h = hits();
    call(&p, 0, 3);
    assert_eq!(hits(), h, "a refused pad is not traced");

    // Allowed to signal: stop-machine makes them one 5-byte NOP and calls.
    tracer.set_pad_mode(PadMode::OneByte);
    tracer.set_filter(&op, matching(&["pd_a", "pd_c"])).unwrap();
    assert!(tracer.refused_pads().is_empty());
    assert_eq!(peek(p.funcs[0], 1), [0xe8], "converted: a call");
    let h = hits();
    call(&p, 0, 3);
    call(&p, 2, 3);
    assert_eq!(hits() - h, 2);
    tracer.unregister(op).unwrap();
    assert_eq!(peek(p.funcs[0], 5), textpoke::arch::NOP5, "made one 5-byte NOP by stop-machine");
    assert_eq!(tracer.is_gcc_pad(tracer.site_at(p.funcs[0]).unwrap()), Some(false));
    assert_eq!(peek(p.funcs[1], 5), PAD, "a pad no op wanted stays a pad");
    for page in taken {
        // SAFETY: the page this test mapped.
        unsafe { libc::munmap(page as *mut libc::c_void, 4096) };
    }
}

/// Many pads at once: one batch, three syncs, and the time it takes.
#[test]
fn three_thousand_pads_enable_in_one_batch() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 3000;
    let mut src = String::from("#define F __attribute__((noipa))\n");
    for i in 0..n {
        src.push_str(&format!("F long many_{i}(long x) {{ return x + {i}; }}\n"));
    }
    let so = compile_so("pads_many", &src, &["-fpatchable-function-entry=5"]);
    let lib = Lib::open(&so);
    let funcs: Vec<usize> = (0..n).map(|i| lib.sym(&format!("many_{i}"))).collect();
    let tracer = Tracer::global();
    tracer.set_pad_mode(PadMode::OneByteOnly);
    tracer.refresh().unwrap();
    let traps = textpoke::text::traps_emulated();
    let t = Instant::now();
    let op = tracer.register(Arc::new(Plain), matching(&["many_*"])).unwrap();
    let on = t.elapsed();
    assert!(funcs.iter().all(|&f| peek(f, 5) == PAD_JMP));
    let h = hits();
    for (i, &f) in funcs.iter().enumerate() {
        // SAFETY: many_i has this signature.
        let r = unsafe { std::mem::transmute::<usize, extern "C" fn(i64) -> i64>(f)(1) };
        assert_eq!(r, 1 + i as i64);
    }
    assert_eq!(hits() - h, n as u64);
    let t = Instant::now();
    tracer.unregister(op).unwrap();
    let off = t.elapsed();
    assert!(funcs.iter().all(|&f| peek(f, 5) == PAD));
    println!(
        "{n} pads: enabled in {on:?} (stubs, adapters, slots and the batch), disabled in {off:?}; {} traps emulated",
        textpoke::text::traps_emulated() - traps
    );
}

/// `stop_reclaimer` leaves no textpoke thread; the next change that
/// retires anything starts one again.
#[test]
fn the_reclaimer_stops_and_starts_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let reclaimers = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("textpoke-reclai")))
            .count()
    };
    let tracer = Tracer::global();
    tracer.set_grace_period_for_tests(true);
    for round in 0..3 {
        let op = tracer.register(Arc::new(Plain), none()).unwrap();
        tracer.unregister(op).unwrap(); // retires the op: the reclaimer runs
        assert!(tracer.reclaimer_running(), "round {round}");
        // The thread names itself once it runs.
        let t = Instant::now();
        while reclaimers() == 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reclaimers(), 1, "round {round}");
        tracer.stop_reclaimer().unwrap();
        assert!(!tracer.reclaimer_running());
        assert_eq!(reclaimers(), 0, "round {round}: stopped and joined");
        tracer.reclaim(Duration::from_secs(5)).unwrap();
        assert_eq!(tracer.retired(), 0);
    }
}
