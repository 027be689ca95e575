//! keys-bench: what a static branch costs, and what flipping a key costs.
//!
//! cargo bench -p textpoke --bench keys-bench            # everything
//! cargo bench -p textpoke --bench keys-bench -- branch  # one part: branch | callgrind | flip
//!
//! 1. **branch**: ns per pass of a loop whose body is a little arithmetic,
//!    (a) alone, (b) behind a disabled `static_branch_unlikely!`, (c) behind
//!    an `AtomicBool` check, (d) behind the same key enabled. The variants are
//!    interleaved over many rounds in one run and the medians are compared
//!    (this machine is shared and noisy: only the side-by-side ratio means
//!    anything).
//! 2. **callgrind**: instructions executed per pass, counted by
//!    `valgrind --tool=callgrind` on this very binary: each variant is one
//!    `#[inline(never)]` function making [`PASSES`] passes, and callgrind
//!    counts only inside it (`--toggle-collect`). The disabled branch must
//!    execute exactly one more instruction per pass than no branch: the NOP.
//! 3. **flip**: latency of enabling and disabling a key with 100 branch
//!    sites (100 functions), in an idle process and while 4 threads call
//!    those 100 functions in a loop; the engine's commit time is shown
//!    apart from the keys layer's own work (rescanning the loaded objects and
//!    pinning them).

use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

textpoke::define_static_key_false!(BENCH_KEY);
textpoke::define_static_key_false!(ON_KEY);
textpoke::define_static_key_false!(FLIP_KEY);
static FLAG: AtomicBool = AtomicBool::new(false);

/// Passes per measured call in the callgrind part.
const PASSES: u64 = 1_000_000;

#[cold]
#[inline(never)]
fn slow(acc: u64) -> u64 {
    black_box(acc ^ 0x5555)
}

#[inline(always)]
fn work(acc: u64, i: u64) -> u64 {
    acc.rotate_left(5) ^ i
}

#[inline(never)]
fn loop_plain(n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        acc = work(acc, black_box(i));
    }
    acc
}

#[inline(never)]
fn loop_key(n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        if textpoke::static_branch_unlikely!(BENCH_KEY) {
            acc = slow(acc);
        }
        acc = work(acc, black_box(i));
    }
    acc
}

#[inline(never)]
fn loop_atomic(n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        if FLAG.load(Ordering::Relaxed) {
            acc = slow(acc);
        }
        acc = work(acc, black_box(i));
    }
    acc
}

#[inline(never)]
fn loop_key_on(n: u64) -> u64 {
    let mut acc = 0;
    for i in 0..n {
        if textpoke::static_branch_unlikely!(ON_KEY) {
            acc = slow(acc);
        }
        acc = work(acc, black_box(i));
    }
    acc
}

type Variant = (&'static str, fn(u64) -> u64);
const VARIANTS: [Variant; 4] = [
    ("no branch", loop_plain),
    ("static_branch_unlikely (disabled)", loop_key),
    ("AtomicBool check (false)", loop_atomic),
    ("static_branch_unlikely (enabled)", loop_key_on),
];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bench_branch() {
    ON_KEY.enable().expect("enable ON_KEY");
    let n = 2_000_000;
    let rounds = 61;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for (_, f) in VARIANTS {
        black_box(f(n)); // warm up
    }
    for r in 0..rounds {
        for k in 0..VARIANTS.len() {
            let k = (k + r) % VARIANTS.len(); // rotate the order
            let start = Instant::now();
            black_box(VARIANTS[k].1(black_box(n)));
            samples[k].push(start.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    let base = median(&mut samples[0].clone());
    println!("== branch: ns per pass, median of {rounds} interleaved rounds of {n} passes");
    for (k, (name, _)) in VARIANTS.iter().enumerate() {
        let m = median(&mut samples[k]);
        println!("  {name:<36} {m:>6.3} ns/pass   x{:.3} of no branch", m / base);
    }
    ON_KEY.disable().expect("disable ON_KEY");
}

/// Runs one variant as the callgrind child: `KEYS_BENCH_PASSES` passes.
fn callgrind_child(which: &str) {
    let f = VARIANTS.iter().find(|v| v.0 == which).map(|v| v.1).expect("variant");
    let passes: u64 = std::env::var("KEYS_BENCH_PASSES").ok().and_then(|p| p.parse().ok()).unwrap_or(PASSES);
    if which.contains("enabled") {
        ON_KEY.enable().expect("enable ON_KEY");
    }
    black_box(f(black_box(passes)));
}

/// Instructions (Ir) executed inside the function `symbol` when this binary
/// runs `variant` for `passes` passes under callgrind.
fn callgrind_ir(variant: &str, symbol: &str, passes: u64) -> Result<u64, String> {
    let out_file = std::env::temp_dir().join(format!("keys-bench-{}-{symbol}-{passes}.callgrind", std::process::id()));
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(format!("--toggle-collect=*{symbol}*"))
        .arg(std::env::current_exe().unwrap())
        .env("KEYS_BENCH_CALLGRIND_CHILD", variant)
        .env("KEYS_BENCH_PASSES", passes.to_string())
        .output()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    if !out.status.success() {
        return Err(format!("valgrind failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = std::fs::read_to_string(&out_file).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&out_file);
    let ir = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no totals in callgrind output".to_string())?;
    if ir == 0 {
        return Err(format!("callgrind counted nothing inside {symbol} (inlined or merged away?)"));
    }
    Ok(ir)
}

fn bench_callgrind() {
    let (n1, n2) = (PASSES, 2 * PASSES);
    println!(
        "== callgrind: instructions per pass = (Ir at {n2} passes - Ir at {n1} passes) / {}, counted inside the loop \
         function only (the difference cancels its prologue and epilogue)",
        n2 - n1
    );
    let symbols = ["loop_plain", "loop_key", "loop_atomic", "loop_key_on"];
    let mut per_pass = Vec::new();
    for ((name, _), sym) in VARIANTS.iter().zip(symbols) {
        let irs = callgrind_ir(name, sym, n1).and_then(|a| Ok((a, callgrind_ir(name, sym, n2)?)));
        match irs {
            Ok((a, b)) => {
                let slope = (b - a) as f64 / (n2 - n1) as f64;
                println!("  {name:<36} Ir {a:>9} / {b:>9}   {slope:.6} instructions per pass");
                per_pass.push(slope);
            }
            Err(e) => {
                println!("  skipped: {e}");
                return;
            }
        }
    }
    println!(
        "  disabled unlikely branch: {:+.6} instruction(s) per pass vs no branch (target: exactly +1, the NOP); \
         AtomicBool: {:+.6}",
        per_pass[1] - per_pass[0],
        per_pass[2] - per_pass[0]
    );
}

// ------------------------------------------------------------------- flip

/// One branch site per instantiation: 100 distinct functions.
#[inline(never)]
fn site<const N: u64>(x: u64) -> u64 {
    if textpoke::static_branch_unlikely!(FLIP_KEY) {
        x.wrapping_mul(N + 3)
    } else {
        x.wrapping_add(N)
    }
}

type SiteFn = fn(u64) -> u64;

macro_rules! tens {
    ($($t:literal)*) => { [$(units!($t; 0 1 2 3 4 5 6 7 8 9)),*] };
}
macro_rules! units {
    ($t:literal; $($u:literal)*) => { [$(site::<{ $t * 10 + $u }> as SiteFn),*] };
}

fn sites() -> Vec<SiteFn> {
    let t: [[SiteFn; 10]; 10] = tens!(0 1 2 3 4 5 6 7 8 9);
    t.iter().flatten().copied().collect()
}

struct Lat {
    total: Vec<Duration>,
    commit: Vec<Duration>,
    syncs: u32,
}

fn flip_many(n: usize) -> Lat {
    let mut lat = Lat { total: Vec::new(), commit: Vec::new(), syncs: 0 };
    for i in 0..n {
        let on = i % 2 == 0;
        let st = textpoke::keys::Update::new().set(&FLIP_KEY, on).commit().expect("flip");
        assert_eq!(st.sites_patched, 100, "the key has 100 sites");
        let c = st.commit.expect("a batch");
        lat.syncs = lat.syncs.max(c.sync_rounds);
        lat.total.push(st.elapsed);
        lat.commit.push(c.elapsed);
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    lat
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, mut l: Lat) {
    println!(
        "  {what:<24} median {:>9.1?} (engine commit {:>9.1?})   p90 {:>9.1?}   max {:>9.1?}   {} syncs",
        pct(&mut l.total, 0.5),
        pct(&mut l.commit, 0.5),
        pct(&mut l.total, 0.9),
        pct(&mut l.total, 1.0),
        l.syncs
    );
}

fn bench_flip() {
    let fns = sites();
    let info = textpoke::keys::find(FLIP_KEY.name()).expect("FLIP_KEY listed");
    assert_eq!(info.sites, 100);
    let sum: u64 = fns.iter().map(|f| f(1)).sum();
    assert_eq!(sum, (0..100).map(|n| 1 + n).sum::<u64>(), "every site disabled");
    println!("== flip: enabling/disabling a key with {} sites, 200 flips each", info.sites);
    black_box(flip_many(20));
    report("idle process", flip_many(200));

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let busy: Vec<_> = (0..4)
        .map(|t| {
            let (stop, calls, fns) = (stop.clone(), calls.clone(), fns.clone());
            std::thread::spawn(move || {
                let mut i = t * 13;
                let mut acc = 0u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    acc = acc.wrapping_add(fns[i % 100](i as u64));
                    i += 7;
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
                black_box(acc);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let traps = textpoke::text::traps_emulated();
    report("4 busy threads", flip_many(200));
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    println!(
        "  busy threads made {} calls through the sites; {} trap(s) emulated during the flips",
        calls.load(Ordering::Relaxed),
        textpoke::text::traps_emulated() - traps
    );
}

fn main() {
    // Keep the compiler from proving FLAG is never written (it would fold
    // the check away and merge loop_atomic into loop_plain).
    black_box(&FLAG);
    if let Ok(v) = std::env::var("KEYS_BENCH_CALLGRIND_CHILD") {
        callgrind_child(&v);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |p: &str| args.is_empty() || args.iter().any(|a| a == p);
    if want("branch") {
        bench_branch();
    }
    if want("callgrind") {
        bench_callgrind();
    }
    if want("flip") {
        bench_flip();
    }
}
