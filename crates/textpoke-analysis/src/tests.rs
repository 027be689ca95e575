//! Unit tests on hand-made record sequences, and on hand-written trace
//! directories whose records are exactly what each test needs (nesting,
//! self time, unbalanced records, recursion, depth jumps).

use super::*;
use textpoke_record::format::{
    self, BufferInfo, ClockInfo, ClockSource, CountsFile, FullPolicy, Meta, Mode, Symbol, ThreadMeta,
    UnattributedDrops, KIND_ENTRY, KIND_EXIT,
};
use textpoke_record::tracedata::{Record, RecordKind};
use textpoke_record::FuncId;

/// One tick is one nanosecond.
fn ns_clock() -> ClockInfo {
    ClockInfo::identity(ClockSource::Monotonic)
}

fn en(f: u32, depth: u32, ts: u64) -> Record {
    Record { kind: RecordKind::Entry, func: FuncId(f), tid: 1, ts, depth, value: None, lost: 0 }
}

fn ex(f: u32, depth: u32, ts: u64) -> Record {
    Record { kind: RecordKind::Exit, func: FuncId(f), tid: 1, ts, depth, value: None, lost: 0 }
}

/// A gap: `lost` events lost after `ts`, resuming at `depth`.
fn gap(lost: u64, depth: u32, ts: u64) -> Record {
    Record { kind: RecordKind::Gap, func: FuncId(0), tid: 1, ts, depth, value: None, lost }
}

fn rebuild(recs: &[Record]) -> Vec<Event> {
    let clock = ns_clock();
    let mut rb = Rebuilder::new(&clock);
    let mut out = Vec::new();
    for r in recs {
        rb.push(r, &mut |e| out.push(e));
    }
    rb.finish(&mut |e| out.push(e));
    assert_eq!(rb.level(), 0);
    out
}

fn leaves(events: &[Event]) -> Vec<Call> {
    events.iter().filter_map(|e| if let Event::Leave(c) = e { Some(*c) } else { None }).collect()
}

/// Every Leave closes the most recent open Enter.
fn assert_nested(events: &[Event]) {
    let mut stack = Vec::new();
    let mut base = 0;
    for e in events {
        match e {
            Event::Enter { func, level, .. } => {
                base = base.min(*level);
                if stack.is_empty() {
                    base = *level;
                }
                assert_eq!(*level, base + stack.len());
                stack.push(*func);
            }
            Event::Leave(c) => {
                assert_eq!(stack.pop(), Some(c.func), "{events:?}");
                assert_eq!(c.level, base + stack.len());
            }
            Event::OrphanExit { .. } | Event::Cut { .. } => {}
            Event::Gap { level, .. } => {
                assert!(stack.is_empty(), "a gap closes every open call: {events:?}");
                stack.clear();
                base = *level;
            }
        }
    }
    assert!(stack.is_empty());
}

#[test]
fn nesting_and_self_time() {
    // a { b { c(); } d(); }   times in ns
    let recs = [
        en(0, 0, 100),
        en(1, 1, 110),
        en(2, 2, 120),
        ex(2, 2, 150),
        ex(1, 1, 170),
        en(3, 1, 200),
        ex(3, 1, 260),
        ex(0, 0, 300),
    ];
    let ev = rebuild(&recs);
    assert_nested(&ev);
    let calls = leaves(&ev);
    let by = |f: u32| *calls.iter().find(|c| c.func == FuncId(f)).unwrap();
    assert_eq!((by(2).total_ns, by(2).self_ns, by(2).level), (30, 30, 2));
    assert_eq!((by(1).total_ns, by(1).self_ns), (60, 30));
    assert_eq!((by(3).total_ns, by(3).self_ns), (60, 60));
    assert_eq!((by(0).total_ns, by(0).self_ns), (200, 200 - 60 - 60));
    assert!(calls.iter().all(|c| c.closed == Closed::Returned));
}

#[test]
fn orphan_exits_are_ignored_and_open_entries_closed_at_the_end() {
    // Starts inside x (exit without entry), ends inside y.
    let recs = [
        ex(9, 3, 10),
        en(0, 2, 20),
        ex(0, 2, 30),
        ex(8, 1, 40),
        en(1, 1, 50),
        en(2, 2, 60),
        ex(2, 2, 65),
        en(3, 2, 70),
    ];
    let ev = rebuild(&recs);
    assert_nested(&ev);
    let orphans: Vec<_> =
        ev.iter().filter_map(|e| if let Event::OrphanExit { func, .. } = e { Some(func.0) } else { None }).collect();
    assert_eq!(orphans, [9, 8]);
    let calls = leaves(&ev);
    assert_eq!(calls.len(), 4);
    let y = calls.iter().find(|c| c.func == FuncId(1)).unwrap();
    let z = calls.iter().find(|c| c.func == FuncId(3)).unwrap();
    assert_eq!((y.closed, y.end, y.total_ns, y.self_ns), (Closed::Unfinished, 70, 20, 20 - 5));
    assert_eq!((z.closed, z.total_ns), (Closed::Unfinished, 0));
    assert_eq!(calls.iter().filter(|c| c.closed == Closed::Returned).count(), 2);
}

#[test]
fn lost_exits_are_closed_at_the_callers_exit() {
    // a { b { c { (c's and b's exits lost) } a returns.
    let recs = [en(0, 0, 0), en(1, 1, 10), en(2, 2, 20), ex(0, 0, 100)];
    let calls = leaves(&rebuild(&recs));
    let closed: Vec<_> = calls.iter().map(|c| (c.func.0, c.closed, c.end)).collect();
    assert_eq!(closed, [(2, Closed::ExitLost, 100), (1, Closed::ExitLost, 100), (0, Closed::Returned, 100)]);
    assert_eq!(calls[2].self_ns, 10);
}

#[test]
fn recursion_matches_by_depth() {
    // f(0) { f(1) { f(2) {} } } with the exit of f(1) lost: f(0)'s exit at
    // depth 0 closes f(0), not the innermost f.
    let recs = [en(0, 0, 0), en(0, 1, 10), en(0, 2, 20), ex(0, 2, 30), ex(0, 0, 100)];
    let calls = leaves(&rebuild(&recs));
    let got: Vec<_> = calls.iter().map(|c| (c.level, c.closed, c.total_ns)).collect();
    assert_eq!(got, [(2, Closed::Returned, 10), (1, Closed::ExitLost, 90), (0, Closed::Returned, 100)]);
}

#[test]
fn depth_jumps_do_not_break_nesting() {
    // Depths recorded as 0, 7, 9 (another op's traced frames in between
    // count too): deeper entries nest, whatever the jump.
    let recs = [en(0, 0, 0), en(1, 7, 10), en(2, 9, 20), ex(2, 9, 30), ex(1, 7, 40), ex(0, 0, 50)];
    let ev = rebuild(&recs);
    assert_nested(&ev);
    let calls = leaves(&ev);
    assert!(calls.iter().all(|c| c.closed == Closed::Returned), "{calls:?}");
    assert_eq!(calls.iter().map(|c| c.level).collect::<Vec<_>>(), [2, 1, 0]);
}

#[test]
fn an_entry_at_a_lower_depth_closes_the_deeper_calls() {
    // main { a { b { (longjmp back into main) c(); } } }: c at depth 1
    // ends a and b, whose exits never come.
    let recs = [en(0, 0, 0), en(1, 1, 10), en(2, 2, 20), en(3, 1, 30), ex(3, 1, 35), ex(0, 0, 50)];
    let ev = rebuild(&recs);
    assert_nested(&ev);
    let got: Vec<_> = leaves(&ev).iter().map(|c| (c.func.0, c.level, c.closed, c.end)).collect();
    assert_eq!(
        got,
        [
            (2, 2, Closed::ExitLost, 30),
            (1, 1, Closed::ExitLost, 30),
            (3, 1, Closed::Returned, 35),
            (0, 0, Closed::Returned, 50)
        ]
    );
}

#[test]
fn a_gap_is_a_hard_break() {
    // main { a { gap (events lost) } } then, at depth 2: b() and exits of
    // callers that are not known. Nothing spans the gap.
    let recs = [en(0, 0, 0), en(1, 1, 10), gap(40, 2, 15), en(2, 2, 900), ex(2, 2, 910), ex(1, 1, 950), ex(0, 0, 990)];
    let ev = rebuild(&recs);
    assert_nested(&ev);
    let calls = leaves(&ev);
    let got: Vec<_> = calls.iter().map(|c| (c.func.0, c.level, c.closed, c.total_ns)).collect();
    assert_eq!(got, [(1, 1, Closed::Gap, 0), (0, 0, Closed::Gap, 0), (2, 2, Closed::Returned, 10)]);
    assert!(ev.contains(&Event::Gap { lost: 40, ts: 15, level: 2 }));
    let orphans: Vec<_> = ev.iter().filter(|e| matches!(e, Event::OrphanExit { after_gap: true, .. })).collect();
    assert_eq!(orphans.len(), 2, "a's and main's exits: their entries are before the gap");
}

// ---------------------------------------------------------------------------
// Hand-written trace directories.

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("textpoke-analysis-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn raw(kind: u8, func: u32, depth: u32, ts: u64) -> format::Event {
    format::Event { kind, func, depth, ts, value: None }
}

/// Writes a valid trace directory: `names` are the symbols, `threads` the
/// events of each thread, `counts` makes it count-only (else the counts
/// are the entries).
fn write_trace(
    dir: &std::path::Path,
    pid: i32,
    names: &[&str],
    threads: &[(i32, Vec<format::Event>)],
    counts: Option<Vec<(u32, u64)>>,
) {
    let mut symbols = String::new();
    for (i, n) in names.iter().enumerate() {
        let s = Symbol { id: i as u32, addr: 0x1000 + 16 * i as u64, name: n.to_string() };
        symbols.push_str(&serde_json::to_string(&s).unwrap());
        symbols.push('\n');
    }
    std::fs::write(dir.join(format::SYMBOLS_FILE), symbols).unwrap();
    let mut tmetas = Vec::new();
    let mut entered = std::collections::BTreeMap::new();
    for (tid, events) in threads {
        let file = if counts.is_some() { None } else { Some(format!("tid-{tid}.bin")) };
        let mut enc = format::Encoder::new();
        for e in events {
            enc.event(e);
            if e.kind == KIND_ENTRY {
                *entered.entry(e.func).or_insert(0u64) += 1;
            }
        }
        let h = enc.words().iter().fold(format::CHECKSUM_SEED, |h, &w| format::checksum_step(h, w));
        if let Some(f) = &file {
            let mut bytes = format::thread_header(*tid).to_vec();
            bytes.extend(enc.bytes());
            std::fs::write(dir.join(f), bytes).unwrap();
        }
        let entries = events.iter().filter(|r| r.kind == KIND_ENTRY).count() as u64;
        tmetas.push(ThreadMeta {
            tid: *tid,
            words: if file.is_some() { enc.words().len() as u64 } else { 0 },
            file,
            entries,
            exits: events.len() as u64 - entries,
            lost: 0,
            dropped_nested: 0,
            dropped_range: 0,
            calls: entries,
            first_ts: events.first().map_or(0, |e| e.ts),
            last_ts: events.last().map_or(0, |e| e.ts),
            checksum: format!("{h:016x}"),
            exited: true,
        });
    }
    let calls = counts.unwrap_or_else(|| entered.into_iter().collect());
    if threads.iter().all(|(_, e)| e.is_empty()) {
        let total: u64 = calls.iter().map(|c| c.1).sum();
        if let Some(t) = tmetas.first_mut() {
            t.calls = total;
        }
    }
    let meta = Meta {
        format: format::FORMAT_NAME.into(),
        version: format::FORMAT_VERSION,
        complete: true,
        mode: if tmetas.iter().all(|t| t.file.is_none()) { Mode::Count } else { Mode::Record },
        pid,
        parent_pid: None,
        process_name: "handmade".into(),
        exe: None,
        clock: ns_clock(),
        start_unix_ns: 0,
        start_ts: 0,
        end_ts: Some(1000),
        buffers: BufferInfo {
            segment_bytes: 8192,
            thread_limit: 1 << 20,
            memory_limit: 1 << 20,
            policy: FullPolicy::Discard,
            peak_bytes: 0,
        },
        max_functions: 64,
        total_events: tmetas.iter().map(|t| t.entries + t.exits).sum(),
        total_calls: tmetas.iter().map(|t| t.calls).sum(),
        threads: tmetas,
        unattributed_drops: UnattributedDrops::default(),
        unattributed_calls: 0,
        total_dropped: 0,
        ended_by: None,
    };
    std::fs::write(dir.join(format::COUNTS_FILE), serde_json::to_vec(&CountsFile { calls }).unwrap()).unwrap();
    std::fs::write(dir.join(format::META_FILE), serde_json::to_vec(&meta).unwrap()).unwrap();
}

fn open(dir: &std::path::Path) -> TraceSet {
    TraceSet::open(dir, Default::default()).unwrap()
}

fn stats<'a>(r: &'a ProcessReport, name: &str) -> &'a FunctionStats {
    r.functions.iter().find(|f| f.function == name).unwrap_or_else(|| panic!("{name} not in {r:?}"))
}

fn recursive_trace(name: &str) -> std::path::PathBuf {
    let dir = tmp(name);
    let (e, x) = (KIND_ENTRY, KIND_EXIT);
    // Thread 10: main { fact { fact { fact(); } } leaf(); }
    // Thread 11: starts inside something (orphan exit), leaf(), ends inside main.
    let t10 = vec![
        raw(e, 0, 0, 0),
        raw(e, 1, 1, 10),
        raw(e, 1, 2, 20),
        raw(e, 1, 3, 30),
        raw(x, 1, 3, 40),
        raw(x, 1, 2, 60),
        raw(x, 1, 1, 100),
        raw(e, 2, 1, 110),
        raw(x, 2, 1, 115),
        raw(x, 0, 0, 200),
    ];
    let t11 = vec![raw(x, 0, 0, 5), raw(e, 2, 0, 10), raw(x, 2, 0, 13), raw(e, 0, 0, 20), raw(e, 2, 1, 30)];
    write_trace(&dir, 10, &["main", "fact", "leaf", "never_called"], &[(10, t10), (11, t11)], None);
    dir
}

#[test]
fn report_of_recursion_and_unbalanced_threads() {
    let dir = recursive_trace("report");
    let set = open(&dir);
    let mut seen = 0;
    let r = report(&set, &ReportOptions { sort: SortKey::Calls }, &mut |n| seen += n).unwrap();
    assert_eq!(seen, set.total_words());
    assert_eq!(r.processes.len(), 1);
    let p = &r.processes[0];
    assert_eq!(p.functions.iter().map(|f| f.function.as_str()).collect::<Vec<_>>(), ["fact", "leaf", "main"]);
    let fact = stats(p, "fact");
    // Activations of 90, 40 and 10 ns; the outer one holds the others.
    assert_eq!(fact.calls, 3);
    assert_eq!(fact.times, Some(Times { total_ns: 90, self_ns: 90, avg_ns: 140 / 3, min_ns: 10, max_ns: 90 }));
    let leaf = stats(p, "leaf");
    // 5 ns on thread 10, 3 ns on 11, and one unfinished (closed at 30: 0 ns).
    assert_eq!((leaf.calls, leaf.unfinished), (3, 1));
    assert_eq!(leaf.times.unwrap().total_ns, 8);
    assert_eq!(leaf.times.unwrap().min_ns, 0);
    let main = stats(p, "main");
    assert_eq!((main.calls, main.unfinished), (2, 1));
    let mt = main.times.unwrap();
    assert_eq!(mt.total_ns, 200 + 10);
    assert_eq!(mt.self_ns, (200 - 90 - 5) + 10);
    let t11 = p.threads.iter().find(|t| t.tid == 11).unwrap();
    assert_eq!((t11.orphan_exits, t11.unfinished, t11.calls, t11.max_level), (1, 2, 3, 2));
    // Sort keys.
    let r = report(&set, &ReportOptions { sort: SortKey::Total }, &mut |_| {}).unwrap();
    assert_eq!(r.processes[0].functions[0].function, "main");
    let r = report(&set, &ReportOptions { sort: SortKey::Max }, &mut |_| {}).unwrap();
    assert_eq!(
        r.processes[0].functions.iter().map(|f| f.function.as_str()).collect::<Vec<_>>(),
        ["main", "fact", "leaf"]
    );
    let r = report(&set, &ReportOptions { sort: SortKey::SelfTime }, &mut |_| {}).unwrap();
    assert_eq!(r.processes[0].functions[0].function, "main"); // 115 > 90 > 8
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["processes"][0]["functions"][1]["function"], "fact");
    assert_eq!(json["processes"][0]["functions"][1]["total_ns"], 90);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn replay_is_balanced_and_marks_leaves() {
    let dir = recursive_trace("replay");
    let set = open(&dir);
    let mut out = Vec::new();
    replay(&set, &ReplayOptions { tid: Some(10), ..Default::default() }, &mut out, &mut |_| {}).unwrap();
    let text = String::from_utf8(out).unwrap();
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let expect = [
        "              | main() {",
        "              |   fact() {",
        "              |     fact() {",
        "     0.010 us |       fact();",
        "     0.040 us |     } /* fact */",
        "     0.090 us |   } /* fact */",
        "     0.005 us |   leaf();",
        "     0.200 us | } /* main */",
    ];
    assert_eq!(body, expect, "{text}");
    assert!(!text.contains("thread 11"));
    let mut out = Vec::new();
    replay(&set, &ReplayOptions::default(), &mut out, &mut |_| {}).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("# 1 exit(s) without an entry ignored"), "{text}");
    assert!(text.contains("    >0.010 us | } /* main */"), "{text}");
    assert!(text.contains("    >0.000 us |   leaf();"), "{text}");
    assert_eq!(text.matches(") {").count(), text.matches("} /*").count());
    let e =
        replay(&set, &ReplayOptions { tid: Some(99), ..Default::default() }, &mut Vec::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, AnalysisError::NoSuchThread { tid: 99, .. }), "{e}");
    assert!(e.to_string().contains("10, 11"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn chrome_events_and_folded_stacks() {
    let dir = recursive_trace("chrome");
    let set = open(&dir);
    let mut out = Vec::new();
    let n = chrome(&set, &mut out, &mut |_| {}).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let x: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(x.len() as u64, n);
    assert_eq!(n, 5 + 3);
    let main10 = x.iter().find(|e| e["name"] == "main" && e["tid"] == 10).unwrap();
    assert_eq!((main10["ts"].as_f64(), main10["dur"].as_f64()), (Some(0.0), Some(0.2)));
    assert_eq!(x.iter().filter(|e| e["args"]["unfinished"] == true).count(), 2);
    let names: Vec<_> = events.iter().filter(|e| e["name"] == "thread_name").collect();
    assert_eq!(names.len(), 2);

    let (folded, unit) = folded(&set, &mut |_| {}).unwrap();
    assert_eq!(unit, "ns");
    let mut lines: Vec<&str> = folded.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["main 115", "main;fact 50", "main;fact;fact 30", "main;fact;fact;fact 10", "main;leaf 5", "leaf 3"]
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    let mut svg = Vec::new();
    flamegraph(&set, &FlameOptions::default(), &mut svg, &mut |_| {}).unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
    assert!(svg.contains("fact") && svg.contains("main"));
    // The root frame is labelled (inferno leaves it blank), and so is its
    // title, which the SVG's script shows there after a zoom.
    assert!(svg.contains(">all: handmade [pid 10]</text>"), "{svg}");
    assert!(svg.contains("<title>all: handmade [pid 10] (213 ns, 100%)</title>"), "{svg}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn count_only_reports_calls_and_refuses_timelines() {
    let dir = tmp("counts");
    write_trace(&dir, 20, &["a", "b", "c"], &[(20, vec![]), (21, vec![])], Some(vec![(0, 5), (2, 12)]));
    let set = open(&dir);
    let r = report(&set, &ReportOptions { sort: SortKey::Total }, &mut |_| {}).unwrap();
    let p = &r.processes[0];
    let got: Vec<_> = p.functions.iter().map(|f| (f.function.as_str(), f.calls, f.times)).collect();
    assert_eq!(got, [("c", 12, None), ("a", 5, None)]);
    assert_eq!(p.calls, 17);
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["processes"][0]["functions"][0]["total_ns"].is_null());
    assert!(matches!(
        replay(&set, &ReplayOptions::default(), &mut Vec::new(), &mut |_| {}),
        Err(AnalysisError::CountOnly { .. })
    ));
    assert!(matches!(chrome(&set, &mut Vec::new(), &mut |_| {}), Err(AnalysisError::CountOnly { .. })));
    let (folded, unit) = folded(&set, &mut |_| {}).unwrap();
    assert_eq!(unit, "calls");
    let mut lines: Vec<&str> = folded.lines().collect();
    lines.sort();
    assert_eq!(lines, ["a 5", "c 12"]);
    let mut svg = Vec::new();
    flamegraph(&set, &FlameOptions::default(), &mut svg, &mut |_| {}).unwrap();
    assert!(String::from_utf8(svg).unwrap().contains("calls"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn forked_children_are_apart() {
    let dir = tmp("fork");
    let (e, x) = (KIND_ENTRY, KIND_EXIT);
    write_trace(&dir, 30, &["parent_fn"], &[(30, vec![raw(e, 0, 0, 0), raw(x, 0, 0, 50)])], None);
    let child = dir.join("child-31");
    std::fs::create_dir(&child).unwrap();
    write_trace(&child, 31, &["child_fn", "parent_fn"], &[(31, vec![raw(e, 0, 0, 60), raw(x, 0, 0, 90)])], None);
    let set = open(&dir);
    assert_eq!(set.pids(), [30, 31]);
    let r = report(&set, &ReportOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(r.processes[1].parent_pid, Some(30));
    assert_eq!(r.processes[0].functions.iter().map(|f| &f.function[..]).collect::<Vec<_>>(), ["parent_fn"]);
    assert_eq!(r.processes[1].functions.iter().map(|f| &f.function[..]).collect::<Vec<_>>(), ["child_fn"]);
    let (folded, _) = folded(&set, &mut |_| {}).unwrap();
    assert!(folded.contains("handmade [pid 31];child_fn 30"), "{folded}");
    assert!(folded.contains("handmade [pid 30];parent_fn 50"), "{folded}");
    let mut out = Vec::new();
    chrome(&set, &mut out, &mut |_| {}).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let child_ev = v["traceEvents"].as_array().unwrap().iter().find(|e| e["name"] == "child_fn").unwrap().clone();
    assert_eq!((child_ev["pid"].as_i64(), child_ev["ts"].as_f64()), (Some(31), Some(0.06)));
    let mut set = open(&dir);
    assert!(set.retain_pid(31));
    assert_eq!(set.pids(), [31]);
    // A damaged child is an error naming it.
    std::fs::write(child.join("tid-31.bin"), b"garbage").unwrap();
    let e = TraceSet::open(&dir, Default::default()).unwrap_err();
    assert!(matches!(e, AnalysisError::Child { .. }), "{e}");
    assert!(e.to_string().contains("child-31"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Sets fields of the `meta.json` of `dir`.
fn edit_meta(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(format::META_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(path, serde_json::to_vec(&m).unwrap()).unwrap();
}

/// A trace of one call of `f` by thread `pid`, started at `start` (Unix
/// ns), in `dir`.
fn one_call_trace(dir: &std::path::Path, pid: i32, f: &str, start: u64) {
    std::fs::create_dir_all(dir).unwrap();
    write_trace(dir, pid, &[f], &[(pid, vec![raw(KIND_ENTRY, 0, 0, 0), raw(KIND_EXIT, 0, 0, 10)])], None);
    edit_meta(dir, |m| m["start_unix_ns"] = start.into());
}

/// What a shell script running traced programs leaves: a directory with
/// no trace of its own and one per command; a subshell's commands one
/// level down, under a directory without a trace either; a command that
/// exec'd a traced program; a directory a process left empty.
#[test]
fn children_without_a_trace_of_their_own() {
    let dir = tmp("script");
    // Started in the order 45, the subshell 50's 51 (which exec'd), 44:
    // shown in that order, not by name.
    one_call_trace(&dir.join("child-44"), 44, "last", 600);
    one_call_trace(&dir.join("child-45"), 45, "first", 100);
    one_call_trace(&dir.join("child-50/child-51"), 51, "in_subshell", 400);
    one_call_trace(&dir.join("child-50/child-51/child-51-exec"), 51, "after_exec", 500);
    std::fs::create_dir_all(dir.join("child-60")).unwrap();
    let set = open(&dir);
    assert_eq!(set.pids(), [45, 51, 51, 44]);
    let origins: Vec<_> = set.processes.iter().map(|p| (p.origin, p.parent_pid)).collect();
    assert_eq!(
        origins,
        [(Origin::Started, None), (Origin::Started, Some(50)), (Origin::Exec, Some(51)), (Origin::Started, None)]
    );
    assert_eq!(set.processes[1].origin_text(), "started by pid 50");
    assert_eq!(set.processes[2].origin_text(), "pid 51 after exec");
    assert!(set.notes[0].contains("holds no trace of its own") && set.notes[0].contains("the 4 process(es)"));
    assert!(set.notes.iter().any(|n| n.contains("(pid 50, 60)")), "{:?}", set.notes);
    let r = report(&set, &ReportOptions::default(), &mut |_| {}).unwrap();
    let firsts: Vec<_> = r.processes.iter().map(|p| p.functions[0].function.as_str()).collect();
    assert_eq!(firsts, ["first", "in_subshell", "after_exec", "last"]);
    assert_eq!((r.processes[2].origin, r.processes[2].parent_pid), (Origin::Exec, Some(51)));
    let (folded, _) = folded(&set, &mut |_| {}).unwrap();
    assert!(folded.contains("handmade [pid 51];after_exec 10"), "{folded}");
    // --pid keeps a process's programs before and after its exec.
    let mut one = open(&dir);
    assert!(one.retain_pid(51));
    assert_eq!(one.pids(), [51, 51]);
    assert!(!one.retain_pid(44), "not kept");

    // Nothing but directories without a trace: the missing trace is the
    // error, as for an empty directory.
    let empty = tmp("script-empty");
    std::fs::create_dir_all(empty.join("child-7/child-8")).unwrap();
    let e = TraceSet::open(&empty, Default::default()).unwrap_err();
    assert!(e.to_string().contains("meta.json"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(empty);
}

#[test]
fn replay_colours_only_when_asked() {
    let dir = recursive_trace("replay-colour");
    let set = open(&dir);
    let mut plain = Vec::new();
    replay(&set, &ReplayOptions::default(), &mut plain, &mut |_| {}).unwrap();
    assert!(!plain.contains(&0x1b), "{}", String::from_utf8_lossy(&plain));
    let mut coloured = Vec::new();
    let opts = ReplayOptions { colors: color::Colors { on: true }, ..Default::default() };
    replay(&set, &opts, &mut coloured, &mut |_| {}).unwrap();
    let text = String::from_utf8(coloured).unwrap();
    assert!(text.contains("\x1b[1m# process handmade [pid 10]\x1b[0m"), "{text}");
    // Without the escape sequences, the same text.
    let stripped = text.replace("\x1b[1m", "").replace("\x1b[0m", "");
    assert_eq!(stripped, String::from_utf8(plain).unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn human_durations() {
    assert_eq!(human_ns(0), "0.000 us");
    assert_eq!(human_ns(1234), "1.234 us");
    assert_eq!(human_ns(999_999), "999.999 us");
    assert_eq!(human_ns(12_345_678), "12.345 ms");
    assert_eq!(human_ns(3_000_000_001), "3.000 s");
}

/// Found by textpoke-fuzz (fuzz/corpus/reader/deep-call-trees.tpf): the
/// folded text of deep stacks grows with the square of their depth, and
/// `folded` and `flamegraph` held it all (a 10 MB trace of such stacks
/// needs gigabytes). A 5,000-level recursion whose every level has self
/// time: its folded text (512 MB) is refused, its flame graph is drawn
/// from the lines that fit the budget, and says so.
#[test]
fn deep_stacks_have_bounded_folded_stacks_and_flame_graphs() {
    const DEPTH: u32 = 5000;
    let dir = tmp("deep");
    let name = "r".repeat(40);
    let mut events: Vec<format::Event> = (0..DEPTH).map(|d| raw(KIND_ENTRY, 0, d, 10 * d as u64)).collect();
    events.extend((0..DEPTH).rev().map(|d| raw(KIND_EXIT, 0, d, 10 * (2 * DEPTH - d) as u64)));
    write_trace(&dir, 7, &[&name], &[(7, events)], None);
    let set = open(&dir);
    let e = folded_to(&set, &mut std::io::sink(), &mut |_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AnalysisError::TooBig { .. }), "{msg}");
    assert!(msg.contains(&dir.display().to_string()) && msg.contains("5000 frames deep"), "{msg}");
    assert!(msg.contains("--flamegraph") && msg.contains("--perfetto"), "it says what to do instead: {msg}");
    let mut svg = Vec::new();
    flamegraph(&set, &FlameOptions::default(), &mut svg, &mut |_| {}).unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.contains("of the width left out"), "the subtitle says what was left out");
    // A line per level fits no budget: each line kept holds at least its
    // share of the width, so far fewer frames are drawn.
    let frames = svg.matches("<g>").count();
    assert!(frames > 100 && frames < DEPTH as usize, "{frames} frames");
    let _ = std::fs::remove_dir_all(dir);
}

/// The same shape, shallower: the folded text is written whole, and the
/// flame graph (under its budget) shows every level.
#[test]
fn folded_stacks_under_the_bound_are_whole() {
    const DEPTH: u32 = 300;
    let dir = tmp("deep-ok");
    let mut events: Vec<format::Event> = (0..DEPTH).map(|d| raw(KIND_ENTRY, 0, d, 10 * d as u64)).collect();
    events.extend((0..DEPTH).rev().map(|d| raw(KIND_EXIT, 0, d, 10 * (2 * DEPTH - d) as u64)));
    write_trace(&dir, 7, &["f"], &[(7, events)], None);
    let set = open(&dir);
    let mut text = Vec::new();
    assert_eq!(folded_to(&set, &mut text, &mut |_| {}).unwrap(), "ns");
    let text = String::from_utf8(text).unwrap();
    assert_eq!(text.lines().count(), DEPTH as usize);
    assert_eq!(text.lines().last().unwrap(), format!("{} 20", vec!["f"; DEPTH as usize].join(";")));
    let mut svg = Vec::new();
    flamegraph(&set, &FlameOptions::default(), &mut svg, &mut |_| {}).unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(!svg.contains("left out"));
    assert_eq!(svg.matches("<g>").count(), DEPTH as usize + 1, "every level and the root frame");
    let _ = std::fs::remove_dir_all(dir);
}

/// Found by textpoke-fuzz (fuzz/corpus/reader/deep-stack-orphans.tpf):
/// each exit matching no open call looked through the whole stack twice;
/// a 5,400-deep stack then 1.2 million such exits (10 MB of trace) took
/// 32 s of CPU per analysis, optimised. Now the call at the exit's depth is
/// found by binary search and a deep stack is indexed by function: 0.15 s.
#[test]
fn orphan_exits_under_a_deep_stack_are_cheap() {
    fn cpu() -> f64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    }
    let clock = ns_clock();
    let mut rb = Rebuilder::new(&clock);
    let depth = 5400u32;
    let t = cpu();
    let (mut orphans, mut events) = (0u64, 0u64);
    let mut count = |e: Event| {
        events += 1;
        orphans += matches!(e, Event::OrphanExit { .. }) as u64;
    };
    for d in 0..depth {
        rb.push(&en(1, d, d as u64), &mut count);
    }
    for k in 0..200_000u64 {
        rb.push(&ex(2, (k % depth as u64) as u32, 10_000 + k), &mut count);
    }
    rb.finish(&mut count);
    let spent = cpu() - t;
    assert_eq!(orphans, 200_000);
    assert_eq!(events, 200_000 + 2 * depth as u64);
    // About 0.5 s unoptimised; it was over 5 s optimised.
    assert!(spent < 10.0, "{spent} s of CPU");
}

/// Exits whose depth matches no open call still close the innermost call
/// of their function, on a stack deep enough to be indexed and after it
/// shrank back.
#[test]
fn exits_off_their_depth_on_deep_stacks() {
    // f0 at depths 0..100, f1 at 100, f0 at 101..200.
    let mut recs: Vec<Record> = (0..200).map(|d| en(if d == 100 { 1 } else { 0 }, d, d as u64)).collect();
    recs.push(ex(1, 7, 1000)); // f1 at a wrong depth: closes 101..199 as exit lost, then f1
    recs.push(ex(3, 50, 1001)); // nothing of f3 open: an orphan
    recs.push(ex(0, 150, 1002)); // f0 at a depth no call has: the innermost f0 (99)
    for d in (0..99).rev() {
        recs.push(ex(0, d, 1100 - d as u64));
    }
    recs.push(ex(0, 0, 2000)); // an orphan once the stack is empty
    let events = rebuild(&recs);
    assert_nested(&events);
    let calls = leaves(&events);
    assert_eq!(calls.len(), 200);
    assert_eq!(calls.iter().filter(|c| c.closed == Closed::ExitLost).count(), 99);
    let f1 = calls.iter().find(|c| c.func == FuncId(1)).unwrap();
    assert_eq!((f1.depth, f1.closed, f1.end), (100, Closed::Returned, 1000));
    let f0_99 = calls.iter().find(|c| c.depth == 99).unwrap();
    assert_eq!((f0_99.closed, f0_99.end), (Closed::Returned, 1002));
    assert!(calls.iter().filter(|c| c.depth < 99).all(|c| c.closed == Closed::Returned));
    assert_eq!(events.iter().filter(|e| matches!(e, Event::OrphanExit { .. })).count(), 2);
}
