//! Time from the kernel: the monotonic clock and a single sleep.

use std::time::Duration;

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds (the vDSO: no system
/// call). Async-signal-safe, allocation-free.
#[inline(always)]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One `nanosleep` of `d`: returns early if a signal handler runs on this
/// thread meanwhile (unlike `std::thread::sleep`, which sleeps on).
/// Async-signal-safe.
pub fn sleep_once(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `ts` is valid; the remaining-time pointer may be null.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_sleeps() {
        let t0 = monotonic_ns();
        sleep_once(Duration::from_millis(2));
        let t1 = monotonic_ns();
        assert!(t1 >= t0 + 2_000_000, "{t0} then {t1}");
    }
}
