//! Injecting many times into a busy multithreaded program that checks
//! its own system calls and registers (fixtures/target.c).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use textpoke_inject::threads::RestartKind;
use textpoke_inject::{inject, start, InjectError, InjectOptions, Injected, Interrupted, SoImage};

/// What the injected entry wrote, up to the socket's EOF.
fn hello(inj: &Injected) -> String {
    let mut s = String::new();
    inj.socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&inj.socket).read_to_string(&mut s).unwrap();
    s
}

/// Every thread's blocked-signal mask.
fn masks(pid: i32) -> BTreeMap<i32, String> {
    tasks(pid).into_iter().map(|t| (t, status_field(&format!("/proc/{pid}/task/{t}/status"), "SigBlk"))).collect()
}

fn kind(i: &Interrupted) -> &'static str {
    match i {
        Interrupted::User => "user",
        Interrupted::Restart { kind: RestartKind::Reissue, .. } => "restart",
        Interrupted::Restart { kind: RestartKind::RestartBlock, .. } => "restart_block",
        Interrupted::Completed { .. } => "completed",
        Interrupted::Rewound { .. } => "rewound",
    }
}

/// Injects into `thread` (or any), retrying briefly while the chosen
/// thread is momentarily unsuitable (in another call, or its stack holds
/// a stale pointer the lock check refuses).
fn inject_retrying(pid: i32, opts: &InjectOptions<'_>, retries: &mut u32) -> Injected {
    let mut last = None;
    for _ in 0..50 {
        match inject(pid, opts) {
            Ok(i) => return i,
            Err(e @ InjectError::NoSafeThread { .. }) => {
                *retries += 1;
                last = Some(e);
                std::thread::sleep(Duration::from_millis(3));
            }
            Err(e) => panic!("injection into {pid} ({:?}) failed: {e}", opts.thread),
        }
    }
    panic!("no safe thread after 50 tries: {}", last.unwrap());
}

#[test]
fn injects_sixty_times_into_a_busy_multithreaded_target() {
    let exe = gcc("target.c", "target", &["-pthread"]);
    let so = hello_so();
    let p = Proc::spawn(&exe, &[]);
    let pid = p.pid();
    let base_tasks = tasks(pid);
    let base_fds = fds(pid);
    let base_masks = masks(pid);
    assert_eq!(base_tasks.len(), 11, "the target runs 11 threads");

    let roles = ["spin0", "spin1", "nanosleep", "clocksleep", "read", "futex", "futex_t", "poll", "main"];
    let epolls = [p.role("epoll"), p.role("epoll_t")];
    let mut stops = Vec::new();
    let mut seen: BTreeMap<String, BTreeMap<&'static str, u32>> = BTreeMap::new();
    let mut retries = 0;
    let t0 = Instant::now();
    for i in 0..60 {
        let role = if i % 10 == 9 { "auto" } else { roles[i % roles.len()] };
        let thread = (role != "auto").then(|| p.role(role));
        let entry = if i % 2 == 0 { "hello_entry" } else { "hello_exit" };
        let mut opts = InjectOptions::new(SoImage::Path(&so), entry);
        opts.thread = thread;
        let inj = inject_retrying(pid, &opts, &mut retries);
        assert!(!epolls.contains(&inj.tid), "an epoll_wait thread was hijacked");
        if let Some(t) = thread {
            assert_eq!(inj.tid, t);
        }
        assert_eq!(hello(&inj), format!("hello {pid}"), "injection {i} into {role}");
        assert_eq!(inj.left_mapped.len(), 2);
        stops.push(inj.timing.stop);
        // Let the threads move on to other phases of their loops.
        std::thread::sleep(Duration::from_millis((i as u64 * 7) % 13));
        *seen.entry(role.to_string()).or_default().entry(kind(&inj.interrupted)).or_default() += 1;
    }
    let elapsed = t0.elapsed();

    // The epoll threads are refused by name, and left alone.
    for tid in epolls {
        let mut opts = InjectOptions::new(SoImage::Path(&so), "hello_entry");
        opts.thread = Some(tid);
        let e = inject(pid, &opts).unwrap_err();
        assert!(matches!(e, InjectError::NoSafeThread { .. }), "{e}");
        assert!(e.to_string().contains("epoll_wait"), "{e}");
    }

    // Loader threads gone, descriptors and masks as before.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tasks(pid) != base_tasks && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tasks(pid), base_tasks, "loader threads left behind");
    assert_eq!(fds(pid), base_fds, "descriptors left behind");
    assert_eq!(masks(pid), base_masks, "a signal mask changed");
    assert_running_untraced(pid);

    // Every kind of interruption was exercised: user code (spinners),
    // -ERESTARTSYS (read, futex) and -ERESTART_RESTARTBLOCK (the sleeps).
    let all: BTreeMap<&str, u32> =
        seen.values().flat_map(|m| m.iter().map(|(k, v)| (*k, *v))).fold(BTreeMap::new(), |mut acc, (k, v)| {
            *acc.entry(k).or_default() += v;
            acc
        });
    for k in ["user", "restart", "restart_block"] {
        assert!(all.get(k).copied().unwrap_or(0) > 0, "no injection interrupted a thread in state {k}: {seen:?}");
    }

    let (code, out) = p.finish();
    assert_eq!(code, 0, "the target found a problem: {out}");
    assert!(out.contains("done errors=0"), "{out}");

    stops.sort();
    let median = stops[stops.len() / 2];
    println!(
        "60 injections in {elapsed:?}; hijacked-thread stop: median {median:?}, min {:?}, max {:?}; \
         {retries} retries; per role: {seen:?}; target: {}",
        stops[0],
        stops[stops.len() - 1],
        out.trim()
    );
}

/// The injector "dies" right after the detach (the `Pending` is dropped):
/// the hijacked thread restores itself, the loader thread sees its socket
/// close and exits, nothing is loaded, and the program notices nothing.
#[test]
fn an_injector_gone_after_the_detach_leaves_the_target_unharmed() {
    let exe = gcc("target.c", "target", &["-pthread"]);
    let so = hello_so();
    let p = Proc::spawn(&exe, &[]);
    let pid = p.pid();
    let base_tasks = tasks(pid);
    let base_fds = fds(pid);
    let base_masks = masks(pid);
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();

    let roles = ["spin0", "nanosleep", "read", "futex", "futex_t", "poll", "spin1", "clocksleep"];
    let mut retries = 0;
    for (i, role) in roles.iter().cycle().take(24).enumerate() {
        let mut opts = InjectOptions::new(SoImage::Path(&so), "hello_entry");
        opts.thread = Some(p.role(role));
        let pending = loop {
            match start(pid, &opts) {
                Ok(pending) => break pending,
                Err(InjectError::NoSafeThread { .. }) if retries < 200 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
                Err(e) => panic!("start {i} on {role}: {e}"),
            }
        };
        assert_eq!(pending.tid(), p.role(role));
        drop(pending);
        std::thread::sleep(Duration::from_millis((i as u64 * 5) % 11));
    }

    let deadline = Instant::now() + Duration::from_secs(5);
    while (tasks(pid) != base_tasks || fds(pid) != base_fds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tasks(pid), base_tasks, "loader threads left behind");
    assert_eq!(fds(pid), base_fds, "descriptors left behind");
    assert_eq!(masks(pid), base_masks, "a signal mask changed");
    assert_running_untraced(pid);
    // Nothing was loaded: no mapping of the object (its memfd's name).
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("textpoke-so"), "the object was mapped:\n{maps}");
    assert!(maps_before.lines().count() < maps.lines().count(), "the loader mappings stay (documented)");

    let (code, out) = p.finish();
    assert_eq!(code, 0, "the target found a problem: {out}");
    assert!(out.contains("done errors=0"), "{out}");
}
