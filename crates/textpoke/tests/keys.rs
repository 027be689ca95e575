//! Static keys in one process: layout, flips, reference counts, bad use,
//! listing, and a stress of 100,000 flips while 8 threads (and their timer
//! signal handlers) run through the branches.
//!
//! Each test uses keys of its own: the tests run in parallel threads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use textpoke::arch::SITE_NOP as NOP5;
use textpoke::keys::{self, KeyError, StaticKey, Update};
use textpoke::{Batch, PokeError};

/// Sync rounds of one live batch: the breakpoint protocol's three on
/// x86-64, one on aarch64 (atomic B/NOP swaps, then one sync).
const BATCH_SYNC_ROUNDS: u32 = if cfg!(target_arch = "aarch64") { 1 } else { 3 };

/// Defines `#[inline(never)]` functions returning each branch kind on `$key`.
macro_rules! branches {
    ($key:ident: unlikely $($u:ident)*; likely $($l:ident)*) => {
        $(#[inline(never)] fn $u() -> bool { textpoke::static_branch_unlikely!($key) })*
        $(#[inline(never)] fn $l() -> bool { textpoke::static_branch_likely!($key) })*
    };
}

fn all(fns: &[fn() -> bool]) -> Vec<bool> {
    fns.iter().map(|f| f()).collect()
}

/// Checks that every site of `key` holds what the key's state calls for.
fn assert_sites_match(key: &StaticKey) {
    for s in keys::sites_of(key).unwrap() {
        assert_eq!(s.bytes, s.expected, "{} site {:#x} (likely: {})", key.name(), s.addr, s.likely);
    }
}

// ---------------------------------------------------------------- layout

textpoke::define_static_key_false!(LAYOUT_F);
textpoke::define_static_key_true!(LAYOUT_T);
branches!(LAYOUT_F: unlikely layout_fu; likely layout_fl);
branches!(LAYOUT_T: unlikely layout_tu; likely layout_tl);

#[test]
fn compiled_in_layout_follows_the_default() {
    // Nothing was patched: false keys read false, true keys true.
    assert_eq!(all(&[layout_fu, layout_fl, layout_tu, layout_tl]), [false, false, true, true]);
    let form = |key: &StaticKey| -> Vec<(bool, bool)> {
        keys::sites_of(key).unwrap().iter().map(|s| (s.likely, s.bytes == NOP5)).collect()
    };
    // unlikely on false: NOP; likely on false: JMP (around the body).
    let mut f = form(&LAYOUT_F);
    f.sort();
    assert_eq!(f, [(false, true), (true, false)]);
    // unlikely on true: JMP (to the body); likely on true: NOP.
    let mut t = form(&LAYOUT_T);
    t.sort();
    assert_eq!(t, [(false, false), (true, true)]);
    for s in keys::sites_of(&LAYOUT_F).unwrap().iter().chain(&keys::sites_of(&LAYOUT_T).unwrap()) {
        assert_eq!(s.bytes, s.expected);
        #[cfg(target_arch = "x86_64")]
        if s.bytes != NOP5 {
            assert_eq!(s.bytes[0], 0xe9, "a jmp rel32");
            let rel = i32::from_le_bytes(s.bytes[1..].try_into().unwrap());
            assert_eq!((s.addr + 5).wrapping_add(rel as isize as usize), s.target);
        }
    }
    assert_eq!(LAYOUT_F.count(), 0);
    assert_eq!(LAYOUT_T.count(), 1);
    assert!(LAYOUT_T.default_enabled() && !LAYOUT_F.default_enabled());
}

// ---------------------------------------------------------------- flips

textpoke::define_static_key_false!(FLIP_F);
textpoke::define_static_key_true!(FLIP_T);
branches!(FLIP_F: unlikely flip_fu0 flip_fu1 flip_fu2; likely flip_fl0 flip_fl1);
branches!(FLIP_T: unlikely flip_tu0; likely flip_tl0 flip_tl1);

#[test]
fn enable_and_disable_patch_every_site_in_one_batch() {
    let f = [flip_fu0, flip_fu1, flip_fu2, flip_fl0, flip_fl1];
    let t = [flip_tu0, flip_tl0, flip_tl1];
    assert!(all(&f).iter().all(|b| !b) && all(&t).iter().all(|b| *b));

    let st = Update::new().enable(&FLIP_F).commit().unwrap();
    assert_eq!((st.keys_changed, st.sites_patched), (1, 5));
    let c = st.commit.expect("a batch");
    assert_eq!(c.sync_rounds, BATCH_SYNC_ROUNDS, "one batch for all five sites");
    assert!(FLIP_F.is_enabled() && FLIP_F.count() == 1);
    assert!(all(&f).iter().all(|b| *b));
    assert_sites_match(&FLIP_F);

    FLIP_T.disable().unwrap();
    assert!(all(&t).iter().all(|b| !b));
    assert_sites_match(&FLIP_T);

    // Already in the wanted state: no batch at all.
    let st = Update::new().enable(&FLIP_F).disable(&FLIP_T).commit().unwrap();
    assert_eq!((st.keys_changed, st.sites_patched), (0, 0));
    assert!(st.commit.is_none());

    FLIP_F.disable().unwrap();
    FLIP_T.enable().unwrap();
    assert!(all(&f).iter().all(|b| !b) && all(&t).iter().all(|b| *b));
    assert_sites_match(&FLIP_F);
    assert_sites_match(&FLIP_T);
}

textpoke::define_static_key_false!(MULTI_A);
textpoke::define_static_key_false!(MULTI_B);
textpoke::define_static_key_true!(MULTI_C);
branches!(MULTI_A: unlikely multi_a0 multi_a1; likely);
branches!(MULTI_B: unlikely multi_b0; likely multi_b1);
branches!(MULTI_C: unlikely multi_c0; likely multi_c1 multi_c2);

#[test]
fn many_keys_flip_in_one_batch_by_reference_or_name() {
    let st = Update::new().enable(&MULTI_A).enable(&MULTI_B).disable(&MULTI_C).commit().unwrap();
    assert_eq!((st.keys_changed, st.sites_patched), (3, 7));
    assert_eq!(st.commit.unwrap().sync_rounds, BATCH_SYNC_ROUNDS, "three keys, seven sites, one batch");
    assert_eq!(all(&[multi_a0, multi_a1, multi_b0, multi_b1]), [true; 4]);
    assert_eq!(all(&[multi_c0, multi_c1, multi_c2]), [false; 3]);

    let st = Update::new()
        .disable_named(MULTI_A.name())
        .disable_named(MULTI_B.name())
        .enable_named(MULTI_C.name())
        .commit()
        .unwrap();
    assert_eq!((st.keys_changed, st.sites_patched), (3, 7));
    assert_eq!(all(&[multi_a0, multi_a1, multi_b0, multi_b1]), [false; 4]);
    assert_eq!(all(&[multi_c0, multi_c1, multi_c2]), [true; 3]);

    let e = Update::new().enable_named("no::such::KEY").commit().unwrap_err();
    assert!(matches!(e, KeyError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("no::such::KEY"), "{e}");
    let e = Update::new().enable(&MULTI_A).enable_named(MULTI_A.name()).commit().unwrap_err();
    assert!(matches!(e, KeyError::Duplicate { .. }), "{e}");
    assert!(!MULTI_A.is_enabled());
}

textpoke::define_static_key_false!(REFUSE_A);
textpoke::define_static_key_false!(REFUSE_B);
branches!(REFUSE_A: unlikely refuse_a; likely);
branches!(REFUSE_B: unlikely refuse_b; likely);

#[test]
fn an_update_refused_for_one_key_changes_no_key() {
    REFUSE_B.inc().unwrap();
    REFUSE_B.inc().unwrap();
    let e = Update::new().enable(&REFUSE_A).disable(&REFUSE_B).commit().unwrap_err();
    assert!(matches!(e, KeyError::Shared { count: 2, .. }), "{e}");
    assert!(e.to_string().contains(REFUSE_B.name()), "{e}");
    assert!(!REFUSE_A.is_enabled() && !refuse_a(), "REFUSE_A was rolled back");
    assert_eq!(REFUSE_B.count(), 2);
    assert!(refuse_b());
    assert_sites_match(&REFUSE_A);
    REFUSE_B.dec().unwrap();
    REFUSE_B.dec().unwrap();
    assert!(!refuse_b());
}

// ---------------------------------------------------------------- counts

textpoke::define_static_key_false!(COUNTED);
branches!(COUNTED: unlikely counted_u0 counted_u1; likely counted_l0);

#[test]
fn inc_and_dec_from_many_threads_balance() {
    // Each thread holds a reference while it checks the branches: while
    // any reference is held, every site must be taken. No update may be lost.
    let threads = 8;
    let rounds = 400;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for r in 0..rounds {
                    let depth = 1 + (t + r) % 3;
                    for _ in 0..depth {
                        COUNTED.inc().unwrap();
                    }
                    assert!(COUNTED.count() >= depth as i32);
                    assert_eq!(all(&[counted_u0, counted_u1, counted_l0]), [true; 3], "a reference is held");
                    for _ in 0..depth {
                        COUNTED.dec().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(COUNTED.count(), 0, "balanced");
    assert!(!COUNTED.is_enabled());
    assert_eq!(all(&[counted_u0, counted_u1, counted_l0]), [false; 3]);
    assert_sites_match(&COUNTED);
}

textpoke::define_static_key_true!(COUNTED_T);
branches!(COUNTED_T: unlikely counted_t; likely);

#[test]
fn a_true_key_starts_with_one_reference() {
    COUNTED_T.inc().unwrap();
    assert_eq!(COUNTED_T.count(), 2);
    COUNTED_T.dec().unwrap();
    assert!(counted_t());
    COUNTED_T.dec().unwrap();
    assert!(!counted_t() && COUNTED_T.count() == 0);
    COUNTED_T.inc().unwrap();
    assert!(counted_t());
}

// ---------------------------------------------------------------- bad use

textpoke::define_static_key_false!(UNDERFLOW);
branches!(UNDERFLOW: unlikely underflow_u; likely underflow_l);

#[test]
fn dec_below_zero_is_refused_naming_the_key_and_patches_nothing() {
    let before = keys::sites_of(&UNDERFLOW).unwrap();
    let e = UNDERFLOW.dec().unwrap_err();
    assert!(matches!(&e, KeyError::Underflow { key } if key == UNDERFLOW.name()), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("keys::UNDERFLOW") && msg.contains("dec()") && msg.contains("nothing was patched"), "{msg}");
    assert!(e.is_misuse());
    assert_eq!(keys::sites_of(&UNDERFLOW).unwrap(), before);
    assert_eq!((UNDERFLOW.count(), underflow_u(), underflow_l()), (0, false, false));
    // The key still works.
    UNDERFLOW.inc().unwrap();
    assert!(underflow_u() && underflow_l());
    UNDERFLOW.dec().unwrap();
    assert!(UNDERFLOW.dec().is_err());
}

textpoke::define_static_key_false!(SHARED);
branches!(SHARED: unlikely shared_u; likely);

#[test]
fn disable_while_references_are_held_is_refused() {
    SHARED.inc().unwrap();
    SHARED.inc().unwrap();
    let e = SHARED.disable().unwrap_err();
    assert!(matches!(e, KeyError::Shared { count: 2, .. }), "{e}");
    assert!(e.to_string().contains("keys::SHARED"), "{e}");
    assert!(shared_u());
    SHARED.dec().unwrap();
    SHARED.disable().unwrap(); // count 1: like enable()'s reference
    assert!(!shared_u() && SHARED.count() == 0);
}

textpoke::define_static_key_false!(CORRUPT);
branches!(CORRUPT: unlikely corrupt_u0 corrupt_u1; likely corrupt_l0);

#[test]
fn a_site_whose_bytes_are_wrong_refuses_the_flip_naming_the_key() {
    let sites = keys::sites_of(&CORRUPT).unwrap();
    assert_eq!(sites.len(), 3);
    // Overwrite one site with another instruction that also falls through:
    // `jmp .+5` (e9 00 00 00 00). The code is no longer what the records say.
    let victim = sites.iter().find(|s| !s.likely).unwrap().addr;
    #[cfg(target_arch = "x86_64")]
    let odd = [0xe9, 0, 0, 0, 0];
    // aarch64: `b .+4`.
    #[cfg(target_arch = "aarch64")]
    let odd = 0x1400_0001u32.to_le_bytes();
    Batch::from_iter([textpoke::Poke::new(victim, NOP5, odd)]).commit().unwrap();

    let e = CORRUPT.enable().unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("keys::CORRUPT"), "names the key: {msg}");
    assert!(msg.contains(&format!("{victim:#x}")), "names the site: {msg}");
    match &e {
        KeyError::Patch { sites: 3, source, .. } => match &**source {
            PokeError::Mismatch { expected, found, .. } => {
                assert_eq!(expected.as_slice(), NOP5);
                assert_eq!(found.as_slice(), odd);
            }
            other => panic!("expected a mismatch, got {other:?}"),
        },
        other => panic!("expected a patch error, got {other:?}"),
    }
    assert!(!CORRUPT.is_enabled() && CORRUPT.count() == 0, "the count was restored");
    // Nothing was patched: the other sites are as compiled.
    let now = keys::sites_of(&CORRUPT).unwrap();
    for (a, b) in sites.iter().zip(&now) {
        if a.addr == victim {
            assert_eq!(b.bytes, odd);
        } else {
            assert_eq!(a.bytes, b.bytes, "site {:#x} untouched", a.addr);
        }
    }
    assert_eq!(all(&[corrupt_u0, corrupt_u1, corrupt_l0]), [false; 3]);

    // Repaired, the key flips again.
    Batch::from_iter([textpoke::Poke::new(victim, odd, NOP5)]).commit().unwrap();
    CORRUPT.enable().unwrap();
    assert_eq!(all(&[corrupt_u0, corrupt_u1, corrupt_l0]), [true; 3]);
    CORRUPT.disable().unwrap();
}

// ---------------------------------------------------------------- listing

textpoke::define_static_key_false!(LISTED_NO_SITES);
textpoke::define_static_key_true!(LISTED);
branches!(LISTED: unlikely listed_u; likely listed_l0 listed_l1);

#[test]
fn listing_shows_every_key_with_state_count_and_sites() {
    let all_keys = keys::list().unwrap();
    let get = |name: &str| all_keys.iter().find(|k| k.name == name).cloned();
    let k = get("keys::LISTED").expect("LISTED listed");
    assert!(k.enabled && k.count == 1 && k.default_enabled && k.sites == 3 && k.problem.is_none(), "{k:?}");
    assert_eq!(k.object, std::fs::read_link("/proc/self/exe").unwrap());
    let n = get("keys::LISTED_NO_SITES").expect("a key without sites is listed too");
    assert!(!n.enabled && n.count == 0 && n.sites == 0, "{n:?}");
    assert_eq!(LISTED_NO_SITES.name(), "keys::LISTED_NO_SITES");
    // Every key of this test binary, whatever the other tests do meanwhile.
    for name in ["keys::FLIP_F", "keys::COUNTED", "keys::STRESS_A", "keys::STRESS_D", "keys::CONC"] {
        assert!(get(name).is_some(), "{name} listed");
    }
    listed_u();
    listed_l0();
    listed_l1();

    LISTED.inc().unwrap();
    let k = keys::find("keys::LISTED").unwrap();
    assert_eq!((k.count, k.enabled), (2, true));
    LISTED.dec().unwrap();
    assert!(matches!(keys::find("keys::NOPE"), Err(KeyError::NotFound { .. })));
}

// ---------------------------------------------------------------- concurrency

textpoke::define_static_key_false!(CONC);
branches!(CONC: unlikely conc_u0 conc_u1; likely conc_l0);

#[test]
fn concurrent_flips_end_in_the_state_the_last_one_asked_for() {
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut x = t as u64 * 0x9e37_79b9 + 1;
                for _ in 0..300 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    CONC.set(x & 1 == 1).unwrap();
                    // Whatever others do, code and state agree whenever we look
                    // while nobody flips: checked below; here, no error.
                }
                barrier.wait(); // all random flips done
                barrier.wait(); // the last flip done
            })
        })
        .collect();
    barrier.wait();
    barrier.wait();
    // Nobody flips now: the sites agree with the state.
    assert_sites_match(&CONC);
    let on = CONC.is_enabled();
    assert_eq!(all(&[conc_u0, conc_u1, conc_l0]), [on; 3]);
    // The last flip, from this thread after all the others: it decides.
    CONC.set(!on).unwrap();
    assert_eq!(CONC.is_enabled(), !on);
    assert_eq!(all(&[conc_u0, conc_u1, conc_l0]), [!on; 3]);
    barrier.wait();
    for h in handles {
        h.join().unwrap();
    }
    assert_sites_match(&CONC);
    CONC.disable().unwrap();
}

// ---------------------------------------------------------------- stress

textpoke::define_static_key_false!(STRESS_A);
textpoke::define_static_key_true!(STRESS_B);
textpoke::define_static_key_false!(STRESS_C);
textpoke::define_static_key_true!(STRESS_D);
branches!(STRESS_A: unlikely sa_u0 sa_u1 sa_u2; likely sa_l0 sa_l1);
branches!(STRESS_B: unlikely sb_u0 sb_u1; likely sb_l0 sb_l1 sb_l2);
branches!(STRESS_C: unlikely sc_u0 sc_u1 sc_u2; likely sc_l0 sc_l1);
branches!(STRESS_D: unlikely sd_u0 sd_u1; likely sd_l0 sd_l1 sd_l2);

const STRESS_KEYS: usize = 4;
const FNS_PER_KEY: usize = 5;
static STRESS_FNS: [[fn() -> bool; FNS_PER_KEY]; STRESS_KEYS] = [
    [sa_u0, sa_u1, sa_u2, sa_l0, sa_l1],
    [sb_u0, sb_u1, sb_l0, sb_l1, sb_l2],
    [sc_u0, sc_u1, sc_u2, sc_l0, sc_l1],
    [sd_u0, sd_u1, sd_l0, sd_l1, sd_l2],
];

fn stress_key(k: usize) -> &'static StaticKey {
    [&*STRESS_A, &*STRESS_B, &*STRESS_C, &*STRESS_D][k]
}

/// Phase word of a key: `epoch << 2 | state`. The flipper stores FLIPPING
/// (Release) before a flip starts and the new steady state after it
/// returned, so every phase change bumps the epoch.
const OFF: u64 = 0;
const ON: u64 = 1;
const FLIPPING: u64 = 2;

static PHASE: [AtomicU64; STRESS_KEYS] = [const { AtomicU64::new(0) }; STRESS_KEYS];
/// Calls checked in a steady phase, taken during a flip, and violations.
static STEADY_ON: AtomicU64 = AtomicU64::new(0);
static STEADY_OFF: AtomicU64 = AtomicU64::new(0);
static TAKEN_IN_FLIP: AtomicU64 = AtomicU64::new(0);
static HANDLER_CALLS: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// First violation: key << 40 | fn << 32 | phase(low 30 bits) << 1 | taken.
static FIRST_VIOLATION: AtomicU64 = AtomicU64::new(u64::MAX);
static STRESS_ON: AtomicBool = AtomicBool::new(false);

/// One checked call: the branch may be taken only if the key was enabled
/// at some moment between the two reads of its phase (that is, unless both
/// reads saw the same steady "off" phase), and must be taken if both saw the
/// same steady "on" phase. Async-signal-safe: atomics only.
#[inline(always)]
fn checked_call(k: usize, f: usize) {
    let p1 = PHASE[k].load(Ordering::Acquire);
    let taken = STRESS_FNS[k][f]();
    let p2 = PHASE[k].load(Ordering::Acquire);
    let steady = p1 == p2 && p1 & 3 != FLIPPING;
    let bad = match (steady, p1 & 3, taken) {
        (true, ON, true) => {
            STEADY_ON.fetch_add(1, Ordering::Relaxed);
            false
        }
        (true, OFF, false) => {
            STEADY_OFF.fetch_add(1, Ordering::Relaxed);
            false
        }
        (true, _, _) => true,
        (false, _, true) => {
            TAKEN_IN_FLIP.fetch_add(1, Ordering::Relaxed);
            false
        }
        (false, _, false) => false,
    };
    if bad {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        let code = (k as u64) << 40 | (f as u64) << 32 | (p1 & 0x3fff_ffff) << 1 | taken as u64;
        let _ = FIRST_VIOLATION.compare_exchange(u64::MAX, code, Ordering::Relaxed, Ordering::Relaxed);
    }
}

extern "C" fn on_timer(_sig: i32) {
    if !STRESS_ON.load(Ordering::Relaxed) {
        return;
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    for _ in 0..2 {
        let i = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
        checked_call(i % STRESS_KEYS, (i / STRESS_KEYS) % FNS_PER_KEY);
        HANDLER_CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

fn timer_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

/// A POSIX timer sending [`timer_signal`] to the calling thread.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn start(hz: i64) -> ThreadTimer {
        // SAFETY: plain data; SIGEV_THREAD_ID targets this thread.
        unsafe {
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = timer_signal();
            sev.sigev_notify_thread_id = libc::gettid();
            let mut t: libc::timer_t = std::mem::zeroed();
            assert_eq!(libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t), 0);
            let period = libc::timespec { tv_sec: 0, tv_nsec: 1_000_000_000 / hz };
            let spec = libc::itimerspec { it_interval: period, it_value: period };
            assert_eq!(libc::timer_settime(t, 0, &spec, std::ptr::null_mut()), 0);
            ThreadTimer(t)
        }
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: our timer.
        unsafe { libc::timer_delete(self.0) };
    }
}

fn stress_flips() -> u64 {
    std::env::var("TEXTPOKE_KEYS_FLIPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

#[test]
fn stress_100k_flips_while_8_threads_and_their_signal_handlers_branch() {
    let flips = stress_flips();
    let workers = 8;
    // SAFETY: a plain handler (atomics only) for a real-time signal.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_timer as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(timer_signal(), &sa, std::ptr::null_mut()), 0);
    }
    for (k, phase) in PHASE.iter().enumerate() {
        phase.store(stress_key(k).is_enabled() as u64, Ordering::Release);
    }
    STRESS_ON.store(true, Ordering::Release);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..workers)
        .map(|t| {
            let (stop, calls) = (stop.clone(), calls.clone());
            std::thread::spawn(move || {
                // Workers run at the lowest priority, so that on a small
                // machine the flipper gets a CPU when it needs one; they
                // still run all the time on the other CPUs (and while the
                // flipper waits), and are preempted anywhere.
                // SAFETY: plain syscall on this thread.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, 19) };
                let _timer = ThreadTimer::start(1000);
                let mut i = t * 7;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    checked_call(i % STRESS_KEYS, (i / STRESS_KEYS) % FNS_PER_KEY);
                    i = i.wrapping_add(1);
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();

    let traps_before = textpoke::text::traps_emulated();
    let start = Instant::now();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut epoch = 1u64;
    let mut done = 0u64;
    let mut batches = 0u64;
    while done < flips {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mostly one key; every 8th time two keys in one update.
        let k1 = (x % STRESS_KEYS as u64) as usize;
        let pair = x.is_multiple_of(8);
        let k2 = (k1 + 1 + ((x >> 8) % (STRESS_KEYS as u64 - 1)) as usize) % STRESS_KEYS;
        let ks: &[usize] = if pair { &[k1, k2] } else { &[k1] };
        for &k in ks {
            PHASE[k].store(epoch << 2 | FLIPPING, Ordering::Release);
        }
        epoch += 1;
        let mut up = Update::new();
        for &k in ks {
            let key = stress_key(k);
            up = up.set(key, !key.is_enabled());
        }
        let st = up.commit().expect("flip");
        assert_eq!(st.keys_changed, ks.len());
        assert_eq!(st.sites_patched, FNS_PER_KEY * ks.len());
        for &k in ks {
            let on = stress_key(k).is_enabled() as u64;
            PHASE[k].store(epoch << 2 | on, Ordering::Release);
        }
        epoch += 1;
        done += ks.len() as u64;
        batches += 1;
        // A short steady window in which every call is checked exactly.
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(10) {
            std::hint::spin_loop();
        }
    }
    let elapsed = start.elapsed();
    // Let the workers run a while in the final steady state.
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    STRESS_ON.store(false, Ordering::Release);
    let traps = textpoke::text::traps_emulated() - traps_before;
    let (on, off, flip, hc) = (
        STEADY_ON.load(Ordering::Relaxed),
        STEADY_OFF.load(Ordering::Relaxed),
        TAKEN_IN_FLIP.load(Ordering::Relaxed),
        HANDLER_CALLS.load(Ordering::Relaxed),
    );
    eprintln!(
        "stress: {done} key flips in {batches} batches in {elapsed:.1?}; {} calls ({hc} from timer handlers); \
         checked in steady phases: {on} on, {off} off; {flip} taken during a flip; {traps} traps emulated",
        calls.load(Ordering::Relaxed) + hc
    );
    let v = VIOLATIONS.load(Ordering::Relaxed);
    let first = FIRST_VIOLATION.load(Ordering::Relaxed);
    assert_eq!(
        v,
        0,
        "{v} call(s) disagreed with a steady phase; first: key {} fn {} phase state {} taken {}",
        first >> 40,
        (first >> 32) & 0xff,
        (first >> 1) & 3,
        first & 1
    );
    assert!(on > 1000 && off > 1000, "calls were checked in both steady states: {on} on, {off} off");
    assert!(hc > 0, "the timer handlers ran through the branches");
    // x86-64's breakpoint protocol emulates the sites threads hit mid-flip;
    // aarch64 swaps each site's word whole (b <-> nop) and never writes a trap.
    #[cfg(target_arch = "x86_64")]
    assert!(traps > 0, "threads hit sites mid-flip and were emulated");
    #[cfg(target_arch = "aarch64")]
    assert_eq!(traps, 0, "the swap strategy writes no trap");
    for k in 0..STRESS_KEYS {
        assert_sites_match(stress_key(k));
    }
    // Back to the defaults.
    Update::new().disable(&STRESS_A).enable(&STRESS_B).disable(&STRESS_C).enable(&STRESS_D).commit().unwrap();
    assert_eq!(common::wx_mappings(), Vec::<String>::new(), "no W+X page left behind");
}
