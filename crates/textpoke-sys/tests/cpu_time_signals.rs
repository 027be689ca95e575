//! A CPU-time signal goes to the thread that used the time, unless that
//! thread blocks it: then the kernel gives it to another thread, one asleep
//! in `nanosleep` included, whose sleep fails with `EINTR` (a handler ends
//! it whatever `SA_RESTART` says). A program built with `-pg` has such a
//! timer (`ITIMER_PROF`, glibc's `profil`), so a textpoke thread that
//! blocks `SIGPROF` while it computes turns the program's profiling ticks
//! into `EINTR`s of its sleeping threads (DESIGN.md rule 9): a thread with
//! [`signals::service_thread_mask`] must take them itself.
//!
//! No test harness (`harness = false`): the main thread must block
//! `SIGPROF` too, so that the sleeper is the only other thread the kernel
//! can choose, and the outcome does not depend on the harness's threads.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Duration;
use textpoke_sys::signals;

/// The computing thread's id, for the handler.
static BUSY_TID: AtomicI32 = AtomicI32::new(0);
/// Profiling ticks taken by the computing thread, and by any other.
static ON_BUSY: AtomicU64 = AtomicU64::new(0);
static ELSEWHERE: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_prof(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let counter = if textpoke_sys::gettid() == BUSY_TID.load(Ordering::Relaxed) { &ON_BUSY } else { &ELSEWHERE };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn set_profiling_timer(interval: Duration) {
    let tv = libc::timeval { tv_sec: 0, tv_usec: interval.as_micros() as libc::suseconds_t };
    let it = libc::itimerval { it_interval: tv, it_value: tv };
    // SAFETY: a valid itimerval; the old value is not wanted.
    assert_eq!(unsafe { libc::setitimer(libc::ITIMER_PROF, &it, std::ptr::null_mut()) }, 0);
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One round: a thread with `mask` computes for 300 ms of CPU time under
/// a 1 ms profiling timer while another sleeps in `nanosleep`; the
/// sleeper's `EINTR`s, and the ticks the computing thread took.
fn round(mask: libc::sigset_t) -> (u64, u64) {
    ON_BUSY.store(0, Ordering::Relaxed);
    ELSEWHERE.store(0, Ordering::Relaxed);
    let stop = AtomicBool::new(false);
    let eintr = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            signals::set_mask(libc::SIG_UNBLOCK, &signals::set_of(&[libc::SIGPROF]));
            while !stop.load(Ordering::Relaxed) {
                let ts = libc::timespec { tv_sec: 0, tv_nsec: 20_000_000 };
                // SAFETY: a valid timespec; no remainder wanted.
                if unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) } != 0 {
                    eintr.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        s.spawn(|| {
            signals::set_mask(libc::SIG_SETMASK, &mask);
            BUSY_TID.store(textpoke_sys::gettid(), Ordering::Relaxed);
            set_profiling_timer(Duration::from_millis(1));
            let start = thread_cpu_time();
            let mut x = 0u64;
            while thread_cpu_time() - start < Duration::from_millis(300) {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            }
            set_profiling_timer(Duration::ZERO);
            stop.store(true, Ordering::Relaxed);
        });
    });
    (eintr.load(Ordering::Relaxed), ON_BUSY.load(Ordering::Relaxed))
}

fn main() {
    signals::install(libc::SIGPROF, on_prof, libc::SA_RESTART).expect("SIGPROF handler");
    // The main thread (and so the threads it starts) blocks SIGPROF: the
    // sleeper unblocks it, the computing thread sets its round's mask.
    signals::set_mask(libc::SIG_BLOCK, &signals::set_of(&[libc::SIGPROF]));
    let rendezvous = signals::realtime_max();

    // The mechanism: a computing thread that blocks every asynchronous
    // signal sends the profiling ticks to the sleeper.
    let mut blocking = signals::service_thread_mask(rendezvous);
    for s in signals::CPU_TIME {
        // SAFETY: a valid set; sigaddset writes only it.
        unsafe { libc::sigaddset(&mut blocking, s) };
    }
    let (eintr, on_busy) = round(blocking);
    assert_eq!(on_busy, 0, "the computing thread blocked SIGPROF");
    assert!(eintr > 0, "the redirected ticks interrupt the sleeper (kernel's complete_signal)");

    // The service threads' mask: the computing thread takes its ticks.
    let (eintr, on_busy) = round(signals::service_thread_mask(rendezvous));
    assert!(on_busy > 0, "the computing thread takes the ticks of the time it used");
    assert_eq!(eintr, 0, "a service thread's CPU time interrupted a sleeping thread");
    println!("cpu_time_signals: ok");
}
