//! The crash flush (`record::crash`): what a thread hit by a fatal signal
//! writes, without allocating, and what a recorder that lives on after it
//! makes of the trace. (The signal handling itself is the agent's; its
//! tests are the CLI's `crash.rs`.)
//!
//! The recorder is process-wide, so the tests take a lock and run one at a
//! time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use textpoke_record::crash::{self, CrashFlush, FatalSignal};
use textpoke_record::tracedata::{OpenOptions, RecordKind, Trace};
use textpoke_record::{self as record, FuncId, RecorderConfig};

// ---------------------------------------------------------------------------
// An allocator that counts the allocations of a thread that asks it to.

struct Counting;

thread_local! {
    static WATCHED: Cell<bool> = const { Cell::new(false) };
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc() {
    // try_with: the allocator runs during thread teardown too.
    let _ = WATCHED.try_with(|w| {
        if w.get() {
            let _ = SEEN.try_with(|s| s.set(s.get() + 1));
        }
    });
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: as above.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note_alloc();
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` counting this thread's allocations and frees; returns both.
fn counting<R>(f: impl FnOnce() -> R) -> (R, u64) {
    SEEN.with(|s| s.set(0));
    WATCHED.with(|w| w.set(true));
    let r = f();
    WATCHED.with(|w| w.set(false));
    (r, SEEN.with(|s| s.get()))
}

// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmpdir(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("crash-tests").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    d
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn segv() -> FatalSignal {
    FatalSignal { signal: libc::SIGSEGV, code: 1, addr: Some(0x10), sender_pid: None }
}

/// Calls `f` `n` times as entry/exit pairs at depth 0.
fn calls(f: FuncId, n: usize) {
    for _ in 0..n {
        assert!(record::entry(f, 0));
        assert!(record::exit(f, 0));
    }
}

/// Per function name, the entries on thread `tid`; and the last record's
/// function and kind.
fn entries_of(t: &Trace, tid: i32) -> (std::collections::BTreeMap<String, u64>, Option<(String, RecordKind)>) {
    let th = t.threads().iter().find(|x| x.tid() == tid).unwrap_or_else(|| panic!("thread {tid} not in the trace"));
    let mut m = std::collections::BTreeMap::new();
    let mut last = None;
    for r in t.records(th).unwrap() {
        let r = r.unwrap();
        assert!(!matches!(r.kind, RecordKind::Gap), "nothing lost: {r:?}");
        if r.kind == RecordKind::Entry {
            *m.entry(t.name(r.func).to_string()).or_insert(0) += 1;
        }
        last = Some((t.name(r.func).to_string(), r.kind));
    }
    (m, last)
}

/// Threads with unwritten events (one that exited, two alive, one of them
/// in a function first called after the writer's last pass and left open),
/// flushed from another thread that allocates nothing meanwhile. The
/// salvaged trace holds every event, every name, exact counts and the
/// signal; a recorder that lives on then finishes a complete, valid trace
/// (the flush's writes were the writer's own, at the writer's places).
#[test]
fn flush_writes_everything_without_allocating_and_the_writer_carries_on() {
    let _s = serial();
    let dir = tmpdir("flush");
    let mut cfg = RecorderConfig::new(&dir);
    cfg.segment_bytes = 8192; // many segments: chains to follow
    cfg.flush_interval = Duration::from_secs(3600); // the writer drains only when a segment fills
    let rec = record::start(cfg).unwrap();
    let work = record::register_function(0x5100_0000, "crash_work");
    let late = record::register_function(0x5100_0010, "crash_late_first_call");
    let quit = record::register_function(0x5100_0020, "crash_exited");

    // A thread that records and exits (retired, or not yet, by the writer).
    let exited = std::thread::spawn(move || {
        calls(quit, 3000);
        gettid()
    })
    .join()
    .unwrap();
    // Two threads that record and stay: one ends inside `late`, open.
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(Mutex::new(go_rx));
    let mut alive = Vec::new();
    for k in 0..2usize {
        let tx = tx.clone();
        let go = go_rx.clone();
        alive.push(std::thread::spawn(move || {
            calls(work, 5000 + k);
            if k == 1 {
                assert!(record::entry(late, 0));
            }
            tx.send((k, gettid())).unwrap();
            let _ = go.lock().unwrap().recv();
            if k == 1 {
                assert!(record::exit(late, 0));
            }
            calls(work, 10);
        }));
    }
    let mut tids = [0; 2];
    for _ in 0..2 {
        let (k, tid) = rx.recv().unwrap();
        tids[k] = tid;
    }
    // This thread's events come after the writer's last pass (it drains
    // when a segment fills or a thread exits; the interval is an hour).
    std::thread::sleep(Duration::from_millis(100));
    calls(work, 7);

    let flusher = std::thread::spawn(|| {
        let me = gettid();
        let (r, allocs) = counting(|| crash::flush_for_signal(&segv()));
        (me, r, allocs)
    });
    let (flusher_tid, r, allocs) = flusher.join().unwrap();
    assert!(matches!(r, CrashFlush::Written { events } if events >= 14), "{r:?}");
    assert_eq!(allocs, 0, "the crash flush allocated or freed memory");
    assert_eq!(crash::flush_for_signal(&segv()), CrashFlush::AlreadyFlushed, "one flush per crash");

    let t = Trace::open_with(&dir, OpenOptions { allow_incomplete: true }).unwrap();
    assert!(!t.is_complete());
    assert!(t.salvage_notes().is_empty(), "the metadata matches the files: {:?}", t.salvage_notes());
    let end = t.meta().ended_by.clone().expect("the metadata says which signal ended the recording");
    assert_eq!((end.signal, end.name.as_str(), end.tid, end.addr), (libc::SIGSEGV, "SIGSEGV", flusher_tid, Some(0x10)));
    assert!(end.flushed_events > 0 && end.flushed_events <= t.meta().total_events);
    let (m, _) = entries_of(&t, exited);
    assert_eq!(m.get("crash_exited"), Some(&3000));
    let (m, _) = entries_of(&t, tids[0]);
    assert_eq!(m.get("crash_work"), Some(&5000));
    let (m, last) = entries_of(&t, tids[1]);
    assert_eq!(m.get("crash_work"), Some(&5001));
    assert_eq!(last, Some(("crash_late_first_call".to_string(), RecordKind::Entry)), "the thread's last event");
    let (m, _) = entries_of(&t, gettid());
    assert_eq!(m.get("crash_work"), Some(&7));
    let counts: std::collections::BTreeMap<&str, u64> = t.counts().iter().map(|&(f, n)| (t.name(f), n)).collect();
    assert_eq!(counts.get("crash_work"), Some(&(5000 + 5001 + 7)));
    assert_eq!(counts.get("crash_late_first_call"), Some(&1));
    assert_eq!(counts.get("crash_exited"), Some(&3000));
    assert_eq!(t.dropped(), 0);

    // The process lives on (a raise(SIGABRT) whose handler returned): the
    // writer carries on where it was and the stop writes a complete trace.
    for _ in 0..2 {
        go_tx.send(()).unwrap();
    }
    for a in alive {
        a.join().unwrap();
    }
    calls(late, 2);
    let summary = rec.stop().unwrap();
    assert!(summary.complete);
    let t = Trace::open(&dir).unwrap(); // checksums, sizes, counts, no id twice
    assert!(t.meta().ended_by.is_none(), "a complete trace was not ended by a signal");
    let counts: std::collections::BTreeMap<&str, u64> = t.counts().iter().map(|&(f, n)| (t.name(f), n)).collect();
    assert_eq!(counts.get("crash_work"), Some(&(5000 + 5001 + 7 + 20)));
    assert_eq!(counts.get("crash_late_first_call"), Some(&3));
    let (m, _) = entries_of(&t, tids[1]);
    assert_eq!(m.get("crash_work"), Some(&5011));
}

/// A count-only session: the counts up to the signal, and the signal.
#[test]
fn count_only_sessions_flush_their_counts() {
    let _s = serial();
    let dir = tmpdir("count");
    let mut cfg = RecorderConfig::new(&dir).count_only();
    cfg.flush_interval = Duration::from_secs(3600);
    let rec = record::start(cfg).unwrap();
    let f = record::register_function(0x5200_0000, "crash_counted");
    for _ in 0..123 {
        assert!(record::count(f));
    }
    let abrt = FatalSignal {
        signal: libc::SIGABRT,
        code: libc::SI_TKILL,
        addr: None,
        sender_pid: Some(std::process::id() as i32),
    };
    let (r, allocs) = counting(|| crash::flush_for_signal(&abrt));
    assert_eq!(r, CrashFlush::Written { events: 0 });
    assert_eq!(allocs, 0);
    let t = Trace::open_with(&dir, OpenOptions { allow_incomplete: true }).unwrap();
    let end = t.meta().ended_by.clone().unwrap();
    assert_eq!(
        (end.signal, end.name.as_str(), end.sender_pid),
        (libc::SIGABRT, "SIGABRT", Some(std::process::id() as i32))
    );
    assert_eq!(
        end.describe(std::process::id() as i32),
        format!("SIGABRT (abort(), a failed assert() or raise()) on thread {}", gettid())
    );
    let counts: std::collections::BTreeMap<&str, u64> = t.counts().iter().map(|&(f, n)| (t.name(f), n)).collect();
    assert_eq!(counts.get("crash_counted"), Some(&123));
    rec.stop().unwrap();
    assert!(Trace::open(&dir).unwrap().meta().ended_by.is_none());
}

/// Without a session there is nothing to write.
#[test]
fn nothing_to_flush_without_a_session() {
    let _s = serial();
    assert_eq!(crash::flush_for_signal(&segv()), CrashFlush::NotRecording);
}
