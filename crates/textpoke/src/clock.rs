//! The timestamp clock, below the tracer and the recorder: invariant TSC
//! (ordered or not) or `CLOCK_MONOTONIC`.
//!
//! # Choice
//!
//! [`detect`] picks the TSC when `/proc/cpuinfo` lists both `constant_tsc`
//! (the rate does not follow the core frequency) and `nonstop_tsc` (it does
//! not stop in deep C-states), and the kernel's current clocksource is
//! `tsc`. The last condition matters: at boot the kernel checks that the
//! TSCs of all CPUs are synchronised and keeps watching them; if they are
//! not, it marks the TSC unstable and moves to another clocksource. So a
//! `tsc` clocksource means one timebase for all CPUs, and timestamps of
//! different threads compare. Otherwise [`Clock::now`] reads
//! `clock_gettime(CLOCK_MONOTONIC)` (vDSO, no syscall), whose values are
//! already nanoseconds.
//!
//! On aarch64 the "TSC" is the generic timer's virtual count,
//! `CNTVCT_EL0`: constant-rate and one system counter for every core by
//! the architecture, so [`detect`] always picks it; the ordered read is
//! `isb; mrs cntvct_el0` (the ISB plays `lfence`'s part), calibrated
//! against `CLOCK_MONOTONIC` like the TSC.
//!
//! # `lfence; rdtsc`, not plain `rdtsc`
//!
//! Measured on the development VM (2.6 GHz Xeon, 2 vCPUs; the benchmark
//! prints the costs every run): `rdtsc` 7 ns, `lfence; rdtsc` 12 ns,
//! `rdtscp` 12.5 ns, `clock_gettime` 17 ns back to back.
//!
//! Plain `rdtsc` is not ordered: the out-of-order core may execute it
//! before earlier loads complete. In a ping-pong between two threads —
//! A reads the clock and publishes the value (release), B sees it
//! (acquire) and reads the clock — plain `rdtsc` gave B an *earlier*
//! time than A in 609 and 1146 of 200 000 rounds (two runs), by up to
//! 356 ticks (137 ns): timestamps would contradict the order the threads
//! synchronised in. With `lfence; rdtsc`, `rdtscp` or `mfence; rdtsc`:
//! 0 of 200 000. The TSCs themselves agree; the reversal is speculation.
//!
//! So [`Clock::now`] reads `lfence; rdtsc` (the kernel's `rdtsc_ordered`):
//! the `lfence` waits for every earlier instruction to complete, so a
//! timestamp is taken after whatever the thread did before it, including
//! the load that observed another thread's work. The other direction needs
//! nothing: a later store becomes visible only after it retires, after the
//! `rdtsc`. `rdtscp` costs the same and also orders; `lfence; rdtsc` is
//! chosen because it is what the kernel uses and works on every x86-64.
//! The test `cross_thread_order` (`crates/textpoke-record/tests/record.rs`)
//! asserts no reversal.
//!
//! Within a thread, moving to another CPU passes through the kernel, which
//! serialises, and the TSCs are synchronised (above); the recorder still
//! clamps each thread's timestamps to never go backwards (`last_ts` in the
//! ring buffer) as a last defence against skew between virtual CPUs.
//!
//! # Calibration
//!
//! TSC ticks become nanoseconds through `ns = base_ns + ((t - base_ticks) *
//! mult) >> 32`. [`Calibration::start`] pairs a TSC read with a
//! `CLOCK_MONOTONIC` read (the TSC read bracketed by two monotonic reads,
//! the pair with the narrowest bracket of several kept); [`Calibration::
//! refine`] measures the rate again over the whole time since the start,
//! so the factor gets more accurate the longer the recording runs. The
//! factor stored in `meta.json` is the last one computed.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// The clock the timestamps were read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// `lfence; rdtsc`: invariant TSC ticks, ordered with the thread's
    /// earlier instructions, so timestamps of different threads follow the
    /// order in which they synchronised (see the module docs).
    Tsc,
    /// Plain `rdtsc`: the same ticks without the `lfence`, cheaper; within
    /// a thread still in order (the recorder clamps), but across threads a
    /// timestamp may precede the one of an event it causally follows (by up
    /// to a few hundred ticks, measured).
    TscUnordered,
    /// `clock_gettime(CLOCK_MONOTONIC)` nanoseconds.
    Monotonic,
}

impl ClockSource {
    /// Whether the ticks are TSC ticks (converted with a calibration).
    pub fn is_tsc(self) -> bool {
        matches!(self, ClockSource::Tsc | ClockSource::TscUnordered)
    }
}

impl std::fmt::Display for ClockSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClockSource::Tsc => "tsc",
            ClockSource::TscUnordered => "tsc-unordered",
            ClockSource::Monotonic => "monotonic",
        })
    }
}

/// How to turn a timestamp into `CLOCK_MONOTONIC` nanoseconds:
/// `ns = base_ns + ((ticks - base_ticks) * mult) >> shift`. A trace's
/// `meta.json` carries one (the recorder crate, `textpoke-record`, holds
/// how it is written).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockInfo {
    /// Where the ticks come from.
    pub source: ClockSource,
    /// Ticks per second (informative; `mult`/`shift` are exact).
    pub ticks_per_sec: f64,
    /// Fixed-point nanoseconds per tick, scaled by `2^shift`.
    pub mult: u64,
    /// See `mult`.
    pub shift: u32,
    /// A tick count read at `base_ns`.
    pub base_ticks: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at `base_ticks`.
    pub base_ns: u64,
    /// How long the calibration measured, in nanoseconds (0 for monotonic).
    pub calibration_ns: u64,
}

impl ClockInfo {
    /// One tick is one nanosecond from 0 (a monotonic clock, or a TSC
    /// conversion before its calibration).
    pub fn identity(source: ClockSource) -> ClockInfo {
        ClockInfo { source, ticks_per_sec: 1e9, mult: 1, shift: 0, base_ticks: 0, base_ns: 0, calibration_ns: 0 }
    }

    /// `CLOCK_MONOTONIC` nanoseconds of a timestamp.
    pub fn to_ns(&self, ticks: u64) -> u64 {
        let d = ticks as i128 - self.base_ticks as i128;
        let scaled = (d * self.mult as i128) >> self.shift.min(64);
        (self.base_ns as i128 + scaled).clamp(0, u64::MAX as i128) as u64
    }

    /// Nanoseconds between two timestamps (`later - earlier`, 0 if negative).
    pub fn delta_ns(&self, earlier: u64, later: u64) -> u64 {
        let d = later.saturating_sub(earlier) as u128;
        ((d * self.mult as u128) >> self.shift.min(64)).min(u64::MAX as u128) as u64
    }
}

/// What [`Clock::now`] reads: one byte, so that generated code can test it
/// (see [`mode_byte`]). Set by the recorder's start before it publishes the
/// session (release, paired with the hot path's acquire of the session
/// word), read relaxed on the hot path.
static MODE: AtomicU8 = AtomicU8::new(MODE_MONOTONIC);
/// [`MODE`]: `CLOCK_MONOTONIC`.
pub const MODE_MONOTONIC: u8 = 0;
/// `MODE`: `lfence; rdtsc`.
pub const MODE_TSC_ORDERED: u8 = 1;
/// `MODE`: plain `rdtsc`.
pub const MODE_TSC_UNORDERED: u8 = 2;

/// Address of the mode byte ([`MODE_MONOTONIC`], [`MODE_TSC_ORDERED`] or
/// [`MODE_TSC_UNORDERED`]), for generated code that reads the clock
/// inline: it must read the TSC as the byte says, and leave a monotonic
/// clock to its slow path.
pub fn mode_byte() -> usize {
    MODE.as_ptr() as usize
}

/// The timestamp clock shared by the tracer and the recorder.
pub struct Clock;

impl Clock {
    /// The current timestamp in the chosen source's ticks. Hot path:
    /// inline, no allocation, async-signal-safe.
    #[inline(always)]
    pub fn now() -> u64 {
        // Relaxed: the byte is all a reader needs (as for the generated
        // code's plain load of it).
        match MODE.load(Ordering::Relaxed) {
            MODE_TSC_ORDERED => rdtsc_ordered(),
            MODE_TSC_UNORDERED => rdtsc(),
            _ => monotonic_ns(),
        }
    }

    /// The source [`Clock::now`] currently reads.
    pub fn source() -> ClockSource {
        match MODE.load(Ordering::Relaxed) {
            // as in `now`
            MODE_TSC_ORDERED => ClockSource::Tsc,
            MODE_TSC_UNORDERED => ClockSource::TscUnordered,
            _ => ClockSource::Monotonic,
        }
    }

    /// Selects the source. Control path; the recorder calls it at start.
    pub fn select(source: ClockSource) {
        let mode = match source {
            ClockSource::Tsc => MODE_TSC_ORDERED,
            ClockSource::TscUnordered => MODE_TSC_UNORDERED,
            ClockSource::Monotonic => MODE_MONOTONIC,
        };
        // Release pairs with no Acquire: readers (`now`, generated code)
        // need only the byte. It costs nothing on x86 (a plain store) and
        // orders what the caller did before (its calibration) for a reader
        // that would acquire.
        MODE.store(mode, Ordering::Release);
    }
}

/// Plain `rdtsc`, unordered (see the module docs: not what the recorder
/// uses). For the benchmark's comparison; on aarch64 `CNTVCT_EL0`
/// without the ISB.
#[inline(always)]
pub fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc is available on every x86-64 CPU and has no memory
        // effects (unless CR4.TSD is set, which Linux does not do for us).
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(target_arch = "aarch64")]
    {
        cntvct()
    }
}

/// aarch64's counterpart of the TSC: `CNTVCT_EL0`, the generic timer's
/// virtual count (a constant rate, `CNTFRQ_EL0`, the same in every core:
/// the system counter is one for the whole system; Linux lets EL0 read
/// it). Unordered: the read may happen before earlier instructions finish.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn cntvct() -> u64 {
    let t: u64;
    // SAFETY: reading CNTVCT_EL0 has no side effect.
    unsafe { core::arch::asm!("mrs {}, cntvct_el0", out(reg) t, options(nomem, nostack, preserves_flags)) };
    t
}

/// `isb; mrs cntvct_el0`: the ISB makes the counter read wait for the
/// instructions before it (the Arm ARM lets a counter read be performed
/// out of order, even speculatively; Linux's `__arch_counter_get_cntvct`
/// reads it so), as `lfence` does for `rdtsc`.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn cntvct_ordered() -> u64 {
    let t: u64;
    // SAFETY: `isb` and reading CNTVCT_EL0 have no effect beyond ordering.
    // Not `nomem`: the read must stay after the thread's earlier loads
    // (among them an Acquire that saw another thread's work), which the
    // compiler must not move below it either.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) t, options(nostack, preserves_flags)) };
    t
}

/// `lfence; rdtsc`: waits for earlier instructions to complete; what
/// [`Clock::now`] reads. On aarch64 `isb; mrs cntvct_el0`.
#[inline(always)]
pub fn rdtsc_ordered() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: lfence and rdtsc have no memory effects beyond ordering.
        unsafe {
            // Orders the read after the thread's earlier loads, among them
            // an Acquire that saw another thread's work (the module docs,
            // "`lfence; rdtsc`"): a timestamp never precedes what it follows.
            core::arch::x86_64::_mm_lfence();
            core::arch::x86_64::_rdtsc()
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        cntvct_ordered()
    }
}

/// `rdtscp`. For the benchmark's comparison only.
#[inline(always)]
pub fn rdtscp() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        let mut aux = 0u32;
        // SAFETY: rdtscp writes only `aux`; every x86-64 CPU Linux runs on
        // in practice has it (the bench checks the cpuinfo flag first).
        unsafe { core::arch::x86_64::__rdtscp(&mut aux) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        monotonic_ns()
    }
}

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds
/// ([`sys::time::monotonic_ns`](crate::sys::time::monotonic_ns)).
/// Async-signal-safe.
#[inline(always)]
pub fn monotonic_ns() -> u64 {
    crate::sys::time::monotonic_ns()
}

/// What [`detect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The source to use.
    pub source: ClockSource,
    /// Why: the flags and clocksource seen.
    pub reason: String,
}

/// Chooses the timestamp source for this machine (see the module docs).
pub fn detect() -> Detection {
    if cfg!(target_arch = "aarch64") {
        // The generic timer is architecturally constant-rate and shared by
        // every core; "tsc" here means CNTVCT_EL0 read after an ISB.
        return Detection { source: ClockSource::Tsc, reason: "aarch64: CNTVCT_EL0 after ISB".into() };
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let (constant, nonstop) = (has("constant_tsc"), has("nonstop_tsc"));
    let clocksource = std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let reason = format!("constant_tsc={constant} nonstop_tsc={nonstop} clocksource={clocksource}");
    let source = if constant && nonstop && clocksource == "tsc" { ClockSource::Tsc } else { ClockSource::Monotonic };
    Detection { source, reason }
}

/// The shortest calibration interval: a refine this soon after the start
/// waits (2 ms give a rate to a few parts per million, as the pairs are
/// read to within tens of nanoseconds).
pub(crate) const MIN_CALIBRATION: Duration = Duration::from_millis(2);

/// A TSC↔`CLOCK_MONOTONIC` pairing, and the conversion derived from two.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    source: ClockSource,
    base_ticks: u64,
    base_ns: u64,
    info: ClockInfo,
}

/// Reads the TSC between two monotonic reads, several times, and keeps the
/// pair with the narrowest bracket: `(ticks, ns at the bracket's middle)`.
fn paired_read() -> (u64, u64) {
    let mut best = (0, 0, u64::MAX);
    for _ in 0..16 {
        let a = monotonic_ns();
        let t = rdtsc_ordered();
        let b = monotonic_ns();
        if b - a < best.2 {
            best = (t, a + (b - a) / 2, b - a);
        }
    }
    (best.0, best.1)
}

impl Calibration {
    /// Starts a calibration for `source`: for the TSC, pairs a tick count
    /// with a monotonic time, waits `interval` and computes a first rate.
    /// For monotonic, the identity conversion.
    pub fn start(source: ClockSource, interval: Duration) -> Calibration {
        if !source.is_tsc() {
            return Calibration { source, base_ticks: 0, base_ns: 0, info: ClockInfo::identity(source) };
        }
        let (t0, n0) = paired_read();
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
        let mut c = Calibration { source, base_ticks: t0, base_ns: n0, info: ClockInfo::identity(source) };
        c.refine();
        c
    }

    /// Measures the TSC rate again over the whole time since the start (at
    /// least `MIN_CALIBRATION` (2 ms): a refine sooner than that waits for it),
    /// so the factor gets more accurate the longer the recording runs.
    pub fn refine(&mut self) {
        if !self.source.is_tsc() {
            return;
        }
        let since = monotonic_ns().saturating_sub(self.base_ns);
        let min = MIN_CALIBRATION.as_nanos() as u64;
        if since < min {
            std::thread::sleep(Duration::from_nanos(min - since));
        }
        let (t1, n1) = paired_read();
        let dt = t1.saturating_sub(self.base_ticks);
        let dn = n1.saturating_sub(self.base_ns);
        if dt == 0 || dn == 0 {
            return;
        }
        // mult = ns per tick * 2^32, rounded to nearest.
        let mult = (((dn as u128) << 32) + dt as u128 / 2) / dt as u128;
        self.info = ClockInfo {
            source: self.source,
            ticks_per_sec: dt as f64 * 1e9 / dn as f64,
            mult: mult.min(u64::MAX as u128) as u64,
            shift: 32,
            base_ticks: self.base_ticks,
            base_ns: self.base_ns,
            calibration_ns: dn,
        };
    }

    /// The conversion as stored in `meta.json`.
    pub fn info(&self) -> ClockInfo {
        self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_calibration_tracks_monotonic() {
        if detect().source != ClockSource::Tsc {
            eprintln!("no invariant TSC here; skipping");
            return;
        }
        let c = Calibration::start(ClockSource::Tsc, Duration::from_millis(20));
        let info = c.info();
        // aarch64's generic timer counts at 1 GHz from Armv8.6, tens of MHz
        // before (62.5 MHz under qemu).
        let slowest = if cfg!(target_arch = "aarch64") { 1e6 } else { 1e8 };
        assert!(info.ticks_per_sec > slowest && info.ticks_per_sec < 1e11, "{info:?}");
        // Converting a fresh TSC read lands within 100 µs of a fresh
        // monotonic read.
        let (t, n) = paired_read();
        let conv = info.to_ns(t);
        assert!(conv.abs_diff(n) < 100_000, "converted {conv} vs monotonic {n}");
    }

    #[test]
    fn monotonic_is_identity() {
        let c = Calibration::start(ClockSource::Monotonic, Duration::ZERO);
        assert_eq!(c.info().to_ns(123_456), 123_456);
    }
}
