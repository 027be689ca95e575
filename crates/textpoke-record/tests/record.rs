//! The recorder and the trace reader: concurrency with signal handlers,
//! exact counts, drops, sessions, fork, exit flush, reader validation.
//!
//! The recorder is process-wide, so the tests take a lock and run one at a
//! time.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use textpoke_record::tracedata::{OpenOptions, Record, RecordKind, Trace, TraceReadError};
use textpoke_record::{self as record, ClockChoice, ClockSource, FuncId, Mode, RecorderConfig};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmpdir(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("record-tests").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let mut old = d.as_os_str().to_owned();
    old.push(".old");
    let _ = std::fs::remove_dir_all(PathBuf::from(old));
    std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    d
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn install_handler(sig: i32, h: extern "C" fn(i32)) {
    // SAFETY: a plain handler; zeroed sigaction is a valid start.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = h as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

fn all_records(t: &Trace, tid: i32) -> Vec<Record> {
    let th = t.threads().iter().find(|x| x.tid() == tid).unwrap_or_else(|| panic!("thread {tid} not in trace"));
    t.records(th).unwrap().collect::<Result<Vec<_>, _>>().unwrap()
}

/// Entry/exit pairs nest properly (same function and depth) and close.
fn assert_balanced(recs: &[Record]) {
    let mut stack = Vec::new();
    for r in recs {
        match r.kind {
            RecordKind::Entry => stack.push((r.func, r.depth)),
            RecordKind::Exit => {
                let top = stack.pop().unwrap_or_else(|| panic!("exit {r:?} without entry"));
                assert_eq!(top, (r.func, r.depth), "exit {r:?} does not match entry {top:?}");
            }
            RecordKind::Gap => panic!("events lost: {r:?}"),
            RecordKind::Cut => {}
        }
    }
    assert!(stack.is_empty(), "unclosed entries: {stack:?}");
}

fn assert_monotonic(recs: &[Record]) {
    for w in recs.windows(2) {
        assert!(w[1].ts >= w[0].ts, "time goes back: {:?} then {:?}", w[0], w[1]);
    }
}

// ---------------------------------------------------------------------------
// Concurrency: 8 threads, a signal handler recording too.

static SIG_FUNC: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SIG_OK: Cell<u64> = const { Cell::new(0) };
    static SIG_DROPPED: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn record_in_handler(_: i32) {
    let f = FuncId(SIG_FUNC.load(Ordering::Relaxed) as u32);
    if record::entry(f, 2) {
        assert!(record::exit(f, 2), "an exit in the handler cannot be nested");
        SIG_OK.with(|c| c.set(c.get() + 2));
    } else {
        SIG_DROPPED.with(|c| c.set(c.get() + 1));
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    recorded: u64,
    failed: u64,
    sig_recorded: u64,
    sig_dropped: u64,
}

#[test]
fn eight_threads_with_signal_handlers_exact_counts() {
    let _g = serial();
    let dir = tmpdir("concurrent");
    let outer = record::register_function(0x1000, "outer");
    let inner = record::register_function(0x2000, "inner");
    let sig = record::register_function(0x3000, "in_signal_handler");
    SIG_FUNC.store(sig.0 as u64, Ordering::Relaxed);
    install_handler(libc::SIGUSR1, record_in_handler);

    // Small segments, so that every worker goes through many of them (and
    // the writer hands them back) while the signals arrive.
    let rec = record::start(RecorderConfig { segment_bytes: 8192, ..RecorderConfig::new(&dir) }).unwrap();
    const THREADS: usize = 8;
    const ITERS: u64 = 40_000;
    let tids = Arc::new(Mutex::new(Vec::new()));
    let tallies = Arc::new(Mutex::new(HashMap::<i32, Tally>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let pinger_done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..THREADS {
        let (tids, tallies, done, pinger_done) = (tids.clone(), tallies.clone(), done.clone(), pinger_done.clone());
        handles.push(std::thread::spawn(move || {
            let mut t = Tally::default();
            for i in 0..ITERS {
                for ok in
                    [record::entry(outer, 0), record::entry(inner, 1), record::exit(inner, 1), record::exit(outer, 0)]
                {
                    if ok {
                        t.recorded += 1
                    } else {
                        t.failed += 1
                    }
                }
                if i == 0 {
                    // The buffer exists now: signals from here on are not
                    // the (counted, unattributed) drops during its creation,
                    // which `signal_during_buffer_creation_is_dropped_and_counted`
                    // tests on purpose.
                    tids.lock().unwrap().push(gettid());
                }
            }
            done.fetch_add(1, Ordering::SeqCst);
            while !pinger_done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            t.sig_recorded = SIG_OK.with(|c| c.get());
            t.sig_dropped = SIG_DROPPED.with(|c| c.get());
            tallies.lock().unwrap().insert(gettid(), t);
        }));
    }
    // The pinger: SIGUSR1 to every worker until all are done.
    while tids.lock().unwrap().len() < THREADS {
        std::thread::yield_now();
    }
    let targets = tids.lock().unwrap().clone();
    // SAFETY: no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut sent = 0u64;
    while done.load(Ordering::SeqCst) < THREADS {
        for &tid in &targets {
            // SAFETY: the workers are alive until pinger_done.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) };
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    pinger_done.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    // The workers exited: their buffers were retired and drained.
    let summary = rec.stop().unwrap();
    assert!(summary.complete);

    let t = Trace::open(&dir).unwrap();
    assert!(t.is_complete());
    assert_eq!(t.meta().unattributed_drops.total(), 0, "{:?}", t.meta().unattributed_drops);
    let tallies = tallies.lock().unwrap();
    let mut sig_total = 0;
    for (&tid, tally) in tallies.iter() {
        let th = t.threads().iter().find(|x| x.tid() == tid).expect("every worker in the trace");
        assert!(th.meta.exited, "worker {tid} exited before stop");
        assert_eq!(th.meta.lost, 0, "buffers grow: nothing lost");
        assert_eq!(tally.failed, 0, "the workers' own records are never nested");
        let (recs, cuts): (Vec<Record>, Vec<Record>) =
            all_records(&t, tid).into_iter().partition(|r| r.kind != RecordKind::Cut);
        // Each handler run whose entry was dropped left a cut mark where
        // it happened.
        assert_eq!(cuts.iter().map(|c| c.lost).sum::<u64>(), tally.sig_dropped, "cut marks for {tid}");
        assert_eq!(recs.len() as u64, tally.recorded + tally.sig_recorded, "exact event count for {tid}");
        assert_eq!(th.meta.entries + th.meta.exits, recs.len() as u64);
        // Each handler run recorded two events, or had its entry dropped
        // as nested: its call is counted either way.
        assert_eq!(th.meta.calls, 2 * ITERS + tally.sig_recorded / 2 + tally.sig_dropped, "calls counted exactly");
        assert_eq!(th.meta.dropped_nested, tally.sig_dropped, "nested drops counted exactly for {tid}");
        let n_outer = recs.iter().filter(|r| r.func == outer && r.kind == RecordKind::Entry).count() as u64;
        assert_eq!(n_outer, ITERS);
        let n_sig = recs.iter().filter(|r| r.func == sig).count() as u64;
        assert_eq!(n_sig, tally.sig_recorded);
        assert_balanced(&recs);
        assert_monotonic(&recs);
        sig_total += tally.sig_recorded;
    }
    assert_eq!(tallies.len(), THREADS);
    assert!(sig_total > 0, "signal handlers recorded ({sent} signals sent)");
    eprintln!(
        "signals sent {sent}, handler records {sig_total}, nested drops {}",
        tallies.values().map(|t| t.sig_dropped).sum::<u64>()
    );
    // The merged view is in time order.
    let merged: Vec<Record> = t
        .merged()
        .unwrap()
        .filter(|r| r.as_ref().map_or(true, |r| r.kind != RecordKind::Cut))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(merged.len() as u64, t.meta().total_events);
    assert!(merged.windows(2).all(|w| w[0].ts <= w[1].ts));
}

// ---------------------------------------------------------------------------
// Drops.

/// The buffer limit reached on purpose: 8 threads write far more than two
/// 8 KiB segments each while the writer (one thread among nine on two
/// cores) falls behind. Whatever is lost is counted exactly, marked in the
/// stream where it was lost, and every call is still counted.
#[test]
fn past_the_limit_events_are_lost_counted_and_marked() {
    let _g = serial();
    let dir = tmpdir("limit");
    let f = record::register_function(0x4000, "limited");
    let g = record::register_function(0x4100, "limited_inner");
    let cfg = RecorderConfig { segment_bytes: 8192, thread_limit: 16384, ..RecorderConfig::new(&dir) };
    let rec = record::start(cfg).unwrap();
    const ITERS: u64 = 200_000;
    let hs: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut kept = 0u64;
                for _ in 0..ITERS {
                    for ok in [record::entry(f, 0), record::entry(g, 1), record::exit(g, 1), record::exit(f, 0)] {
                        kept += ok as u64;
                    }
                }
                (gettid(), kept)
            })
        })
        .collect();
    let kept: HashMap<i32, u64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let s = rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    let lost_total: u64 = kept.values().map(|k| 4 * ITERS - k).sum();
    assert!(lost_total > 0, "the writer kept up with 8 threads on 2 cores: the test did not reach the limit");
    assert_eq!(s.dropped, lost_total);
    assert_eq!(t.dropped(), lost_total);
    for (&tid, &k) in &kept {
        let th = t.threads().iter().find(|x| x.tid() == tid).unwrap();
        assert_eq!(th.meta.lost, 4 * ITERS - k, "thread {tid}: lost events counted exactly");
        assert_eq!(th.meta.calls, 2 * ITERS, "thread {tid}: every call counted");
        let recs = all_records(&t, tid);
        let gaps: u64 = recs.iter().filter(|r| r.kind == RecordKind::Gap).map(|r| r.lost).sum();
        let events = recs.iter().filter(|r| r.kind != RecordKind::Gap).count() as u64;
        assert_eq!(events, k, "thread {tid}: every kept event read back");
        // The last events may be lost with no later segment to mark them.
        assert!(gaps <= th.meta.lost && gaps > 0 || th.meta.lost == 0, "thread {tid}: gaps marked");
        assert_monotonic(&recs);
        // Between gaps, entries and exits nest; a gap says where to resume.
        for run in recs.split(|r| r.kind == RecordKind::Gap) {
            let mut depth: Option<u32> = None;
            for r in run {
                match r.kind {
                    RecordKind::Entry => {
                        if let Some(d) = depth {
                            assert_eq!(r.depth, d, "thread {tid}: entries nest");
                        }
                        depth = Some(r.depth + 1);
                    }
                    RecordKind::Exit => depth = Some(r.depth),
                    RecordKind::Gap => unreachable!(),
                    RecordKind::Cut => {}
                }
            }
        }
    }
    let counts: HashMap<FuncId, u64> = t.counts().iter().copied().collect();
    assert_eq!((counts[&f], counts[&g]), (8 * ITERS, 8 * ITERS), "exact calls past the limit");
    eprintln!("limit reached: {lost_total} of {} events lost, {} gaps", 8 * 4 * ITERS, s.dropped);
}

/// 10,000 threads that record a little and exit: each one's events are
/// written and its buffer freed, so memory stays at what the threads alive
/// at once need.
#[test]
fn ten_thousand_short_lived_threads_are_flushed_and_freed() {
    let _g = serial();
    let dir = tmpdir("many-threads");
    let f = record::register_function(0x4200, "short_lived");
    let rec = record::start(RecorderConfig { segment_bytes: 8192, ..RecorderConfig::new(&dir) }).unwrap();
    const THREADS: usize = 10_000;
    const ALIVE: usize = 50;
    let mut tids = Vec::with_capacity(THREADS);
    for _ in 0..THREADS / ALIVE {
        let batch: Vec<_> = (0..ALIVE)
            .map(|_| {
                std::thread::spawn(move || {
                    for d in 0..10 {
                        assert!(record::entry(f, d));
                    }
                    for d in (0..10).rev() {
                        assert!(record::exit(f, d));
                    }
                    gettid()
                })
            })
            .collect();
        tids.extend(batch.into_iter().map(|h| h.join().unwrap()));
    }
    let s = rec.stop().unwrap();
    assert_eq!((s.calls, s.events, s.dropped), (10 * THREADS as u64, 20 * THREADS as u64, 0));
    let t = Trace::open(&dir).unwrap();
    assert!(t.threads().len() >= THREADS, "every thread listed");
    assert!(t.threads().iter().all(|th| th.meta.exited || th.meta.words == 0));
    for tid in tids.iter().step_by(997) {
        let recs = all_records(&t, *tid);
        assert_eq!(recs.len(), 20, "thread {tid}");
        assert_balanced(&recs);
    }
    // How far the writer fell behind the churn depends on the file system
    // (a file per thread): shown, not asserted.
    eprintln!("10,000 threads: buffers peaked at {} KiB", t.meta().buffers.peak_bytes >> 10);
    assert_eq!(record::memory_in_use(), 0, "every buffer freed once its thread exited and was written");
}

#[test]
fn exit_values_are_read_back() {
    let _g = serial();
    let dir = tmpdir("values");
    let f = record::register_function(0x5000, "returns");
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    let tid = std::thread::spawn(move || {
        for v in 0..1000u64 {
            assert!(record::entry(f, 0));
            assert!(record::exit_value(f, 0, v * 3));
        }
        gettid()
    })
    .join()
    .unwrap();
    rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    let recs = all_records(&t, tid);
    assert_eq!(recs.len(), 2000);
    let vals: Vec<u64> = recs.iter().filter(|r| r.kind == RecordKind::Exit).map(|r| r.value.unwrap()).collect();
    assert_eq!(vals, (0..1000).map(|v| v * 3).collect::<Vec<_>>());
    let words = t.threads().iter().find(|x| x.tid() == tid).unwrap().meta.words;
    assert_eq!(words, 4 + 1000 + 2000, "a sync record, then per call an entry word, an exit word and its value");
}

// ---------------------------------------------------------------------------
// Count-only.

static COUNT_SIG: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_in_handler(_: i32) {
    if record::count(FuncId(COUNT_SIG.load(Ordering::Relaxed) as u32)) {
        SIG_OK.with(|c| c.set(c.get() + 1));
    }
}

#[test]
fn count_only_exact_per_function() {
    let _g = serial();
    let dir = tmpdir("count");
    let a = record::register_function(0x6000, "count_a");
    let b = record::register_function(0x6100, "count_b");
    let s = record::register_function(0x6200, "count_sig");
    COUNT_SIG.store(s.0 as u64, Ordering::Relaxed);
    install_handler(libc::SIGUSR2, count_in_handler);
    let rec = record::start(RecorderConfig { max_functions: 4096, ..RecorderConfig::new(&dir).count_only() }).unwrap();
    assert!(!record::entry(a, 0), "no entry records in a count-only session");
    const N: u64 = 100_000;
    let sig_total = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let sig_total = sig_total.clone();
            std::thread::spawn(move || {
                // SAFETY: no preconditions.
                let (pid, tid) = (unsafe { libc::getpid() }, gettid());
                for i in 0..N {
                    assert!(record::count(a));
                    if i % 2 == 0 {
                        assert!(record::count(b));
                    }
                    if i % 5000 == 0 {
                        // SAFETY: signalling ourselves.
                        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) };
                    }
                }
                assert!(!record::count(FuncId(1_000_000)), "id beyond max_functions");
                sig_total.fetch_add(SIG_OK.with(|c| c.get()), Ordering::SeqCst);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // A live thread's counts are read at stop too.
    assert!(record::count(a));
    rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    assert_eq!(t.mode(), Mode::Count);
    let counts: HashMap<FuncId, u64> = t.counts().iter().copied().collect();
    assert_eq!(counts[&a], 8 * N + 1);
    assert_eq!(counts[&b], 8 * N / 2);
    assert_eq!(counts[&s], sig_total.load(Ordering::SeqCst));
    assert_eq!(counts[&s], 8 * (N / 5000), "every self-signal counted");
    let range: u64 = t.threads().iter().map(|th| th.meta.dropped_range).sum();
    assert_eq!(range, 8);
    let calls: u64 = t.threads().iter().map(|th| th.meta.calls).sum();
    assert_eq!(calls, counts.values().sum::<u64>());
}

// ---------------------------------------------------------------------------
// Sessions, creation guard, clock.

#[test]
fn sessions_restart_on_live_threads() {
    let _g = serial();
    let f1 = record::register_function(0x7000, "first_session");
    let f2 = record::register_function(0x7100, "second_session");
    assert!(!record::entry(f1, 0), "nothing records without a session");
    let (go1, go2) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (g1, g2) = (go1.clone(), go2.clone());
    let worker = std::thread::spawn(move || {
        let wait = |g: &AtomicUsize, v| {
            while g.load(Ordering::SeqCst) != v {
                std::thread::sleep(Duration::from_millis(1))
            }
        };
        wait(&g1, 1);
        for _ in 0..3 {
            assert!(record::entry(f1, 0) && record::exit(f1, 0));
        }
        g2.store(1, Ordering::SeqCst);
        wait(&g1, 2);
        assert!(!record::entry(f1, 0), "stopped");
        g2.store(2, Ordering::SeqCst);
        wait(&g1, 3);
        for _ in 0..4 {
            assert!(record::entry(f2, 0) && record::exit(f2, 0));
        }
        g2.store(3, Ordering::SeqCst);
        gettid()
    });
    let wait = |v| {
        while go2.load(Ordering::SeqCst) != v {
            std::thread::sleep(Duration::from_millis(1))
        }
    };
    let d1 = tmpdir("session1");
    let d2 = tmpdir("session2");
    let r1 = record::start(RecorderConfig::new(&d1)).unwrap();
    assert!(matches!(record::start(RecorderConfig::new(&d2)), Err(record::RecordError::AlreadyActive { .. })));
    go1.store(1, Ordering::SeqCst);
    wait(1);
    r1.stop().unwrap();
    go1.store(2, Ordering::SeqCst);
    wait(2);
    let r2 = record::start(RecorderConfig::new(&d2)).unwrap();
    go1.store(3, Ordering::SeqCst);
    wait(3);
    r2.stop().unwrap();
    let tid = worker.join().unwrap();
    let t1 = Trace::open(&d1).unwrap();
    let t2 = Trace::open(&d2).unwrap();
    let a = all_records(&t1, tid);
    let b = all_records(&t2, tid);
    assert_eq!(a.len(), 6);
    assert!(a.iter().all(|r| r.func == f1));
    assert_eq!(b.len(), 8, "the reused buffer starts empty");
    assert!(b.iter().all(|r| r.func == f2));
}

static CREATION_SIG_RESULT: AtomicU64 = AtomicU64::new(0);

extern "C" fn record_during_creation(_: i32) {
    let ok = record::entry(FuncId(0), 0);
    CREATION_SIG_RESULT.store(if ok { 1 } else { 2 }, Ordering::SeqCst);
}

extern "C" fn raise_sigurg() {
    // SAFETY: raising a signal on ourselves.
    unsafe { libc::raise(libc::SIGURG) };
}

#[test]
fn signal_during_buffer_creation_is_dropped_and_counted() {
    let _g = serial();
    let dir = tmpdir("creation");
    let f = record::register_function(0x8000, "created");
    install_handler(libc::SIGURG, record_during_creation);
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    record::set_creation_hook(Some(raise_sigurg));
    let (ok, tid) = std::thread::spawn(move || (record::entry(f, 0), gettid())).join().unwrap();
    record::set_creation_hook(None);
    assert!(ok, "the record that created the buffer is kept");
    assert_eq!(CREATION_SIG_RESULT.load(Ordering::SeqCst), 2, "the handler's record was dropped");
    rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    assert_eq!(t.meta().unattributed_drops.creating, 1);
    assert_eq!(t.dropped(), 1);
    assert_eq!(all_records(&t, tid).len(), 1);
}

#[test]
fn monotonic_clock_when_forced() {
    let _g = serial();
    let dir = tmpdir("monotonic");
    let f = record::register_function(0x9000, "mono");
    let rec = record::start(RecorderConfig {
        clock: ClockChoice::Force(ClockSource::Monotonic),
        ..RecorderConfig::new(&dir)
    })
    .unwrap();
    assert_eq!(record::active_clock(), Some(ClockSource::Monotonic));
    let before = record::clock::monotonic_ns();
    let tid = std::thread::spawn(move || {
        assert!(record::entry(f, 0));
        gettid()
    })
    .join()
    .unwrap();
    let after = record::clock::monotonic_ns();
    rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    assert_eq!(t.clock().source, ClockSource::Monotonic);
    let r = all_records(&t, tid)[0];
    assert!(before <= t.to_ns(r.ts) && t.to_ns(r.ts) <= after);
}

#[test]
fn tsc_timestamps_convert_to_monotonic_ns() {
    let _g = serial();
    if record::clock::detect().source != ClockSource::Tsc {
        eprintln!("no invariant TSC: skipped");
        return;
    }
    let dir = tmpdir("tsc");
    let f = record::register_function(0x9100, "tsc");
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    let before = record::clock::monotonic_ns();
    let tid = std::thread::spawn(move || {
        assert!(record::entry(f, 0));
        std::thread::sleep(Duration::from_millis(30));
        assert!(record::exit(f, 0));
        gettid()
    })
    .join()
    .unwrap();
    let after = record::clock::monotonic_ns();
    rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    assert_eq!(t.clock().source, ClockSource::Tsc);
    let r = all_records(&t, tid);
    let (a, b) = (t.to_ns(r[0].ts), t.to_ns(r[1].ts));
    assert!(before.saturating_sub(50_000) <= a && b <= after + 50_000, "{before} <= {a} <= {b} <= {after}");
    let d = t.delta_ns(r[0].ts, r[1].ts);
    assert!((30_000_000..40_000_000).contains(&d), "30 ms sleep measured as {d} ns");
}

/// Ping-pong between two threads: B reads the clock after seeing A's
/// timestamp (acquire), so B's timestamp must not be earlier. (Plain
/// `rdtsc` fails this on the development VM — see record/clock.rs.)
#[test]
fn cross_thread_order() {
    let _g = serial();
    let dir = tmpdir("order");
    let rec = record::start(RecorderConfig::new(&dir).count_only()).unwrap(); // selects the clock
    let slot = Arc::new(AtomicU64::new(0));
    let s2 = slot.clone();
    const ROUNDS: u64 = 100_000;
    let b = std::thread::spawn(move || {
        let mut worst = 0i64;
        let mut violations = 0;
        for i in 0..ROUNDS {
            let t_a = loop {
                let v = s2.load(Ordering::Acquire);
                if v != 0 && v & 1 == i & 1 {
                    break v;
                }
                std::hint::spin_loop();
            };
            let t_b = record::Clock::now() | 1;
            if t_b < t_a {
                violations += 1;
                worst = worst.max((t_a - t_b) as i64);
            }
            s2.store(0, Ordering::Release);
        }
        (violations, worst)
    });
    for i in 0..ROUNDS {
        while slot.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // Low bit carries the round's parity (and makes the value non-zero).
        let t = (record::Clock::now() & !1) | (i & 1);
        let t = if t == 0 { 2 } else { t };
        slot.store(t, Ordering::Release);
    }
    let (violations, worst) = b.join().unwrap();
    rec.stop().unwrap();
    let t = Trace::open(&dir).unwrap();
    let worst_ns = t.delta_ns(0, worst as u64);
    eprintln!("cross-thread order: {violations} of {ROUNDS} rounds reversed, worst by {worst_ns} ns");
    assert_eq!(violations, 0, "timestamps contradict the threads' synchronisation, by up to {worst_ns} ns");
}

#[test]
fn non_trace_directory_is_not_overwritten() {
    let _g = serial();
    let dir = tmpdir("not-a-trace");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("precious.txt"), "keep me").unwrap();
    let e = record::start(RecorderConfig::new(&dir)).unwrap_err();
    assert!(matches!(e, record::RecordError::DirNotEmpty { .. }), "{e}");
    assert!(dir.join("precious.txt").exists());
    // An old trace is moved aside.
    let d2 = tmpdir("replace");
    record::start(RecorderConfig::new(&d2)).unwrap().stop().unwrap();
    record::start(RecorderConfig::new(&d2)).unwrap().stop().unwrap();
    let mut old = d2.as_os_str().to_owned();
    old.push(".old");
    assert!(Path::new(&old).join("meta.json").exists());
}

// ---------------------------------------------------------------------------
// Fork and exit.

fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

#[test]
fn fork_child_records_apart() {
    let _g = serial();
    let dir = tmpdir("fork");
    let fp = record::register_function(0xa000, "parent_side");
    let fc = record::register_function(0xa100, "child_side");
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    for _ in 0..10 {
        assert!(record::entry(fp, 0) && record::exit(fp, 0));
    }
    // SAFETY: the child only records, stops its session and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        for _ in 0..7 {
            if !(record::entry(fc, 0) && record::exit(fc, 0)) {
                code = 2;
            }
        }
        match rec.stop() {
            Ok(s) if s.complete && s.events == 14 => {}
            Ok(_) => code = 3,
            Err(_) => code = 4,
        }
        // SAFETY: leave without running the test harness's exit path.
        unsafe { libc::_exit(code) };
    }
    for _ in 0..5 {
        assert!(record::entry(fp, 0) && record::exit(fp, 0));
    }
    assert_eq!(wait_child(pid), 0, "the child recorded and stopped");
    rec.stop().unwrap();
    let me = gettid();
    let t = Trace::open(&dir).unwrap();
    let recs = all_records(&t, me);
    assert_eq!(recs.len(), 30);
    assert!(recs.iter().all(|r| r.func == fp), "no child records in the parent's trace");
    assert_eq!(t.children().len(), 1);
    let c = Trace::open(&t.children()[0]).unwrap();
    assert_eq!(c.meta().pid, pid);
    // SAFETY: no preconditions.
    assert_eq!(c.meta().parent_pid, Some(unsafe { libc::getpid() }));
    assert_eq!(c.threads().len(), 1);
    let crecs = all_records(&c, pid); // the child's only thread has tid == pid
    assert_eq!(crecs.len(), 14);
    assert!(crecs.iter().all(|r| r.func == fc), "the child's trace has only its own calls");
    assert_balanced(&crecs);
}

#[test]
fn exit_flushes_a_complete_trace() {
    let _g = serial();
    let dir = tmpdir("atexit");
    let f = record::register_function(0xb000, "before_exit");
    // SAFETY: the child starts its own session and calls exit().
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        record::flush_at_exit();
        match record::start(RecorderConfig::new(&dir)) {
            Ok(rec) => {
                for _ in 0..5 {
                    record::entry(f, 0);
                    record::exit(f, 0);
                }
                std::mem::forget(rec); // only the exit hook stops it
                                       // SAFETY: exit runs the atexit handlers.
                unsafe { libc::exit(0) };
            }
            // SAFETY: plain exit.
            Err(_) => unsafe { libc::_exit(5) },
        }
    }
    assert_eq!(wait_child(pid), 0);
    let t = Trace::open(&dir).unwrap();
    assert!(t.is_complete());
    assert_eq!(t.meta().total_events, 10);
}

// ---------------------------------------------------------------------------
// Reader errors.

/// A small complete trace with two threads.
fn sample_trace(name: &str) -> PathBuf {
    let dir = tmpdir(name);
    let f = record::register_function(0xc000, "sample_a");
    let g = record::register_function(0xc100, "sample_b");
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    let hs: Vec<_> = (0..2)
        .map(|k| {
            std::thread::spawn(move || {
                for i in 0..50u32 {
                    record::entry(f, 0);
                    record::entry(g, 1);
                    record::exit_value(g, 1, i as u64 + k);
                    record::exit(f, 0);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    rec.stop().unwrap();
    dir
}

fn copy_dir(from: &Path, name: &str) -> PathBuf {
    let to = tmpdir(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    to
}

fn thread_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    v.sort();
    v
}

fn edit_meta(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("meta.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn records_of(t: &Trace) -> Vec<Record> {
    t.merged().unwrap().collect::<Result<_, _>>().unwrap()
}

#[test]
fn reader_reports_each_kind_of_damage() {
    let _g = serial();
    let good = sample_trace("reader-good");
    let t = Trace::open(&good).unwrap();
    assert_eq!(t.threads().len(), 2);
    assert_eq!(records_of(&t).len(), 2 * 50 * 4);
    assert_eq!(t.name(t.threads().iter().map(|th| all_records(&t, th.tid())[0].func).next().unwrap()), "sample_a");

    let e = Trace::open(good.join("nope")).unwrap_err();
    assert!(matches!(e, TraceReadError::NotFound { .. }), "{e}");
    let e = Trace::open(good.join("meta.json")).unwrap_err();
    assert!(matches!(e, TraceReadError::NotADirectory { .. }), "{e}");

    let d = copy_dir(&good, "r-nometa");
    std::fs::remove_file(d.join("meta.json")).unwrap();
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::MissingFile { .. }));

    let d = copy_dir(&good, "r-incomplete");
    edit_meta(&d, |v| v["complete"] = false.into());
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::Incomplete { .. }), "{e}");
    assert!(e.to_string().contains("allow_incomplete"));
    let s = Trace::open_with(&d, OpenOptions { allow_incomplete: true }).unwrap();
    assert!(!s.is_complete());
    assert_eq!(records_of(&s), records_of(&t));

    let d = copy_dir(&good, "r-garbage");
    std::fs::write(d.join("meta.json"), "{ not json").unwrap();
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::Json { .. }));

    let d = copy_dir(&good, "r-version");
    edit_meta(&d, |v| v["version"] = 99.into());
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::UnsupportedVersion { found: 99, .. }), "{e}");

    let d = copy_dir(&good, "r-format");
    edit_meta(&d, |v| v["format"] = "something-else".into());
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::NotATrace { .. }));

    let d = copy_dir(&good, "r-nosyms");
    std::fs::remove_file(d.join("symbols.jsonl")).unwrap();
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::MissingFile { .. }));

    let d = copy_dir(&good, "r-nofile");
    std::fs::remove_file(&thread_files(&d)[0]).unwrap();
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::MissingFile { .. }));

    let d = copy_dir(&good, "r-trunc");
    let f = &thread_files(&d)[0];
    let len = std::fs::metadata(f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(f).unwrap().set_len(len - 8).unwrap();
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::Truncated { .. }), "{e}");
    // Salvaging a truncated, incomplete trace keeps the whole records.
    edit_meta(&d, |v| v["complete"] = false.into());
    let s = Trace::open_with(&d, OpenOptions { allow_incomplete: true }).unwrap();
    assert_eq!(records_of(&s).len(), 2 * 50 * 4 - 1, "the last exit's value word was cut: the exit goes too");
    assert!(!s.salvage_notes().is_empty());

    let d = copy_dir(&good, "r-trailing");
    let f = &thread_files(&d)[0];
    let mut bytes = std::fs::read(f).unwrap();
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(f, &bytes).unwrap();
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::TrailingData { .. }));

    let d = copy_dir(&good, "r-magic");
    let f = &thread_files(&d)[0];
    let mut bytes = std::fs::read(f).unwrap();
    bytes[0] = b'X';
    std::fs::write(f, &bytes).unwrap();
    assert!(matches!(Trace::open(&d).unwrap_err(), TraceReadError::BadHeader { .. }));

    // Word 5 (after the 4-word sync record and one event) made a special
    // record of type 0.
    let d = copy_dir(&good, "r-kind");
    let f = &thread_files(&d)[0];
    let mut bytes = std::fs::read(f).unwrap();
    bytes[32 + 8 * 5..32 + 8 * 6].copy_from_slice(&0u64.to_le_bytes());
    std::fs::write(f, &bytes).unwrap();
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::CorruptRecord { index: 5, .. }), "{e}");

    // A change that keeps every event plausible: swap two entry words (both
    // known functions, same depth) — only the checksum sees it.
    let d = copy_dir(&good, "r-sum");
    let f = &thread_files(&d)[0];
    let mut bytes = std::fs::read(f).unwrap();
    let (a, b) = (32 + 8 * 4, 32 + 8 * 9); // the first entry of f in two iterations
    for i in 0..8 {
        bytes.swap(a + i, b + i);
    }
    std::fs::write(f, &bytes).unwrap();
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::ChecksumMismatch { .. }), "{e}");

    // A trace written by an earlier textpoke (format 1) is named as such.
    let d = copy_dir(&good, "r-v1");
    edit_meta(&d, |v| v["version"] = 1.into());
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::UnsupportedVersion { found: 1, .. }), "{e}");
    assert!(e.to_string().contains("record the program again"), "{e}");

    // A FIFO in place of a thread file is refused, not read (which would
    // block forever).
    let d = copy_dir(&good, "r-fifo");
    let f = thread_files(&d)[0].clone();
    std::fs::remove_file(&f).unwrap();
    let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::NotAFile { kind: "a FIFO", .. }), "{e}");

    // The same thread listed twice.
    let d = copy_dir(&good, "r-dup");
    edit_meta(&d, |v| {
        let t = v["threads"][0].clone();
        v["threads"].as_array_mut().unwrap().push(t);
    });
    let e = Trace::open(&d).unwrap_err();
    assert!(matches!(e, TraceReadError::Inconsistent { .. }), "{e}");

    // Events far outside the recording's start and end.
    let d = copy_dir(&good, "r-future");
    edit_meta(&d, |v| {
        for k in ["start_ts", "end_ts"] {
            v[k] = (v[k].as_u64().unwrap() + 1_000_000_000_000).into();
        }
    });
    let e = Trace::open(&d).unwrap_err();
    assert!(e.to_string().contains("outside the recording"), "{e}");
}

/// Deterministic fuzzing: every truncation of a thread file, and random
/// bit flips in every file, give an error or (if the flip landed on a
/// field records do not depend on) the same records — never a panic,
/// never different records.
#[test]
fn reader_fuzz_truncations_and_bit_flips() {
    let _g = serial();
    let good = sample_trace("fuzz-good");
    let reference = records_of(&Trace::open(&good).unwrap());
    let work = copy_dir(&good, "fuzz-work");
    let f = thread_files(&work)[0].clone();
    let orig = std::fs::read(&f).unwrap();
    for cut in 0..orig.len() {
        std::fs::write(&f, &orig[..cut]).unwrap();
        assert!(Trace::open(&work).is_err(), "truncated to {cut} bytes yet opened");
    }
    std::fs::write(&f, &orig).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let files: Vec<PathBuf> = std::fs::read_dir(&work).unwrap().map(|e| e.unwrap().path()).collect();
    let (mut errors, mut same) = (0, 0);
    for file in &files {
        let orig = std::fs::read(file).unwrap();
        for _ in 0..150 {
            let mut b = orig.clone();
            let pos = (next() % b.len() as u64) as usize;
            b[pos] ^= 1 << (next() % 8);
            std::fs::write(file, &b).unwrap();
            match Trace::open(&work) {
                Err(_) => errors += 1,
                Ok(t) => {
                    assert_eq!(records_of(&t), reference, "{} byte {pos} flipped: different records", file.display());
                    same += 1;
                }
            }
        }
        std::fs::write(file, &orig).unwrap();
    }
    eprintln!("bit flips: {errors} rejected, {same} harmless");
    assert!(errors > 0);
    // Every flip inside a record file is caught.
    let orig = std::fs::read(&f).unwrap();
    for pos in 0..orig.len() {
        let mut b = orig.clone();
        b[pos] ^= 0x04;
        std::fs::write(&f, &b).unwrap();
        assert!(Trace::open(&work).is_err(), "flip at byte {pos} of a record file not detected");
    }
    std::fs::write(&f, &orig).unwrap();
    assert_eq!(records_of(&Trace::open(&work).unwrap()), reference);
}
