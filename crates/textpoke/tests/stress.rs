//! Stress: 8+ threads call 1,000 sites in tight loops (and from a per-thread
//! 2 kHz timer signal handler) while the main thread flips every site
//! NOP<->CALL thousands of times. Every call made in a steady phase is
//! counted exactly; nothing is counted after the final disable.

use std::time::Duration;
use textpoke::stress::{run, Layout, StressConfig};
use textpoke::{CommitOptions, Strategy, SyncMethod};

/// `TEXTPOKE_STRESS_DIVISOR` divides every run's flips (at least 20 remain):
/// `.ci/aarch64` sets it, as qemu runs the same work some 20 times slower.
fn scaled(commits: u64) -> u64 {
    let div = std::env::var("TEXTPOKE_STRESS_DIVISOR").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
    (commits / div.max(1)).max(20)
}

fn stress(strategy: Strategy, layout: Layout, sync: Option<SyncMethod>, commits: u64) {
    let commits = scaled(commits);
    let cfg = StressConfig {
        threads: 8,
        sites: 1000,
        strategy,
        layout,
        max_commits: Some(commits),
        duration: Duration::from_secs(300),
        timer_hz: 2000,
        calls_in_handler: true,
        options: CommitOptions { sync, ..CommitOptions::default() },
    };
    let r = run(&cfg).expect("stress run");
    assert_eq!(r.failures, 0, "{strategy}: {:?}", r.errors);
    assert_eq!(r.commits, commits, "every flip committed");
    // x86-64 sites are 12 bytes apart and some cross a cache line; aarch64
    // sites are aligned words, which never do.
    #[cfg(target_arch = "x86_64")]
    assert!(r.straddling_sites > 0, "some sites straddle a cache line");
    assert!(r.calls > commits * 10, "workers made calls throughout: {}", r.calls);
    assert!(r.handler_calls > 0, "the timer handlers called sites");
    // On aarch64 the live strategy swaps whole words and writes no trap.
    if strategy == Strategy::Breakpoint && cfg!(target_arch = "x86_64") {
        assert!(r.traps > 0, "threads hit trap bytes and were emulated");
    } else {
        assert_eq!(r.traps, 0, "only x86-64's breakpoint protocol writes trap bytes");
    }
}

#[test]
fn breakpoint_membarrier_2000_flips() {
    stress(Strategy::Breakpoint, Layout::Single, None, 2000);
}

#[test]
fn breakpoint_signal_sync_300_flips() {
    stress(Strategy::Breakpoint, Layout::Single, Some(SyncMethod::Signals), 300);
}

#[test]
fn stop_machine_1000_flips() {
    stress(Strategy::StopMachine, Layout::Single, None, 1000);
}

#[test]
fn stop_machine_multi_instruction_regions_300_flips() {
    // Two NOPs replaced by one CALL: a thread parked between them (directly
    // or in an outer signal frame) must make the commit retry.
    stress(Strategy::StopMachine, Layout::Region, None, 300);
}

/// Threads that start and exit during commits must neither hang nor break
/// any strategy: 4 churners keep spawning short-lived threads (half of them
/// calling sites of their own arena) while the stress runs.
#[test]
fn thread_churn_during_commits() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use textpoke::stress::SiteArena;
    let stop = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(AtomicU64::new(0));
    let own = Arc::new(SiteArena::new(16, Layout::Single).unwrap());
    let churners: Vec<_> = (0..4)
        .map(|c| {
            let (stop, spawned, own) = (stop.clone(), spawned.clone(), own.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let own = own.clone();
                    let t = std::thread::spawn(move || {
                        let counter = AtomicU64::new(0);
                        for i in 0..200 {
                            own.call((i + c) % 16, &counter);
                        }
                    });
                    spawned.fetch_add(1, Ordering::Relaxed);
                    t.join().unwrap();
                }
            })
        })
        .collect();
    let flipper = {
        let (stop, own) = (stop.clone(), own.clone());
        std::thread::spawn(move || {
            let mut on = false;
            while !stop.load(Ordering::Relaxed) {
                own.batch(!on).commit().unwrap();
                on = !on;
            }
            if on {
                own.batch(false).commit().unwrap();
            }
        })
    };
    for (strategy, sync, commits) in [
        (Strategy::Breakpoint, None, 500),
        (Strategy::Breakpoint, Some(SyncMethod::Signals), 200),
        (Strategy::StopMachine, None, 200),
    ] {
        let commits = scaled(commits);
        let cfg = StressConfig {
            threads: 4,
            sites: 200,
            strategy,
            max_commits: Some(commits),
            duration: Duration::from_secs(300),
            options: CommitOptions { sync, ..CommitOptions::default() },
            ..StressConfig::default()
        };
        let r = run(&cfg).expect("stress run");
        assert_eq!(r.failures, 0, "{strategy} {sync:?}: {:?}", r.errors);
        assert_eq!(r.commits, commits);
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    for c in churners {
        c.join().unwrap();
    }
    assert!(spawned.load(Ordering::Relaxed) > 100, "threads were churning: {}", spawned.load(Ordering::Relaxed));
}
