//! Tracing changes are invisible to threads blocked in system calls
//! (DESIGN.md rule 9, issue #10 defect 0): 1,000 op changes, each
//! followed by grace periods, while threads wait in `nanosleep`,
//! `clock_nanosleep`, `epoll_wait`, `poll`, `select`, a socket receive and
//! a futex wait with timeouts, and one blocks in `read`, and others run
//! traced code. A signal would make any of the timed waits fail with EINTR
//! (or return early) whatever `SA_RESTART` says. Each waiter calls a traced
//! function between waits, so it is a registered thread of the tracer.

mod common;

use common::{compile_so, glob_filter, Lib};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use textpoke::trace::{Entry, Filter, TraceOp, Tracer};

static SERIAL: Mutex<()> = Mutex::new(());

const SRC: &str = r#"
#define F __attribute__((noipa))
F long ne_leaf(long x) { return x + 1; }
F long ne_mid(long x) { return ne_leaf(x) * 2; }
F long ne_loop(long n) { long s = 0; for (long i = 0; i < n; i++) s += ne_mid(i); return s; }
"#;

struct Count(AtomicU64);

impl TraceOp for Count {
    fn entry(&self, _e: &Entry<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn filter(names: &[&str]) -> Filter {
    glob_filter(names.iter().map(|s| s.to_string()), Vec::<String>::new()).unwrap()
}

const WAIT: Duration = Duration::from_millis(20);

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// One timed wait of `kind`; `Err` says how it went wrong.
fn wait_once(kind: &str, fds: (i32, i32, i32)) -> Result<(), String> {
    let (epfd, pipe_r, sock) = fds;
    let t0 = Instant::now();
    let ms = WAIT.as_millis() as i32;
    // SAFETY: plain system calls (all arms) on descriptors this test owns,
    // with valid pointers to locals.
    let (r, e) = unsafe {
        let r = match kind {
            "nanosleep" => libc::nanosleep(&timespec(WAIT), std::ptr::null_mut()) as i64,
            "clock_nanosleep" => {
                let r = libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &timespec(WAIT), std::ptr::null_mut());
                if r != 0 {
                    return Err(format!("clock_nanosleep returned {r}"));
                }
                0
            }
            "epoll_wait" => {
                let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 1];
                libc::epoll_wait(epfd, ev.as_mut_ptr(), 1, ms) as i64
            }
            "poll" => {
                let mut p = libc::pollfd { fd: pipe_r, events: libc::POLLIN, revents: 0 };
                libc::poll(&mut p, 1, ms) as i64
            }
            "select" => {
                let mut tv = libc::timeval { tv_sec: 0, tv_usec: WAIT.as_micros() as _ };
                libc::select(0, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), &mut tv) as i64
            }
            "recv" => {
                let mut b = [0u8; 1];
                let r = libc::recv(sock, b.as_mut_ptr().cast(), 1, 0) as i64;
                if r == -1 && errno() == libc::EAGAIN {
                    0 // the receive timeout: what should happen
                } else {
                    r
                }
            }
            "futex" => {
                let word = 0u32;
                let r = libc::syscall(
                    libc::SYS_futex,
                    &word,
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    0,
                    &timespec(WAIT),
                    0,
                    0,
                );
                if r == -1 && errno() == libc::ETIMEDOUT {
                    0
                } else {
                    r
                }
            }
            _ => unreachable!(),
        };
        (r, errno())
    };
    if r != 0 {
        return Err(format!("{kind} returned {r} (errno {e}: {})", std::io::Error::from_raw_os_error(e)));
    }
    // SO_RCVTIMEO counts jiffies (schedule_timeout), which may end up to
    // one tick (10 ms at HZ=100) short of the time asked (seen: 19.997 of
    // 20 ms, EAGAIN); the other waits are hrtimers. A signal would have
    // made it EINTR, checked above.
    let slack = if kind == "recv" { Duration::from_millis(10) } else { Duration::ZERO };
    if t0.elapsed() + slack < WAIT {
        return Err(format!("{kind} returned after {:?} of {WAIT:?}", t0.elapsed()));
    }
    Ok(())
}

/// Runs the scenario; returns the waiters' failures.
fn changes_under_blocked_calls(changes: usize) -> Vec<String> {
    let lib = Arc::new(Lib::open(&compile_so("noeintr", SRC, &["-fpatchable-function-entry=5", "-O1"])));
    let t = Tracer::global();
    t.refresh().unwrap();
    t.set_grace_period_for_tests(true);
    // SAFETY: long (long).
    let looper: extern "C" fn(i64) -> i64 = unsafe { std::mem::transmute(lib.sym("ne_loop")) };
    // gcc's pads become one NOP the first time a site is traced, with every
    // thread parked (stop-machine, by design: DESIGN.md rule 1). Done
    // before anyone waits; from then on only the breakpoint protocol and
    // grace periods run.
    let op = Arc::new(Count(AtomicU64::new(0)));
    let h = t.register(op.clone(), filter(&["ne_*"])).unwrap();
    t.unregister(h).unwrap();
    t.reclaim(Duration::from_secs(5)).unwrap();

    // SAFETY: creating descriptors this test owns.
    let (epfd, pipe, sock) = unsafe {
        let epfd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        let mut pipe = [0; 2];
        assert_eq!(libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC), 0);
        let mut sv = [0; 2];
        assert_eq!(libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()), 0);
        let tv = libc::timeval { tv_sec: 0, tv_usec: WAIT.as_micros() as _ };
        let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        assert_eq!(
            libc::setsockopt(sv[0], libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), len),
            0
        );
        (epfd, pipe, sv)
    };
    let (blocker_r, blocker_w) = {
        let mut p = [0; 2];
        // SAFETY: a fresh pipe.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        (p[0], p[1])
    };
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let waits = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for kind in ["nanosleep", "clock_nanosleep", "epoll_wait", "poll", "select", "recv", "futex"] {
        let (stop, failures, waits) = (stop.clone(), failures.clone(), waits.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(looper(3), 2 * (1 + 2 + 3), "a traced call between waits");
                match wait_once(kind, (epfd, pipe[0], sock[0])) {
                    Ok(()) => waits.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        0
                    }
                };
            }
        }));
    }
    // Blocked in read until the end: must get the byte, not -1.
    let (failures2, reader_ready) = (failures.clone(), Arc::new(AtomicBool::new(false)));
    let ready2 = reader_ready.clone();
    threads.push(std::thread::spawn(move || {
        assert_eq!(looper(3), 12);
        ready2.store(true, Ordering::SeqCst);
        let mut b = [0u8; 1];
        // SAFETY: reading into a local buffer from our pipe.
        let r = unsafe { libc::read(blocker_r, b.as_mut_ptr().cast(), 1) };
        if r != 1 || b[0] != b'!' {
            failures2.lock().unwrap().push(format!("read returned {r} (errno {})", errno()));
        }
    }));
    for _ in 0..2 {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(looper(50), 2 * 1275);
            }
        }));
    }
    while !reader_ready.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    std::thread::sleep(WAIT * 2);
    // 1,000 op changes: register, re-filter twice, unregister, again; every
    // one retires trampolines or an op for the background reclaimer, and
    // every 50 a grace period is also waited for here.
    let start = Instant::now();
    let mut h = None;
    for k in 0..changes {
        match k % 4 {
            0 => h = Some(t.register(op.clone(), filter(&["ne_*"])).unwrap()),
            1 => t.set_filter(h.as_ref().unwrap(), filter(&["ne_leaf"])).unwrap(),
            2 => t.set_filter(h.as_ref().unwrap(), filter(&["ne_mid", "ne_loop"])).unwrap(),
            _ => t.unregister(h.take().unwrap()).unwrap(),
        }
        if k % 50 == 49 {
            t.reclaim(Duration::from_secs(5)).unwrap();
        }
    }
    if let Some(h) = h {
        t.unregister(h).unwrap();
    }
    t.reclaim(Duration::from_secs(5)).unwrap();
    let took = start.elapsed();
    let left = t.retired();
    stop.store(true, Ordering::Relaxed);
    // SAFETY: writing one byte to our pipe.
    assert_eq!(unsafe { libc::write(blocker_w, b"!".as_ptr().cast(), 1) }, 1);
    for th in threads {
        th.join().unwrap();
    }
    println!(
        "{changes} op changes in {took:?}; {} timed waits, {} traced calls",
        waits.load(Ordering::Relaxed),
        op.0.load(Ordering::Relaxed)
    );
    assert!(waits.load(Ordering::Relaxed) > 7, "the waiters waited");
    assert_eq!(left, 0, "every grace period ended: everything retired was freed");
    assert!(op.0.load(Ordering::Relaxed) > 0, "the functions were traced");
    // SAFETY: closing our descriptors.
    unsafe {
        for fd in [epfd, pipe[0], pipe[1], sock[0], sock[1], blocker_r, blocker_w] {
            libc::close(fd);
        }
    }
    let f = failures.lock().unwrap().clone();
    f
}

#[test]
fn blocked_system_calls_never_fail_or_return_early() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let failures = changes_under_blocked_calls(1000);
    assert!(failures.is_empty(), "{} waits disturbed, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
}

/// The same where the kernel has no `membarrier(PRIVATE_EXPEDITED)`:
/// threads blocked in the kernel are quiescent by what
/// `/proc/self/task/TID/status` says, and only threads running user code
/// (the busy ones here) may be signalled.
#[test]
fn without_membarrier_blocked_system_calls_are_not_signalled() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Tracer::global().set_grace_fallback_for_tests(true);
    let failures = changes_under_blocked_calls(400);
    Tracer::global().set_grace_fallback_for_tests(false);
    // Without membarrier the state is read from /proc and then a thread
    // seen running user code is signalled: one that enters a wait in
    // between is interrupted (unavoidable in this fallback; seen once in
    // ~1,500 waits on a loaded machine). Blocked threads are never
    // signalled, so disturbances stay rare: at most a few, not a pattern.
    assert!(failures.len() <= 3, "{} waits disturbed, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
}
