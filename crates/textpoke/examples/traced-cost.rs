//! What `#[textpoke::traced]` costs when disabled, in instructions counted
//! by callgrind: each traced function against an identical untraced twin.
//!
//! ```sh
//! cargo run --release --example traced-cost              # runs itself under callgrind, prints the table
//! cargo run --release --example traced-cost -- --calls   # just the calls (what callgrind measures)
//! ```
//!
//! Every function is `#[inline(never)]` and called `CALLS` times with
//! `black_box`ed arguments; the table gives each function's *self*
//! instructions per call (callees excluded), so the difference between the
//! twins is what the attribute adds on the path taken.

use std::hint::black_box;
use std::process::Command;

const CALLS: u64 = 100_000;

/// Leaf: no call in the body.
#[textpoke::traced]
#[inline(never)]
fn leaf_traced(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31) ^ b
}

#[inline(never)]
fn leaf_plain(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31) ^ b
}

#[inline(never)]
fn helper(x: u64) -> u64 {
    black_box(x).rotate_left(5)
}

/// Not a leaf: calls `helper` (which cannot unwind).
#[textpoke::traced]
#[inline(never)]
fn nonleaf_traced(x: u64) -> u64 {
    helper(x) + helper(x ^ 1)
}

#[inline(never)]
fn nonleaf_plain(x: u64) -> u64 {
    helper(x) + helper(x ^ 1)
}

/// May panic (bounds check): the exit guard needs a landing pad, off the
/// path taken.
#[textpoke::traced]
#[inline(never)]
fn unwinding_traced(v: &[u64], i: usize) -> u64 {
    v[black_box(i)].wrapping_mul(3)
}

#[inline(never)]
fn unwinding_plain(v: &[u64], i: usize) -> u64 {
    v[black_box(i)].wrapping_mul(3)
}

/// Many arguments, floats, a result in memory.
#[textpoke::traced]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn wide_traced(a: f64, b: u64, c: f32, d: u64, e: f64, f: u64, g: u64, h: u64, i: f64) -> (f64, u64, u64) {
    (a * e + c as f64 - i, b ^ d ^ f, g.wrapping_add(h))
}

#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn wide_plain(a: f64, b: u64, c: f32, d: u64, e: f64, f: u64, g: u64, h: u64, i: f64) -> (f64, u64, u64) {
    (a * e + c as f64 - i, b ^ d ^ f, g.wrapping_add(h))
}

const PAIRS: [(&str, &str); 4] = [
    ("leaf_traced", "leaf_plain"),
    ("nonleaf_traced", "nonleaf_plain"),
    ("unwinding_traced", "unwinding_plain"),
    ("wide_traced", "wide_plain"),
];

fn calls() {
    let v = [1u64, 2, 3, 4];
    let mut acc = 0u64;
    for i in 0..CALLS {
        let x = black_box(i);
        acc ^= leaf_traced(x, 7) ^ leaf_plain(x, 7);
        acc ^= nonleaf_traced(x) ^ nonleaf_plain(x);
        acc ^= unwinding_traced(&v, (x & 3) as usize) ^ unwinding_plain(&v, (x & 3) as usize);
        let w1 = wide_traced(x as f64, x, 1.5, 3, 2.0, 4, 5, 6, 0.5);
        let w2 = wide_plain(x as f64, x, 1.5, 3, 2.0, 4, 5, 6, 0.5);
        assert_eq!(w1, w2);
        acc ^= w1.1;
    }
    black_box(acc);
}

/// Self cost (instructions) per function name in a callgrind output file
/// written with `--compress-strings=no --compress-pos=no`.
fn self_costs(out: &str) -> Vec<(String, u64)> {
    let mut costs: Vec<(String, u64)> = Vec::new();
    let mut current: Option<usize> = None;
    let mut skip_next = false;
    for line in out.lines() {
        if let Some(name) = line.strip_prefix("fn=") {
            current = Some(match costs.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    costs.push((name.to_owned(), 0));
                    costs.len() - 1
                }
            });
            continue;
        }
        if line.starts_with("calls=") {
            skip_next = true; // the next line is the call's inclusive cost
            continue;
        }
        let is_cost = line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*');
        if !is_cost {
            continue;
        }
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if let (Some(i), Some(ir)) = (current, line.split_whitespace().nth(1).and_then(|t| t.parse::<u64>().ok())) {
            costs[i].1 += ir;
        }
    }
    costs
}

fn main() {
    if std::env::args().any(|a| a == "--calls") {
        calls();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out_file = std::env::temp_dir().join(format!("traced-cost.{}.callgrind", std::process::id()));
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "--compress-strings=no", "--compress-pos=no"])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(&exe)
        .arg("--calls");
    eprintln!("$ {cmd:?}");
    let status = cmd.output().expect("valgrind must be installed (apt-get install valgrind)");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let text = std::fs::read_to_string(&out_file).unwrap();
    let _ = std::fs::remove_file(&out_file);
    let costs = self_costs(&text);
    let per_call = |short: &str| -> f64 {
        let total: u64 = costs.iter().filter(|(n, _)| n.contains(&format!("::{short}"))).map(|(_, c)| c).sum();
        assert!(total > 0, "{short} not in the callgrind output");
        total as f64 / CALLS as f64
    };
    println!("{CALLS} calls each; self instructions per call (callgrind)");
    println!("{:<18} {:>8} {:>8} {:>8}", "function", "traced", "plain", "extra");
    for (traced, plain) in PAIRS {
        let (t, p) = (per_call(traced), per_call(plain));
        println!("{:<18} {:>8.2} {:>8.2} {:>+8.2}", traced.trim_end_matches("_traced"), t, p, t - p);
    }
}
