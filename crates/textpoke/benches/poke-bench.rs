//! poke-bench: commit latency of batches of 1, 100 and 10,000 sites while 4
//! busy threads call those very sites, per strategy; sync rounds per
//! batch; the longest pause a busy thread saw; and one-site commits in an
//! otherwise idle process.
//!
//! cargo bench -p textpoke --bench poke-bench
//!
//! Pauses. This machine has 2 cores and the benchmark runs 4 busy threads
//! plus the patcher, so the scheduler alone keeps each thread waiting on a
//! run queue for milliseconds at a time, whatever the strategy. The kernel
//! accounts that wait per thread (`/proc/thread-self/schedstat`, field 2),
//! so each busy thread reads it around every loop iteration during the
//! commits and the figures subtract it:
//!
//! - "pause": the longest iteration, minus its run-queue wait, during which
//!   textpoke's handlers ran on the thread (a trap on a site, or parked).
//!   A parked thread is blocked, not waiting, so stop-machine's parking
//!   counts in full. This is the pause the strategy causes.
//! - "gap": the longest iteration of any kind, wall clock, scheduler
//!   included, for reference.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use textpoke::stress::{Layout, SiteArena};
use textpoke::sync::thread_holds;
use textpoke::{Batch, CommitOptions, Strategy, WriteMethod};

const BUSY: usize = 4;

struct Busy {
    arena: Arc<SiteArena>,
    /// Busy threads call sites 0..active.
    active: AtomicU64,
    stop: AtomicBool,
    /// Whether a measured window is open.
    measuring: AtomicBool,
    /// Longest iterations (ns) since last reset.
    held_ns: AtomicU64,
    gap_ns: AtomicU64,
    /// Iterations measured, and those during which textpoke held the thread.
    measured: AtomicU64,
    held: AtomicU64,
    /// Held pauses by power-of-two bucket of nanoseconds.
    hist: [AtomicU64; 40],
}

/// This thread's run-queue wait so far, from the kernel's schedstat.
struct RunQueueWait(std::fs::File);

impl RunQueueWait {
    fn open() -> RunQueueWait {
        RunQueueWait(std::fs::File::open("/proc/thread-self/schedstat").expect("schedstat (CONFIG_SCHED_INFO)"))
    }
    fn ns(&self) -> u64 {
        let mut buf = [0u8; 96];
        let n = std::os::unix::fs::FileExt::read_at(&self.0, &mut buf, 0).unwrap_or(0);
        let text = std::str::from_utf8(&buf[..n]).unwrap_or("");
        text.split_whitespace().nth(1).and_then(|w| w.parse().ok()).unwrap_or(0)
    }
}

fn busy_loop(b: &Busy, seed: usize) {
    let counter = AtomicU64::new(0);
    let rq = RunQueueWait::open();
    let mut i = seed;
    while !b.stop.load(Ordering::Relaxed) {
        let n = b.active.load(Ordering::Relaxed) as usize;
        if !b.measuring.load(Ordering::Relaxed) {
            b.arena.call(i % n, &counter);
            i = i.wrapping_add(7);
            continue;
        }
        let (holds, waited, start) = (thread_holds(), rq.ns(), Instant::now());
        b.arena.call(i % n, &counter);
        let took = start.elapsed().as_nanos() as u64;
        b.gap_ns.fetch_max(took, Ordering::Relaxed);
        b.measured.fetch_add(1, Ordering::Relaxed);
        if thread_holds() != holds {
            b.held.fetch_add(1, Ordering::Relaxed);
            let pause = took.saturating_sub(rq.ns() - waited);
            b.held_ns.fetch_max(pause, Ordering::Relaxed);
            b.hist[(64 - pause.leading_zeros() as usize).min(39)].fetch_add(1, Ordering::Relaxed);
        }
        i = i.wrapping_add(7);
    }
}

struct Row {
    strategy: Strategy,
    sites: usize,
    commits: usize,
    median: Duration,
    max: Duration,
    rounds: u32,
    pause: Duration,
    gap: Duration,
    held: u64,
    measured: u64,
    /// Upper bounds of the median and 99th-percentile held pause.
    p50: Duration,
    p99: Duration,
}

/// Upper bound of the bucket holding quantile `q` of the histogram.
fn percentile(hist: &[AtomicU64; 40], q: f64) -> Duration {
    let counts: Vec<u64> = hist.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let total: u64 = counts.iter().sum();
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if total > 0 && seen as f64 >= q * total as f64 {
            return Duration::from_nanos(1u64 << i);
        }
    }
    Duration::ZERO
}

fn measure(b: &Busy, strategy: Strategy, n: usize, commits: usize) -> Row {
    let on: Batch = (0..n).map(|i| b.arena.poke(i, true)).collect();
    let off: Batch = (0..n).map(|i| b.arena.poke(i, false)).collect();
    b.active.store(n as u64, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    let opts = CommitOptions { write: write_method(), ..CommitOptions::strategy(strategy) };
    let mut times = Vec::with_capacity(commits);
    let mut rounds = 0;
    for c in [&b.held_ns, &b.gap_ns, &b.held, &b.measured].into_iter().chain(&b.hist) {
        c.store(0, Ordering::Relaxed);
    }
    b.measuring.store(true, Ordering::Relaxed);
    for k in 0..commits {
        // Let the busy threads run on both cores before each commit.
        std::thread::sleep(Duration::from_millis(1));
        let batch = if k % 2 == 0 { &on } else { &off };
        let st = batch.commit_with(opts).expect("commit");
        times.push(st.elapsed);
        rounds = st.sync_rounds;
    }
    b.measuring.store(false, Ordering::Relaxed);
    if commits % 2 == 1 {
        off.commit_with(opts).expect("commit");
    }
    times.sort();
    Row {
        strategy,
        sites: n,
        commits,
        median: times[times.len() / 2],
        max: *times.last().unwrap(),
        rounds,
        pause: Duration::from_nanos(b.held_ns.load(Ordering::Relaxed)),
        gap: Duration::from_nanos(b.gap_ns.load(Ordering::Relaxed)),
        held: b.held.load(Ordering::Relaxed),
        measured: b.measured.load(Ordering::Relaxed),
        p99: percentile(&b.hist, 0.99),
        p50: percentile(&b.hist, 0.5),
    }
}

/// `TEXTPOKE_BENCH_WRITE=procmem|mprotect` forces a write method.
fn write_method() -> Option<WriteMethod> {
    match std::env::var("TEXTPOKE_BENCH_WRITE").as_deref() {
        Ok("procmem") => Some(WriteMethod::ProcMem),
        Ok("mprotect") => Some(WriteMethod::Mprotect),
        _ => None,
    }
}

fn idle_one_site(strategy: Strategy) -> (Duration, Duration) {
    let arena = SiteArena::new(1, Layout::Single).unwrap();
    let (on, off) = (arena.batch(true), arena.batch(false));
    let opts = CommitOptions { write: write_method(), ..CommitOptions::strategy(strategy) };
    let mut t = Vec::new();
    for k in 0..2000 {
        let st = if k % 2 == 0 { on.commit_with(opts) } else { off.commit_with(opts) }.unwrap();
        t.push(st.elapsed);
    }
    t.sort();
    (t[t.len() / 2], t[t.len() * 99 / 100])
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes harness=false benches this way
    }
    let caps = textpoke::capabilities();
    let write = write_method().unwrap_or(caps.write_method);
    println!("poke-bench: sync={} write={write} cores={}", caps.sync_method, num_cpus());

    // Idle first, before any other thread exists.
    println!("\none-site commit, idle process (2000 commits):");
    for s in [Strategy::Breakpoint, Strategy::StopMachine] {
        let (med, p99) = idle_one_site(s);
        println!("  {s:<13} median {:>7} us   p99 {:>7} us", us(med), us(p99));
    }

    let arena = Arc::new(SiteArena::new(10_000, Layout::Single).unwrap());
    let busy = Arc::new(Busy {
        arena,
        active: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
        held_ns: AtomicU64::new(0),
        gap_ns: AtomicU64::new(0),
        measured: AtomicU64::new(0),
        held: AtomicU64::new(0),
        hist: std::array::from_fn(|_| AtomicU64::new(0)),
    });
    let threads: Vec<_> = (0..BUSY)
        .map(|t| {
            let b = busy.clone();
            std::thread::spawn(move || busy_loop(&b, t))
        })
        .collect();

    println!("\n{BUSY} busy threads calling the sites being patched:");
    println!(
        "  {:<13} {:>6} {:>7} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "strategy",
        "sites",
        "commits",
        "median us",
        "max us",
        "syncs",
        "pause us",
        "gap us",
        "holds",
        "p50<=us",
        "p99<=us"
    );
    let mut rows = Vec::new();
    for (n, commits) in [(1usize, 200usize), (100, 200), (10_000, 40)] {
        for s in [Strategy::Breakpoint, Strategy::StopMachine] {
            let r = measure(&busy, s, n, commits);
            println!(
                "  {:<13} {:>6} {:>7} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}",
                r.strategy.to_string(),
                r.sites,
                r.commits,
                us(r.median),
                us(r.max),
                r.rounds,
                us(r.pause),
                us(r.gap),
                r.held,
                us(r.p50),
                us(r.p99)
            );
            assert!(
                r.measured > 0 && r.held > 0,
                "the busy threads must have run and been held: {} {}",
                r.measured,
                r.held
            );
            rows.push(r);
        }
    }
    println!("\nlongest pause, breakpoint / stop-machine (target <= 0.1):");
    for pair in rows.chunks(2) {
        let ratio = pair[0].pause.as_secs_f64() / pair[1].pause.as_secs_f64().max(1e-9);
        println!("  {:>6} sites: {:.3}", pair[0].sites, ratio);
    }
    busy.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
