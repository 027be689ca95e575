//! The fuzz corpus replayed as a normal test: every committed input of
//! `fuzz/corpus/reader` (trace directories, `*.tpf`) and
//! `fuzz/corpus/control` (request lines) must pass the fuzzer's checks
//! (`textpoke_fuzz::check`: no panic, errors that name the trace, open and
//! read agreeing, nesting stacks, well-formed outputs, bounded time and
//! memory per command).
//!
//! The bounds are the issue's, 2 s and 200 MB for 10 MB of trace, as a
//! rate per input byte; an input counts as at least [`FLOOR`] bytes (fixed
//! costs), and in a debug build the time is multiplied by [`SLOWDOWN`]
//! (unoptimised code). Time is the thread's CPU time, so a busy machine
//! does not fail the test; memory is the heap the thread held at peak,
//! counted by the fuzzer's allocator, installed here too.
//!
//! An input `NAME.tpf` may have `NAME.expect`: lines `STEP: ok` (the step
//! must succeed) or `STEP: TEXT` (it must fail with an error containing
//! TEXT), which pins what the fix of the bug it found does.

use std::path::{Path, PathBuf};
use textpoke_fuzz::alloc::{self, Counting};
use textpoke_fuzz::check::{self, Limits};
use textpoke_fuzz::container::TraceInput;

#[global_allocator]
static ALLOC: Counting = Counting;

const FLOOR: u64 = 256 << 10;
const SLOWDOWN: f64 = if cfg!(debug_assertions) { 40.0 } else { 1.0 };

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_none_or(|e| e != "expect" && e != "md"))
        .collect();
    files.sort();
    files
}

/// Checks `NAME.expect` against the outcome; returns what does not hold.
fn expectations(file: &Path, o: &check::Outcome) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(file.with_extension("expect")) else { return Vec::new() };
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let Some((step, want)) = line.split_once(": ") else {
            bad.push(format!("bad expectation line {line:?}"));
            continue;
        };
        let Some(s) = o.step(step) else {
            bad.push(format!("no step {step}"));
            continue;
        };
        match (want, &s.error) {
            ("ok", None) => {}
            ("ok", Some(e)) => bad.push(format!("{step} should succeed, failed: {e}")),
            (w, Some(e)) if e.contains(w) => {}
            (w, e) => bad.push(format!("{step} should fail with {w:?}, got {e:?}")),
        }
    }
    bad
}

#[test]
fn reader_corpus_replays_clean() {
    assert!(alloc::installed(), "the counting allocator measures nothing");
    check::install_panic_hook();
    let files = corpus("reader");
    assert!(files.len() >= 10, "the reader corpus is missing: {files:?}");
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-corpus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut failures = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let input = TraceInput::parse(&std::fs::read(f).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let dir = tmp.join(format!("in-{i}"));
        input.write_to(&dir).unwrap();
        let limits = Limits::scaled(input.size() as u64, FLOOR, SLOWDOWN);
        let o = check::check_reader(&dir, &limits, true);
        let name = f.file_name().unwrap().to_string_lossy();
        failures.extend(o.findings.iter().map(|x| format!("{name}: {x}")));
        failures.extend(expectations(f, &o).into_iter().map(|x| format!("{name}: {x}")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn control_corpus_replays_clean() {
    check::install_panic_hook();
    let files = corpus("control");
    assert!(files.len() >= 10, "the control corpus is missing: {files:?}");
    let names = check::function_names(5000);
    let limits = Limits { seconds: 0.25 * SLOWDOWN, bytes: 64 << 20, cap: None };
    let mut failures = Vec::new();
    for f in &files {
        let o = check::check_control(&std::fs::read(f).unwrap(), &names, &limits);
        let name = f.file_name().unwrap().to_string_lossy();
        failures.extend(o.findings.iter().map(|x| format!("{name}: {x}")));
        failures.extend(expectations(f, &o).into_iter().map(|x| format!("{name}: {x}")));
    }
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}
