//! Stress: 8+ threads call 1,000 sites in tight loops (and from a per-thread
//! 2 kHz timer signal handler) while the main thread flips every site
//! NOP<->CALL thousands of times. Every call made in a steady phase is
//! counted exactly; nothing is counted after the final disable.

use std::time::Duration;
use textpoke::stress::{run, Layout, StressConfig};
use textpoke::{CommitOptions, Strategy, SyncMethod};

fn stress(strategy: Strategy, layout: Layout, sync: Option<SyncMethod>, commits: u64) {
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
    assert!(r.straddling_sites > 0, "some sites straddle a cache line");
    assert!(r.calls > commits * 10, "workers made calls throughout: {}", r.calls);
    assert!(r.handler_calls > 0, "the timer handlers called sites");
    if strategy == Strategy::Breakpoint {
        assert!(r.traps > 0, "threads hit trap bytes and were emulated");
    } else {
        assert_eq!(r.traps, 0, "stop-machine never writes trap bytes");
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
