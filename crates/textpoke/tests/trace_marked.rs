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
