//! The tracer on Rust functions marked `#[textpoke::traced]`: entry and
//! exit sites in the body, exits also on panics.

mod common;

use std::sync::atomic::Ordering;
use textpoke::trace::Tracer;

#[textpoke::traced]
fn tm_add(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31) ^ b
}

#[textpoke::traced]
fn tm_outer(n: u64) -> u64 {
    (0..n).map(|i| tm_add(i, n)).fold(0, u64::wrapping_add)
}

#[textpoke::traced]
fn tm_panics(p: bool) -> u64 {
    if p {
        panic!("unwinds through a traced function");
    }
    7
}

#[textpoke::traced]
fn tm_generic<T: Copy + Into<u64>>(x: T) -> u64 {
    x.into() + 1
}

use common::glob_filter;
use common::EntryExitCounts as Counts;

fn plain_outer(n: u64) -> u64 {
    (0..n).map(|i| i.wrapping_mul(31) ^ n).fold(0, u64::wrapping_add)
}

#[test]
fn marked_functions_are_traced_with_balanced_exits() {
    let t = Tracer::global();
    t.refresh().unwrap();
    let names: Vec<String> = t.functions().iter().map(|f| f.function.to_string()).collect();
    assert!(names.iter().any(|n| n.ends_with("tm_outer")), "{names:?}");
    let c = Counts::new();
    let h = t.register(c.clone(), glob_filter(["*::tm_*"], Vec::<String>::new()).unwrap()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(|| {
                for n in 0..200 {
                    assert_eq!(tm_outer(n), plain_outer(n));
                    assert_eq!(tm_generic(3u8) + tm_generic(4u32), 9);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    // Per thread: 200 tm_outer, sum(0..200) tm_add, 400 tm_generic.
    let per_thread = 200 + (0..200u64).sum::<u64>() + 400;
    assert_eq!(c.entries.load(Ordering::Relaxed), 8 * per_thread);
    assert_eq!(c.exits.load(Ordering::Relaxed), 8 * per_thread);
    // A panic unwinding through a traced function still runs its exit.
    let before = c.exits.load(Ordering::Relaxed);
    std::panic::set_hook(Box::new(|_| {})); // the panics below are expected
    for _ in 0..100 {
        assert!(std::panic::catch_unwind(|| tm_panics(true)).is_err());
        assert_eq!(tm_panics(false), 7);
    }
    let _ = std::panic::take_hook();
    assert_eq!(c.exits.load(Ordering::Relaxed) - before, 200);
    t.unregister(h).unwrap();
    let e = c.entries.load(Ordering::Relaxed);
    tm_outer(10);
    assert_eq!(c.entries.load(Ordering::Relaxed), e, "untraced after unregister");
}

/// Mixes sixteen integers and eight doubles around the sites of the
/// inlined traced `lv_step`: with optimisation, values live in registers
/// across both sites (caller-saved ones included: the asm block clobbers
/// none), so a stub or trampoline that lost one changes the result.
#[textpoke::traced]
#[inline(always)]
fn lv_step(x: u64) -> u64 {
    x.rotate_left(7) ^ 0x9e37_79b9
}

#[textpoke::traced]
#[inline(never)]
fn lv_mix(seed: u64) -> (u64, f64) {
    let xs: [u64; 16] = std::array::from_fn(|i| seed.wrapping_mul(i as u64 + 3));
    let fs: [f64; 8] = std::array::from_fn(|i| seed as f64 * (i as f64 + 0.5));
    let s = lv_step(seed);
    let ints = xs.iter().fold(s, |a, &x| a.rotate_left(3) ^ x);
    let floats = fs.iter().fold(s as f64, |a, &f| a * 0.5 + f);
    (ints, floats)
}

fn lv_mix_plain(seed: u64) -> (u64, f64) {
    let xs: [u64; 16] = std::array::from_fn(|i| seed.wrapping_mul(i as u64 + 3));
    let fs: [f64; 8] = std::array::from_fn(|i| seed as f64 * (i as f64 + 0.5));
    let s = seed.rotate_left(7) ^ 0x9e37_79b9;
    let ints = xs.iter().fold(s, |a, &x| a.rotate_left(3) ^ x);
    let floats = fs.iter().fold(s as f64, |a, &f| a * 0.5 + f);
    (ints, floats)
}

#[test]
fn registers_live_across_traced_sites_survive() {
    let t = Tracer::global();
    t.refresh().unwrap();
    let c = Counts::new();
    let h = t.register(c.clone(), glob_filter(["*::lv_*"], Vec::<String>::new()).unwrap()).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|k| {
            std::thread::spawn(move || {
                for n in 0..500 {
                    let seed = std::hint::black_box(k * 1000 + n);
                    assert_eq!(lv_mix(seed), lv_mix_plain(seed));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    // lv_mix and the inlined lv_step: 2 entries and 2 exits per call.
    assert_eq!(c.entries.load(Ordering::Relaxed), 8 * 500 * 2);
    assert_eq!(c.exits.load(Ordering::Relaxed), 8 * 500 * 2);
    t.unregister(h).unwrap();
}
