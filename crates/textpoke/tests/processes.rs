//! Scenarios that change process-wide state (the SIGTRAP disposition, MDWE,
//! which cannot be undone) run in a fresh copy of this test binary.
//!
//! - chaining: the application's own int3 and raise(SIGTRAP) reach its own
//!   handler, exactly once each, while patching goes on; a handler the
//!   application installs over ours is detected at the next commit, which
//!   writes nothing, until textpoke takes SIGTRAP back;
//! - SIG_DFL and SIG_IGN keep their meaning with textpoke installed;
//! - a process with `PR_MDWE_REFUSE_EXEC_GAIN` is patched through
//!   /proc/self/mem, by both strategies, under stress.

mod common;

use common::{child_scenario, peek, rerun_self, wx_mappings};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use textpoke::arch::NOP5;
use textpoke::stress::{self, Layout, SiteArena, StressConfig};
use textpoke::{CommitOptions, PokeError, Strategy, WriteMethod};

/// Entry point of the child copies (a no-op in a normal run).
#[test]
fn child_entry() {
    let Some(scenario) = child_scenario() else {
        return;
    };
    match scenario.as_str() {
        "chain" => chain(),
        "dfl" => sig_dfl(),
        "ign" => sig_ign(),
        "mdwe" => mdwe(),
        "blocked" => blocked_thread(),
        other => panic!("unknown scenario {other}"),
    }
    println!("scenario-ok {scenario}");
}

fn run_child(scenario: &str) -> std::process::Output {
    let out = rerun_self("child_entry", scenario);
    eprintln!("--- child {scenario} stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("--- child {scenario} stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stdout_has(out: &std::process::Output, s: &str) -> bool {
    String::from_utf8_lossy(&out.stdout).contains(s)
}

#[test]
fn application_traps_are_chained_while_patching() {
    let out = run_child("chain");
    assert!(out.status.success() && stdout_has(&out, "scenario-ok chain"));
}

#[test]
fn sig_dfl_trap_still_terminates() {
    let out = run_child("dfl");
    assert_eq!(out.status.signal(), Some(libc::SIGTRAP), "died of SIGTRAP: {:?}", out.status);
    assert!(stdout_has(&out, "before-int3"));
    assert!(!stdout_has(&out, "scenario-ok"));
}

#[test]
fn sig_ign_ignores_raise_but_not_a_real_trap() {
    let out = run_child("ign");
    assert!(stdout_has(&out, "survived-raise"));
    assert_eq!(out.status.signal(), Some(libc::SIGTRAP), "a real int3 still terminates: {:?}", out.status);
}

#[test]
fn hardened_process_is_patched_through_proc_mem() {
    let out = run_child("mdwe");
    assert!(out.status.success() && stdout_has(&out, "scenario-ok mdwe"));
}

#[test]
fn a_thread_blocking_the_rendezvous_signal_fails_cleanly() {
    let out = run_child("blocked");
    assert!(out.status.success() && stdout_has(&out, "scenario-ok blocked"));
}

// ---------------------------------------------------------------- children

static APP_TRAPS: AtomicU64 = AtomicU64::new(0);
static APP2_TRAPS: AtomicU64 = AtomicU64::new(0);

extern "C" fn app_handler(_sig: i32, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    APP_TRAPS.fetch_add(1, Ordering::Relaxed); // int3 resumes after itself
}

extern "C" fn app_handler2(_sig: i32) {
    APP2_TRAPS.fetch_add(1, Ordering::Relaxed);
}

fn set_handler(handler: usize, siginfo: bool) {
    // SAFETY: installing a valid handler for SIGTRAP.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
    }
}

fn int3() {
    // SAFETY: int3 raises SIGTRAP, which the scenario handles.
    unsafe { std::arch::asm!("int3") };
}

fn chain() {
    set_handler(app_handler as *const () as usize, true);
    let arena = Arc::new(SiteArena::new(200, Layout::Single).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|t| {
            let (a, stop) = (arena.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = AtomicU64::new(0);
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    a.call(i % 200, &c);
                    i += 7;
                }
            })
        })
        .collect();
    let trapper = std::thread::spawn(|| {
        for i in 0..20_000 {
            if i % 10 == 0 {
                // SAFETY: raise is always safe to call; sent by the process
                // itself (SI_TKILL), it must reach the application too.
                unsafe { libc::raise(libc::SIGTRAP) };
            } else {
                int3();
            }
        }
    });
    let mut on = false;
    let mut flips = 0;
    while !trapper.is_finished() || flips < 200 {
        arena.batch(!on).commit().unwrap();
        on = !on;
        flips += 1;
    }
    trapper.join().unwrap();
    assert_eq!(APP_TRAPS.load(Ordering::Relaxed), 20_000, "every application trap reached its handler once");

    // The application replaces our handler: the next commit says so and
    // writes nothing.
    set_handler(app_handler2 as *const () as usize, false);
    let want_on = !on;
    let before = peek(arena.site(0), 5);
    let err = arena.batch(want_on).commit().unwrap_err();
    assert!(matches!(err, PokeError::TrapHandlerReplaced { .. }), "{err:?}");
    assert!(err.to_string().contains("reinstall_trap_handler"), "{err}");
    assert_eq!(peek(arena.site(0), 5), before);
    // Taking it back chains to the application's new handler.
    textpoke::text::reinstall_trap_handler().unwrap();
    arena.batch(want_on).commit().unwrap();
    int3();
    assert_eq!(APP2_TRAPS.load(Ordering::Relaxed), 1);
    assert_eq!(APP_TRAPS.load(Ordering::Relaxed), 20_000);
    if want_on {
        arena.batch(false).commit().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    assert_eq!(peek(arena.site(0), 5), NOP5);
}

fn sig_dfl() {
    let arena = SiteArena::new(4, Layout::Single).unwrap();
    arena.batch(true).commit().unwrap(); // installs textpoke's handler over SIG_DFL
    arena.batch(false).commit().unwrap();
    println!("before-int3");
    int3(); // must terminate the process with SIGTRAP, as without textpoke
    println!("after-int3");
}

fn sig_ign() {
    // SAFETY: setting SIGTRAP to SIG_IGN.
    unsafe { libc::signal(libc::SIGTRAP, libc::SIG_IGN) };
    let arena = SiteArena::new(4, Layout::Single).unwrap();
    arena.batch(true).commit().unwrap();
    // SAFETY: raise is always safe; an ignored signal sent by kill/raise is
    // ignored.
    unsafe { libc::raise(libc::SIGTRAP) };
    println!("survived-raise");
    int3(); // the kernel cannot ignore a real trap: SIGTRAP terminates
    println!("after-int3");
}

fn mdwe() {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_MDWE, libc::PR_MDWE_REFUSE_EXEC_GAIN as libc::c_ulong, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_MDWE: {}", std::io::Error::last_os_error());
    let caps = textpoke::capabilities();
    assert!(caps.mdwe_refuse_exec_gain);
    assert_eq!(caps.write_method, WriteMethod::ProcMem);
    // The mprotect path really is closed here.
    let arena = SiteArena::new(100, Layout::Single).unwrap();
    let page = arena.site(0) & !4095;
    // SAFETY: the arena's own page; the call is expected to fail.
    let rc = unsafe { libc::mprotect(page as *mut _, 4096, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) };
    assert_eq!(rc, -1, "MDWE must refuse W+X");
    let st = arena.batch(true).commit().unwrap();
    assert_eq!(st.write_method, Some(WriteMethod::ProcMem));
    arena.batch(false).commit().unwrap();
    for strategy in [Strategy::Breakpoint, Strategy::StopMachine] {
        let cfg = StressConfig {
            threads: 8,
            sites: 300,
            strategy,
            max_commits: Some(300),
            duration: Duration::from_secs(120),
            options: CommitOptions::default(),
            ..StressConfig::default()
        };
        let r = stress::run(&cfg).unwrap();
        assert_eq!(r.failures, 0, "{strategy}: {:?}", r.errors);
        assert_eq!(r.commits, 300);
    }
    // Forcing mprotect fails cleanly and writes nothing.
    let err = arena
        .batch(true)
        .commit_with(CommitOptions { write: Some(WriteMethod::Mprotect), ..CommitOptions::default() })
        .unwrap_err();
    assert!(matches!(err, PokeError::Sys { .. }), "{err:?}");
    assert_eq!(peek(arena.site(0), 5), NOP5);
    assert!(wx_mappings().is_empty(), "W+X mappings: {:?}", wx_mappings());
}

fn blocked_thread() {
    let arena = SiteArena::new(8, Layout::Single).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let blocker = std::thread::spawn(move || {
        // SAFETY: blocking every signal on this thread only.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        }
        tx.send(textpoke_sys::gettid()).unwrap();
        while !s2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let tid = rx.recv().unwrap();
    for opts in [
        CommitOptions::strategy(Strategy::StopMachine),
        CommitOptions { sync: Some(textpoke::SyncMethod::Signals), ..CommitOptions::default() },
    ] {
        let err = arena.batch(true).commit_with(opts).unwrap_err();
        match &err {
            PokeError::ThreadUnresponsive { tid: t, .. } => assert_eq!(*t, tid),
            other => panic!("expected ThreadUnresponsive, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&tid.to_string()) && msg.contains("it blocks signal"), "{msg}");
        assert!(msg.contains("not applied"), "{msg}");
        for i in 0..8 {
            assert_eq!(peek(arena.site(i), 5), NOP5, "{:?}: site {i} left changed", opts.strategy);
        }
        println!("refused: {msg}");
    }
    // With membarrier the blocked thread is no obstacle.
    arena.batch(true).commit().unwrap();
    arena.batch(false).commit().unwrap();
    stop.store(true, Ordering::Relaxed);
    blocker.join().unwrap();
}
