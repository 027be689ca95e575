mod common;

use common::{compile_so, Lib};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use textpoke::trace::{Entry, Filter, TraceOp, Tracer};

struct Count(AtomicU64);
impl TraceOp for Count {
    fn entry(&self, _e: &Entry<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn rss_anon_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn rss_probe() {
    let lib = Arc::new(Lib::open(&compile_so(
        "rss",
        "__attribute__((noipa)) int rss_a(int x) { return x + 1; }\n__attribute__((noipa)) int rss_b(int x) { return rss_a(x) + 1; }",
        &["-fpatchable-function-entry=5", "-O1"],
    )));
    let t = Tracer::global();
    t.refresh().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (lib, stop) = (lib.clone(), stop.clone());
            std::thread::spawn(move || {
                // SAFETY: int (int).
                let b: extern "C" fn(i32) -> i32 = unsafe { std::mem::transmute(lib.sym("rss_b")) };
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(b(i), i + 2);
                    i = i.wrapping_add(1) & 0xffff;
                }
            })
        })
        .collect();
    let op = Arc::new(Count(AtomicU64::new(0)));
    let on = || Filter::new(["rss_*"], Vec::<String>::new()).unwrap();
    let off = || Filter::new(["nothing-matches-this"], Vec::<String>::new()).unwrap();
    let h = t.register(op.clone(), off()).unwrap();
    let n: u64 = std::env::var("CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let start = Instant::now();
    let mut base = 0;
    for i in 0..n {
        t.set_filter(&h, on()).unwrap();
        t.set_filter(&h, off()).unwrap();
        if i == n / 10 {
            base = rss_anon_kb();
        }
        if i % (n / 10).max(1) == 0 {
            println!("{i}: {} kB, retired {}, {:?}", rss_anon_kb(), t.retired(), start.elapsed());
        }
    }
    println!("end: {} kB (base {base}), retired {}, {:?}", rss_anon_kb(), t.retired(), start.elapsed());
    stop.store(true, Ordering::Relaxed);
    for w in workers { w.join().unwrap(); }
    t.unregister(h).unwrap();
    let _ = t.reclaim(Duration::from_secs(5));
}
