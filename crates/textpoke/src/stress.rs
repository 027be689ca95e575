//! Runtime-generated patch sites and a stress driver for the poke engine.
//!
//! # Sites
//!
//! A `SiteArena` is an anonymous mapping, executable and never writable
//! (its code is written through `/proc/self/mem`, so it also works in a
//! process that refuses W+X pages), holding a counting trampoline
//! (`inc qword [rdi]; ret`) and `n` tiny functions. In the
//! [`Layout::Single`] layout each function is `nop5; ret`; enabling a site
//! turns its NOP into `call trampoline`, so calling the function with a
//! pointer to a counter counts exactly when the site is enabled. Functions
//! are 12 bytes apart so that some sites straddle a 64-byte cache line.
//! [`Layout::Region`] uses `xchg ax,ax; nopl (rax); ret` instead: two
//! instructions replaced by one CALL, which only the stop-machine strategy
//! may do (a thread between the two NOPs would resume inside the CALL).
//!
//! # The stress run
//!
//! Worker threads call the sites in tight loops, each with its own counter,
//! and a per-thread timer signal's handler calls them too, with a counter
//! of its own. The patcher flips every site NOP↔CALL in one batch, over and
//! over, publishing a phase word around each commit: `FLIPPING`, then
//! `ON(epoch)` or `OFF(epoch)` once the commit (and its last sync) is done.
//! A call that starts and ends in the same steady phase must count exactly
//! one (ON) or zero (OFF); anything else is a violation. After the final
//! disable no counter may move.

use crate::sys::threads::gettid;
use crate::{CommitOptions, PokeError, Strategy};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shape of the generated site functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nop5; ret` — one instruction replaced by `call`.
    Single,
    /// `66 90; 0f 1f 00; ret` — two instructions replaced by one `call`.
    Region,
}

#[cfg_attr(target_arch = "aarch64", path = "stress/arena_aarch64.rs")]
mod arena;
#[cfg(not(feature = "testing"))]
use arena::SiteArena;
/// The sites a stress run patches, and executable memory holding given
/// code: fixtures for the tests of the poke engine (`testing` builds).
#[cfg(feature = "testing")]
pub use arena::{CodeMap, SiteArena};

/// A stress run's settings.
#[derive(Debug, Clone)]
pub struct StressConfig {
    pub threads: usize,
    pub sites: usize,
    pub strategy: Strategy,
    pub layout: Layout,
    /// Stop after this many commits...
    pub max_commits: Option<u64>,
    /// ...or after this long, whichever comes first.
    pub duration: Duration,
    /// Per-thread timer signal frequency; 0 for none.
    pub timer_hz: u32,
    /// Whether the timer handler calls sites too.
    pub calls_in_handler: bool,
    pub options: CommitOptions,
}

impl Default for StressConfig {
    fn default() -> StressConfig {
        StressConfig {
            threads: 8,
            sites: 1000,
            strategy: Strategy::Breakpoint,
            layout: Layout::Single,
            max_commits: None,
            duration: Duration::from_secs(2),
            timer_hz: 2000,
            calls_in_handler: true,
            options: CommitOptions::default(),
        }
    }
}

/// What a stress run saw.
#[derive(Debug, Clone, Default)]
pub struct StressReport {
    pub commits: u64,
    /// Site calls made by workers and by signal handlers.
    pub calls: u64,
    pub handler_calls: u64,
    /// Traps the handler emulated during the commits.
    pub traps: u64,
    pub failures: u64,
    /// Descriptions of the first failures.
    pub errors: Vec<String>,
    pub straddling_sites: usize,
}

const PH_FLIPPING: u64 = 0;
const PH_ON: u64 = 1;
const PH_OFF: u64 = 2;

struct Shared {
    arena: SiteArena,
    phase: AtomicU64,
    stop: AtomicBool,
    violations: AtomicU64,
    first_violation: AtomicU64, // (site << 32) | (phase state << 8) | delta
    calls: AtomicU64,
    handler_calls: AtomicU64,
    counted: AtomicU64,
}

struct Worker {
    counter: AtomicU64,
    /// Phase word at the start of the last call this worker completed.
    done_phase: AtomicU64,
    handler_counter: AtomicU64,
    /// Next site the timer handler calls.
    next: AtomicUsize,
}

thread_local! {
    static WORKER: Cell<*const Worker> = const { Cell::new(std::ptr::null()) };
}
static SHARED: std::sync::atomic::AtomicPtr<Shared> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static CALLS_IN_HANDLER: AtomicBool = AtomicBool::new(true);

/// One checked call of site `i` with `counter`.
#[inline(always)]
fn checked_call(sh: &Shared, i: usize, counter: &AtomicU64) -> u64 {
    let ph = sh.phase.load(Ordering::Acquire);
    let before = counter.load(Ordering::Relaxed);
    sh.arena.call(i, counter);
    let after = counter.load(Ordering::Relaxed);
    let ph2 = sh.phase.load(Ordering::Acquire);
    let state = ph & 3;
    if ph == ph2 && state != PH_FLIPPING {
        let want = if state == PH_ON { 1 } else { 0 };
        if after.wrapping_sub(before) != want && sh.violations.fetch_add(1, Ordering::Relaxed) == 0 {
            let d = after.wrapping_sub(before) & 0xff;
            sh.first_violation.store(((i as u64) << 32) | (state << 8) | d, Ordering::Relaxed);
        }
    }
    ph
}

extern "C" fn on_timer(_sig: i32) {
    if !CALLS_IN_HANDLER.load(Ordering::Relaxed) {
        return;
    }
    let sh = SHARED.load(Ordering::Acquire);
    let w = WORKER.with(|w| w.get());
    if sh.is_null() || w.is_null() {
        return;
    }
    // SAFETY: SHARED and WORKER point to live data while the worker runs
    // (cleared before they are dropped; timers are deleted first).
    let (sh, w) = unsafe { (&*sh, &*w) };
    for _ in 0..4 {
        let i = w.next.load(Ordering::Relaxed);
        w.next.store((i + 13) % sh.arena.len(), Ordering::Relaxed);
        let _ = checked_call(sh, i, &w.handler_counter);
        sh.handler_calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// The signal the per-thread timers send.
pub(crate) fn timer_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

fn install_timer_handler() {
    // SAFETY: a plain handler installation.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_timer as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(timer_signal(), &sa, std::ptr::null_mut());
    }
}

/// A per-thread POSIX timer delivering [`timer_signal`] to this thread.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn start(hz: u32) -> Option<ThreadTimer> {
        if hz == 0 {
            return None;
        }
        // SAFETY: sigevent is plain data; SIGEV_THREAD_ID targets this thread.
        unsafe {
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = timer_signal();
            sev.sigev_notify_thread_id = gettid();
            let mut t: libc::timer_t = std::mem::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t) != 0 {
                return None;
            }
            let ns = 1_000_000_000 / hz as i64;
            let period = libc::timespec { tv_sec: ns / 1_000_000_000, tv_nsec: ns % 1_000_000_000 };
            let spec = libc::itimerspec { it_interval: period, it_value: period };
            libc::timer_settime(t, 0, &spec, std::ptr::null_mut());
            Some(ThreadTimer(t))
        }
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: our timer.
        unsafe { libc::timer_delete(self.0) };
    }
}

fn worker_loop(sh: &Shared, w: &Worker, timer_hz: u32) {
    WORKER.with(|c| c.set(w));
    let timer = ThreadTimer::start(timer_hz);
    let n = sh.arena.len();
    let mut i = w.next.load(Ordering::Relaxed);
    let mut calls = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let ph = checked_call(sh, i, &w.counter);
        w.done_phase.store(ph, Ordering::Release);
        i = (i + 7) % n;
        calls += 1;
    }
    drop(timer);
    WORKER.with(|c| c.set(std::ptr::null()));
    sh.calls.fetch_add(calls, Ordering::Relaxed);
    sh.counted
        .fetch_add(w.counter.load(Ordering::Relaxed) + w.handler_counter.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Runs a stress test of the engine (one at a time per process).
pub fn run(cfg: &StressConfig) -> Result<StressReport, PokeError> {
    static RUNNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let arena = SiteArena::new(cfg.sites, cfg.layout)
        .map_err(|source| PokeError::Sys { what: "map the site arena", source })?;
    let straddling = arena.straddling();
    let sh = Arc::new(Shared {
        arena,
        phase: AtomicU64::new(PH_OFF),
        stop: AtomicBool::new(false),
        violations: AtomicU64::new(0),
        first_violation: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        handler_calls: AtomicU64::new(0),
        counted: AtomicU64::new(0),
    });
    CALLS_IN_HANDLER.store(cfg.calls_in_handler, Ordering::Relaxed);
    SHARED.store(Arc::as_ptr(&sh) as *mut Shared, Ordering::Release);
    install_timer_handler();
    let workers: Vec<Arc<Worker>> = (0..cfg.threads)
        .map(|t| {
            Arc::new(Worker {
                counter: AtomicU64::new(0),
                done_phase: AtomicU64::new(u64::MAX),
                handler_counter: AtomicU64::new(0),
                next: AtomicUsize::new(t % cfg.sites.max(1)),
            })
        })
        .collect();
    let handles: Vec<_> = workers
        .iter()
        .map(|w| {
            let (sh, w) = (sh.clone(), w.clone());
            let hz = cfg.timer_hz;
            std::thread::spawn(move || worker_loop(&sh, &w, hz))
        })
        .collect();

    let mut report = StressReport { straddling_sites: straddling, ..StressReport::default() };
    let opts = CommitOptions { strategy: cfg.strategy, ..cfg.options };
    let (on_batch, off_batch) = (sh.arena.batch(true), sh.arena.batch(false));
    let start = Instant::now();
    let mut on = false;
    let mut epoch = 0u64;
    let mut flip = |on: &mut bool, report: &mut StressReport| {
        sh.phase.store(PH_FLIPPING, Ordering::Release);
        let b = if *on { &off_batch } else { &on_batch };
        match b.commit_with(opts) {
            Ok(st) => {
                *on = !*on;
                report.commits += 1;
                report.traps += st.traps;
            }
            Err(e) => {
                report.failures += 1;
                if report.errors.len() < 5 {
                    report.errors.push(e.to_string());
                }
            }
        }
        epoch += 1;
        sh.phase.store((epoch << 2) | if *on { PH_ON } else { PH_OFF }, Ordering::Release);
    };
    while start.elapsed() < cfg.duration && cfg.max_commits.is_none_or(|m| report.commits < m) && report.failures < 5 {
        flip(&mut on, &mut report);
        // A short steady window in which calls are checked exactly (a spin:
        // yielding to eight spinning threads would take milliseconds).
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(50) {
            std::hint::spin_loop();
        }
    }
    if on {
        flip(&mut on, &mut report);
    }
    // After the final disable (and its sync) nothing may be counted: wait
    // until every worker completed a call that started after it (a call
    // already inside the trampoline may still count), then watch.
    let final_phase = sh.phase.load(Ordering::Relaxed);
    let wait_start = Instant::now();
    while workers.iter().any(|w| w.done_phase.load(Ordering::Acquire) != final_phase) {
        if wait_start.elapsed() > Duration::from_secs(10) {
            report.failures += 1;
            report.errors.push("a worker made no progress for 10 s after the final disable".into());
            break;
        }
        std::thread::yield_now();
    }
    let snapshot = |ws: &[Arc<Worker>]| -> u64 {
        ws.iter().map(|w| w.counter.load(Ordering::Relaxed) + w.handler_counter.load(Ordering::Relaxed)).sum()
    };
    let settled = snapshot(&workers);
    std::thread::sleep(Duration::from_millis(30));
    let later = snapshot(&workers);
    if on || later != settled {
        report.failures += 1;
        report.errors.push(format!("{} call(s) counted after the final disable", later - settled));
    }
    sh.stop.store(true, Ordering::Relaxed);
    for h in handles {
        if h.join().is_err() {
            report.failures += 1;
            report.errors.push("a worker thread panicked".into());
        }
    }
    SHARED.store(std::ptr::null_mut(), Ordering::Release);
    let v = sh.violations.load(Ordering::Relaxed);
    if v > 0 {
        let f = sh.first_violation.load(Ordering::Relaxed);
        let state = if (f >> 8) & 3 == PH_ON { "enabled" } else { "disabled" };
        report.failures += v;
        report.errors.push(format!(
            "{v} call(s) miscounted in a steady phase; first: site {} counted {} while steadily {state}",
            f >> 32,
            f & 0xff
        ));
    }
    report.calls = sh.calls.load(Ordering::Relaxed) + sh.handler_calls.load(Ordering::Relaxed);
    report.handler_calls = sh.handler_calls.load(Ordering::Relaxed);
    Ok(report)
}
