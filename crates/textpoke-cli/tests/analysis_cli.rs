//! `textpoke report`, `replay`, `dump` and `list` through the built binary,
//! on traces this test process records with `textpoke_record` (several
//! threads, count-only, a forked child), on damaged traces, and on C
//! programs compiled here.
//!
//! The recorder is process-wide, so recording takes a lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use textpoke_record::{self as record, FuncId, RecorderConfig};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmpdir(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("analysis-cli").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    d
}

fn textpoke(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_textpoke")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = textpoke(args);
    assert!(o.status.success(), "textpoke {args:?} failed: {}\n{}", stderr(&o), stdout(&o));
    stdout(&o)
}

/// Runs a failing command: exit code 1, nothing on stdout, and stderr
/// containing every one of `needles`. No panic (exit code 101).
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = textpoke(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "textpoke {args:?}: {err}\n{}", stdout(&o));
    assert!(o.stdout.is_empty(), "textpoke {args:?} printed output although it failed: {}", stdout(&o));
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "textpoke {args:?}: {n:?} not in {err:?}");
    }
    err
}

fn spin(n: u32) {
    for i in 0..n {
        std::hint::black_box(i);
    }
}

const THREADS: u64 = 4;

/// The functions of the multithreaded workload.
struct Funcs {
    outer: FuncId,
    inner: FuncId,
    rare: FuncId,
}

fn funcs() -> &'static Funcs {
    static F: OnceLock<Funcs> = OnceLock::new();
    F.get_or_init(|| Funcs {
        outer: record::register_function(0x7000, "outer_work"),
        inner: record::register_function(0x7100, "inner_leaf"),
        rare: record::register_function(0x7200, "rare, with a comma"),
    })
}

/// Calls of thread `k`: `outer_work` 50+k times, each calling
/// `inner_leaf` twice; `rare, with a comma` once per thread.
fn outer_calls(k: u64) -> u64 {
    50 + k
}

/// Records the workload on THREADS threads (or counts it).
fn workload_trace(name: &str, count_only: bool) -> (PathBuf, Vec<i32>) {
    let f = funcs();
    let dir = tmpdir(name);
    let cfg = if count_only { RecorderConfig::new(&dir).count_only() } else { RecorderConfig::new(&dir) };
    let rec = record::start(cfg).unwrap();
    let hs: Vec<_> = (0..THREADS)
        .map(|k| {
            std::thread::spawn(move || {
                // SAFETY: no arguments.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                let (outer, inner, rare) = (funcs().outer, funcs().inner, funcs().rare);
                for _ in 0..outer_calls(k) {
                    if count_only {
                        assert!(record::count(outer) && record::count(inner) && record::count(inner));
                        continue;
                    }
                    assert!(record::entry(outer, 0));
                    spin(200);
                    for _ in 0..2 {
                        assert!(record::entry(inner, 1));
                        spin(500);
                        assert!(record::exit(inner, 1));
                    }
                    assert!(record::exit_value(outer, 0, 7));
                }
                if count_only {
                    assert!(record::count(rare));
                } else {
                    assert!(record::entry(rare, 0) && record::exit(rare, 0));
                }
                tid
            })
        })
        .collect();
    let tids = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let _ = f;
    let s = rec.stop().unwrap();
    assert_eq!(s.dropped, 0);
    (dir, tids)
}

fn total_outer() -> u64 {
    (0..THREADS).map(outer_calls).sum()
}

/// CSV rows by function name: the other columns.
fn csv_rows(csv: &str) -> HashMap<String, Vec<String>> {
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("function,calls,total_ns,self_ns,avg_ns,min_ns,max_ns"));
    let mut rows = HashMap::new();
    for l in lines {
        if l.is_empty() || l.starts_with('#') {
            break;
        }
        // The only quoted name in these tests is the first field.
        let (name, rest) = if let Some(q) = l.strip_prefix('"') {
            let end = q.find("\",").unwrap();
            (q[..end].to_string(), &q[end + 2..])
        } else {
            let (n, r) = l.split_once(',').unwrap();
            (n.to_string(), r)
        };
        let cols: Vec<String> = rest.split(',').map(str::to_string).collect();
        assert_eq!(cols.len(), 6, "{l}");
        rows.insert(name, cols);
    }
    rows
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| panic!("{s:?} is not a number"))
}

#[test]
fn report_counts_calls_exactly_in_every_format() {
    let _g = serial();
    let (dir, _) = workload_trace("report", false);
    let d = dir.to_str().unwrap();
    let csv = ok(&["report", "-i", d, "--format", "csv", "--sort", "calls"]);
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 3, "{csv}");
    let outer = &rows["outer_work"];
    let inner = &rows["inner_leaf"];
    assert_eq!(num(&outer[0]), total_outer());
    assert_eq!(num(&inner[0]), 2 * total_outer());
    assert_eq!(num(&rows["rare, with a comma"][0]), THREADS);
    // Sorted by calls: inner first.
    assert!(csv.lines().nth(1).unwrap().starts_with("inner_leaf,"), "{csv}");
    for r in [outer, inner] {
        let [_, total, selft, avg, min, max] = [0, 1, 2, 3, 4, 5].map(|i| num(&r[i]));
        assert!(total > 0 && selft <= total && min <= avg && avg <= max, "{r:?}");
    }
    // The leaf's self time is its total; the caller's total holds both.
    assert_eq!(inner[1], inner[2]);
    assert!(num(&outer[1]) >= num(&inner[1]));
    assert_eq!(num(&outer[2]), num(&outer[1]) - num(&inner[1]));

    let json: serde_json::Value = serde_json::from_str(&ok(&["report", "-i", d, "--format", "json"])).unwrap();
    let funcs = json["processes"][0]["functions"].as_array().unwrap();
    assert_eq!(funcs[0]["function"], "outer_work", "sorted by total by default");
    assert_eq!(funcs[0]["calls"].as_u64(), Some(total_outer()));
    assert_eq!(json["processes"][0]["threads"].as_array().unwrap().len() as u64, THREADS);

    let table = ok(&["report", "-i", d, "--sort", "max"]);
    assert!(table.contains("outer_work") && table.contains("inner_leaf"), "{table}");
    assert!(table.lines().nth(3).unwrap().ends_with("outer_work"), "{table}");
    // The default directory is textpoke.data in the current directory.
    let o = Command::new(env!("CARGO_BIN_EXE_textpoke")).arg("report").current_dir(&dir).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("textpoke.data does not exist"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(dir);
}

/// Checks one thread's replay lines nest: returns (opened, leaves).
fn check_balanced(lines: &[&str]) -> (usize, usize) {
    let mut stack: Vec<String> = Vec::new();
    let (mut opened, mut leaves) = (0, 0);
    for l in lines {
        let (_dur, code) = l.split_once(" | ").unwrap_or_else(|| panic!("no column in {l:?}"));
        let code_t = code.trim_start();
        let indent = code.len() - code_t.len();
        if let Some(name) = code_t.strip_suffix("() {") {
            assert_eq!(indent, 2 * stack.len(), "{l}");
            stack.push(name.to_string());
            opened += 1;
        } else if let Some(rest) = code_t.strip_prefix('}') {
            let name = stack.pop().unwrap_or_else(|| panic!("unbalanced }} at {l:?}"));
            assert_eq!(indent, 2 * stack.len(), "{l}");
            assert!(rest.ends_with(&format!("/* {name} */")), "{l} closes {name}");
        } else {
            assert!(code_t.ends_with(';'), "{l}");
            assert_eq!(indent, 2 * stack.len(), "{l}");
            leaves += 1;
        }
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    (opened, leaves)
}

/// Replay output split into per-thread sections.
fn sections(text: &str) -> HashMap<i32, Vec<&str>> {
    let mut out: HashMap<i32, Vec<&str>> = HashMap::new();
    let mut cur = None;
    for l in text.lines() {
        if let Some(t) = l.strip_prefix("# thread ") {
            cur = Some(t.parse::<i32>().unwrap());
            out.entry(cur.unwrap()).or_default();
        } else if !l.starts_with('#') {
            out.get_mut(&cur.expect("a line before any thread header")).unwrap().push(l);
        }
    }
    out
}

#[test]
fn replay_is_balanced_per_thread_and_filters_by_tid() {
    let _g = serial();
    let (dir, tids) = workload_trace("replay", false);
    let d = dir.to_str().unwrap();
    let text = ok(&["replay", "-i", d]);
    let secs = sections(&text);
    assert_eq!(secs.len() as u64, THREADS);
    for (k, tid) in tids.iter().enumerate() {
        let (opened, leaves) = check_balanced(&secs[tid]);
        let n = outer_calls(k as u64) as usize;
        assert_eq!(opened, n, "thread {tid}");
        assert_eq!(leaves, 2 * n + 1, "thread {tid}");
        assert!(secs[tid].iter().any(|l| l.ends_with("} = 7; /* outer_work */")), "return values shown");
        assert!(secs[tid].iter().any(|l| l.ends_with("|   inner_leaf();")), "leaf calls on one line");
    }
    let one = ok(&["replay", "-i", d, "--tid", &tids[2].to_string()]);
    let secs1 = sections(&one);
    assert_eq!(secs1.keys().copied().collect::<Vec<_>>(), [tids[2]]);
    fails(&["replay", "-i", d, "--tid", "999999999"], &["no thread 999999999", &tids[0].to_string()]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn chrome_json_has_one_event_per_call_and_thread_names() {
    let _g = serial();
    let (dir, tids) = workload_trace("chrome", false);
    let d = dir.to_str().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&["dump", "--chrome", "-i", d])).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let calls: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(calls.len() as u64, 3 * total_outer() + THREADS);
    for e in &calls {
        assert!(e["ts"].as_f64().unwrap() >= 0.0 && e["dur"].as_f64().unwrap() >= 0.0, "{e}");
        assert_eq!(e["pid"].as_i64(), Some(std::process::id() as i64));
    }
    for tid in &tids {
        let n = calls.iter().filter(|e| e["tid"].as_i64() == Some(*tid as i64)).count();
        assert!(n > 0);
    }
    let names = events.iter().filter(|e| e["ph"] == "M" && e["name"] == "thread_name").count();
    assert_eq!(names as u64, THREADS);
    assert_eq!(events.iter().filter(|e| e["name"] == "process_name").count(), 1);
    // Nested events lie inside their caller.
    let outer = calls.iter().find(|e| e["name"] == "outer_work").unwrap();
    let (s, e) = (outer["ts"].as_f64().unwrap(), outer["ts"].as_f64().unwrap() + outer["dur"].as_f64().unwrap());
    let inside = calls
        .iter()
        .filter(|c| c["name"] == "inner_leaf" && c["tid"] == outer["tid"])
        .filter(|c| c["ts"].as_f64().unwrap() >= s && c["ts"].as_f64().unwrap() <= e)
        .count();
    assert_eq!(inside, 2);

    // -o FILE: the same document, written whole, nothing left beside it.
    let outdir = tmpdir("chrome-out");
    std::fs::create_dir_all(&outdir).unwrap();
    let file = outdir.join("trace.json");
    let o = textpoke(&["dump", "--chrome", "-i", d, "-o", file.to_str().unwrap()]);
    assert!(o.status.success() && o.stdout.is_empty(), "{}", stderr(&o));
    let v2: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(v2["traceEvents"].as_array().unwrap().len(), events.len());
    assert_eq!(std::fs::read_dir(&outdir).unwrap().count(), 1, "no temporary file left");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(outdir);
}

/// `dump --perfetto`: the protobuf parses as a Perfetto trace; each thread
/// has a track under the process's, and its slices begin and end in nested
/// order, one per call, with interned names.
#[test]
fn perfetto_trace_has_a_slice_per_call_on_each_threads_track() {
    use perfetto_protos::trace::Trace as PTrace;
    use perfetto_protos::track_event::track_event::Type;
    use protobuf::Message;
    let _g = serial();
    let (dir, tids) = workload_trace("perfetto", false);
    let d = dir.to_str().unwrap();
    let outdir = tmpdir("perfetto-out");
    std::fs::create_dir_all(&outdir).unwrap();
    let file = outdir.join("t.pftrace");
    let o = textpoke(&["dump", "--perfetto", "-i", d, "-o", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = PTrace::parse_from_bytes(&std::fs::read(&file).unwrap()).unwrap();
    let mut threads: HashMap<u64, i32> = HashMap::new();
    let mut process = None;
    for p in &t.packet {
        if p.has_track_descriptor() {
            let d = p.track_descriptor();
            if d.thread.is_some() {
                assert_eq!(d.parent_uuid(), process.expect("the process's track first"));
                threads.insert(d.uuid(), d.thread.tid());
            } else if d.process.is_some() {
                assert_eq!(d.process.pid(), std::process::id() as i32);
                process = Some(d.uuid());
            }
        }
    }
    assert_eq!(threads.len() as u64, THREADS);
    assert!(tids.iter().all(|t| threads.values().any(|v| v == t)));
    // Per sequence: names interned once, slices nested, one per call.
    let mut names: HashMap<(u32, u64), String> = HashMap::new();
    let mut stacks: HashMap<u32, Vec<String>> = HashMap::new();
    let mut calls = 0u64;
    let mut last_ts: HashMap<u32, u64> = HashMap::new();
    for p in t.packet.iter().filter(|p| p.has_track_event()) {
        let seq = p.trusted_packet_sequence_id();
        for n in &p.interned_data.event_names {
            assert!(names.insert((seq, n.iid()), n.name().to_string()).is_none(), "interned twice");
        }
        let e = p.track_event();
        assert!(threads.contains_key(&e.track_uuid()), "an event on a thread's track");
        let ts = last_ts.entry(seq).or_insert(0);
        assert!(p.timestamp() >= *ts, "time goes on within a sequence");
        *ts = p.timestamp();
        let stack = stacks.entry(seq).or_default();
        match e.type_() {
            Type::TYPE_SLICE_BEGIN => stack.push(names[&(seq, e.name_iid())].clone()),
            Type::TYPE_SLICE_END => {
                stack.pop().expect("an end closes a begin");
                calls += 1;
            }
            other => panic!("unexpected event type {other:?}"),
        }
    }
    assert!(stacks.values().all(|s| s.is_empty()), "every slice ends");
    assert_eq!(calls, 3 * total_outer() + THREADS);
    assert!(names.values().any(|n| n == "outer_work") && names.values().any(|n| n == "inner_leaf"));
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(outdir);
}

#[test]
fn flamegraph_svg_names_the_functions() {
    let _g = serial();
    let (dir, _) = workload_trace("flame", false);
    let d = dir.to_str().unwrap();
    let svg = ok(&["dump", "--flamegraph", "-i", d]);
    assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("outer_work") && svg.contains("inner_leaf"), "function names in the SVG");
    let folded = ok(&["dump", "--folded", "-i", d]);
    let lines: HashMap<&str, u64> = folded
        .lines()
        .map(|l| {
            let (stack, w) = l.rsplit_once(' ').unwrap();
            (stack, num(w))
        })
        .collect();
    assert!(lines["outer_work;inner_leaf"] > 0 && lines["outer_work"] > 0, "{folded}");
    let outdir = tmpdir("flame-out");
    std::fs::create_dir_all(&outdir).unwrap();
    let file = outdir.join("flame.svg");
    ok(&["dump", "--flamegraph", "-i", d, "-o", file.to_str().unwrap(), "--title", "my title"]);
    let svg2 = std::fs::read_to_string(&file).unwrap();
    assert!(svg2.contains("my title") && svg2.contains("inner_leaf"));
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(outdir);
}

#[test]
fn count_only_traces_report_calls_and_refuse_timelines() {
    let _g = serial();
    let (dir, _) = workload_trace("counts", true);
    let d = dir.to_str().unwrap();
    let csv = ok(&["report", "-i", d, "--format", "csv"]);
    let rows = csv_rows(&csv);
    assert_eq!(rows["outer_work"], [total_outer().to_string(), "".into(), "".into(), "".into(), "".into(), "".into()]);
    assert_eq!(num(&rows["inner_leaf"][0]), 2 * total_outer());
    assert_eq!(num(&rows["rare, with a comma"][0]), THREADS);
    let table = ok(&["report", "-i", d]);
    assert!(table.contains("count-only"), "{table}");
    fails(&["replay", "-i", d], &["count-only", "no function graph"]);
    fails(&["dump", "--chrome", "-i", d], &["count-only"]);
    let svg = ok(&["dump", "--flamegraph", "-i", d]);
    assert!(svg.contains("outer_work") && svg.contains("calls"));
    let _ = std::fs::remove_dir_all(dir);
}

fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

#[test]
fn a_forked_childs_calls_are_reported_apart() {
    let _g = serial();
    let dir = tmpdir("fork");
    let fp = record::register_function(0x7400, "parent_only");
    let fc = record::register_function(0x7500, "child_only");
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    for _ in 0..10 {
        assert!(record::entry(fp, 0) && record::exit(fp, 0));
    }
    // SAFETY: the child only records, stops its session and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut code = 0;
        for _ in 0..7 {
            if !(record::entry(fc, 0) && record::exit(fc, 0)) {
                code = 2;
            }
        }
        if rec.stop().is_err() {
            code = 3;
        }
        // SAFETY: leave without running the test harness's exit path.
        unsafe { libc::_exit(code) };
    }
    for _ in 0..5 {
        assert!(record::entry(fp, 0) && record::exit(fp, 0));
    }
    assert_eq!(wait_child(pid), 0);
    rec.stop().unwrap();
    let d = dir.to_str().unwrap();
    let me = std::process::id().to_string();
    let child = pid.to_string();

    let table = ok(&["report", "-i", d]);
    let (parent_part, child_part) = table.split_once("# forked child").expect(&table);
    assert!(parent_part.contains("parent_only") && !parent_part.contains("child_only"), "{table}");
    assert!(child_part.contains("child_only") && !child_part.contains("parent_only"), "{table}");
    assert!(child_part.contains(&format!("forked from pid {me}")), "{table}");

    let csv = ok(&["report", "-i", d, "--format", "csv", "--pid", &child]);
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 1);
    assert_eq!(num(&rows["child_only"][0]), 7);
    let rows = csv_rows(&ok(&["report", "-i", d, "--format", "csv", "--pid", &me]));
    assert_eq!(num(&rows["parent_only"][0]), 15);
    fails(&["report", "-i", d, "--pid", "1"], &["no process 1", &child]);

    let json: serde_json::Value = serde_json::from_str(&ok(&["report", "-i", d, "--format", "json"])).unwrap();
    assert_eq!(json["processes"][1]["pid"].as_i64(), Some(pid as i64));
    assert_eq!(json["processes"][1]["parent_pid"].as_i64(), Some(me.parse().unwrap()));

    let replay = ok(&["replay", "-i", d]);
    assert!(replay.contains(&format!("[pid {child}], forked from pid {me}")), "{replay}");
    let v: serde_json::Value = serde_json::from_str(&ok(&["dump", "--chrome", "-i", d])).unwrap();
    let ev = v["traceEvents"].as_array().unwrap();
    let in_child = ev.iter().filter(|e| e["ph"] == "X" && e["pid"].as_i64() == Some(pid as i64)).count();
    assert_eq!(in_child, 7);
    assert!(ev
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == "child_only")
        .all(|e| e["pid"].as_i64() == Some(pid as i64)));
    let folded = ok(&["dump", "--folded", "-i", d]);
    assert!(folded.lines().all(|l| l.contains("[pid ")), "each process its own tower: {folded}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unbalanced_and_deeply_recursive_records() {
    let _g = serial();
    let dir = tmpdir("unbalanced");
    let (outside, g, h, k, rec_fn) = (
        record::register_function(0x7800, "entered_before_start"),
        record::register_function(0x7810, "caller_g"),
        record::register_function(0x7820, "lost_exit_h"),
        record::register_function(0x7830, "never_returns_k"),
        record::register_function(0x7840, "recurse"),
    );
    const DEPTH: u32 = 3000;
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    let tid = std::thread::spawn(move || {
        // The recording starts inside `entered_before_start`.
        assert!(record::exit(outside, 0));
        for d in 0..DEPTH {
            assert!(record::entry(rec_fn, d));
        }
        for d in (0..DEPTH).rev() {
            assert!(record::exit(rec_fn, d));
        }
        // h's exit is lost: g's exit closes it.
        assert!(record::entry(g, 0) && record::entry(h, 1) && record::exit(g, 0));
        // k never returns before the recording stops.
        assert!(record::entry(k, 0));
        // SAFETY: no arguments.
        unsafe { libc::syscall(libc::SYS_gettid) as i32 }
    })
    .join()
    .unwrap();
    rec.stop().unwrap();
    let d = dir.to_str().unwrap();

    let rows = csv_rows(&ok(&["report", "-i", d, "--format", "csv"]));
    assert!(!rows.contains_key("entered_before_start"), "an exit without entry is no call");
    assert_eq!(num(&rows["recurse"][0]), DEPTH as u64);
    assert_eq!(num(&rows["lost_exit_h"][0]), 1);
    assert_eq!(num(&rows["never_returns_k"][0]), 1);
    // Recursion is not counted twice in the total: the outermost call holds all.
    assert_eq!(num(&rows["recurse"][1]), num(&rows["recurse"][5]), "total = longest (outermost) call");
    let table = ok(&["report", "-i", d]);
    assert!(table.contains("1 unfinished") && table.contains("1 exit(s) lost"), "{table}");
    assert!(table.contains("1 exit(s) without an entry ignored"), "{table}");

    let replay = ok(&["replay", "-i", d]);
    let secs = sections(&replay);
    let (opened, leaves) = check_balanced(&secs[&tid]);
    assert_eq!((opened, leaves), (DEPTH as usize, 3), "{replay}"); // recurse x(DEPTH-1) + caller_g; leaves: innermost recurse, h, k
    let marked = |mark: &str, call: &str| {
        replay.lines().any(|l| l.trim_start().starts_with(mark) && l.ends_with(&format!("| {call}")))
    };
    assert!(marked("<", "  lost_exit_h();"), "exit lost: an upper bound, '<'\n{replay}");
    assert!(marked(">", "never_returns_k();"), "unfinished: a lower bound, '>'\n{replay}");

    let v: serde_json::Value = serde_json::from_str(&ok(&["dump", "--chrome", "-i", d])).unwrap();
    let x: Vec<_> = v["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").cloned().collect();
    assert_eq!(x.len(), DEPTH as usize + 3);
    assert_eq!(x.iter().filter(|e| e["args"]["unfinished"] == true).count(), 1);
    assert_eq!(x.iter().filter(|e| e["args"]["exit_lost"] == true).count(), 1);
    let folded = ok(&["dump", "--folded", "-i", d]);
    let deepest = folded.lines().map(|l| l.matches(';').count()).max().unwrap();
    assert_eq!(deepest, DEPTH as usize - 1);
    let svg = ok(&["dump", "--flamegraph", "-i", d]);
    assert!(svg.contains("recurse"));
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// Bad input.

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn thread_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .unwrap()
}

fn edit_meta(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("meta.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Every command on the damaged trace `dir` fails with `needles` in its
/// message and writes no output file.
fn every_command_fails(dir: &Path, needles: &[&str]) {
    let d = dir.to_str().unwrap();
    let out = dir.with_extension("out.json");
    std::fs::write(&out, "previous contents").unwrap();
    for args in [
        vec!["report", "-i", d],
        vec!["report", "-i", d, "--format", "csv"],
        vec!["report", "-i", d, "--format", "json"],
        vec!["replay", "-i", d],
        vec!["dump", "--chrome", "-i", d],
        vec!["dump", "--flamegraph", "-i", d],
        vec!["dump", "--chrome", "-i", d, "-o", out.to_str().unwrap()],
        vec!["list", "-i", d],
    ] {
        fails(&args, needles);
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous contents", "a failed dump -o leaves FILE alone");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn damaged_traces_are_refused_with_the_file_named() {
    let _g = serial();
    let (good, _) = workload_trace("good", false);
    let case = |name: &str| {
        let d = tmpdir(name);
        copy_dir(&good, &d);
        d
    };

    let missing = tmpdir("missing");
    every_command_fails(&missing, &["does not exist"]);

    let file = tmpdir("plainfile");
    std::fs::write(&file, "x").unwrap();
    every_command_fails(&file, &["is not a directory"]);

    let empty = tmpdir("empty");
    std::fs::create_dir_all(&empty).unwrap();
    every_command_fails(&empty, &["meta.json is missing"]);

    let d = case("badjson");
    std::fs::write(d.join("meta.json"), "{\"format\": \"textpoke-trace\", ").unwrap();
    every_command_fails(&d, &["meta.json", "not valid JSON"]);

    let d = case("nosymbols");
    std::fs::remove_file(d.join("symbols.jsonl")).unwrap();
    every_command_fails(&d, &["symbols.jsonl is missing"]);

    let d = case("truncated");
    let f = thread_file(&d);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 8 * 3).unwrap();
    let name = f.file_name().unwrap().to_str().unwrap().to_string();
    every_command_fails(&d, &[&name, "truncated"]);

    let d = case("partial");
    let f = thread_file(&d);
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 5).unwrap();
    every_command_fails(&d, &[f.file_name().unwrap().to_str().unwrap(), "truncated"]);

    let d = case("flipped");
    let f = thread_file(&d);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[32 + 8 * 6 + 1] ^= 0x40; // a depth bit of an event: only the checksum sees it
    std::fs::write(&f, bytes).unwrap();
    every_command_fails(&d, &[f.file_name().unwrap().to_str().unwrap(), "checksum"]);

    let d = case("badkind");
    let f = thread_file(&d);
    let mut bytes = std::fs::read(&f).unwrap();
    // Word 5 (after the 4-word sync record and one event) made a special
    // record of type 0.
    bytes[32 + 8 * 5..32 + 8 * 6].copy_from_slice(&[0; 8]);
    std::fs::write(&f, bytes).unwrap();
    every_command_fails(&d, &[f.file_name().unwrap().to_str().unwrap(), "word 5 is corrupt", "type 0"]);

    let d = case("badmagic");
    let f = thread_file(&d);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[0] = b'X';
    std::fs::write(&f, bytes).unwrap();
    every_command_fails(&d, &["bad header", "magic"]);

    let d = case("notatrace");
    edit_meta(&d, |m| m["format"] = "something-else".into());
    every_command_fails(&d, &["is not a textpoke trace"]);

    let d = case("version");
    edit_meta(&d, |m| m["version"] = 99.into());
    every_command_fails(&d, &["version 99"]);

    // Incomplete: refused with the way out, and --salvage reads it.
    let d = case("incomplete");
    edit_meta(&d, |m| m["complete"] = false.into());
    every_command_fails(&d, &["incomplete", "--salvage"]);
    let dd = d.to_str().unwrap();
    let o = textpoke(&["report", "-i", dd, "--salvage", "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("incomplete"), "the salvage is said: {}", stderr(&o));
    assert_eq!(num(&csv_rows(&stdout(&o))["outer_work"][0]), total_outer());

    // Unwritable output: the error names it, nothing is written.
    let gd = good.to_str().unwrap();
    fails(&["dump", "--chrome", "-i", gd, "-o", "/nonexistent-dir/x.json"], &["/nonexistent-dir/x.json"]);
    fails(&["dump", "--chrome", "-i", gd, "-o", gd], &["is a directory"]);
    // A failing conversion with -o (count-only has no timeline) leaves no file.
    let (counts, _) = workload_trace("counts-o", true);
    let target = counts.with_extension("json");
    fails(&["dump", "--chrome", "-i", counts.to_str().unwrap(), "-o", target.to_str().unwrap()], &["count-only"]);
    assert!(!target.exists());
    let _ = std::fs::remove_dir_all(good);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["dump"],
        vec!["dump", "--chrome", "--flamegraph"],
        vec!["report", "--sort", "name"],
        vec!["report", "--format", "xml"],
        vec!["replay", "--tid", "abc"],
        vec!["list", "-i", "x", "prog"],
    ] {
        let o = textpoke(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    for cmd in ["report", "replay", "dump", "list"] {
        let help = ok(&[cmd, "--help"]);
        assert!(help.contains("-i, --input <DIR>"), "{cmd}: {help}");
    }
    let help = ok(&["report", "--help"]);
    assert!(help.contains("function,calls,total_ns,self_ns,avg_ns,min_ns,max_ns"));
}

#[test]
fn no_progress_bar_when_piped() {
    let _g = serial();
    // 4 threads x 40000 calls x 2 records: a replay of megabytes.
    let dir = tmpdir("big");
    let f = record::register_function(0x7600, "big_leaf");
    let rec = record::start(RecorderConfig::new(&dir)).unwrap();
    let hs: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..40_000 {
                    record::entry(f, 0);
                    record::exit(f, 0);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let s = rec.stop().unwrap();
    assert!(s.events >= 1 << 18, "{s:?}");
    let o = textpoke(&["dump", "--chrome", "-i", dir.to_str().unwrap(), "-o", dir.join("t.json").to_str().unwrap()]);
    assert!(o.status.success());
    assert!(o.stderr.is_empty(), "nothing on a piped stderr: {:?}", stderr(&o));
    // On a terminal (script(1) gives one), the bar is drawn on stderr once
    // the command has run for a second: here a reader that waits two
    // seconds before it reads holds the replay up.
    let script = Path::new("/usr/bin/script");
    if script.exists() {
        let cmd = format!(
            "{} replay -i {} | (sleep 2; cat > /dev/null)",
            env!("CARGO_BIN_EXE_textpoke"),
            dir.to_str().unwrap()
        );
        let o = Command::new(script).args(["-qec", &cmd, "/dev/null"]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let tty = stdout(&o);
        assert!(tty.contains("records"), "progress bar on the terminal: {tty:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// list

#[test]
fn list_a_traces_functions() {
    let _g = serial();
    let (dir, _) = workload_trace("list", false);
    let out = ok(&["list", "-i", dir.to_str().unwrap()]);
    for (addr, name) in [("0x000000007000", "outer_work"), ("0x000000007100", "inner_leaf")] {
        assert!(out.lines().any(|l| l == format!("{addr}  {name}")), "{out}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn cc(name: &str, src: &str, flags: &[&str]) -> PathBuf {
    cc_with("gcc", name, src, flags)
}

/// `cc` with another compiler (clang: installed by `.ci/run`).
fn cc_with(compiler: &str, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let dir = tmpdir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join("prog.c");
    std::fs::write(&c, src).unwrap();
    let exe = dir.join("prog");
    let o = Command::new(compiler).args(flags).arg("-O1").arg("-o").arg(&exe).arg(&c).output().unwrap();
    assert!(o.status.success(), "{compiler}: {}", String::from_utf8_lossy(&o.stderr));
    exe
}

const PROG: &str = r#"
#include <stdio.h>
static int counter;
__attribute__((noinline)) static void bump(int i) { counter += i; }
__attribute__((noinline)) int work(int n) { for (int i = 0; i < n; i++) bump(i); return counter; }
int main(int argc, char **argv) { (void)argv; printf("%d\n", work(argc * 10)); return 0; }
"#;

fn listed(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "{l}");
            (f[1].to_string(), f[2].to_string(), f[3].to_string())
        })
        .collect()
}

#[test]
fn list_a_programs_patchable_functions() {
    for (name, flags, kind, form) in [
        ("pie", vec!["-fpatchable-function-entry=5"], "patchable", "nop1x5"),
        ("nopie", vec!["-fpatchable-function-entry=5", "-no-pie", "-fcf-protection=none"], "patchable", "nop1x5"),
        ("prefix", vec!["-fpatchable-function-entry=8,3", "-fcf-protection=full"], "patchable", "nop1x5"),
        ("mcount", vec!["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"], "mcount", "nop5"),
    ] {
        let exe = cc(&format!("list-{name}"), PROG, &flags);
        let o = textpoke(&["list", exe.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got = listed(&stdout(&o));
        for f in ["main", "work", "bump"] {
            assert!(
                got.iter().any(|(k, fm, n)| n == f && k == kind && fm == form),
                "{name}: {f} not listed as {kind} {form}: {got:?}"
            );
        }
        assert!(stderr(&o).contains("0 record(s) skipped"), "{name}: {}", stderr(&o));
    }
    // clang's patchable entry is one 5-byte NOP of its own (0f 1f 44 00 08).
    let exe = cc_with("clang", "list-clang", PROG, &["-fpatchable-function-entry=5"]);
    let got = listed(&ok(&["list", exe.to_str().unwrap()]));
    for f in ["main", "work", "bump"] {
        assert!(got.iter().any(|(k, fm, n)| n == f && k == "patchable" && fm == "nop5"), "clang: {f}: {got:?}");
    }
    // Records that are no site: `--skipped` says why, even when none is one.
    let short = cc("list-short", PROG, &["-fpatchable-function-entry=3"]);
    let o = textpoke(&["list", "--skipped", short.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("none of its"), "{}", stderr(&o));
    let why: Vec<String> = stdout(&o).lines().filter(|l| l.starts_with("# skipped")).map(String::from).collect();
    assert!(why.iter().any(|l| l.contains("(work)") && l.contains("only 3 NOP bytes")), "{}", stdout(&o));
    // No patchable entries: say which flags add them.
    let plain = cc("list-plain", PROG, &[]);
    fails(&["list", plain.to_str().unwrap()], &["has no patchable function entries", "-fpatchable-function-entry=5"]);
    // Not found, not ELF, a directory.
    fails(&["list", "/nonexistent/prog"], &["/nonexistent/prog", "No such file"]);
    fails(&["list", "no-such-program-anywhere"], &["no-such-program-anywhere not found", "PATH"]);
    let text = plain.with_file_name("prog.c");
    fails(&["list", text.to_str().unwrap()], &["prog.c", "ELF"]);
    fails(&["list", plain.parent().unwrap().to_str().unwrap()], &["is a directory"]);
    // A bare name is looked up in PATH.
    let o = Command::new(env!("CARGO_BIN_EXE_textpoke"))
        .args(["list", "prog"])
        .env("PATH", plain.parent().unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("has no patchable function entries"), "{}", stderr(&o));
}

/// A Rust function marked for the tracer: its entry and exit sites are in
/// this test binary's `textpoke_sites` section.
#[textpoke::traced]
#[inline(never)]
fn marked_for_listing(x: u64) -> u64 {
    std::hint::black_box(x) * 3
}

#[test]
fn list_a_rust_programs_traced_functions() {
    assert_eq!(marked_for_listing(2), 6);
    let me = std::env::current_exe().unwrap();
    let out = ok(&["list", me.to_str().unwrap()]);
    let got = listed(&out);
    let mine: Vec<_> = got.iter().filter(|(_, _, n)| n.ends_with("marked_for_listing")).collect();
    assert!(mine.iter().any(|(k, f, _)| k == "traced-entry" && f == "nop5"), "{out}");
    assert!(mine.iter().any(|(k, f, _)| k == "traced-exit" && f == "nop5"), "{out}");
}
